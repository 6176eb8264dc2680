/* SPDX-License-Identifier: Apache-2.0 */
/*
 * KVM arm64 UAPI the build's headers may lack.
 *
 * Debian bookworm's cross headers (linux-libc-dev-arm64-cross 6.1) predate the SMCCC filter of
 * Linux 6.4. Definitions copied from arch/arm64/include/uapi/asm/kvm.h and
 * include/uapi/linux/kvm.h; run->hypercall.flags shares its offset with the 6.1 `longmode` slot.
 */
#ifndef HB_KVM_COMPAT_H
#define HB_KVM_COMPAT_H

#include <linux/kvm.h>
#include <stdint.h>

#ifndef KVM_ARM_VM_SMCCC_CTRL
#define KVM_ARM_VM_SMCCC_CTRL   0
#define KVM_ARM_VM_SMCCC_FILTER 0

enum kvm_smccc_filter_action {
	KVM_SMCCC_FILTER_HANDLE = 0,
	KVM_SMCCC_FILTER_DENY,
	KVM_SMCCC_FILTER_FWD_TO_USER,
};

struct kvm_smccc_filter {
	uint32_t base;
	uint32_t nr_functions;
	uint8_t action;
	uint8_t pad[15];
};
#endif

#ifndef KVM_HYPERCALL_EXIT_SMC
#define KVM_HYPERCALL_EXIT_SMC   (1u << 0)
#define KVM_HYPERCALL_EXIT_16BIT (1u << 1)
#endif

_Static_assert(sizeof(struct kvm_smccc_filter) == 24, "struct kvm_smccc_filter");

/* Core register IDs for KVM_GET/SET_ONE_REG (Documentation/virt/kvm/api.rst). */
#define HB_REG_CORE(off32)  (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | (off32))
#define HB_REG_X(n)         HB_REG_CORE(2u * (n))  /* regs.regs[n] */
#define HB_REG_PC           HB_REG_CORE(0x40)
#define HB_REG_PSTATE       HB_REG_CORE(0x42)

/* PSTATE at a reset into EL1h with D, A, I, F masked (arm64 Linux booting.rst). */
#define HB_PSTATE_EL1H_MASKED 0x3c5u

static inline uint32_t hb_hypercall_flags(const struct kvm_run *run)
{
	return run->hypercall.longmode; /* the low half of the 6.4+ `__u64 flags` */
}

#endif /* HB_KVM_COMPAT_H */
