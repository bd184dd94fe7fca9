/* SPDX-License-Identifier: GPL-2.0-only */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <stdbool.h>
#include <sys/mman.h>

#include <xenforeignmemory.h>
#include <xen/xen.h>
#include <xen/memory.h>
#include <xen/grant_table.h>

#include "gnttab.h"

#define ENTRIES_PER_FRAME (4096 / sizeof(grant_entry_v1_t))

/* Map the grant frame holding ref (growing the table if needed), copy in or out. */
static int gnttab_access(uint16_t dom, uint32_t ref, struct gnttab_entry *e,
			 bool write)
{
	xenforeignmemory_handle *fmem = xenforeignmemory_open(NULL, 0);
	xenforeignmemory_resource_handle *res;
	grant_entry_v1_t *g;
	void *addr = NULL;
	int rc = 0;

	if (!fmem)
		return -errno;
	res = xenforeignmemory_map_resource(fmem, dom,
					    XENMEM_resource_grant_table,
					    XENMEM_resource_grant_table_id_shared,
					    ref / ENTRIES_PER_FRAME, 1, &addr,
					    write ? PROT_READ | PROT_WRITE : PROT_READ,
					    0);
	if (!res) {
		rc = -errno;
		goto out;
	}
	g = (grant_entry_v1_t *)addr + ref % ENTRIES_PER_FRAME;
	if (write) {
		/* As a guest grants: frame and domid first, flags last. */
		g->frame = e->frame;
		g->domid = e->domid;
		__sync_synchronize();
		g->flags = e->flags;
	} else {
		e->flags = g->flags;
		e->domid = g->domid;
		e->frame = g->frame;
	}
	xenforeignmemory_unmap_resource(fmem, res);
out:
	xenforeignmemory_close(fmem);
	return rc;
}

int gnttab_read_entry(uint16_t dom, uint32_t ref, struct gnttab_entry *out)
{
	return gnttab_access(dom, ref, out, false);
}

int gnttab_write_entry(uint16_t dom, uint32_t ref,
		       const struct gnttab_entry *in)
{
	struct gnttab_entry e = *in;

	return gnttab_access(dom, ref, &e, true);
}
