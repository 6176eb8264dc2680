/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Two vCPUs: vCPU 0 powers vCPU 1 on with PSCI CPU_ON (DEN0022 §5.6) at hb_secondary_entry with
 * a context id, vCPU 1 makes a forwarded call of its own (so the VMM's calls carry vcpu = 1)
 * and powers itself off with CPU_OFF; vCPU 0 waits for it and reports. Run with vcpus=2.
 * Whoever serves PSCI (KVM, or a handler whose actions the VMM carries out) must get this right.
 */
#include "hb_guest.h"

#define CONTEXT_ID 0x5ec0dd00u
#define TRNG_RND64 0xC4000053u

static volatile uint64_t secondary_context;
static volatile uint64_t secondary_done;

void guest_secondary(uint64_t context)
{
	secondary_context = context;
	hb_call_report("secondary.rnd64", TRNG_RND64, 64, 0, 0);
	hb_puts("secondary up vcpu=");
	hb_putdec(hb_cpu_index());
	hb_puts(" context=");
	hb_puthex(context);
	hb_newline();
	secondary_done = 1;
}

void guest_main(void)
{
	uint64_t hz = hb_counter_hz(), start;
	struct hb_regs on = hb_call_report("cpu_on", HB_PSCI_CPU_ON, 1,
					   (uint64_t)(uintptr_t)hb_secondary_entry, CONTEXT_ID);

	start = hb_ticks();
	while (!secondary_done && hb_ticks() - start < 5 * hz)
		;
	hb_puts("primary vcpu=");
	hb_putdec(hb_cpu_index());
	hb_puts(" cpu_on=");
	hb_puthex(on.x0);
	hb_puts(" secondary_done=");
	hb_putdec(secondary_done);
	hb_puts(" secondary_context=");
	hb_puthex(secondary_context);
	hb_newline();
	if (!secondary_done)
		hb_exit(1);
}
