/*
 * fastreceive.h - what each side receives, in one call when it is the
 * common case. The secondary's (kfast_receive): the frame that woke it
 * read, opened, checked and staged as one whole checkpoint, and its ACK
 * sealed and written before anything is applied. The primary's
 * (kfast_wait_ack): its peer's next frame waited for, read and opened, and
 * taken when it is one ACK (docs/benchmarks.md, "The secondary's read in
 * one C call").
 *
 * This chains the C the Python path calls one by one (frames.h's open,
 * codec.h's kcodec_receive, frames.h's seal). What is accepted is still
 * decided by replication/secondary.py: it fills kcodec_rx as for
 * native_codec.receive, says whether the ACK may leave early, and books,
 * applies and commits what was staged. Anything else (no whole frame, a
 * frame that is not exactly one checkpoint the C reader takes, a key change,
 * a frame that fails) is left to the Python path, which gives the verdict;
 * tests compare the two paths' events, images and ACKs.
 */
#ifndef KEMARI_FASTRECEIVE_H
#define KEMARI_FASTRECEIVE_H

#include <stdint.h>

/* kfast_receive's results. TAKEN: one frame, one whole checkpoint, staged in
 * rx (`plain` bytes; start has moved past the frame). NO_FRAME: no whole frame
 * in buf[start, end) (end moved by what the read brought). OPENED: a frame
 * opened in place, `plain` bytes at buf + start + 4, that is not one the C
 * reader takes (nothing staged, start unmoved). CLOSED: the read found the
 * peer's end closed. REFUSED: the frame at start was not opened (a key change
 * is due, a bad length or tag): the Python opener gives the verdict. */
#define KFAST_RX_TAKEN 0
#define KFAST_RX_NO_FRAME 1
#define KFAST_RX_OPENED 2
#define KFAST_RX_CLOSED 3
#define KFAST_RX_REFUSED 4
#define KFAST_RX_READ_FAILED -1   /* errno in `err` */
/* kfast_wait_receive's besides: WAITED: the stream did not wake the call (the
 * timeout, or only another fd; see their revents). POLL_FAILED: errno in `err`. */
#define KFAST_RX_WAITED 5
#define KFAST_RX_POLL_FAILED -2

/* ack_result, after KFAST_RX_TAKEN: */
#define KFAST_ACK_NONE 0       /* not asked for */
#define KFAST_ACK_SENT 1       /* sealed, all of it written */
#define KFAST_ACK_PARTIAL 2    /* sealed, ack_sent of ack_size bytes written */
#define KFAST_ACK_REKEY 3      /* written at ack_frame + 4 (ack_len bytes), not sealed */
#define KFAST_ACK_SEAL_FAILED -1
#define KFAST_ACK_WRITE_FAILED -2  /* errno in `err` */

/* kfast_rx.moments[]: the call's start, after its read(), after the frame opened,
 * and once its ACK is sealed, before that ACK's write() (0 when no ACK was sealed). */
#define KFAST_RX_MOMENTS 4

struct kframe;
struct kcodec_rx;
struct kcodec_base;

struct kfast_rx {
    /* Set once per session by ft/fast_receive.py. */
    struct kframe *opener;          /* the primary's direction */
    struct kframe *sealer;          /* this node's direction */
    int fd;
    /* In, per call. */
    int read;                       /* read() into buf[end, room) first */
    uint8_t *buf;                   /* the opener's buffer: bytes [start, end) arrived, */
    uint64_t start, end, room;      /* not opened yet */
    const uint8_t *mem;             /* kcodec_receive's committed image, */
    const struct kcodec_base *bases;    /* blob bases */
    uint32_t n_bases;
    int ack;                        /* seal and write the ACK of a checkpoint taken */
    int timed;                      /* fill moments[] (KEMARI_STAGES=1) */
    uint8_t *ack_frame;             /* room for that frame (KFRAME_OVERHEAD + KCODEC_ACK_SIZE) */
    int64_t spin_us;                /* kfast_wait_receive: poll again (yielding) this long first */
    /* Out. */
    uint64_t plain;                 /* plaintext bytes of the frame opened */
    int64_t taken_ns;               /* CLOCK_MONOTONIC once taken, before its ACK left */
    int64_t woke_ns;                /* kfast_wait_receive: once poll() returned */
    uint64_t spins;                 /* its polls that found nothing while spinning, in all */
    int64_t moments[KFAST_RX_MOMENTS];  /* with timed: CLOCK_MONOTONIC ns, for the stage trace */
    int ack_result;
    int64_t ack_len, ack_size, ack_sent;
    int64_t err;
};

/* One read's worth: see the KFAST_RX_ results. rx is kcodec_receive's, its
 * inputs filled; on KFAST_RX_TAKEN start has moved past the frame. */
int kfast_receive(struct kfast_rx *r, struct kcodec_rx *rx);

/* What kfast_wait_receive waits on, as poll()'s struct pollfd has it. */
struct kfast_poll {
    int fd;
    short events, revents;
};

/* The secondary's wait, with the GIL released: poll() the n fds (the
 * stream's first) for at most timeout_ms (< 0: no limit); when the stream
 * is readable, kfast_receive(r, rx) at once, its inputs set before the
 * wait (r->read set), else KFAST_RX_WAITED. woke_ns: when poll() returned. */
int kfast_wait_receive(struct kfast_rx *r, struct kcodec_rx *rx, struct kfast_poll *fds,
                       uint32_t n, int timeout_ms);

/* kfast_wait_ack's results. TAKEN: a frame of one ACK record, its seq and
 * generation out (start moved past it). OPENED, CLOSED, REFUSED and
 * READ_FAILED as kfast_receive's. TIMED_OUT: no whole frame within
 * timeout_ms (end moved by what came). NO_ROOM: a frame begun is larger
 * than the room left (the caller makes room). */
#define KFAST_WAIT_TAKEN 0
#define KFAST_WAIT_TIMED_OUT 1
#define KFAST_WAIT_OPENED 2
#define KFAST_WAIT_CLOSED 3
#define KFAST_WAIT_REFUSED 4
#define KFAST_WAIT_NO_ROOM 5
#define KFAST_WAIT_READ_FAILED -1

/* kfast_ack.moments[]: when the last read() began (after poll() returned, if it
 * slept: the wake-up), after that read() and after the frame opened. */
#define KFAST_ACK_MOMENTS 3

struct kfast_ack {
    /* Set once per session by ft/fast_receive.py (FastAck). */
    struct kframe *opener;          /* the secondary's direction */
    int fd;
    /* In, per call. */
    uint8_t *buf;                   /* the opener's buffer, as kfast_rx's */
    uint64_t start, end, room;
    int64_t timeout_ms;             /* the longest to wait in all; < 0: no limit */
    int64_t spin_us;                /* read again (yielding) this long before poll() */
    int timed;                      /* fill moments[] (KEMARI_STAGES=1) */
    /* Out. */
    uint64_t plain;
    uint64_t seq, generation;
    int64_t err;
    uint64_t spins;                 /* reads that found nothing while spinning, in all */
    int64_t moments[KFAST_ACK_MOMENTS]; /* with timed: CLOCK_MONOTONIC ns, for the stage trace */
};

/* The next whole frame: read as it comes (poll() while none is whole, the
 * GIL released), opened in place, and taken if it is one ACK. */
int kfast_wait_ack(struct kfast_ack *a);

#endif
