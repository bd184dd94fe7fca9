/*
 * vmm.h - Kemari's KVM micro-VMM core: one VM, one vCPU, flat guest RAM.
 *
 * The run loop itself lives in Python (kemari_agent/vmm.py); this file gives
 * it the pieces that must be C: the KVM ioctls, the vCPU state blob, and the
 * hot paths of dirty tracking (harvest, gather, scatter).
 *
 * Every function returns 0 (or a count) on success and a negative errno on
 * failure; kvmm_error() holds a human-readable message for the last error.
 */
#ifndef KEMARI_VMM_H
#define KEMARI_VMM_H

#include <stddef.h>
#include <stdint.h>

struct kvmm;

/* What stopped the vCPU, copied out of struct kvm_run. */
struct kvmm_exit {
    uint32_t reason;        /* KVMM_EXIT_* */
    uint32_t io_dir;        /* 0 = in, 1 = out */
    uint32_t io_port;
    uint32_t io_size;       /* 1, 2 or 4 */
    uint32_t io_count;      /* > 1 only for string I/O */
    uint32_t mmio_len;
    uint64_t io_value;      /* out: value written by the guest */
    uint64_t mmio_addr;
    uint32_t mmio_write;
    uint32_t suberror;      /* internal error detail */
    uint64_t rip;           /* only for crash reports (filled on errors) */
};

#define KVMM_EXIT_IO            1
#define KVMM_EXIT_MMIO          2
#define KVMM_EXIT_HLT           3
#define KVMM_EXIT_SHUTDOWN      4
#define KVMM_EXIT_INTERNAL      5
#define KVMM_EXIT_KICKED        6   /* kvmm_kick() or a signal interrupted KVM_RUN */
#define KVMM_EXIT_OTHER         7

#define KVMM_STATE_MAGIC        0x5550434b  /* "KCPU" */
#define KVMM_STATE_VERSION      1
#define KVMM_STATE_FULL         0
#define KVMM_STATE_FAST         1

struct kvmm *kvmm_create(uint64_t mem_bytes);
const char *kvmm_error(void);
void kvmm_destroy(struct kvmm *vm);

uint8_t *kvmm_mem(struct kvmm *vm);
uint64_t kvmm_mem_bytes(struct kvmm *vm);

/* Page tables, GDT and a CPL-3 long-mode vCPU entering at `entry` with `stack`. */
int kvmm_setup_long_mode(struct kvmm *vm, uint64_t entry, uint64_t stack);

int kvmm_run(struct kvmm *vm, struct kvmm_exit *exit);
/* Make the current or next KVM_RUN return KVMM_EXIT_KICKED (any thread). */
void kvmm_kick(struct kvmm *vm, int thread_signal);
void kvmm_clear_kick(struct kvmm *vm);
/* Set the value a pending `in` instruction reads (before the next run). */
int kvmm_set_in_value(struct kvmm *vm, uint64_t value);
/* Complete a pending I/O exit without running guest code, so that the vCPU
 * state is consistent for a snapshot (KVM API: immediate_exit). */
int kvmm_complete_pending(struct kvmm *vm);

/* Full vCPU state as one versioned blob. */
int64_t kvmm_state_size(struct kvmm *vm);
int64_t kvmm_get_state(struct kvmm *vm, uint8_t *buf, uint64_t len);
/* The part of the vCPU state a CPL-3 guest can change (GPRs, RIP, RFLAGS,
 * segments, x87/SSE/AVX, TSC): a quarter of the cost of the full blob, for
 * checkpoints. Applied on top of the last full blob it gives the full state,
 * because everything else needs CPL 0 to change. */
int64_t kvmm_get_state_fast(struct kvmm *vm, uint8_t *buf, uint64_t len);
/* The same at a port `out` not yet completed, without completing it (a
 * KVM_RUN, ~10 us on PVM), where completing it has been seen to change
 * nothing: KVM emulated the `out` and moved RIP past it before the exit (PVM
 * does; VMX and SVM move RIP only when completing). Returns 0 where that is
 * not known (then complete the exit first and save); the blob is the same
 * either way. kvmm_out_completion_moves_rip: 1, 0, or -1 not known yet. */
int64_t kvmm_get_state_fast_at_out(struct kvmm *vm, uint8_t *buf, uint64_t len);
int kvmm_out_completion_moves_rip(struct kvmm *vm);
/* Takes a full or a fast blob. */
int kvmm_set_state(struct kvmm *vm, const uint8_t *buf, uint64_t len);

/* Dirty tracking: KVM's log (manual protect + clear) merged with the pages
 * the VMM itself wrote. start() begins with every page dirty. hot_pages:
 * how many pages written at nearly every harvest may stay writable, to
 * spare the guest their write-protect faults; each harvest then reports
 * them whether written or not (0: none, every harvest is exact). */
int kvmm_dirty_start(struct kvmm *vm, uint32_t hot_pages);
#define KVMM_HOT_WINDOW         4   /* written again within this many harvests: hot */
#define KVMM_HOT_LIFETIME       64  /* harvests a page stays hot */
#define KVMM_HOT_MAX_PAGES      256 /* hot_pages is capped here */
int kvmm_dirty_stop(struct kvmm *vm);
int kvmm_dirty_tracking(struct kvmm *vm);
void kvmm_mark_dirty(struct kvmm *vm, uint64_t gpa, uint64_t len);
int kvmm_write(struct kvmm *vm, uint64_t gpa, const void *src, uint64_t len);
/* Fill pfns[] with up to max dirty page numbers, reset tracking for them.
 * Returns the count, or -ENOSPC if more than max are dirty (nothing lost:
 * call again with a bigger buffer). */
int64_t kvmm_dirty_harvest(struct kvmm *vm, uint64_t *pfns, uint64_t max);
/* Copy pages out to / in from a contiguous buffer of n * 4096 bytes. */
int kvmm_gather_pages(struct kvmm *vm, const uint64_t *pfns, uint64_t n, uint8_t *out);
int kvmm_scatter_pages(struct kvmm *vm, const uint64_t *pfns, uint64_t n, const uint8_t *in);
/* Page numbers of pages that are not all zero (for sparse snapshots). */
int64_t kvmm_nonzero_pages(struct kvmm *vm, uint64_t *pfns, uint64_t max);

#endif
