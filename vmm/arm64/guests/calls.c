/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Calls whatever the plan names: arguments are (function ID, x1) pairs, each called on HVC
 * and reported as "call label=argN". The probe for deny rules, unserved functions and any
 * single call a check needs without a program of its own.
 */
#include "hb_guest.h"

void guest_main(void)
{
	static const char *labels[] = { "arg0", "arg1", "arg2", "arg3", "arg4", "arg5", "arg6",
					"arg7" };
	uint64_t n = hb_nargs() / 2;

	for (uint64_t i = 0; i < n && i < 8; i++)
		hb_call_report(labels[i], (uint32_t)hb_arg(2 * i, 0), hb_arg(2 * i + 1, 0), 0, 0);
}
