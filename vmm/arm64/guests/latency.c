/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Guest-observed round trip of one function: argument 0 is the function ID (default
 * TRNG_VERSION), 1 the number of timed calls (default 1000), 2 its x1. Each call is timed with
 * the virtual counter around the HVC; the VMM prints the statistics of all of them.
 */
#include "hb_guest.h"

#define MAX_CALLS 20000

static uint64_t ticks[MAX_CALLS];

void guest_main(void)
{
	uint32_t fid = (uint32_t)hb_arg(0, 0x84000050u);
	uint64_t n = hb_arg(1, 1000), x1 = hb_arg(2, 0);
	struct hb_regs last = { 0 };

	if (n > MAX_CALLS)
		n = MAX_CALLS;
	for (int i = 0; i < 5; i++) /* warm-up, not counted */
		hb_hvc(fid, x1, 0, 0);
	for (uint64_t i = 0; i < n; i++) {
		uint64_t t0 = hb_ticks();

		last = hb_hvc(fid, x1, 0, 0);
		ticks[i] = hb_ticks() - t0;
	}
	hb_report("last", fid, 0, last, 0);
	hb_puts("samples fid=");
	hb_puthex(fid);
	hb_samples("", ticks, n);
}
