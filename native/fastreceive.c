/* fastreceive.c - see fastreceive.h. */
#include "fastreceive.h"

#include <errno.h>
#include <time.h>
#include <unistd.h>

#include "codec.h"
#include "frames.h"

static void send_ack(struct kfast_rx *r, uint64_t seq, uint64_t generation)
{
    kcodec_ack(r->ack_frame + 4, seq, generation);
    r->ack_len = KCODEC_ACK_SIZE;
    int64_t size = kframe_seal(r->sealer, r->ack_frame + 4, KCODEC_ACK_SIZE, r->ack_frame);
    if (size == KFRAME_REKEY) {
        r->ack_result = KFAST_ACK_REKEY;
        return;
    }
    if (size < 0) {
        r->err = size;
        r->ack_result = KFAST_ACK_SEAL_FAILED;
        return;
    }
    r->ack_size = size;
    ssize_t sent = write(r->fd, r->ack_frame, (size_t)size);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            r->err = errno;
            r->ack_result = KFAST_ACK_WRITE_FAILED;
            return;
        }
        sent = 0;
    }
    r->ack_sent = sent;
    r->ack_result = sent == size ? KFAST_ACK_SENT : KFAST_ACK_PARTIAL;
}

int kfast_receive(struct kfast_rx *r, struct kcodec_rx *rx)
{
    r->plain = 0;
    r->ack_result = KFAST_ACK_NONE;
    r->ack_len = r->ack_size = r->ack_sent = r->err = 0;
    if (r->read && r->end < r->room) {
        ssize_t n = read(r->fd, r->buf + r->end, (size_t)(r->room - r->end));
        if (n == 0)
            return KFAST_RX_CLOSED;
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
                r->err = errno;
                return KFAST_RX_READ_FAILED;
            }
        } else {
            r->end += (uint64_t)n;
        }
    }
    uint8_t *frame = r->buf + r->start;
    int64_t plain = kframe_open(r->opener, frame, r->end - r->start);
    if (plain == 0)
        return KFAST_RX_NO_FRAME;
    if (plain < 0)
        return KFAST_RX_REFUSED;
    r->plain = (uint64_t)plain;
    /* Only a frame that is exactly one checkpoint the C reader takes. */
    if (kcodec_receive(rx, frame + 4, (uint64_t)plain, r->mem, r->bases, r->n_bases) != plain)
        return KFAST_RX_OPENED;
    r->start += (uint64_t)plain + KFRAME_OVERHEAD;
    /* The moment for the stage trace: the ACK's write may wake the primary on
     * this CPU, and the caller's clock would then count the primary's run. */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    r->taken_ns = (int64_t)now.tv_sec * 1000000000 + now.tv_nsec;
    if (r->ack)
        send_ack(r, rx->seq, rx->generation);
    return KFAST_RX_TAKEN;
}
