/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Guest memory on the agent link, driven by FF-A (DEN0077): RXTX_MAP makes the handler probe the
 * buffers with MEM_READ (one map outside the VM's RAM, which the VMM must refuse, then a good
 * one), and PARTITION_INFO_GET makes it write descriptors into RX with MEM_WRITE, which the VMM
 * must apply before the RESULT. IDs: handlers/ffa/abi.py.
 */
#include "hb_guest.h"

#define FFA_VERSION            0x84000063u
#define FFA_RX_RELEASE         0x84000065u
#define FFA_RXTX_MAP_64        0xC4000066u
#define FFA_PARTITION_INFO_GET 0x84000068u
#define FFA_VERSION_1_2        0x10002u
#define OUTSIDE_RAM            0x7F000000ull /* far above the 16 MiB at 0x40000000 */

static uint8_t tx[4096] __attribute__((aligned(4096)));
static uint8_t rx[4096] __attribute__((aligned(4096)));

void guest_main(void)
{
	volatile uint32_t *words = (volatile uint32_t *)rx;

	hb_call_report("version", FFA_VERSION, FFA_VERSION_1_2, 0, 0);
	hb_call_report("map.outside", FFA_RXTX_MAP_64, OUTSIDE_RAM, OUTSIDE_RAM + 4096, 1);
	hb_call_report("map", FFA_RXTX_MAP_64, (uint64_t)(uintptr_t)tx, (uint64_t)(uintptr_t)rx,
		       1);
	hb_call_report("info", FFA_PARTITION_INFO_GET, 0, 0, 0);
	/* Two 24-byte descriptors (FF-A 1.1+): u16 ID, u16 contexts, u32 properties, UUID. */
	hb_puts("rx desc0=");
	hb_puthex(words[0]);
	hb_puts(" desc1=");
	hb_puthex(words[6]);
	hb_newline();
	hb_call_report("rx_release", FFA_RX_RELEASE, 0, 0, 0);
}
