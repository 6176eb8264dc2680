/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The VMM's side of the hyperbroker agent protocol in stream mode (include/hyperbroker/
 * vmm_protocol.h), over a virtio-serial port or any SOCK_STREAM-like file descriptor.
 *
 * One reader thread owns the receive side: it serves the agent's guest-memory reads and writes
 * straight from the registered VM's RAM (in arrival order, so a MEM_WRITE sent before a RESULT
 * is applied before that RESULT is handed to its vCPU) and hands replies to the threads waiting
 * for them. It knows nothing of KVM: the VM is a RAM window and a vm_id.
 */
#ifndef HB_AGENT_LINK_H
#define HB_AGENT_LINK_H

#include <stddef.h>
#include <stdint.h>

#include "hyperbroker/vmm_protocol.h"

#define HB_LINK_MAX_VCPUS   8u
#define HB_LINK_MAX_ACTIONS 16u

struct agent_link;

/* One RESULT as the VMM applies it. */
struct link_result {
	struct hb_result r;
	struct hb_action actions[HB_LINK_MAX_ACTIONS];
};

/* The REGISTER_VM_REPLY of a registration. */
struct link_registration {
	int32_t status;
	uint32_t vm_id;
	uint64_t policy_version;
	uint32_t nr_filters;
	struct hb_smccc_filter filters[HB_MAX_FILTERS];
	char message[256];
};

/* Takes ownership of `fd` and starts the reader thread. */
struct agent_link *link_open(int fd);

/* Registers one VM whose RAM is [gpa, gpa + size) at `ram`; memory requests are served from it
 * until link_destroy_vm. Returns 0 with `out` filled (out->status may still be -errno from the
 * agent), or -errno when the link failed or timed out. */
int link_register_vm(struct agent_link *l, const char *name, const char *profile,
		     uint32_t nr_vcpus, uint64_t gpa, uint64_t size, uint8_t *ram,
		     struct link_registration *out);

/* HB_MSG_FILTER_REPORT: positive errnos (0 = installed), one per filter, in order. */
int link_filter_report(struct agent_link *l, uint32_t vm_id, const int32_t *errnos, uint32_t n);

/* HB_MSG_CALL then wait for its HB_MSG_RESULT. 0 on success; -ETIMEDOUT, -EPIPE (link down) or
 * -EPROTO (the agent refused the call with HB_MSG_ERROR) otherwise. */
int link_call(struct agent_link *l, const struct hb_call *call, struct link_result *out,
	      unsigned timeout_ms);

/* HB_MSG_DESTROY_VM; afterwards no memory request reaches the RAM. Returns the agent's status. */
int link_destroy_vm(struct agent_link *l, uint32_t vm_id);

/* HB_MSG_VM_RESET: the VM was reset without the agent asking (in-kernel PSCI); waits until the
 * handlers have forgotten the old boot. Returns the agent's status (0, -ENOTCONN, -ETIMEDOUT). */
int link_vm_reset(struct agent_link *l, uint32_t vm_id);

/* HB_MSG_PING -> HB_MSG_PONG round trip; 0 or -errno. */
int link_ping(struct agent_link *l, unsigned timeout_ms);

/* Counters for the run summary. */
struct link_stats {
	uint64_t mem_reads, mem_writes, mem_refused, bytes_read, bytes_written, errors_received;
};
void link_stats(struct agent_link *l, struct link_stats *out);

#endif /* HB_AGENT_LINK_H */
