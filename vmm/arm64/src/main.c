/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The reference VMM's entry point: /init of the L1 Linux on the test bed, or a plain program.
 *
 * As /init it mounts /dev, /proc and /sys, finds the virtio-serial port named "agent", and runs
 * its plan, one step after another, then powers L1 off. The plan is its arguments if it has any
 * (the words after "--" on the kernel command line), else the lines of /plan (the harness adds
 * that file to the initramfs for each boot, so a plan is not bound by the command line's size).
 * Steps:
 *
 *   run:guest=NAME[,profile=P][,vcpus=N][,arg=V]...[,timeout=MS][,call_timeout=MS]
 *       register a VM running /guests/NAME.bin with the agent under profile P, install the
 *       filter records the agent returns, run it, destroy it;
 *   run:guest=NAME,local,fwd=BASE+NR[,fwd=...]...
 *       the same without the agent: the VMM forwards BASE+NR to itself and answers every call
 *       (the in-L1 baseline of the latency figures);
 *   filters:REC[,REC]...    REC = BASE+NR=ACTION[/pI=V]... | ran
 *       install raw kvm_smccc_filter records on a fresh VM and print each errno; "ran" runs the
 *       vCPU once (the filter is frozen afterwards: EBUSY);
 *   ping:n=N
 *       N link-level round trips (HB_MSG_PING) to the agent, with their statistics.
 *
 * Every result is a console line starting with "HB " (see log.h).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include "agent_link.h"
#include "log.h"
#include "vm.h"

#define AGENT_PORT_NAME "agent"
#define MAX_RECORDS     64

static void init_mounts(void)
{
	mkdir("/dev", 0755);
	mkdir("/proc", 0555);
	mkdir("/sys", 0555);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL); /* DEVTMPFS=y, not auto-mounted */
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
}

/* The console carries the harness's "go" lines: no echo into the output it parses. */
static void quiet_console(void)
{
	struct termios t;

	if (tcgetattr(STDIN_FILENO, &t) == 0) {
		t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
		tcsetattr(STDIN_FILENO, TCSANOW, &t);
	}
}

/* /dev/vportNpM of the virtio-serial port whose name is `want` (sysfs virtio-ports/<x>/name). */
static int open_port(const char *want)
{
	for (int attempt = 0; attempt < 100; attempt++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;

		while (d && (e = readdir(d))) {
			char path[300], name[64] = "";
			FILE *f;

			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
			f = fopen(path, "r");
			if (!f)
				continue;
			if (fgets(name, sizeof(name), f))
				name[strcspn(name, "\n")] = 0;
			fclose(f);
			if (strcmp(name, want) == 0) {
				int fd;

				snprintf(path, sizeof(path), "/dev/%s", e->d_name);
				fd = open(path, O_RDWR | O_CLOEXEC);
				closedir(d);
				if (fd >= 0)
					hb_log("agent-port path=%s", path);
				return fd;
			}
		}
		if (d)
			closedir(d);
		usleep(20000);
	}
	return -1;
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 0);
	return errno || end == s || *end ? -1 : 0;
}

/* BASE+NR[=ACTION[/pI=V]...]; the action defaults to FWD_TO_USER. */
static int parse_record(char *text, struct kvm_smccc_filter *f)
{
	char *plus = strchr(text, '+'), *eq, *slash;
	uint64_t base, nr, action = KVM_SMCCC_FILTER_FWD_TO_USER;

	memset(f, 0, sizeof(*f));
	if (!plus)
		return -1;
	*plus = 0;
	slash = strchr(plus + 1, '/');
	if (slash)
		*slash = 0;
	eq = strchr(plus + 1, '=');
	if (eq) {
		*eq = 0;
		if (parse_u64(eq + 1, &action) || action > 0xff)
			return -1;
	}
	if (parse_u64(text, &base) || parse_u64(plus + 1, &nr) || base > 0xffffffffu ||
	    nr > 0xffffffffu)
		return -1;
	f->base = (uint32_t)base;
	f->nr_functions = (uint32_t)nr;
	f->action = (uint8_t)action;
	while (slash) {
		char *item = slash + 1, *next = strchr(item, '/'), *peq;
		uint64_t idx, val;

		if (next)
			*next = 0;
		peq = strchr(item, '=');
		if (item[0] != 'p' || !peq)
			return -1;
		*peq = 0;
		if (parse_u64(item + 1, &idx) || parse_u64(peq + 1, &val) || idx >= 15 || val > 0xff)
			return -1;
		f->pad[idx] = (uint8_t)val;
		slash = next;
	}
	return 0;
}

static int step_run(int kvm_fd, struct agent_link *link, char *spec)
{
	struct vm_config cfg = {
		.profile = "", .nr_vcpus = 1, .call_timeout_ms = 5000, .run_timeout_ms = 60000,
	};
	char *save = NULL;

	for (char *kv = strtok_r(spec, ",", &save); kv; kv = strtok_r(NULL, ",", &save)) {
		char *eq = strchr(kv, '=');
		const char *key = kv, *val = eq ? eq + 1 : "";
		uint64_t n = 0;

		if (eq)
			*eq = 0;
		if (!strcmp(key, "guest")) {
			cfg.guest = val;
		} else if (!strcmp(key, "profile")) {
			cfg.profile = val;
		} else if (!strcmp(key, "local")) {
			cfg.local = 1;
		} else if (!strcmp(key, "fwd") && cfg.nr_local_filters < 8) {
			char rec[64];

			snprintf(rec, sizeof(rec), "%s", val);
			if (parse_record(rec, &cfg.local_filters[cfg.nr_local_filters++]))
				goto bad;
		} else if (parse_u64(val, &n)) {
			goto bad;
		} else if (!strcmp(key, "vcpus")) {
			cfg.nr_vcpus = (uint32_t)n;
		} else if (!strcmp(key, "arg") && cfg.nr_args < 16) {
			cfg.args[cfg.nr_args++] = n;
		} else if (!strcmp(key, "timeout")) {
			cfg.run_timeout_ms = (unsigned)n;
		} else if (!strcmp(key, "call_timeout")) {
			cfg.call_timeout_ms = (unsigned)n;
		} else {
			goto bad;
		}
		continue;
bad:
		hb_log("plan-error step=run item=%s", key);
		return -EINVAL;
	}
	if (!cfg.guest) {
		hb_log("plan-error step=run item=guest");
		return -EINVAL;
	}
	return vm_run_program(kvm_fd, link, &cfg);
}

static int step_filters(int kvm_fd, char *spec)
{
	static struct raw_filter recs[MAX_RECORDS];
	unsigned n = 0;
	char *save = NULL;

	for (char *item = strtok_r(spec, ",", &save); item && n < MAX_RECORDS;
	     item = strtok_r(NULL, ",", &save), n++) {
		memset(&recs[n], 0, sizeof(recs[n]));
		if (!strcmp(item, "ran")) {
			recs[n].ran_marker = 1;
		} else if (parse_record(item, &recs[n].f)) {
			hb_log("plan-error step=filters item=%u", n);
			return -EINVAL;
		}
	}
	return vm_probe_filters(kvm_fd, recs, n);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static int step_ping(struct agent_link *link, const char *spec)
{
	uint64_t n = 100, *ns;

	if (!strncmp(spec, "n=", 2) && parse_u64(spec + 2, &n))
		n = 100;
	if (!link || n == 0 || n > 100000) {
		hb_log("plan-error step=ping");
		return -EINVAL;
	}
	ns = calloc(n, sizeof(*ns));
	if (!ns)
		return -ENOMEM;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t t0 = hb_now_ns();
		int rc = link_ping(link, 5000);

		if (rc) {
			hb_log("ping-error error=%s after=%" PRIu64, hb_errno_name(-rc), i);
			free(ns);
			return rc;
		}
		ns[i] = hb_now_ns() - t0;
	}
	qsort(ns, n, sizeof(*ns), cmp_u64);
	hb_log("ping n=%" PRIu64 " min_ns=%" PRIu64 " median_ns=%" PRIu64 " p90_ns=%" PRIu64
	       " max_ns=%" PRIu64,
	       n, ns[0], ns[n / 2], ns[n * 9 / 10], ns[n - 1]);
	free(ns);
	return 0;
}

#define PLAN_FILE "/plan"
#define MAX_STEPS 256

/* The lines of PLAN_FILE as an argv-like array (steps[0] is a placeholder); returns the count. */
static int read_plan(char **steps)
{
	static char text[64 * 1024];
	int fd = open(PLAN_FILE, O_RDONLY | O_CLOEXEC), n = 1;
	ssize_t len = 0, r;

	steps[0] = "plan";
	if (fd < 0)
		return 1;
	while (len < (ssize_t)sizeof(text) - 1 &&
	       (r = read(fd, text + len, sizeof(text) - 1 - (size_t)len)) > 0)
		len += r;
	close(fd);
	text[len] = 0;
	for (char *save = NULL, *line = strtok_r(text, "\n", &save); line && n < MAX_STEPS;
	     line = strtok_r(NULL, "\n", &save))
		if (*line)
			steps[n++] = line;
	return n;
}

int main(int argc, char **argv)
{
	int as_init = getpid() == 1, kvm_fd, port, failures = 0;
	struct agent_link *link = NULL;
	static char *plan[MAX_STEPS];

	if (argc <= 1) {
		argc = read_plan(plan);
		argv = plan;
	}

	if (as_init)
		init_mounts();
	quiet_console();
	hb_log("boot init=%d steps=%d", as_init, argc - 1);
	kvm_fd = kvm_open_system();
	port = open_port(AGENT_PORT_NAME);
	if (port >= 0)
		link = link_open(port);
	else
		hb_log("agent-port missing=1");

	for (int i = 1; kvm_fd >= 0 && i < argc; i++) {
		char *step = argv[i], *colon = strchr(step, ':');
		int rc;

		if (!colon) {
			hb_log("plan-error step=%s", step);
			failures++;
			continue;
		}
		*colon = 0;
		hb_log("step index=%d kind=%s", i, step);
		if (!strcmp(step, "run"))
			rc = step_run(kvm_fd, link, colon + 1);
		else if (!strcmp(step, "filters"))
			rc = step_filters(kvm_fd, colon + 1);
		else if (!strcmp(step, "ping"))
			rc = step_ping(link, colon + 1);
		else {
			hb_log("plan-error step=%s", step);
			rc = -EINVAL;
		}
		if (rc)
			failures++;
	}
	hb_log("done failures=%d kvm=%d", failures, kvm_fd >= 0);
	if (as_init) {
		sync();
		reboot(RB_POWER_OFF);
	}
	return failures ? 1 : 0;
}
