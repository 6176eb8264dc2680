/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Entry of every guest program: EL1, MMU off, interrupts masked (the VMM's reset state).
 * Sets the stack, installs a vector table that reports any exception through the test device,
 * clears .bss, calls guest_main() and exits with status 0 when it returns.
 */
	.section .text.start, "ax"
	.global _start
_start:
	ldr	x0, =__stack_top
	mov	sp, x0
	adr	x0, hb_vectors
	msr	vbar_el1, x0
	isb
	ldr	x0, =__bss_start
	ldr	x1, =__bss_end
1:	cmp	x0, x1
	b.hs	2f
	str	xzr, [x0], #8
	b	1b
2:	bl	guest_main
	mov	x0, #0
	bl	hb_exit
3:	b	3b

/*
 * Where a secondary vCPU starts after PSCI CPU_ON(target, hb_secondary_entry, context): a stack
 * of its own (64 KiB per vCPU below the boot stack, indexed by MPIDR_EL1.Aff0), the same vector
 * table, then guest_secondary(context); when that returns the vCPU powers itself off.
 */
	.global hb_secondary_entry
hb_secondary_entry:
	mov	x19, x0
	mrs	x1, mpidr_el1
	and	x1, x1, #0xff
	ldr	x0, =__stack_top
	sub	x0, x0, x1, lsl #16
	mov	sp, x0
	adr	x0, hb_vectors
	msr	vbar_el1, x0
	isb
	mov	x0, x19
	bl	guest_secondary
	bl	hb_cpu_off
4:	b	4b

/*
 * void hb_hvc18(uint64_t regs[18]) / hb_smc18: an SMCCC 1.2 call with x0..x17 taken from regs
 * and x0..x17 stored back into it (DEN0028 §2.6: SMC64/HVC64 may use x1..x17 both ways).
 */
	.macro	smccc18 name, insn
	.global	\name
\name:
	stp	x19, x30, [sp, #-16]!
	mov	x19, x0
	ldp	x0, x1, [x19, #0]
	ldp	x2, x3, [x19, #16]
	ldp	x4, x5, [x19, #32]
	ldp	x6, x7, [x19, #48]
	ldp	x8, x9, [x19, #64]
	ldp	x10, x11, [x19, #80]
	ldp	x12, x13, [x19, #96]
	ldp	x14, x15, [x19, #112]
	ldp	x16, x17, [x19, #128]
	\insn	#0
	stp	x0, x1, [x19, #0]
	stp	x2, x3, [x19, #16]
	stp	x4, x5, [x19, #32]
	stp	x6, x7, [x19, #48]
	stp	x8, x9, [x19, #64]
	stp	x10, x11, [x19, #80]
	stp	x12, x13, [x19, #96]
	stp	x14, x15, [x19, #112]
	stp	x16, x17, [x19, #128]
	ldp	x19, x30, [sp], #16
	ret
	.endm

	smccc18	hb_hvc18, hvc
	smccc18	hb_smc18, smc

/* 16 entries of 0x80 bytes; entry i calls hb_exception(i). */
	.balign	0x800
hb_vectors:
	.irp	i, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	.balign	0x80
	mov	x0, #\i
	b	hb_exception
	.endr
	.ltorg
