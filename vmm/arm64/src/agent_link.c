/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Stream-mode agent link: framing by the header's length, a reader thread, reply slots.
 * See agent_link.h for the contract and include/hyperbroker/vmm_protocol.h for the bytes.
 */
#include "agent_link.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

/* A reply someone is waiting for, matched by tag. */
struct reply_slot {
	int waiting;       /* a thread waits for tag */
	int done;          /* the reply (or an error) arrived */
	uint32_t tag;
	uint16_t type;     /* type of the reply that arrived (HB_MSG_ERROR on refusal) */
	uint32_t length;
	uint8_t *payload;  /* malloc'd copy, owned by the waiter once done */
};

struct agent_link {
	int fd;
	pthread_t reader;
	pthread_mutex_t send_mu;  /* one frame at a time on the wire */
	pthread_mutex_t mu;       /* everything below */
	pthread_cond_t cv;
	int dead;                 /* the link is gone: every waiter fails with -EPIPE */
	uint32_t next_tag;
	struct reply_slot control;                   /* REGISTER / DESTROY / PING replies */
	struct reply_slot calls[HB_LINK_MAX_VCPUS];  /* one call in flight per vCPU */
	/* The registered VM, for guest-memory requests. */
	uint32_t vm_id;
	uint64_t ram_gpa, ram_size;
	uint8_t *ram;
	struct link_stats stats;
	uint8_t rx[sizeof(struct hb_header) + HB_MAX_PAYLOAD];
	uint8_t tx_mem[sizeof(struct hb_mem_reply) + HB_MAX_MEM_CHUNK];
};

static int write_all(int fd, const struct iovec *iov_in, int cnt)
{
	struct iovec iov[4];
	int i = 0;

	memcpy(iov, iov_in, sizeof(iov[0]) * (size_t)cnt);
	while (i < cnt) {
		ssize_t w = writev(fd, iov + i, cnt - i);

		if (w < 0 && errno == EINTR)
			continue;
		if (w <= 0)
			return -EPIPE;
		while (i < cnt && (size_t)w >= iov[i].iov_len) {
			w -= (ssize_t)iov[i].iov_len;
			i++;
		}
		if (i < cnt) {
			iov[i].iov_base = (uint8_t *)iov[i].iov_base + w;
			iov[i].iov_len -= (size_t)w;
		}
	}
	return 0;
}

static int read_all(int fd, uint8_t *buf, size_t n)
{
	size_t off = 0;

	while (off < n) {
		ssize_t r = read(fd, buf + off, n - off);

		if (r < 0 && errno == EINTR)
			continue;
		if (r <= 0)
			return -EPIPE;
		off += (size_t)r;
	}
	return 0;
}

static int send_frame(struct agent_link *l, uint16_t type, uint32_t tag, const void *a,
		      size_t alen, const void *b, size_t blen)
{
	struct hb_header h = {
		.magic = HB_MAGIC, .version = HB_VERSION, .type = type,
		.length = (uint32_t)(alen + blen), .tag = tag,
	};
	struct iovec iov[3] = {
		{ &h, sizeof(h) }, { (void *)a, alen }, { (void *)b, blen },
	};
	int rc;

	pthread_mutex_lock(&l->send_mu);
	rc = write_all(l->fd, iov, 3);
	pthread_mutex_unlock(&l->send_mu);
	return rc;
}

static void send_error(struct agent_link *l, uint32_t tag, uint16_t refused, int code,
		       const char *text)
{
	struct hb_error e = { .code = code, .refused_type = refused };

	send_frame(l, HB_MSG_ERROR, tag, &e, sizeof(e), text, strlen(text));
}

/* [gpa, gpa + len) inside the registered RAM, written without overflow. */
static uint8_t *ram_window(struct agent_link *l, uint32_t vm_id, uint64_t gpa, uint32_t len)
{
	if (!l->ram || vm_id != l->vm_id || gpa < l->ram_gpa || len > l->ram_size ||
	    gpa - l->ram_gpa > l->ram_size - len)
		return NULL;
	return l->ram + (gpa - l->ram_gpa);
}

static void serve_mem(struct agent_link *l, const struct hb_header *h, const uint8_t *p)
{
	struct hb_mem_access a;
	uint8_t *where;

	if (h->length < sizeof(a)) {
		send_error(l, h->tag, h->type, EPROTO, "short memory request");
		return;
	}
	memcpy(&a, p, sizeof(a));
	if (a.length > HB_MAX_MEM_CHUNK) {
		send_error(l, h->tag, h->type, EMSGSIZE, "memory request above HB_MAX_MEM_CHUNK");
		return;
	}
	pthread_mutex_lock(&l->mu);
	where = ram_window(l, a.vm_id, a.gpa, a.length);
	if (!where)
		l->stats.mem_refused++;
	pthread_mutex_unlock(&l->mu);

	if (h->type == HB_MSG_MEM_READ) {
		struct hb_mem_reply *r = (struct hb_mem_reply *)l->tx_mem;

		if (h->length != sizeof(a)) {
			send_error(l, h->tag, h->type, EPROTO, "MEM_READ payload size");
			return;
		}
		r->status = where ? 0 : -EFAULT;
		r->length = where ? a.length : 0;
		if (where)
			memcpy(l->tx_mem + sizeof(*r), where, a.length);
		send_frame(l, HB_MSG_MEM_READ_REPLY, h->tag, l->tx_mem, sizeof(*r) + r->length,
			   NULL, 0);
		pthread_mutex_lock(&l->mu);
		if (where) {
			l->stats.mem_reads++;
			l->stats.bytes_read += a.length;
		}
		pthread_mutex_unlock(&l->mu);
		return;
	}
	if (h->length != sizeof(a) + a.length) {
		send_error(l, h->tag, h->type, EPROTO, "MEM_WRITE payload size");
		return;
	}
	if (!where) {
		send_error(l, h->tag, h->type, EFAULT, "MEM_WRITE outside the VM's RAM");
		return;
	}
	memcpy(where, p + sizeof(a), a.length);
	pthread_mutex_lock(&l->mu);
	l->stats.mem_writes++;
	l->stats.bytes_written += a.length;
	pthread_mutex_unlock(&l->mu);
}

/* Hands a reply to the slot waiting for its tag; returns 0 if nobody waits. Caller holds mu. */
static int deliver(struct agent_link *l, const struct hb_header *h, const uint8_t *p)
{
	struct reply_slot *slots[1 + HB_LINK_MAX_VCPUS];

	slots[0] = &l->control;
	for (unsigned i = 0; i < HB_LINK_MAX_VCPUS; i++)
		slots[1 + i] = &l->calls[i];
	for (unsigned i = 0; i < 1 + HB_LINK_MAX_VCPUS; i++) {
		struct reply_slot *s = slots[i];

		if (!s->waiting || s->done || s->tag != h->tag)
			continue;
		s->payload = malloc(h->length ? h->length : 1);
		if (!s->payload)
			return 0;
		memcpy(s->payload, p, h->length);
		s->length = h->length;
		s->type = h->type;
		s->done = 1;
		pthread_cond_broadcast(&l->cv);
		return 1;
	}
	return 0;
}

static void *reader_main(void *arg)
{
	struct agent_link *l = arg;

	for (;;) {
		struct hb_header h;
		uint8_t *p = l->rx + sizeof(h);

		if (read_all(l->fd, l->rx, sizeof(h)))
			break;
		memcpy(&h, l->rx, sizeof(h));
		if (h.magic != HB_MAGIC || h.length > HB_MAX_PAYLOAD) {
			/* The stream cannot be framed any more: say why and give up. */
			send_error(l, h.magic == HB_MAGIC ? h.tag : 0, 0,
				   h.magic != HB_MAGIC ? EPROTO : EMSGSIZE, "unframeable stream");
			hb_log("link-error reason=unframeable magic=0x%08x length=%u", h.magic,
			       h.length);
			break;
		}
		if (read_all(l->fd, p, h.length))
			break;
		if (h.version != HB_VERSION) {
			send_error(l, h.tag, h.type, EPROTONOSUPPORT, "protocol version");
			continue;
		}
		switch (h.type) {
		case HB_MSG_MEM_READ:
		case HB_MSG_MEM_WRITE:
			serve_mem(l, &h, p);
			continue;
		case HB_MSG_PING:
			send_frame(l, HB_MSG_PONG, h.tag, NULL, 0, NULL, 0);
			continue;
		case HB_MSG_REGISTER_VM_REPLY:
		case HB_MSG_RESULT:
		case HB_MSG_DESTROY_VM_REPLY:
		case HB_MSG_VM_RESET_REPLY:
		case HB_MSG_PONG:
		case HB_MSG_ERROR: {
			int taken;

			pthread_mutex_lock(&l->mu);
			if (h.type == HB_MSG_ERROR)
				l->stats.errors_received++;
			taken = deliver(l, &h, p);
			pthread_mutex_unlock(&l->mu);
			if (!taken && h.type == HB_MSG_ERROR) {
				struct hb_error e = { 0 };

				if (h.length >= sizeof(e))
					memcpy(&e, p, sizeof(e));
				hb_log("link-error reason=agent-refused tag=%u code=%s refused_type=%u",
				       h.tag, hb_errno_name(e.code), e.refused_type);
			} else if (!taken) {
				hb_log("link-error reason=unexpected-reply type=0x%x tag=%u", h.type,
				       h.tag);
			}
			continue;
		}
		default:
			send_error(l, h.tag, h.type, EBADMSG, "message type the VMM does not take");
			continue;
		}
	}
	pthread_mutex_lock(&l->mu);
	l->dead = 1;
	pthread_cond_broadcast(&l->cv);
	pthread_mutex_unlock(&l->mu);
	hb_log("link-down");
	return NULL;
}

struct agent_link *link_open(int fd)
{
	struct agent_link *l = calloc(1, sizeof(*l));
	pthread_condattr_t ca;

	if (!l)
		return NULL;
	l->fd = fd;
	l->next_tag = 1;
	pthread_mutex_init(&l->send_mu, NULL);
	pthread_mutex_init(&l->mu, NULL);
	pthread_condattr_init(&ca);
	pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	pthread_cond_init(&l->cv, &ca);
	if (pthread_create(&l->reader, NULL, reader_main, l)) {
		free(l);
		return NULL;
	}
	return l;
}

/* Arms `s` for a new tag; caller holds mu. */
static uint32_t arm_slot(struct agent_link *l, struct reply_slot *s)
{
	s->tag = l->next_tag++;
	if (!l->next_tag)
		l->next_tag = 1;
	s->waiting = 1;
	s->done = 0;
	s->payload = NULL;
	return s->tag;
}

/* Waits for the reply of `s`; 0 with s->payload set, or -errno. Releases the slot. */
static int await_slot(struct agent_link *l, struct reply_slot *s, unsigned timeout_ms)
{
	struct timespec dl;
	int rc = 0;

	clock_gettime(CLOCK_MONOTONIC, &dl);
	dl.tv_sec += timeout_ms / 1000;
	dl.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
	if (dl.tv_nsec >= 1000000000L) {
		dl.tv_sec++;
		dl.tv_nsec -= 1000000000L;
	}
	pthread_mutex_lock(&l->mu);
	while (!s->done && !l->dead && rc != ETIMEDOUT)
		rc = pthread_cond_timedwait(&l->cv, &l->mu, &dl);
	s->waiting = 0;
	if (s->done)
		rc = 0;
	else
		rc = l->dead ? -EPIPE : -ETIMEDOUT;
	s->done = 0;
	pthread_mutex_unlock(&l->mu);
	return rc;
}

/* Sends a request and waits for its reply in `s`. */
static int transact(struct agent_link *l, struct reply_slot *s, uint16_t type, const void *a,
		    size_t alen, const void *b, size_t blen, unsigned timeout_ms)
{
	uint32_t tag;
	int rc;

	pthread_mutex_lock(&l->mu);
	if (l->dead) {
		pthread_mutex_unlock(&l->mu);
		return -EPIPE;
	}
	tag = arm_slot(l, s);
	pthread_mutex_unlock(&l->mu);
	rc = send_frame(l, type, tag, a, alen, b, blen);
	if (rc) {
		pthread_mutex_lock(&l->mu);
		s->waiting = 0;
		pthread_mutex_unlock(&l->mu);
		return rc;
	}
	return await_slot(l, s, timeout_ms);
}

static void log_refusal(const char *what, const struct reply_slot *s)
{
	struct hb_error e = { 0 };
	char text[200] = "";
	size_t n = 0;

	if (s->length >= sizeof(e)) {
		memcpy(&e, s->payload, sizeof(e));
		n = s->length - sizeof(e);
		if (n >= sizeof(text))
			n = sizeof(text) - 1;
		memcpy(text, s->payload + sizeof(e), n);
	}
	text[n] = 0;
	hb_log("link-error reason=agent-refused request=%s code=%s text=\"%s\"", what,
	       hb_errno_name(e.code), text);
}

int link_register_vm(struct agent_link *l, const char *name, const char *profile,
		     uint32_t nr_vcpus, uint64_t gpa, uint64_t size, uint8_t *ram,
		     struct link_registration *out)
{
	struct hb_register_vm reg;
	struct hb_mem_region region = { .gpa = gpa, .size = size };
	struct hb_register_vm_reply rep;
	struct reply_slot *s = &l->control;
	size_t filters_len, text_len;
	int rc;

	memset(&reg, 0, sizeof(reg));
	strncpy(reg.name, name, HB_NAME_LEN - 1);
	strncpy(reg.profile, profile, HB_PROFILE_LEN - 1);
	reg.nr_vcpus = nr_vcpus;
	reg.nr_regions = 1;

	/* Memory requests may arrive as soon as the agent knows the VM. */
	pthread_mutex_lock(&l->mu);
	l->ram = NULL;
	pthread_mutex_unlock(&l->mu);

	rc = transact(l, s, HB_MSG_REGISTER_VM, &reg, sizeof(reg), &region, sizeof(region), 10000);
	if (rc)
		return rc;
	memset(out, 0, sizeof(*out));
	if (s->type == HB_MSG_ERROR) {
		log_refusal("REGISTER_VM", s);
		free(s->payload);
		return -EPROTO;
	}
	if (s->type != HB_MSG_REGISTER_VM_REPLY || s->length < sizeof(rep)) {
		free(s->payload);
		return -EPROTO;
	}
	memcpy(&rep, s->payload, sizeof(rep));
	filters_len = (size_t)rep.nr_filters * sizeof(struct hb_smccc_filter);
	if (rep.nr_filters > HB_MAX_FILTERS || s->length < sizeof(rep) + filters_len) {
		free(s->payload);
		return -EPROTO;
	}
	out->status = rep.status;
	out->vm_id = rep.vm_id;
	out->policy_version = rep.policy_version;
	out->nr_filters = rep.nr_filters;
	memcpy(out->filters, s->payload + sizeof(rep), filters_len);
	text_len = s->length - sizeof(rep) - filters_len;
	if (text_len >= sizeof(out->message))
		text_len = sizeof(out->message) - 1;
	memcpy(out->message, s->payload + sizeof(rep) + filters_len, text_len);
	out->message[text_len] = 0;
	free(s->payload);

	if (out->status == 0) {
		pthread_mutex_lock(&l->mu);
		l->vm_id = out->vm_id;
		l->ram_gpa = gpa;
		l->ram_size = size;
		l->ram = ram;
		pthread_mutex_unlock(&l->mu);
	}
	return 0;
}

int link_filter_report(struct agent_link *l, uint32_t vm_id, const int32_t *errnos, uint32_t n)
{
	struct hb_filter_report rep = { .vm_id = vm_id, .nr_filters = n };
	uint32_t tag;

	pthread_mutex_lock(&l->mu);
	tag = l->next_tag++;
	pthread_mutex_unlock(&l->mu);
	return send_frame(l, HB_MSG_FILTER_REPORT, tag, &rep, sizeof(rep), errnos,
			  (size_t)n * sizeof(int32_t));
}

int link_call(struct agent_link *l, const struct hb_call *call, struct link_result *out,
	      unsigned timeout_ms)
{
	struct reply_slot *s;
	uint32_t nr_actions;
	int rc;

	if (call->vcpu >= HB_LINK_MAX_VCPUS)
		return -EINVAL;
	s = &l->calls[call->vcpu];
	rc = transact(l, s, HB_MSG_CALL, call, sizeof(*call), NULL, 0, timeout_ms);
	if (rc)
		return rc;
	rc = -EPROTO;
	if (s->type == HB_MSG_ERROR) {
		log_refusal("CALL", s);
	} else if (s->type == HB_MSG_RESULT && s->length >= sizeof(out->r)) {
		memcpy(&out->r, s->payload, sizeof(out->r));
		nr_actions = out->r.nr_actions;
		if (nr_actions <= HB_LINK_MAX_ACTIONS &&
		    s->length == sizeof(out->r) + nr_actions * sizeof(struct hb_action) &&
		    out->r.vm_id == call->vm_id && out->r.vcpu == call->vcpu &&
		    out->r.seq == call->seq) {
			memcpy(out->actions, s->payload + sizeof(out->r),
			       nr_actions * sizeof(struct hb_action));
			rc = 0;
		} else {
			hb_log("link-error reason=bad-result vcpu=%u seq=%llu nr_actions=%u",
			       call->vcpu, (unsigned long long)call->seq, nr_actions);
		}
	}
	free(s->payload);
	return rc;
}

int link_destroy_vm(struct agent_link *l, uint32_t vm_id)
{
	struct hb_destroy_vm d = { .vm_id = vm_id };
	struct reply_slot *s = &l->control;
	struct hb_status st = { .status = -EPROTO };
	int rc;

	rc = transact(l, s, HB_MSG_DESTROY_VM, &d, sizeof(d), NULL, 0, 10000);
	pthread_mutex_lock(&l->mu);
	l->ram = NULL;
	l->vm_id = 0;
	pthread_mutex_unlock(&l->mu);
	if (rc)
		return rc;
	if (s->type == HB_MSG_DESTROY_VM_REPLY && s->length == sizeof(st))
		memcpy(&st, s->payload, sizeof(st));
	else if (s->type == HB_MSG_ERROR)
		log_refusal("DESTROY_VM", s);
	free(s->payload);
	return st.status;
}

int link_vm_reset(struct agent_link *l, uint32_t vm_id)
{
	struct hb_vm_reset r = { .vm_id = vm_id };
	struct reply_slot *s = &l->control;
	struct hb_status st = { .status = -EPROTO };
	int rc;

	/* The agent answers once the broker's handlers have forgotten the boot, or after 2 s. */
	rc = transact(l, s, HB_MSG_VM_RESET, &r, sizeof(r), NULL, 0, 5000);
	if (rc)
		return rc;
	if (s->type == HB_MSG_VM_RESET_REPLY && s->length == sizeof(st))
		memcpy(&st, s->payload, sizeof(st));
	else if (s->type == HB_MSG_ERROR)
		log_refusal("VM_RESET", s);
	free(s->payload);
	return st.status;
}

int link_ping(struct agent_link *l, unsigned timeout_ms)
{
	struct reply_slot *s = &l->control;
	int rc = transact(l, s, HB_MSG_PING, NULL, 0, NULL, 0, timeout_ms);

	if (rc)
		return rc;
	rc = s->type == HB_MSG_PONG ? 0 : -EPROTO;
	free(s->payload);
	return rc;
}

void link_stats(struct agent_link *l, struct link_stats *out)
{
	pthread_mutex_lock(&l->mu);
	*out = l->stats;
	pthread_mutex_unlock(&l->mu);
}
