/* SPDX-License-Identifier: Apache-2.0 */
/*
 * What a guest program of the bed can use: SMCCC calls on both conduits, the counter, and the
 * test device (text lines, run arguments, latency samples, waiting for the host, exit).
 *
 * A guest program is one file in guests/ defining `void guest_main(void)`. It runs at EL1 with
 * the MMU off (so: no unaligned accesses, no floating point; the Makefile's flags see to it).
 * Report what the guest saw with hb_report(): the harness parses the "call" lines.
 */
#ifndef HB_GUEST_H
#define HB_GUEST_H

#include <stdint.h>

#include "hb_testdev.h"

struct hb_regs {
	uint64_t x0, x1, x2, x3;
};

/* SMCCC 1.1 call through HVC #0 or SMC #0: x0..x3 in, x0..x3 out (x4..x17 may change). */
struct hb_regs hb_hvc(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3);
struct hb_regs hb_smc(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3);

/* SMCCC 1.2 call: x0..x17 from regs[0..17] (regs[0] = function ID), results back into regs. */
void hb_hvc18(uint64_t regs[18]);
void hb_smc18(uint64_t regs[18]);

/* The virtual counter (CNTVCT_EL0) and its frequency (CNTFRQ_EL0). */
static inline uint64_t hb_ticks(void)
{
	uint64_t t;

	__asm__ volatile("isb\n\tmrs %0, cntvct_el0" : "=r"(t) : : "memory");
	return t;
}
uint64_t hb_counter_hz(void);
uint64_t hb_ticks_to_ns(uint64_t ticks);

/* Text to the console, one line at a time: nothing is printed until hb_newline(). */
void hb_putc(char c);
void hb_puts(const char *s);
void hb_puthex(uint64_t v);
void hb_putdec(uint64_t v);
void hb_newline(void);

/* "call label=<label> fid=0x... conduit=hvc|smc x0=0x... x1=... x2=... x3=... ns=N" */
void hb_report(const char *label, uint32_t fid, int smc, struct hb_regs r, uint64_t ns);

/* Calls fid on HVC with x4..x17 = 0, times it, reports it, and returns what it got. */
struct hb_regs hb_call_report(const char *label, uint32_t fid, uint64_t a1, uint64_t a2,
			      uint64_t a3);

/* The run's arguments (plan: run:guest=NAME,arg=V,arg=V...). */
uint64_t hb_nargs(void);
uint64_t hb_arg(unsigned i, uint64_t default_value);

/* Prints "<label> n=... min_ns=... median_ns=..." for `n` tick counts (u64, 8-byte aligned). */
void hb_samples(const char *label, const uint64_t *ticks, uint64_t n);

/* Prints "HB wait ... token=<token>" and returns when the host harness says go. */
void hb_wait(const char *token);

/* Ends the program (status 0 = passed). */
__attribute__((noreturn)) void hb_exit(uint64_t status);

/* PSCI (DEN0022) through HVC: whether KVM or a handler serves it depends on the policy. */
#define HB_PSCI_CPU_OFF    0x84000002u
#define HB_PSCI_CPU_ON     0xC4000003u
#define HB_PSCI_SYSTEM_OFF 0x84000008u
void hb_secondary_entry(void); /* the entry point to give PSCI CPU_ON */
__attribute__((noreturn)) void hb_cpu_off(void);
uint64_t hb_cpu_index(void); /* MPIDR_EL1.Aff0: the vCPU index on this VMM */

/* Provided by each guest program; guest_secondary only by those that start other vCPUs. */
void guest_main(void);
void guest_secondary(uint64_t context);

#endif /* HB_GUEST_H */
