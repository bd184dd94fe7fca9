/*
 * fastpath.h - the primary's protected checkpoint, from the paused vCPU to
 * the socket, in one call (docs/benchmarks.md, "One call per checkpoint").
 *
 * In the daemon, two thirds of each wrapped C call's time on the checkpoint
 * path was the Python around it. This chains the C the Python path calls
 * one by one: the vCPU's fast state (vmm.h), the dirty log's harvest,
 * kcodec_index_checkpoint (codec.h) straight into the frame buffer, the
 * frame sealed there (frames.h) and written to the socket. What the bytes
 * are is still decided by replication/primary.py: the caller takes the
 * sequence number, the counts queued and the vCPU blob's base from it, and
 * tells it what was sent; tests compare the two paths' bytes.
 */
#ifndef KEMARI_FASTPATH_H
#define KEMARI_FASTPATH_H

#include <stdint.h>

/* kfast_checkpoint's results: */
#define KFAST_SENT 0          /* sealed, all of the frame written */
#define KFAST_PARTIAL 1       /* sealed, `sent` bytes of frame_size written: the caller sends the rest */
#define KFAST_REKEY 2         /* written (`written` bytes at frame + 4), not sealed: the key is used up */
#define KFAST_TOO_BIG 3       /* harvested and vCPU saved, nothing written: more than fits a frame */
#define KFAST_VCPU_FAILED -1  /* saving the vCPU failed (kvmm_error); nothing harvested */
#define KFAST_HARVEST_FAILED -2
#define KFAST_ENCODE_FAILED -3   /* kcodec_index_checkpoint's error in `err` */
#define KFAST_SEAL_FAILED -4     /* the cipher is broken */
#define KFAST_WRITE_FAILED -5    /* errno in `err` */

/* kfast.moments[]: the call's start, then after the vCPU's state, the harvest, the
 * encode, the seal and the write. */
#define KFAST_MOMENTS 6

struct kvmm;
struct kcodec_index;
struct kcodec_ckpt;
struct kframe;

struct kfast {
    /* Set once per session by replication/fast_checkpoint.py. */
    struct kvmm *vm;
    struct kcodec_index *index;
    const uint8_t *mem;
    uint64_t mem_size;
    uint8_t *arena;                 /* the index's pages as last sent */
    uint64_t *pfns;                 /* the harvest, guest_pages of room */
    uint64_t *plan_pfns;            /* kcodec_index_checkpoint's plan, ditto */
    uint32_t *plan_slots;
    uint64_t guest_pages;
    uint8_t *scratch;
    uint64_t scratch_size;
    uint8_t *vcpu[2];               /* fast vCPU blobs: the last one sent, the next */
    uint64_t vcpu_room;
    uint32_t vcpu_type, vcpu_ident, vcpu_version;
    struct kframe *sealer;
    uint8_t *frame;                 /* the frame: length, then the checkpoint, then the tag */
    uint64_t frame_room;
    int fd;
    /* The delta base of the next blob: with own_base, vcpu[last] (last_len
     * bytes), which the last call sent; else vcpu_base (NULL: none), set by
     * the caller after a checkpoint of its own sent a blob. A call that sends
     * its blob sets own_base and flips last. */
    int own_base;
    uint32_t last;
    uint64_t last_len;
    const uint8_t *vcpu_base;
    uint64_t vcpu_base_len;
    /* kfast_run's: armed, an `out` of the guest to one of the tap ports (0:
     * none) is checkpointed in the same call, unless the clock (CLOCK_MONOTONIC
     * ns) has passed fast_until_ns; `tapped` says whether it was (at
     * tapped_ns, CLOCK_MONOTONIC), tap_result how (KFAST_*). The caller arms
     * each run: what the checkpoint is (kcodec_ckpt, the base) is set as for
     * kfast_checkpoint. */
    int armed;
    uint32_t tap_ports[2];
    int64_t fast_until_ns;
    int tapped, tap_result;
    int64_t tapped_ns;
    /* In, per call. */
    int io_pending;                 /* the vCPU stopped at an I/O exit not yet completed */
    int timed;                      /* fill moments[] (KEMARI_STAGES=1) */
    /* Out. */
    int completed;                  /* the pending exit was completed */
    uint64_t vcpu_len;              /* the blob saved, in vcpu[last ^ 1] until it is sent */
    uint64_t n_pfns;
    int64_t written, frame_size, sent;
    int64_t err;
    /* With timed: CLOCK_MONOTONIC ns after each step, for the stage trace. */
    int64_t moments[KFAST_MOMENTS];
    uint64_t checkpoints;           /* calls that wrote a checkpoint */
    /* kcodec_ckpt's statistics, added up over the calls (the caller takes them). */
    uint64_t xor_pages, xor_bytes, plain_pages, xor_blobs, xor_blob_bytes, unchanged_pages;
};

/* One protected checkpoint: see the KFAST_ results for what happened. */
int kfast_checkpoint(struct kfast *f, struct kcodec_ckpt *c);

struct kvmm_exit;
/* kvmm_run, and when armed and the vCPU stopped at an `out` to a tap port,
 * the checkpoint (kfast_checkpoint) before the call returns: the guest's
 * event is checkpointed with no Python between its exit and its frame's
 * write. The exit is the caller's as kvmm_run's; the call disarms. */
int kfast_run(struct kfast *f, struct kcodec_ckpt *c, struct kvmm_exit *ex);

#endif
