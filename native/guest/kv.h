/* kv.h - the kv server: requests in, durable group commits, replies out.
 * Pure (no rings): the guest main loop and the host unit tests drive it. */
#ifndef GUEST_KV_H
#define GUEST_KV_H

#include <stddef.h>
#include <stdint.h>
#include "kvproto.h"
#include "kvstore.h"
#include "kvlog.h"
#include "net.h"

#define KV_PORT       7000
#define KV_BATCH_MAX  32              /* PUT/INCR per group commit */
#define KV_REPLY_MAX  (4 + KV_ID_MAX + 1 + KV_VAL_MAX)

struct kv_pending {
	struct udp_peer to;
	uint8_t op, id_len, key_len, val_len;
	char id[KV_ID_MAX], key[KV_KEY_MAX], val[KV_VAL_MAX];
};

struct kv_stats {
	uint64_t requests, replies, errors, commits, committed, disk_errors, dup_hits;
};

struct kv_server {
	/* written on every request: kept together, in front of the tables */
	int have_disk;
	int npend;
	void *ctx;
	void (*send)(void *ctx, const struct udp_peer *to, const char *msg, size_t len);
	struct kv_stats st;
	struct kvlog log;
	struct kv_pending pend[KV_BATCH_MAX];
	struct kvstore store;
};

void kv_init(struct kv_server *kv, void *ctx,
	     void (*send)(void *ctx, const struct udp_peer *to, const char *msg, size_t len));
/* Recover from disk (replay or format). Returns 0 or the kvlog error. */
int kv_open_disk(struct kv_server *kv, const struct kvlog_dev *dev, uint64_t sectors,
		 uint64_t nonce);
/* One datagram. Replies at once (GET, retried id, ERR) or queues a
 * PUT/INCR for the next kv_commit(). */
void kv_request(struct kv_server *kv, const struct udp_peer *from, const char *data, size_t len);
/* Write all queued PUT/INCR records in one durable append, then apply them
 * and reply (or reply "ERR disk" and change nothing). */
void kv_commit(struct kv_server *kv);

#endif
