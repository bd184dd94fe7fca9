/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * Read and write a domain's v1 grant entries from dom0 through
 * XENMEM_acquire_resource (XENMEM_resource_grant_table): what a Kemari
 * primary uses to save grant state and a secondary to restore it, already
 * in Xen 4.17.
 */
#ifndef GNTTAB_H
#define GNTTAB_H

#include <stdint.h>

struct gnttab_entry {
	uint16_t flags;
	uint16_t domid;
	uint32_t frame;
};

/* Both return 0 or a negative errno. */
int gnttab_read_entry(uint16_t dom, uint32_t ref, struct gnttab_entry *out);
int gnttab_write_entry(uint16_t dom, uint32_t ref,
		       const struct gnttab_entry *in);

#endif
