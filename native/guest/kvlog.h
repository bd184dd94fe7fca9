/* kvlog.h - the kv store's on-disk log (format: docs/kv-disk-format.md).
 *
 * Sector 0 and 1: superblock slots (generation g lives in slot g % 2).
 * Then two equal halves; the superblock names the active one. Records are
 * appended to the active half, whole sectors per write, never straddling a
 * sector; each record's CRC-32C chains over the previous record's CRC. When
 * the active half is full, a snapshot of the live state is written to the
 * other half and the superblock switch (one sector write) makes it active. */
#ifndef GUEST_KVLOG_H
#define GUEST_KVLOG_H

#include <stddef.h>
#include <stdint.h>

#define KVLOG_SECTOR        512
#define KVLOG_IO_SECTORS    128          /* one ring request: 64 KiB */
#define KVLOG_SB_MAGIC      0x4253564bu  /* "KVSB" */
#define KVLOG_REC_MAGIC     0x3152564bu  /* "KVR1" */
#define KVLOG_VERSION       1
#define KVLOG_REC_HDR       20
#define KVLOG_REC_MAX       (KVLOG_REC_HDR + 32 + 64 + 64 + 4)
#define KVLOG_MIN_SECTORS   (2 + 2 * 16)

/* record ops and flags */
#define KVREC_PUT           1            /* reply "OK <id>" */
#define KVREC_INCR          2            /* reply "VAL <id> <val>" */
#define KVREC_MARK          3            /* log-internal: boot / after-error marker */
#define KVREC_F_APPLY       0x1          /* key := val */
#define KVREC_F_REMEMBER    0x2          /* id table += (id, op, val) */

/* kvlog_append / kvlog_open errors besides KEMARI_STATUS_* (< 0) */
#define KVLOG_EFULL         (-10)        /* live state + batch do not fit in a half */
#define KVLOG_EFORMAT       (-11)        /* disk too small */

struct kvrec {
	uint8_t op, flags;
	uint8_t id_len, key_len, val_len;
	const char *id, *key, *val;
	uint64_t seq;                   /* set by the log */
};

/* Block access: returns KEMARI_STATUS_OK (0) or a negative status. */
struct kvlog_dev {
	void *ctx;
	int (*rw)(void *ctx, int write, uint64_t sector, void *buf, uint32_t nsec);
};

struct kvlog {
	struct kvlog_dev dev;
	uint64_t disk_sectors;
	uint64_t gen;                   /* superblock generation in force */
	uint32_t active;                /* 0 or 1: the half being appended to */
	uint64_t half0, half_sectors;   /* first sector of half 0, sectors per half */
	uint64_t next_seq;
	uint32_t chain;                 /* CRC of the last record (chain input) */
	uint64_t wpos;                  /* next free sector, relative to the active half */
	uint64_t marks;                 /* MARK counter: highest replayed or used */
	uint64_t nonce;                 /* per boot (TSC): MARK records of two boots differ */
	char nonce_hex[16];
	int need_mark;                  /* next append starts with a MARK record */
	int need_compact;               /* a superblock switch failed: redo it first */
	/* statistics */
	uint64_t replayed, compactions, appends;
	int formatted;
	/* compaction scratch */
	uint64_t snap_pos;
	size_t enc_off, enc_zeroed;
	int snap_err;
};

typedef void (*kvlog_apply_fn)(void *ctx, const struct kvrec *r);
/* Emit the live state with kvlog_snap_add(); return 0 or the first error. */
typedef int (*kvlog_snapshot_fn)(void *ctx, struct kvlog *log);

/* Open the log on dev: replay the active half through apply (stopping at the
 * first sector with a record that fails its magic/CRC chain/sequence), or
 * format a blank disk. The first append starts with a MARK record carrying
 * nonce, so its CRC chain never continues into a torn tail left at the same
 * place by an earlier boot. Returns 0 or a negative error. */
int kvlog_open(struct kvlog *log, const struct kvlog_dev *dev, uint64_t disk_sectors,
	       uint64_t nonce, kvlog_apply_fn apply, void *ctx);
/* Append n records in one durable write (compacting first if the half is
 * full). 0 = all durable; otherwise nothing of this batch counts. */
int kvlog_append(struct kvlog *log, struct kvrec *recs, int n, kvlog_snapshot_fn snap, void *ctx);
int kvlog_snap_add(struct kvlog *log, const struct kvrec *r);

/* pure helpers, exposed for the unit tests */
size_t kvlog_rec_len(const struct kvrec *r);
size_t kvlog_encode(uint8_t *out, const struct kvrec *r, uint32_t *chain);

#endif
