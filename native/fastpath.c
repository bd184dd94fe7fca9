/* fastpath.c - see fastpath.h. */
#include "fastpath.h"

#include <errno.h>
#include <unistd.h>

#include "clock.h"
#include "codec.h"
#include "frames.h"
#include "vmm.h"

/* The vCPU's fast state, as machine.Machine.get_vcpu_state_fast saves it. */
static int64_t save_vcpu(struct kfast *f, uint8_t *buf)
{
    int64_t n = f->io_pending ? kvmm_get_state_fast_at_out(f->vm, buf, f->vcpu_room) : 0;
    if (n < 0)
        return n;
    if (n == 0) {
        if (f->io_pending) {
            int r = kvmm_complete_pending(f->vm);
            if (r < 0)
                return r;
            f->completed = 1;
        }
        n = kvmm_get_state_fast(f->vm, buf, f->vcpu_room);
    }
    return n;
}

/* The stage trace's moment `i` (KFAST_MOMENTS), when the caller asked for them. */
static void moment(struct kfast *f, int i)
{
    if (f->timed)
        f->moments[i] = kclock_now_ns();
}

int kfast_checkpoint(struct kfast *f, struct kcodec_ckpt *c)
{
    f->completed = 0;
    f->n_pfns = 0;
    f->written = f->frame_size = f->sent = f->err = 0;
    moment(f, 0);
    uint8_t *blob = f->vcpu[f->last ^ 1];
    int64_t vcpu = save_vcpu(f, blob);
    if (vcpu <= 0) {
        f->err = vcpu;
        return KFAST_VCPU_FAILED;
    }
    f->vcpu_len = (uint64_t)vcpu;
    moment(f, 1);
    int64_t n = kvmm_dirty_harvest(f->vm, f->pfns, f->guest_pages);
    if (n < 0) {
        f->err = n;
        return KFAST_HARVEST_FAILED;
    }
    f->n_pfns = (uint64_t)n;
    moment(f, 2);

    /* The blob goes as a delta against the last one of its kind (delta.BlobBases;
     * kcodec_checkpoint sends a blob too large for one whole). */
    const uint8_t *base = f->own_base ? f->vcpu[f->last] : f->vcpu_base;
    uint64_t base_len = f->own_base ? f->last_len : f->vcpu_base_len;
    int based = base && base_len == f->vcpu_len;
    struct kcodec_item item = {
        .data = blob, .base = based ? base : NULL, .len = f->vcpu_len,
        .type = f->vcpu_type, .ident = f->vcpu_ident, .version = f->vcpu_version,
    };
    uint64_t room = f->frame_room - KFRAME_OVERHEAD;
    /* the check kcodec_index_checkpoint makes, before the harvest is lost to it */
    if (kcodec_checkpoint_room(c->patch ? 0 : (uint32_t)n, (uint32_t)n, (uint32_t)n, &item, 1,
                               f->scratch_size, room) < 0)
        return KFAST_TOO_BIG;

    int64_t written = kcodec_index_checkpoint(f->index, c, f->mem, f->mem_size, f->arena,
                                              f->pfns, (uint32_t)n, f->plan_pfns,
                                              f->plan_slots, f->scratch, f->scratch_size,
                                              &item, 1, f->frame + 4, room);
    if (written < 0) {
        f->err = written;
        return KFAST_ENCODE_FAILED;
    }
    f->written = written;
    moment(f, 3);
    /* Written: the caller books it whatever happens to the send, and its blob
     * is the next one's base. */
    f->own_base = 1;
    f->last ^= 1;
    f->last_len = f->vcpu_len;
    f->checkpoints++;
    f->xor_pages += c->xor_pages;
    f->xor_bytes += c->xor_bytes;
    f->plain_pages += c->plain_pages;
    f->xor_blobs += c->xor_blobs;
    f->xor_blob_bytes += c->xor_blob_bytes;
    f->unchanged_pages += c->unchanged_pages;
    int64_t size = kframe_seal(f->sealer, f->frame + 4, (uint32_t)written, f->frame);
    if (size == KFRAME_REKEY)
        return KFAST_REKEY;
    if (size < 0) {
        f->err = size;
        return KFAST_SEAL_FAILED;
    }
    f->frame_size = size;
    moment(f, 4);
    ssize_t sent = write(f->fd, f->frame, (size_t)size);
    moment(f, 5);
    if (sent < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            f->err = errno;
            return KFAST_WRITE_FAILED;
        }
        sent = 0;
    }
    f->sent = sent;
    return sent == size ? KFAST_SENT : KFAST_PARTIAL;
}

int kfast_run(struct kfast *f, struct kcodec_ckpt *c, struct kvmm_exit *ex)
{
    int armed = f->armed;
    f->armed = f->tapped = 0;
    int r = kvmm_run(f->vm, ex);
    if (r < 0 || !armed || ex->reason != KVMM_EXIT_IO || !ex->io_dir || ex->io_count != 1
        || !ex->io_port || (ex->io_port != f->tap_ports[0] && ex->io_port != f->tap_ports[1]))
        return r;
    int64_t now = kclock_now_ns();
    if (f->fast_until_ns && now >= f->fast_until_ns)
        return r;                   /* a full vCPU blob is due: the caller's way */
    f->io_pending = 1;
    f->tapped = 1;
    f->tapped_ns = now;
    f->tap_result = kfast_checkpoint(f, c);
    return r;
}
