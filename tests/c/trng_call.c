/*
 * A minimal VMM-side client of the hyperbroker agent, using only
 * include/hyperbroker/vmm_protocol.h: register a VM over SOCK_SEQPACKET, print the kernel
 * filter records the agent returns, make one TRNG_RND64 call as a KVM_EXIT_HYPERCALL would,
 * check the answer, destroy the VM. Usage: trng_call SOCKET_PATH. Exit 0 on success.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "hyperbroker/vmm_protocol.h"

#define TRNG_RND64 0xC4000053u

static uint8_t buf[sizeof(struct hb_header) + HB_MAX_PAYLOAD];

static int exchange(int fd, uint16_t type, uint32_t tag, const void *payload, uint32_t len,
		    uint16_t want)
{
	struct hb_header h = { HB_MAGIC, HB_VERSION, type, len, tag };
	memcpy(buf, &h, sizeof(h));
	memcpy(buf + sizeof(h), payload, len);
	if (send(fd, buf, sizeof(h) + len, 0) < 0) {
		perror("send");
		return -1;
	}
	ssize_t n = recv(fd, buf, sizeof(buf), 0);
	if (n < (ssize_t)sizeof(h)) {
		fprintf(stderr, "short reply (%zd bytes)\n", n);
		return -1;
	}
	memcpy(&h, buf, sizeof(h));
	if (h.magic != HB_MAGIC || h.tag != tag || (size_t)n != sizeof(h) + h.length) {
		fprintf(stderr, "bad reply header\n");
		return -1;
	}
	if (h.type == HB_MSG_ERROR) {
		struct hb_error e;
		memcpy(&e, buf + sizeof(h), sizeof(e));
		fprintf(stderr, "agent error %d: %.*s\n", e.code, (int)(h.length - sizeof(e)),
			(char *)buf + sizeof(h) + sizeof(e));
		return -1;
	}
	if (h.type != want) {
		fprintf(stderr, "reply type %#x, expected %#x\n", h.type, want);
		return -1;
	}
	return (int)h.length;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s SOCKET\n", argv[0]);
		return 2;
	}
	int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	strncpy(addr.sun_path, argv[1], sizeof(addr.sun_path) - 1);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
		perror("connect");
		return 1;
	}

	struct hb_register_vm reg = { .nr_vcpus = 1 };
	snprintf(reg.name, sizeof(reg.name), "c-vmm-%d", (int)getpid());
	int len = exchange(fd, HB_MSG_REGISTER_VM, 1, &reg, sizeof(reg), HB_MSG_REGISTER_VM_REPLY);
	if (len < (int)sizeof(struct hb_register_vm_reply))
		return 1;
	struct hb_register_vm_reply rep;
	memcpy(&rep, buf + sizeof(struct hb_header), sizeof(rep));
	if (rep.status != 0) {
		fprintf(stderr, "registration refused: %d\n", rep.status);
		return 1;
	}
	printf("vm_id %u policy v%llu filters %u\n", rep.vm_id,
	       (unsigned long long)rep.policy_version, rep.nr_filters);
	for (uint32_t i = 0; i < rep.nr_filters; i++) {
		struct hb_smccc_filter f;
		memcpy(&f, buf + sizeof(struct hb_header) + sizeof(rep) + i * sizeof(f), sizeof(f));
		printf("filter base %#x nr %u action %u\n", f.base, f.nr_functions, f.action);
	}

	struct hb_call call = { .vm_id = rep.vm_id, .vcpu = 0, .seq = 1, .function_id = TRNG_RND64 };
	call.x[0] = TRNG_RND64;
	call.x[1] = 128; /* bits of entropy */
	len = exchange(fd, HB_MSG_CALL, 2, &call, sizeof(call), HB_MSG_RESULT);
	if (len < (int)sizeof(struct hb_result))
		return 1;
	struct hb_result res;
	memcpy(&res, buf + sizeof(struct hb_header), sizeof(res));
	printf("result outcome %u mask %#x x0 %#llx x1 %#llx x2 %#llx x3 %#llx handler_ns %llu\n",
	       res.outcome, res.reg_mask, (unsigned long long)res.x[0],
	       (unsigned long long)res.x[1], (unsigned long long)res.x[2],
	       (unsigned long long)res.x[3], (unsigned long long)res.timing.handler_ns);
	/* DEN0098: x0 = SUCCESS, 128 bits right-aligned in x2:x3, x1 zero. */
	int ok = res.seq == 1 && res.outcome == HB_OUTCOME_OK && res.reg_mask == 0xf &&
		 res.x[0] == 0 && res.x[1] == 0 && (res.x[2] | res.x[3]) != 0;

	struct hb_destroy_vm d = { .vm_id = rep.vm_id };
	if (exchange(fd, HB_MSG_DESTROY_VM, 3, &d, sizeof(d), HB_MSG_DESTROY_VM_REPLY) < 0)
		return 1;
	close(fd);
	puts(ok ? "TRNG answer OK" : "TRNG answer WRONG");
	return ok ? 0 : 1;
}
