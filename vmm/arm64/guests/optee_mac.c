/* SPDX-License-Identifier: Apache-2.0 */
/*
 * OP-TEE from a real guest, through the proxy (docs/tee-proxy.md "On the real-KVM bed"): the
 * calls Linux's optee driver makes at probe, then one session on the keyed-MAC TA with every
 * `struct optee_msg_arg` in this program's own RAM, laid out as drivers/tee/optee does it.
 * Function IDs, return codes and structures: OP-TEE's optee_smc.h (core/arch/arm/include/sm/)
 * and core/include/optee_msg.h; the MAC TA's commands: tee/apps/mac.py.
 *
 * Fast calls are reported as "call" lines (x0..x3 as returned). Each message is reported as
 *   msg label=L a0=A ret=R origin=O session=S rpc=N [extra fields]
 * with a0 of the final SMC and ret / ret_origin / session as the proxy left them in the message
 * (before each call both ret and ret_origin hold SENTINEL, so a field the proxy does not write
 * shows as such). rpc counts the foreign-interrupt RPCs the call was resumed from with
 * RETURN_FROM_RPC. The host harness checks every value (tests/kvm_bed/test_kvm_bed_optee.py).
 */
#include "hb_guest.h"

/* Function IDs (OPTEE_SMC_CALL_VAL, all SMC32). */
#define OPTEE_SMC_CALLS_COUNT           0xBF00FF00u
#define OPTEE_SMC_CALLS_UID             0xBF00FF01u
#define OPTEE_SMC_CALLS_REVISION        0xBF00FF03u
#define OPTEE_SMC_CALL_GET_OS_UUID      0xB2000000u
#define OPTEE_SMC_CALL_GET_OS_REVISION  0xB2000001u
#define OPTEE_SMC_CALL_RETURN_FROM_RPC  0x32000003u
#define OPTEE_SMC_CALL_WITH_ARG         0x32000004u
#define OPTEE_SMC_EXCHANGE_CAPABILITIES 0xB2000009u
#define OPTEE_SMC_DISABLE_SHM_CACHE     0xB200000Au
#define OPTEE_SMC_ENABLE_SHM_CACHE      0xB200000Bu
#define OPTEE_SMC_GET_THREAD_COUNT      0xB200000Fu

/* Return codes and RPC (optee_smc.h). */
#define OPTEE_SMC_RETURN_ETHREAD_LIMIT  0x1u
#define OPTEE_SMC_RETURN_UNKNOWN_FUNCTION 0xFFFFFFFFu
#define OPTEE_SMC_RPC_FOREIGN_INTR      0xFFFF0004u
#define OPTEE_SMC_NSEC_CAP_UNIPROCESSOR 0x1u

/* Attributes, commands and logins (optee_msg.h). */
#define ATTR_TYPE_VALUE_INPUT  0x1u
#define ATTR_TYPE_RMEM_INPUT   0x5u
#define ATTR_TYPE_RMEM_OUTPUT  0x6u
#define ATTR_TYPE_TMEM_INPUT   0x9u
#define ATTR_TYPE_TMEM_OUTPUT  0xAu
#define ATTR_META              (1u << 8)
#define ATTR_NONCONTIG         (1u << 9)
#define CMD_OPEN_SESSION       0u
#define CMD_INVOKE_COMMAND     1u
#define CMD_CLOSE_SESSION      2u
#define CMD_REGISTER_SHM       4u
#define CMD_UNREGISTER_SHM     5u
#define CMD_DO_BOTTOM_HALF     6u
#define LOGIN_PUBLIC           0u

/* tee/apps/mac.py */
#define MAC_GENERATE_KEY 0u
#define MAC_SIGN         1u
#define MAC_VERIFY       2u
#define MAC_BYTES        32u

#define PAGE            4096u
#define MAX_PARAMS      6u
#define SENTINEL        0xA5A5A5A5u
#define SHM_COOKIE      0xFFFF000000C0FFEEull /* tee_shm pointers look like kernel addresses */
#define OUTSIDE_RAM     0x7F000000ull         /* far above the 16 MiB at 0x40000000 */

/* Where things lie in the one shared data page. */
#define KEY_OFF  0u
#define MSG_OFF  64u
#define MAC_OFF  256u
#define MAC_CAP  64u /* the SIGN output buffer is bigger than the MAC: size must come back 32 */

/* OP-TEE core/include/optee_msg.h. */
struct optee_msg_param {
	uint64_t attr;
	uint64_t a, b, c; /* tmem buf_ptr/size/shm_ref, rmem offs/size/shm_ref, value a/b/c */
};

struct optee_msg_arg {
	uint32_t cmd;
	uint32_t func;
	uint32_t session;
	uint32_t cancel_id;
	uint32_t pad;
	uint32_t ret;
	uint32_t ret_origin;
	uint32_t num_params;
	struct optee_msg_param params[MAX_PARAMS];
};

/* One message per page, as the Linux driver allocates them; a data page shared with the TEE
 * by REGISTER_SHM, and its page list (511 entries and a next-page pointer). */
static union {
	struct optee_msg_arg arg;
	uint8_t bytes[PAGE];
} msg_page __attribute__((aligned(PAGE)));
static volatile uint64_t page_list[PAGE / 8] __attribute__((aligned(PAGE)));
static uint8_t data[PAGE] __attribute__((aligned(PAGE)));

/* The TA's UUID as 16 octets, as Linux copies it into params[0].u.value (optee_open_session). */
static const uint8_t keyed_mac_ta[16] = {
	0x37, 0xa3, 0x91, 0xa3, 0x74, 0x92, 0x55, 0x48,
	0x9b, 0x05, 0x90, 0x2a, 0xe6, 0xf5, 0xb3, 0x2c,
}; /* 37a391a3-7492-5548-9b05-902ae6f5b32c, tee/uuids.py KEYED_MAC_TA */

static const char key_name[] = "bed-key";
static const char message[] = "signed inside a real arm64 guest";

static volatile struct optee_msg_arg *const arg = &msg_page.arg;
static uint64_t rpc_total;

static uint64_t addr(const volatile void *p)
{
	return (uint64_t)(uintptr_t)p;
}

static uint64_t load_le64(const volatile uint8_t *p)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < 8; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

static void msg_begin(uint32_t cmd, uint32_t func, uint32_t session, uint32_t num_params)
{
	volatile uint64_t *words = (volatile uint64_t *)&msg_page;

	for (unsigned i = 0; i < PAGE / 8; i++)
		words[i] = 0;
	arg->cmd = cmd;
	arg->func = func;
	arg->session = session;
	arg->ret = SENTINEL;
	arg->ret_origin = SENTINEL;
	arg->num_params = num_params;
}

static void param(unsigned i, uint64_t attr, uint64_t a, uint64_t b, uint64_t c)
{
	arg->params[i].attr = attr;
	arg->params[i].a = a;
	arg->params[i].b = b;
	arg->params[i].c = c;
}

/*
 * optee_smc_do_call_with_arg: a1:a2 = the message's address; ETHREAD_LIMIT means try again; a
 * foreign-interrupt RPC means the proxy yielded, and the guest resumes it with RETURN_FROM_RPC
 * and the a1..a3 it got. Any other RPC is not expected from the proxy (no RPC_ARG,
 * no RPC allocations): it ends the loop and a0 shows it.
 */
static uint32_t call_with_arg(uint64_t parg, uint64_t *rpcs)
{
	uint64_t regs[18] = { OPTEE_SMC_CALL_WITH_ARG, parg >> 32, parg & 0xFFFFFFFFu, 0 };
	uint64_t again[4] = { regs[0], regs[1], regs[2], regs[3] };
	uint32_t a0 = OPTEE_SMC_RETURN_UNKNOWN_FUNCTION;

	*rpcs = 0;
	for (unsigned tries = 0; tries < 100000; tries++) {
		hb_hvc18(regs);
		a0 = (uint32_t)regs[0];
		if (a0 == OPTEE_SMC_RETURN_ETHREAD_LIMIT) {
			for (unsigned i = 0; i < 18; i++)
				regs[i] = i < 4 ? again[i] : 0;
			continue;
		}
		if (a0 != OPTEE_SMC_RPC_FOREIGN_INTR)
			break;
		(*rpcs)++;
		regs[0] = OPTEE_SMC_CALL_RETURN_FROM_RPC; /* a1..a3 as returned */
		for (unsigned i = 4; i < 18; i++)
			regs[i] = 0;
	}
	rpc_total += *rpcs;
	return a0;
}

/* Sends the message in msg_page and starts its report line (the caller ends it). */
static void send(const char *label, uint64_t parg)
{
	uint64_t rpcs;
	uint32_t a0 = call_with_arg(parg, &rpcs);

	hb_puts("msg label=");
	hb_puts(label);
	hb_puts(" a0=");
	hb_puthex(a0);
	hb_puts(" ret=");
	hb_puthex(arg->ret);
	hb_puts(" origin=");
	hb_puthex(arg->ret_origin);
	hb_puts(" session=");
	hb_puthex(arg->session);
	hb_puts(" rpc=");
	hb_putdec(rpcs);
}

static void send_line(const char *label)
{
	send(label, addr(&msg_page));
	hb_newline();
}

static void put_bytes(unsigned off, const char *s, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		((volatile uint8_t *)data)[off + i] = (uint8_t)s[i];
}

/* The three MAC parameters: RMEM in the registered page, or TMEM through its page list. */
static void mac_params(int tmem, uint32_t mac_len)
{
	uint64_t in = tmem ? ATTR_TYPE_TMEM_INPUT | ATTR_NONCONTIG : ATTR_TYPE_RMEM_INPUT;
	uint64_t base = tmem ? addr(page_list) : 0; /* buf_ptr: list | offset in the first page */
	uint64_t ref = tmem ? 0 : SHM_COOKIE;

	param(0, in, base + KEY_OFF, sizeof(key_name) - 1, ref);
	param(1, in, base + MSG_OFF, sizeof(message) - 1, ref);
	param(2, in, base + MAC_OFF, mac_len, ref);
}

void guest_main(void)
{
	volatile uint8_t *d = data;
	uint32_t session;

	/* The probe's calls, in the Linux driver's order, then the SHM cache loop's ends. */
	hb_call_report("uid", OPTEE_SMC_CALLS_UID, 0, 0, 0);
	hb_call_report("os_revision", OPTEE_SMC_CALL_GET_OS_REVISION, 0, 0, 0);
	hb_call_report("revision", OPTEE_SMC_CALLS_REVISION, 0, 0, 0);
	hb_call_report("thread_count", OPTEE_SMC_GET_THREAD_COUNT, 0, 0, 0);
	hb_call_report("caps", OPTEE_SMC_EXCHANGE_CAPABILITIES, OPTEE_SMC_NSEC_CAP_UNIPROCESSOR, 0,
		       0);
	hb_call_report("caps.unknown_bit", OPTEE_SMC_EXCHANGE_CAPABILITIES, 0x2, 0, 0);
	hb_call_report("shm_cache.disable", OPTEE_SMC_DISABLE_SHM_CACHE, 0, 0, 0);
	hb_call_report("shm_cache.enable", OPTEE_SMC_ENABLE_SHM_CACHE, 0, 0, 0);
	hb_call_report("os_uuid", OPTEE_SMC_CALL_GET_OS_UUID, 0, 0, 0);
	hb_call_report("count", OPTEE_SMC_CALLS_COUNT, 0, 0, 0);
	{ /* "method = smc" in the device tree: the SMC conduit is forwarded the same way */
		uint64_t t0 = hb_ticks();
		struct hb_regs r = hb_smc(OPTEE_SMC_CALLS_UID, 0, 0, 0);

		hb_report("uid.smc", OPTEE_SMC_CALLS_UID, 1, r, hb_ticks_to_ns(hb_ticks() - t0));
	}

	/* OPEN_SESSION: two META value inputs, the TA UUID and (client UUID, login). */
	msg_begin(CMD_OPEN_SESSION, 0, 0, 2);
	param(0, ATTR_META | ATTR_TYPE_VALUE_INPUT, 0, 0, 0);
	param(1, ATTR_META | ATTR_TYPE_VALUE_INPUT, 0, 0, LOGIN_PUBLIC);
	for (unsigned i = 0; i < 16; i++)
		((volatile uint8_t *)&arg->params[0].a)[i] = keyed_mac_ta[i];
	send_line("open");
	session = arg->session;

	/* REGISTER_SHM of the data page through a one-entry page list. */
	page_list[0] = addr(data);
	page_list[PAGE / 8 - 1] = 0; /* no next list page */
	put_bytes(KEY_OFF, key_name, sizeof(key_name) - 1);
	put_bytes(MSG_OFF, message, sizeof(message) - 1);
	for (unsigned i = 0; i < MAC_CAP; i++)
		d[MAC_OFF + i] = 0xEE; /* what SIGN does not write must stay */
	msg_begin(CMD_REGISTER_SHM, 0, 0, 1);
	param(0, ATTR_TYPE_TMEM_OUTPUT | ATTR_NONCONTIG, addr(page_list), PAGE, SHM_COOKIE);
	send_line("register_shm");

	/* GENERATE_KEY (key name), then SIGN (key, message -> MAC) on RMEM parameters. */
	msg_begin(CMD_INVOKE_COMMAND, MAC_GENERATE_KEY, session, 1);
	param(0, ATTR_TYPE_RMEM_INPUT, KEY_OFF, sizeof(key_name) - 1, SHM_COOKIE);
	send_line("generate_key");

	msg_begin(CMD_INVOKE_COMMAND, MAC_SIGN, session, 3);
	mac_params(0, MAC_CAP);
	arg->params[2].attr = ATTR_TYPE_RMEM_OUTPUT;
	send("sign", addr(&msg_page));
	hb_puts(" size=");
	hb_puthex(arg->params[2].b);
	for (unsigned w = 0; w < MAC_CAP / 8; w++) {
		hb_puts(w < MAC_BYTES / 8 ? " mac" : " tail");
		hb_putdec(w < MAC_BYTES / 8 ? w : w - MAC_BYTES / 8);
		hb_puts("=");
		hb_puthex(load_le64(d + MAC_OFF + 8 * w));
	}
	hb_newline();

	/* VERIFY with the MAC as written back (TMEM page lists this time), then one bit off. */
	msg_begin(CMD_INVOKE_COMMAND, MAC_VERIFY, session, 3);
	mac_params(1, MAC_BYTES);
	send_line("verify");
	d[MAC_OFF] ^= 1;
	msg_begin(CMD_INVOKE_COMMAND, MAC_VERIFY, session, 3);
	mac_params(0, MAC_BYTES);
	send_line("verify.flipped");

	/* CLOSE_SESSION; then the closed session is unknown; UNREGISTER_SHM of the page. */
	msg_begin(CMD_CLOSE_SESSION, 0, session, 0);
	send_line("close");
	msg_begin(CMD_INVOKE_COMMAND, MAC_SIGN, session, 3);
	mac_params(0, MAC_CAP);
	arg->params[2].attr = ATTR_TYPE_RMEM_OUTPUT;
	send_line("sign.closed");
	msg_begin(CMD_UNREGISTER_SHM, 0, 0, 1);
	param(0, ATTR_TYPE_RMEM_INPUT, 0, 0, SHM_COOKIE);
	send_line("unregister_shm");

	/* SMC-level errors leave the message alone: an unaligned address (EBADADDR), one outside
	 * the VM's RAM (EBADADDR), an unknown command (EBADCMD), a resume of nothing (ERESUME). */
	msg_begin(CMD_CLOSE_SESSION, 0, session, 0);
	send("unaligned", addr(&msg_page) + 8);
	hb_newline();
	send("outside_ram", OUTSIDE_RAM);
	hb_newline();
	msg_begin(CMD_DO_BOTTOM_HALF, 0, 0, 0);
	send_line("bad_cmd");
	hb_call_report("resume_nothing", OPTEE_SMC_CALL_RETURN_FROM_RPC, 0, 0x1234000, 0);

	hb_puts("rpc total=");
	hb_putdec(rpc_total);
	hb_newline();
}
