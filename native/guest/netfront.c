/* netfront.c - net frontend on the tx ring (KEMARI_NET_TX_RING_GPA) and the
 * rx ring (KEMARI_NET_RX_RING_GPA). Request ids are buffer indices. */
#include "netfront.h"
#include "ring.h"
#include "wait.h"
#include "lib.h"

#define TX ((volatile struct kemari_net_ring *)KEMARI_NET_TX_RING_GPA)
#define RX ((volatile struct kemari_net_ring *)KEMARI_NET_RX_RING_GPA)
#define NBUF KEMARI_RING_SIZE

static uint8_t tx_buf[NBUF][KEMARI_NET_BUF_SIZE] __attribute__((aligned(4096)));
static uint8_t rx_buf[NBUF][KEMARI_NET_BUF_SIZE] __attribute__((aligned(4096)));
static HOT uint32_t tx_rsp_cons, rx_rsp_cons;
static HOT uint32_t tx_pushed_unkicked;         /* req_prod when we last rang the doorbell */
static HOT uint8_t tx_free[NBUF];
static HOT int tx_nfree;
static HOT int present;

static void rx_post(uint32_t idx)
{
	uint32_t prod = RX->hdr.req_prod;
	volatile struct kemari_net_request *req = &RX->slot[prod % NBUF].req;

	req->id = idx;
	req->buf_gpa = (uint64_t)(uintptr_t)rx_buf[idx];
	req->len = KEMARI_NET_BUF_SIZE;
	wmb();
	RX->hdr.req_prod = prod + 1;
}

int net_init(void)
{
	uint32_t i;

	present = 1;
	tx_rsp_cons = TX->hdr.rsp_prod;
	tx_pushed_unkicked = TX->hdr.req_prod;
	rx_rsp_cons = RX->hdr.rsp_prod;
	for (i = 0; i < NBUF; i++)
		tx_free[i] = (uint8_t)i;
	tx_nfree = NBUF;
	for (i = 0; i < NBUF; i++)
		rx_post(i);
	return 0;
}

int net_present(void)
{
	return present;
}

int net_rx_poll(void (*cb)(void *ctx, const uint8_t *frame, size_t len), void *ctx, int budget)
{
	int n = 0;

	while (n < budget && RX->hdr.rsp_prod != rx_rsp_cons) {
		volatile struct kemari_net_response *rsp;
		uint64_t idx;
		uint16_t len;
		int16_t status;

		rmb();
		rsp = &RX->slot[rx_rsp_cons % NBUF].rsp;
		idx = rsp->id;
		len = rsp->len;
		status = rsp->status;
		rx_rsp_cons++;
		if (idx >= NBUF)
			continue;       /* not ours: cannot repost, but never crash */
		if (status == KEMARI_STATUS_OK && len <= KEMARI_NET_BUF_SIZE)
			cb(ctx, rx_buf[idx], len);
		rx_post((uint32_t)idx);
		n++;
	}
	return n;
}

int net_tx_reap(void)
{
	while (TX->hdr.rsp_prod != tx_rsp_cons) {
		uint64_t idx;

		rmb();
		idx = TX->slot[tx_rsp_cons % NBUF].rsp.id;
		tx_rsp_cons++;
		if (idx < NBUF && tx_nfree < NBUF)
			tx_free[tx_nfree++] = (uint8_t)idx;
	}
	return NBUF - tx_nfree;
}

uint8_t *net_tx_alloc(void)
{
	while (!tx_nfree) {
		net_tx_reap();
		if (tx_nfree)
			break;
		net_tx_kick();
		wait_events(WAIT_TX, 0);
	}
	return tx_buf[tx_free[--tx_nfree]];
}

void net_tx_push(uint8_t *buf, size_t len)
{
	uint32_t prod = TX->hdr.req_prod;
	volatile struct kemari_net_request *req = &TX->slot[prod % NBUF].req;
	uint32_t idx = (uint32_t)((buf - &tx_buf[0][0]) / KEMARI_NET_BUF_SIZE);

	req->id = idx;
	req->buf_gpa = (uint64_t)(uintptr_t)buf;
	req->len = (uint16_t)len;
	wmb();
	TX->hdr.req_prod = prod + 1;
}

void net_tx_kick(void)
{
	uint32_t prod = TX->hdr.req_prod;

	if (prod == tx_pushed_unkicked)
		return;
	if (ring_push_needs_notify(&TX->hdr, tx_pushed_unkicked, prod))
		out32(KEMARI_PORT_NET_NOTIFY, 1);
	tx_pushed_unkicked = prod;
}

void net_tx_arm(int on)
{
	ring_arm(&TX->hdr, tx_rsp_cons, on);
}

int net_tx_ready(void)
{
	return ring_has_rsp(&TX->hdr, tx_rsp_cons);
}

void net_rx_arm(int on)
{
	ring_arm(&RX->hdr, rx_rsp_cons, on);
}

int net_rx_ready(void)
{
	return ring_has_rsp(&RX->hdr, rx_rsp_cons);
}
