/* wait.c - the PV "block until event" call (SCHEDOP_block analogue). */
#include "wait.h"
#include "blkfront.h"
#include "netfront.h"
#include "io.h"
#include "../kemari_abi.h"

int wait_events(unsigned mask, uint32_t timeout_us)
{
	blk_arm(!!(mask & WAIT_BLK));
	net_tx_arm(!!(mask & WAIT_TX));
	net_rx_arm(!!(mask & WAIT_RX));
	mb();
	if (((mask & WAIT_BLK) && blk_ready()) || ((mask & WAIT_TX) && net_tx_ready()) ||
	    ((mask & WAIT_RX) && net_rx_ready()))
		return 1;
	out32(KEMARI_PORT_BLOCK, timeout_us);
	return 0;
}
