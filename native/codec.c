/* codec.c - see codec.h. Little-endian host (x86-64), as the stream is. */
#include <stdlib.h>
#include <string.h>
#include "codec.h"

#define PAGE 4096u
#define TYPE_PAGES 2u
#define ENTRY_ZERO (1ull << 63)

/* Record header (u16 type, u16 flags, u32 body length: a multiple of 8, so no
 * padding) and the PAGES body's u32 count, u32 reserved. */
static void put_pages_header(uint8_t *p, uint32_t count, uint32_t data_pages)
{
    uint32_t length = 8 + 8 * count + PAGE * data_pages;
    uint16_t type = TYPE_PAGES, flags = 0;
    uint32_t reserved = 0;
    memcpy(p, &type, 2);
    memcpy(p + 2, &flags, 2);
    memcpy(p + 4, &length, 4);
    memcpy(p + 8, &count, 4);
    memcpy(p + 12, &reserved, 4);
}

uint64_t kcodec_pages_size(uint32_t n)
{
    uint64_t records = (n + KCODEC_MAX_PAGES_PER_RECORD - 1) / KCODEC_MAX_PAGES_PER_RECORD;
    return records * 16 + (uint64_t)n * (8 + PAGE);
}

/* -2: out cannot hold the worst case; -1: a pfn outside guest memory. */
static int check_pages(uint64_t mem_size, const uint64_t *pfns, uint32_t n, uint64_t out_size)
{
    uint64_t limit = mem_size / PAGE;
    if (kcodec_pages_size(n) > out_size)
        return -2;
    for (uint32_t i = 0; i < n; i++)
        if (pfns[i] >= limit)
            return -1;
    return 0;
}

int64_t kcodec_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *out, uint64_t out_size)
{
    int rc = check_pages(mem_size, pfns, n, out_size);
    if (rc)
        return rc;
    uint8_t *p = out;
    for (uint32_t start = 0; start < n; start += KCODEC_MAX_PAGES_PER_RECORD) {
        uint32_t count = n - start;
        if (count > KCODEC_MAX_PAGES_PER_RECORD)
            count = KCODEC_MAX_PAGES_PER_RECORD;
        put_pages_header(p, count, count);
        p += 16;
        memcpy(p, pfns + start, 8 * (size_t)count);
        p += 8 * (size_t)count;
        for (uint32_t i = 0; i < count; i++, p += PAGE)
            memcpy(p, mem + pfns[start + i] * PAGE, PAGE);
    }
    return p - out;
}

static int page_is_zero(const uint8_t *page)
{
    const uint64_t *w = (const uint64_t *)page;
    uint64_t any = 0;
    for (unsigned i = 0; i < PAGE / 8; i += 8) {     /* 64 bytes per step, early out */
        any = w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7];
        if (any)
            return 0;
    }
    return 1;
}

int64_t kcodec_pages_z(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                       uint8_t *out, uint64_t out_size, uint32_t *data_pages)
{
    int rc = check_pages(mem_size, pfns, n, out_size);
    if (rc)
        return rc;
    uint8_t *p = out;
    uint32_t total_data = 0;
    for (uint32_t start = 0; start < n; start += KCODEC_MAX_PAGES_PER_RECORD) {
        uint32_t count = n - start;
        if (count > KCODEC_MAX_PAGES_PER_RECORD)
            count = KCODEC_MAX_PAGES_PER_RECORD;
        uint8_t *head = p;
        uint64_t *entries = (uint64_t *)(head + 16);
        uint8_t *data = head + 16 + 8 * (size_t)count;
        uint32_t ndata = 0, nzero = 0;
        /* data pages copied as found; zero pfns parked at the end of the list */
        for (uint32_t i = 0; i < count; i++) {
            uint64_t pfn = pfns[start + i];
            const uint8_t *page = mem + pfn * PAGE;
            if (page_is_zero(page)) {
                nzero++;
                entries[count - nzero] = pfn | ENTRY_ZERO;
            } else {
                memcpy(&entries[ndata], &pfn, 8);
                memcpy(data + (size_t)ndata * PAGE, page, PAGE);
                ndata++;
            }
        }
        /* the zero entries went in from the end: put them back in pfn-list order */
        for (uint32_t a = ndata, b = count - 1; a < b; a++, b--) {
            uint64_t t = entries[a];
            entries[a] = entries[b];
            entries[b] = t;
        }
        put_pages_header(head, count, ndata);
        p = data + (size_t)ndata * PAGE;
        total_data += ndata;
    }
    *data_pages = total_data;
    return p - out;
}

/* dst = a XOR b over one page, a word at a time (the compiler vectorizes it). */
static void xor_page(uint8_t *dst, const uint8_t *a, const uint8_t *b)
{
    for (unsigned i = 0; i < PAGE; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(dst + i, &x, 8);
    }
}

static int check_slots(uint64_t mem_size, const uint64_t *pfns, const uint32_t *slots,
                       uint32_t n, uint64_t cache_pages)
{
    for (uint32_t i = 0; i < n; i++)
        if (pfns[i] >= mem_size / PAGE || slots[i] >= cache_pages)
            return -1;
    return 0;
}

int kcodec_same_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns,
                      const uint32_t *slots, uint32_t n, const uint8_t *cache,
                      uint64_t cache_pages, uint8_t *same)
{
    if (check_slots(mem_size, pfns, slots, n, cache_pages))
        return -1;
    for (uint32_t i = 0; i < n; i++)
        same[i] = memcmp(mem + pfns[i] * PAGE, cache + (uint64_t)slots[i] * PAGE, PAGE) == 0;
    return 0;
}

int kcodec_cache_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns,
                       const uint32_t *slots, uint32_t n_hits, uint32_t n, uint8_t *cache,
                       uint64_t cache_pages, uint8_t *delta, uint8_t *new_pages)
{
    if (n_hits > n || check_slots(mem_size, pfns, slots, n, cache_pages))
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *page = mem + pfns[i] * PAGE;
        uint8_t *slot = cache + (uint64_t)slots[i] * PAGE;
        if (i < n_hits) {
            xor_page(delta + (uint64_t)i * PAGE, page, slot);
            memcpy(new_pages + (uint64_t)i * PAGE, page, PAGE);
        }
        memcpy(slot, page, PAGE);
    }
    return 0;
}

int kcodec_xor_apply(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *delta)
{
    for (uint32_t i = 0; i < n; i++)
        if (pfns[i] >= mem_size / PAGE)
            return -1;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *d = delta + (uint64_t)i * PAGE;
        xor_page(d, d, mem + pfns[i] * PAGE);
    }
    return 0;
}

void kcodec_xor(uint8_t *dst, const uint8_t *a, const uint8_t *b, uint64_t n)
{
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t x, y;
        memcpy(&x, a + i, 8);
        memcpy(&y, b + i, 8);
        x ^= y;
        memcpy(dst + i, &x, 8);
    }
    for (; i < n; i++)
        dst[i] = a[i] ^ b[i];
}

/* ---- a whole checkpoint (kcodec_checkpoint) ---------------------------------------- */

#define TYPE_CHECKPOINT_END 6u
#define TYPE_PAGES_XOR 14u
#define TYPE_BLOB_XOR 15u
#define TYPE_PAGES_PATCH 16u
#define END_BODY 40u
#define LZ4_BOUND(n) ((n) + (n) / 255 + 16)
#define MAX_XOR_BLOB (1u << 20)

/* LZ4 as python-lz4's lz4.block.compress calls it (a fresh stream state, then
 * LZ4_compress_fast_continue), so that both write the same block. */
typedef void *(*lz4_init_stream_fn)(void *buffer, size_t size);
typedef int (*lz4_compress_continue_fn)(void *stream, const char *src, char *dst, int src_size,
                                        int dst_capacity, int acceleration);
typedef uint32_t (*crc32_fn)(uint32_t crc, const uint8_t *buf, uint32_t len);
static lz4_init_stream_fn lz4_init_stream;
static lz4_compress_continue_fn lz4_compress_continue;
static crc32_fn zng_crc32;
static uint64_t lz4_state_size;
static __thread void *lz4_state;          /* one per thread, kept */

int kcodec_bind(void *init_stream, void *compress_continue, uint64_t state_size, void *crc32)
{
    lz4_init_stream = (lz4_init_stream_fn)init_stream;
    lz4_compress_continue = (lz4_compress_continue_fn)compress_continue;
    lz4_state_size = state_size;
    zng_crc32 = (crc32_fn)crc32;
    return 0;
}

int kcodec_bound(void)
{
    return lz4_init_stream != NULL && lz4_compress_continue != NULL && zng_crc32 != NULL
        && lz4_state_size > 0;
}

static uint32_t crc_of(uint32_t crc, const uint8_t *p, uint64_t n)
{
    while (n) {                              /* zng_crc32 takes a 32-bit length */
        uint32_t step = n > (1u << 30) ? 1u << 30 : (uint32_t)n;
        crc = zng_crc32(crc, p, step);
        p += step;
        n -= step;
    }
    return crc;
}

static uint32_t pad8(uint64_t length)
{
    return (uint32_t)(-length & 7);
}

/* Header, then the caller writes `length` bytes of body; returns the body. */
static uint8_t *put_header(uint8_t *p, uint32_t type, uint32_t length)
{
    uint16_t t = (uint16_t)type, flags = 0;
    memcpy(p, &t, 2);
    memcpy(p + 2, &flags, 2);
    memcpy(p + 4, &length, 4);
    return p + 8;
}

static uint8_t *put_padding(uint8_t *p, uint64_t length)
{
    uint32_t pad = pad8(length);
    memset(p, 0, pad);
    return p + pad;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

uint64_t kcodec_checkpoint_bound(uint32_t n_hits, uint32_t n_misses, uint32_t n_items,
                                 uint64_t blob_bytes)
{
    /* a PAGES_XOR record is never larger than the PAGES record it replaces, a
     * PAGES_PATCH at most 6 bytes a page larger (one run of 4096: its count,
     * offset and length) and its padding; a blob goes whole (16 + its bytes)
     * or smaller */
    uint64_t patch_records = (n_hits + KCODEC_MAX_PAGES_PER_RECORD - 1)
        / KCODEC_MAX_PAGES_PER_RECORD;
    return kcodec_pages_size(n_hits) + 6 * (uint64_t)n_hits + 7 * patch_records
        + kcodec_pages_size(n_misses) + (uint64_t)n_items * 40
        + blob_bytes + 8 + END_BODY;
}

/* LZ4 of src into dst (capacity LZ4_BOUND(n)); the length, or 0 if it failed. */
static uint64_t pack(const uint8_t *src, uint64_t n, uint8_t *dst)
{
    if (lz4_state == NULL && (lz4_state = aligned_alloc(64, (lz4_state_size + 63) & ~63ull)) == NULL)
        return 0;
    void *stream = lz4_init_stream(lz4_state, lz4_state_size);
    if (stream == NULL)
        return 0;
    int r = lz4_compress_continue(stream, (const char *)src, (char *)dst, (int)n,
                                  (int)LZ4_BOUND(n), 1);
    return r > 0 ? (uint64_t)r : 0;
}

/* Pages pfns[0..count) from their slots: PAGES_XOR, or PAGES if LZ4 does not
 * pay; every slot takes its page. Returns the end of what was written. */
static uint8_t *xor_batch(struct kcodec_ckpt *c, const uint8_t *mem, const uint64_t *pfns,
                          const uint32_t *slots, uint32_t count, uint8_t *cache,
                          uint8_t *scratch, uint8_t *p)
{
    uint64_t size = (uint64_t)count * PAGE;
    uint8_t *packed = scratch + size;
    uint32_t check = 0;
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *page = mem + pfns[i] * PAGE;
        uint8_t *slot = cache + (uint64_t)slots[i] * PAGE;
        xor_page(scratch + (uint64_t)i * PAGE, page, slot);
        check = crc_of(check, page, PAGE);
        memcpy(slot, page, PAGE);
    }
    uint64_t n = pack(scratch, size, packed);
    if (n == 0 || (double)n > c->lz4_worth * count * PAGE) {
        c->plain_pages += count;
        int64_t w = kcodec_pages(mem, UINT64_MAX, pfns, count, p, UINT64_MAX);
        return p + w;
    }
    uint64_t length = 8 + 8 * (uint64_t)count + n;
    uint8_t *b = put_header(p, TYPE_PAGES_XOR, (uint32_t)length);
    put32(b, count);
    put32(b + 4, check);
    memcpy(b + 8, pfns, 8 * (size_t)count);
    memcpy(b + 8 + 8 * (size_t)count, packed, n);
    c->xor_pages += count;
    c->xor_bytes += n;
    return put_padding(b + length, length);
}

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }

static uint64_t word_at(const uint8_t *p, uint32_t i)
{
    uint64_t v;
    memcpy(&v, p + 8 * (uint64_t)i, 8);
    return v;
}

/* Whether the 64 bytes at x and y differ: 8 words XORed and ORed, which the
 * compiler turns into vector instructions, where a word-by-word loop of
 * compares and branches cost 0.5-0.9 us a page here. */
static int block_differs(const uint8_t *x, const uint8_t *y)
{
    uint64_t d = 0;
    for (uint32_t i = 0; i < 8; i++)
        d |= word_at(x, i) ^ word_at(y, i);
    return d != 0;
}

/* One page's patch against its slot (codec.page_patch: a run per maximal span
 * of differing 8-byte words, trimmed to its first and last differing byte),
 * written at p; the slot takes the runs, so it ends equal to the page.
 * Returns the end of the patch. */
static uint8_t *put_patch(uint8_t *p, const uint8_t *page, uint8_t *slot)
{
    uint8_t *count_at = p;
    uint16_t runs = 0;
    p += 2;
    for (uint32_t w = 0; w < PAGE / 8;) {
        if (w % 8 == 0 && !block_differs(page + 8 * w, slot + 8 * w)) {
            w += 8;
            continue;
        }
        if (word_at(page, w) == word_at(slot, w)) {
            w++;
            continue;
        }
        uint32_t end_w = w + 1;
        while (end_w < PAGE / 8 && word_at(page, end_w) != word_at(slot, end_w))
            end_w++;
        uint32_t start = 8 * w, end = 8 * end_w;
        while (page[start] == slot[start])
            start++;
        while (page[end - 1] == slot[end - 1])
            end--;
        put16(p, (uint16_t)start);
        put16(p + 2, (uint16_t)(end - start));
        memcpy(p + 4, page + start, end - start);
        memcpy(slot + start, page + start, end - start);
        p += 4 + (end - start);
        runs++;
        w = end_w;
    }
    put16(count_at, runs);
    return p;
}

/* Pages pfns[0..count) against their slots as one PAGES_PATCH; every slot
 * takes its page. Returns the end of what was written. */
static uint8_t *patch_batch(struct kcodec_ckpt *c, const uint8_t *mem, const uint64_t *pfns,
                            const uint32_t *slots, uint32_t count, uint8_t *cache, uint8_t *p)
{
    uint8_t *b = p + 8;
    uint8_t *q = b + 8 + 8 * (uint64_t)count;
    uint32_t check = 0;
    memcpy(b + 8, pfns, 8 * (size_t)count);
    for (uint32_t i = 0; i < count; i++) {
        const uint8_t *page = mem + pfns[i] * PAGE;
        check = crc_of(check, page, PAGE);
        q = put_patch(q, page, cache + (uint64_t)slots[i] * PAGE);
    }
    uint64_t length = (uint64_t)(q - b);
    put_header(p, TYPE_PAGES_PATCH, (uint32_t)length);
    put32(b, count);
    put32(b + 4, check);
    c->xor_pages += count;
    c->xor_bytes += length - 8 - 8 * (uint64_t)count;
    return put_padding(q, length);
}

/* A VCPU or DEVICE blob: BLOB_XOR against its base if LZ4 pays, else whole. */
static uint8_t *blob_record(struct kcodec_ckpt *c, const struct kcodec_item *it,
                            uint8_t *scratch, uint8_t *p)
{
    if (it->base != NULL && it->len > 0 && it->len <= MAX_XOR_BLOB) {
        uint8_t *packed = scratch + it->len;
        kcodec_xor(scratch, it->data, it->base, it->len);
        uint64_t n = pack(scratch, it->len, packed);
        if (n > 0 && (double)n <= c->lz4_worth * it->len) {
            uint64_t length = 24 + n;
            uint8_t *b = put_header(p, TYPE_BLOB_XOR, (uint32_t)length);
            uint32_t head[6] = { it->type, it->ident, it->version,
                                 crc_of(0, it->data, it->len), (uint32_t)it->len, 0 };
            memcpy(b, head, 24);
            memcpy(b + 24, packed, n);
            c->xor_blobs++;
            c->xor_blob_bytes += n;
            return put_padding(b + length, length);
        }
    }
    uint64_t length = 8 + it->len;
    uint8_t *b = put_header(p, it->type, (uint32_t)length);
    put32(b, it->ident);
    put32(b + 4, it->version);
    memcpy(b + 8, it->data, it->len);
    return put_padding(b + length, length);
}

int64_t kcodec_checkpoint_room(uint32_t n_xor_hits, uint32_t n_hits, uint32_t n_misses,
                               const struct kcodec_item *items, uint32_t n_items,
                               uint64_t scratch_size, uint64_t out_size)
{
    uint64_t need = 0, raw = 0, blobs = 0, batch = n_xor_hits < KCODEC_MAX_PAGES_PER_RECORD
        ? (uint64_t)n_xor_hits * PAGE : (uint64_t)KCODEC_MAX_PAGES_PER_RECORD * PAGE;
    for (uint32_t i = 0; i < n_items; i++) {
        if (items[i].type == 0)
            raw += items[i].len;
        else if (items[i].len > UINT32_MAX - 16)
            return -2;
        else
            blobs += items[i].len;
        if (items[i].base != NULL && items[i].len > need)
            need = items[i].len;
    }
    if (batch > need)
        need = batch;
    if (scratch_size < need + LZ4_BOUND(need))
        return -4;
    if (out_size < kcodec_checkpoint_bound(n_hits, n_misses, n_items, blobs) + raw)
        return -2;
    return 0;
}

int64_t kcodec_checkpoint(struct kcodec_ckpt *c, const uint8_t *mem, uint64_t mem_size,
                          const uint64_t *pfns, const uint32_t *slots, uint32_t n_hits,
                          uint32_t n_misses, uint32_t n_cached, uint8_t *cache,
                          uint64_t cache_pages, uint8_t *scratch, uint64_t scratch_size,
                          const struct kcodec_item *items, uint32_t n_items,
                          uint8_t *out, uint64_t out_size)
{
    if (!kcodec_bound())
        return -3;
    c->xor_pages = c->xor_bytes = c->plain_pages = c->xor_blobs = c->xor_blob_bytes = 0;
    uint32_t n = n_hits + n_misses;
    if (n_cached > n_misses || n < n_hits)
        return -1;
    for (uint32_t i = 0; i < n; i++)
        if (pfns[i] >= mem_size / PAGE)
            return -1;
    for (uint32_t i = 0; i < n_hits + n_cached; i++)
        if (slots[i] >= cache_pages)
            return -1;
    int64_t room = kcodec_checkpoint_room(c->patch ? 0 : n_hits, n_hits, n_misses, items,
                                          n_items, scratch_size, out_size);
    if (room < 0)
        return room;

    uint8_t *p = out;
    uint32_t records = 0;
    for (uint32_t start = 0; start < n_hits; start += KCODEC_MAX_PAGES_PER_RECORD, records++) {
        uint32_t count = n_hits - start;
        if (count > KCODEC_MAX_PAGES_PER_RECORD)
            count = KCODEC_MAX_PAGES_PER_RECORD;
        p = c->patch ? patch_batch(c, mem, pfns + start, slots + start, count, cache, p)
                     : xor_batch(c, mem, pfns + start, slots + start, count, cache, scratch, p);
    }
    /* the misses whole; the last n_cached of them take their slots */
    if (n_misses) {
        p += kcodec_pages(mem, mem_size, pfns + n_hits, n_misses, p, UINT64_MAX);
        records += (n_misses + KCODEC_MAX_PAGES_PER_RECORD - 1) / KCODEC_MAX_PAGES_PER_RECORD;
        c->plain_pages += n_misses;
    }
    const uint64_t *cached = pfns + n_hits + (n_misses - n_cached);
    for (uint32_t i = 0; i < n_cached; i++)
        memcpy(cache + (uint64_t)slots[n_hits + i] * PAGE, mem + cached[i] * PAGE, PAGE);
    for (uint32_t i = 0; i < n_items; i++) {
        if (items[i].type == 0) {
            memcpy(p, items[i].data, items[i].len);
            p += items[i].len;
        } else {
            p = blob_record(c, &items[i], scratch, p);
            records++;
        }
    }

    uint64_t body = (uint64_t)(p - out);
    uint8_t *b = put_header(p, TYPE_CHECKPOINT_END, END_BODY);
    uint64_t end_q[2] = { c->seq, c->generation };
    uint32_t counts[2] = { c->records + records + c->item_records, c->pages + n + c->item_pages };
    uint64_t nbytes = c->bytes + body;
    uint32_t tail[2] = { crc_of(c->crc, out, body), 0 };
    memcpy(b, end_q, 16);
    memcpy(b + 16, counts, 8);
    memcpy(b + 24, &nbytes, 8);
    memcpy(b + 32, tail, 8);
    return (int64_t)(body + 8 + END_BODY);
}

#define TYPE_ACK 7u

void kcodec_ack(uint8_t *out, uint64_t seq, uint64_t generation)
{
    uint8_t *b = put_header(out, TYPE_ACK, 16);
    memcpy(b, &seq, 8);
    memcpy(b + 8, &generation, 8);
}

int kcodec_lone_ack(const uint8_t *buf, uint64_t len, uint64_t *seq, uint64_t *generation)
{
    uint16_t type, flags;
    uint32_t length;
    if (len != KCODEC_ACK_SIZE)
        return 0;
    memcpy(&type, buf, 2);
    memcpy(&flags, buf + 2, 2);
    memcpy(&length, buf + 4, 4);
    if (type != TYPE_ACK || flags || length != 16)
        return 0;
    memcpy(seq, buf + 8, 8);
    memcpy(generation, buf + 16, 8);
    return 1;
}

/* ---- a whole checkpoint received (kcodec_receive) ---------------------------------- */

#define TYPE_VCPU 3u
#define TYPE_DEVICE 4u
#define TYPE_HEARTBEAT 8u
#define MAX_BODY (64u << 20)
#define PFN_MASK ((1ull << 52) - 1)

typedef int (*lz4_decompress_fn)(const char *src, char *dst, int src_size, int dst_capacity);
static lz4_decompress_fn lz4_decompress;

int kcodec_bind_decompress(void *lz4_decompress_safe)
{
    lz4_decompress = (lz4_decompress_fn)lz4_decompress_safe;
    return 0;
}

/* The calling thread's staging: grown as needed, kept. */
struct staging {
    uint64_t *pfns;
    uint8_t *data;
    struct kcodec_blob_out *blobs;
    uint8_t *blob_data;
    uint64_t pfns_cap, data_cap, blobs_cap, blob_data_cap;
};
static __thread struct staging st;

static int grow(void **p, uint64_t *cap, uint64_t need, uint64_t unit)
{
    if (need <= *cap)
        return 0;
    uint64_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *q = realloc(*p, n * unit);
    if (q == NULL)
        return -1;
    *p = q;
    *cap = n;
    return 0;
}

static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* The base a BLOB_XOR names: one staged earlier in this checkpoint, else the caller's. */
static const uint8_t *find_base(uint32_t n_blobs, const struct kcodec_base *bases,
                                uint32_t n_bases, uint32_t type, uint32_t ident,
                                uint32_t version, uint64_t len)
{
    for (uint32_t i = n_blobs; i-- > 0;) {
        const struct kcodec_blob_out *b = &st.blobs[i];
        if (b->type == type && b->ident == ident && b->version == version)
            return b->len == len ? st.blob_data + (uintptr_t)b->data : NULL;
    }
    for (uint32_t i = 0; i < n_bases; i++)
        if (bases[i].type == type && bases[i].ident == ident && bases[i].version == version)
            return bases[i].len == len ? bases[i].data : NULL;
    return NULL;
}

/* Stage a blob (copied: the next record may be its delta). 0, or -1. */
static int stage_blob(uint32_t *n_blobs, uint64_t *blob_used, uint32_t type, uint32_t ident,
                      uint32_t version, const uint8_t *data, uint64_t len)
{
    if (grow((void **)&st.blobs, &st.blobs_cap, *n_blobs + 1, sizeof *st.blobs)
        || grow((void **)&st.blob_data, &st.blob_data_cap, *blob_used + len, 1))
        return -1;
    memcpy(st.blob_data + *blob_used, data, len);
    /* an offset for now: blob_data may move while the checkpoint grows */
    st.blobs[*n_blobs] = (struct kcodec_blob_out){ (const uint8_t *)(uintptr_t)*blob_used, len,
                                                   type, ident, version, 0 };
    (*n_blobs)++;
    *blob_used += len;
    return 0;
}

/* Staging kept between checkpoints at most: a rare large checkpoint must not
 * stay in the secondary's memory for good. */
#define KEEP_STAGING (4u << 20)

static void release_large(void **p, uint64_t *cap, uint64_t unit)
{
    if (*cap * unit > KEEP_STAGING) {
        free(*p);
        *p = NULL;
        *cap = 0;
    }
}

static uint16_t get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }

/* A PAGES_PATCH's pages rebuilt into dst: each page's committed content in mem
 * with its runs written over it (codec.PatchPages.from_body's checks: runs
 * ascend, hold a byte or more, stay in the page; nothing after the last).
 * 0, or -1 for a malformed patch. */
static int unpatch(uint8_t *dst, const uint64_t *pfns, uint32_t count, const uint8_t *mem,
                   const uint8_t *q, uint64_t n)
{
    const uint8_t *end = q + n;
    for (uint32_t i = 0; i < count; i++) {
        uint8_t *page = dst + (uint64_t)i * PAGE;
        memcpy(page, mem + pfns[i] * PAGE, PAGE);
        if (end - q < 2)
            return -1;
        uint32_t runs = get16(q), previous_end = 0;
        q += 2;
        for (uint32_t r = 0; r < runs; r++) {
            if (end - q < 4)
                return -1;
            uint32_t offset = get16(q), length = get16(q + 2);
            q += 4;
            if (length == 0 || offset < previous_end || offset + length > PAGE
                || (uint64_t)(end - q) < length)
                return -1;
            memcpy(page + offset, q, length);
            q += length;
            previous_end = offset + length;
        }
    }
    return q == end ? 0 : -1;
}

int64_t kcodec_receive(struct kcodec_rx *rx, const uint8_t *buf, uint64_t len,
                       const uint8_t *mem, const struct kcodec_base *bases, uint32_t n_bases)
{
    if (!kcodec_bound() || lz4_decompress == NULL)
        return 0;
    /* the last call's staging has been applied by now */
    release_large((void **)&st.pfns, &st.pfns_cap, 8);
    release_large((void **)&st.data, &st.data_cap, 1);
    release_large((void **)&st.blobs, &st.blobs_cap, sizeof *st.blobs);
    release_large((void **)&st.blob_data, &st.blob_data_cap, 1);
    uint64_t pos = 0, bytes = rx->queued_bytes, expanded = 0, n_pfns = 0, data_used = 0;
    uint64_t blob_used = 0;
    uint32_t records = rx->queued_records, pages = 0, n_blobs = 0, crc = rx->queued_crc;
    while (pos + 8 <= len) {
        const uint8_t *h = buf + pos;
        uint16_t type, flags;
        memcpy(&type, h, 2);
        memcpy(&flags, h + 2, 2);
        uint32_t length = get32(h + 4);
        uint64_t total = 8 + (uint64_t)length + pad8(length);
        if (flags != 0 || length > MAX_BODY || pos + total > len)
            return 0;
        for (uint64_t i = 8 + (uint64_t)length; i < total; i++)
            if (h[i])
                return 0;
        const uint8_t *body = h + 8;
        if (type == TYPE_CHECKPOINT_END) {
            if (length != END_BODY || get32(body + 36) != 0)
                return 0;
            if (get64(body) != rx->expected_seq || get64(body + 8) != rx->generation
                || get32(body + 16) != records || get32(body + 20) != pages
                || get64(body + 24) != bytes || get32(body + 32) != crc)
                return 0;
            for (uint32_t i = 0; i < n_blobs; i++)       /* offsets become pointers */
                st.blobs[i].data = st.blob_data + (uintptr_t)st.blobs[i].data;
            rx->seq = rx->expected_seq;
            rx->bytes = bytes;
            rx->records = records;
            rx->pages = pages;
            rx->n_pfns = (uint32_t)n_pfns;
            rx->n_blobs = n_blobs;
            rx->pfns = st.pfns;
            rx->data = st.data;
            rx->blobs = st.blobs;
            return (int64_t)(pos + total);
        }
        crc = crc_of(crc, h, total);
        records++;
        bytes += total;
        if (bytes > rx->staging_limit)
            return 0;
        if (type == TYPE_PAGES_XOR || type == TYPE_PAGES
            || (type == TYPE_PAGES_PATCH && rx->patches)) {
            if (length < 8)
                return 0;
            uint32_t count = get32(body), check = get32(body + 4);
            if (count == 0 || count > KCODEC_MAX_PAGES_PER_RECORD
                || (uint64_t)length < 8 + 8 * (uint64_t)count)
                return 0;
            if (type == TYPE_PAGES && (check != 0
                    || (uint64_t)length != 8 + (uint64_t)count * (8 + PAGE)))
                return 0;
            uint64_t size = (uint64_t)count * PAGE;
            if (grow((void **)&st.pfns, &st.pfns_cap, n_pfns + count, 8)
                || grow((void **)&st.data, &st.data_cap, data_used + size, 1))
                return 0;
            for (uint32_t i = 0; i < count; i++) {
                uint64_t pfn = get64(body + 8 + 8 * (uint64_t)i);
                if (pfn > PFN_MASK || pfn >= rx->npages)
                    return 0;
                st.pfns[n_pfns + i] = pfn;
            }
            uint8_t *dst = st.data + data_used;
            const uint8_t *payload = body + 8 + 8 * (uint64_t)count;
            uint64_t payload_len = length - 8 - 8 * (uint64_t)count;
            if (type == TYPE_PAGES) {
                memcpy(dst, payload, size);
            } else if (type == TYPE_PAGES_PATCH) {
                expanded += size;
                if (bytes + expanded > rx->staging_limit
                    || unpatch(dst, st.pfns + n_pfns, count, mem, payload, payload_len)
                    || crc_of(0, dst, size) != check)
                    return 0;
            } else {
                expanded += size;
                if (payload_len == 0 || bytes + expanded > rx->staging_limit
                    || lz4_decompress((const char *)payload, (char *)dst, (int)payload_len,
                                      (int)size) != (int)size)
                    return 0;
                for (uint32_t i = 0; i < count; i++) {
                    uint8_t *d = dst + (uint64_t)i * PAGE;
                    xor_page(d, d, mem + st.pfns[n_pfns + i] * PAGE);
                }
                if (crc_of(0, dst, size) != check)
                    return 0;
            }
            n_pfns += count;
            data_used += size;
            pages += count;
        } else if (type == TYPE_BLOB_XOR) {
            if (length <= 24)
                return 0;
            uint32_t kind = get32(body), ident = get32(body + 4), version = get32(body + 8);
            uint32_t check = get32(body + 12), size = get32(body + 16);
            if (get32(body + 20) != 0 || size == 0 || size > MAX_XOR_BLOB
                || (kind != TYPE_VCPU && kind != TYPE_DEVICE))
                return 0;
            const uint8_t *base = find_base(n_blobs, bases, n_bases, kind, ident, version, size);
            expanded += size;
            if (base == NULL || bytes + expanded > rx->staging_limit)
                return 0;
            if (grow((void **)&st.data, &st.data_cap, data_used + size, 1))
                return 0;
            uint8_t *delta = st.data + data_used;        /* scratch past the staged pages */
            if (lz4_decompress((const char *)body + 24, (char *)delta, (int)(length - 24),
                               (int)size) != (int)size)
                return 0;
            /* base may live in blob_data, which stage_blob may move: XOR first */
            kcodec_xor(delta, delta, base, size);
            if (crc_of(0, delta, size) != check
                || stage_blob(&n_blobs, &blob_used, kind, ident, version, delta, size))
                return 0;
        } else if (type == TYPE_VCPU || type == TYPE_DEVICE) {
            if (length < 8 || stage_blob(&n_blobs, &blob_used, type, get32(body),
                                         get32(body + 4), body + 8, length - 8))
                return 0;
        } else if (type != TYPE_HEARTBEAT || length != 16) {
            return 0;
        }
        pos += total;
    }
    return 0;                /* no END yet: the caller decodes what arrived */
}
