/* kv_main.c - the kv image: UDP key-value store, durable on the PV disk. */
#include "guest.h"
#include "kv.h"
#include "blkfront.h"
#include "netfront.h"
#include "wait.h"
#include "io.h"
#include "lib.h"

static struct kv_server kv;

static void kv_send(void *ctx, const struct udp_peer *to, const char *msg, size_t len)
{
	(void)ctx;
	net_udp_send(&guest_nif, to, KV_PORT, msg, len);
}

static void udp_rx(void *ctx, uint16_t port, const struct udp_peer *from, const uint8_t *data,
		   size_t len)
{
	(void)ctx;
	if (port == KV_PORT)
		kv_request(&kv, from, (const char *)data, len);
}

static int disk_rw(void *ctx, int write, uint64_t sector, void *buf, uint32_t nsec)
{
	(void)ctx;
	return blk_rw(write ? KEMARI_BLK_OP_WRITE : KEMARI_BLK_OP_READ, sector, buf, nsec);
}

static void publish_stats(void)
{
	STATS->events = kv.st.commits;
	STATS->requests = kv.st.requests;
	STATS->replies = kv.st.replies;
	STATS->disk_errors = kv.st.disk_errors;
}

int guest_main(void)
{
	uint64_t compactions = 0;

	if (guest_boot("kv", 1))
		return 1;
	kv_init(&kv, 0, kv_send);
	guest_nif.udp_rx = udp_rx;
	if (blk_sectors()) {
		struct kvlog_dev dev = { 0, disk_rw };
		int rc = kv_open_disk(&kv, &dev, blk_sectors(), rdtsc());

		if (rc) {
			con_puts("kv: disk log unusable (error ");
			con_u64((uint64_t)-rc);
			con_puts("): PUT/INCR refused\n");
		} else if (kv.log.formatted) {
			con_puts("kv: formatted a blank disk\n");
		}
	} else {
		con_puts("kv: no disk: PUT/INCR refused (durability is the contract)\n");
	}
	con_puts("kv: recovered ");
	con_u64(kv.store.nkeys);
	con_puts(" keys, ");
	con_u64(kv.log.replayed);
	con_puts(" records, serving on ");
	con_ipv4(guest_nif.ip);
	con_puts(":7000\n");
	if (!net_present()) {
		con_puts("kv: no NIC attached, nothing to serve\n");
		return 2;
	}
	for (;;) {
		int n = guest_net_poll(KEMARI_RING_SIZE);

		kv_commit(&kv);
		if (kv.log.compactions != compactions) {
			compactions = kv.log.compactions;
			con_puts("kv: log compacted into half ");
			con_u64(kv.log.active);
			con_puts(" (generation ");
			con_u64(kv.log.gen);
			con_puts(")\n");
		}
		net_tx_kick();
		net_tx_reap();
		publish_stats();
		if (!n)
			wait_events(WAIT_RX, 0);
	}
}
