/* SPDX-License-Identifier: GPL-2.0-only */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <xencall.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#include <xen/event_channel.h>

#include "kemari-ctl.h"

struct kemari_ctl {
	xencall_handle *xcall;
	struct xen_domctl *domctl;	/* hypercall-safe buffers */
	uint8_t *bitmap;
	evtchn_status_t *status;
};

struct kemari_ctl *kemari_open(void)
{
	struct kemari_ctl *k = calloc(1, sizeof(*k));

	if (!k)
		return NULL;
	k->xcall = xencall_open(NULL, 0);
	if (!k->xcall)
		goto fail;
	k->domctl = xencall_alloc_buffer(k->xcall, sizeof(*k->domctl));
	k->bitmap = xencall_alloc_buffer(k->xcall, KEMARI_MAX_PORTS / 8);
	k->status = xencall_alloc_buffer(k->xcall, sizeof(*k->status));
	if (!k->domctl || !k->bitmap || !k->status)
		goto fail;
	return k;
fail:
	kemari_close(k);
	return NULL;
}

void kemari_close(struct kemari_ctl *k)
{
	if (!k)
		return;
	if (k->xcall) {
		if (k->domctl)
			xencall_free_buffer(k->xcall, k->domctl);
		if (k->bitmap)
			xencall_free_buffer(k->xcall, k->bitmap);
		if (k->status)
			xencall_free_buffer(k->xcall, k->status);
		xencall_close(k->xcall);
	}
	free(k);
}

static int domctl(struct kemari_ctl *k, uint32_t cmd, uint16_t dom)
{
	k->domctl->cmd = cmd;
	k->domctl->interface_version = XEN_DOMCTL_INTERFACE_VERSION;
	k->domctl->domain = dom;
	if (xencall1(k->xcall, __HYPERVISOR_domctl, (uintptr_t)k->domctl) < 0)
		return -errno;
	return 0;
}

static int kemari_domctl(struct kemari_ctl *k, uint16_t dom, uint32_t op,
			 bool with_bitmap, uint32_t notify_port,
			 uint32_t *owner, struct kemari_state *state)
{
	struct xen_domctl_kemari *kop = &k->domctl->u.kemari;
	int rc;

	memset(k->domctl, 0, sizeof(*k->domctl));
	kop->op = op;
	kop->u.tap.notify_port = notify_port;
	kop->u.tap.owner = owner ? *owner : 0;
	if (with_bitmap) {
		set_xen_guest_handle(kop->u.tap.ports.bitmap, k->bitmap);
		kop->u.tap.ports.nr_bits = KEMARI_MAX_PORTS;
	}
	rc = domctl(k, XEN_DOMCTL_kemari, dom);
	if (!rc && owner && (op == XEN_DOMCTL_KEMARI_ARM ||
			     op == XEN_DOMCTL_KEMARI_ADOPT))
		*owner = kop->u.tap.owner;
	if (state) {
		memset(state, 0, sizeof(*state));
		state->flags = kop->flags;
		if (!rc && op == XEN_DOMCTL_KEMARI_GET_HELD) {
			state->nr_held = kop->u.tap.nr_held;
			state->nr_ports = kop->u.tap.nr_ports;
			memcpy(state->held, k->bitmap, sizeof(state->held));
		}
	}
	return rc;
}

int kemari_arm(struct kemari_ctl *k, uint16_t dom, const uint32_t *ports,
	       unsigned int nr, uint32_t notify_port, bool adopt,
	       uint32_t *owner, struct kemari_state *state)
{
	unsigned int i;

	memset(k->bitmap, 0, KEMARI_MAX_PORTS / 8);
	for (i = 0; i < nr; i++) {
		if (ports[i] >= KEMARI_MAX_PORTS)
			return -EINVAL;
		k->bitmap[ports[i] / 8] |= 1u << (ports[i] % 8);
	}
	return kemari_domctl(k, dom, adopt ? XEN_DOMCTL_KEMARI_ADOPT :
			     XEN_DOMCTL_KEMARI_ARM, true, notify_port, owner,
			     state);
}

int kemari_owner_op(struct kemari_ctl *k, uint16_t dom, uint32_t op,
		    uint32_t owner, struct kemari_state *state)
{
	return kemari_domctl(k, dom, op, false, 0, &owner, state);
}

int kemari_get_held(struct kemari_ctl *k, uint16_t dom,
		    struct kemari_state *state)
{
	memset(k->bitmap, 0xff, KEMARI_MAX_PORTS / 8);
	return kemari_domctl(k, dom, XEN_DOMCTL_KEMARI_GET_HELD, true, 0, NULL,
			     state);
}

int kemari_alloc_unbound(struct kemari_ctl *k, uint16_t dom, uint32_t port,
			 uint16_t remote)
{
	struct xen_domctl_kemari *kop = &k->domctl->u.kemari;

	memset(k->domctl, 0, sizeof(*k->domctl));
	kop->op = XEN_DOMCTL_KEMARI_ALLOC_UNBOUND;
	kop->u.alloc_unbound.port = port;
	kop->u.alloc_unbound.remote_dom = remote;
	return domctl(k, XEN_DOMCTL_kemari, dom);
}

int kemari_dom_paused(struct kemari_ctl *k, uint16_t dom, bool *paused)
{
	int rc;

	memset(k->domctl, 0, sizeof(*k->domctl));
	rc = domctl(k, XEN_DOMCTL_getdomaininfo, dom);
	if (rc)
		return rc;
	if (k->domctl->u.getdomaininfo.domain != dom)
		return -ESRCH;
	*paused = k->domctl->u.getdomaininfo.flags & XEN_DOMINF_paused;
	return 0;
}

int kemari_evtchn_status(struct kemari_ctl *k, uint16_t dom, uint32_t port,
			 uint32_t *status, uint16_t *peer_dom,
			 uint32_t *peer_port)
{
	evtchn_status_t st;
	int rc = kemari_evtchn_status_full(k, dom, port, &st);

	if (rc)
		return rc;
	*status = st.status;
	*peer_dom = st.u.interdomain.dom;
	*peer_port = st.u.interdomain.port;
	return 0;
}

int kemari_vcpus_running(struct kemari_ctl *k, uint16_t dom,
			 unsigned int max_vcpus, bool *running,
			 uint64_t *cpu_time)
{
	unsigned int v;
	int rc;

	*running = false;
	*cpu_time = 0;
	for (v = 0; v < max_vcpus; v++) {
		memset(k->domctl, 0, sizeof(*k->domctl));
		k->domctl->u.getvcpuinfo.vcpu = v;
		rc = domctl(k, XEN_DOMCTL_getvcpuinfo, dom);
		if ((rc == -ESRCH || rc == -EINVAL) && v > 0)
			break;		/* no such vCPU */
		if (rc)
			return rc;
		*running |= k->domctl->u.getvcpuinfo.running;
		*cpu_time += k->domctl->u.getvcpuinfo.cpu_time;
	}
	return 0;
}

int kemari_evtchn_status_full(struct kemari_ctl *k, uint16_t dom,
			      uint32_t port, evtchn_status_t *out)
{
	memset(k->status, 0, sizeof(*k->status));
	k->status->dom = dom;
	k->status->port = port;
	if (xencall2(k->xcall, __HYPERVISOR_event_channel_op, EVTCHNOP_status,
		     (uintptr_t)k->status) < 0)
		return -errno;
	*out = *k->status;
	return 0;
}

static struct xen_domctl_kemari *kemari_op(struct kemari_ctl *k, uint32_t op)
{
	memset(k->domctl, 0, sizeof(*k->domctl));
	k->domctl->u.kemari.op = op;
	return &k->domctl->u.kemari;
}

int kemari_get_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu,
		    struct xen_domctl_kemari *out)
{
	int rc;

	kemari_op(k, XEN_DOMCTL_KEMARI_GET_VCPU)->u.vcpu.vcpu = vcpu;
	rc = domctl(k, XEN_DOMCTL_kemari, dom);
	*out = k->domctl->u.kemari;
	return rc;
}

int kemari_set_vcpu(struct kemari_ctl *k, uint16_t dom,
		    const struct xen_domctl_kemari *in)
{
	kemari_op(k, XEN_DOMCTL_KEMARI_SET_VCPU)->u.vcpu = in->u.vcpu;
	return domctl(k, XEN_DOMCTL_kemari, dom);
}

int kemari_get_frame(struct kemari_ctl *k, uint16_t dom, uint32_t kind,
		     uint32_t index, uint64_t *gfn, uint32_t *count)
{
	struct xen_domctl_kemari *kop = kemari_op(k, XEN_DOMCTL_KEMARI_GET_FRAME);
	int rc;

	kop->u.frame.kind = kind;
	kop->u.frame.index = index;
	rc = domctl(k, XEN_DOMCTL_kemari, dom);
	*gfn = kop->u.frame.gfn;
	*count = kop->u.frame.count;
	return rc;
}

int kemari_add_event_array(struct kemari_ctl *k, uint16_t dom, uint64_t gfn)
{
	kemari_op(k, XEN_DOMCTL_KEMARI_ADD_EVENT_ARRAY)->u.frame.gfn = gfn;
	return domctl(k, XEN_DOMCTL_kemari, dom);
}

int kemari_bind_at(struct kemari_ctl *k, uint16_t dom, uint32_t port,
		   uint32_t vcpu, uint32_t virq)
{
	struct xen_domctl_kemari *kop = kemari_op(k, XEN_DOMCTL_KEMARI_BIND_AT);

	kop->u.bind.port = port;
	kop->u.bind.vcpu = vcpu;
	kop->u.bind.virq = virq;
	return domctl(k, XEN_DOMCTL_kemari, dom);
}

int kemari_resume_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu,
		       uint64_t timer)
{
	struct xen_domctl_kemari *kop = kemari_op(k, XEN_DOMCTL_KEMARI_RESUME_VCPU);

	kop->u.vcpu.vcpu = vcpu;
	kop->u.vcpu.timer = timer;
	return domctl(k, XEN_DOMCTL_kemari, dom);
}

int kemari_reset_vcpu(struct kemari_ctl *k, uint16_t dom, uint32_t vcpu)
{
	memset(k->domctl, 0, sizeof(*k->domctl));
	k->domctl->u.vcpucontext.vcpu = vcpu;	/* a NULL ctxt handle */
	return domctl(k, XEN_DOMCTL_setvcpucontext, dom);
}
