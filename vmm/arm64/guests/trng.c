/* SPDX-License-Identifier: Apache-2.0 */
/*
 * TRNG (Arm DEN0098) from a real guest: every function, fresh entropy, one bad bit count.
 * IDs: Arm DEN0098, arch/arm64/kvm/trng.c. The harness checks the values (tests/kvm_bed).
 */
#include "hb_guest.h"

#define TRNG_VERSION  0x84000050u
#define TRNG_FEATURES 0x84000051u
#define TRNG_GET_UUID 0x84000052u
#define TRNG_RND32    0x84000053u
#define TRNG_RND64    0xC4000053u

void guest_main(void)
{
	hb_call_report("version", TRNG_VERSION, 0, 0, 0);
	hb_call_report("features.rnd64", TRNG_FEATURES, TRNG_RND64, 0, 0);
	hb_call_report("features.unknown", TRNG_FEATURES, 0x8400005Fu, 0, 0);
	hb_call_report("uuid", TRNG_GET_UUID, 0, 0, 0);
	hb_call_report("rnd64.a", TRNG_RND64, 192, 0, 0);
	hb_call_report("rnd64.b", TRNG_RND64, 192, 0, 0);
	hb_call_report("rnd64.64bits", TRNG_RND64, 64, 0, 0);
	hb_call_report("rnd32", TRNG_RND32, 96, 0, 0);
	hb_call_report("rnd64.too_many_bits", TRNG_RND64, 193, 0, 0);
	hb_call_report("rnd64.zero_bits", TRNG_RND64, 0, 0, 0);

	/* The SMC conduit too: KVM forwards it with KVM_HYPERCALL_EXIT_SMC and has already moved
	 * the PC past the SMC (arch/arm64/kvm/hypercalls.c; api.rst, KVM_EXIT_HYPERCALL). */
	uint64_t t0 = hb_ticks();
	struct hb_regs r = hb_smc(TRNG_RND64, 128, 0, 0);

	hb_report("rnd64.smc", TRNG_RND64, 1, r, hb_ticks_to_ns(hb_ticks() - t0));
}
