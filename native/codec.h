/*
 * codec.h - the replication stream's hot encoder (docs/stream-format.md).
 *
 * kemari_agent/replication/primary.py decides what a checkpoint holds; this
 * only writes its PAGES records straight from guest memory into the send
 * buffer (one copy, no Python object per page). The Python encoder
 * (codec.pages_parts) stays the reference; tests/unit compare the two.
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

/* Secondary: delta[i] ^= page pfns[i] of mem, in place, so the delta becomes
 * the pages' new content. Returns 0, or -1 when a pfn lies outside mem. */
int kcodec_xor_apply(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *delta);

/* dst = a XOR b over n bytes (BLOB_XOR's vCPU and device blobs). */
void kcodec_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, uint64_t n);

#endif
