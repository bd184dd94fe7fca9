/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kemari-tap-test: exercise the Kemari event-channel tap of a running domU
 * from dom0, printing one "KEMARI-CHECK <name> PASS|FAIL <detail>" line per
 * check and a final "KEMARI-RESULT PASS|FAIL".
 *
 * usage: kemari-tap-test --domid N --port NAME=PORT... [--while-held CMD]
 *                        [--ring-ref NAME=REF]... [--restore-into DOMID]
 *                        [--max-cycles N] [--virq-timeout SEC]
 *                        [--notify port|virq]
 *
 * The tap tells us of a hold on a notification port of our own (default) or
 * with VIRQ_KEMARI; GET_HELD is polled as well, as a notification can be
 * lost.  Each cycle: wait for the hold, check the domU is paused by the
 * tap's own pause with only tapped ports held, that nobody but the owner
 * can release it, run CMD (which checks the guest makes no progress, even
 * after `xl unpause`), release (checking the result), check it runs again.
 * Cycles repeat until every kind of port (the part of NAME before '-', e.g.
 * vbd, vif) has been seen held.
 * Then the restore side, into the (paused, never started) domain given with
 * --restore-into, else into the domU itself: allocate unbound ports at chosen
 * numbers (XEN_DOMCTL_KEMARI_ALLOC_UNBOUND) -- with --restore-into, at the
 * domU's own port numbers -- and bind dom0 to them as a restored backend
 * would; for each --ring-ref, read the frontend's grant entry for its ring
 * from the domU's grant table (granted to dom0, read-write) and write it at
 * the same reference into the restore target, as a checkpoint would carry it.
 */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xenevtchn.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#include <xen/event_channel.h>
#include <xen/grant_table.h>

#include "gnttab.h"
#include "checks.h"
#include "kemari-ctl.h"

#define MAX_TAPPED 16

struct tapped {
	char name[32];
	uint32_t port;
	bool seen_held;
};

/*
 * Wait until dom is held: an event on our notification port, or (it can be
 * lost) GET_HELD saying so, polled every 500 ms.  Returns 0 (*by_event
 * telling which), or -ETIMEDOUT.
 */
static int wait_held(struct kemari_ctl *k, uint16_t dom,
		     xenevtchn_handle *xce, evtchn_port_t notify_port,
		     int timeout_s, bool *by_event)
{
	struct pollfd pfd = { .fd = xenevtchn_fd(xce), .events = POLLIN };
	double deadline = now_ms() + timeout_s * 1e3;
	xenevtchn_port_or_error_t p;
	struct kemari_state st;

	for (;;) {
		int left = (int)(deadline - now_ms());

		if (left <= 0)
			return -ETIMEDOUT;
		if (poll(&pfd, 1, left < 500 ? left : 500) > 0) {
			p = xenevtchn_pending(xce);
			if (p < 0)
				continue;
			xenevtchn_unmask(xce, p);
			if ((evtchn_port_t)p == notify_port) {
				*by_event = true;
				return 0;
			}
			continue;
		}
		if (!kemari_get_held(k, dom, &st) &&
		    (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED)) {
			*by_event = false;
			return 0;
		}
	}
}

/* While held, nobody but the owner can release or re-arm the tap. */
static void check_owned(struct kemari_ctl *k, uint16_t dom,
			const uint32_t *ports, unsigned int nr, uint32_t owner)
{
	struct kemari_state st;
	uint32_t other = owner + 1;
	int rc;

	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_RELEASE, owner + 1, &st);
	check(rc == -EPERM && (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED),
	      "owner.release_refused", "rc=%d flags=%#x", rc, st.flags);
	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_DISARM, 0, &st);
	check(rc == -EPERM && (st.flags & XEN_DOMCTL_KEMARI_F_ARMED),
	      "owner.disarm_refused", "rc=%d flags=%#x", rc, st.flags);
	rc = kemari_arm(k, dom, ports, nr, 0, false, &other, &st);
	check(rc == -EBUSY && (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED),
	      "owner.arm_refused", "rc=%d flags=%#x", rc, st.flags);
}

static void describe_held(const struct kemari_state *s, char *buf, size_t len)
{
	size_t off = 0;
	uint32_t p;

	buf[0] = '\0';
	for (p = 0; p < KEMARI_MAX_PORTS && off < len; p++)
		if (kemari_port_held(s, p))
			off += snprintf(buf + off, len - off, "%s%u",
					off ? "," : "", p);
}

static bool kinds_all_seen(const struct tapped *t, unsigned int nr)
{
	unsigned int i, j;

	for (i = 0; i < nr; i++) {
		size_t klen = strcspn(t[i].name, "-");
		bool seen = false;

		for (j = 0; j < nr; j++)
			if (!strncmp(t[i].name, t[j].name, klen) &&
			    t[j].seen_held)
				seen = true;
		if (!seen)
			return false;
	}
	return true;
}

static int cycles_by_event;

static const uint32_t *ports_of(const struct tapped *t, unsigned int nr)
{
	static uint32_t ports[MAX_TAPPED];
	unsigned int i;

	for (i = 0; i < nr; i++)
		ports[i] = t[i].port;
	return ports;
}

static void run_cycle(struct kemari_ctl *k, xenevtchn_handle *xce,
		      evtchn_port_t notify_port, uint16_t dom, uint32_t owner,
		      struct tapped *t, unsigned int nr, int cycle,
		      const char *while_held, int virq_timeout)
{
	struct kemari_state st;
	char name[64], held[256], cmd[512];
	double t0 = now_ms();
	bool paused, running, by_event = false, only_tapped = true;
	uint64_t ran_before = 0, ran_after = 0;
	unsigned int i, n = 0;
	int rc;

	rc = wait_held(k, dom, xce, notify_port, virq_timeout, &by_event);
	snprintf(name, sizeof(name), "cycle%d.virq", cycle);
	if (!check(rc == 0, name, "waited_ms=%.0f by=%s", now_ms() - t0,
		   by_event ? "event" : "poll"))
		return;
	cycles_by_event += by_event;

	rc = kemari_get_held(k, dom, &st);
	describe_held(&st, held, sizeof(held));
	snprintf(name, sizeof(name), "cycle%d.paused_flag", cycle);
	check(!rc && (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED) &&
	      (st.flags & XEN_DOMCTL_KEMARI_F_ARMED), name,
	      "rc=%d flags=%#x", rc, st.flags);

	for (i = 0; i < KEMARI_MAX_PORTS; i++) {
		unsigned int j;
		bool known = false;

		if (!kemari_port_held(&st, i))
			continue;
		n++;
		for (j = 0; j < nr; j++) {
			if (t[j].port == i) {
				known = true;
				t[j].seen_held = true;
				printf("KEMARI-HELD cycle=%d port=%u name=%s\n",
				       cycle, i, t[j].name);
			}
		}
		only_tapped &= known;
	}
	snprintf(name, sizeof(name), "cycle%d.held_ports", cycle);
	check(n > 0 && n == st.nr_held && only_tapped, name,
	      "held=%s nr_held=%u", held, st.nr_held);

	/* The tap's own pause: no vCPU runs, the toolstack's count is not used. */
	rc = kemari_dom_paused(k, dom, &paused);
	if (!rc)
		rc = kemari_vcpus_running(k, dom, 1, &running, &ran_before);
	snprintf(name, sizeof(name), "cycle%d.domain_paused", cycle);
	check(!rc && !running && !paused, name, "rc=%d vcpu_running=%d "
	      "xl_paused=%d", rc, running, paused);

	if (cycle == 1)
		check_owned(k, dom, ports_of(t, nr), nr, owner);

	if (while_held) {
		snprintf(cmd, sizeof(cmd), "%s %d", while_held, cycle);
		fflush(stdout);
		rc = system(cmd);
		snprintf(name, sizeof(name), "cycle%d.guest_stalled", cycle);
		check(rc == 0, name, "cmd_status=%d", rc);
		/* CMD tried `xl unpause`: the guest must not have run at all. */
		rc = kemari_vcpus_running(k, dom, 1, &running, &ran_after);
		kemari_get_held(k, dom, &st);
		snprintf(name, sizeof(name), "cycle%d.no_cpu_while_held", cycle);
		check(!rc && !running && ran_after == ran_before &&
		      (st.flags & XEN_DOMCTL_KEMARI_F_PAUSED), name,
		      "rc=%d ran_ns=%llu flags=%#x", rc,
		      (unsigned long long)(ran_after - ran_before), st.flags);
	}

	t0 = now_ms();
	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_RELEASE, owner, &st);
	snprintf(name, sizeof(name), "cycle%d.release", cycle);
	check(!rc && !(st.flags & XEN_DOMCTL_KEMARI_F_PAUSED) &&
	      (st.flags & XEN_DOMCTL_KEMARI_F_ARMED), name,
	      "rc=%d flags=%#x took_ms=%.2f", rc, st.flags, now_ms() - t0);

	/* A new hold may follow at once; only require no stale held ports. */
	rc = kemari_dom_paused(k, dom, &paused);
	kemari_get_held(k, dom, &st);
	snprintf(name, sizeof(name), "cycle%d.resumed", cycle);
	check(!rc && !paused, name, "xl_paused=%d tap_flags=%#x", paused,
	      st.flags);
}

/*
 * On a domain that never runs: RELEASE with nothing held says so, and the
 * tap's bitmaps are bounded by the event-channel ABI, whatever the domain's
 * max_event_channels.
 */
static void test_release_and_bound(struct kemari_ctl *k, uint16_t dom)
{
	uint32_t port = 1, owner = 0;
	struct kemari_state st;
	int rc;

	rc = kemari_arm(k, dom, &port, 1, 0, false, &owner, &st);
	check(!rc && owner, "idle.arm", "rc=%d owner=%u", rc, owner);
	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_RELEASE, owner, &st);
	check(rc == -ENOENT, "idle.release_nothing_held", "rc=%d", rc);
	rc = kemari_get_held(k, dom, &st);
	check(!rc && st.nr_ports > 0 && st.nr_ports <= 1u << 17,
	      "idle.bitmap_bounded", "rc=%d nr_ports=%u", rc, st.nr_ports);
	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_DISARM, owner, &st);
	check(!rc && !(st.flags & XEN_DOMCTL_KEMARI_F_OWNED), "idle.disarm",
	      "rc=%d flags=%#x", rc, st.flags);
}

static void test_alloc_unbound(struct kemari_ctl *k, xenevtchn_handle *xce,
			       uint16_t dom, uint32_t port)
{
	xenevtchn_port_or_error_t local;
	uint32_t status = 0, peer_port = 0;
	uint16_t peer_dom = 0xffff;
	int rc;

	rc = kemari_alloc_unbound(k, dom, port, 0);
	check(rc == 0, "alloc_unbound", "port=%u rc=%d", port, rc);
	rc = kemari_evtchn_status(k, dom, port, &status, &peer_dom, &peer_port);
	check(!rc && status == EVTCHNSTAT_unbound && peer_dom == 0,
	      "alloc_unbound.status", "rc=%d status=%u remote_dom=%u", rc,
	      status, peer_dom);
	rc = kemari_alloc_unbound(k, dom, port, 0);
	check(rc == -EBUSY, "alloc_unbound.busy", "rc=%d", rc);

	/* The backend side binds to it as on first connection. */
	local = xenevtchn_bind_interdomain(xce, dom, port);
	check(local >= 0, "alloc_unbound.bind", "dom0_port=%d", local);
	if (local < 0)
		return;
	rc = kemari_evtchn_status(k, dom, port, &status, &peer_dom, &peer_port);
	check(!rc && status == EVTCHNSTAT_interdomain && peer_dom == 0 &&
	      peer_port == (uint32_t)local, "alloc_unbound.interdomain",
	      "rc=%d status=%u peer=%u:%u", rc, status, peer_dom, peer_port);
	xenevtchn_unbind(xce, local);
}

static void test_ring_grant(uint16_t dom, int restore_dom, const char *arg)
{
	struct gnttab_entry e = { 0 }, back = { 0 };
	const char *eq = strchr(arg, '=');
	char name[64];
	uint32_t ref;
	int rc;

	if (!eq)
		return;
	ref = strtoul(eq + 1, NULL, 0);
	snprintf(name, sizeof(name), "grant.%.*s", (int)(eq - arg), arg);
	rc = gnttab_read_entry(dom, ref, &e);
	if (!check(!rc && (e.flags & GTF_type_mask) == GTF_permit_access &&
		   !(e.flags & GTF_readonly) && e.domid == 0 && e.frame != 0,
		   name, "ref=%u rc=%d flags=%#x domid=%u frame=%#x", ref, rc,
		   e.flags, e.domid, e.frame) || restore_dom < 0)
		return;

	/* Xen's own in-use bits are not part of what the guest granted. */
	e.flags &= ~(GTF_reading | GTF_writing);
	snprintf(name, sizeof(name), "restore.grant.%.*s", (int)(eq - arg), arg);
	rc = gnttab_write_entry(restore_dom, ref, &e);
	if (!rc)
		rc = gnttab_read_entry(restore_dom, ref, &back);
	check(!rc && back.flags == e.flags && back.domid == e.domid &&
	      back.frame == e.frame, name, "dom=%d ref=%u rc=%d flags=%#x",
	      restore_dom, ref, rc, back.flags);
}

/* A restored backend binds to the port at the number the guest knows. */
static void test_restore_port(struct kemari_ctl *k, xenevtchn_handle *xce,
			      uint16_t dom, const struct tapped *t)
{
	xenevtchn_port_or_error_t local = -1;
	uint32_t status = 0, peer_port = 0;
	uint16_t peer_dom = 0xffff;
	char name[64];
	int rc;

	rc = kemari_alloc_unbound(k, dom, t->port, 0);
	if (!rc)
		local = xenevtchn_bind_interdomain(xce, dom, t->port);
	if (local >= 0)
		rc = kemari_evtchn_status(k, dom, t->port, &status, &peer_dom,
					  &peer_port);
	snprintf(name, sizeof(name), "restore.evtchn.%s", t->name);
	check(!rc && local >= 0 && status == EVTCHNSTAT_interdomain &&
	      peer_dom == 0 && peer_port == (uint32_t)local, name,
	      "dom=%u port=%u rc=%d dom0_port=%d status=%u", dom, t->port,
	      rc, local, status);
	if (local >= 0)
		xenevtchn_unbind(xce, local);
}

static void usage(void)
{
	fprintf(stderr, "usage: kemari-tap-test --domid N --port NAME=PORT... "
		"[--while-held CMD] [--ring-ref NAME=REF]... "
		"[--restore-into DOMID] [--max-cycles N] [--virq-timeout SEC] "
		"[--notify port|virq]\n");
	exit(2);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "domid", required_argument, NULL, 'd' },
		{ "port", required_argument, NULL, 'p' },
		{ "while-held", required_argument, NULL, 'w' },
		{ "max-cycles", required_argument, NULL, 'm' },
		{ "virq-timeout", required_argument, NULL, 't' },
		{ "ring-ref", required_argument, NULL, 'r' },
		{ "restore-into", required_argument, NULL, 'R' },
		{ "notify", required_argument, NULL, 'n' },
		{ NULL, 0, NULL, 0 },
	};
	struct tapped t[MAX_TAPPED];
	uint32_t ports[MAX_TAPPED], max_port = 0;
	unsigned int nr = 0, i;
	const char *while_held = NULL, *ring_refs[MAX_TAPPED];
	unsigned int nr_refs = 0;
	int dom = -1, restore_dom = -1, max_cycles = 8, virq_timeout = 30, c, rc, cycle;
	bool use_virq = false;
	uint32_t owner = 0, other_owner = 0;
	struct kemari_state st;
	struct kemari_ctl *k;
	xenevtchn_handle *xce;
	xenevtchn_port_or_error_t virq_port, notify_port;
	char *eq;

	setvbuf(stdout, NULL, _IOLBF, 0);
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			dom = atoi(optarg);
			break;
		case 'p':
			eq = strchr(optarg, '=');
			if (!eq || nr == MAX_TAPPED || eq - optarg >= 32)
				usage();
			snprintf(t[nr].name, sizeof(t[nr].name), "%.*s",
				 (int)(eq - optarg), optarg);
			t[nr].port = strtoul(eq + 1, NULL, 0);
			t[nr].seen_held = false;
			ports[nr] = t[nr].port;
			if (t[nr].port > max_port)
				max_port = t[nr].port;
			nr++;
			break;
		case 'w':
			while_held = optarg;
			break;
		case 'm':
			max_cycles = atoi(optarg);
			break;
		case 't':
			virq_timeout = atoi(optarg);
			break;
		case 'r':
			if (nr_refs == MAX_TAPPED)
				usage();
			ring_refs[nr_refs++] = optarg;
			break;
		case 'R':
			restore_dom = atoi(optarg);
			break;
		case 'n':
			use_virq = !strcmp(optarg, "virq");
			if (!use_virq && strcmp(optarg, "port"))
				usage();
			break;
		default:
			usage();
		}
	}
	if (dom <= 0 || !nr)
		usage();

	k = kemari_open();
	xce = xenevtchn_open(NULL, 0);
	if (!check(k && xce, "open", "privcmd=%d evtchn=%d", !!k, !!xce))
		return 1;
	virq_port = xenevtchn_bind_virq(xce, VIRQ_KEMARI);
	if (!check(virq_port >= 0, "virq_bind", "virq=%d port=%d errno=%d",
		   VIRQ_KEMARI, virq_port, virq_port < 0 ? errno : 0))
		return 1;

	/* Our own notification port: unbound, only we (dom0) may bind it. */
	notify_port = virq_port;
	if (!use_virq) {
		notify_port = xenevtchn_bind_unbound_port(xce, 0);
		if (!check(notify_port >= 0, "notify_port", "port=%d errno=%d",
			   notify_port, notify_port < 0 ? errno : 0))
			return 1;
	}

	/* The controller must not be able to tap itself (FLASK: -EACCES). */
	rc = kemari_arm(k, 0, ports, nr, 0, false, &other_owner, NULL);
	check(rc == -EINVAL || rc == -EACCES, "refuse_dom0", "rc=%d", rc);

	rc = kemari_arm(k, dom, ports, nr, use_virq ? 0 : notify_port, false,
			&owner, &st);
	if (!check(!rc && (st.flags & XEN_DOMCTL_KEMARI_F_ARMED) &&
		   (st.flags & XEN_DOMCTL_KEMARI_F_OWNED) && owner, "arm",
		   "rc=%d flags=%#x ports=%u notify=%s owner=%u", rc, st.flags,
		   nr, use_virq ? "virq" : "port", owner))
		return 1;

	for (cycle = 1; cycle <= max_cycles && !kinds_all_seen(t, nr); cycle++)
		run_cycle(k, xce, notify_port, dom, owner, t, nr, cycle,
			  while_held, virq_timeout);
	/* Lost notifications are rare: most holds must have been told. */
	check(cycles_by_event * 2 >= cycle - 1, "notified",
	      "by_event=%d cycles=%d via=%s", cycles_by_event, cycle - 1,
	      use_virq ? "virq" : "port");

	for (i = 0; i < nr; i++) {
		char name[64];
		size_t klen = strcspn(t[i].name, "-");
		unsigned int j;
		bool seen = false;

		if (i != 0 && strcspn(t[i - 1].name, "-") == klen &&
		    !strncmp(t[i - 1].name, t[i].name, klen))
			continue;
		for (j = 0; j < nr; j++)
			if (!strncmp(t[i].name, t[j].name, klen) &&
			    t[j].seen_held)
				seen = true;
		snprintf(name, sizeof(name), "held_kind.%.*s", (int)klen,
			 t[i].name);
		check(seen, name, "cycles=%d", cycle - 1);
	}

	rc = kemari_owner_op(k, dom, XEN_DOMCTL_KEMARI_DISARM, owner, &st);
	check(!rc && !(st.flags & (XEN_DOMCTL_KEMARI_F_ARMED |
				   XEN_DOMCTL_KEMARI_F_PAUSED |
				   XEN_DOMCTL_KEMARI_F_OWNED)),
	      "disarm", "rc=%d flags=%#x", rc, st.flags);

	if (restore_dom > 0) {
		test_release_and_bound(k, restore_dom);
		/* The restored domain gets the domU's own port numbers. */
		test_alloc_unbound(k, xce, restore_dom, t[0].port);
		for (i = 1; i < nr; i++)
			test_restore_port(k, xce, restore_dom, &t[i]);
	} else {
		test_alloc_unbound(k, xce, dom, max_port + 32);
	}
	for (i = 0; i < nr_refs; i++)
		test_ring_grant(dom, restore_dom, ring_refs[i]);

	xenevtchn_unbind(xce, virq_port);
	xenevtchn_close(xce);
	kemari_close(k);
	return check_result();
}
