/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Read a domain's v1 grant entries from dom0 through
 * XENMEM_acquire_resource (XENMEM_resource_grant_table): what a Kemari
 * primary uses to carry grant state to the secondary, already in Xen 4.17.
 */
#ifndef GNTTAB_READ_H
#define GNTTAB_READ_H

#include <stdint.h>

struct gnttab_entry {
	uint16_t flags;
	uint16_t domid;
	uint32_t frame;
};

/* Returns 0 or a negative errno. */
int gnttab_read_entry(uint16_t dom, uint32_t ref, struct gnttab_entry *out);

#endif
