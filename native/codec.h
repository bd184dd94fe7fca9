/*
 * codec.h - the replication stream's hot encoder (docs/stream-format.md).
 *
 * kemari_agent/replication/primary.py decides what a checkpoint holds; this
 * writes it: PAGES records straight from guest memory into the send buffer
 * (one copy, no Python object per page), or a whole protected checkpoint in
 * one call (kcodec_checkpoint). The Python encoder (codec.pages_parts,
 * Primary._encode_checkpoint) stays the reference; tests/unit compare the two.
 */
#ifndef KEMARI_CODEC_H
#define KEMARI_CODEC_H

#include <stdint.h>

#define KCODEC_MAX_PAGES_PER_RECORD 4096

/* Bytes kcodec_pages writes for n pages. */
uint64_t kcodec_pages_size(uint32_t n);

/* PAGES records (header, entry list, page data) for guest pages pfns[0..n)
 * of mem, at most 4096 pages per record, into out. Returns the bytes written,
 * or -1 when a pfn lies outside mem, -2 when out is too small. */
int64_t kcodec_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *out, uint64_t out_size);

/* The same with zero-page detection (a full sync's rounds): an all-zero page
 * becomes an entry with bit 63 (ZERO) and no data. Per record: the data
 * pages' pfns in order, then the zero pages' (as codec.pages_parts with
 * detect_zero=True writes them). out must hold kcodec_pages_size(n); returns
 * the bytes written, -1 or -2 as kcodec_pages. *data_pages: pages with data. */
int64_t kcodec_pages_z(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                       uint8_t *out, uint64_t out_size, uint32_t *data_pages);

/* Page deltas (PAGES_XOR): a page the secondary already holds is sent as
 * the XOR of its new and its last sent content. The primary keeps that
 * content in a cache of cache_pages slots of 4096 bytes.
 *
 * Primary: pages pfns[0..n) go to slots slots[0..n); the first n_hits are
 * in the cache already. For those, delta[i] = page XOR slot and
 * new_pages[i] = page (contiguous, for the record's checksum). Then every
 * slot takes its page, in order (a slot named twice ends with the later
 * page). Returns 0, or -1 when a pfn lies outside mem or a slot outside the
 * cache. */
int kcodec_cache_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns,
                       const uint32_t *slots, uint32_t n_hits, uint32_t n, uint8_t *cache,
                       uint64_t cache_pages, uint8_t *delta, uint8_t *new_pages);

/* Primary: same[i] = 1 where page pfns[i] equals its cache slot slots[i] (the
 * secondary holds it already), else 0. 0, or -1 for a pfn or slot outside. */
int kcodec_same_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns,
                      const uint32_t *slots, uint32_t n, const uint8_t *cache,
                      uint64_t cache_pages, uint8_t *same);

/* Primary: the delta cache's index for the checkpoint writer (page_index.c):
 * delta.PageCache's plan() and drop_unchanged() in C, the same slots in the
 * same order (tests/unit compare the two). Slots go out 0, 1, 2..., then the
 * least recently sent page's is reused. NULL: out of memory or a size of 0. */
struct kcodec_index;
struct kcodec_index *kcodec_index_new(uint32_t capacity, uint64_t guest_pages);
void kcodec_index_free(struct kcodec_index *x);
uint32_t kcodec_index_len(const struct kcodec_index *x);

/* Plans one checkpoint of the distinct guest pages pfns[0..n), for
 * kcodec_checkpoint: out_pfns gets the cached pages that changed since they
 * were sent (hits, now the most recently sent), then the others (misses);
 * out_slots the hits' slots, then the slots the last misses take (as many as
 * the cache holds). Each out array holds n. counts: hits, misses, misses
 * cached, and hits left out because their page equals its slot in `cache`.
 * Returns 0, or -1 (nothing changed) for a pfn outside mem or named twice. */
int kcodec_index_plan(struct kcodec_index *x, const uint8_t *mem, uint64_t mem_size,
                      const uint8_t *cache, const uint64_t *pfns, uint32_t n,
                      uint64_t *out_pfns, uint32_t *out_slots, uint32_t counts[4]);

/* Secondary: delta[i] ^= page pfns[i] of mem, in place, so the delta becomes
 * the pages' new content. Returns 0, or -1 when a pfn lies outside mem. */
int kcodec_xor_apply(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *delta);

/* dst = a XOR b over n bytes (BLOB_XOR's vCPU and device blobs). */
void kcodec_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, uint64_t n);

/* A whole protected checkpoint in one call (kcodec_checkpoint). It needs the
 * LZ4 block compressor and the CRC-32 the Python side uses: python-lz4's
 * LZ4_initStream and LZ4_compress_fast_continue (lz4.block.compress calls
 * them so: the same block comes out) with LZ4_sizeofState(), and zlib-ng's
 * zng_crc32. Their modules export them; native_codec.py looks them up and
 * binds them here once. Returns 0. */
int kcodec_bind(void *lz4_init_stream, void *lz4_compress_fast_continue,
                uint64_t lz4_state_size, void *zng_crc32);
int kcodec_bound(void);

/* What follows a checkpoint's pages, in order: a VCPU or DEVICE blob (type
 * 3 or 4), sent as a BLOB_XOR against `base` when there is one of its
 * length and LZ4 shrinks the XOR enough, else whole; or (type 0) records
 * the caller encoded, copied as they are. */
struct kcodec_item {
    const uint8_t *data;
    const uint8_t *base;         /* NULL: no delta for this blob */
    uint64_t len;
    uint32_t type, ident, version, reserved;
};

/* The checkpoint's END counts what was queued for it before (heartbeats):
 * records, pages, bytes and the CRC-32 so far. The call adds its own and
 * sets the statistics (out), so one struct serves every call. */
struct kcodec_ckpt {
    uint64_t seq, generation;
    uint64_t bytes;
    uint32_t records, pages, crc;
    uint32_t item_records, item_pages;   /* in: the records and pages of type-0 items */
    uint32_t patch;                      /* in: the hits as PAGES_PATCH, not PAGES_XOR */
    double lz4_worth;                    /* codec.LZ4_WORTH */
    uint64_t xor_pages, xor_bytes, plain_pages, xor_blobs, xor_blob_bytes;   /* out */
    uint64_t unchanged_pages;            /* out: kcodec_index_checkpoint's plan left out */
};

/* One checkpoint, as primary.Primary.checkpoint writes it with a delta cache
 * (the same bytes; tests/unit compare the two):
 *   pfns[0..n_hits) are in the cache at slots[0..n_hits): PAGES_XOR records
 *   of at most 4096 pages (plain PAGES for a batch LZ4 does not shrink to
 *   lz4_worth), or with c->patch PAGES_PATCH records (codec.page_patch's
 *   runs: no LZ4, and a slot takes only the bytes that changed); pfns[n_hits..n_hits+n_misses) go whole in PAGES records, and
 *   the last n_cached of them take slots[n_hits..n_hits+n_cached); every slot
 *   takes its page, in that order; then the items; then CHECKPOINT_END.
 * `scratch` holds min(n_hits, 4096) pages and the largest blob. Returns the
 * bytes written; -1 a pfn or slot out of range, -2 out too small, -3 not
 * bound, -4 scratch too small. */
int64_t kcodec_checkpoint(struct kcodec_ckpt *c, const uint8_t *mem, uint64_t mem_size,
                          const uint64_t *pfns, const uint32_t *slots, uint32_t n_hits,
                          uint32_t n_misses, uint32_t n_cached, uint8_t *cache,
                          uint64_t cache_pages, uint8_t *scratch, uint64_t scratch_size,
                          const struct kcodec_item *items, uint32_t n_items,
                          uint8_t *out, uint64_t out_size);

/* The secondary's side of the same: one protected checkpoint received whole.
 *
 * kcodec_receive walks the records at the start of buf, up to and including
 * a CHECKPOINT_END, doing what secondary.Secondary does for them: checks,
 * checksum and counts, PAGES_XOR and (with rx->patches) PAGES_PATCH
 * rebuilt from the committed pages in mem and checked, BLOB_XOR rebuilt from its base and checked, pages and blobs
 * staged. It takes only what its caller would accept: records of types
 * PAGES (no zero entries), PAGES_XOR, PAGES_PATCH if negotiated, VCPU, DEVICE, BLOB_XOR, HEARTBEAT and
 * an END that matches, counting the records its caller took before them
 * (rx's queued_*: disk writes sent ahead, heartbeats). Anything else,
 * anything short, anything wrong: it
 * returns 0 and has changed nothing, and the caller (Secondary) decodes the
 * same bytes itself, reaching its own verdict. On success it returns the
 * bytes consumed and fills rx with what to apply; nothing is applied here.
 * Needs kcodec_bind_decompress. Staging buffers belong to the calling
 * thread and stay valid until its next call. */
int kcodec_bind_decompress(void *lz4_decompress_safe);

struct kcodec_base {             /* the last blob of a type, id and version */
    const uint8_t *data;
    uint64_t len;
    uint32_t type, ident, version, reserved;
};

struct kcodec_blob_out {         /* a staged VCPU or DEVICE blob */
    const uint8_t *data;
    uint64_t len;
    uint32_t type, ident, version, reserved;
};

struct kcodec_rx {
    uint64_t expected_seq, generation, npages, staging_limit;     /* in */
    uint64_t queued_bytes;                  /* in: what the caller took of this */
    uint32_t queued_records, queued_crc;    /* checkpoint before buf, if anything */
    uint32_t patches, reserved;             /* in: the session negotiated PAGES_PATCH */
    uint64_t seq, bytes;                                          /* out */
    uint32_t records, pages, n_pfns, n_blobs;
    const uint64_t *pfns;        /* staged pages, in order, */
    const uint8_t *data;         /* and their contents */
    const struct kcodec_blob_out *blobs;
};

int64_t kcodec_receive(struct kcodec_rx *rx, const uint8_t *buf, uint64_t len,
                       const uint8_t *mem, const struct kcodec_base *bases, uint32_t n_bases);

/* The ACK of checkpoint seq of `generation` (codec.encode_ack) into out,
 * KCODEC_ACK_SIZE bytes. */
#define KCODEC_ACK_SIZE 24
void kcodec_ack(uint8_t *out, uint64_t seq, uint64_t generation);

/* 1 when buf[0..len) is exactly one ACK record (codec.Decoder.lone_ack), its
 * fields then in *seq and *generation; else 0. */
int kcodec_lone_ack(const uint8_t *buf, uint64_t len, uint64_t *seq, uint64_t *generation);

/* Bytes kcodec_checkpoint may need at most, besides the type-0 items' own. */
uint64_t kcodec_checkpoint_bound(uint32_t n_hits, uint32_t n_misses, uint32_t n_items,
                                 uint64_t blob_bytes);

/* 0 when scratch and out hold what kcodec_checkpoint needs for up to
 * n_xor_hits PAGES_XOR pages and the items, and n_hits + n_misses pages in
 * all; -2 when out is too small, -4 scratch. */
int64_t kcodec_checkpoint_room(uint32_t n_xor_hits, uint32_t n_hits, uint32_t n_misses,
                               const struct kcodec_item *items, uint32_t n_items,
                               uint64_t scratch_size, uint64_t out_size);

/* The primary's protected checkpoint of the distinct guest pages pfns[0..n)
 * in one call: kcodec_index_plan into plan_pfns and plan_slots (n each),
 * then kcodec_checkpoint of that plan, its pages' content in `cache` (the
 * index's arena). Sizes are checked for any plan of n pages first
 * (kcodec_checkpoint_room with n for each count), so nothing changes unless
 * the checkpoint is written; c->unchanged_pages gets the plan's unchanged
 * hits. Returns kcodec_checkpoint's result, or -1 for a pfn outside mem or
 * named twice. */
int64_t kcodec_index_checkpoint(struct kcodec_index *x, struct kcodec_ckpt *c,
                                const uint8_t *mem, uint64_t mem_size, uint8_t *cache,
                                const uint64_t *pfns, uint32_t n, uint64_t *plan_pfns,
                                uint32_t *plan_slots, uint8_t *scratch, uint64_t scratch_size,
                                const struct kcodec_item *items, uint32_t n_items,
                                uint8_t *out, uint64_t out_size);

#endif
