/* SPDX-License-Identifier: Apache-2.0 */
/*
 * PSCI SYSTEM_RESET, then SYSTEM_OFF (DEN0022 §5.10, §5.11), however the policy has them served:
 * in the kernel (KVM_EXIT_SYSTEM_EVENT) or by a handler (SYSTEM_RESET / SYSTEM_OFF actions). A
 * word of RAM outside the program image counts the boots, since a reset reloads the image and
 * clears .bss but leaves the rest of RAM alone.
 */
#include "hb_guest.h"

#define PSCI_SYSTEM_RESET 0x84000009u
#define BOOT_COUNTER      0x40F00000ull /* 15 MiB into RAM: above any image, below the stacks */

void guest_main(void)
{
	volatile uint64_t *boots = (volatile uint64_t *)(uintptr_t)BOOT_COUNTER;
	uint64_t n = ++*boots;

	hb_puts("boot count=");
	hb_putdec(n);
	hb_newline();
	if (n == 1)
		hb_hvc(PSCI_SYSTEM_RESET, 0, 0, 0);
	else
		hb_hvc(HB_PSCI_SYSTEM_OFF, 0, 0, 0);
	hb_puts("psci returned"); /* neither call returns on success */
	hb_newline();
	hb_exit(2);
}
