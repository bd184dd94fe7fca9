/* blkfront.h - block frontend: synchronous sector reads and writes. */
#ifndef GUEST_BLKFRONT_H
#define GUEST_BLKFRONT_H

#include <stdint.h>

int blk_init(uint64_t sectors);       /* 0, or -1 if no disk is attached */
uint64_t blk_sectors(void);
/* One read/write of nsec sectors at `sector` into/from buf (any length: split
 * into ring-sized requests). Returns KEMARI_STATUS_* (0 = OK); a WRITE that
 * returns 0 is durable on the host. */
int blk_rw(uint8_t op, uint64_t sector, void *buf, uint32_t nsec);

/* event plumbing for wait.c */
void blk_arm(int on);
int blk_ready(void);

#endif
