/* SPDX-License-Identifier: Apache-2.0 */
/*
 * One L2 VM: see vm.h. KVM facts are from Documentation/virt/kvm/api.rst,
 * arch/arm64/kvm/hypercalls.c and what the bed measured (docs/kvm-bed.md).
 */
#define _GNU_SOURCE
#include "vm.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "hb_testdev.h"
#include "log.h"

#define GUEST_DIR        "/guests"
#define MAX_RESETS       3
#define MAX_FID_STATS    32
#define MAX_SAMPLES      (1u << 20)
#define SMCCC_NOT_SUPPORTED 0xFFFFFFFFFFFFFFFFull /* SMCCC_RET_NOT_SUPPORTED, sign-extended */

struct vm;

struct vcpu {
	struct vm *vm;
	unsigned index;
	int fd;
	struct kvm_run *run;
	pthread_t thread;
	int thread_started;
	int on;             /* running guest code (vCPU 0 from the start, others after CPU_ON) */
	int start_pending;  /* CPU_ON arrived: start at entry with x0 = ctx */
	uint64_t entry, ctx;
	uint64_t seq;       /* HB_MSG_CALL sequence, per vCPU */
	char line[1024];    /* the test-device line this vCPU is writing */
	size_t line_len;
};

struct fid_stat {
	uint32_t fid;
	uint64_t count;
};

struct vm {
	int kvm_fd, fd;
	uint8_t *ram;
	uint64_t ram_gpa, ram_size;
	size_t run_size;
	struct kvm_vcpu_init init;
	const struct vm_config *cfg;
	struct agent_link *link;
	uint32_t vm_id;
	unsigned nr_vcpus;
	struct vcpu vcpus[VM_MAX_VCPUS];

	pthread_mutex_t mu;
	pthread_cond_t cv;
	int stop;
	const char *stop_reason;
	uint64_t exit_status;
	int reset_requested;
	int reset_by_agent;  /* the reset came from an HB_ACTION: the handlers know already */

	/* test device */
	uint64_t samples_gpa;

	/* run summary */
	uint64_t hypercalls, mmio_exits, link_failures;
	struct fid_stat fids[MAX_FID_STATS];
	unsigned nr_fids;
};

static int vm_counter;

static void kick_handler(int sig)
{
	(void)sig; /* only interrupts KVM_RUN (no SA_RESTART) */
}

static void install_kick_handler(void)
{
	static int done;
	struct sigaction sa;

	if (done)
		return;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = kick_handler;
	sigemptyset(&sa.sa_mask);
	sigaction(SIGUSR1, &sa, NULL);
	done = 1;
}

static int get_reg(int vcpu_fd, uint64_t id, uint64_t *value)
{
	struct kvm_one_reg r = { .id = id, .addr = (uint64_t)(uintptr_t)value };

	return ioctl(vcpu_fd, KVM_GET_ONE_REG, &r);
}

static int set_reg(int vcpu_fd, uint64_t id, uint64_t value)
{
	struct kvm_one_reg r = { .id = id, .addr = (uint64_t)(uintptr_t)&value };

	return ioctl(vcpu_fd, KVM_SET_ONE_REG, &r);
}

static uint64_t counter_frequency(void)
{
	uint64_t f;

	__asm__ volatile("mrs %0, cntfrq_el0" : "=r"(f));
	return f ? f : 1;
}

/* Must hold vm->mu. Every vCPU leaves KVM_RUN and its thread ends. */
static void stop_locked(struct vm *vm, const char *reason, uint64_t status)
{
	if (vm->stop)
		return;
	vm->stop = 1;
	vm->stop_reason = reason;
	vm->exit_status = status;
	for (unsigned i = 0; i < vm->nr_vcpus; i++) {
		struct vcpu *v = &vm->vcpus[i];

		v->run->immediate_exit = 1;
		if (v->thread_started && !pthread_equal(v->thread, pthread_self()))
			pthread_kill(v->thread, SIGUSR1);
	}
	pthread_cond_broadcast(&vm->cv);
}

static void stop_vm(struct vm *vm, const char *reason, uint64_t status)
{
	pthread_mutex_lock(&vm->mu);
	stop_locked(vm, reason, status);
	pthread_mutex_unlock(&vm->mu);
}

/* KVM_ARM_VCPU_INIT again resets the vCPU (api.rst); secondaries start powered off. */
static int vcpu_init(struct vcpu *v, int powered_off)
{
	struct kvm_vcpu_init init = v->vm->init;

	init.features[0] |= 1u << KVM_ARM_VCPU_PSCI_0_2;
	if (powered_off)
		init.features[0] |= 1u << KVM_ARM_VCPU_POWER_OFF;
	return ioctl(v->fd, KVM_ARM_VCPU_INIT, &init);
}

/* ---------------------------------------------------------------- test device */

static void line_append(struct vcpu *v, const char *s, size_t n)
{
	if (v->line_len + n >= sizeof(v->line) - 1)
		n = sizeof(v->line) - 1 - v->line_len;
	memcpy(v->line + v->line_len, s, n);
	v->line_len += n;
	v->line[v->line_len] = 0;
}

static void line_flush(struct vcpu *v)
{
	hb_log("g[%s] %s", v->vm->cfg->guest, v->line);
	v->line_len = 0;
	v->line[0] = 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* Prints the line so far with the statistics of `n` tick counts the guest left in its RAM. */
static void samples_report(struct vcpu *v, uint64_t n)
{
	struct vm *vm = v->vm;
	uint64_t freq = counter_frequency(), off = vm->samples_gpa - vm->ram_gpa, *ns, sum = 0;

	if (n == 0 || n > MAX_SAMPLES || vm->samples_gpa < vm->ram_gpa || off > vm->ram_size ||
	    n * 8 > vm->ram_size - off) {
		hb_log("g[%s] %s error=bad-samples n=%" PRIu64, vm->cfg->guest, v->line, n);
		v->line_len = 0;
		return;
	}
	ns = malloc(n * sizeof(*ns));
	if (!ns)
		return;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t ticks;

		memcpy(&ticks, vm->ram + off + 8 * i, 8);
		ns[i] = (uint64_t)((unsigned __int128)ticks * 1000000000u / freq);
		sum += ns[i];
	}
	qsort(ns, n, sizeof(*ns), cmp_u64);
	hb_log("g[%s] %s n=%" PRIu64 " min_ns=%" PRIu64 " p10_ns=%" PRIu64 " median_ns=%" PRIu64
	       " p90_ns=%" PRIu64 " p99_ns=%" PRIu64 " max_ns=%" PRIu64 " mean_ns=%" PRIu64
	       " counter_hz=%" PRIu64,
	       vm->cfg->guest, v->line, n, ns[0], ns[n / 10], ns[n / 2], ns[n * 9 / 10],
	       ns[n * 99 / 100], ns[n - 1], sum / n, freq);
	free(ns);
	v->line_len = 0;
	v->line[0] = 0;
}

/* Blocks until the host writes a line on the console (the harness's "go"). Called without
 * vm->mu held, so the other vCPUs and a timeout can still stop the VM. */
static void wait_for_host(struct vm *vm)
{
	struct pollfd p = { .fd = STDIN_FILENO, .events = POLLIN };
	char buf[64];

	if (poll(&p, 1, 60000) <= 0 || read(STDIN_FILENO, buf, sizeof(buf)) <= 0)
		hb_log("wait-done guest=%s go=0", vm->cfg->guest);
	else
		hb_log("wait-done guest=%s go=1", vm->cfg->guest);
}

static void handle_mmio(struct vcpu *v)
{
	struct vm *vm = v->vm;
	struct kvm_run *run = v->run;
	uint64_t addr = run->mmio.phys_addr, value = 0, off;
	uint32_t len = run->mmio.len > 8 ? 8 : run->mmio.len;

	if (addr < HB_TESTDEV_BASE || addr >= HB_TESTDEV_BASE + HB_TESTDEV_SIZE) {
		hb_log("mmio-unhandled guest=%s addr=0x%" PRIx64 " write=%u", vm->cfg->guest, addr,
		       run->mmio.is_write);
		if (!run->mmio.is_write)
			memset(run->mmio.data, 0, sizeof(run->mmio.data));
		return;
	}
	off = addr - HB_TESTDEV_BASE;
	if (!run->mmio.is_write) {
		if (off == HB_TD_NARGS)
			value = vm->cfg->nr_args;
		else if (off >= HB_TD_ARG0 && off < HB_TD_ARG0 + 8 * HB_TD_MAX_ARGS)
			value = vm->cfg->args[(off - HB_TD_ARG0) / 8];
		memcpy(run->mmio.data, &value, 8);
		return;
	}
	memcpy(&value, run->mmio.data, len);
	if (off == HB_TD_WAIT) {
		pthread_mutex_lock(&vm->mu);
		hb_log("wait guest=%s token=%s", vm->cfg->guest, v->line);
		v->line_len = 0;
		v->line[0] = 0;
		pthread_mutex_unlock(&vm->mu);
		wait_for_host(vm);
		return;
	}
	pthread_mutex_lock(&vm->mu);
	switch (off) {
	case HB_TD_PUTC: {
		char c = (char)value;

		if (c == '\n')
			line_flush(v);
		else
			line_append(v, &c, 1);
		break;
	}
	case HB_TD_PUTHEX:
	case HB_TD_PUTDEC: {
		char num[24];
		int n = snprintf(num, sizeof(num), off == HB_TD_PUTHEX ? "0x%" PRIx64 : "%" PRIu64,
				 value);

		line_append(v, num, (size_t)n);
		break;
	}
	case HB_TD_EXIT:
		if (v->line_len)
			line_flush(v);
		stop_locked(vm, "exit", value);
		break;
	case HB_TD_SAMPLES_GPA:
		vm->samples_gpa = value;
		break;
	case HB_TD_SAMPLES_COUNT:
		samples_report(v, value);
		break;
	default:
		break;
	}
	pthread_mutex_unlock(&vm->mu);
}

/* ---------------------------------------------------------------- hypercalls and actions */

static void count_fid(struct vm *vm, uint32_t fid)
{
	pthread_mutex_lock(&vm->mu);
	vm->hypercalls++;
	for (unsigned i = 0; i < vm->nr_fids; i++) {
		if (vm->fids[i].fid == fid) {
			vm->fids[i].count++;
			pthread_mutex_unlock(&vm->mu);
			return;
		}
	}
	if (vm->nr_fids < MAX_FID_STATS)
		vm->fids[vm->nr_fids++] = (struct fid_stat){ fid, 1 };
	pthread_mutex_unlock(&vm->mu);
}

static const char *action_name(uint32_t kind)
{
	switch (kind) {
	case HB_ACTION_CPU_ON: return "cpu-on";
	case HB_ACTION_CPU_OFF: return "cpu-off";
	case HB_ACTION_CPU_SUSPEND: return "cpu-suspend";
	case HB_ACTION_SYSTEM_OFF: return "system-off";
	case HB_ACTION_SYSTEM_RESET: return "system-reset";
	case HB_ACTION_SYSTEM_SUSPEND: return "system-suspend";
	case HB_ACTION_INJECT_IRQ: return "inject-irq";
	case HB_ACTION_SYSTEM_OFF2: return "system-off2";
	case HB_ACTION_SYSTEM_RESET2: return "system-reset2";
	default: return "unknown";
	}
}

/* Resumes the calling vCPU at `entry` with x0 = ctx, as after a wake-up from powerdown. */
static void resume_at(struct vcpu *v, uint64_t entry, uint64_t ctx)
{
	set_reg(v->fd, HB_REG_PC, entry);
	set_reg(v->fd, HB_REG_X(0), ctx);
	set_reg(v->fd, HB_REG_PSTATE, HB_PSTATE_EL1H_MASKED);
}

/* Carries out one VMM action of a result; `v` is the vCPU that made the call. */
static void apply_action(struct vcpu *v, const struct hb_action *a)
{
	struct vm *vm = v->vm;
	const char *done = "done";

	switch (a->kind) {
	case HB_ACTION_CPU_ON:
		pthread_mutex_lock(&vm->mu);
		if (a->vcpu >= vm->nr_vcpus) {
			done = "no-such-vcpu";
		} else if (vm->vcpus[a->vcpu].on || vm->vcpus[a->vcpu].start_pending) {
			done = "already-on";
		} else {
			struct vcpu *t = &vm->vcpus[a->vcpu];

			t->entry = a->address;
			t->ctx = a->value;
			t->start_pending = 1;
			t->run->immediate_exit = 1;
			if (t->thread_started)
				pthread_kill(t->thread, SIGUSR1);
		}
		pthread_mutex_unlock(&vm->mu);
		break;
	case HB_ACTION_CPU_OFF:
		if (a->vcpu != v->index) {
			done = "not-the-caller"; /* PSCI CPU_OFF powers off the calling core only */
		} else {
			struct kvm_mp_state off = { .mp_state = KVM_MP_STATE_STOPPED };

			/* KVM_RUN now sleeps in the kernel until a CPU_ON. */
			if (ioctl(v->fd, KVM_SET_MP_STATE, &off) < 0)
				done = "mp-state-failed";
			pthread_mutex_lock(&vm->mu);
			v->on = 0;
			pthread_mutex_unlock(&vm->mu);
		}
		break;
	case HB_ACTION_CPU_SUSPEND:
	case HB_ACTION_SYSTEM_SUSPEND:
		/* No interrupt controller here, so no wake-up event to wait for: wake at once. */
		if (a->vcpu != v->index)
			done = "not-the-caller";
		else
			resume_at(v, a->address, a->value);
		break;
	case HB_ACTION_SYSTEM_OFF:
	case HB_ACTION_SYSTEM_OFF2:
		stop_vm(vm, "system-off", 0);
		break;
	case HB_ACTION_SYSTEM_RESET:
	case HB_ACTION_SYSTEM_RESET2:
		pthread_mutex_lock(&vm->mu);
		vm->reset_requested = 1;
		vm->reset_by_agent = 1;
		stop_locked(vm, "system-reset", 0);
		pthread_mutex_unlock(&vm->mu);
		break;
	default:
		done = "unsupported"; /* INJECT_IRQ: this VMM has no interrupt controller */
		break;
	}
	hb_log("action guest=%s kind=%s vcpu=%u address=0x%" PRIx64 " value=0x%" PRIx64
	       " by_vcpu=%u result=%s",
	       vm->cfg->guest, action_name(a->kind), a->vcpu, a->address, a->value, v->index,
	       done);
}

static void handle_hypercall(struct vcpu *v)
{
	struct vm *vm = v->vm;
	struct hb_call call;
	struct link_result res;
	int rc;

	memset(&call, 0, sizeof(call));
	call.vm_id = vm->vm_id;
	call.vcpu = v->index;
	call.seq = ++v->seq;
	call.function_id = (uint32_t)v->run->hypercall.nr;
	call.exit_flags = hb_hypercall_flags(v->run);
	call.exit_ns = hb_now_ns();
	count_fid(vm, call.function_id);
	for (unsigned i = 0; i < HB_NR_REGS; i++)
		get_reg(v->fd, HB_REG_X(i), &call.x[i]);

	if (vm->cfg->local) {
		/* The in-L1 baseline: answered here, SMCCC_RET_SUCCESS in x0. */
		set_reg(v->fd, HB_REG_X(0), 0);
		return;
	}
	rc = link_call(vm->link, &call, &res, vm->cfg->call_timeout_ms);
	if (rc) {
		/* The agent is gone or silent: the guest still gets an answer, never a hang. */
		pthread_mutex_lock(&vm->mu);
		vm->link_failures++;
		pthread_mutex_unlock(&vm->mu);
		hb_log("call-failed guest=%s vcpu=%u seq=%" PRIu64 " fid=0x%08x error=%s",
		       vm->cfg->guest, v->index, call.seq, call.function_id, hb_errno_name(-rc));
		set_reg(v->fd, HB_REG_X(0), SMCCC_NOT_SUPPORTED);
		for (unsigned i = 1; i < 4; i++)
			set_reg(v->fd, HB_REG_X(i), 0);
		return;
	}
	for (unsigned i = 0; i < HB_NR_REGS; i++)
		if (res.r.reg_mask & (1u << i))
			set_reg(v->fd, HB_REG_X(i), res.r.x[i]);
	for (unsigned i = 0; i < res.r.nr_actions; i++)
		apply_action(v, &res.actions[i]);
}

/* ---------------------------------------------------------------- vCPU threads */

/*
 * Every vCPU thread sits in KVM_RUN, powered-off ones included: KVM keeps a vCPU that is off
 * (KVM_ARM_VCPU_POWER_OFF, or PSCI CPU_OFF) asleep inside KVM_RUN until in-kernel PSCI powers it
 * on, or a signal interrupts it. So PSCI works whether KVM keeps it or a handler serves it: a
 * CPU_ON action flags the target and kicks it out of KVM_RUN (immediate_exit + SIGUSR1), and
 * the target thread resets itself, since only the thread in KVM_RUN may use its vCPU fd.
 */
static void *vcpu_main(void *arg)
{
	struct vcpu *v = arg;
	struct vm *vm = v->vm;

	for (;;) {
		int start = 0;
		uint64_t entry = 0, ctx = 0;

		pthread_mutex_lock(&vm->mu);
		if (vm->stop) {
			pthread_mutex_unlock(&vm->mu);
			break;
		}
		if (v->start_pending) {
			start = 1;
			entry = v->entry;
			ctx = v->ctx;
			v->start_pending = 0;
			v->on = 1;
		}
		v->run->immediate_exit = 0;
		pthread_mutex_unlock(&vm->mu);
		if (start) {
			vcpu_init(v, 0); /* re-init without POWER_OFF: reset and runnable */
			resume_at(v, entry, ctx);
		}
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			hb_log("kvm-run-error guest=%s vcpu=%u errno=%s", vm->cfg->guest, v->index,
			       hb_errno_name(errno));
			stop_vm(vm, "kvm-run-error", (uint64_t)errno);
			break;
		}
		switch (v->run->exit_reason) {
		case KVM_EXIT_HYPERCALL:
			handle_hypercall(v);
			break;
		case KVM_EXIT_MMIO:
			pthread_mutex_lock(&vm->mu);
			vm->mmio_exits++;
			pthread_mutex_unlock(&vm->mu);
			handle_mmio(v);
			break;
		case KVM_EXIT_SYSTEM_EVENT:
			/* PSCI kept in the kernel: SYSTEM_OFF / SYSTEM_RESET. */
			if (v->run->system_event.type == KVM_SYSTEM_EVENT_RESET) {
				pthread_mutex_lock(&vm->mu);
				vm->reset_requested = 1;
				stop_locked(vm, "system-reset", 0);
				pthread_mutex_unlock(&vm->mu);
			} else if (v->run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN) {
				stop_vm(vm, "system-off", 0);
			} else {
				stop_vm(vm, "system-event", v->run->system_event.type);
			}
			break;
		default:
			hb_log("unexpected-exit guest=%s vcpu=%u exit_reason=%u", vm->cfg->guest,
			       v->index, v->run->exit_reason);
			stop_vm(vm, "unexpected-exit", v->run->exit_reason);
			break;
		}
	}
	return NULL;
}

/* ---------------------------------------------------------------- VM lifetime */

static int vm_create(struct vm *vm, int kvm_fd, const struct vm_config *cfg)
{
	struct kvm_userspace_memory_region mem;
	pthread_condattr_t ca;
	int mmap_size;

	memset(vm, 0, sizeof(*vm));
	vm->kvm_fd = kvm_fd;
	vm->cfg = cfg;
	vm->nr_vcpus = cfg->nr_vcpus ? cfg->nr_vcpus : 1;
	vm->ram_gpa = HB_GUEST_RAM_BASE;
	vm->ram_size = HB_GUEST_RAM_SIZE;
	pthread_mutex_init(&vm->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&vm->cv, &ca);
	if (vm->nr_vcpus > VM_MAX_VCPUS)
		return -EINVAL;

	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		return -errno;
	vm->ram = mmap(NULL, vm->ram_size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->ram == MAP_FAILED) {
		vm->ram = NULL;
		return -ENOMEM;
	}
	mem = (struct kvm_userspace_memory_region){
		.slot = 0, .guest_phys_addr = vm->ram_gpa, .memory_size = vm->ram_size,
		.userspace_addr = (uint64_t)(uintptr_t)vm->ram,
	};
	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &mem) < 0)
		return -errno;
	if (ioctl(vm->fd, KVM_ARM_PREFERRED_TARGET, &vm->init) < 0)
		return -errno;
	mmap_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size <= 0)
		return -errno;
	vm->run_size = (size_t)mmap_size;
	for (unsigned i = 0; i < vm->nr_vcpus; i++) {
		struct vcpu *v = &vm->vcpus[i];

		v->vm = vm;
		v->index = i;
		v->fd = ioctl(vm->fd, KVM_CREATE_VCPU, i);
		if (v->fd < 0)
			return -errno;
		v->run = mmap(NULL, vm->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED) {
			v->run = NULL;
			return -errno;
		}
		if (vcpu_init(v, i != 0) < 0)
			return -errno;
	}
	return 0;
}

static void vm_close(struct vm *vm)
{
	for (unsigned i = 0; i < vm->nr_vcpus; i++) {
		if (vm->vcpus[i].run)
			munmap(vm->vcpus[i].run, vm->run_size);
		if (vm->vcpus[i].fd > 0)
			close(vm->vcpus[i].fd);
	}
	if (vm->ram)
		munmap(vm->ram, vm->ram_size);
	if (vm->fd > 0)
		close(vm->fd);
}

static int load_program(struct vm *vm)
{
	char path[256];
	ssize_t n;
	size_t off = 0;
	int fd;

	snprintf(path, sizeof(path), GUEST_DIR "/%s.bin", vm->cfg->guest);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -errno;
	while ((n = read(fd, vm->ram + off, vm->ram_size / 2 - off)) > 0)
		off += (size_t)n;
	close(fd);
	if (n < 0 || off == 0)
		return -EIO;
	return 0;
}

static int set_filter(int vm_fd, const struct kvm_smccc_filter *f)
{
	struct kvm_device_attr attr = {
		.group = KVM_ARM_VM_SMCCC_CTRL, .attr = KVM_ARM_VM_SMCCC_FILTER,
		.addr = (uint64_t)(uintptr_t)f,
	};

	return ioctl(vm_fd, KVM_SET_DEVICE_ATTR, &attr) < 0 ? errno : 0;
}

/* Starts the vCPU threads from reset and waits until the VM stops. */
static void run_until_stopped(struct vm *vm)
{
	struct timespec dl;

	/* Threads start under the lock, so none can stop the VM before all are known. */
	pthread_mutex_lock(&vm->mu);
	vm->stop = 0;
	vm->reset_requested = 0;
	vm->reset_by_agent = 0;
	for (unsigned i = 0; i < vm->nr_vcpus; i++) {
		struct vcpu *v = &vm->vcpus[i];

		v->run->immediate_exit = 0;
		v->on = i == 0;
		v->start_pending = 0;
		if (i == 0)
			resume_at(v, vm->ram_gpa, 0);
		v->thread_started = pthread_create(&v->thread, NULL, vcpu_main, v) == 0;
	}
	pthread_mutex_unlock(&vm->mu);
	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += vm->cfg->run_timeout_ms / 1000;
	dl.tv_nsec += (long)(vm->cfg->run_timeout_ms % 1000) * 1000000L;
	if (dl.tv_nsec >= 1000000000L) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&vm->mu);
	while (!vm->stop)
		if (pthread_cond_timedwait(&vm->cv, &vm->mu, &dl) == ETIMEDOUT)
			stop_locked(vm, "timeout", 0);
	pthread_mutex_unlock(&vm->mu);
	for (unsigned i = 0; i < vm->nr_vcpus; i++) {
		if (vm->vcpus[i].thread_started)
			pthread_join(vm->vcpus[i].thread, NULL);
		vm->vcpus[i].thread_started = 0;
	}
}

int vm_run_program(int kvm_fd, struct agent_link *link, const struct vm_config *cfg)
{
	struct vm *vm = calloc(1, sizeof(*vm));
	struct link_registration reg;
	char name[HB_NAME_LEN];
	int32_t errnos[HB_MAX_FILTERS];
	uint64_t t0 = hb_now_ns();
	struct link_stats before = { 0 };
	int rc, resets = 0, ok = 0;

	if (!vm)
		return -ENOMEM;
	install_kick_handler();
	rc = vm_create(vm, kvm_fd, cfg);
	if (rc == 0)
		rc = load_program(vm);
	if (rc) {
		hb_log("run-error guest=%s stage=create error=%s", cfg->guest, hb_errno_name(-rc));
		vm_close(vm);
		free(vm);
		return rc;
	}
	vm->link = link;
	snprintf(name, sizeof(name), "bed-%s-%d", cfg->guest, ++vm_counter);

	if (!cfg->local) {
		if (!link) {
			hb_log("run-error guest=%s stage=register error=no-agent-link", cfg->guest);
			vm_close(vm);
			free(vm);
			return -ENOTCONN;
		}
		rc = link_register_vm(link, name, cfg->profile, vm->nr_vcpus, vm->ram_gpa,
				      vm->ram_size, vm->ram, &reg);
		if (rc || reg.status) {
			hb_log("register-refused guest=%s vm=%s profile=%s error=%s status=%s "
			       "message=\"%s\"",
			       cfg->guest, name, cfg->profile, hb_errno_name(rc ? -rc : 0),
			       hb_errno_name(rc ? 0 : -reg.status), rc ? "" : reg.message);
			vm_close(vm);
			free(vm);
			return rc ? rc : reg.status;
		}
		vm->vm_id = reg.vm_id;
		hb_log("registered guest=%s vm=%s profile=%s vm_id=%u policy_version=%" PRIu64
		       " filters=%u",
		       cfg->guest, name, cfg->profile, reg.vm_id, reg.policy_version,
		       reg.nr_filters);
		for (unsigned i = 0; i < reg.nr_filters; i++) {
			struct kvm_smccc_filter f;

			memcpy(&f, &reg.filters[i], sizeof(f));
			errnos[i] = set_filter(vm->fd, &f);
			hb_log("filter guest=%s vm=%s index=%u base=0x%08x nr=0x%x action=%u errno=%s",
			       cfg->guest, name, i, f.base, f.nr_functions, f.action,
			       hb_errno_name(errnos[i]));
		}
		link_filter_report(link, vm->vm_id, errnos, reg.nr_filters);
		for (unsigned i = 0; i < reg.nr_filters; i++) {
			if (errnos[i] == 0)
				continue;
			/* The kernel would serve calls the policy forwards or denies: do not run. */
			hb_log("run-refused guest=%s vm=%s reason=filter index=%u errno=%s", cfg->guest,
			       name, i, hb_errno_name(errnos[i]));
			rc = link_destroy_vm(link, vm->vm_id);
			hb_log("destroyed guest=%s vm=%s vm_id=%u status=%s", cfg->guest, name,
			       vm->vm_id, hb_errno_name(rc < 0 ? -rc : rc));
			vm_close(vm);
			free(vm);
			return -EPERM;
		}
	} else {
		for (unsigned i = 0; i < cfg->nr_local_filters; i++) {
			const struct kvm_smccc_filter *f = &cfg->local_filters[i];

			hb_log("filter guest=%s vm=%s index=%u base=0x%08x nr=0x%x action=%u "
			       "errno=%s local=1",
			       cfg->guest, name, i, f->base, f->nr_functions, f->action,
			       hb_errno_name(set_filter(vm->fd, f)));
		}
	}
	hb_log("run-begin guest=%s vm=%s profile=%s vcpus=%u local=%d setup_us=%" PRIu64,
	       cfg->guest, name, cfg->local ? "-" : cfg->profile, vm->nr_vcpus, cfg->local,
	       (hb_now_ns() - t0) / 1000);

	t0 = hb_now_ns();
	if (link)
		link_stats(link, &before);
	for (;;) {
		run_until_stopped(vm);
		if (!vm->reset_requested || ++resets > MAX_RESETS)
			break;
		hb_log("reset guest=%s count=%d", cfg->guest, resets);
		if (link && vm->vm_id && !vm->reset_by_agent) {
			/* KVM reset the guest itself: tell the handlers before it runs again. */
			int st = link_vm_reset(link, vm->vm_id);

			hb_log("vm-reset guest=%s vm_id=%u status=%s", cfg->guest, vm->vm_id,
			       st ? hb_errno_name(-st) : "OK");
		}
		for (unsigned i = 0; i < vm->nr_vcpus; i++)
			vcpu_init(&vm->vcpus[i], i != 0);
		for (unsigned i = 0; i < vm->nr_vcpus; i++)
			vm->vcpus[i].line_len = 0;
		if (load_program(vm))
			break;
	}
	ok = (!strcmp(vm->stop_reason, "exit") && vm->exit_status == 0) ||
	     !strcmp(vm->stop_reason, "system-off");

	{
		char fids[MAX_FID_STATS * 24] = "";
		size_t n = 0;
		struct link_stats ls = { 0 };

		for (unsigned i = 0; i < vm->nr_fids && n < sizeof(fids) - 24; i++)
			n += (size_t)snprintf(fids + n, sizeof(fids) - n, "%s0x%08x:%" PRIu64,
					      i ? "," : "", vm->fids[i].fid, vm->fids[i].count);
		if (link)
			link_stats(link, &ls);
		hb_log("run-end guest=%s vm=%s reason=%s status=%" PRIu64 " ok=%d run_ms=%" PRIu64
		       " hypercalls=%" PRIu64 " mmio=%" PRIu64 " link_failures=%" PRIu64
		       " fids=%s mem_reads=%" PRIu64 " mem_writes=%" PRIu64 " mem_refused=%" PRIu64,
		       cfg->guest, name, vm->stop_reason, vm->exit_status, ok,
		       (hb_now_ns() - t0) / 1000000, vm->hypercalls, vm->mmio_exits,
		       vm->link_failures, n ? fids : "-", ls.mem_reads - before.mem_reads,
		       ls.mem_writes - before.mem_writes, ls.mem_refused - before.mem_refused);
	}
	if (!cfg->local) {
		rc = link_destroy_vm(link, vm->vm_id);
		hb_log("destroyed guest=%s vm=%s vm_id=%u status=%s", cfg->guest, name, vm->vm_id,
		       hb_errno_name(rc < 0 ? -rc : rc));
	}
	vm_close(vm);
	free(vm);
	return ok ? 0 : -ECANCELED;
}

/* movz x1, #0x0900, lsl #16; str xzr, [x1]; b . : one MMIO write to the test device. */
static const uint32_t probe_program[] = { 0xd2a12001u, 0xf900003fu, 0x14000000u };
_Static_assert(HB_TESTDEV_BASE == 0x09000000ull, "probe_program encodes the test device base");

int vm_probe_filters(int kvm_fd, const struct raw_filter *records, unsigned n)
{
	static const struct vm_config probe_cfg = { .guest = "filter-probe", .nr_vcpus = 1 };
	struct vm *vm = calloc(1, sizeof(*vm));
	int rc;

	if (!vm)
		return -ENOMEM;
	rc = vm_create(vm, kvm_fd, &probe_cfg);
	if (rc) {
		hb_log("probe-error stage=create error=%s", hb_errno_name(-rc));
		vm_close(vm);
		free(vm);
		return rc;
	}
	memcpy(vm->ram, probe_program, sizeof(probe_program));
	resume_at(&vm->vcpus[0], vm->ram_gpa, 0);
	for (unsigned i = 0; i < n; i++) {
		const struct raw_filter *r = &records[i];

		if (r->ran_marker) {
			int run_rc = ioctl(vm->vcpus[0].fd, KVM_RUN, 0);

			hb_log("probe index=%u ran=1 rc=%d exit_reason=%u", i, run_rc < 0 ? -errno : 0,
			       vm->vcpus[0].run->exit_reason);
			continue;
		}
		rc = set_filter(vm->fd, &r->f);
		hb_log("probe index=%u base=0x%08x nr=0x%x action=%u pad_nonzero=%d errno=%s", i,
		       r->f.base, r->f.nr_functions, r->f.action,
		       memcmp(r->f.pad, (uint8_t[15]){ 0 }, 15) != 0, hb_errno_name(rc));
	}
	vm_close(vm);
	free(vm);
	return 0;
}

int kvm_open_system(void)
{
	int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC), vm_fd, api;
	struct kvm_device_attr attr = {
		.group = KVM_ARM_VM_SMCCC_CTRL, .attr = KVM_ARM_VM_SMCCC_FILTER,
	};
	int has_filter;

	if (fd < 0) {
		hb_log("kvm-error stage=open errno=%s", hb_errno_name(errno));
		return -1;
	}
	api = ioctl(fd, KVM_GET_API_VERSION, 0);
	vm_fd = ioctl(fd, KVM_CREATE_VM, 0);
	if (vm_fd < 0) {
		hb_log("kvm-error stage=create-vm errno=%s", hb_errno_name(errno));
		close(fd);
		return -1;
	}
	has_filter = ioctl(vm_fd, KVM_HAS_DEVICE_ATTR, &attr) == 0;
	close(vm_fd);
	hb_log("kvm api=%d smccc_filter=%d psci_0_2=%d counter_hz=%" PRIu64, api, has_filter,
	       ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_ARM_PSCI_0_2) > 0, counter_frequency());
	return fd;
}
