/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The broker goes away mid-run: a call before, then the host stops the broker (hb_wait), then
 * calls that must come back with the rule's fallback within its deadline, and proof that the
 * vCPU runs on afterwards. Argument 0: the function to call (default TRNG_RND64), 1: its x1.
 */
#include "hb_guest.h"

void guest_main(void)
{
	uint32_t fid = (uint32_t)hb_arg(0, 0xC4000053u);
	uint64_t x1 = hb_arg(1, 64);

	hb_call_report("before", fid, x1, 0, 0);
	hb_wait("stop-broker");
	hb_call_report("during.1", fid, x1, 0, 0);
	hb_call_report("during.2", fid, x1, 0, 0);
	hb_call_report("during.3", fid, x1, 0, 0);
	hb_call_report("during.4", fid, x1, 0, 0);
	hb_call_report("during.5", fid, x1, 0, 0);
	/* Still running: plain guest work and one more line prove the vCPU was not stuck. */
	hb_puts("alive after_fallback=1");
	hb_newline();
}
