/* blkfront.c - block frontend on the ring at KEMARI_BLK_RING_GPA.
 * One request in flight at a time: the kv log and the stress loop both
 * wait for each write, and that keeps the ring logic trivially correct. */
#include "blkfront.h"
#include "ring.h"
#include "wait.h"
#include "lib.h"

#define RING ((volatile struct kemari_blk_ring *)KEMARI_BLK_RING_GPA)

static HOT uint32_t rsp_cons;
static HOT uint64_t last_id;
static HOT uint64_t nsectors;
static HOT int present;

int blk_init(uint64_t sectors)
{
	/* Indices live in guest memory: after a restore they are whatever the
	 * snapshot holds, and rsp_cons (our own memory) matches them. */
	nsectors = sectors;
	present = 1;
	rsp_cons = RING->hdr.rsp_prod;
	return 0;
}

uint64_t blk_sectors(void)
{
	return present ? nsectors : 0;
}

void blk_arm(int on)
{
	ring_arm(&RING->hdr, rsp_cons, on);
}

int blk_ready(void)
{
	return ring_has_rsp(&RING->hdr, rsp_cons);
}

static int blk_one(uint8_t op, uint64_t sector, void *buf, uint32_t nsec)
{
	volatile struct kemari_blk_request *req;
	uint32_t prod = RING->hdr.req_prod;
	uint64_t id = ++last_id;
	int status = KEMARI_STATUS_EIO;

	req = &RING->slot[prod % KEMARI_RING_SIZE].req;
	req->id = id;
	req->sector = sector;
	req->buf_gpa = (uint64_t)(uintptr_t)buf;
	req->nr_sectors = nsec;
	req->op = op;
	wmb();
	RING->hdr.req_prod = prod + 1;
	if (ring_push_needs_notify(&RING->hdr, prod, prod + 1))
		out32(KEMARI_PORT_BLK_NOTIFY, 1);

	for (;;) {
		while (RING->hdr.rsp_prod != rsp_cons) {
			volatile struct kemari_blk_response *rsp;

			rmb();
			rsp = &RING->slot[rsp_cons % KEMARI_RING_SIZE].rsp;
			if (rsp->id == id)
				status = rsp->status;
			rsp_cons++;
			if (rsp->id == id) {
				ring_arm(&RING->hdr, rsp_cons, 0);
				return status;
			}
		}
		wait_events(WAIT_BLK, 0);
	}
}

int blk_rw(uint8_t op, uint64_t sector, void *buf, uint32_t nsec)
{
	uint8_t *p = buf;

	if (!present)
		return KEMARI_STATUS_EINVAL;
	while (nsec) {
		uint32_t n = nsec > KEMARI_BLK_MAX_SECTORS ? KEMARI_BLK_MAX_SECTORS : nsec;
		int st = blk_one(op, sector, p, n);

		if (st != KEMARI_STATUS_OK)
			return st;
		sector += n;
		p += (size_t)n * KEMARI_BLK_SECTOR_SIZE;
		nsec -= n;
	}
	return KEMARI_STATUS_OK;
}
