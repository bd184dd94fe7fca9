/* host_tests.c - unit tests of the guest's pure parts, built for the host
 * (make host-tests). Prints one line per failed check and a summary line
 * "host-tests: checks=N failures=M"; exits 1 if any check failed. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "crc32.h"
#include "kv.h"
#include "kvlog.h"
#include "kvproto.h"
#include "kvstore.h"
#include "lib.h"
#include "net.h"
#include "../../kemari_abi.h"

static unsigned long checks, failures;

#define CHECK(cond) do { \
	checks++; \
	if (!(cond)) { \
		failures++; \
		printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond); \
	} \
} while (0)

static uint64_t rng = 88172645463325252ull;

static uint64_t rnd(void)
{
	rng ^= rng << 13;
	rng ^= rng >> 7;
	rng ^= rng << 17;
	return rng;
}

/* ---- checksums, formatting ---------------------------------------------- */

static void test_crc_fmt(void)
{
	char b[32];
	uint64_t v;

	CHECK(crc32c(0, "123456789", 9) == 0xe3069283u);
	CHECK(crc32c(crc32c(0, "1234", 4), "56789", 5) == 0xe3069283u);
	CHECK(crc32c(0, "", 0) == 0);
	CHECK(fmt_u64(b, 0) == 1 && b[0] == '0');
	CHECK(fmt_u64(b, 18446744073709551615ull) == 20 && !memcmp(b, "18446744073709551615", 20));
	CHECK(parse_u64("18446744073709551615", 20, &v) == 0 && v == UINT64_MAX);
	CHECK(parse_u64("18446744073709551616", 20, &v) == -2);
	CHECK(parse_u64("12a", 3, &v) == -1);
	CHECK(parse_u64("", 0, &v) == -1);
	CHECK(parse_u64("-1", 2, &v) == -1);
	CHECK(fmt_ipv4(b, htonl(0x0a00020f)) == 9 && !memcmp(b, "10.0.2.15", 9));
}

/* ---- parser ---------------------------------------------------------------- */

static int parse(const char *s, struct kv_req *r)
{
	return kv_parse(s, strlen(s), r);
}

static void test_parser(void)
{
	struct kv_req r;
	char big[400];

	CHECK(parse("PUT a1 k v", &r) == 0 && r.op == KV_OP_PUT && r.id_len == 2 &&
	      !memcmp(r.id, "a1", 2) && r.key_len == 1 && r.val_len == 1 && r.val[0] == 'v');
	CHECK(parse("GET a2 k\n", &r) == 0 && r.op == KV_OP_GET && r.key_len == 1);
	CHECK(parse("INCR a3 ctr\r\n", &r) == 0 && r.op == KV_OP_INCR && r.key_len == 3);
	CHECK(parse("PUT  a1   k   v ", &r) == 0 && r.op == KV_OP_PUT && r.val_len == 1);
	CHECK(parse("", &r) == -1 && !strcmp(r.err, "bad-request"));
	CHECK(parse("\n", &r) == -1);
	CHECK(parse("put a k v", &r) == -1);
	CHECK(parse("PUT a k", &r) == -1 && !strcmp(r.err, "bad-request"));
	CHECK(parse("PUT a k v w", &r) == -1);
	CHECK(parse("GET a k v", &r) == -1);
	CHECK(parse("INCR a", &r) == -1);
	CHECK(parse("DEL a k", &r) == -1);
	CHECK(parse("PUT a k\tv", &r) == -1);
	CHECK(kv_parse("PUT a k \x80", 9, &r) == -1);
	CHECK(kv_parse("PUT a k v\0", 10, &r) == -1);
	CHECK(parse("PUT a k v\n\n", &r) == -1);
	/* limits: id 32, key 64, value 64 */
	memset(big, 0, sizeof(big));
	memcpy(big, "PUT ", 4);
	memset(big + 4, 'i', 32);
	big[36] = ' ';
	memset(big + 37, 'k', 64);
	big[101] = ' ';
	memset(big + 102, 'v', 64);
	CHECK(strlen(big) == 166);
	CHECK(parse(big, &r) == 0 && r.id_len == 32 && r.key_len == 64 && r.val_len == 64);
	strcat(big, "\r\n");
	CHECK(parse(big, &r) == 0 && r.val_len == 64);
	big[166] = 'v';
	big[167] = 0;
	CHECK(parse(big, &r) == -1 && !strcmp(r.err, "too-long"));
	CHECK(parse("PUT iiiiiiiiiiiiiiiiiiiiiiiiiiiiiiiii k v", &r) == -1 &&
	      !strcmp(r.err, "too-long"));
	memset(big, 'x', sizeof(big));
	CHECK(kv_parse(big, sizeof(big), &r) == -1 && !strcmp(r.err, "too-long"));
	CHECK(kv_parse(big, 1472, &r) == -1 && !strcmp(r.err, "too-long"));
}

/* ---- store and id table ---------------------------------------------------------- */

static struct kvstore store;

static void test_store(void)
{
	char k[16], v[16];
	int i, ok = 1;
	const struct kv_entry *e;
	const struct kv_id *d;
	size_t n;

	kvs_init(&store);
	CHECK(kvs_get(&store, "a", 1) == 0);
	CHECK(kvs_set(&store, "a", 1, "1", 1) == 0);
	CHECK(kvs_set(&store, "a", 1, "22", 2) == 0);
	e = kvs_get(&store, "a", 1);
	CHECK(e && e->val_len == 2 && !memcmp(e->val, "22", 2) && store.nkeys == 1);
	for (i = 1; i < KV_MAX_KEYS; i++) {
		n = (size_t)snprintf(k, sizeof(k), "key%d", i);
		ok &= kvs_set(&store, k, n, k, n) == 0;
	}
	CHECK(ok);
	CHECK(store.nkeys == KV_MAX_KEYS);
	CHECK(kvs_set(&store, "one-more", 8, "x", 1) == -1);
	CHECK(kvs_set(&store, "key77", 5, "y", 1) == 0);      /* updates still fine */
	for (i = 1, ok = 1; i < KV_MAX_KEYS; i++) {
		n = (size_t)snprintf(k, sizeof(k), "key%d", i);
		e = kvs_get(&store, k, n);
		ok &= e != 0 && (i == 77 ? e->val[0] == 'y' : (e->val_len == n && !memcmp(e->val, k, n)));
	}
	CHECK(ok);

	/* id table: FIFO of KV_ID_SLOTS, exact membership after many evictions */
	kvs_init(&store);
	for (i = 0; i < 3 * KV_ID_SLOTS + 77; i++) {
		n = (size_t)snprintf(k, sizeof(k), "id%d", i);
		snprintf(v, sizeof(v), "%d", i);
		kvs_id_add(&store, k, n, i % 2 ? KV_OP_INCR : KV_OP_PUT, v, strlen(v));
	}
	for (i = 0, ok = 1; i < 3 * KV_ID_SLOTS + 77; i++) {
		int want = i >= 2 * KV_ID_SLOTS + 77;

		n = (size_t)snprintf(k, sizeof(k), "id%d", i);
		d = kvs_id_find(&store, k, n);
		ok &= (d != 0) == want;
		if (d) {
			snprintf(v, sizeof(v), "%d", i);
			ok &= d->val_len == strlen(v) && !memcmp(d->val, v, d->val_len);
		}
	}
	CHECK(ok);
	{
		char b[KV_REPLY_MAX];

		d = kvs_id_find(&store, "id6220", 6);
		CHECK(d && kvs_id_reply(d, b) == 9 && !memcmp(b, "OK id6220", 9));
		d = kvs_id_find(&store, "id6219", 6);
		n = d ? kvs_id_reply(d, b) : 0;
		CHECK(n == 15 && !memcmp(b, "VAL id6219 6219", 15));
		/* GET replies live in their own table: they never evict update ids */
		for (i = 0; i < 3 * KV_ID_SLOTS; i++) {
			n = (size_t)snprintf(k, sizeof(k), "g%d", i);
			kvs_read_add(&store, k, n, i % 2 ? "x" : 0, 1);
		}
		d = kvs_id_find(&store, "id6219", 6);
		CHECK(d && d->op == KV_OP_INCR);
		d = kvs_id_find(&store, "id4173", 6);
		CHECK(d && d->op == KV_OP_INCR);
		d = kvs_id_find(&store, "g6143", 5);
		CHECK(d && kvs_id_reply(d, b) == 11 && !memcmp(b, "VAL g6143 x", 11));
		d = kvs_id_find(&store, "g6142", 5);
		CHECK(d && kvs_id_reply(d, b) == 10 && !memcmp(b, "NONE g6142", 10));
		CHECK(kvs_id_find(&store, "g4095", 5) == 0);
		CHECK(kvs_id_find(&store, "g4096", 5) != 0);
	}
}

/* ---- net stack ---------------------------------------------------------------------- */

static uint8_t txf[64][2048];
static size_t txlen[64];
static int ntx;
static struct {
	int n;
	uint16_t port;
	struct udp_peer from;
	char data[2048];
	size_t len;
} udp_got;

static uint8_t *t_alloc(void *ctx)
{
	return txf[ntx % 64];
}

static void t_send(void *ctx, uint8_t *buf, size_t len)
{
	txlen[ntx % 64] = len;
	ntx++;
}

static void t_udp(void *ctx, uint16_t port, const struct udp_peer *from, const uint8_t *d,
		  size_t len)
{
	udp_got.n++;
	udp_got.port = port;
	udp_got.from = *from;
	memcpy(udp_got.data, d, len);
	udp_got.len = len;
}

static const uint8_t guest_mac[6] = {0x52, 0x54, 0x00, 0x00, 0x00, 0x50};
static const uint8_t peer_mac[6] = {0x52, 0x54, 0x00, 0x12, 0x35, 0x02};

static void nif_setup(struct netif *n)
{
	memset(n, 0, sizeof(*n));
	memcpy(n->mac, guest_mac, 6);
	n->ip = htonl(0x0a00020f);      /* 10.0.2.15 */
	n->netmask = htonl(0xffffff00);
	n->tx_alloc = t_alloc;
	n->tx_send = t_send;
	n->udp_rx = t_udp;
}

/* A UDP/IPv4 frame from the peer (10.0.2.2:40000) to dst_ip:port. */
static size_t mk_udp(uint8_t *f, uint32_t dst_ip, uint16_t port, const char *payload,
		     int good_csum)
{
	struct netif peer;
	struct udp_peer to;
	uint8_t *saved;
	size_t len;

	nif_setup(&peer);
	memcpy(peer.mac, peer_mac, 6);
	peer.ip = htonl(0x0a000202);
	memcpy(to.mac, guest_mac, 6);
	to.ip = dst_ip;
	to.port = port;
	ntx = 0;
	net_udp_send(&peer, &to, 40000, payload, strlen(payload));
	saved = txf[0];
	len = txlen[0];
	memcpy(f, saved, len);
	if (!good_csum)
		f[ETH_HLEN + IP_HLEN + 6] ^= 0x55;
	return len;
}

static int ip_csum_ok(const uint8_t *ip)
{
	return inet_fold(inet_sum(ip, 20, 0)) == 0xffff;
}

static void test_net(void)
{
	struct netif nif;
	uint8_t f[2048];
	size_t len;
	uint32_t ip;

	nif_setup(&nif);

	/* gratuitous ARP */
	ntx = 0;
	net_send_garp(&nif);
	CHECK(ntx == 1 && txlen[0] == 60);
	CHECK(!memcmp(txf[0], "\xff\xff\xff\xff\xff\xff", 6) && !memcmp(txf[0] + 6, guest_mac, 6));
	CHECK(get_be16(txf[0] + 12) == ETH_P_ARP && get_be16(txf[0] + 20) == 1);
	CHECK(!memcmp(txf[0] + 28, &nif.ip, 4) && !memcmp(txf[0] + 38, &nif.ip, 4));

	/* ARP request for us -> reply; for someone else -> nothing */
	memset(f, 0, 60);
	memset(f, 0xff, 6);
	memcpy(f + 6, peer_mac, 6);
	put_be16(f + 12, ETH_P_ARP);
	put_be16(f + 14, 1);
	put_be16(f + 16, ETH_P_IP);
	f[18] = 6;
	f[19] = 4;
	put_be16(f + 20, 1);
	memcpy(f + 22, peer_mac, 6);
	ip = htonl(0x0a000202);
	memcpy(f + 28, &ip, 4);
	memcpy(f + 38, &nif.ip, 4);
	ntx = 0;
	net_input(&nif, f, 60);
	CHECK(ntx == 1 && nif.st.arp_replies == 1);
	CHECK(!memcmp(txf[0], peer_mac, 6) && get_be16(txf[0] + 20) == 2);
	CHECK(!memcmp(txf[0] + 22, guest_mac, 6) && !memcmp(txf[0] + 28, &nif.ip, 4));
	CHECK(!memcmp(txf[0] + 32, peer_mac, 6) && !memcmp(txf[0] + 38, &ip, 4));
	ip = htonl(0x0a000209);
	memcpy(f + 38, &ip, 4);
	ntx = 0;
	net_input(&nif, f, 60);
	CHECK(ntx == 0);
	net_input(&nif, f, 30);         /* truncated ARP: dropped, no crash */
	CHECK(ntx == 0);

	/* ICMP echo */
	{
		static const uint8_t payload[] = "kemari-ping-0123456789";
		uint8_t *ipf = f + ETH_HLEN, *ic = ipf + IP_HLEN;
		size_t ilen = 8 + sizeof(payload);

		memset(f, 0, sizeof(f));
		memcpy(f, guest_mac, 6);
		memcpy(f + 6, peer_mac, 6);
		put_be16(f + 12, ETH_P_IP);
		ipf[0] = 0x45;
		put_be16(ipf + 2, (uint16_t)(IP_HLEN + ilen));
		ipf[8] = 64;
		ipf[9] = 1;
		ip = htonl(0x0a000202);
		memcpy(ipf + 12, &ip, 4);
		memcpy(ipf + 16, &nif.ip, 4);
		put_be16(ipf + 10, (uint16_t)~inet_fold(inet_sum(ipf, IP_HLEN, 0)));
		ic[0] = 8;
		put_be16(ic + 4, 0x1234);
		put_be16(ic + 6, 7);
		memcpy(ic + 8, payload, sizeof(payload));
		put_be16(ic + 2, (uint16_t)~inet_fold(inet_sum(ic, ilen, 0)));
		len = ETH_HLEN + IP_HLEN + ilen;
		ntx = 0;
		net_input(&nif, f, len);
		CHECK(ntx == 1 && nif.st.icmp_replies == 1);
		CHECK(txlen[0] == len && !memcmp(txf[0], peer_mac, 6));
		CHECK(ip_csum_ok(txf[0] + ETH_HLEN));
		CHECK(txf[0][ETH_HLEN + IP_HLEN] == 0);
		CHECK(inet_fold(inet_sum(txf[0] + ETH_HLEN + IP_HLEN, ilen, 0)) == 0xffff);
		CHECK(!memcmp(txf[0] + ETH_HLEN + IP_HLEN + 4, ic + 4, ilen - 4));
		CHECK(!memcmp(txf[0] + ETH_HLEN + 16, &ip, 4));
		ic[9] ^= 1;                 /* bad ICMP checksum: no reply */
		ntx = 0;
		net_input(&nif, f, len);
		CHECK(ntx == 0);
		ic[9] ^= 1;
		ipf[10] ^= 1;               /* bad IP checksum: dropped */
		net_input(&nif, f, len);
		CHECK(ntx == 0 && nif.st.rx_bad_csum == 2);
	}

	/* UDP */
	memset(&udp_got, 0, sizeof(udp_got));
	len = mk_udp(f, nif.ip, 7000, "GET a k", 1);
	CHECK(ip_csum_ok(f + ETH_HLEN));
	net_input(&nif, f, len);
	CHECK(udp_got.n == 1 && udp_got.port == 7000 && udp_got.len == 7 &&
	      !memcmp(udp_got.data, "GET a k", 7));
	CHECK(udp_got.from.port == 40000 && udp_got.from.ip == htonl(0x0a000202) &&
	      !memcmp(udp_got.from.mac, peer_mac, 6));
	len = mk_udp(f, nif.ip, 7000, "GET a k", 0);     /* corrupted checksum */
	net_input(&nif, f, len);
	CHECK(udp_got.n == 1);
	len = mk_udp(f, nif.ip, 7000, "GET a k", 1);     /* checksum 0 = none: accepted */
	put_be16(f + ETH_HLEN + IP_HLEN + 6, 0);
	net_input(&nif, f, len);
	CHECK(udp_got.n == 2);
	len = mk_udp(f, htonl(0x0a000209), 7000, "x", 1);    /* not our address */
	net_input(&nif, f, len);
	CHECK(udp_got.n == 2);
	len = mk_udp(f, htonl(0x0a0002ff), 7000, "bcast", 1); /* subnet broadcast */
	memset(f, 0xff, 6);
	net_input(&nif, f, len);
	CHECK(udp_got.n == 3);
	len = mk_udp(f, nif.ip, 7000, "frag", 1);
	put_be16(f + ETH_HLEN + 6, 0x2000);                  /* MF */
	put_be16(f + ETH_HLEN + 10, 0);
	put_be16(f + ETH_HLEN + 10, (uint16_t)~inet_fold(inet_sum(f + ETH_HLEN, 20, 0)));
	net_input(&nif, f, len);
	CHECK(udp_got.n == 3 && nif.st.rx_frags == 1);
	len = mk_udp(f, nif.ip, 7000, "frag", 1);
	f[ETH_HLEN] = 0x46;                                  /* IP options */
	net_input(&nif, f, len);
	CHECK(udp_got.n == 3);
	len = mk_udp(f, nif.ip, 7000, "short", 1);
	net_input(&nif, f, ETH_HLEN + 24);                   /* truncated */
	CHECK(udp_got.n == 3);
	len = mk_udp(f, nif.ip, 7000, "mac", 1);
	f[0] ^= 2;                                           /* not our MAC */
	net_input(&nif, f, len);
	CHECK(udp_got.n == 3);

	/* what we send: valid IP and UDP checksums, right addresses */
	{
		struct udp_peer to;
		uint8_t *u;
		uint32_t sum;
		uint16_t ulen;

		memcpy(to.mac, peer_mac, 6);
		to.ip = htonl(0x0a000202);
		to.port = 40000;
		ntx = 0;
		CHECK(net_udp_send(&nif, &to, 7000, "OK a1", 5) == 0);
		CHECK(ntx == 1 && txlen[0] == 60);
		CHECK(ip_csum_ok(txf[0] + ETH_HLEN));
		u = txf[0] + ETH_HLEN + IP_HLEN;
		ulen = get_be16(u + 4);
		CHECK(ulen == 13 && get_be16(u) == 7000 && get_be16(u + 2) == 40000);
		sum = inet_sum(txf[0] + ETH_HLEN + 12, 8, 0) + 17 + ulen;
		CHECK(get_be16(u + 6) != 0 && inet_fold(inet_sum(u, ulen, sum)) == 0xffff);
		CHECK(!memcmp(u + 8, "OK a1", 5));
		CHECK(net_udp_send(&nif, &to, 7000, f, UDP_MAX_PAYLOAD + 1) == -1);
	}
}

/* ---- memory disk with fault injection ------------------------------------------------ */

#define DISK_MAX (32768)

struct mdisk {
	uint8_t *data;
	uint64_t sectors;
	long writes;            /* successful-or-not write calls so far */
	long crash_at;          /* write number that tears; later ones fail (-1 = never) */
	int dead;
	int fail_next;          /* >0: next write returns this status (negated), nothing written */
	int sb_fail_persist;    /* next superblock write is stored but reports EIO */
};

static int mdisk_rw(void *ctx, int write, uint64_t sector, void *buf, uint32_t nsec)
{
	struct mdisk *d = ctx;

	if (sector + nsec > d->sectors)
		return KEMARI_STATUS_EINVAL;
	if (!write) {
		memcpy(buf, d->data + sector * 512, (size_t)nsec * 512);
		return 0;
	}
	if (d->dead)
		return KEMARI_STATUS_EIO;
	d->writes++;
	if (d->fail_next) {
		int st = -d->fail_next;

		d->fail_next = 0;
		return st;
	}
	if (d->sb_fail_persist && sector < 2 && nsec == 1) {
		d->sb_fail_persist = 0;
		memcpy(d->data + sector * 512, buf, 512);
		return KEMARI_STATUS_EIO;
	}
	if (d->crash_at >= 0 && d->writes - 1 == d->crash_at) {
		/* power loss during this write: each sector old, new, or torn */
		uint32_t i;

		for (i = 0; i < nsec; i++) {
			uint8_t *dst = d->data + (sector + i) * 512;
			const uint8_t *src = (const uint8_t *)buf + (size_t)i * 512;

			switch (rnd() % 3) {
			case 0:
				break;
			case 1:
				memcpy(dst, src, 512);
				break;
			default:
				memcpy(dst, src, 64 * (1 + rnd() % 7));
			}
		}
		d->dead = 1;
		return KEMARI_STATUS_EIO;
	}
	memcpy(d->data + sector * 512, buf, (size_t)nsec * 512);
	return 0;
}

static struct mdisk disk;
static struct kv_server kv;
static char last_reply[256];
static int nreplies;

static char replies[64][256];

static void cap_send(void *ctx, const struct udp_peer *to, const char *msg, size_t len)
{
	memcpy(last_reply, msg, len);
	last_reply[len] = 0;
	memcpy(replies[nreplies % 64], last_reply, len + 1);
	nreplies++;
}

static void disk_new(uint64_t sectors)
{
	free(disk.data);
	memset(&disk, 0, sizeof(disk));
	disk.data = calloc(sectors, 512);
	disk.sectors = sectors;
	disk.crash_at = -1;
}

static int boot(void)
{
	struct kvlog_dev dev = {&disk, mdisk_rw};

	disk.dead = 0;
	disk.crash_at = -1;
	kv_init(&kv, 0, cap_send);
	return kv_open_disk(&kv, &dev, disk.sectors, rnd());
}

/* Send one request and commit; returns the (last) reply. */
static const char *req(const char *s)
{
	struct udp_peer from = {{0}, 40000, 0};

	last_reply[0] = 0;
	kv_request(&kv, &from, s, strlen(s));
	kv_commit(&kv);
	return last_reply;
}

static void test_kv_basic(void)
{
	struct udp_peer from = {{0}, 1, 0};
	int i;

	disk_new(32768);
	CHECK(boot() == 0 && kv.log.formatted);
	CHECK(!strcmp(req("GET g1 k"), "NONE g1"));
	CHECK(!strcmp(req("PUT p1 k v1"), "OK p1"));
	CHECK(!strcmp(req("GET g2 k"), "VAL g2 v1"));
	CHECK(!strcmp(req("INCR i1 c"), "VAL i1 1"));
	CHECK(!strcmp(req("INCR i2 c"), "VAL i2 2"));
	CHECK(!strcmp(req("INCR i2 c"), "VAL i2 2"));           /* retried: not re-executed */
	CHECK(!strcmp(req("INCR i3 c\n"), "VAL i3 3"));
	CHECK(!strcmp(req("PUT p1 k other"), "OK p1"));         /* retried id wins */
	CHECK(!strcmp(req("GET g3 k"), "VAL g3 v1"));
	CHECK(!strcmp(req("INCR i4 k"), "ERR not-a-number"));
	CHECK(!strcmp(req("PUT p2 n 18446744073709551614"), "OK p2"));
	CHECK(!strcmp(req("INCR i5 n"), "VAL i5 18446744073709551615"));
	CHECK(!strcmp(req("INCR i6 n"), "ERR overflow"));
	CHECK(!strcmp(req("PUT p3 z 007"), "OK p3"));
	CHECK(!strcmp(req("INCR i7 z"), "VAL i7 8"));
	CHECK(!strcmp(req("bogus"), "ERR bad-request"));
	/* a retried GET id gets the remembered reply, even after a change */
	CHECK(!strcmp(req("GET rg1 k"), "VAL rg1 v1"));
	CHECK(!strcmp(req("GET rg2 nokey"), "NONE rg2"));
	CHECK(!strcmp(req("PUT rp1 k v2"), "OK rp1"));
	CHECK(!strcmp(req("PUT rp2 nokey v3"), "OK rp2"));
	CHECK(!strcmp(req("GET rg1 k"), "VAL rg1 v1"));
	CHECK(!strcmp(req("GET rg2 nokey"), "NONE rg2"));
	CHECK(!strcmp(req("GET rg3 k"), "VAL rg3 v2"));
	CHECK(!strcmp(req("PUT rp3 k v1"), "OK rp3"));
	CHECK(!strcmp(req("GET g4"), "ERR bad-request"));
	CHECK(kv.st.dup_hits == 4);

	/* group commit: several updates queued, one append, replies after */
	{
		uint64_t appends = kv.log.appends;

		nreplies = 0;
		kv_request(&kv, &from, "INCR b1 c", 9);
		kv_request(&kv, &from, "INCR b2 c", 9);
		kv_request(&kv, &from, "PUT b3 q 1", 10);
		kv_request(&kv, &from, "INCR b4 q", 9);
		CHECK(nreplies == 0 && kv.npend == 4);
		kv_commit(&kv);
		CHECK(nreplies == 4 && kv.log.appends == appends + 1);
		CHECK(!strcmp(last_reply, "VAL b4 2"));
		CHECK(!strcmp(req("GET g5 c"), "VAL g5 5"));
		/* a GET of a queued key commits first; so does a retried queued id */
		nreplies = 0;
		kv_request(&kv, &from, "PUT b5 q x", 10);
		kv_request(&kv, &from, "GET b6 q", 8);
		CHECK(nreplies == 2 && !strcmp(last_reply, "VAL b6 x") && kv.npend == 0);
		kv_request(&kv, &from, "INCR b7 c", 9);
		kv_request(&kv, &from, "INCR b7 c", 9);
		CHECK(!strcmp(last_reply, "VAL b7 6") && kv.npend == 0);
	}

	/* restart: state and recent ids come back from the disk alone */
	CHECK(boot() == 0 && !kv.log.formatted);
	CHECK(!strcmp(req("GET g6 c"), "VAL g6 6"));
	CHECK(!strcmp(req("INCR i3 c"), "VAL i3 3"));           /* retried after restart */
	CHECK(!strcmp(req("GET g7 c"), "VAL g7 6"));
	CHECK(!strcmp(req("GET g8 k"), "VAL g8 v1"));
	CHECK(!strcmp(req("GET g9 z"), "VAL g9 8"));
	CHECK(!strcmp(req("INCR i8 c"), "VAL i8 7"));

	/* disk full: nothing changes; then it works again */
	disk.fail_next = 2;                                     /* ENOSPC */
	CHECK(!strcmp(req("INCR i9 c"), "ERR disk-full"));
	CHECK(!strcmp(req("GET g10 c"), "VAL g10 7"));
	CHECK(!strcmp(req("INCR i9 c"), "VAL i9 8"));           /* retry executes once */
	disk.fail_next = 1;                                     /* EIO */
	CHECK(!strcmp(req("PUT p4 k new"), "ERR disk"));
	CHECK(!strcmp(req("GET g11 k"), "VAL g11 v1"));
	CHECK(boot() == 0);
	CHECK(!strcmp(req("GET g12 c"), "VAL g12 8"));
	CHECK(!strcmp(req("GET g13 k"), "VAL g13 v1"));

	/* id table: the last KV_ID_SLOTS ids are remembered across restarts */
	for (i = 0; i < KV_ID_SLOTS + 100; i++) {
		char b[64];

		snprintf(b, sizeof(b), "INCR many%d m", i);
		req(b);
	}
	CHECK(!strcmp(req("GET g14 m"), "VAL g14 2148"));
	CHECK(boot() == 0);
	CHECK(!strcmp(req("INCR many100 m"), "VAL many100 101"));   /* oldest remembered */
	CHECK(!strcmp(req("INCR many2147 m"), "VAL many2147 2148"));
	CHECK(!strcmp(req("INCR many99 m"), "VAL many99 2149"));     /* evicted: executes */

	/* no disk: updates refused, reads fine */
	kv_init(&kv, 0, cap_send);
	CHECK(!strcmp(req("PUT x1 k v"), "ERR no-disk"));
	CHECK(!strcmp(req("INCR x2 k"), "ERR no-disk"));
	CHECK(!strcmp(req("GET x3 k"), "NONE x3"));
}

static void test_kvlog_encoding(void)
{
	struct kvrec r = {KVREC_PUT, KVREC_F_APPLY | KVREC_F_REMEMBER, 2, 1, 3, "id", "k", "val", 9};
	uint8_t b[256];
	uint32_t chain = 0x12345678, c2 = 0x12345678;
	size_t n = kvlog_encode(b, &r, &chain);

	CHECK(n == KVLOG_REC_HDR + 6 + 4 && kvlog_rec_len(&r) == n);
	CHECK(get_le32(b) == KVLOG_REC_MAGIC && get_le16(b + 4) == n && b[6] == 1 && b[7] == 3);
	CHECK(get_le64(b + 8) == 9 && b[16] == 2 && b[17] == 1 && b[18] == 3 && b[19] == 0);
	CHECK(!memcmp(b + 20, "idkval", 6));
	{
		uint8_t pre[4];

		put_le32(pre, c2);
		CHECK(get_le32(b + n - 4) == crc32c(crc32c(0, pre, 4), b, n - 4) && chain == get_le32(b + n - 4));
	}
	c2 = 0;
	kvlog_encode(b + 128, &r, &c2);
	CHECK(c2 != chain);                                     /* the chain matters */
}

/* Superblock and on-disk layout facts the format doc states. */
static void test_kvlog_layout(void)
{
	disk_new(1000);
	CHECK(boot() == 0);
	CHECK(get_le32(disk.data + 512) == KVLOG_SB_MAGIC && get_le64(disk.data + 512 + 8) == 1);
	CHECK(get_le32(disk.data) == 0);
	CHECK(kv.log.half0 == 2 && kv.log.half_sectors == 499);
	CHECK(!strcmp(req("PUT a k v"), "OK a"));
	/* first record of the half is the boot MARK, then the PUT */
	CHECK(get_le32(disk.data + 2 * 512) == KVLOG_REC_MAGIC && disk.data[2 * 512 + 6] == KVREC_MARK);
	CHECK(get_le64(disk.data + 2 * 512 + 8) == 1);
	{
		size_t off = 2 * 512 + get_le16(disk.data + 2 * 512 + 4);

		CHECK(get_le32(disk.data + off) == KVLOG_REC_MAGIC && disk.data[off + 6] == KVREC_PUT);
		CHECK(get_le64(disk.data + off + 8) == 2);
	}
	/* a disk too small for the log: updates refused */
	disk_new(20);
	CHECK(boot() == KVLOG_EFORMAT);
	CHECK(!strcmp(req("PUT a k v"), "ERR no-disk"));
}

static void test_compaction(void)
{
	char b[128];
	int i, ok = 1;
	uint64_t gen;

	disk_new(2 + 2 * 40);                       /* two 40-sector halves */
	CHECK(boot() == 0);
	for (i = 0; i < 600; i++) {
		snprintf(b, sizeof(b), "PUT c%d key%d value-%d", i, i % 7, i);
		ok &= !strncmp(req(b), "OK ", 3);
	}
	CHECK(ok);
	CHECK(kv.log.compactions >= 5);
	gen = kv.log.gen;
	CHECK(gen == 1 + kv.log.compactions);
	CHECK(boot() == 0 && kv.log.gen == gen);
	for (i = 593, ok = 1; i < 600; i++) {
		char want[64];

		snprintf(b, sizeof(b), "GET r%d key%d", i, i % 7);
		snprintf(want, sizeof(want), "VAL r%d value-%d", i, i);
		ok &= !strcmp(req(b), want);
	}
	CHECK(ok);
	CHECK(!strcmp(req("PUT c599 key4 zzz"), "OK c599"));    /* id survived compaction */
	CHECK(!strcmp(req("GET r key4"), "VAL r value-599"));   /* ... and was not re-executed */
	CHECK(!strcmp(req("GET r2 key3"), "VAL r2 value-598"));

	/* the superblock switch fails but was stored: the retry is idempotent */
	for (i = 0, ok = 1; i < 200 && kv.log.compactions == 0; i++) {
		snprintf(b, sizeof(b), "PUT d%d key%d v%d", i, i % 7, i);
		ok &= !strncmp(req(b), "OK ", 3);
	}
	gen = kv.log.gen;
	disk.sb_fail_persist = 1;
	for (i = 0; i < 200 && disk.sb_fail_persist; i++) {
		snprintf(b, sizeof(b), "PUT e%d key%d w%d", i, i % 7, i);
		req(b);
	}
	CHECK(!disk.sb_fail_persist && !strcmp(last_reply, "ERR disk") && kv.log.need_compact);
	{
		char want[32];

		snprintf(want, sizeof(want), "OK e%d", i - 1);
		CHECK(!strcmp(req(b), want));           /* the retry succeeds */
	}
	CHECK(kv.log.gen == gen + 1 && !kv.log.need_compact);
	snprintf(b, sizeof(b), "GET x key%d", (i - 1) % 7);
	{
		char want[64];

		snprintf(want, sizeof(want), "VAL x w%d", i - 1);
		CHECK(!strcmp(req(b), want));
		CHECK(boot() == 0);
		CHECK(!strcmp(req(b), want));
	}

	/* too much live state for a half: ERR disk-full, nothing lost */
	disk_new(2 + 2 * 16);
	CHECK(boot() == 0);
	for (i = 0, ok = 1; i < 400; i++) {
		snprintf(b, sizeof(b), "PUT f%d key-%d-%s %s", i, i,
			 "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "yyyyyyyyyyyyyyyyyyyyyyyyyyyyy");
		if (strncmp(req(b), "OK ", 3))
			break;
	}
	CHECK(i < 400 && !strcmp(last_reply, "ERR disk-full"));
	{
		int full_at = i;

		CHECK(kv.store.nkeys == (uint32_t)full_at);
		CHECK(boot() == 0 && kv.store.nkeys == (uint32_t)full_at);
	}
}

/* The superblock switch reports an error but reached the disk; the redo of
 * the compaction then loses power half-way through rewriting the snapshot
 * that is already in force. Nothing acknowledged may be lost. */
static void test_compaction_redo_torn(void)
{
	int trial, ok = 1, triggered = 0;

	for (trial = 0; trial < 30; trial++) {
		char acked[7][32], b[128], want[64];
		static char was_acked[1000];
		int i, k;

		memset(acked, 0, sizeof(acked));
		memset(was_acked, 0, sizeof(was_acked));
		disk_new(2 + 2 * 40);
		CHECK(boot() == 0);
		for (i = 0; i < 60 + (trial % 40) * 7; i++) {      /* some compactions already */
			snprintf(b, sizeof(b), "PUT w%d key%d val%d", i, i % 7, i);
			if (!strncmp(req(b), "OK ", 3)) {
				snprintf(acked[i % 7], sizeof(acked[0]), "val%d", i);
				was_acked[i] = 1;
			}
		}
		disk.sb_fail_persist = 1;
		for (; i < 1000 && disk.sb_fail_persist; i++) {
			snprintf(b, sizeof(b), "PUT w%d key%d val%d", i, i % 7, i);
			if (!strncmp(req(b), "OK ", 3)) {
				snprintf(acked[i % 7], sizeof(acked[0]), "val%d", i);
				was_acked[i] = 1;
			}
		}
		triggered += !disk.sb_fail_persist && kv.log.need_compact;
		disk.crash_at = disk.writes;            /* the redo's first write tears */
		req(b);
		CHECK(boot() == 0);
		/* retried ids (all still remembered) must not execute again */
		for (k = 0; k < i; k++) {
			if (!was_acked[k])
				continue;
			snprintf(b, sizeof(b), "PUT w%d key%d changed", k, k % 7);
			snprintf(want, sizeof(want), "OK w%d", k);
			ok &= !strcmp(req(b), want);
		}
		for (k = 0; k < 7; k++) {
			snprintf(b, sizeof(b), "GET g%d-%d key%d", trial, k, k);
			snprintf(want, sizeof(want), "VAL g%d-%d %s", trial, k, acked[k]);
			ok &= !acked[k][0] || !strcmp(req(b), want);
		}
	}
	CHECK(ok);
	CHECK(triggered == 30);

	/* the redo rewrites exactly the bytes of the snapshot already in force */
	{
		char b[128];
		uint8_t *snap1;
		uint64_t base, nsec;
		int i;

		disk_new(2 + 2 * 40);
		CHECK(boot() == 0);
		disk.sb_fail_persist = 1;
		for (i = 0; i < 1000 && disk.sb_fail_persist; i++) {
			snprintf(b, sizeof(b), "INCR x%d key%d", i, i % 5);
			req(b);
		}
		CHECK(kv.log.need_compact && !strcmp(last_reply, "ERR disk"));
		base = kv.log.half0 + (uint64_t)!kv.log.active * kv.log.half_sectors;
		nsec = kv.log.snap_pos;
		snap1 = malloc(nsec * 512);
		memcpy(snap1, disk.data + base * 512, nsec * 512);
		CHECK(nsec > 0 && !strncmp(req(b), "VAL ", 4) && !kv.log.need_compact);
		CHECK(kv.log.half0 + (uint64_t)kv.log.active * kv.log.half_sectors == base);
		CHECK(!memcmp(snap1, disk.data + base * 512, nsec * 512));
		free(snap1);
	}
}

/* A batch whose middle sector tears must neither replay its later sectors
 * nor let them reappear once new records are appended at the same place. */
static void test_torn_tail(void)
{
	struct udp_peer from = {{0}, 1, 0};
	char b[128];
	int i;
	uint64_t wpos, base;

	disk_new(4096);
	CHECK(boot() == 0);
	CHECK(!strcmp(req("PUT t0 k base"), "OK t0"));
	wpos = kv.log.wpos;
	base = kv.log.half0;
	for (i = 0; i < 20; i++) {          /* ~3 sectors in one batch */
		snprintf(b, sizeof(b), "PUT tt%d k%d %064d", i, i, i);
		kv_request(&kv, &from, b, strlen(b));
	}
	kv_commit(&kv);
	CHECK(kv.log.wpos >= wpos + 3);
	/* tear: first sector of that batch garbage, the rest intact */
	memset(disk.data + (base + wpos) * 512 + 100, 0xa5, 50);
	CHECK(boot() == 0);
	CHECK(!strcmp(req("GET g1 k0"), "NONE g1") && !strcmp(req("GET g2 k5"), "NONE g2"));
	CHECK(!strcmp(req("GET g3 k"), "VAL g3 base") && kv.log.wpos == wpos);
	CHECK(!strcmp(req("PUT tt0 k0 again"), "OK tt0"));      /* same place, new chain */
	CHECK(boot() == 0);
	CHECK(!strcmp(req("GET g4 k0"), "VAL g4 again"));
	CHECK(!strcmp(req("GET g5 k5"), "NONE g5"));             /* stale sector not revived */
	CHECK(!strcmp(req("PUT tt5 k5 x"), "OK tt5"));
}

/* Random workload with power loss at random writes: every acknowledged
 * update survives, INCR never hands out a value twice, and counters never
 * go below an acknowledged value. */
static void test_crash_model(void)
{
	enum { NK = 5, ROUNDS = 400, MAXREQ = 40000 };
	static int acked_put[NK];               /* request number of the last acked PUT */
	static uint64_t acked_ctr[NK];          /* highest acknowledged INCR value */
	static uint64_t attempted_ctr[NK];
	static unsigned char seen[NK][MAXREQ];
	static signed char req_key[MAXREQ];
	static char recent[64][64];             /* recently acknowledged INCR replies */
	int nrecent = 0, retried = 0;
	int round, ok = 1, reqno = 0, crashes = 0, acks = 0, i;

	memset(seen, 0, sizeof(seen));
	disk_new(2 + 2 * 200);                  /* small: compaction happens often */
	for (round = 0; round < ROUNDS; round++) {
		int k, step;

		CHECK(boot() == 0);
		/* recovered state vs the model */
		for (k = 0; k < NK; k++) {
			char q[64];
			const char *r, *val;
			uint64_t v;

			snprintf(q, sizeof(q), "GET qp%d-%d p%d", round, k, k);
			r = req(q);
			val = strchr(r + 4, ' ');
			if (acked_put[k]) {
				/* the acked value, or one from a later unacknowledged PUT */
				ok &= !strncmp(r, "VAL ", 4) && val && val[1] == 'v' &&
				      atoi(val + 2) >= acked_put[k];
			}
			snprintf(q, sizeof(q), "GET qc%d-%d c%d", round, k, k);
			r = req(q);
			val = strchr(r + 4, ' ');
			if (acked_ctr[k]) {
				ok &= val && parse_u64(val + 1, strlen(val + 1), &v) == 0 &&
				      v >= acked_ctr[k] && v <= attempted_ctr[k];
			}
		}
		/* retried INCR ids are answered from the recovered table, unchanged */
		for (i = 0; i < 4 && nrecent; i++) {
			const char *want = recent[rnd() % (nrecent < 64 ? nrecent : 64)];
			char q[64];

			snprintf(q, sizeof(q), "INCR %.*s c%d", (int)(strchr(want + 4, ' ') - want - 4),
				 want + 4, req_key[atoi(want + 5)]);
			ok &= !strcmp(req(q), want);
			retried++;
		}
		disk.crash_at = disk.writes + (long)(rnd() % 40);
		for (step = 0; step < 80 && !disk.dead && reqno < MAXREQ - 8; step++) {
			struct udp_peer from = {{0}, 1, 0};
			char q[128];
			int n = 1 + (int)(rnd() % 4), j;

			nreplies = 0;
			for (j = 0; j < n; j++) {
				k = (int)(rnd() % NK);
				reqno++;
				req_key[reqno] = (signed char)k;
				if (rnd() % 2) {
					snprintf(q, sizeof(q), "PUT r%d p%d v%d", reqno, k, reqno);
				} else {
					snprintf(q, sizeof(q), "INCR r%d c%d", reqno, k);
					attempted_ctr[k]++;
				}
				kv_request(&kv, &from, q, strlen(q));
			}
			kv_commit(&kv);
			ok &= nreplies == n;
			for (j = 0; j < nreplies && j < 64; j++) {
				const char *r = replies[j];

				if (!strncmp(r, "OK r", 4)) {
					int id = atoi(r + 4);

					k = req_key[id];
					if (id > acked_put[k])
						acked_put[k] = id;
					acks++;
				} else if (!strncmp(r, "VAL r", 5)) {
					uint64_t v = strtoull(strchr(r + 4, ' ') + 1, 0, 10);

					k = req_key[atoi(r + 5)];
					ok &= v < MAXREQ && !seen[k][v];
					if (v < MAXREQ)
						seen[k][v] = 1;
					if (v > acked_ctr[k])
						acked_ctr[k] = v;
					strcpy(recent[nrecent++ % 64], r);
					acks++;
				} else {
					ok &= !strcmp(r, "ERR disk") || !strcmp(r, "ERR disk-full");
				}
			}
		}
		crashes += disk.dead;
	}
	CHECK(ok);
	CHECK(crashes > ROUNDS / 2);
	CHECK(acks > 500 && retried > ROUNDS);
	for (i = 0; i < NK; i++)
		CHECK(acked_ctr[i] > 0 && acked_put[i] > 0);
	printf("crash-model: %d rounds, %d power losses, %d requests, %d acked, gen %lu\n",
	       ROUNDS, crashes, reqno, acks, (unsigned long)kv.log.gen);
}

/* Random and mutated input: nothing crashes (ASan/UBSan watch), and every
 * datagram gets exactly one reply. */
static void test_fuzz(void)
{
	static const char *seeds[] = {"PUT a k v", "GET b k", "INCR c n", "PUT d k 12", "INCR e k"};
	struct udp_peer from = {{0}, 1, 0};
	struct netif nif;
	uint8_t f[2048];
	char d[400];
	int i, j, sent = 0, ok = 1;

	disk_new(4096);
	CHECK(boot() == 0);
	nreplies = 0;
	for (i = 0; i < 20000; i++) {
		size_t len;

		if (i % 2) {
			len = rnd() % sizeof(d);
			for (j = 0; j < (int)len; j++)
				d[j] = (char)(rnd() % 4 ? 0x20 + rnd() % 0x5f : rnd() % 256);
		} else {
			const char *sd = seeds[rnd() % 5];

			len = strlen(sd);
			memcpy(d, sd, len);
			for (j = 0; j < 3; j++) {
				size_t at = rnd() % (len + 1);

				if (rnd() % 2 && len < sizeof(d) - 1) {
					memmove(d + at + 1, d + at, len - at);
					d[at] = (char)(rnd() % 3 ? ' ' : 0x21 + rnd() % 0x5e);
					len++;
				} else if (at < len) {
					d[at] = (char)(rnd() % 256);
				}
			}
		}
		kv_request(&kv, &from, d, len);
		sent++;
		if (rnd() % 8 == 0)
			kv_commit(&kv);
	}
	kv_commit(&kv);
	CHECK(nreplies == sent);

	nif_setup(&nif);
	for (i = 0; i < 20000; i++) {
		size_t len = mk_udp(f, nif.ip, 7000, "GET a k", 1);

		if (i % 3 == 0) {
			len = rnd() % sizeof(f);
			for (j = 0; j < (int)len; j++)
				f[j] = (uint8_t)rnd();
			memcpy(f, guest_mac, 6);
			put_be16(f + 12, rnd() % 2 ? ETH_P_IP : ETH_P_ARP);
			if (len > ETH_HLEN)
				f[ETH_HLEN] = 0x45;
		} else {
			for (j = 0; j < 1 + (int)(rnd() % 4); j++)
				f[rnd() % len] ^= (uint8_t)(1 << (rnd() % 8));
			len = rnd() % 4 ? len : rnd() % (len + 1);
		}
		ntx = 0;
		net_input(&nif, f, len);
		ok &= ntx <= 1;
	}
	CHECK(ok);
}

int main(void)
{
	test_crc_fmt();
	test_parser();
	test_store();
	test_net();
	test_kvlog_encoding();
	test_kvlog_layout();
	test_kv_basic();
	test_compaction();
	test_compaction_redo_torn();
	test_torn_tail();
	test_crash_model();
	test_fuzz();
	printf("host-tests: checks=%lu failures=%lu\n", checks, failures);
	return failures ? 1 : 0;
}
