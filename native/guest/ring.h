/* ring.h - guest side of the Xen-style ring discipline (see kemari_abi.h). */
#ifndef GUEST_RING_H
#define GUEST_RING_H

#include "io.h"
#include "../kemari_abi.h"

typedef volatile struct kemari_ring_hdr ring_hdr_t;

/* After publishing req_prod (old -> new): must the backend be told?
 * req_event == 0 means the backend never asked for anything (fresh, zeroed
 * memory), so notify; otherwise RING_PUSH_REQUESTS_AND_CHECK_NOTIFY. */
static inline int ring_push_needs_notify(ring_hdr_t *h, uint32_t old_prod, uint32_t new_prod)
{
	uint32_t ev;

	mb();  /* req_prod visible before we read req_event */
	ev = h->req_event;
	return ev == 0 || (uint32_t)(new_prod - ev) < (uint32_t)(new_prod - old_prod);
}

/* Ask (on) or decline (off) a wake-up when rsp_prod passes rsp_cons. "Off"
 * puts rsp_event far ahead so neither an edge check (Xen's formula when the
 * backend pushes) nor a level check (rsp_prod >= rsp_event) can fire. */
static inline void ring_arm(ring_hdr_t *h, uint32_t rsp_cons, int on)
{
	h->rsp_event = on ? rsp_cons + 1 : rsp_cons + 0x40000000u;
}

static inline int ring_has_rsp(ring_hdr_t *h, uint32_t rsp_cons)
{
	return h->rsp_prod != rsp_cons;
}

#endif
