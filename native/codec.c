/* codec.c - see codec.h. Little-endian host (x86-64), as the stream is. */
#include <string.h>
#include "codec.h"

#define PAGE 4096u
#define TYPE_PAGES 2u

uint64_t kcodec_pages_size(uint32_t n)
{
    uint64_t records = (n + KCODEC_MAX_PAGES_PER_RECORD - 1) / KCODEC_MAX_PAGES_PER_RECORD;
    return records * 16 + (uint64_t)n * (8 + PAGE);
}

int64_t kcodec_pages(const uint8_t *mem, uint64_t mem_size, const uint64_t *pfns, uint32_t n,
                     uint8_t *out, uint64_t out_size)
{
    uint64_t limit = mem_size / PAGE;
    if (kcodec_pages_size(n) > out_size)
        return -2;
    for (uint32_t i = 0; i < n; i++)
        if (pfns[i] >= limit)
            return -1;
    uint8_t *p = out;
    for (uint32_t start = 0; start < n; start += KCODEC_MAX_PAGES_PER_RECORD) {
        uint32_t count = n - start;
        if (count > KCODEC_MAX_PAGES_PER_RECORD)
            count = KCODEC_MAX_PAGES_PER_RECORD;
        /* header: u16 type, u16 flags, u32 body length (a multiple of 8: no padding) */
        uint32_t length = 8 + 8 * count + PAGE * count;
        uint16_t type = TYPE_PAGES, flags = 0;
        uint32_t reserved = 0;
        memcpy(p, &type, 2);
        memcpy(p + 2, &flags, 2);
        memcpy(p + 4, &length, 4);
        memcpy(p + 8, &count, 4);
        memcpy(p + 12, &reserved, 4);
        p += 16;
        memcpy(p, pfns + start, 8 * (size_t)count);
        p += 8 * (size_t)count;
        for (uint32_t i = 0; i < count; i++, p += PAGE)
            memcpy(p, mem + pfns[start + i] * PAGE, PAGE);
    }
    return p - out;
}
