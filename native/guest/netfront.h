/* netfront.h - net frontend: tx and rx rings of raw Ethernet frames. */
#ifndef GUEST_NETFRONT_H
#define GUEST_NETFRONT_H

#include <stddef.h>
#include <stdint.h>

int net_init(void);
int net_present(void);

/* Hand every received frame (at most budget) to cb, then re-post its buffer.
 * Returns the number of frames handled. */
int net_rx_poll(void (*cb)(void *ctx, const uint8_t *frame, size_t len), void *ctx, int budget);

/* A free KEMARI_NET_BUF_SIZE tx buffer; waits for tx completions if all are
 * in flight (never NULL). */
uint8_t *net_tx_alloc(void);
/* Queue a frame built in a buffer from net_tx_alloc (no doorbell yet). */
void net_tx_push(uint8_t *buf, size_t len);
/* Ring the tx doorbell if frames were queued and the backend wants it. */
void net_tx_kick(void);
/* Reclaim completed tx buffers; returns how many are still in flight. */
int net_tx_reap(void);

void net_tx_arm(int on);
int net_tx_ready(void);
void net_rx_arm(int on);
int net_rx_ready(void);

#endif
