/* kvstore.c - open-addressing hash tables over fixed arrays (no allocator). */
#include "kvstore.h"
#include "lib.h"

#define KMASK (2 * KV_MAX_KEYS - 1)
#define IMASK (2 * KV_ID_SLOTS - 1)

static uint32_t hash(const char *p, size_t n)
{
	uint32_t h = 2166136261u;

	while (n--) {
		h ^= (uint8_t)*p++;
		h *= 16777619u;
	}
	return h;
}

void kvs_init(struct kvstore *s)
{
	memset(s, 0, sizeof(*s));
}

static uint32_t key_slot(const struct kvstore *s, const char *key, size_t klen)
{
	uint32_t i = hash(key, klen) & KMASK;

	for (;; i = (i + 1) & KMASK) {
		uint16_t v = s->khash[i];

		if (!v)
			return i;
		if (s->keys[v - 1].key_len == klen && !memcmp(s->keys[v - 1].key, key, klen))
			return i;
	}
}

const struct kv_entry *kvs_get(const struct kvstore *s, const char *key, size_t klen)
{
	uint16_t v = s->khash[key_slot(s, key, klen)];

	return v ? &s->keys[v - 1] : 0;
}

int kvs_set(struct kvstore *s, const char *key, size_t klen, const char *val, size_t vlen)
{
	uint32_t i = key_slot(s, key, klen);
	struct kv_entry *e;

	if (klen == 0 || klen > KV_KEY_MAX || vlen > KV_VAL_MAX)
		return -1;
	if (s->khash[i]) {
		e = &s->keys[s->khash[i] - 1];
	} else {
		if (s->nkeys == KV_MAX_KEYS)
			return -1;
		e = &s->keys[s->nkeys++];
		s->khash[i] = (uint16_t)s->nkeys;
		e->key_len = (uint8_t)klen;
		memcpy(e->key, key, klen);
	}
	e->val_len = (uint8_t)vlen;
	memcpy(e->val, val, vlen);
	return 0;
}

static uint32_t id_slot(const struct kv_idtab *t, const char *id, size_t idlen)
{
	uint32_t i = hash(id, idlen) & IMASK;

	for (;; i = (i + 1) & IMASK) {
		uint16_t v = t->hash[i];

		if (!v)
			return i;
		if (t->ids[v - 1].id_len == idlen && !memcmp(t->ids[v - 1].id, id, idlen))
			return i;
	}
}

static const struct kv_id *idtab_find(const struct kv_idtab *t, const char *id, size_t idlen)
{
	uint16_t v = t->hash[id_slot(t, id, idlen)];

	return v ? &t->ids[v - 1] : 0;
}

const struct kv_id *kvs_id_find(const struct kvstore *s, const char *id, size_t idlen)
{
	const struct kv_id *e = idtab_find(&s->upd, id, idlen);

	return e ? e : idtab_find(&s->reads, id, idlen);
}

/* Linear-probing delete by backward shift: keeps every chain unbroken. */
static void id_unhash(struct kv_idtab *t, uint32_t i)
{
	uint32_t j = i;

	for (;;) {
		uint32_t k;
		uint16_t v;

		j = (j + 1) & IMASK;
		v = t->hash[j];
		if (!v)
			break;
		k = hash(t->ids[v - 1].id, t->ids[v - 1].id_len) & IMASK;
		/* move v back to the hole at i unless its home k lies in (i, j] */
		if (i <= j ? (k <= i || k > j) : (k <= i && k > j)) {
			t->hash[i] = v;
			i = j;
		}
	}
	t->hash[i] = 0;
}

static void idtab_add(struct kv_idtab *t, const char *id, size_t idlen, int op, const char *val,
		      size_t vlen)
{
	uint32_t i = id_slot(t, id, idlen);
	uint32_t idx;
	struct kv_id *e;

	if (idlen == 0 || idlen > KV_ID_MAX || vlen > KV_VAL_MAX)
		return;
	if (t->hash[i]) {               /* an id reused after eviction was re-executed */
		e = &t->ids[t->hash[i] - 1];
	} else {
		idx = (uint32_t)(t->n % KV_ID_SLOTS);
		if (t->n >= KV_ID_SLOTS) {
			e = &t->ids[idx];
			id_unhash(t, id_slot(t, e->id, e->id_len));
			i = id_slot(t, id, idlen);
		}
		t->n++;
		e = &t->ids[idx];
		t->hash[i] = (uint16_t)(idx + 1);
		e->id_len = (uint8_t)idlen;
		memcpy(e->id, id, idlen);
	}
	e->op = (uint8_t)op;
	e->val_len = (uint8_t)vlen;
	if (vlen)
		memcpy(e->val, val, vlen);
}

void kvs_id_add(struct kvstore *s, const char *id, size_t idlen, int op, const char *val,
		size_t vlen)
{
	idtab_add(&s->upd, id, idlen, op, val, vlen);
}

void kvs_read_add(struct kvstore *s, const char *id, size_t idlen, const char *val, size_t vlen)
{
	idtab_add(&s->reads, id, idlen, val ? KV_OP_GET : KV_REPLY_NONE, val, val ? vlen : 0);
}

size_t kvs_id_reply(const struct kv_id *e, char *out)
{
	size_t n;

	switch (e->op) {
	case KV_OP_PUT:
		memcpy(out, "OK ", 3);
		n = 3;
		break;
	case KV_REPLY_NONE:
		memcpy(out, "NONE ", 5);
		n = 5;
		break;
	default:                        /* INCR, GET */
		memcpy(out, "VAL ", 4);
		n = 4;
	}
	memcpy(out + n, e->id, e->id_len);
	n += e->id_len;
	if (e->op == KV_OP_INCR || e->op == KV_OP_GET) {
		out[n++] = ' ';
		memcpy(out + n, e->val, e->val_len);
		n += e->val_len;
	}
	return n;
}
