/* guest.h - what both images share: boot checks, devices, the netif glue,
 * and a statistics block at a fixed address the VMM/tests can read. */
#ifndef GUEST_GUEST_H
#define GUEST_GUEST_H

#include <stdint.h>
#include "net.h"
#include "../kemari_abi.h"

/* Fixed statistics block (a free guest page between the rings and the page
 * tables; the hot small variables follow it in the same page). Little-endian
 * u64s after the magic; read it from a snapshot or from guest memory. */
#define GUEST_STATS_GPA    0x6000
#define GUEST_STATS_MAGIC  0x4154534bu     /* "KSTA" */

struct guest_stats {
	uint32_t magic;
	uint32_t image;                 /* 1 = kv, 2 = stress */
	uint64_t events;                /* stress: I/O events done; kv: group commits */
	uint64_t requests;              /* kv: datagrams handled */
	uint64_t replies;               /* kv: replies sent */
	uint64_t disk_errors;
	uint64_t rx_frames;
	uint64_t tx_frames;
};

/* the block itself (link.ld places it at GUEST_STATS_GPA) */
extern struct guest_stats guest_stats;
#define STATS ((volatile struct guest_stats *)&guest_stats)

extern const volatile struct kemari_boot_info *boot_info;
extern struct netif guest_nif;

/* Check the boot info and bring up the attached devices (printing a line
 * per device). Returns 0, or -1 if the VMM gave us nothing usable. */
int guest_boot(const char *name, uint32_t image);
/* Feed up to budget received frames to the net stack; returns the count. */
int guest_net_poll(int budget);

#endif
