/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * kemari-owner-test: who owns a Kemari hold (Xen patch 5), from dom0.
 * Prints "KEMARI-CHECK <name> PASS|FAIL <detail>" lines like kemari-tap-test.
 *
 *   dispatch --dom ID --port NAME=PORT... [--dom ID --port ...]... [--holds N]
 *       One controller serving several domains: each is armed with a
 *       notification port of its own, all served from one loop that also
 *       polls GET_HELD (a notification can be lost), until every domain was
 *       held and released N times.  Disarms them all at the end.
 *   hold --dom ID --port NAME=PORT... --state FILE [--no-wait]
 *       Arm, wait for a hold (unless --no-wait), write the token and the held
 *       ports to FILE, then sleep until killed: the controller that dies.
 *   adopt --dom ID --port NAME=PORT... --state FILE --tag T [--wait-held SEC]
 *         [--cycles N] [--disarm | --then-state FILE]
 *       The new controller: check the orphaned tap (armed, owned, the domain
 *       held -- waiting up to SEC for it to get held -- and not running),
 *       that a plain ARM cannot take it, ADOPT it, check the held ports were
 *       kept and the dead owner's token no longer works, RELEASE, serve N
 *       more holds, then DISARM, or write FILE and serve on until killed.
 */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <getopt.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <xenevtchn.h>
#include <xen/xen.h>
#include <xen/domctl.h>

#include "checks.h"
#include "kemari-ctl.h"

#define MAX_DOMS 4
#define MAX_PORTS 8
#define F_ARMED XEN_DOMCTL_KEMARI_F_ARMED
#define F_PAUSED XEN_DOMCTL_KEMARI_F_PAUSED
#define F_OWNED XEN_DOMCTL_KEMARI_F_OWNED

struct guest {
	uint16_t dom;
	uint32_t ports[MAX_PORTS];
	unsigned int nr;
	evtchn_port_t notify;	/* our port for this domain's holds */
	uint32_t owner;		/* our token */
	int holds, told;	/* holds released; of them, told on our port */
	bool pending_event;	/* an event came on notify, not yet matched */
};

static void held_list(const struct kemari_state *s, char *buf, size_t len)
{
	size_t off = 0;
	uint32_t p;

	buf[0] = '\0';
	for (p = 0; p < KEMARI_MAX_PORTS && off < len; p++)
		if (kemari_port_held(s, p))
			off += snprintf(buf + off, len - off, "%s%u",
					off ? "," : "", p);
}

/*
 * One pending event from xce, if poll() says there is one within wait_ms;
 * xenevtchn_pending() is a blocking read, so it is only called then.
 */
static int next_event(xenevtchn_handle *xce, int wait_ms)
{
	struct pollfd pfd = { .fd = xenevtchn_fd(xce), .events = POLLIN };
	xenevtchn_port_or_error_t p;

	if (poll(&pfd, 1, wait_ms) <= 0)
		return -1;
	p = xenevtchn_pending(xce);
	if (p >= 0)
		xenevtchn_unmask(xce, p);
	return p;
}

static evtchn_port_t own_port(xenevtchn_handle *xce, const char *what)
{
	xenevtchn_port_or_error_t p = xenevtchn_bind_unbound_port(xce, 0);

	if (!check(p >= 0, what, "port=%d errno=%d", p, p < 0 ? errno : 0))
		exit(1);
	return p;
}

/* Serve every guest until each was held and released `holds` times. */
static void dispatch(struct kemari_ctl *k, xenevtchn_handle *xce,
		     struct guest *g, unsigned int nr, int holds, int timeout_s)
{
	double deadline = now_ms() + timeout_s * 1e3;
	struct kemari_state st;
	char name[64];
	unsigned int i, done = 0;
	int p, rc, stray = 0, bad_release = 0;

	for (i = 0; i < nr; i++) {
		g[i].notify = own_port(xce, "dispatch.notify_port");
		rc = kemari_arm(k, g[i].dom, g[i].ports, g[i].nr, g[i].notify,
				false, &g[i].owner, &st);
		snprintf(name, sizeof(name), "dispatch.arm.dom%u", g[i].dom);
		check(!rc && (st.flags & F_OWNED), name, "rc=%d notify=%u "
		      "owner=%u", rc, g[i].notify, g[i].owner);
	}
	check(nr < 2 || g[0].notify != g[1].notify, "dispatch.ports_distinct",
	      "ports=%u,%u", g[0].notify, nr > 1 ? g[1].notify : 0);

	while (done < nr && now_ms() < deadline) {
		/* Drain what was told, then look at every domain anyway. */
		while ((p = next_event(xce, 200)) >= 0) {
			for (i = 0; i < nr; i++)
				if ((evtchn_port_t)p == g[i].notify)
					break;
			if (i == nr)
				stray++;
			else
				g[i].pending_event = true;
		}
		for (i = 0; i < nr; i++) {
			if (g[i].holds >= holds)
				continue;
			rc = kemari_get_held(k, g[i].dom, &st);
			if (rc || !(st.flags & F_PAUSED))
				continue;
			/* Told on this domain's own port: another domain's
			 * holds never set pending_event here. */
			g[i].told += g[i].pending_event;
			g[i].pending_event = false;
			rc = kemari_owner_op(k, g[i].dom,
					     XEN_DOMCTL_KEMARI_RELEASE,
					     g[i].owner, &st);
			if (rc || (st.flags & F_PAUSED))
				bad_release++;
			if (++g[i].holds == holds)
				done++;
		}
	}

	for (i = 0; i < nr; i++) {
		snprintf(name, sizeof(name), "dispatch.holds.dom%u", g[i].dom);
		check(g[i].holds >= holds, name, "holds=%d told=%d want=%d",
		      g[i].holds, g[i].told, holds);
		/* Most holds are told on the domain's own port. */
		snprintf(name, sizeof(name), "dispatch.told.dom%u", g[i].dom);
		check(g[i].told * 2 >= g[i].holds && g[i].told > 0, name,
		      "told=%d holds=%d port=%u", g[i].told, g[i].holds,
		      g[i].notify);
		rc = kemari_owner_op(k, g[i].dom, XEN_DOMCTL_KEMARI_DISARM,
				     g[i].owner, &st);
		snprintf(name, sizeof(name), "dispatch.disarm.dom%u", g[i].dom);
		check(!rc && !(st.flags & (F_ARMED | F_PAUSED | F_OWNED)),
		      name, "rc=%d flags=%#x", rc, st.flags);
	}
	check(!stray && !bad_release, "dispatch.clean", "stray_events=%d "
	      "failed_releases=%d", stray, bad_release);
}

/* Wait for dom to be held: told on notify, or seen by polling GET_HELD. */
static int wait_held(struct kemari_ctl *k, xenevtchn_handle *xce,
		     struct guest *g, int timeout_s, bool *told)
{
	double deadline = now_ms() + timeout_s * 1e3;
	struct kemari_state st;
	int p;

	*told = false;
	for (;;) {
		/* Take what was told already before asking: the guest may be
		 * held again before we get here after a release. */
		while (xce && (p = next_event(xce, 0)) >= 0)
			if ((evtchn_port_t)p == g->notify)
				*told = true;
		if (!kemari_get_held(k, g->dom, &st) && (st.flags & F_PAUSED)) {
			/* Seen held before dom0 took the notification's
			 * upcall: give it a second to come. */
			double grace = now_ms() + 1000;

			while (xce && !*told && now_ms() < grace)
				if ((p = next_event(xce, 100)) >= 0 &&
				    (evtchn_port_t)p == g->notify)
					*told = true;
			return 0;
		}
		if (now_ms() >= deadline)
			return -ETIMEDOUT;
		p = xce ? next_event(xce, 500) : (usleep(200000), -1);
		if (p >= 0 && (evtchn_port_t)p == g->notify)
			*told = true;
	}
}

static void write_state(const char *file, uint32_t owner,
			const struct kemari_state *st)
{
	char held[256], tmp[256];
	FILE *f;

	held_list(st, held, sizeof(held));
	snprintf(tmp, sizeof(tmp), "%s.tmp", file);
	f = fopen(tmp, "w");
	if (!f || fprintf(f, "%u %s\n", owner, held[0] ? held : "-") < 0 ||
	    fclose(f) || rename(tmp, file))
		exit(1);
}

static void read_state(const char *file, uint32_t *owner, char *held,
		       size_t len)
{
	char fmt[32];
	FILE *f = fopen(file, "r");

	snprintf(fmt, sizeof(fmt), "%%u %%%zus", len - 1);
	if (!f || fscanf(f, fmt, owner, held) != 2)
		exit(1);
	fclose(f);
}

/* Arm, wait for a hold (or not), record it, and wait to be killed. */
static void hold_and_die(struct kemari_ctl *k, xenevtchn_handle *xce,
			 struct guest *g, const char *state, bool wait)
{
	struct kemari_state st;
	bool told = false;
	int rc;

	g->notify = own_port(xce, "hold.notify_port");
	rc = kemari_arm(k, g->dom, g->ports, g->nr, g->notify, false,
			&g->owner, &st);
	if (!check(!rc, "hold.arm", "rc=%d owner=%u", rc, g->owner))
		exit(1);
	if (wait) {
		rc = wait_held(k, xce, g, 60, &told);
		if (!check(!rc, "hold.held", "rc=%d told=%d", rc, told))
			exit(1);
	}
	kemari_get_held(k, g->dom, &st);
	write_state(state, g->owner, &st);
	for (;;)
		pause();
}

/* The vCPU time the domain got over ms milliseconds, and if it ran. */
static uint64_t cpu_over(struct kemari_ctl *k, uint16_t dom, int ms,
			 bool *running)
{
	uint64_t a = 0, b = 0;
	bool r1 = false, r2 = false;

	kemari_vcpus_running(k, dom, 1, &r1, &a);
	usleep(ms * 1000);
	kemari_vcpus_running(k, dom, 1, &r2, &b);
	*running = r1 || r2;
	return b - a;
}

static void adopt(struct kemari_ctl *k, xenevtchn_handle *xce,
		  struct guest *g, const char *state, const char *tag,
		  int wait_s, int cycles, bool disarm, const char *then_state)
{
	struct kemari_state st;
	char name[64], held_before[256], held_dead[256], held_after[256];
	uint32_t dead_owner, stale;
	uint64_t ran;
	bool running, told;
	int rc, c, n_told = 0;

#define CHECK(sub, ok, ...) \
	(snprintf(name, sizeof(name), "%s.%s", tag, sub), \
	 check(ok, name, __VA_ARGS__))

	read_state(state, &dead_owner, held_dead, sizeof(held_dead));

	/* The orphaned tap: nobody listening, and the domain does not run. */
	if (wait_s) {
		double t0 = now_ms();

		/* waited_ms > 0: it was running when its controller died. */
		rc = wait_held(k, NULL, g, wait_s, &told);
		CHECK("held_unattended", !rc, "waited_ms=%.0f limit=%ds",
		      now_ms() - t0, wait_s);
	}
	rc = kemari_get_held(k, g->dom, &st);
	held_list(&st, held_before, sizeof(held_before));
	CHECK("orphan_held", !rc && (st.flags & (F_ARMED | F_PAUSED | F_OWNED))
	      == (F_ARMED | F_PAUSED | F_OWNED) && st.nr_held > 0,
	      "rc=%d flags=%#x held=%s dead_owner_saw=%s", rc, st.flags,
	      held_before, held_dead);
	ran = cpu_over(k, g->dom, 2000, &running);
	CHECK("orphan_not_running", !ran && !running, "ran_ns=%llu running=%d",
	      (unsigned long long)ran, running);

	/* A new controller must take over deliberately. */
	stale = 0;
	rc = kemari_arm(k, g->dom, g->ports, g->nr, 0, false, &stale, &st);
	CHECK("arm_refused", rc == -EBUSY && (st.flags & F_PAUSED),
	      "rc=%d flags=%#x", rc, st.flags);

	g->notify = own_port(xce, "adopt.notify_port");
	rc = kemari_arm(k, g->dom, g->ports, g->nr, g->notify, true, &g->owner,
			&st);
	CHECK("adopt", !rc && g->owner && g->owner != dead_owner &&
	      (st.flags & F_PAUSED) && (st.flags & F_OWNED),
	      "rc=%d owner=%u dead_owner=%u flags=%#x", rc, g->owner,
	      dead_owner, st.flags);
	rc = kemari_get_held(k, g->dom, &st);
	held_list(&st, held_after, sizeof(held_after));
	CHECK("held_kept", !rc && !strcmp(held_before, held_after) &&
	      (st.flags & F_PAUSED), "held=%s before=%s", held_after,
	      held_before);

	rc = kemari_owner_op(k, g->dom, XEN_DOMCTL_KEMARI_RELEASE, dead_owner,
			     &st);
	CHECK("dead_token_refused", rc == -EPERM && (st.flags & F_PAUSED),
	      "rc=%d flags=%#x", rc, st.flags);
	rc = kemari_owner_op(k, g->dom, XEN_DOMCTL_KEMARI_RELEASE, g->owner,
			     &st);
	CHECK("release", !rc && !(st.flags & F_PAUSED) && (st.flags & F_ARMED),
	      "rc=%d flags=%#x", rc, st.flags);

	/* Serve on: later holds are told on the new owner's port. */
	for (c = 0; c < cycles; c++) {
		rc = wait_held(k, xce, g, 60, &told);
		if (rc)
			break;
		n_told += told;
		rc = kemari_owner_op(k, g->dom, XEN_DOMCTL_KEMARI_RELEASE,
				     g->owner, &st);
		if (rc)
			break;
	}
	CHECK("serves_on", c == cycles && n_told > 0, "cycles=%d/%d told=%d "
	      "rc=%d", c, cycles, n_told, rc);

	if (disarm) {
		rc = kemari_owner_op(k, g->dom, XEN_DOMCTL_KEMARI_DISARM,
				     g->owner, &st);
		CHECK("disarm", !rc && !(st.flags & (F_ARMED | F_OWNED)),
		      "rc=%d flags=%#x", rc, st.flags);
	}
	if (then_state) {
		kemari_get_held(k, g->dom, &st);
		write_state(then_state, g->owner, &st);
		/* Serve on until killed: it dies at whatever point it is. */
		for (;;)
			if (!wait_held(k, xce, g, 60, &told))
				kemari_owner_op(k, g->dom,
						XEN_DOMCTL_KEMARI_RELEASE,
						g->owner, &st);
	}
#undef CHECK
}

static void add_port(struct guest *g, const char *arg)
{
	const char *eq = strchr(arg, '=');

	if (!eq || g->nr == MAX_PORTS)
		exit(2);
	g->ports[g->nr++] = strtoul(eq + 1, NULL, 0);
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "dom", required_argument, NULL, 'd' },
		{ "port", required_argument, NULL, 'p' },
		{ "holds", required_argument, NULL, 'h' },
		{ "state", required_argument, NULL, 's' },
		{ "no-wait", no_argument, NULL, 'W' },
		{ "tag", required_argument, NULL, 'T' },
		{ "wait-held", required_argument, NULL, 'w' },
		{ "cycles", required_argument, NULL, 'c' },
		{ "disarm", no_argument, NULL, 'D' },
		{ "then-state", required_argument, NULL, 'S' },
		{ NULL, 0, NULL, 0 },
	};
	struct guest g[MAX_DOMS] = { 0 };
	unsigned int nr = 0;
	const char *cmd, *state = NULL, *tag = "adopt", *then_state = NULL;
	int holds = 3, wait_s = 0, cycles = 2, c;
	bool wait = true, disarm = false;
	struct kemari_ctl *k;
	xenevtchn_handle *xce;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2)
		return 2;
	cmd = argv[1];
	optind = 2;
	while ((c = getopt_long(argc, argv, "", opts, NULL)) != -1) {
		switch (c) {
		case 'd':
			if (nr == MAX_DOMS)
				return 2;
			g[nr++].dom = atoi(optarg);
			break;
		case 'p':
			if (!nr)
				return 2;
			add_port(&g[nr - 1], optarg);
			break;
		case 'h': holds = atoi(optarg); break;
		case 's': state = optarg; break;
		case 'W': wait = false; break;
		case 'T': tag = optarg; break;
		case 'w': wait_s = atoi(optarg); break;
		case 'c': cycles = atoi(optarg); break;
		case 'D': disarm = true; break;
		case 'S': then_state = optarg; break;
		default: return 2;
		}
	}
	if (!nr || !g[0].nr)
		return 2;

	k = kemari_open();
	xce = xenevtchn_open(NULL, 0);
	if (!check(k && xce, "owner.open", "errno=%d", errno))
		return 1;

	if (!strcmp(cmd, "dispatch"))
		dispatch(k, xce, g, nr, holds, 180);
	else if (!strcmp(cmd, "hold") && state)
		hold_and_die(k, xce, &g[0], state, wait);
	else if (!strcmp(cmd, "adopt") && state)
		adopt(k, xce, &g[0], state, tag, wait_s, cycles, disarm,
		      then_state);
	else
		return 2;

	xenevtchn_close(xce);
	kemari_close(k);
	return check_failed() ? 1 : 0;
}
