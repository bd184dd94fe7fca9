/* page_index.c - the primary's delta cache index (see codec.h, kcodec_index).
 *
 * Which guest page each cache slot holds, least recently sent first: the
 * bookkeeping delta.PageCache.plan() does with an OrderedDict, here so that a
 * checkpoint's planning costs no Python per page. A guest page's slot is a
 * direct lookup (4 bytes per guest page); the slots form a doubly linked
 * list from the least to the most recently sent. */
#include <stdlib.h>
#include <string.h>
#include "codec.h"

#define PAGE 4096u
#define NONE UINT32_MAX

struct kcodec_index {
    uint32_t capacity, count, handed_out;   /* slots 0, 1, 2... go first */
    uint32_t oldest, newest;
    uint64_t guest_pages;
    uint32_t *slot_of;        /* per guest page: its slot + 1, 0 when not cached */
    uint64_t *pfn_of;         /* per slot */
    uint32_t *older, *newer;  /* per slot: its neighbours in the list */
    uint8_t *seen;            /* per guest page, one bit: duplicates, within one plan */
};

struct kcodec_index *kcodec_index_new(uint32_t capacity, uint64_t guest_pages)
{
    if (capacity == 0 || guest_pages == 0 || guest_pages > UINT64_MAX / 8)
        return NULL;
    struct kcodec_index *x = calloc(1, sizeof *x);
    if (!x)
        return NULL;
    x->capacity = capacity;
    x->guest_pages = guest_pages;
    x->oldest = x->newest = NONE;
    x->slot_of = calloc(guest_pages, sizeof *x->slot_of);
    x->pfn_of = calloc(capacity, sizeof *x->pfn_of);
    x->older = calloc(capacity, sizeof *x->older);
    x->newer = calloc(capacity, sizeof *x->newer);
    x->seen = calloc((guest_pages + 7) / 8, 1);
    if (!x->slot_of || !x->pfn_of || !x->older || !x->newer || !x->seen) {
        kcodec_index_free(x);
        return NULL;
    }
    return x;
}

void kcodec_index_free(struct kcodec_index *x)
{
    if (!x)
        return;
    free(x->slot_of);
    free(x->pfn_of);
    free(x->older);
    free(x->newer);
    free(x->seen);
    free(x);
}

uint32_t kcodec_index_len(const struct kcodec_index *x)
{
    return x->count;
}

static void unlink_slot(struct kcodec_index *x, uint32_t s)
{
    if (x->older[s] != NONE)
        x->newer[x->older[s]] = x->newer[s];
    else
        x->oldest = x->newer[s];
    if (x->newer[s] != NONE)
        x->older[x->newer[s]] = x->older[s];
    else
        x->newest = x->older[s];
}

static void append_newest(struct kcodec_index *x, uint32_t s)
{
    x->older[s] = x->newest;
    x->newer[s] = NONE;
    if (x->newest != NONE)
        x->newer[x->newest] = s;
    else
        x->oldest = s;
    x->newest = s;
}

/* A slot for a page not cached: a never used one, else the least recently sent's. */
static uint32_t take_slot(struct kcodec_index *x, uint64_t pfn)
{
    uint32_t s;
    if (x->handed_out < x->capacity) {
        s = x->handed_out++;
        x->count++;
    } else {
        s = x->oldest;
        unlink_slot(x, s);
        x->slot_of[x->pfn_of[s]] = 0;
    }
    append_newest(x, s);
    x->slot_of[pfn] = s + 1;
    x->pfn_of[s] = pfn;
    return s;
}

/* -1 for a page outside guest memory or named twice, before anything changes. */
static int check_pfns(struct kcodec_index *x, uint64_t limit, const uint64_t *pfns, uint32_t n)
{
    uint32_t i;
    int bad = 0;
    for (i = 0; i < n && !bad; i++) {
        uint64_t p = pfns[i];
        if (p >= limit || (x->seen[p / 8] & (1u << (p % 8))))
            bad = 1;
        else
            x->seen[p / 8] |= (uint8_t)(1u << (p % 8));
    }
    while (i-- > 0)                        /* leave the bitmap clear again */
        if (pfns[i] < limit)
            x->seen[pfns[i] / 8] &= (uint8_t)~(1u << (pfns[i] % 8));
    return bad ? -1 : 0;
}

int kcodec_index_plan(struct kcodec_index *x, const uint8_t *mem, uint64_t mem_size,
                      const uint8_t *cache, const uint64_t *pfns, uint32_t n,
                      uint64_t *out_pfns, uint32_t *out_slots, uint32_t counts[4])
{
    uint64_t limit = mem_size / PAGE < x->guest_pages ? mem_size / PAGE : x->guest_pages;
    if (check_pfns(x, limit, pfns, n))
        return -1;
    uint32_t n_hits = 0;
    for (uint32_t i = 0; i < n; i++)
        n_hits += x->slot_of[pfns[i]] != 0;
    /* the hits, now the most recently sent, in their order; then the misses */
    uint32_t h = 0, m = n_hits;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t s = x->slot_of[pfns[i]];
        if (s) {
            unlink_slot(x, s - 1);
            append_newest(x, s - 1);
            out_pfns[h] = pfns[i];
            out_slots[h++] = s - 1;
        } else {
            out_pfns[m++] = pfns[i];
        }
    }
    /* the last misses the cache can hold take slots, in their order */
    uint32_t n_misses = n - n_hits;
    uint32_t first = n_misses > x->capacity ? n_misses - x->capacity : 0;
    for (uint32_t i = first; i < n_misses; i++)
        out_slots[n_hits + (i - first)] = take_slot(x, out_pfns[n_hits + i]);
    uint32_t n_cached = n_misses - first;
    /* hits whose page is still what was sent (a hot page not written) go nowhere:
     * compared with the slots as they are, before this checkpoint fills them */
    uint32_t kept = 0;
    for (uint32_t i = 0; i < n_hits; i++) {
        if (memcmp(mem + out_pfns[i] * PAGE, cache + (uint64_t)out_slots[i] * PAGE, PAGE) == 0)
            continue;
        out_pfns[kept] = out_pfns[i];
        out_slots[kept++] = out_slots[i];
    }
    if (kept < n_hits) {
        memmove(out_pfns + kept, out_pfns + n_hits, (uint64_t)n_misses * sizeof *out_pfns);
        memmove(out_slots + kept, out_slots + n_hits, (uint64_t)n_cached * sizeof *out_slots);
    }
    counts[0] = kept;
    counts[1] = n_misses;
    counts[2] = n_cached;
    counts[3] = n_hits - kept;
    return 0;
}

int64_t kcodec_index_checkpoint(struct kcodec_index *x, struct kcodec_ckpt *c,
                                const uint8_t *mem, uint64_t mem_size, uint8_t *cache,
                                const uint64_t *pfns, uint32_t n, uint64_t *plan_pfns,
                                uint32_t *plan_slots, uint8_t *scratch, uint64_t scratch_size,
                                const struct kcodec_item *items, uint32_t n_items,
                                uint8_t *out, uint64_t out_size)
{
    if (!kcodec_bound())
        return -3;
    /* room for any plan, checked before the plan changes the index */
    int64_t room = kcodec_checkpoint_room(c->patch ? 0 : n, n, n, items, n_items, scratch_size,
                                          out_size);
    if (room < 0)
        return room;
    uint32_t counts[4];
    if (kcodec_index_plan(x, mem, mem_size, cache, pfns, n, plan_pfns, plan_slots, counts))
        return -1;
    int64_t written = kcodec_checkpoint(c, mem, mem_size, plan_pfns, plan_slots, counts[0],
                                        counts[1], counts[2], cache, x->capacity, scratch,
                                        scratch_size, items, n_items, out, out_size);
    c->unchanged_pages = counts[3];
    return written;
}
