/* kvlog.c - checksummed append-only log with two-half compaction. */
#include "kvlog.h"
#include "crc32.h"
#include "lib.h"
#include "../kemari_abi.h"

#define SB_CRC_OFF  508

static uint8_t iobuf[KVLOG_IO_SECTORS * KVLOG_SECTOR] __attribute__((aligned(4096)));

size_t kvlog_rec_len(const struct kvrec *r)
{
	return KVLOG_REC_HDR + r->id_len + r->key_len + r->val_len + 4;
}

static uint32_t chain_crc(uint32_t prev, const uint8_t *p, size_t n)
{
	uint8_t pb[4];

	put_le32(pb, prev);
	return crc32c(crc32c(0, pb, 4), p, n);
}

size_t kvlog_encode(uint8_t *out, const struct kvrec *r, uint32_t *chain)
{
	size_t len = kvlog_rec_len(r), o = KVLOG_REC_HDR;
	uint32_t crc;

	put_le32(out, KVLOG_REC_MAGIC);
	put_le16(out + 4, (uint16_t)len);
	out[6] = r->op;
	out[7] = r->flags;
	put_le64(out + 8, r->seq);
	out[16] = r->id_len;
	out[17] = r->key_len;
	out[18] = r->val_len;
	out[19] = 0;
	if (r->id_len)
		memcpy(out + o, r->id, r->id_len);
	o += r->id_len;
	if (r->key_len)
		memcpy(out + o, r->key, r->key_len);
	o += r->key_len;
	if (r->val_len)
		memcpy(out + o, r->val, r->val_len);
	o += r->val_len;
	crc = chain_crc(*chain, out, o);
	put_le32(out + o, crc);
	*chain = crc;
	return len;
}

/* Decode the record at p (avail bytes left in its sector) if it is the next
 * one in the chain. Returns its length, 0 for padding (zero magic), -1 bad. */
static long decode(const uint8_t *p, size_t avail, uint64_t seq, uint32_t chain,
		   struct kvrec *r, uint32_t *crc_out)
{
	size_t len;

	if (avail < 4 || get_le32(p) == 0)
		return 0;
	if (avail < KVLOG_REC_HDR + 4 || get_le32(p) != KVLOG_REC_MAGIC)
		return -1;
	len = get_le16(p + 4);
	r->op = p[6];
	r->flags = p[7];
	r->seq = get_le64(p + 8);
	r->id_len = p[16];
	r->key_len = p[17];
	r->val_len = p[18];
	if (len > avail || len != kvlog_rec_len(r) || r->id_len > 32 || r->key_len > 64 ||
	    r->val_len > 64 || r->seq != seq || p[19] != 0)
		return -1;
	if (chain_crc(chain, p, len - 4) != get_le32(p + len - 4))
		return -1;
	r->id = (const char *)p + KVLOG_REC_HDR;
	r->key = r->id + r->id_len;
	r->val = r->key + r->key_len;
	*crc_out = get_le32(p + len - 4);
	return (long)len;
}

/* ---- superblock ------------------------------------------------------- */

struct sb {
	uint64_t gen, start_seq, half0, half_sectors;
	uint32_t active, start_chain;
};

static void sb_encode(uint8_t *b, const struct sb *s)
{
	memset(b, 0, KVLOG_SECTOR);
	put_le32(b, KVLOG_SB_MAGIC);
	put_le32(b + 4, KVLOG_VERSION);
	put_le64(b + 8, s->gen);
	put_le32(b + 16, s->active);
	put_le32(b + 20, s->start_chain);
	put_le64(b + 24, s->start_seq);
	put_le64(b + 32, s->half0);
	put_le64(b + 40, s->half_sectors);
	put_le32(b + SB_CRC_OFF, crc32c(0, b, SB_CRC_OFF));
}

static int sb_decode(const uint8_t *b, struct sb *s, uint64_t disk_sectors)
{
	if (get_le32(b) != KVLOG_SB_MAGIC || get_le32(b + 4) != KVLOG_VERSION ||
	    crc32c(0, b, SB_CRC_OFF) != get_le32(b + SB_CRC_OFF))
		return -1;
	s->gen = get_le64(b + 8);
	s->active = get_le32(b + 16);
	s->start_chain = get_le32(b + 20);
	s->start_seq = get_le64(b + 24);
	s->half0 = get_le64(b + 32);
	s->half_sectors = get_le64(b + 40);
	if (s->active > 1 || s->half0 < 2 || s->half_sectors == 0 ||
	    s->half0 + 2 * s->half_sectors > disk_sectors)
		return -1;
	return 0;
}

static uint64_t half_base(const struct kvlog *log, uint32_t half)
{
	return log->half0 + (uint64_t)half * log->half_sectors;
}

static int sb_write(struct kvlog *log, const struct sb *s)
{
	sb_encode(iobuf, s);
	return log->dev.rw(log->dev.ctx, 1, s->gen % 2, iobuf, 1);
}

/* ---- open / replay ------------------------------------------------------ */

static int format(struct kvlog *log)
{
	struct sb s;
	int rc;

	s.gen = 1;
	s.active = 0;
	s.start_seq = 1;
	s.start_chain = 0;
	s.half0 = 2;
	s.half_sectors = (log->disk_sectors - 2) / 2;
	/* sector 0: empty slot, sector 1: generation 1, sector 2: empty log */
	memset(iobuf, 0, 3 * KVLOG_SECTOR);
	sb_encode(iobuf + KVLOG_SECTOR, &s);
	rc = log->dev.rw(log->dev.ctx, 1, 0, iobuf, 3);
	if (rc)
		return rc;
	log->gen = s.gen;
	log->active = s.active;
	log->half0 = s.half0;
	log->half_sectors = s.half_sectors;
	log->next_seq = s.start_seq;
	log->chain = s.start_chain;
	log->wpos = 0;
	log->formatted = 1;
	return 0;
}

static void replay_internal(struct kvlog *log, const struct kvrec *r)
{
	uint64_t v;

	if (r->op == KVREC_MARK && parse_u64(r->val, r->val_len, &v) == 0 && v > log->marks)
		log->marks = v;
}

/* Replay one sector: all of its records must be valid (else none applies). */
static int replay_sector(struct kvlog *log, const uint8_t *sec, kvlog_apply_fn apply, void *ctx)
{
	uint64_t seq = log->next_seq;
	uint32_t chain = log->chain;
	size_t off = 0;
	int n = 0;
	struct kvrec r;
	uint32_t crc;
	long len;

	/* pass 1: validate */
	while (off < KVLOG_SECTOR) {
		len = decode(sec + off, KVLOG_SECTOR - off, seq, chain, &r, &crc);
		if (len < 0)
			return -1;
		if (len == 0)
			break;
		off += (size_t)len;
		seq++;
		chain = crc;
		n++;
	}
	if (n == 0)
		return -1;
	/* pass 2: apply */
	off = 0;
	while (n--) {
		len = decode(sec + off, KVLOG_SECTOR - off, log->next_seq, log->chain, &r, &crc);
		if (r.op == KVREC_MARK)
			replay_internal(log, &r);
		else if (apply)
			apply(ctx, &r);
		off += (size_t)len;
		log->next_seq++;
		log->chain = crc;
		log->replayed++;
	}
	return 0;
}

int kvlog_open(struct kvlog *log, const struct kvlog_dev *dev, uint64_t disk_sectors,
	       uint64_t nonce, kvlog_apply_fn apply, void *ctx)
{
	struct sb s[2], *best = 0;
	uint64_t pos;
	int rc, i;

	memset(log, 0, sizeof(*log));
	log->dev = *dev;
	log->disk_sectors = disk_sectors;
	log->need_mark = 1;
	log->nonce = nonce;
	if (disk_sectors < KVLOG_MIN_SECTORS)
		return KVLOG_EFORMAT;
	rc = dev->rw(dev->ctx, 0, 0, iobuf, 2);
	if (rc)
		return rc;
	for (i = 0; i < 2; i++)
		if (sb_decode(iobuf + i * KVLOG_SECTOR, &s[i], disk_sectors) == 0 &&
		    (uint64_t)i == s[i].gen % 2 && (!best || s[i].gen > best->gen))
			best = &s[i];
	if (!best)
		return format(log);
	log->gen = best->gen;
	log->active = best->active;
	log->half0 = best->half0;
	log->half_sectors = best->half_sectors;
	log->next_seq = best->start_seq;
	log->chain = best->start_chain;

	for (pos = 0; pos < log->half_sectors;) {
		uint64_t n = log->half_sectors - pos, k;

		if (n > KVLOG_IO_SECTORS)
			n = KVLOG_IO_SECTORS;
		rc = dev->rw(dev->ctx, 0, half_base(log, log->active) + pos, iobuf, (uint32_t)n);
		if (rc)
			return rc;
		for (k = 0; k < n; k++, pos++)
			if (replay_sector(log, iobuf + k * KVLOG_SECTOR, apply, ctx))
				goto done;
	}
done:
	log->wpos = pos;
	return 0;
}

/* ---- encoding into iobuf ------------------------------------------------ */

/* Sectors are zeroed only as the encoder reaches them: a one-sector batch
 * dirties one page of iobuf, not all 64 KiB (each dirty page is checkpoint
 * cost under Kemari). */
static void enc_reset(struct kvlog *log)
{
	log->enc_off = 0;
	log->enc_zeroed = 0;
}

static void enc_zero_to(struct kvlog *log, size_t end)
{
	if (end > log->enc_zeroed) {
		size_t to = (end + KVLOG_SECTOR - 1) / KVLOG_SECTOR * KVLOG_SECTOR;

		memset(iobuf + log->enc_zeroed, 0, to - log->enc_zeroed);
		log->enc_zeroed = to;
	}
}

/* Place r (seq assigned here) in iobuf without straddling a sector. */
static int enc_add(struct kvlog *log, struct kvrec *r)
{
	size_t len = kvlog_rec_len(r);
	size_t off = log->enc_off;

	if (off % KVLOG_SECTOR + len > KVLOG_SECTOR)
		off = (off + KVLOG_SECTOR - 1) / KVLOG_SECTOR * KVLOG_SECTOR;
	if (off + len > sizeof(iobuf))
		return -1;
	enc_zero_to(log, off + len);
	r->seq = log->next_seq;
	kvlog_encode(iobuf + off, r, &log->chain);
	log->next_seq++;
	log->enc_off = off + len;
	return 0;
}

static uint32_t enc_sectors(const struct kvlog *log)
{
	return (uint32_t)((log->enc_off + KVLOG_SECTOR - 1) / KVLOG_SECTOR);
}

/* A MARK record: key = this boot's nonce (hex), val = mark counter. */
static void mark_rec(struct kvlog *log, struct kvrec *m, char *buf, uint64_t count)
{
	static const char hex[] = "0123456789abcdef";
	int i;

	memset(m, 0, sizeof(*m));
	m->op = KVREC_MARK;
	for (i = 0; i < 16; i++)
		log->nonce_hex[i] = hex[(log->nonce >> (60 - 4 * i)) & 0xf];
	m->key = log->nonce_hex;
	m->key_len = 16;
	m->val = buf;
	m->val_len = (uint8_t)fmt_u64(buf, count);
}

/* ---- compaction ------------------------------------------------------- */

int kvlog_snap_add(struct kvlog *log, const struct kvrec *rin)
{
	struct kvrec r = *rin;
	uint32_t n;
	int rc;

	if (log->snap_err)
		return log->snap_err;
	if (enc_add(log, &r) == 0)
		return 0;
	/* iobuf full: flush whole sectors, carry on with a fresh buffer */
	n = enc_sectors(log);
	if (log->snap_pos + n > log->half_sectors)
		return log->snap_err = KVLOG_EFULL;
	rc = log->dev.rw(log->dev.ctx, 1, half_base(log, !log->active) + log->snap_pos, iobuf, n);
	if (rc)
		return log->snap_err = rc;
	log->snap_pos += n;
	enc_reset(log);
	return enc_add(log, &r) ? (log->snap_err = KVLOG_EFULL) : 0;
}

static int compact(struct kvlog *log, uint32_t batch_sectors, kvlog_snapshot_fn snap, void *ctx)
{
	struct sb s;
	uint32_t n;
	int rc;

	s.start_seq = log->next_seq;
	s.start_chain = log->chain;
	log->snap_pos = 0;
	log->snap_err = 0;
	enc_reset(log);
	/* The snapshot depends on the live state, start_seq and start_chain
	 * only, so redoing it after a failed superblock write rewrites the
	 * very same bytes over a snapshot that may already be in force. */
	rc = snap ? snap(ctx, log) : 0;
	if (!rc) {
		n = enc_sectors(log);
		if (log->snap_pos + n + batch_sectors > log->half_sectors)
			rc = KVLOG_EFULL;
		else if (n)
			rc = log->dev.rw(log->dev.ctx, 1, half_base(log, !log->active) + log->snap_pos,
					 iobuf, n);
		log->snap_pos += n;
	}
	if (!rc) {
		s.gen = log->gen + 1;
		s.active = !log->active;
		s.half0 = log->half0;
		s.half_sectors = log->half_sectors;
		rc = sb_write(log, &s);
		if (rc)
			log->need_compact = 1;   /* the switch may or may not be on disk */
	}
	if (rc) {
		log->next_seq = s.start_seq;
		log->chain = s.start_chain;
		return rc;
	}
	log->gen = s.gen;
	log->active = s.active;
	log->wpos = log->snap_pos;
	log->need_compact = 0;
	log->compactions++;
	return 0;
}

/* ---- append --------------------------------------------------------------- */

static int encode_batch(struct kvlog *log, struct kvrec *recs, int n, struct kvrec *mark)
{
	int i;

	enc_reset(log);
	if (log->need_mark && enc_add(log, mark))
		return KVLOG_EFULL;
	for (i = 0; i < n; i++)
		if (enc_add(log, &recs[i]))
			return KVLOG_EFULL;
	return 0;
}

int kvlog_append(struct kvlog *log, struct kvrec *recs, int n, kvlog_snapshot_fn snap, void *ctx)
{
	uint64_t seq0 = log->next_seq;
	uint32_t chain0 = log->chain;
	struct kvrec mark;
	char mbuf[20];
	uint32_t nsec;
	int rc;

	if (log->need_mark)
		mark_rec(log, &mark, mbuf, ++log->marks);
	rc = encode_batch(log, recs, n, &mark);
	if (rc)
		goto fail;
	nsec = enc_sectors(log);
	if (log->need_compact || log->wpos + nsec > log->half_sectors) {
		log->next_seq = seq0;
		log->chain = chain0;
		rc = compact(log, nsec, snap, ctx);
		if (rc)
			goto fail;
		seq0 = log->next_seq;
		chain0 = log->chain;
		rc = encode_batch(log, recs, n, &mark);
		if (rc)
			goto fail;
	}
	rc = log->dev.rw(log->dev.ctx, 1, half_base(log, log->active) + log->wpos, iobuf, nsec);
	if (rc)
		goto fail;
	log->wpos += nsec;
	log->need_mark = 0;
	log->appends++;
	return 0;
fail:
	/* Nothing of this batch counts. Part of it may be on disk: the next
	 * batch reuses these sequence numbers at the same place, and a fresh
	 * MARK record (new counter) first makes its CRC chain differ from any
	 * leftovers of this attempt. */
	log->next_seq = seq0;
	log->chain = chain0;
	log->need_mark = 1;
	return rc;
}
