/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The demo's guest: a steady stream of TRNG calls and a few that policy denies or no handler
 * serves, one every ~100 ms for argument 0 seconds (default 10), each reported as it happens.
 */
#include "hb_guest.h"

struct demo_call {
	const char *label;
	uint32_t fid;
	uint64_t x1;
};

static const struct demo_call calls[] = {
	{ "trng.version", 0x84000050u, 0 },
	{ "trng.rnd64", 0xC4000053u, 192 },
	{ "trng.uuid", 0x84000052u, 0 },
	{ "trng.rnd64", 0xC4000053u, 64 },
	{ "trng.features", 0x84000051u, 0xC4000053u },
	{ "denied", 0x86000100u, 0 },
	{ "unserved", 0x8400005Fu, 0 },
	{ "trng.rnd32", 0x84000053u, 96 },
};

void guest_main(void)
{
	uint64_t hz = hb_counter_hz(), seconds = hb_arg(0, 10);
	uint64_t start = hb_ticks(), gap = hz / 10;

	for (unsigned i = 0; hb_ticks() - start < seconds * hz; i++) {
		const struct demo_call *c = &calls[i % (sizeof(calls) / sizeof(calls[0]))];
		uint64_t next = hb_ticks() + gap;

		hb_call_report(c->label, c->fid, c->x1, 0, 0);
		while (hb_ticks() < next)
			;
	}
}
