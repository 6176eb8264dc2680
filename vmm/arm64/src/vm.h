/* SPDX-License-Identifier: Apache-2.0 */
/*
 * One L2 VM of the reference VMM: KVM VM and vCPU file descriptors, guest RAM, the SMCCC
 * filter, the run loop (hypercall, MMIO test device, system events) and the VMM actions.
 * Calls go to the agent through agent_link, or are answered here in "local" mode (the in-L1
 * baseline of the latency figures). It knows nothing of the plan syntax or of the console.
 */
#ifndef HB_VM_H
#define HB_VM_H

#include <stdint.h>

#include "agent_link.h"
#include "kvm_compat.h"

#define VM_MAX_VCPUS HB_LINK_MAX_VCPUS

struct vm_config {
	const char *guest;          /* program name: /guests/<guest>.bin */
	const char *profile;        /* policy profile to register with ("" = default) */
	uint32_t nr_vcpus;          /* 1..VM_MAX_VCPUS; vCPU 0 starts, the others wait for CPU_ON */
	uint64_t args[16];          /* read by the guest through the test device */
	unsigned nr_args;
	int local;                  /* answer every forwarded call in the VMM, no agent */
	struct kvm_smccc_filter local_filters[8]; /* what local mode installs itself */
	unsigned nr_local_filters;
	unsigned call_timeout_ms;   /* the VMM's own last resort if the agent never answers */
	unsigned run_timeout_ms;    /* the whole run */
};

/* Opens /dev/kvm once and checks what the bed needs (arm64 KVM, the SMCCC filter). */
int kvm_open_system(void);

/* Runs one guest program end to end: create, register, filter, run, destroy. 0 on a clean
 * run whose program exited with status 0; prints HB records on the way. */
int vm_run_program(int kvm_fd, struct agent_link *link, const struct vm_config *cfg);

/* Installs raw filter records on a fresh VM and prints what KVM_SET_DEVICE_ATTR returned for
 * each, in order. A NULL record (ran_before marker) runs the vCPU once first. */
struct raw_filter {
	int ran_marker;
	struct kvm_smccc_filter f;
};
int vm_probe_filters(int kvm_fd, const struct raw_filter *records, unsigned n);

#endif /* HB_VM_H */
