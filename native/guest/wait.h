/* wait.h - block the vCPU until a ring we care about has responses. */
#ifndef GUEST_WAIT_H
#define GUEST_WAIT_H

#include <stdint.h>

#define WAIT_BLK 0x1
#define WAIT_TX  0x2
#define WAIT_RX  0x4

/* Arm the rings in mask, disarm the others, re-check (no lost wake-up), then
 * exit to the VMM via KEMARI_PORT_BLOCK. timeout_us 0 = no timeout.
 * Returns 1 if an armed ring already had responses (did not block). */
int wait_events(unsigned mask, uint32_t timeout_us);

#endif
