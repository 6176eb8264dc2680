/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A pKVM guest's memory-share calls against the broker's memshare handler (handlers/memshare),
 * with the vendor-hyp range forwarded to it (include/linux/arm-smccc.h,
 * Documentation/virt/kvm/arm/hypercalls.rst; the Linux guest
 * driver drivers/virt/coco/pkvm-guest/arm-pkvm-guest.c does the same in this order).
 *
 * Discovery (KVM's UID, the KVM_FEATURES bitmap of exactly what is served, PTP hidden), then
 * HYP_MEMINFO; MEM_SHARE of the 8 granules of a buffer, MEM_UNSHARE of granules 2 and 5, MEM_SHARE
 * of granule 2 again; MMIO_GUARD of the test device's page twice; then every refusal (-3
 * INVALID_PARAMETER): non-zero MBZ arguments, an unaligned IPA, a denied IPA (argument 0), an IPA
 * outside RAM, a granule shared twice, one unshared that is not shared, a guard on RAM. The
 * buffer's address is printed, and the guest waits (hb_wait) so the host can read the VM's record
 * from the broker while the VM is still registered.
 */
#include "hb_guest.h"

#define VENDOR_HYP_CALL_UID 0x8600FF01u
#define KVM_FEATURES        0x86000000u
#define KVM_PTP             0x86000001u
#define HYP_MEMINFO         0xC6000002u
#define MEM_SHARE           0xC6000003u
#define MEM_UNSHARE         0xC6000004u
#define MMIO_GUARD          0xC6000007u
#define GRANULE             4096u
#define GRANULES            8u
#define OUTSIDE_RAM         0x7F000000ull /* far above the 16 MiB at 0x40000000 */

static uint8_t buffer[GRANULES * GRANULE] __attribute__((aligned(GRANULE)));

static const char *const share_labels[GRANULES] = {
	"share.0", "share.1", "share.2", "share.3", "share.4", "share.5", "share.6", "share.7",
};

void guest_main(void)
{
	uint64_t base = (uint64_t)(uintptr_t)buffer;
	uint64_t denied = hb_arg(0, 0x40E00000ull);
	unsigned i;

	hb_puts("buffer base=");
	hb_puthex(base);
	hb_puts(" granules=");
	hb_putdec(GRANULES);
	hb_newline();

	hb_call_report("uid", VENDOR_HYP_CALL_UID, 0, 0, 0);
	hb_call_report("features", KVM_FEATURES, 0, 0, 0);
	hb_call_report("ptp", KVM_PTP, 0, 0, 0);
	hb_call_report("meminfo", HYP_MEMINFO, 0, 0, 0);

	for (i = 0; i < GRANULES; i++)
		hb_call_report(share_labels[i], MEM_SHARE, base + i * GRANULE, 0, 0);
	hb_call_report("unshare.2", MEM_UNSHARE, base + 2 * GRANULE, 0, 0);
	hb_call_report("unshare.5", MEM_UNSHARE, base + 5 * GRANULE, 0, 0);
	hb_call_report("share.2.again", MEM_SHARE, base + 2 * GRANULE, 0, 0);
	hb_call_report("guard", MMIO_GUARD, HB_TESTDEV_BASE, 0, 0);
	hb_call_report("guard.again", MMIO_GUARD, HB_TESTDEV_BASE, 0, 0);

	/* Refusals: -3 each, and the record stays as it is. */
	hb_call_report("bad.meminfo_mbz", HYP_MEMINFO, 1, 0, 0);
	hb_call_report("bad.share_mbz", MEM_SHARE, base + 5 * GRANULE, 1, 0);
	hb_call_report("bad.share_unaligned", MEM_SHARE, base + 5 * GRANULE + 8, 0, 0);
	hb_call_report("bad.share_denied", MEM_SHARE, denied, 0, 0);
	hb_call_report("bad.share_outside_ram", MEM_SHARE, OUTSIDE_RAM, 0, 0);
	hb_call_report("bad.share_twice", MEM_SHARE, base, 0, 0);
	hb_call_report("bad.unshare_not_shared", MEM_UNSHARE, base + 5 * GRANULE, 0, 0);
	hb_call_report("bad.guard_ram", MMIO_GUARD, base + 5 * GRANULE, 0, 0);

	hb_wait("memshare-record");
}
