/* net.h - a minimal IPv4 stack: Ethernet, ARP, IPv4, ICMP echo, UDP.
 * Pure: frames come in through net_input() and leave through the two
 * callbacks, so the host unit tests drive it without any rings. */
#ifndef GUEST_NET_H
#define GUEST_NET_H

#include <stddef.h>
#include <stdint.h>

#define ETH_HLEN      14
#define ETH_P_IP      0x0800
#define ETH_P_ARP     0x0806
#define IP_HLEN       20
#define UDP_HLEN      8
#define UDP_MAX_PAYLOAD (1500 - IP_HLEN - UDP_HLEN)

/* Where a UDP datagram came from; also where its reply goes. */
struct udp_peer {
	uint8_t mac[6];
	uint16_t port;        /* host order */
	uint32_t ip;          /* network order */
};

struct net_stats {
	uint64_t rx_frames, rx_dropped, rx_bad_csum, rx_frags;
	uint64_t arp_replies, icmp_replies, udp_rx, udp_tx;
};

struct netif {
	uint8_t mac[6];
	uint32_t ip, netmask, gateway;      /* network order */
	void *ctx;
	uint8_t *(*tx_alloc)(void *ctx);    /* buffer of at least 1514 bytes */
	void (*tx_send)(void *ctx, uint8_t *buf, size_t len);
	/* datagrams for our address (or broadcast); local_port host order */
	void (*udp_rx)(void *ctx, uint16_t local_port, const struct udp_peer *from,
		       const uint8_t *data, size_t len);
	struct net_stats st;
};

void net_input(struct netif *nif, const uint8_t *frame, size_t len);
/* Send a UDP datagram (len <= UDP_MAX_PAYLOAD); dst MAC is the peer's. */
int net_udp_send(struct netif *nif, const struct udp_peer *to, uint16_t src_port,
		 const void *data, size_t len);
/* Gratuitous ARP: announce our MAC/IP (boot, and so after a failover). */
void net_send_garp(struct netif *nif);
uint32_t net_broadcast(const struct netif *nif);

/* RFC 1071 internet checksum of a buffer, folded, not inverted; add a sum. */
uint32_t inet_sum(const void *p, size_t n, uint32_t sum);
uint16_t inet_fold(uint32_t sum);

#endif
