/* SPDX-License-Identifier: GPL-2.0-only */
#define __XEN_TOOLS__ 1

#include <errno.h>
#include <sys/mman.h>

#include <xenforeignmemory.h>
#include <xen/xen.h>
#include <xen/memory.h>
#include <xen/grant_table.h>

#include "gnttab-read.h"

#define ENTRIES_PER_FRAME (4096 / sizeof(grant_entry_v1_t))

int gnttab_read_entry(uint16_t dom, uint32_t ref, struct gnttab_entry *out)
{
	xenforeignmemory_handle *fmem = xenforeignmemory_open(NULL, 0);
	xenforeignmemory_resource_handle *res;
	const grant_entry_v1_t *e;
	void *addr = NULL;
	int rc = 0;

	if (!fmem)
		return -errno;
	res = xenforeignmemory_map_resource(fmem, dom,
					    XENMEM_resource_grant_table,
					    XENMEM_resource_grant_table_id_shared,
					    ref / ENTRIES_PER_FRAME, 1, &addr,
					    PROT_READ, 0);
	if (!res) {
		rc = -errno;
		goto out;
	}
	e = (const grant_entry_v1_t *)addr + ref % ENTRIES_PER_FRAME;
	out->flags = e->flags;
	out->domid = e->domid;
	out->frame = e->frame;
	xenforeignmemory_unmap_resource(fmem, res);
out:
	xenforeignmemory_close(fmem);
	return rc;
}
