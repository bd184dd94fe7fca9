/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kemari-restore: take a checkpoint of a running PVH domU at a held
 * notification of the Kemari tap, and restore it into a second domain that
 * the toolstack built paused from the same configuration (without disk and
 * vif), so the copy runs on from that checkpoint.  What a secondary does at
 * failover, on one host.  One "KEMARI-CHECK <name> PASS|FAIL <detail>" line
 * per step and a final "KEMARI-RESULT PASS|FAIL".
 *
 * usage: kemari-restore --domid A --into B --port PORT... [--timeout SEC] [--late-event]
 *
 * The checkpoint (A, paused by the tap holding a notification on one of the
 * PORTs): the HVM context (vCPU registers, LAPIC, MTRR, XSAVE, MSRs, TSC),
 * the callback param, the guest's registrations that Xen's own save stream
 * leaves to a co-operating guest (patch 6: vcpu_info, FIFO control blocks
 * and event array, runstate and time areas, upcall vector, single-shot
 * timer), its event channels, where it mapped shared_info and its grant
 * frames, every grant entry, and its memory.
 *
 * The restore (B, down and paused), in this order, because registering
 * writes into guest memory and the copy must come last: reset the vCPUs;
 * map shared_info and the grant frames at A's gfns; register the vCPUs'
 * areas and the FIFO ABI; bind every port at A's number (VIRQs and IPIs to
 * their vCPU, interdomain ports as unbound ports for dom0's backends to
 * bind in attach mode); copy the memory and the grant entries; load the HVM
 * context, with the upcall vector raised in the LAPIC of each vCPU whose
 * copied vcpu_info has an upcall pending; rebuild the FIFO queue tails and
 * arm the timers.
 *
 * A is left paused and armed: the caller destroys it (the primary died
 * after the checkpoint), attaches the backends to B and unpauses B.
 */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <xenctrl.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>
#include <xen/hvm/params.h>
#include <xen/hvm/save.h>
#include <xen/memory.h>

#include "checks.h"
#include "kemari-ctl.h"

#define MAX_VCPUS 8
#define MAX_FRAMES 64
#define BATCH 512
#define PAGE 4096

/* What the checkpoint holds, apart from memory (copied straight across). */
struct checkpoint {
	unsigned int nr_vcpus;
	struct xen_domctl_kemari vcpu[MAX_VCPUS];
	uint64_t shared_info_gfn;
	uint32_t nr_grant, nr_array;
	uint64_t grant_gfn[MAX_FRAMES], array_gfn[MAX_FRAMES];
	uint8_t *grants;		/* nr_grant frames of v1 entries */
	evtchn_status_t *ports;
	unsigned int nr_ports;
	uint64_t callback;
	uint8_t *hvm;
	uint32_t hvm_size;
};

static void usage(void)
{
	fprintf(stderr, "usage: kemari-restore --domid A --into B --port PORT... "
		"[--timeout SEC] [--late-event]\n");
	exit(2);
}

/* Arm the tap on the ports and wait until a notification is held. */
static bool wait_for_hold(struct kemari_ctl *k, uint16_t dom,
			  const uint32_t *ports, unsigned int nr, int timeout)
{
	struct kemari_state st;
	uint32_t owner = 0;
	time_t end = time(NULL) + timeout;
	int rc;

	rc = kemari_arm(k, dom, ports, nr, 0, false, &owner, &st);
	if (!check(!rc, "arm", "rc=%d ports=%u", rc, nr))
		return false;
	do {
		rc = kemari_get_held(k, dom, &st);
		if (!rc && (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED))
			return check(st.nr_held > 0, "held", "nr_held=%u flags=%#x",
				     st.nr_held, st.flags);
		usleep(20000);
	} while (time(NULL) < end);
	check(false, "held", "rc=%d: nothing held in %d s", rc, timeout);
	return false;
}

static bool save_frames(struct kemari_ctl *k, uint16_t dom,
			struct checkpoint *c)
{
	uint32_t count, i;
	int rc;

	rc = kemari_get_frame(k, dom, XEN_DOMCTL_KEMARI_FRAME_SHARED_INFO, 0,
			      &c->shared_info_gfn, &count);
	if (!check(!rc && c->shared_info_gfn != XEN_DOMCTL_KEMARI_NO_GFN,
		   "save.shared_info", "rc=%d gfn=%#llx", rc,
		   (unsigned long long)c->shared_info_gfn))
		return false;

	rc = kemari_get_frame(k, dom, XEN_DOMCTL_KEMARI_FRAME_GRANT, 0,
			      &c->grant_gfn[0], &c->nr_grant);
	for (i = 1; !rc && i < c->nr_grant && i < MAX_FRAMES; i++)
		rc = kemari_get_frame(k, dom, XEN_DOMCTL_KEMARI_FRAME_GRANT, i,
				      &c->grant_gfn[i], &count);
	if (!check(!rc && c->nr_grant <= MAX_FRAMES, "save.grant_frames",
		   "rc=%d frames=%u first_gfn=%#llx", rc, c->nr_grant,
		   (unsigned long long)c->grant_gfn[0]))
		return false;

	rc = kemari_get_frame(k, dom, XEN_DOMCTL_KEMARI_FRAME_EVENT_ARRAY, 0,
			      &c->array_gfn[0], &c->nr_array);
	for (i = 1; !rc && i < c->nr_array && i < MAX_FRAMES; i++)
		rc = kemari_get_frame(k, dom, XEN_DOMCTL_KEMARI_FRAME_EVENT_ARRAY,
				      i, &c->array_gfn[i], &count);
	/* Linux uses the FIFO ABI by default: one array page at least. */
	return check(!rc && c->nr_array >= 1 && c->nr_array <= MAX_FRAMES,
		     "save.event_array", "rc=%d pages=%u first_gfn=%#llx", rc,
		     c->nr_array, (unsigned long long)c->array_gfn[0]);
}

/* Map nr grant frames of dom through XENMEM_acquire_resource. */
static void *map_grants(xenforeignmemory_handle *fmem, uint16_t dom,
			uint32_t nr, int prot,
			xenforeignmemory_resource_handle **res)
{
	void *addr = NULL;

	*res = xenforeignmemory_map_resource(fmem, dom,
					     XENMEM_resource_grant_table,
					     XENMEM_resource_grant_table_id_shared,
					     0, nr, &addr, prot, 0);
	return *res ? addr : NULL;
}

static bool save_grants(xenforeignmemory_handle *fmem, uint16_t dom,
			struct checkpoint *c)
{
	xenforeignmemory_resource_handle *res;
	void *src = map_grants(fmem, dom, c->nr_grant, PROT_READ, &res);

	c->grants = malloc((size_t)c->nr_grant * PAGE);
	if (!check(src && c->grants, "save.grant_entries", "frames=%u errno=%d",
		   c->nr_grant, src ? 0 : errno))
		return false;
	memcpy(c->grants, src, (size_t)c->nr_grant * PAGE);
	xenforeignmemory_unmap_resource(fmem, res);
	return true;
}

static bool save_ports(struct kemari_ctl *k, uint16_t dom, struct checkpoint *c)
{
	unsigned int port, live = 0, cap = 4096;
	int rc = 0;

	c->ports = calloc(cap, sizeof(*c->ports));
	for (port = 1; c->ports && port < cap; port++) {
		rc = kemari_evtchn_status_full(k, dom, port, &c->ports[port]);
		if (rc == -EINVAL)	/* beyond the domain's ports */
			break;
		if (rc)
			break;
		if (c->ports[port].status != EVTCHNSTAT_closed)
			live++;
	}
	c->nr_ports = port;
	return check(c->ports && (rc == 0 || rc == -EINVAL) && live > 0,
		     "save.ports", "rc=%d live=%u scanned=%u", rc, live, port);
}

static bool save(xc_interface *xch, xenforeignmemory_handle *fmem,
		 struct kemari_ctl *k, uint16_t dom, struct checkpoint *c)
{
	xc_dominfo_t info;
	unsigned int v;
	int rc, size;

	if (xc_domain_getinfo(xch, dom, 1, &info) != 1 || info.domid != dom)
		return check(false, "save.info", "errno=%d", errno);
	c->nr_vcpus = info.max_vcpu_id + 1;
	if (!check(info.hvm && c->nr_vcpus <= MAX_VCPUS, "save.info",
		   "hvm=%d vcpus=%u", info.hvm, c->nr_vcpus))
		return false;

	for (v = 0; v < c->nr_vcpus; v++) {
		struct xen_domctl_kemari *s = &c->vcpu[v];
		char name[32];

		rc = kemari_get_vcpu(k, dom, v, s);
		snprintf(name, sizeof(name), "save.vcpu%u", v);
		/* Linux 6.1 as PVH places vcpu_info and uses FIFO and a vector. */
		if (!check(!rc && s->u.vcpu.vcpu_info_gfn != XEN_DOMCTL_KEMARI_NO_GFN &&
			   s->u.vcpu.fifo_gfn != XEN_DOMCTL_KEMARI_NO_GFN, name,
			   "rc=%d vcpu_info=%#llx+%#x fifo=%#llx+%#x vector=%#x "
			   "runstate=%#llx time=%#llx timer=%llu", rc,
			   (unsigned long long)s->u.vcpu.vcpu_info_gfn,
			   s->u.vcpu.vcpu_info_offset,
			   (unsigned long long)s->u.vcpu.fifo_gfn,
			   s->u.vcpu.fifo_offset, s->u.vcpu.upcall_vector,
			   (unsigned long long)s->u.vcpu.runstate_va,
			   (unsigned long long)s->u.vcpu.time_va,
			   (unsigned long long)s->u.vcpu.timer))
			return false;
	}
	if (!save_frames(k, dom, c) || !save_grants(fmem, dom, c) ||
	    !save_ports(k, dom, c))
		return false;

	rc = xc_hvm_param_get(xch, dom, HVM_PARAM_CALLBACK_IRQ, &c->callback);
	check(!rc, "save.callback", "rc=%d via=%#llx", rc,
	      (unsigned long long)c->callback);

	size = xc_domain_hvm_getcontext(xch, dom, NULL, 0);
	c->hvm = size > 0 ? malloc(size) : NULL;
	if (c->hvm)
		size = xc_domain_hvm_getcontext(xch, dom, c->hvm, size);
	c->hvm_size = size > 0 ? size : 0;
	return check(c->hvm && size > 0, "save.hvm_context", "bytes=%d", size);
}

/* The vCPUs go down first: their areas can only be registered then. */
static bool restore_vcpus(struct kemari_ctl *k, uint16_t dom,
			  const struct checkpoint *c)
{
	unsigned int v, i;
	int rc = 0;

	for (v = 0; v < c->nr_vcpus && !rc; v++)
		rc = kemari_reset_vcpu(k, dom, v);
	if (!check(!rc, "restore.vcpus_down", "rc=%d", rc))
		return false;
	for (v = 0; v < c->nr_vcpus && !rc; v++)
		rc = kemari_set_vcpu(k, dom, &c->vcpu[v]);
	if (!check(!rc, "restore.vcpu_areas", "rc=%d vcpus=%u", rc, c->nr_vcpus))
		return false;
	for (i = 0; i < c->nr_array && !rc; i++)
		rc = kemari_add_event_array(k, dom, c->array_gfn[i]);
	return check(!rc, "restore.event_array", "rc=%d pages=%u", rc,
		     c->nr_array);
}

static bool restore_frames(xc_interface *xch, uint16_t dom,
			   const struct checkpoint *c)
{
	unsigned int i;
	int rc;

	rc = xc_domain_add_to_physmap(xch, dom, XENMAPSPACE_shared_info, 0,
				      c->shared_info_gfn);
	if (!check(!rc, "restore.shared_info", "rc=%d errno=%d", rc, rc ? errno : 0))
		return false;
	for (i = 0, rc = 0; i < c->nr_grant && !rc; i++)
		if (c->grant_gfn[i] != XEN_DOMCTL_KEMARI_NO_GFN)
			rc = xc_domain_add_to_physmap(xch, dom,
						      XENMAPSPACE_grant_table,
						      i, c->grant_gfn[i]);
	return check(!rc, "restore.grant_frames", "rc=%d errno=%d frames=%u",
		     rc, rc ? errno : 0, c->nr_grant);
}

/* Every port of A at its number in B, bound as in A. */
static bool restore_ports(struct kemari_ctl *k, uint16_t dom,
			  const struct checkpoint *c)
{
	unsigned int port, made = 0, kept = 0;
	evtchn_status_t now;
	int rc = 0;

	for (port = 1; port < c->nr_ports && !rc; port++) {
		const evtchn_status_t *p = &c->ports[port];

		if (p->status == EVTCHNSTAT_closed)
			continue;
		/*
		 * The toolstack made xenstore's and the console's ports: bound
		 * by their daemons, or still waiting for them to bind.
		 */
		if (!kemari_evtchn_status_full(k, dom, port, &now) &&
		    p->status == EVTCHNSTAT_interdomain &&
		    ((now.status == EVTCHNSTAT_interdomain &&
		      now.u.interdomain.dom == p->u.interdomain.dom) ||
		     (now.status == EVTCHNSTAT_unbound &&
		      now.u.unbound.dom == p->u.interdomain.dom))) {
			kept++;
			continue;
		}
		switch (p->status) {
		case EVTCHNSTAT_unbound:
			rc = kemari_alloc_unbound(k, dom, port, p->u.unbound.dom);
			break;
		case EVTCHNSTAT_interdomain:	/* a backend binds in attach mode */
			rc = kemari_alloc_unbound(k, dom, port, p->u.interdomain.dom);
			break;
		case EVTCHNSTAT_virq:
			rc = kemari_bind_at(k, dom, port, p->vcpu, p->u.virq);
			break;
		case EVTCHNSTAT_ipi:
			rc = kemari_bind_at(k, dom, port, p->vcpu,
					    XEN_DOMCTL_KEMARI_BIND_IPI);
			break;
		default:		/* PIRQs: no passthrough here */
			rc = -EOPNOTSUPP;
		}
		if (rc)
			printf("port %u status %u: rc=%d\n", port, p->status, rc);
		made++;
	}
	return check(!rc, "restore.ports", "rc=%d made=%u kept=%u", rc, made, kept);
}

/*
 * Copy every page B has (the layout the toolstack built from the same
 * configuration: RAM and the special pages, xenstore and console rings
 * included) from A, but the frames Xen owns (shared_info, grant frames).
 */
static bool restore_memory(xc_interface *xch, xenforeignmemory_handle *fmem,
			   uint16_t a, uint16_t b, const struct checkpoint *c)
{
	xen_pfn_t max_gpfn = 0, base, gfns[BATCH];
	int err_a[BATCH], err_b[BATCH];
	unsigned long copied = 0, missing = 0;
	unsigned int i, n, j;

	if (xc_domain_maximum_gpfn(xch, b, &max_gpfn) < 0)
		return check(false, "restore.memory", "max_gpfn errno=%d", errno);
	for (base = 0; base <= max_gpfn; base += BATCH) {
		uint8_t *src, *dst;

		n = max_gpfn + 1 - base < BATCH ? max_gpfn + 1 - base : BATCH;
		for (i = 0; i < n; i++)
			gfns[i] = base + i;
		dst = xenforeignmemory_map(fmem, b, PROT_READ | PROT_WRITE, n,
					   gfns, err_b);
		src = xenforeignmemory_map(fmem, a, PROT_READ, n, gfns, err_a);
		if (!dst || !src) {
			if (dst)
				xenforeignmemory_unmap(fmem, dst, n);
			if (src)
				xenforeignmemory_unmap(fmem, src, n);
			continue;	/* nothing mapped in this range */
		}
		for (i = 0; i < n; i++) {
			bool xen_frame = gfns[i] == c->shared_info_gfn;

			for (j = 0; j < c->nr_grant; j++)
				xen_frame |= gfns[i] == c->grant_gfn[j];
			if (err_b[i] || xen_frame)
				continue;
			if (err_a[i]) {
				missing++;
				continue;
			}
			memcpy(dst + (size_t)i * PAGE, src + (size_t)i * PAGE, PAGE);
			copied++;
		}
		xenforeignmemory_unmap(fmem, dst, n);
		xenforeignmemory_unmap(fmem, src, n);
	}
	return check(copied > 1000 && !missing, "restore.memory",
		     "pages=%lu missing_in_checkpoint=%lu max_gpfn=%#llx", copied,
		     missing, (unsigned long long)max_gpfn);
}

/* The entries in use by the backends: Xen's own in-use bits left out. */
static bool restore_grants(xenforeignmemory_handle *fmem, uint16_t dom,
			   const struct checkpoint *c)
{
	xenforeignmemory_resource_handle *res;
	grant_entry_v1_t *dst = map_grants(fmem, dom, c->nr_grant,
					   PROT_READ | PROT_WRITE, &res);
	const grant_entry_v1_t *src = (const grant_entry_v1_t *)c->grants;
	unsigned int i, n = c->nr_grant * (PAGE / sizeof(*src)), used = 0;

	if (!check(dst != NULL, "restore.grant_map", "errno=%d", dst ? 0 : errno))
		return false;
	for (i = 0; i < n; i++) {
		dst[i].frame = src[i].frame;
		dst[i].domid = src[i].domid;
		__sync_synchronize();
		dst[i].flags = src[i].flags & ~(GTF_reading | GTF_writing);
		used += (src[i].flags & GTF_type_mask) != GTF_invalid;
	}
	xenforeignmemory_unmap_resource(fmem, res);
	return check(used > 0, "restore.grant_entries", "in_use=%u of %u", used, n);
}

/* The byte and bit of vector's IRR bit in vCPU v's saved LAPIC, or NULL. */
static uint8_t *saved_irr(struct checkpoint *c, unsigned int v, uint8_t vector,
			  uint8_t *bit)
{
	uint32_t off = 0;

	*bit = 1u << (vector % 8);
	if (vector < 16)	/* none registered, or not a valid vector */
		return NULL;
	while (off + sizeof(struct hvm_save_descriptor) <= c->hvm_size) {
		struct hvm_save_descriptor *d = (void *)(c->hvm + off);
		uint8_t *regs = c->hvm + off + sizeof(*d);

		if (d->typecode == 0 ||
		    off + sizeof(*d) + d->length > c->hvm_size)
			break;
		if (d->typecode == HVM_SAVE_CODE(LAPIC_REGS) && d->instance == v &&
		    d->length == sizeof(struct hvm_hw_lapic_regs))
			return &regs[0x200 + (vector / 32) * 16 + (vector % 32) / 8];
		off += sizeof(*d) + d->length;
	}
	return NULL;
}

/*
 * --late-event: the saved LAPICs as if the event that marked an upcall
 * pending had come just after the save, as a guest's timer or a backend's
 * notification can while the primary is paused (CI, 2026-12-06): the
 * memory copied later has the upcall pending, the saved IRR lacks the
 * vector.  raise_pending_upcalls() must mend it, or the copy never runs.
 */
static void drop_saved_upcalls(struct checkpoint *c)
{
	unsigned int v, dropped = 0;
	uint8_t bit, *irr;

	for (v = 0; v < c->nr_vcpus; v++) {
		irr = saved_irr(c, v, c->vcpu[v].u.vcpu.upcall_vector, &bit);
		if (irr && (*irr & bit)) {
			*irr &= ~bit;
			dropped++;
		}
	}
	printf("RESULT late_event info upcall vector taken out of %u of %u saved IRRs\n",
	       dropped, c->nr_vcpus);
}

/*
 * Xen raises the upcall vector only when it sets evtchn_upcall_pending
 * from clear.  The copied vcpu_info can have it set by an event that came
 * after the LAPIC was saved: the copy would then never see an upcall
 * again.  So a pending upcall gets its vector in the IRR, as Xen's own
 * map_vcpu_info() does it: at worst one spurious upcall.
 */
static bool raise_pending_upcalls(xenforeignmemory_handle *fmem, uint16_t b,
				  struct checkpoint *c)
{
	unsigned int v, pending = 0, raised = 0, was_raised = 0;

	for (v = 0; v < c->nr_vcpus; v++) {
		const struct xen_domctl_kemari *s = &c->vcpu[v];
		xen_pfn_t gfn = s->u.vcpu.vcpu_info_gfn;
		const struct vcpu_info *info;
		uint8_t *page, *irr, bit;
		int err = 0;

		page = xenforeignmemory_map(fmem, b, PROT_READ, 1, &gfn, &err);
		if (!page || err)
			return check(false, "restore.upcalls", "vcpu%u: map errno=%d",
				     v, page ? -err : errno);
		info = (const void *)(page + s->u.vcpu.vcpu_info_offset);
		if (info->evtchn_upcall_pending) {
			pending++;
			irr = saved_irr(c, v, s->u.vcpu.upcall_vector, &bit);
			if (irr) {
				was_raised += !!(*irr & bit);
				*irr |= bit;
				raised++;
			}
		}
		xenforeignmemory_unmap(fmem, page, 1);
	}
	return check(raised == pending, "restore.upcalls",
		     "pending=%u raised=%u (already in the saved IRR: %u) of %u vcpus",
		     pending, raised, was_raised, c->nr_vcpus);
}

static bool restore(xc_interface *xch, xenforeignmemory_handle *fmem,
		    struct kemari_ctl *k, uint16_t a, uint16_t b,
		    struct checkpoint *c)
{
	unsigned int v;
	int rc;

	if (!restore_vcpus(k, b, c) || !restore_frames(xch, b, c) ||
	    !restore_ports(k, b, c) || !restore_memory(xch, fmem, a, b, c) ||
	    !restore_grants(fmem, b, c) || !raise_pending_upcalls(fmem, b, c))
		return false;

	rc = xc_hvm_param_set(xch, b, HVM_PARAM_CALLBACK_IRQ, c->callback);
	check(!rc, "restore.callback", "rc=%d errno=%d", rc, rc ? errno : 0);
	rc = xc_domain_hvm_setcontext(xch, b, c->hvm, c->hvm_size);
	if (!check(!rc, "restore.hvm_context", "rc=%d errno=%d", rc, rc ? errno : 0))
		return false;
	for (v = 0, rc = 0; v < c->nr_vcpus && !rc; v++)
		rc = kemari_resume_vcpu(k, b, v, c->vcpu[v].u.vcpu.timer);
	return check(!rc, "restore.resume", "rc=%d", rc);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "domid", required_argument, NULL, 'd' },
		{ "into", required_argument, NULL, 'i' },
		{ "port", required_argument, NULL, 'p' },
		{ "timeout", required_argument, NULL, 't' },
		{ "late-event", no_argument, NULL, 'l' },
		{ NULL, 0, NULL, 0 },
	};
	static struct checkpoint c;
	uint32_t ports[16];
	unsigned int nr = 0;
	int a = -1, b = -1, timeout = 60, opt;
	bool late_event = false;
	xc_interface *xch;
	xenforeignmemory_handle *fmem;
	struct kemari_ctl *k;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (opt) {
		case 'd': a = atoi(optarg); break;
		case 'i': b = atoi(optarg); break;
		case 't': timeout = atoi(optarg); break;
		case 'l': late_event = true; break;
		case 'p':
			if (nr == 16)
				usage();
			ports[nr++] = strtoul(optarg, NULL, 0);
			break;
		default: usage();
		}
	}
	if (a <= 0 || b <= 0 || !nr)
		usage();

	xch = xc_interface_open(NULL, NULL, 0);
	fmem = xenforeignmemory_open(NULL, 0);
	k = kemari_open();
	if (!check(xch && fmem && k, "open", "xc=%d fmem=%d kemari=%d", !!xch,
		   !!fmem, !!k))
		return 1;

	if (wait_for_hold(k, a, ports, nr, timeout) && save(xch, fmem, k, a, &c)) {
		if (late_event)
			drop_saved_upcalls(&c);
		restore(xch, fmem, k, a, b, &c);
	}

	kemari_close(k);
	xenforeignmemory_close(fmem);
	xc_interface_close(xch);
	return check_result();
}
