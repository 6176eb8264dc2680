/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PSCI served by the broker's psci handler, on two vCPUs (Arm DEN0022; IDs and return codes in
 * include/uapi/linux/psci.h). Run with vcpus=2 under a profile forwarding the PSCI range.
 *
 * vCPU 0: PSCI_VERSION and PSCI_FEATURES; AFFINITY_INFO of vCPU 1 (OFF); CPU_ON of vCPU 1 at
 * hb_secondary_entry with a context id; vCPU 1 writes that context id to a marker word and
 * prints it; vCPU 0 sees the marker, AFFINITY_INFO says ON and a second CPU_ON ALREADY_ON; vCPU 0
 * lets vCPU 1 go, vCPU 1 calls CPU_OFF (hb_cpu_off, when guest_secondary returns); vCPU 0 polls
 * AFFINITY_INFO until OFF, then SYSTEM_OFF ends the VM (the program never returns).
 */
#include "hb_guest.h"

#define PSCI_VERSION        0x84000000u
#define PSCI_AFFINITY_INFO  0xC4000004u
#define PSCI_MIGRATE        0x84000005u
#define PSCI_FEATURES       0x8400000Au
#define PSCI_SYSTEM_OFF2    0xC4000015u
#define SMCCC_VERSION       0x80000000u
#define CONTEXT_ID          0xC0FFEE01ull
#define AFFINITY_OFF        1u

static volatile uint64_t marker;  /* vCPU 1 writes its context id here */
static volatile uint64_t release; /* vCPU 0 lets vCPU 1 power itself off */

void guest_secondary(uint64_t context)
{
	uint64_t hz = hb_counter_hz(), start = hb_ticks();

	marker = context;
	hb_puts("secondary up vcpu=");
	hb_putdec(hb_cpu_index());
	hb_puts(" marker=");
	hb_puthex(context);
	hb_newline();
	while (!release && hb_ticks() - start < 5 * hz)
		;
	/* Returning powers this vCPU off with PSCI CPU_OFF (start.S). */
}

void guest_main(void)
{
	uint64_t hz = hb_counter_hz(), start, polls = 0;
	struct hb_regs r;

	hb_call_report("version", PSCI_VERSION, 0, 0, 0);
	hb_call_report("features.cpu_on", PSCI_FEATURES, HB_PSCI_CPU_ON, 0, 0);
	hb_call_report("features.affinity_info", PSCI_FEATURES, PSCI_AFFINITY_INFO, 0, 0);
	hb_call_report("features.cpu_off", PSCI_FEATURES, HB_PSCI_CPU_OFF, 0, 0);
	hb_call_report("features.system_off", PSCI_FEATURES, HB_PSCI_SYSTEM_OFF, 0, 0);
	hb_call_report("features.system_off2", PSCI_FEATURES, PSCI_SYSTEM_OFF2, 0, 0);
	hb_call_report("features.smccc_version", PSCI_FEATURES, SMCCC_VERSION, 0, 0);
	hb_call_report("features.migrate", PSCI_FEATURES, PSCI_MIGRATE, 0, 0);

	hb_call_report("affinity.before", PSCI_AFFINITY_INFO, 1, 0, 0);
	hb_call_report("cpu_on", HB_PSCI_CPU_ON, 1, (uint64_t)(uintptr_t)hb_secondary_entry,
		       CONTEXT_ID);
	start = hb_ticks();
	while (marker != CONTEXT_ID && hb_ticks() - start < 5 * hz)
		;
	hb_puts("primary saw marker=");
	hb_puthex(marker);
	hb_newline();
	hb_call_report("affinity.on", PSCI_AFFINITY_INFO, 1, 0, 0);
	hb_call_report("cpu_on.again", HB_PSCI_CPU_ON, 1, (uint64_t)(uintptr_t)hb_secondary_entry,
		       CONTEXT_ID);

	release = 1;
	start = hb_ticks();
	do {
		uint64_t t0 = hb_ticks();

		r = hb_hvc(PSCI_AFFINITY_INFO, 1, 0, 0);
		polls++;
		if (r.x0 == AFFINITY_OFF || hb_ticks() - start >= 5 * hz) {
			hb_report("affinity.off", PSCI_AFFINITY_INFO, 0, r,
				  hb_ticks_to_ns(hb_ticks() - t0));
			break;
		}
	} while (1);
	hb_puts("affinity polls=");
	hb_putdec(polls);
	hb_newline();
	if (marker != CONTEXT_ID || r.x0 != AFFINITY_OFF)
		hb_exit(1);

	hb_hvc(HB_PSCI_SYSTEM_OFF, 0, 0, 0);
	hb_puts("psci returned"); /* SYSTEM_OFF does not return when it works */
	hb_newline();
	hb_exit(2);
}
