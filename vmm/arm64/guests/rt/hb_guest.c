/* SPDX-License-Identifier: Apache-2.0 */
/* The guest runtime: see hb_guest.h. Every test-device access is one plain 64-bit STR or LDR,
 * so KVM can decode it (ESR_EL2.ISV) and hand it to the VMM as KVM_EXIT_MMIO. */
#include "hb_guest.h"

#include <stddef.h>

static inline void td_write(uint64_t off, uint64_t v)
{
	__asm__ volatile("str %x0, [%1]" : : "r"(v), "r"(HB_TESTDEV_BASE + off) : "memory");
}

static inline uint64_t td_read(uint64_t off)
{
	uint64_t v;

	__asm__ volatile("ldr %x0, [%1]" : "=r"(v) : "r"(HB_TESTDEV_BASE + off) : "memory");
	return v;
}

#define SMCCC_CALL(insn)                                                                      \
	register uint64_t x0 __asm__("x0") = fid;                                             \
	register uint64_t x1 __asm__("x1") = a1;                                              \
	register uint64_t x2 __asm__("x2") = a2;                                              \
	register uint64_t x3 __asm__("x3") = a3;                                              \
	__asm__ volatile(insn : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3)                       \
			 : : "x4", "x5", "x6", "x7", "x8", "x9", "x10", "x11", "x12", "x13", \
			     "x14", "x15", "x16", "x17", "memory");                         \
	return (struct hb_regs){ x0, x1, x2, x3 }

struct hb_regs hb_hvc(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3)
{
	SMCCC_CALL("hvc #0");
}

struct hb_regs hb_smc(uint64_t fid, uint64_t a1, uint64_t a2, uint64_t a3)
{
	SMCCC_CALL("smc #0");
}

uint64_t hb_counter_hz(void)
{
	uint64_t f;

	__asm__ volatile("mrs %0, cntfrq_el0" : "=r"(f));
	return f ? f : 1;
}

uint64_t hb_ticks_to_ns(uint64_t ticks)
{
	uint64_t hz = hb_counter_hz();

	return ticks / hz * 1000000000ull + ticks % hz * 1000000000ull / hz;
}

void hb_putc(char c)
{
	td_write(HB_TD_PUTC, (uint8_t)c);
}

void hb_puts(const char *s)
{
	while (*s)
		hb_putc(*s++);
}

void hb_puthex(uint64_t v)
{
	td_write(HB_TD_PUTHEX, v);
}

void hb_putdec(uint64_t v)
{
	td_write(HB_TD_PUTDEC, v);
}

void hb_newline(void)
{
	hb_putc('\n');
}

void hb_report(const char *label, uint32_t fid, int smc, struct hb_regs r, uint64_t ns)
{
	hb_puts("call label=");
	hb_puts(label);
	hb_puts(" fid=");
	hb_puthex(fid);
	hb_puts(smc ? " conduit=smc x0=" : " conduit=hvc x0=");
	hb_puthex(r.x0);
	hb_puts(" x1=");
	hb_puthex(r.x1);
	hb_puts(" x2=");
	hb_puthex(r.x2);
	hb_puts(" x3=");
	hb_puthex(r.x3);
	hb_puts(" ns=");
	hb_putdec(ns);
	hb_newline();
}

struct hb_regs hb_call_report(const char *label, uint32_t fid, uint64_t a1, uint64_t a2,
			      uint64_t a3)
{
	uint64_t regs[18] = { fid, a1, a2, a3 };
	uint64_t t0 = hb_ticks(), t1;
	struct hb_regs r;

	hb_hvc18(regs);
	t1 = hb_ticks();
	r = (struct hb_regs){ regs[0], regs[1], regs[2], regs[3] };
	hb_report(label, fid, 0, r, hb_ticks_to_ns(t1 - t0));
	return r;
}

uint64_t hb_nargs(void)
{
	return td_read(HB_TD_NARGS);
}

uint64_t hb_arg(unsigned i, uint64_t default_value)
{
	if (i >= HB_TD_MAX_ARGS || i >= hb_nargs())
		return default_value;
	return td_read(HB_TD_ARG0 + 8u * i);
}

void hb_samples(const char *label, const uint64_t *ticks, uint64_t n)
{
	hb_puts(label);
	td_write(HB_TD_SAMPLES_GPA, (uint64_t)(uintptr_t)ticks);
	td_write(HB_TD_SAMPLES_COUNT, n);
}

void hb_wait(const char *token)
{
	hb_puts(token);
	td_write(HB_TD_WAIT, 1);
}

void hb_exit(uint64_t status)
{
	for (;;)
		td_write(HB_TD_EXIT, status);
}

void hb_cpu_off(void)
{
	for (;;)
		hb_hvc(HB_PSCI_CPU_OFF, 0, 0, 0);
}

uint64_t hb_cpu_index(void)
{
	uint64_t mpidr;

	__asm__ volatile("mrs %0, mpidr_el1" : "=r"(mpidr));
	return mpidr & 0xff;
}

/* Programs that never start a secondary vCPU need not define it. */
__attribute__((weak)) void guest_secondary(uint64_t context)
{
	(void)context;
}

/* Called by the vector table in start.S with the entry's index. */
void hb_exception(uint64_t index);
void hb_exception(uint64_t index)
{
	uint64_t esr, elr, far;

	__asm__ volatile("mrs %0, esr_el1\n\tmrs %1, elr_el1\n\tmrs %2, far_el1"
			 : "=r"(esr), "=r"(elr), "=r"(far));
	hb_puts("exception vector=");
	hb_putdec(index);
	hb_puts(" esr=");
	hb_puthex(esr);
	hb_puts(" elr=");
	hb_puthex(elr);
	hb_puts(" far=");
	hb_puthex(far);
	hb_newline();
	hb_exit(0xE0 + index);
}

/* The compiler may emit calls to these even in freestanding code. */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);

void *memset(void *dst, int c, size_t n)
{
	volatile uint8_t *d = dst;

	while (n--)
		*d++ = (uint8_t)c;
	return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
	volatile uint8_t *d = dst;
	const uint8_t *s = src;

	while (n--)
		*d++ = *s++;
	return dst;
}
