/* fastreceive.c - see fastreceive.h. */
#include "fastreceive.h"

#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <unistd.h>

#include "clock.h"
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
    if (r->timed)
        r->moments[3] = kclock_now_ns();
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
    if (r->timed) {
        r->moments[0] = kclock_now_ns();
        r->moments[3] = 0;
    }
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
    if (r->timed)
        r->moments[1] = kclock_now_ns();
    uint8_t *frame = r->buf + r->start;
    int64_t plain = kframe_open(r->opener, frame, r->end - r->start);
    if (r->timed)
        r->moments[2] = kclock_now_ns();
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
    r->taken_ns = kclock_now_ns();
    if (r->ack)
        send_ack(r, rx->seq, rx->generation);
    return KFAST_RX_TAKEN;
}

int kfast_wait_receive(struct kfast_rx *r, struct kcodec_rx *rx, struct kfast_poll *fds,
                       uint32_t n, int timeout_ms)
{
    struct pollfd polls[n ? n : 1];
    for (uint32_t i = 0; i < n; i++)
        polls[i] = (struct pollfd){.fd = fds[i].fd, .events = fds[i].events};
    int ready = 0;
    if (r->spin_us > 0 && timeout_ms != 0) {
        /* Spin first (replication.receive_poll_us): the next checkpoint then
         * finds this thread on its CPU, not a CPU the host has to wake. The
         * yield gives the CPU to anything else that wants it. */
        int64_t start = kclock_now_ns(), until = start + r->spin_us * 1000;
        if (timeout_ms > 0 && until > start + (int64_t)timeout_ms * 1000000)
            until = start + (int64_t)timeout_ms * 1000000;
        while ((ready = poll(polls, n, 0)) == 0 && kclock_now_ns() < until) {
            sched_yield();
            r->spins++;
        }
        if (ready == 0 && timeout_ms > 0) {
            int64_t spent_ms = (kclock_now_ns() - start) / 1000000;
            timeout_ms = spent_ms >= timeout_ms ? 0 : timeout_ms - (int)spent_ms;
        }
    }
    if (ready == 0)
        ready = poll(polls, n, timeout_ms);
    r->woke_ns = kclock_now_ns();
    for (uint32_t i = 0; i < n; i++)
        fds[i].revents = ready > 0 ? polls[i].revents : 0;
    if (ready < 0) {
        if (errno == EINTR)
            return KFAST_RX_WAITED;
        r->err = errno;
        return KFAST_RX_POLL_FAILED;
    }
    if (!n || !(fds[0].revents & (POLLIN | POLLHUP | POLLERR)))
        return KFAST_RX_WAITED;
    return kfast_receive(r, rx);
}

static int64_t now_ms(void)
{
    return kclock_now_ns() / 1000000;
}

int kfast_wait_ack(struct kfast_ack *a)
{
    a->plain = a->seq = a->generation = 0;
    a->err = 0;
    if (a->timed)       /* a frame already read has its moments at the call's start */
        a->moments[0] = a->moments[1] = kclock_now_ns();
    int64_t deadline = a->timeout_ms < 0 ? -1 : now_ms() + a->timeout_ms;
    int64_t spin_until = a->spin_us > 0 ? kclock_now_ns() + a->spin_us * 1000 : 0;
    if (spin_until && deadline >= 0 && spin_until > deadline * 1000000)
        spin_until = deadline * 1000000;
    int64_t plain;
    /* Read what has come; wait only when nothing has. */
    while ((plain = kframe_open(a->opener, a->buf + a->start, a->end - a->start)) == 0) {
        if (a->end == a->room)
            return KFAST_WAIT_NO_ROOM;
        if (a->timed)
            a->moments[0] = kclock_now_ns();
        ssize_t n = read(a->fd, a->buf + a->end, (size_t)(a->room - a->end));
        if (n > 0) {
            a->end += (uint64_t)n;
            if (a->timed)
                a->moments[1] = kclock_now_ns();
            continue;
        }
        if (n == 0)
            return KFAST_WAIT_CLOSED;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) {
            a->err = errno;
            return KFAST_WAIT_READ_FAILED;
        }
        /* Spin first: the guest is paused until the ACK anyway, and a CPU
         * that sleeps in poll() can take the host's time to be woken. The
         * yield lets a secondary sharing this CPU produce the ACK. */
        if (spin_until && kclock_now_ns() < spin_until) {
            sched_yield();
            a->spins++;
            continue;
        }
        int64_t left = deadline < 0 ? -1 : deadline - now_ms();
        if (deadline >= 0 && left <= 0)
            return KFAST_WAIT_TIMED_OUT;
        struct pollfd p = {.fd = a->fd, .events = POLLIN};
        if (poll(&p, 1, left > INT32_MAX ? INT32_MAX : (int)left) < 0 && errno != EINTR) {
            a->err = errno;
            return KFAST_WAIT_READ_FAILED;
        }
    }
    if (a->timed)
        a->moments[2] = kclock_now_ns();
    if (plain < 0)
        return KFAST_WAIT_REFUSED;
    a->plain = (uint64_t)plain;
    if (!kcodec_lone_ack(a->buf + a->start + 4, (uint64_t)plain, &a->seq, &a->generation))
        return KFAST_WAIT_OPENED;
    a->start += (uint64_t)plain + KFRAME_OVERHEAD;
    return KFAST_WAIT_TAKEN;
}
