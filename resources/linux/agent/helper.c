/*
 * blimp-helper: the Blimp guest agent's native helper (/bin/blimp-helper).
 *
 * The agent is a busybox shell script; what would be slow or impossible in
 * shell is done here, in one process per command (each fork+exec costs about
 * 0.5 s on the PVM hosts Blimp's CI runs on, while ring-3 code runs natively).
 *
 *   blimp-helper alloc MIB [HOLD_MS]   mmap MIB MiB of private anonymous memory
 *                                      (MAP_POPULATE), write every page, verify,
 *                                      hold it HOLD_MS ms (default 1000), free it
 *   blimp-helper fill PATH MIB [SEED]  write MIB MiB of pseudo-random bytes to
 *                                      PATH (created/truncated) and print their
 *                                      SHA-256; SEED (decimal or 0x hex, nonzero)
 *                                      makes the bytes reproducible
 *   blimp-helper sha256 PATH           print the SHA-256 of PATH
 *
 * Output: one line of space-separated words, the first "ok" or "fail", the
 * rest key=value. The agent prefixes it with "@@ <command> ". Exit status 0 on
 * success, 1 on failure, 2 on bad usage.
 *
 * The pseudo-random stream (so a host can recompute it): xorshift64* with
 * state = SEED; per 8-byte word: x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
 * word = x * 0x2545F4914F6CDD1D, stored little-endian. Without SEED the seed
 * comes from getrandom() and is printed.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#ifndef GRND_INSECURE
#define GRND_INSECURE 0x0004
#endif

#define MIB (1024UL * 1024UL)
/* Small on purpose: each first-touched page is a guest page fault, and the
 * guest kernel is slow here. */
#define CHUNK (64UL * 1024UL)

static uint8_t buf[CHUNK];

/* ---- SHA-256 (FIPS 180-4) ---- */
struct sha256 {
	uint32_t h[8];
	uint64_t len;
	uint8_t blk[64];
	size_t n;
};

static const uint32_t K[64] = {
	0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
	0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
	0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
	0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
	0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
	0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
	0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
	0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(struct sha256 *s, const uint8_t *p)
{
	uint32_t w[64], a, b, c, d, e, f, g, h, t1, t2;
	int i;

	for (i = 0; i < 16; i++)
		w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
		       (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
	for (; i < 64; i++)
		w[i] = w[i - 16] + (ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3)) +
		       w[i - 7] + (ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10));
	a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3];
	e = s->h[4]; f = s->h[5]; g = s->h[6]; h = s->h[7];
	for (i = 0; i < 64; i++) {
		t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
		t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
		h = g; g = f; f = e; e = d + t1;
		d = c; c = b; b = a; a = t1 + t2;
	}
	s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
	s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
	static const uint32_t iv[8] = { 0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
					0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19 };
	memcpy(s->h, iv, sizeof(iv));
	s->len = 0;
	s->n = 0;
}

static void sha256_update(struct sha256 *s, const uint8_t *p, size_t len)
{
	s->len += len;
	while (len > 0) {
		if (s->n == 0 && len >= 64) {
			sha256_block(s, p);
			p += 64;
			len -= 64;
			continue;
		}
		size_t k = 64 - s->n < len ? 64 - s->n : len;
		memcpy(s->blk + s->n, p, k);
		s->n += k;
		p += k;
		len -= k;
		if (s->n == 64) {
			sha256_block(s, s->blk);
			s->n = 0;
		}
	}
}

static void sha256_hex(struct sha256 *s, char out[65])
{
	uint64_t bits = s->len * 8;
	uint8_t pad[72] = { 0x80 };
	size_t padlen = (s->n < 56 ? 56 : 120) - s->n;
	int i;

	for (i = 0; i < 8; i++)
		pad[padlen + i] = (uint8_t)(bits >> (56 - 8 * i));
	sha256_update(s, pad, padlen + 8);
	for (i = 0; i < 8; i++)
		sprintf(out + 8 * i, "%08x", s->h[i]);
}

/* ---- helpers ---- */
static double now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int parse_u64(const char *s, uint64_t *v)
{
	char *end;

	if (!s || !*s || *s == '-')
		return -1;
	errno = 0;
	*v = strtoull(s, &end, 0);
	return (errno || *end) ? -1 : 0;
}

static void sleep_ms(uint64_t ms)
{
	struct timespec ts = { (time_t)(ms / 1000), (long)(ms % 1000) * 1000000L };

	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
}

static int usage(void)
{
	printf("fail error=usage\n");
	fprintf(stderr, "usage: blimp-helper alloc MIB [HOLD_MS] | fill PATH MIB [SEED] | sha256 PATH\n");
	return 2;
}

/* ---- commands ---- */
static int cmd_alloc(int argc, char **argv)
{
	uint64_t mib, hold = 1000, pages, i, bad = 0;
	double t0, t1, t2;
	uint8_t *p;

	if (argc < 1 || parse_u64(argv[0], &mib) || mib == 0 || mib > (1UL << 20) ||
	    (argc > 1 && parse_u64(argv[1], &hold)))
		return usage();
	pages = mib * MIB / 4096;
	t0 = now_ms();
	p = mmap(NULL, mib * MIB, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED) {
		printf("fail mib=%" PRIu64 " error=%s\n", mib, strerrorname_np(errno));
		return 1;
	}
	/* MAP_POPULATE already faulted every page in; write each (natively fast
	 * now) so they are really private and dirty, then read them back. */
	for (i = 0; i < pages; i++)
		p[i * 4096] = (uint8_t)(i * 7 + 1);
	t1 = now_ms();
	for (i = 0; i < pages; i++)
		bad += p[i * 4096] != (uint8_t)(i * 7 + 1);
	if (bad) {
		printf("fail mib=%" PRIu64 " error=verify bad_pages=%" PRIu64 "\n", mib, bad);
		return 1;
	}
	printf("ok mib=%" PRIu64 " pages=%" PRIu64 " touch_ms=%.0f hold_ms=%" PRIu64 "\n",
	       mib, pages, t1 - t0, hold);
	fflush(stdout);
	sleep_ms(hold);
	t2 = now_ms();
	for (i = 0; i < pages; i++)
		bad += p[i * 4096] != (uint8_t)(i * 7 + 1);
	munmap(p, mib * MIB);
	if (bad) {
		printf("fail mib=%" PRIu64 " error=changed-while-held bad_pages=%" PRIu64 "\n", mib, bad);
		return 1;
	}
	(void)t2;
	return 0;
}

static int cmd_fill(int argc, char **argv)
{
	uint64_t mib, seed = 0, x, left, i;
	struct sha256 s;
	char hex[65];
	double t0;
	int fd;

	if (argc < 2 || parse_u64(argv[1], &mib) || mib > (1UL << 20) ||
	    (argc > 2 && (parse_u64(argv[2], &seed) || seed == 0)))
		return usage();
	if (argc <= 2) {
		if (getrandom(&seed, sizeof(seed), GRND_INSECURE) != sizeof(seed) &&
		    getrandom(&seed, sizeof(seed), GRND_NONBLOCK) != sizeof(seed))
			seed = (uint64_t)now_ms() * 0x9E3779B97F4A7C15ULL;
		if (seed == 0)
			seed = 0x9E3779B97F4A7C15ULL;
	}
	t0 = now_ms();
	fd = open(argv[0], O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0) {
		printf("fail error=%s\n", strerrorname_np(errno));
		return 1;
	}
	sha256_init(&s);
	x = seed;
	for (left = mib * MIB; left > 0; left -= CHUNK) {
		for (i = 0; i < CHUNK; i += 8) {
			uint64_t w;

			x ^= x >> 12;
			x ^= x << 25;
			x ^= x >> 27;
			w = x * 0x2545F4914F6CDD1DULL;
			for (int b = 0; b < 8; b++)
				buf[i + b] = (uint8_t)(w >> (8 * b));
		}
		sha256_update(&s, buf, CHUNK);
		for (size_t off = 0; off < CHUNK;) {
			ssize_t n = write(fd, buf + off, CHUNK - off);

			if (n < 0 && errno == EINTR)
				continue;
			if (n <= 0) {
				printf("fail error=%s written_mib=%" PRIu64 "\n",
				       n < 0 ? strerrorname_np(errno) : "short-write",
				       (mib * MIB - left) / MIB);
				close(fd);
				return 1;
			}
			off += (size_t)n;
		}
	}
	if (close(fd)) {
		printf("fail error=%s\n", strerrorname_np(errno));
		return 1;
	}
	sha256_hex(&s, hex);
	printf("ok mib=%" PRIu64 " seed=0x%016" PRIx64 " sha256=%s ms=%.0f\n", mib, seed, hex,
	       now_ms() - t0);
	return 0;
}

static int cmd_sha256(int argc, char **argv)
{
	struct sha256 s;
	uint64_t total = 0;
	char hex[65];
	ssize_t n;
	int fd;

	if (argc < 1)
		return usage();
	fd = open(argv[0], O_RDONLY | O_CLOEXEC);
	if (fd < 0) {
		printf("fail error=%s\n", strerrorname_np(errno));
		return 1;
	}
	sha256_init(&s);
	while ((n = read(fd, buf, CHUNK)) != 0) {
		if (n < 0) {
			if (errno == EINTR)
				continue;
			printf("fail error=%s\n", strerrorname_np(errno));
			return 1;
		}
		sha256_update(&s, buf, (size_t)n);
		total += (uint64_t)n;
	}
	close(fd);
	sha256_hex(&s, hex);
	printf("ok bytes=%" PRIu64 " sha256=%s\n", total, hex);
	return 0;
}

int main(int argc, char **argv)
{
	int rc;

	if (argc < 2)
		return usage();
	if (!strcmp(argv[1], "alloc"))
		rc = cmd_alloc(argc - 2, argv + 2);
	else if (!strcmp(argv[1], "fill"))
		rc = cmd_fill(argc - 2, argv + 2);
	else if (!strcmp(argv[1], "sha256"))
		rc = cmd_sha256(argc - 2, argv + 2);
	else
		rc = usage();
	fflush(stdout);
	return rc;
}
