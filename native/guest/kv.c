/* kv.c - request semantics of the kv image (DESIGN.md section 6). */
#include "kv.h"
#include "lib.h"
#include "../kemari_abi.h"

void kv_init(struct kv_server *kv, void *ctx,
	     void (*send)(void *ctx, const struct udp_peer *to, const char *msg, size_t len))
{
	memset(kv, 0, sizeof(*kv));
	kvs_init(&kv->store);
	kv->ctx = ctx;
	kv->send = send;
}

static void reply(struct kv_server *kv, const struct udp_peer *to, const char *msg, size_t len)
{
	kv->st.replies++;
	kv->send(kv->ctx, to, msg, len);
}

static void reply_err(struct kv_server *kv, const struct udp_peer *to, const char *why)
{
	char b[64];
	size_t n = strlen(why);

	memcpy(b, "ERR ", 4);
	memcpy(b + 4, why, n);
	kv->st.errors++;
	reply(kv, to, b, 4 + n);
}

/* "<word> <id>[ <val>]" */
static void reply_id(struct kv_server *kv, const struct udp_peer *to, const char *word,
		     const char *id, size_t idlen, const char *val, size_t vlen)
{
	char b[KV_REPLY_MAX];
	size_t n = strlen(word);

	memcpy(b, word, n);
	b[n++] = ' ';
	memcpy(b + n, id, idlen);
	n += idlen;
	if (val) {
		b[n++] = ' ';
		memcpy(b + n, val, vlen);
		n += vlen;
	}
	reply(kv, to, b, n);
}

/* ---- recovery ----------------------------------------------------------- */

static void apply_rec(void *ctx, const struct kvrec *r)
{
	struct kv_server *kv = ctx;

	if (r->flags & KVREC_F_APPLY)
		kvs_set(&kv->store, r->key, r->key_len, r->val, r->val_len);
	if ((r->flags & KVREC_F_REMEMBER) && r->id_len)
		kvs_id_add(&kv->store, r->id, r->id_len,
			   r->op == KVREC_INCR ? KV_OP_INCR : KV_OP_PUT,
			   r->op == KVREC_INCR ? r->val : 0, r->op == KVREC_INCR ? r->val_len : 0);
}

static int snapshot(void *ctx, struct kvlog *log)
{
	struct kv_server *kv = ctx;
	const struct kvstore *s = &kv->store;
	struct kvrec r;
	uint64_t i, first;
	int rc;

	for (i = 0; i < s->nkeys; i++) {
		const struct kv_entry *e = &s->keys[i];

		memset(&r, 0, sizeof(r));
		r.op = KVREC_PUT;
		r.flags = KVREC_F_APPLY;
		r.key = e->key;
		r.key_len = e->key_len;
		r.val = e->val;
		r.val_len = e->val_len;
		rc = kvlog_snap_add(log, &r);
		if (rc)
			return rc;
	}
	first = s->upd.n > KV_ID_SLOTS ? s->upd.n - KV_ID_SLOTS : 0;
	for (i = first; i < s->upd.n; i++) {        /* oldest first: same FIFO order */
		const struct kv_id *e = &s->upd.ids[i % KV_ID_SLOTS];

		memset(&r, 0, sizeof(r));
		r.op = e->op == KV_OP_INCR ? KVREC_INCR : KVREC_PUT;
		r.flags = KVREC_F_REMEMBER;
		r.id = e->id;
		r.id_len = e->id_len;
		r.val = e->val;
		r.val_len = e->val_len;
		rc = kvlog_snap_add(log, &r);
		if (rc)
			return rc;
	}
	return 0;
}

int kv_open_disk(struct kv_server *kv, const struct kvlog_dev *dev, uint64_t sectors,
		 uint64_t nonce)
{
	int rc = kvlog_open(&kv->log, dev, sectors, nonce, apply_rec, kv);

	kv->have_disk = rc == 0;
	return rc;
}

/* ---- requests -------------------------------------------------------------- */

static struct kv_pending *pending_id(struct kv_server *kv, const struct kv_req *r)
{
	int i;

	for (i = 0; i < kv->npend; i++)
		if (kv->pend[i].id_len == r->id_len && !memcmp(kv->pend[i].id, r->id, r->id_len))
			return &kv->pend[i];
	return 0;
}

/* The newest queued value of a key, if a queued PUT/INCR touches it. */
static struct kv_pending *pending_key(struct kv_server *kv, const char *key, size_t klen)
{
	int i;

	for (i = kv->npend - 1; i >= 0; i--)
		if (kv->pend[i].key_len == klen && !memcmp(kv->pend[i].key, key, klen))
			return &kv->pend[i];
	return 0;
}

static uint32_t pending_new_keys(struct kv_server *kv)
{
	uint32_t n = 0;
	int i, j;

	for (i = 0; i < kv->npend; i++) {
		struct kv_pending *p = &kv->pend[i];

		if (kvs_get(&kv->store, p->key, p->key_len))
			continue;
		for (j = 0; j < i; j++)
			if (kv->pend[j].key_len == p->key_len &&
			    !memcmp(kv->pend[j].key, p->key, p->key_len))
				break;
		n += j == i;
	}
	return n;
}

static void do_get(struct kv_server *kv, const struct udp_peer *from, const struct kv_req *r)
{
	const struct kv_entry *e;

	if (pending_key(kv, r->key, r->key_len))
		kv_commit(kv);          /* read only what is durable */
	e = kvs_get(&kv->store, r->key, r->key_len);
	if (e)
		reply_id(kv, from, "VAL", r->id, r->id_len, e->val, e->val_len);
	else
		reply_id(kv, from, "NONE", r->id, r->id_len, 0, 0);
	/* a retried GET id gets this same reply (memory only: a GET changes
	 * nothing, so after a reboot executing it again is harmless) */
	kvs_read_add(&kv->store, r->id, r->id_len, e ? e->val : 0, e ? e->val_len : 0);
}

static void do_update(struct kv_server *kv, const struct udp_peer *from, const struct kv_req *r)
{
	struct kv_pending *p, *prev;
	const struct kv_entry *e;
	const char *cur = "0";
	size_t curlen = 1;

	if (!kv->have_disk) {
		reply_err(kv, from, "no-disk");
		return;
	}
	if (kv->npend == KV_BATCH_MAX)
		kv_commit(kv);
	prev = pending_key(kv, r->key, r->key_len);
	e = prev ? 0 : kvs_get(&kv->store, r->key, r->key_len);
	if (!prev && !e && kv->store.nkeys + pending_new_keys(kv) >= KV_MAX_KEYS) {
		reply_err(kv, from, "full");
		return;
	}
	p = &kv->pend[kv->npend];
	p->to = *from;
	p->op = (uint8_t)r->op;
	p->id_len = r->id_len;
	memcpy(p->id, r->id, r->id_len);
	p->key_len = r->key_len;
	memcpy(p->key, r->key, r->key_len);
	if (r->op == KV_OP_PUT) {
		p->val_len = r->val_len;
		memcpy(p->val, r->val, r->val_len);
	} else {
		uint64_t v;
		int rc;

		if (prev) {
			cur = prev->val;
			curlen = prev->val_len;
		} else if (e) {
			cur = e->val;
			curlen = e->val_len;
		}
		rc = parse_u64(cur, curlen, &v);
		if (rc == 0 && v == UINT64_MAX)
			rc = -2;
		if (rc) {
			reply_err(kv, from, rc == -2 ? "overflow" : "not-a-number");
			return;
		}
		p->val_len = (uint8_t)fmt_u64(p->val, v + 1);
	}
	kv->npend++;
}

void kv_request(struct kv_server *kv, const struct udp_peer *from, const char *data, size_t len)
{
	struct kv_req r;
	const struct kv_id *done;

	kv->st.requests++;
	if (kv_parse(data, len, &r)) {
		reply_err(kv, from, r.err);
		return;
	}
	if (pending_id(kv, &r))
		kv_commit(kv);          /* a retry of a queued request: answer once durable */
	done = kvs_id_find(&kv->store, r.id, r.id_len);
	if (done) {
		char b[KV_REPLY_MAX];

		kv->st.dup_hits++;
		reply(kv, from, b, kvs_id_reply(done, b));
		return;
	}
	if (r.op == KV_OP_GET)
		do_get(kv, from, &r);
	else
		do_update(kv, from, &r);
}

void kv_commit(struct kv_server *kv)
{
	struct kvrec recs[KV_BATCH_MAX];
	int i, n = kv->npend, rc;

	if (!n)
		return;
	kv->npend = 0;
	for (i = 0; i < n; i++) {
		struct kv_pending *p = &kv->pend[i];

		memset(&recs[i], 0, sizeof(recs[i]));
		recs[i].op = p->op == KV_OP_INCR ? KVREC_INCR : KVREC_PUT;
		recs[i].flags = KVREC_F_APPLY | KVREC_F_REMEMBER;
		recs[i].id = p->id;
		recs[i].id_len = p->id_len;
		recs[i].key = p->key;
		recs[i].key_len = p->key_len;
		recs[i].val = p->val;
		recs[i].val_len = p->val_len;
	}
	kv->st.commits++;
	rc = kvlog_append(&kv->log, recs, n, snapshot, kv);
	for (i = 0; i < n; i++) {
		struct kv_pending *p = &kv->pend[i];

		if (rc) {
			reply_err(kv, &p->to, rc == KEMARI_STATUS_ENOSPC || rc == KVLOG_EFULL ?
				  "disk-full" : "disk");
			continue;
		}
		apply_rec(kv, &recs[i]);
		kv->st.committed++;
		if (p->op == KV_OP_INCR)
			reply_id(kv, &p->to, "VAL", p->id, p->id_len, p->val, p->val_len);
		else
			reply_id(kv, &p->to, "OK", p->id, p->id_len, 0, 0);
	}
	if (rc)
		kv->st.disk_errors++;
}
