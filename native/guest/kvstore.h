/* kvstore.h - the in-memory key table and the recent-request-id table. */
#ifndef GUEST_KVSTORE_H
#define GUEST_KVSTORE_H

#include <stddef.h>
#include <stdint.h>
#include "kvproto.h"

#define KV_MAX_KEYS   4096           /* keys never leave (no DELETE verb) */
#define KV_ID_SLOTS   2048           /* recent ids remembered, FIFO eviction */

struct kv_entry {
	uint8_t key_len, val_len;
	char key[KV_KEY_MAX];
	char val[KV_VAL_MAX];
};

#define KV_REPLY_NONE 4                /* kv_id.op of a remembered "NONE <id>" */

struct kv_id {
	uint8_t id_len, op, val_len;   /* op: KV_OP_PUT, KV_OP_INCR, KV_OP_GET, KV_REPLY_NONE */
	char id[KV_ID_MAX];
	char val[KV_VAL_MAX];          /* INCR: the new counter; GET: the value read */
};

/* A FIFO of KV_ID_SLOTS remembered replies with a hash index. */
struct kv_idtab {
	uint64_t n;                    /* ids ever added; slot = n % KV_ID_SLOTS */
	struct kv_id ids[KV_ID_SLOTS];
	uint16_t hash[2 * KV_ID_SLOTS];        /* index + 1, 0 = empty */
};

struct kvstore {
	uint32_t nkeys;
	struct kv_entry keys[KV_MAX_KEYS];
	uint16_t khash[2 * KV_MAX_KEYS];       /* index + 1, 0 = empty */
	struct kv_idtab upd;           /* PUT/INCR replies: durable (log + snapshots) */
	struct kv_idtab reads;         /* GET replies: memory only, so reads never
					* push update ids out of the window */
};

void kvs_init(struct kvstore *s);
const struct kv_entry *kvs_get(const struct kvstore *s, const char *key, size_t klen);
int kvs_set(struct kvstore *s, const char *key, size_t klen, const char *val, size_t vlen); /* -1 full */
/* The remembered reply for an id (update ids first, then reads), or NULL. */
const struct kv_id *kvs_id_find(const struct kvstore *s, const char *id, size_t idlen);
/* Remember a PUT/INCR reply (val: INCR's counter). */
void kvs_id_add(struct kvstore *s, const char *id, size_t idlen, int op, const char *val,
		size_t vlen);
/* Remember a GET reply: VAL val, or NONE when val is NULL. */
void kvs_read_add(struct kvstore *s, const char *id, size_t idlen, const char *val, size_t vlen);
/* Format the reply remembered for an id ("OK id" / "VAL id v" / "NONE id"); returns length. */
size_t kvs_id_reply(const struct kv_id *e, char *out);

#endif
