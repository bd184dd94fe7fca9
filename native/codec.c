/* codec.c - see codec.h. Little-endian host (x86-64), as the stream is. */
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
