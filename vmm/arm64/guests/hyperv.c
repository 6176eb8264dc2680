/* SPDX-License-Identifier: Apache-2.0 */
/*
 * A Hyper-V-enlightened guest against the broker's Hyper-V persona (handlers/hyperv), with the
 * vendor-hyp range forwarded to it and PSCI to the psci handler. Run with vcpus=2.
 *
 * vCPU 0 does what Linux's hyperv_init does (arch/arm64/hyperv/mshyperv.c,
 * hv_core.c): the
 * vendor-hyp Call UID (Hyper-V's, and KVM_FEATURES hidden), SetVpRegisters GUEST_OS_ID and
 * GetVpRegisters of the feature registers with the SMCCC 1.2 fast convention (name in x4, value
 * in x6/x7), then VP_INDEX on both vCPUs (vCPU 1 started with PSCI CPU_ON), the status codes of
 * For bad input, HvCallGetPartitionId into an output page, and a guest crash reported through
 * GUEST_CRASH_P0..P4 and GUEST_CRASH_CTL twice: hyperv_report_panic's CRASH_NOTIFY, then
 * hv_kmsg_dump's CRASH_NOTIFY_MSG with a page of panic text. It then waits (hb_wait) so the host
 * can look at the broker while the VM is still registered.
 *
 * Every HV_FUNC_ID call prints its "call" line (x0..x3) and an "out" line with x6 and x7.
 */
#include "hb_guest.h"

#define VENDOR_HYP_CALL_UID 0x8600FF01u
#define KVM_FEATURES        0x86000000u
#define HV_FUNC_ID          0x46000001u /* SMCCC STD call, SMC64, owner vendor-hyp, 1 */

/* Control word; hvgdk_mini.h call codes. */
#define HVCALL_GET_PARTITION_ID 0x0046ull
#define HVCALL_GET_VP_REGISTERS 0x0050ull
#define HVCALL_SET_VP_REGISTERS 0x0051ull
#define HVCALL_UNKNOWN          0x0099ull /* no such call code */
#define HV_FAST                 (1ull << 16)
#define HV_REP_COMP_1           (1ull << 32)
#define HV_RSVD2_BIT60          (1ull << 60) /* reserved bits 63:60 */

#define HV_PARTITION_ID_SELF 0xFFFFFFFFFFFFFFFFull /* (u64)-1 */
#define HV_VP_INDEX_SELF     0xFFFFFFFEull         /* (u32)-2 */

/* Register names. */
#define HV_REGISTER_HYPERVISOR_VERSION           0x00000100u
#define HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO 0x00000200u
#define HV_REGISTER_FEATURES_INFO                0x00000201u
#define HV_REGISTER_GUEST_CRASH_P0               0x00000210u
#define HV_REGISTER_GUEST_CRASH_CTL              0x00000215u
#define HV_REGISTER_GUEST_OS_ID                  0x00090002u
#define HV_REGISTER_VP_INDEX                     0x00090003u
#define HV_REGISTER_BOGUS                        0x00012345u

#define HV_CRASH_CTL_CRASH_NOTIFY_MSG (1ull << 62)
#define HV_CRASH_CTL_CRASH_NOTIFY     (1ull << 63)

/* hv_generate_guest_id(): HV_LINUX_VENDOR_ID 0x8100 in 63:48, LINUX_VERSION_CODE 6.12 << 16. */
#define GUEST_OS_ID  0x810000060C000000ull
#define CRASH_ERROR  0xBull /* P0 of hyperv_report_panic: the panic's error code */
#define CONTEXT_ID   0x4879C0DEull
#define POISON       0x5A5A5A5A5A5A5A5Aull /* in x5..x7 of a Get: only the persona can clear it */

static volatile uint64_t secondary_done;
static uint64_t partition_page[512] __attribute__((aligned(4096)));
static char panic_page[4096] __attribute__((aligned(4096)));
static const char panic_text[] = "Kernel panic - not syncing: hyperbroker bed crash test\n";

/* One HV_FUNC_ID call with x1..x17 = regs[1..17]; regs gets x0..x17 back. Prints both lines. */
static void hv_call(const char *label, uint64_t regs[18])
{
	uint64_t t0, t1;

	regs[0] = HV_FUNC_ID;
	t0 = hb_ticks();
	hb_hvc18(regs);
	t1 = hb_ticks();
	hb_report(label, HV_FUNC_ID, 0, (struct hb_regs){ regs[0], regs[1], regs[2], regs[3] },
		  hb_ticks_to_ns(t1 - t0));
	hb_puts("out label=");
	hb_puts(label);
	hb_puts(" x6=");
	hb_puthex(regs[6]);
	hb_puts(" x7=");
	hb_puthex(regs[7]);
	hb_newline();
}

/*
 * hv_get_vpreg_128: fast GetVpRegisters of one register; the value comes back in x6/x7.
 * The input block is x2..x4 (20 bytes), so x5..x7 carry POISON in: a success must overwrite x6
 * and x7 (both halves of the 128-bit value), a failure must leave them alone.
 */
static uint64_t get_vpreg(const char *label, uint64_t control, uint64_t vp, uint32_t name)
{
	uint64_t regs[18] = { 0 };

	regs[1] = control;
	regs[2] = HV_PARTITION_ID_SELF;
	regs[3] = vp; /* VpIndex 31:0; InputVtl and RsvdZ above it are 0 */
	regs[4] = name;
	regs[5] = regs[6] = regs[7] = POISON;
	hv_call(label, regs);
	return regs[0];
}

static uint64_t get_reg(const char *label, uint32_t name)
{
	return get_vpreg(label, HVCALL_GET_VP_REGISTERS | HV_FAST | HV_REP_COMP_1,
			 HV_VP_INDEX_SELF, name);
}

/* hv_set_vpreg: fast SetVpRegisters, name in x4, value in x6 (x5 and x7 zero). */
static uint64_t set_reg(const char *label, uint32_t name, uint64_t value)
{
	uint64_t regs[18] = { 0 };

	regs[1] = HVCALL_SET_VP_REGISTERS | HV_FAST | HV_REP_COMP_1;
	regs[2] = HV_PARTITION_ID_SELF;
	regs[3] = HV_VP_INDEX_SELF;
	regs[4] = name;
	regs[6] = value;
	hv_call(label, regs);
	return regs[0];
}

void guest_secondary(uint64_t context)
{
	(void)context;
	get_reg("secondary.vp_index", HV_REGISTER_VP_INDEX);
	secondary_done = 1;
}

static void wait_for_secondary(void)
{
	uint64_t hz = hb_counter_hz(), start = hb_ticks();

	while (!secondary_done && hb_ticks() - start < 5 * hz)
		;
}

void guest_main(void)
{
	uint64_t sp, regs[18] = { 0 };
	unsigned i;

	/* Detection, then KVM's own discovery is gone. */
	hb_call_report("uid", VENDOR_HYP_CALL_UID, 0, 0, 0);
	hb_call_report("kvm_features", KVM_FEATURES, 0, 0, 0);

	/* Hyperv_init order. */
	set_reg("set.guest_os_id", HV_REGISTER_GUEST_OS_ID, GUEST_OS_ID);
	get_reg("get.guest_os_id", HV_REGISTER_GUEST_OS_ID);
	get_reg("get.privileges", HV_REGISTER_PRIVILEGES_AND_FEATURES_INFO);
	get_reg("get.features_info", HV_REGISTER_FEATURES_INFO);
	get_reg("get.version", HV_REGISTER_HYPERVISOR_VERSION);
	get_reg("get.crash_ctl", HV_REGISTER_GUEST_CRASH_CTL);
	get_reg("get.vp_index", HV_REGISTER_VP_INDEX);

	/* VP_INDEX of the second vCPU, read by itself (VP self) and by vCPU 0 (VpIndex 1). */
	hb_call_report("cpu_on", HB_PSCI_CPU_ON, 1, (uint64_t)(uintptr_t)hb_secondary_entry,
		       CONTEXT_ID);
	wait_for_secondary();
	get_vpreg("get.vp_index.1", HVCALL_GET_VP_REGISTERS | HV_FAST | HV_REP_COMP_1, 1,
		  HV_REGISTER_VP_INDEX);

	/* Every bad input gets its status. */
	get_reg("bad.register", HV_REGISTER_BOGUS);                       /* INVALID_PARAMETER */
	get_vpreg("bad.reserved_bit", HVCALL_GET_VP_REGISTERS | HV_FAST | HV_REP_COMP_1 |
		  HV_RSVD2_BIT60, HV_VP_INDEX_SELF, HV_REGISTER_VP_INDEX); /* INVALID_HYPERCALL_INPUT */
	get_vpreg("bad.code", HVCALL_UNKNOWN | HV_FAST, HV_VP_INDEX_SELF,
		  HV_REGISTER_VP_INDEX);                                    /* INVALID_HYPERCALL_CODE */
	get_vpreg("bad.vp_index", HVCALL_GET_VP_REGISTERS | HV_FAST | HV_REP_COMP_1, 2,
		  HV_REGISTER_VP_INDEX);                                    /* INVALID_VP_INDEX */
	set_reg("bad.set_read_only", HV_REGISTER_VP_INDEX, 5);            /* ACCESS_DENIED */

	/* HvCallGetPartitionId, slow: the output lands in guest memory before the call returns. */
	regs[1] = HVCALL_GET_PARTITION_ID;
	regs[3] = (uint64_t)(uintptr_t)partition_page;
	hv_call("partition_id", regs);
	hb_puts("partition page id=");
	hb_puthex(partition_page[0]);
	hb_newline();

	/* hyperv_report_panic: P0 error, P1 guest OS ID, P2 PC, P3 SP, then CRASH_NOTIFY. */
	__asm__ volatile("mov %0, sp" : "=r"(sp));
	set_reg("crash.p0", HV_REGISTER_GUEST_CRASH_P0, CRASH_ERROR);
	set_reg("crash.p1", HV_REGISTER_GUEST_CRASH_P0 + 1, GUEST_OS_ID);
	set_reg("crash.p2", HV_REGISTER_GUEST_CRASH_P0 + 2, (uint64_t)(uintptr_t)guest_main);
	set_reg("crash.p3", HV_REGISTER_GUEST_CRASH_P0 + 3, sp);
	set_reg("crash.p4", HV_REGISTER_GUEST_CRASH_P0 + 4, 0);
	set_reg("crash.notify", HV_REGISTER_GUEST_CRASH_CTL, HV_CRASH_CTL_CRASH_NOTIFY);

	/* hv_kmsg_dump: P0..P2 zero, P3 = GPA of the panic text, P4 = its length, NOTIFY_MSG. */
	for (i = 0; i < sizeof(panic_text) - 1; i++)
		panic_page[i] = panic_text[i];
	set_reg("crash.msg.p0", HV_REGISTER_GUEST_CRASH_P0, 0);
	set_reg("crash.msg.p1", HV_REGISTER_GUEST_CRASH_P0 + 1, 0);
	set_reg("crash.msg.p2", HV_REGISTER_GUEST_CRASH_P0 + 2, 0);
	set_reg("crash.msg.p3", HV_REGISTER_GUEST_CRASH_P0 + 3, (uint64_t)(uintptr_t)panic_page);
	set_reg("crash.msg.p4", HV_REGISTER_GUEST_CRASH_P0 + 4, sizeof(panic_text) - 1);
	set_reg("crash.message", HV_REGISTER_GUEST_CRASH_CTL, HV_CRASH_CTL_CRASH_NOTIFY_MSG);

	hb_puts("crash reported pc=");
	hb_puthex((uint64_t)(uintptr_t)guest_main);
	hb_puts(" sp=");
	hb_puthex(sp);
	hb_puts(" text=");
	hb_puthex((uint64_t)(uintptr_t)panic_page);
	hb_newline();
	hb_wait("hyperv-crash"); /* the host reads the broker's view while the VM is registered */
	if (!secondary_done)
		hb_exit(1);
}
