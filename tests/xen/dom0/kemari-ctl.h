/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Thin wrappers around XEN_DOMCTL_kemari and the few other hypercalls the
 * dom0 test needs, issued through libxencall (privcmd).
 */
#ifndef KEMARI_CTL_H
#define KEMARI_CTL_H

#include <stdbool.h>
#include <stdint.h>

#include <xen/xen.h>
#include <xen/domctl.h>
#include <xen/event_channel.h>

#define KEMARI_MAX_PORTS 4096

struct kemari_ctl;

struct kemari_state {
	uint32_t flags;		/* XEN_DOMCTL_KEMARI_F_* */
	uint32_t nr_held;
	uint32_t nr_ports;	/* the tap's bitmap size (GET_HELD) */
	uint8_t held[KEMARI_MAX_PORTS / 8];
};

struct kemari_ctl *kemari_open(void);
void kemari_close(struct kemari_ctl *k);

/*
 * All return 0 or a negative errno; state may be NULL.
 * ARM (or ADOPT, with adopt) the tap on ports, told on notify_port (0:
 * VIRQ_KEMARI); *owner is the token to re-arm with and gets the new one.
 */
int kemari_arm(struct kemari_ctl *k, uint16_t dom, const uint32_t *ports,
	       unsigned int nr, uint32_t notify_port, bool adopt,
	       uint32_t *owner, struct kemari_state *state);
/* RELEASE or DISARM, as the owner with this token. */
int kemari_owner_op(struct kemari_ctl *k, uint16_t dom, uint32_t op,
		    uint32_t owner, struct kemari_state *state);
int kemari_get_held(struct kemari_ctl *k, uint16_t dom,
		    struct kemari_state *state);
int kemari_alloc_unbound(struct kemari_ctl *k, uint16_t dom, uint32_t port,
			 uint16_t remote);

/* Whether the toolstack sees the domain as paused (XEN_DOMINF_paused). */
int kemari_dom_paused(struct kemari_ctl *k, uint16_t dom, bool *paused);

/* Whether any of the domain's vCPUs (up to max_vcpus) is running, and
 * the time they have run (ns). */
int kemari_vcpus_running(struct kemari_ctl *k, uint16_t dom,
			 unsigned int max_vcpus, bool *running,
			 uint64_t *cpu_time);

/* EVTCHNOP_status of dom's port: its state and, if interdomain, the peer. */
int kemari_evtchn_status(struct kemari_ctl *k, uint16_t dom, uint32_t port,
			 uint32_t *status, uint16_t *peer_dom,
			 uint32_t *peer_port);

/* EVTCHNOP_status in full: also the vCPU notified and, for a VIRQ, which. */
int kemari_evtchn_status_full(struct kemari_ctl *k, uint16_t dom,
			      uint32_t port, evtchn_status_t *out);

/* Restore side (patch 6): the guest's registrations, read and rebuilt. */
int kemari_get_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu,
		    struct xen_domctl_kemari *out);
int kemari_set_vcpu(struct kemari_ctl *k, uint16_t dom,
		    const struct xen_domctl_kemari *in);
/* *gfn of frame index of kind (XEN_DOMCTL_KEMARI_FRAME_*), *count of them. */
int kemari_get_frame(struct kemari_ctl *k, uint16_t dom, uint32_t kind,
		     uint32_t index, uint64_t *gfn, uint32_t *count);
int kemari_add_event_array(struct kemari_ctl *k, uint16_t dom, uint64_t gfn);
/* virq XEN_DOMCTL_KEMARI_BIND_IPI binds an IPI port. */
int kemari_bind_at(struct kemari_ctl *k, uint16_t dom, uint32_t port,
		   uint32_t vcpu, uint32_t virq);
int kemari_resume_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu,
		       uint64_t timer);
/* XEN_DOMCTL_setvcpucontext with no context: reset the vCPU (down). */
int kemari_reset_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu);

static inline bool kemari_port_held(const struct kemari_state *s, uint32_t p)
{
	return p < KEMARI_MAX_PORTS && (s->held[p / 8] & (1u << (p % 8)));
}

#endif
