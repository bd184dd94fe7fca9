/* guest.c - boot-time checks and the glue between netfront and net.c. */
#include "guest.h"
#include "blkfront.h"
#include "netfront.h"
#include "lib.h"

const volatile struct kemari_boot_info *boot_info =
	(const volatile struct kemari_boot_info *)KEMARI_BOOT_INFO_GPA;
HOT struct netif guest_nif;
struct guest_stats guest_stats __attribute__((section(".bss.stats")));

static uint8_t *nif_tx_alloc(void *ctx)
{
	(void)ctx;
	return net_tx_alloc();
}

static void nif_tx_send(void *ctx, uint8_t *buf, size_t len)
{
	(void)ctx;
	net_tx_push(buf, len);
	STATS->tx_frames++;
}

static void rx_frame(void *ctx, const uint8_t *frame, size_t len)
{
	STATS->rx_frames++;
	net_input(ctx, frame, len);
}

int guest_net_poll(int budget)
{
	if (!net_present())
		return 0;
	return net_rx_poll(rx_frame, &guest_nif, budget);
}

int guest_boot(const char *name, uint32_t image)
{
	const volatile struct kemari_boot_info *bi = boot_info;
	int i;

	STATS->magic = GUEST_STATS_MAGIC;
	STATS->image = image;
	con_puts(name);
	con_puts(": Kemari guest image, stats at ");
	con_hex(GUEST_STATS_GPA);
	con_putc('\n');
	if (bi->magic != KEMARI_BOOT_MAGIC || bi->abi_version != KEMARI_ABI_VERSION) {
		con_puts(name);
		con_puts(": bad boot info (magic/ABI version)\n");
		return -1;
	}
	if (bi->flags & KEMARI_BOOT_DISK) {
		blk_init(bi->disk_sectors);
		con_puts(name);
		con_puts(": disk ");
		con_u64(bi->disk_sectors);
		con_puts(" sectors\n");
	}
	if (bi->flags & KEMARI_BOOT_NET) {
		for (i = 0; i < 6; i++)
			guest_nif.mac[i] = bi->mac[i];
		guest_nif.ip = bi->ipv4_addr;
		guest_nif.netmask = bi->ipv4_netmask;
		guest_nif.gateway = bi->ipv4_gateway;
		guest_nif.tx_alloc = nif_tx_alloc;
		guest_nif.tx_send = nif_tx_send;
		net_init();
		con_puts(name);
		con_puts(": net ");
		con_ipv4(guest_nif.ip);
		con_puts(" mac ");
		for (i = 0; i < 6; i++) {
			static const char hx[] = "0123456789abcdef";

			if (i)
				con_putc(':');
			con_putc(hx[guest_nif.mac[i] >> 4]);
			con_putc(hx[guest_nif.mac[i] & 0xf]);
		}
		con_putc('\n');
		net_send_garp(&guest_nif);
		net_tx_kick();
	}
	return 0;
}
