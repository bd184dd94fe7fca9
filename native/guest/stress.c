/* stress.c - the stress image: dirty args[0] pages, do one I/O event, wait
 * for it, pace to args[1] events/s; for checkpoint-cost benchmarks.
 *
 * args[0] pages dirtied per event, args[1] events/s (0 = flat out),
 * args[2] working-set pages cycled through (0 = args[0]),
 * args[3] stop (power off, code 0) after this many events (0 = never),
 * args[4] the working set's contents at boot (KEMARI_STRESS_FILL_*), so a
 * full sync meets memory that is in use, compressible or not.
 * The event counter is guest_stats.events at GUEST_STATS_GPA + 8. */
#include "guest.h"
#include "blkfront.h"
#include "netfront.h"
#include "wait.h"
#include "io.h"
#include "lib.h"

#define STACK_RESERVE   (1u << 20)
#define PROGRESS_EVERY  50000
#define ROTATE_SECTORS  2048
#define DISCARD_PORT    9

extern char __bss_end[];

static uint8_t sector_buf[KEMARI_BLK_SECTOR_SIZE] __attribute__((aligned(512)));

#define DICT_WORDS      2048
#define WORD_MAX        10

static char dict[DICT_WORDS][WORD_MAX];
static uint8_t dict_len[DICT_WORDS];
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t next_random(void)   /* xorshift64 */
{
	rng_state ^= rng_state << 13;
	rng_state ^= rng_state >> 7;
	rng_state ^= rng_state << 17;
	return rng_state;
}

static void make_dictionary(void)
{
	for (unsigned w = 0; w < DICT_WORDS; w++) {
		uint64_t r = next_random();

		dict_len[w] = 2 + r % (WORD_MAX - 1);
		for (unsigned k = 0; k < dict_len[w]; k++)
			dict[w][k] = 'a' + (next_random() % 26);
	}
}

/* A page of words drawn at random from the dictionary, or of random bytes. */
static void fill_page(uint8_t *page, uint64_t kind)
{
	size_t i = 0;

	if (kind == KEMARI_STRESS_FILL_RANDOM) {
		for (; i < 4096; i += 8)
			*(uint64_t *)(page + i) = next_random();
		return;
	}
	while (i < 4096) {
		unsigned w = next_random() % DICT_WORDS;

		for (unsigned k = 0; k < dict_len[w] && i < 4096; k++)
			page[i++] = dict[w][k];
		if (i < 4096)
			page[i++] = ' ';
	}
}

static void fill_working_set(uint8_t *region, uint64_t wset, uint64_t kind)
{
	if (kind != KEMARI_STRESS_FILL_TEXT && kind != KEMARI_STRESS_FILL_RANDOM)
		return;
	make_dictionary();
	for (uint64_t p = 0; p < wset; p++)
		fill_page(region + p * 4096, kind);
}

/* TSC ticks per microsecond, measured against the BLOCK port timeout. */
static uint64_t calibrate_tsc(void)
{
	uint64_t t0 = rdtsc(), t1;

	wait_events(0, 20000);
	t1 = rdtsc();
	return (t1 - t0) / 20000;
}

static int io_event(uint64_t n)
{
	if (blk_sectors()) {
		uint64_t span = blk_sectors() < ROTATE_SECTORS ? blk_sectors() : ROTATE_SECTORS;

		put_le64(sector_buf, n);
		return blk_rw(KEMARI_BLK_OP_WRITE, n % span, sector_buf, 1);
	}
	{
		struct udp_peer to;
		char msg[32];
		size_t len;

		memset(to.mac, 0xff, 6);
		to.ip = net_broadcast(&guest_nif);
		to.port = DISCARD_PORT;
		memcpy(msg, "stress ", 7);
		len = 7 + fmt_u64(msg + 7, n);
		net_udp_send(&guest_nif, &to, DISCARD_PORT, msg, len);
		net_tx_kick();
		while (net_tx_reap())
			wait_events(WAIT_TX, 0);
		return 0;
	}
}

int guest_main(void)
{
	uint64_t pages, rate, wset, stop, avail, cursor = 0, n, tpu = 0, t0 = 0;
	uint8_t *region;

	if (guest_boot("stress", 2))
		return 1;
	if (!blk_sectors() && !net_present()) {
		con_puts("stress: needs a disk or a NIC for its I/O events\n");
		return 2;
	}
	pages = boot_info->args[KEMARI_STRESS_ARG_PAGES];
	rate = boot_info->args[KEMARI_STRESS_ARG_RATE];
	wset = boot_info->args[KEMARI_STRESS_ARG_WSET];
	stop = boot_info->args[3];
	if (!wset)
		wset = pages;
	region = (uint8_t *)(((uintptr_t)__bss_end + 4095) & ~(uintptr_t)4095);
	avail = (boot_info->mem_bytes - STACK_RESERVE - (uintptr_t)region) / 4096;
	if (boot_info->mem_bytes < (uintptr_t)region + STACK_RESERVE)
		avail = 0;
	if (wset > avail)
		wset = avail;
	if (!wset)
		pages = 0;
	fill_working_set(region, wset, boot_info->args[KEMARI_STRESS_ARG_FILL]);
	if (rate) {
		tpu = calibrate_tsc();
		if (tpu < 50 || tpu > 100000)
			tpu = 0;        /* untrustworthy: pace by sleeping 1/rate per event */
	}
	con_puts("stress: ");
	con_u64(pages);
	con_puts(" pages/event over ");
	con_u64(wset);
	con_puts(" pages at ");
	con_hex((uintptr_t)region);
	con_puts(", rate ");
	con_u64(rate);
	con_puts("/s, I/O via ");
	con_puts(blk_sectors() ? "disk" : "net");
	con_puts(", counter at ");
	con_hex(GUEST_STATS_GPA + 8);
	con_puts(", tsc/us ");
	con_u64(tpu);
	con_putc('\n');

	t0 = rdtsc();
	for (n = 0; !stop || n < stop;) {
		uint64_t i;
		int st;

		for (i = 0; i < pages; i++) {
			*(volatile uint64_t *)(region + (cursor % wset) * 4096) = n;
			cursor++;
		}
		st = io_event(n);
		if (st) {
			STATS->disk_errors++;
			if (STATS->disk_errors == 1) {
				con_puts("stress: I/O error ");
				con_u64((uint64_t)-st);
				con_putc('\n');
			}
		}
		n++;
		STATS->events = n;
		if (n % PROGRESS_EVERY == 0) {
			con_puts("stress: ");
			con_u64(n);
			con_puts(" events\n");
		}
		if (rate && tpu) {
			uint64_t period = tpu * 1000000 / rate, due = t0 + n * period, now = rdtsc();

			if (now < due) {
				uint64_t us = (due - now) / tpu;

				/* the TSC may jump after a restore on another host:
				 * never sleep more than two periods at a time */
				if (us > 2 * 1000000 / rate)
					us = 2 * 1000000 / rate;
				wait_events(0, (uint32_t)(us ? us : 1));
			} else if (now - due > tpu * 1000000) {
				t0 = now - n * period;      /* > 1 s behind: rebase, no burst */
			}
		} else if (rate) {
			wait_events(0, (uint32_t)(1000000 / rate) ? : 1);
		}
	}
	con_puts("stress: done, ");
	con_u64(n);
	con_puts(" events\n");
	return 0;
}
