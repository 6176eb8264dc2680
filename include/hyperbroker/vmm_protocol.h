/* SPDX-License-Identifier: Apache-2.0 */
/*
 * hyperbroker VMM <-> agent protocol, version 1.
 *
 * A VMM that runs an arm64 guest under KVM's SMCCC filter (Linux 6.4+) hands each
 * KVM_EXIT_HYPERCALL to the hyperbroker agent on its host and writes the answer back with
 * KVM_SET_ONE_REG. This header is the whole contract; docs/vmm-protocol.md explains it.
 *
 * Transport: a Unix socket to the agent, either
 *   - SOCK_SEQPACKET: one message per packet; guest-RAM regions may be passed as file
 *     descriptors (SCM_RIGHTS) with HB_MSG_REGISTER_VM so the agent serves guest-memory
 *     accesses from its own mappings (each fd a memfd sealed with F_SEAL_SHRINK and at least
 *     mmap_offset + size long, so it cannot shrink under the agent's mapping; anything else is
 *     refused with -EINVAL); or
 *   - SOCK_STREAM: messages back to back, each framed by its header's length field; the agent
 *     reads and writes guest memory with HB_MSG_MEM_READ / HB_MSG_MEM_WRITE messages that the
 *     VMM serves. (This is the mode to use behind a serial link.)
 *
 * Every integer is little-endian. Every struct is packed by construction (natural alignment, no
 * implicit padding); the static asserts below pin the sizes.
 */
#ifndef HYPERBROKER_VMM_PROTOCOL_H
#define HYPERBROKER_VMM_PROTOCOL_H

#include <stdint.h>

#define HB_MAGIC            0x31504248u /* "HBP1" as bytes on the wire */
#define HB_VERSION          1u
#define HB_MAX_PAYLOAD      (128u * 1024u) /* larger frames are refused with HB_MSG_ERROR */
#define HB_MAX_MEM_CHUNK    (64u * 1024u)  /* most bytes one MEM_READ / MEM_WRITE moves */
#define HB_NR_REGS          18u            /* x0..x17 */
#define HB_MAX_REGIONS      64u
#define HB_MAX_FILTERS      64u
#define HB_MAX_VCPUS        512u
#define HB_NAME_LEN         64u
#define HB_PROFILE_LEN      32u

/* Message types. A reply has the request's type with bit 7 set and echoes its tag. */
enum hb_msg_type {
	HB_MSG_REGISTER_VM       = 0x01, /* VMM -> agent; reply HB_MSG_REGISTER_VM_REPLY */
	HB_MSG_FILTER_REPORT     = 0x02, /* VMM -> agent; no reply */
	HB_MSG_CALL              = 0x03, /* VMM -> agent; reply HB_MSG_RESULT */
	HB_MSG_DESTROY_VM        = 0x04, /* VMM -> agent; reply HB_MSG_DESTROY_VM_REPLY */
	HB_MSG_MEM_READ          = 0x05, /* agent -> VMM (stream mode); reply HB_MSG_MEM_READ_REPLY */
	HB_MSG_MEM_WRITE         = 0x06, /* agent -> VMM (stream mode); no reply unless it fails */
	HB_MSG_PING              = 0x07, /* either way; reply HB_MSG_PONG, empty payload */
	HB_MSG_VM_RESET          = 0x08, /* VMM -> agent; reply HB_MSG_VM_RESET_REPLY */
	HB_MSG_ERROR             = 0x7f, /* either way: the message with this tag was refused */

	HB_MSG_REGISTER_VM_REPLY = 0x81,
	HB_MSG_RESULT            = 0x83,
	HB_MSG_DESTROY_VM_REPLY  = 0x84,
	HB_MSG_MEM_READ_REPLY    = 0x85,
	HB_MSG_PONG              = 0x87,
	HB_MSG_VM_RESET_REPLY    = 0x88,
};

struct hb_header {
	uint32_t magic;    /* HB_MAGIC */
	uint16_t version;  /* HB_VERSION */
	uint16_t type;     /* enum hb_msg_type */
	uint32_t length;   /* payload bytes after this header, <= HB_MAX_PAYLOAD */
	uint32_t tag;      /* chosen by the requester, echoed in the reply or error */
};

/* HB_MSG_REGISTER_VM: payload = struct hb_register_vm + nr_regions * struct hb_mem_region,
 * then, with HB_REGISTER_BOOT_ID, HB_BOOT_ID_LEN bytes naming this boot of the VM. */
#define HB_REGISTER_MEM_FDS (1u << 0) /* SEQPACKET only: one fd per region in SCM_RIGHTS */
/* The VMM's own random ID for this boot (not all zero). Registering again with the same ID, after
 * the agent restarted or the connection dropped, resumes the VM's handler state; without it (or
 * with a new one) every registration is a new boot. */
#define HB_REGISTER_BOOT_ID (1u << 1)
#define HB_BOOT_ID_LEN 16

struct hb_mem_region {
	uint64_t gpa;          /* guest-physical base */
	uint64_t size;         /* bytes */
	uint64_t mmap_offset;  /* offset of the region in its fd (HB_REGISTER_MEM_FDS) */
	uint32_t flags;        /* HB_REGION_READONLY */
	uint32_t reserved;     /* 0 */
};
#define HB_REGION_READONLY (1u << 0)

struct hb_register_vm {
	char     name[HB_NAME_LEN];       /* NUL-padded; unique on this host, stable for the VM's life */
	char     profile[HB_PROFILE_LEN]; /* NUL-padded policy profile; empty = "default" */
	uint32_t nr_vcpus;                /* 1..HB_MAX_VCPUS */
	uint32_t flags;                   /* HB_REGISTER_* */
	uint32_t nr_regions;              /* <= HB_MAX_REGIONS */
	uint32_t reserved;                /* 0 */
	/* struct hb_mem_region regions[nr_regions]; */
};

/* The exact struct kvm_smccc_filter of arch/arm64/include/uapi/asm/kvm.h (Linux 6.4+). */
struct hb_smccc_filter {
	uint32_t base;
	uint32_t nr_functions;
	uint8_t  action;       /* 1 = KVM_SMCCC_FILTER_DENY, 2 = KVM_SMCCC_FILTER_FWD_TO_USER */
	uint8_t  pad[15];      /* 0 */
};

/* HB_MSG_REGISTER_VM_REPLY: struct hb_register_vm_reply + nr_filters filters + message text. */
struct hb_register_vm_reply {
	int32_t  status;          /* 0, or -errno (the text after the filters says why) */
	uint32_t vm_id;           /* the agent's handle for this VM, never 0; use it in every call */
	uint64_t policy_version;  /* the policy version this VM keeps for its whole life */
	uint32_t nr_filters;      /* install each with KVM_SET_DEVICE_ATTR before the first KVM_RUN */
	uint32_t reserved;
	/* struct hb_smccc_filter filters[nr_filters]; then UTF-8 text up to the payload's end */
};

/* HB_MSG_FILTER_REPORT: what KVM_SET_DEVICE_ATTR returned for each filter, in order. */
struct hb_filter_report {
	uint32_t vm_id;
	uint32_t nr_filters;
	/* int32_t errnos[nr_filters];  0 = installed, else the positive errno */
};

/* HB_MSG_CALL: one KVM_EXIT_HYPERCALL. */
struct hb_call {
	uint32_t vm_id;
	uint32_t vcpu;         /* < nr_vcpus; at most one call in flight per vCPU */
	uint64_t seq;          /* per vCPU, increasing for the VM's whole life (resets too);
	                        * a re-sent call keeps its seq */
	uint32_t function_id;  /* run->hypercall.nr */
	uint32_t exit_flags;   /* run->hypercall.flags: bit 0 SMC, bit 1 16-bit instruction */
	uint64_t exit_ns;      /* CLOCK_MONOTONIC at the exit, or 0 */
	uint64_t x[HB_NR_REGS]; /* x0..x17 read with KVM_GET_ONE_REG */
};

/* Where the time went, in nanoseconds, as measured by agent and broker. */
struct hb_timing {
	uint64_t agent_ns;           /* call received -> result sent, in the agent */
	uint64_t link_ns;            /* agent <-> broker round trip minus broker time */
	uint64_t broker_queue_ns;    /* call received by the broker -> handler started */
	uint64_t handler_ns;         /* in the handler, memory round trips included */
	uint64_t memory_ns;          /* guest-memory round trips the handler awaited */
	uint32_t memory_round_trips;
	uint32_t source;             /* enum hb_result_source */
};

enum hb_result_source {
	HB_SOURCE_BROKER   = 0, /* a handler (or the broker's default) answered */
	HB_SOURCE_AGENT    = 1, /* a static answer from the compiled policy, served by the agent */
	HB_SOURCE_FALLBACK = 2, /* the deadline passed or the broker was unreachable */
};

enum hb_outcome {
	HB_OUTCOME_OK             = 0,
	HB_OUTCOME_GUEST_ERROR    = 1,
	HB_OUTCOME_DENIED         = 2,
	HB_OUTCOME_FALLBACK       = 3,
	HB_OUTCOME_INTERNAL_ERROR = 4,
};

enum hb_action_kind {
	HB_ACTION_CPU_ON         = 1, /* vcpu; address = entry point; value = context id (x0) */
	HB_ACTION_CPU_OFF        = 2, /* vcpu */
	HB_ACTION_CPU_SUSPEND    = 3, /* vcpu; address = entry point; value = context id */
	HB_ACTION_SYSTEM_OFF     = 4,
	HB_ACTION_SYSTEM_RESET   = 5, /* cold reset (PSCI SYSTEM_RESET) */
	HB_ACTION_SYSTEM_SUSPEND = 6, /* vcpu; address = entry point; value = context id */
	HB_ACTION_INJECT_IRQ     = 7, /* vcpu; value = INTID; address = level */
	HB_ACTION_SYSTEM_OFF2    = 8, /* value = off type, address = cookie (PSCI SYSTEM_OFF2) */
	HB_ACTION_SYSTEM_RESET2  = 9, /* value = reset type, address = cookie (PSCI SYSTEM_RESET2) */
};

struct hb_action {
	uint32_t kind;  /* enum hb_action_kind */
	uint32_t vcpu;
	uint64_t address;
	uint64_t value;
};

/* HB_MSG_RESULT: struct hb_result + nr_actions * struct hb_action.
 * Write x[i] with KVM_SET_ONE_REG for every bit i set in reg_mask, carry out the actions in
 * order, then resume the vCPU. In stream mode every HB_MSG_MEM_WRITE the agent sent before
 * this result must be applied first (they arrive first). */
struct hb_result {
	uint32_t vm_id;
	uint32_t vcpu;
	uint64_t seq;
	uint32_t outcome;       /* enum hb_outcome */
	uint32_t reg_mask;      /* bit i: write x[i] */
	uint64_t x[HB_NR_REGS];
	struct hb_timing timing;
	uint32_t nr_actions;
	uint32_t reserved;
	/* struct hb_action actions[nr_actions]; */
};

/* HB_MSG_DESTROY_VM; reply HB_MSG_DESTROY_VM_REPLY with struct hb_status. */
struct hb_destroy_vm {
	uint32_t vm_id;
	uint32_t reserved;
};

struct hb_status {
	int32_t  status;   /* 0 or -errno */
	uint32_t reserved;
};

/* HB_MSG_VM_RESET: the VM is being reset (a reset KVM served itself, e.g. in-kernel PSCI
 * SYSTEM_RESET, or one the VMM decided). Send it before the VM runs again and wait for
 * HB_MSG_VM_RESET_REPLY (struct hb_status): 0 once every handler has forgotten the old boot
 * (FF-A buffers and shares, OP-TEE sessions ...); -ENOTCONN or -ETIMEDOUT if the broker could
 * not be told (the VM may run, with handler state of its previous boot). Resets the agent itself
 * asked for with HB_ACTION_SYSTEM_RESET / SYSTEM_RESET2 need no message: the handlers forgot the
 * boot before that RESULT was sent. */
struct hb_vm_reset {
	uint32_t vm_id;
	uint32_t reserved;
};

/* HB_MSG_MEM_READ (agent -> VMM): reply HB_MSG_MEM_READ_REPLY = struct hb_mem_reply + data. */
struct hb_mem_access {
	uint32_t vm_id;
	uint32_t length;   /* <= HB_MAX_MEM_CHUNK */
	uint64_t gpa;
	/* HB_MSG_MEM_WRITE: followed by `length` bytes of data */
};

struct hb_mem_reply {
	int32_t  status;   /* 0, or -EFAULT when [gpa, gpa+length) is not guest RAM */
	uint32_t length;   /* bytes of data that follow (the requested length on success) */
};

/* HB_MSG_ERROR: struct hb_error + UTF-8 text up to the payload's end. */
struct hb_error {
	int32_t  code;          /* positive errno: EPROTO, EMSGSIZE, EINVAL, ENOENT, EBUSY ... */
	uint16_t refused_type;  /* type of the refused message, 0 if it could not be read */
	uint16_t reserved;
};

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(sizeof(struct hb_header) == 16, "hb_header");
_Static_assert(sizeof(struct hb_mem_region) == 32, "hb_mem_region");
_Static_assert(sizeof(struct hb_register_vm) == 112, "hb_register_vm");
_Static_assert(sizeof(struct hb_smccc_filter) == 24, "hb_smccc_filter");
_Static_assert(sizeof(struct hb_register_vm_reply) == 24, "hb_register_vm_reply");
_Static_assert(sizeof(struct hb_filter_report) == 8, "hb_filter_report");
_Static_assert(sizeof(struct hb_call) == 176, "hb_call");
_Static_assert(sizeof(struct hb_timing) == 48, "hb_timing");
_Static_assert(sizeof(struct hb_action) == 24, "hb_action");
_Static_assert(sizeof(struct hb_result) == 224, "hb_result");
_Static_assert(sizeof(struct hb_destroy_vm) == 8, "hb_destroy_vm");
_Static_assert(sizeof(struct hb_status) == 8, "hb_status");
_Static_assert(sizeof(struct hb_vm_reset) == 8, "hb_vm_reset");
_Static_assert(sizeof(struct hb_mem_access) == 16, "hb_mem_access");
_Static_assert(sizeof(struct hb_mem_reply) == 8, "hb_mem_reply");
_Static_assert(sizeof(struct hb_error) == 8, "hb_error");
#endif

#endif /* HYPERBROKER_VMM_PROTOCOL_H */
