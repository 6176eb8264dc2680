/* SPDX-License-Identifier: Apache-2.0 */
/*
 * FF-A memory sharing end to end from a real guest (issue 4's bed check; docs/ffa.md "Guest
 * program for the real-KVM bed"): negotiate v1.2, get the endpoint ID, map RX/TX, read the
 * partition descriptors out of RX and find both partitions by their UUIDs, send the echo
 * partition a DIRECT_REQ2 whose x4..x17 must come back unchanged, share one page of
 * known bytes with it (a v1.2 transaction descriptor built in TX), ask it for the page's SHA-256
 * with DIRECT_REQ_64 and with DIRECT_REQ2, compare both with the digest computed here, then let
 * the host try the handle from a second VM (hb_wait), hash once more, reclaim, and check that the
 * handle is dead: a hash request reports INVALID_PARAMETERS and a second reclaim is
 * FFA_ERROR(INVALID_PARAMETERS).
 *
 * Every call is reported (hb_call_report, or call_wide, whose extra "regs" line carries x4..);
 * every check the guest makes itself is a "check name=... ok=0|1" line, and the program exits
 * with the number of failed checks. KVM answers SMCCC_VERSION with 1.1 (the call is in the
 * architecture range it keeps; measured on the KVM bed): this guest does not insist on 1.2,
 * it relies on x0..x17 travelling both ways, which the digests prove.
 *
 * Argument 0: the seed of the page's bytes (xorshift32, fill_page); the test recomputes them.
 * IDs and layouts: include/linux/arm_ffa.h and handlers/ffa/abi.py; the hashing partition's
 * message protocol: docs/ffa.md "Built-in partitions".
 */
#include "hb_guest.h"

#define SMCCC_VERSION              0x80000000u
#define FFA_ERROR                  0x84000060u
#define FFA_SUCCESS_32             0x84000061u
#define FFA_VERSION                0x84000063u
#define FFA_RX_RELEASE             0x84000065u
#define FFA_RXTX_MAP_64            0xC4000066u
#define FFA_RXTX_UNMAP             0x84000067u
#define FFA_PARTITION_INFO_GET     0x84000068u
#define FFA_ID_GET                 0x84000069u
#define FFA_MSG_SEND_DIRECT_REQ_64 0xC400006Fu
#define FFA_MSG_SEND_DIRECT_RESP_64 0xC4000070u
#define FFA_MEM_SHARE_64           0xC4000073u
#define FFA_MEM_RECLAIM            0x84000077u
#define FFA_MSG_SEND_DIRECT_REQ2   0xC400008Du
#define FFA_MSG_SEND_DIRECT_RESP2  0xC400008Eu

#define FFA_VERSION_1_2            0x10002u
#define FFA_INVALID_PARAMETERS     0xFFFFFFFEull /* -2 in w2, zero-extended */
#define FFA_BUSY                   0xFFFFFFFCull /* -4 */
#define STATUS_INVALID_PARAMETERS  0xFFFFFFFFFFFFFFFEull /* sha256's x3 status, sign-extended */
#define HANDLE_HYPERVISOR_BIT      (1ull << 63)

#define PAGE                       4096u
#define PARTITION_INFO_SIZE        24u   /* v1.1+ descriptor */
/* V1.1/v1.2 transaction descriptor: 48-byte header, 32-byte v1.2 EMAD, 16-byte composite
 * header, 16-byte constituent. */
#define DESC_HEADER                48u
#define DESC_EMAD_V1_2             32u
#define DESC_COMPOSITE             (DESC_HEADER + DESC_EMAD_V1_2)
#define DESC_CONSTITUENT           (DESC_COMPOSITE + 16u)
#define DESC_LENGTH                (DESC_CONSTITUENT + 16u)
#define ATTR_NORMAL_WB_INNER       0x2Fu /* normal, write-back, inner shareable */
#define PERM_RO_NX                 0x05u /* data RO (1), instruction NX (1 << 2) */

/* A range of the page the DIRECT_REQ2 request hashes: an odd offset exercises the offset path. */
#define RANGE_OFFSET               0x123u
#define RANGE_LENGTH               0x456u

/* handlers/ffa/config.py: uuid5(NAMESPACE_URL, "urn:hyperbroker:ffa:<kind>"), in the byte order
 * the descriptor carries them (Python's uuid.bytes). */
static const uint8_t ECHO_UUID[16] = {
	0xaa, 0x9b, 0xa0, 0xec, 0x02, 0x43, 0x58, 0x7a,
	0xb9, 0x91, 0x42, 0x43, 0xe1, 0xbc, 0x11, 0xd5,
};
static const uint8_t SHA256_UUID[16] = {
	0x81, 0x9e, 0xe2, 0x75, 0xb6, 0x0a, 0x54, 0x24,
	0xb3, 0x01, 0x13, 0x38, 0xcd, 0xd2, 0x04, 0x73,
};

static uint8_t tx[PAGE] __attribute__((aligned(PAGE)));
static uint8_t rx[PAGE] __attribute__((aligned(PAGE)));
static uint8_t page[PAGE] __attribute__((aligned(PAGE)));
static unsigned failures;

/* ---- SHA-256 (FIPS 180-4), freestanding ------------------------------------------------- */

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
	0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
	0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
	0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
	0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
	0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
	0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
	0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
	0xc67178f2,
};

static inline uint32_t ror(uint32_t x, unsigned n)
{
	return (x >> n) | (x << (32 - n));
}

static void sha256_block(uint32_t h[8], const uint8_t *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, k;

	for (unsigned i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (unsigned i = 16; i < 64; i++) {
		uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
		uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);

		w[i] = w[i - 16] + s0 + w[i - 7] + s1;
	}
	a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
	for (unsigned i = 0; i < 64; i++) {
		uint32_t s1 = ror(e, 6) ^ ror(e, 11) ^ ror(e, 25), ch = (e & f) ^ (~e & g);
		uint32_t t1 = k + s1 + ch + K[i] + w[i];
		uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));

		k = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
	}
	h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e, h[5] += f, h[6] += g, h[7] += k;
}

/* The digest of data[0, n) as the four registers the hashing partition answers: bytes
 * [8i, 8i+8) as a little-endian u64 in words[i] (docs/ffa.md "Built-in partitions"). */
static void sha256_words(const uint8_t *data, uint32_t n, uint64_t words[4])
{
	uint32_t h[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
			  0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
	uint8_t last[128];
	uint32_t full = n & ~63u, rest = n - full, tail;
	uint64_t bits = (uint64_t)n * 8;

	for (uint32_t off = 0; off < full; off += 64)
		sha256_block(h, data + off);
	for (uint32_t i = 0; i < sizeof(last); i++)
		last[i] = i < rest ? data[full + i] : 0;
	last[rest] = 0x80;
	tail = rest < 56 ? 64 : 128;
	for (unsigned i = 0; i < 8; i++)
		last[tail - 1 - i] = (uint8_t)(bits >> (8 * i));
	for (uint32_t off = 0; off < tail; off += 64)
		sha256_block(h, last + off);
	for (unsigned i = 0; i < 4; i++) {
		/* digest bytes 8i..8i+7 are h[2i] then h[2i+1], each big-endian */
		uint64_t v = 0;

		for (unsigned j = 0; j < 8; j++) {
			uint32_t word = h[2 * i + j / 4];

			v |= (uint64_t)(uint8_t)(word >> (24 - 8 * (j % 4))) << (8 * j);
		}
		words[i] = v;
	}
}

/* ---- helpers ---------------------------------------------------------------------------- */

static void check(const char *name, int ok)
{
	hb_puts("check name=");
	hb_puts(name);
	hb_puts(ok ? " ok=1" : " ok=0");
	hb_newline();
	if (!ok)
		failures++;
}

/* An SMCCC 1.2 call with x0..x17 from regs, results back into regs: reported like
 * hb_call_report, plus a "regs label=... x4=... x<last>=..." line with what hb_report omits
 * (each character is an MMIO exit, so only the registers the answer uses). */
static void call_wide(const char *label, uint64_t regs[18], unsigned last)
{
	uint32_t fid = (uint32_t)regs[0];
	uint64_t t0 = hb_ticks(), t1;

	hb_hvc18(regs);
	t1 = hb_ticks();
	hb_report(label, fid, 0, (struct hb_regs){ regs[0], regs[1], regs[2], regs[3] },
		  hb_ticks_to_ns(t1 - t0));
	hb_puts("regs label=");
	hb_puts(label);
	for (unsigned i = 4; i <= last; i++) {
		hb_puts(" x");
		hb_putdec(i);
		hb_puts("=");
		hb_puthex(regs[i]);
	}
	hb_newline();
}

static uint64_t get_le(const volatile uint8_t *p, unsigned n)
{
	uint64_t v = 0;

	for (unsigned i = 0; i < n; i++)
		v |= (uint64_t)p[i] << (8 * i);
	return v;
}

/* Byte stores: the MMU is off, so every access must be aligned; bytes always are. */
static void put_le(uint8_t *p, uint64_t v, unsigned n)
{
	for (unsigned i = 0; i < n; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

/* The known bytes: xorshift32 from `seed`, each state stored little-endian (tests recompute). */
static void fill_page(uint32_t seed)
{
	uint32_t x = seed ? seed : 1;

	for (unsigned i = 0; i < PAGE; i += 4) {
		x ^= x << 13;
		x ^= x >> 17;
		x ^= x << 5;
		put_le(page + i, x, 4);
	}
}

/* V1.2 share descriptor in TX: one borrower (`receiver`, RO/NX), one constituent (`page`). */
static void build_share_descriptor(uint16_t sender, uint16_t receiver)
{
	for (unsigned i = 0; i < DESC_LENGTH; i++)
		tx[i] = 0; /* every reserved field, the handle, the tag and the flags are zero */
	put_le(tx + 0, sender, 2);
	put_le(tx + 2, ATTR_NORMAL_WB_INNER, 2);
	put_le(tx + 24, DESC_EMAD_V1_2, 4);                 /* EMAD size */
	put_le(tx + 28, 1, 4);                              /* EMAD count */
	put_le(tx + 32, DESC_HEADER, 4);                    /* EMAD array offset */
	put_le(tx + DESC_HEADER + 0, receiver, 2);
	put_le(tx + DESC_HEADER + 2, PERM_RO_NX, 1);
	put_le(tx + DESC_HEADER + 4, DESC_COMPOSITE, 4);    /* composite offset */
	put_le(tx + DESC_COMPOSITE + 0, 1, 4);              /* total pages */
	put_le(tx + DESC_COMPOSITE + 4, 1, 4);              /* constituent count */
	put_le(tx + DESC_CONSTITUENT + 0, (uint64_t)(uintptr_t)page, 8);
	put_le(tx + DESC_CONSTITUENT + 8, 1, 4);            /* page count */
}

static int uuid_is(const volatile uint8_t *p, const uint8_t want[16])
{
	int same = 1;

	for (unsigned j = 0; j < 16; j++)
		same &= p[j] == want[j];
	return same;
}

/* x(i) of the echo request, i in 4..17: every register distinct, all 64 bits used. */
static uint64_t echo_word(unsigned i)
{
	return 0xEC00000000000000ull | (uint64_t)i << 32 | (0x0E0E0000u + i);
}

static int digest_is(const uint64_t *got, const uint64_t want[4])
{
	return got[0] == want[0] && got[1] == want[1] && got[2] == want[2] && got[3] == want[3];
}

/* DIRECT_REQ_64 to the hashing partition: x3 = handle, x4 = offset, x5 = length (0: to the end). */
static void hash_req64(const char *label, uint16_t self, uint16_t sha, uint64_t handle,
		       uint64_t out[18])
{
	for (unsigned i = 0; i < 18; i++)
		out[i] = 0;
	out[0] = FFA_MSG_SEND_DIRECT_REQ_64;
	out[1] = (uint64_t)self << 16 | sha;
	out[3] = handle;
	call_wide(label, out, 8);
}

static int resp64_ok(const uint64_t r[18], uint16_t self, uint16_t sha)
{
	return r[0] == FFA_MSG_SEND_DIRECT_RESP_64 &&
	       (r[1] & 0xFFFFFFFFu) == ((uint32_t)sha << 16 | self); /* responder, requester */
}

void guest_main(void)
{
	uint64_t whole[4], range[4], regs[18], handle = 0;
	uint16_t self = 0, sha = 0, echo = 0;
	int echoed;
	struct hb_regs r;

	fill_page((uint32_t)hb_arg(0, 0x5EED1234u));
	sha256_words(page, PAGE, whole);
	sha256_words(page + RANGE_OFFSET, RANGE_LENGTH, range);

	hb_call_report("smccc_version", SMCCC_VERSION, 0, 0, 0);

	/* The answer is the callee's version itself, never FFA_SUCCESS. */
	r = hb_call_report("version", FFA_VERSION, FFA_VERSION_1_2, 0, 0);
	check("version", r.x0 == FFA_VERSION_1_2);

	/* W2[15:0] = our endpoint ID: never 0 (the hypervisor's), never a secure ID. */
	r = hb_call_report("id", FFA_ID_GET, 0, 0, 0);
	self = (uint16_t)r.x2;
	check("id", r.x0 == FFA_SUCCESS_32 && self != 0 && !(self & 0x8000));

	/* One 4 KiB page each, TX first. */
	r = hb_call_report("map", FFA_RXTX_MAP_64, (uint64_t)(uintptr_t)tx,
			   (uint64_t)(uintptr_t)rx, 1);
	check("map", r.x0 == FFA_SUCCESS_32);

	/* Nil UUID = every partition; w2 = count, w3 = descriptor size; descriptors in RX. */
	r = hb_call_report("info", FFA_PARTITION_INFO_GET, 0, 0, 0);
	check("info", r.x0 == FFA_SUCCESS_32 && r.x3 == PARTITION_INFO_SIZE && r.x2 >= 1 &&
		      r.x2 <= PAGE / PARTITION_INFO_SIZE);
	for (unsigned i = 0; r.x0 == FFA_SUCCESS_32 && i < r.x2 && i < PAGE / PARTITION_INFO_SIZE;
	     i++) {
		const volatile uint8_t *d = rx + i * PARTITION_INFO_SIZE;
		int is_sha = uuid_is(d + 8, SHA256_UUID);

		if (is_sha)
			sha = (uint16_t)get_le(d, 2);
		if (uuid_is(d + 8, ECHO_UUID))
			echo = (uint16_t)get_le(d, 2);
		hb_puts("partition index=");
		hb_putdec(i);
		hb_puts(" id=");
		hb_puthex(get_le(d, 2));
		hb_puts(" contexts=");
		hb_putdec(get_le(d + 2, 2));
		hb_puts(" properties=");
		hb_puthex(get_le(d + 4, 4));
		hb_puts(" uuid_lo=");
		hb_puthex(get_le(d + 8, 8));
		hb_puts(" uuid_hi=");
		hb_puthex(get_le(d + 16, 8));
		hb_puts(is_sha ? " sha256=1" : " sha256=0");
		hb_newline();
	}
	check("sha256_partition_found", sha & 0x8000); /* a secure endpoint ID */
	check("echo_partition_found", echo & 0x8000);

	/* RX is ours until we release it: the producer may not fill it again. */
	r = hb_call_report("info.busy", FFA_PARTITION_INFO_GET, 0, 0, 0);
	check("info.busy", r.x0 == FFA_ERROR && r.x2 == FFA_BUSY);
	r = hb_call_report("rx_release", FFA_RX_RELEASE, 0, 0, 0);
	check("rx_release", r.x0 == FFA_SUCCESS_32);

	/* DIRECT_REQ2 to echo, routed by UUID (x2/x3): all fourteen of x4..x17 travel from the
	 * guest through KVM, the VMM, the agent and the broker, and back. */
	for (unsigned i = 0; i < 18; i++)
		regs[i] = i >= 4 ? echo_word(i) : 0;
	regs[0] = FFA_MSG_SEND_DIRECT_REQ2;
	regs[1] = (uint64_t)self << 16 | echo;
	regs[2] = get_le(ECHO_UUID, 8);
	regs[3] = get_le(ECHO_UUID + 8, 8);
	call_wide("echo2", regs, 17);
	echoed = regs[0] == FFA_MSG_SEND_DIRECT_RESP2 &&
		 (regs[1] & 0xFFFFFFFFu) == ((uint32_t)echo << 16 | self);
	for (unsigned i = 4; i < 18; i++)
		echoed &= regs[i] == echo_word(i);
	check("echo2", echoed);

	/* The descriptor in TX (x3 = w4 = 0), one fragment; the handle in w2 (low), w3. */
	build_share_descriptor(self, sha);
	r = hb_call_report("share", FFA_MEM_SHARE_64, DESC_LENGTH, DESC_LENGTH, 0);
	handle = (r.x3 & 0xFFFFFFFFu) << 32 | (r.x2 & 0xFFFFFFFFu);
	check("share", r.x0 == FFA_SUCCESS_32 && (handle & HANDLE_HYPERVISOR_BIT));

	/* The whole page through DIRECT_REQ_64: status in x3, the digest in x4..x7. */
	hash_req64("hash", self, sha, handle, regs);
	check("hash", resp64_ok(regs, self, sha) && regs[3] == 0 && digest_is(regs + 4, whole));

	/* A range through DIRECT_REQ2, routed by UUID (x2/x3): status in x4, digest x5..x8. */
	for (unsigned i = 0; i < 18; i++)
		regs[i] = 0;
	regs[0] = FFA_MSG_SEND_DIRECT_REQ2;
	regs[1] = (uint64_t)self << 16 | sha;
	regs[2] = get_le(SHA256_UUID, 8);
	regs[3] = get_le(SHA256_UUID + 8, 8);
	regs[4] = handle;
	regs[5] = RANGE_OFFSET;
	regs[6] = RANGE_LENGTH;
	call_wide("hash2.range", regs, 8);
	check("hash2.range", regs[0] == FFA_MSG_SEND_DIRECT_RESP2 &&
				     (regs[1] & 0xFFFFFFFFu) == ((uint32_t)sha << 16 | self) &&
				     regs[4] == 0 && digest_is(regs + 5, range));

	/* The host now tries this handle from a second VM (tests/kvm_bed/test_kvm_bed_ffa.py). */
	hb_puts("ffa-share-handle:");
	hb_puthex(handle);
	hb_wait("");

	/* Whatever the other VM tried, the share is still ours and still hashes. */
	hash_req64("hash.after", self, sha, handle, regs);
	check("hash.after", resp64_ok(regs, self, sha) && regs[3] == 0 &&
				    digest_is(regs + 4, whole));

	/* W1/w2 = handle, w3 = flags. */
	r = hb_call_report("reclaim", FFA_MEM_RECLAIM, handle & 0xFFFFFFFFu, handle >> 32, 0);
	check("reclaim", r.x0 == FFA_SUCCESS_32);

	/* The handle is dead: the partition cannot reach the page, a reclaim finds nothing. */
	hash_req64("hash.reclaimed", self, sha, handle, regs);
	check("hash.reclaimed", resp64_ok(regs, self, sha) && regs[3] == STATUS_INVALID_PARAMETERS);
	r = hb_call_report("reclaim.again", FFA_MEM_RECLAIM, handle & 0xFFFFFFFFu, handle >> 32, 0);
	check("reclaim.again", r.x0 == FFA_ERROR && r.x2 == FFA_INVALID_PARAMETERS);

	r = hb_call_report("unmap", FFA_RXTX_UNMAP, 0, 0, 0);
	check("unmap", r.x0 == FFA_SUCCESS_32);

	if (failures)
		hb_exit(failures);
}
