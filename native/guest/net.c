/* net.c - Ethernet/ARP/IPv4/ICMP/UDP for one interface with a static address. */
#include "net.h"
#include "lib.h"

#define ARP_LEN   28
#define IP_PROTO_ICMP 1
#define IP_PROTO_UDP  17

static const uint8_t bcast_mac[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};

uint32_t inet_sum(const void *p, size_t n, uint32_t sum)
{
	const uint8_t *b = p;

	while (n > 1) {
		sum += (uint32_t)(b[0] << 8 | b[1]);
		b += 2;
		n -= 2;
	}
	if (n)
		sum += (uint32_t)b[0] << 8;
	return sum;
}

uint16_t inet_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)sum;
}

uint32_t net_broadcast(const struct netif *nif)
{
	return nif->ip | ~nif->netmask;
}

static uint8_t *eth_header(uint8_t *f, const uint8_t *dst, const uint8_t *src, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, src, 6);
	put_be16(f + 12, type);
	return f + ETH_HLEN;
}

static void arp_send(struct netif *nif, uint16_t op, const uint8_t *eth_dst,
		     const uint8_t *tha, uint32_t tpa)
{
	uint8_t *f = nif->tx_alloc(nif->ctx);
	uint8_t *a = eth_header(f, eth_dst, nif->mac, ETH_P_ARP);

	put_be16(a, 1);                 /* Ethernet */
	put_be16(a + 2, ETH_P_IP);
	a[4] = 6;
	a[5] = 4;
	put_be16(a + 6, op);
	memcpy(a + 8, nif->mac, 6);
	memcpy(a + 14, &nif->ip, 4);
	memcpy(a + 18, tha, 6);
	memcpy(a + 24, &tpa, 4);
	memset(a + ARP_LEN, 0, 60 - ETH_HLEN - ARP_LEN);      /* minimum frame */
	nif->tx_send(nif->ctx, f, 60);
}

void net_send_garp(struct netif *nif)
{
	static const uint8_t zero[6];

	arp_send(nif, 1, bcast_mac, zero, nif->ip);
}

static void arp_input(struct netif *nif, const uint8_t *a, size_t len)
{
	uint32_t tpa;

	if (len < ARP_LEN || get_be16(a) != 1 || get_be16(a + 2) != ETH_P_IP ||
	    a[4] != 6 || a[5] != 4) {
		nif->st.rx_dropped++;
		return;
	}
	memcpy(&tpa, a + 24, 4);
	if (get_be16(a + 6) != 1 || tpa != nif->ip || !nif->ip)
		return;                 /* replies and others' requests: nothing to do */
	{
		uint32_t spa;

		memcpy(&spa, a + 14, 4);
		arp_send(nif, 2, a + 8, a + 8, spa);
		nif->st.arp_replies++;
	}
}

/* Build Ethernet+IPv4 headers for a datagram of payload_len bytes. */
static uint8_t *ip_header(struct netif *nif, uint8_t *f, const uint8_t *dst_mac, uint32_t dst_ip,
			  uint8_t proto, size_t payload_len)
{
	static HOT uint16_t ident;
	uint8_t *ip = eth_header(f, dst_mac, nif->mac, ETH_P_IP);

	ip[0] = 0x45;
	ip[1] = 0;
	put_be16(ip + 2, (uint16_t)(IP_HLEN + payload_len));
	put_be16(ip + 4, ident++);
	put_be16(ip + 6, 0x4000);       /* DF */
	ip[8] = 64;
	ip[9] = proto;
	put_be16(ip + 10, 0);
	memcpy(ip + 12, &nif->ip, 4);
	memcpy(ip + 16, &dst_ip, 4);
	put_be16(ip + 10, (uint16_t)~inet_fold(inet_sum(ip, IP_HLEN, 0)));
	return ip + IP_HLEN;
}

static void send_frame(struct netif *nif, uint8_t *f, size_t len)
{
	if (len < 60) {
		memset(f + len, 0, 60 - len);
		len = 60;
	}
	nif->tx_send(nif->ctx, f, len);
}

static void icmp_input(struct netif *nif, const uint8_t *eth, const uint8_t *ip,
		       const uint8_t *icmp, size_t len)
{
	uint8_t *f, *r;
	uint32_t src;

	if (len < 8 || inet_fold(inet_sum(icmp, len, 0)) != 0xffff) {
		nif->st.rx_bad_csum++;
		return;
	}
	if (icmp[0] != 8 || icmp[1] != 0 || len > 1500 - IP_HLEN)
		return;                 /* only echo requests */
	memcpy(&src, ip + 12, 4);
	f = nif->tx_alloc(nif->ctx);
	r = ip_header(nif, f, eth + 6, src, IP_PROTO_ICMP, len);
	memcpy(r, icmp, len);
	r[0] = 0;                       /* echo reply */
	put_be16(r + 2, 0);
	put_be16(r + 2, (uint16_t)~inet_fold(inet_sum(r, len, 0)));
	send_frame(nif, f, ETH_HLEN + IP_HLEN + len);
	nif->st.icmp_replies++;
}

static uint32_t udp_pseudo_sum(uint32_t src, uint32_t dst, size_t udp_len)
{
	uint32_t sum = inet_sum(&src, 4, 0);

	sum = inet_sum(&dst, 4, sum);
	return sum + IP_PROTO_UDP + (uint32_t)udp_len;
}

static void udp_input(struct netif *nif, const uint8_t *eth, const uint8_t *ip,
		      const uint8_t *u, size_t len)
{
	struct udp_peer from;
	uint32_t src, dst;
	uint16_t ulen;

	if (len < UDP_HLEN) {
		nif->st.rx_dropped++;
		return;
	}
	ulen = get_be16(u + 4);
	if (ulen < UDP_HLEN || ulen > len) {
		nif->st.rx_dropped++;
		return;
	}
	memcpy(&src, ip + 12, 4);
	memcpy(&dst, ip + 16, 4);
	if (get_be16(u + 6) != 0 &&
	    inet_fold(inet_sum(u, ulen, udp_pseudo_sum(src, dst, ulen))) != 0xffff) {
		nif->st.rx_bad_csum++;
		return;
	}
	memcpy(from.mac, eth + 6, 6);
	from.ip = src;
	from.port = get_be16(u);
	nif->st.udp_rx++;
	if (nif->udp_rx)
		nif->udp_rx(nif->ctx, get_be16(u + 2), &from, u + UDP_HLEN, ulen - UDP_HLEN);
}

static void ip_input(struct netif *nif, const uint8_t *eth, const uint8_t *ip, size_t len)
{
	uint16_t total, frag;
	uint32_t dst;

	if (len < IP_HLEN || ip[0] != 0x45) {   /* IPv4 without options only */
		nif->st.rx_dropped++;
		return;
	}
	if (inet_fold(inet_sum(ip, IP_HLEN, 0)) != 0xffff) {
		nif->st.rx_bad_csum++;
		return;
	}
	total = get_be16(ip + 2);
	if (total < IP_HLEN || total > len) {
		nif->st.rx_dropped++;
		return;
	}
	frag = get_be16(ip + 6);
	if (frag & 0x3fff) {                     /* MF set or offset != 0 */
		nif->st.rx_frags++;
		return;
	}
	memcpy(&dst, ip + 16, 4);
	if (ip[9] == IP_PROTO_ICMP && dst == nif->ip)
		icmp_input(nif, eth, ip, ip + IP_HLEN, total - IP_HLEN);
	else if (ip[9] == IP_PROTO_UDP &&
		 (dst == nif->ip || dst == 0xffffffffu || dst == net_broadcast(nif)))
		udp_input(nif, eth, ip, ip + IP_HLEN, total - IP_HLEN);
	else
		nif->st.rx_dropped++;
}

void net_input(struct netif *nif, const uint8_t *f, size_t len)
{
	nif->st.rx_frames++;
	if (len < ETH_HLEN || (memcmp(f, nif->mac, 6) != 0 && memcmp(f, bcast_mac, 6) != 0)) {
		nif->st.rx_dropped++;
		return;
	}
	switch (get_be16(f + 12)) {
	case ETH_P_ARP:
		arp_input(nif, f + ETH_HLEN, len - ETH_HLEN);
		break;
	case ETH_P_IP:
		ip_input(nif, f, f + ETH_HLEN, len - ETH_HLEN);
		break;
	default:
		nif->st.rx_dropped++;
	}
}

int net_udp_send(struct netif *nif, const struct udp_peer *to, uint16_t src_port,
		 const void *data, size_t len)
{
	uint8_t *f, *u;
	uint16_t ulen, csum;

	if (len > UDP_MAX_PAYLOAD)
		return -1;
	ulen = (uint16_t)(UDP_HLEN + len);
	f = nif->tx_alloc(nif->ctx);
	u = ip_header(nif, f, to->mac, to->ip, IP_PROTO_UDP, ulen);
	put_be16(u, src_port);
	put_be16(u + 2, to->port);
	put_be16(u + 4, ulen);
	put_be16(u + 6, 0);
	memcpy(u + UDP_HLEN, data, len);
	csum = (uint16_t)~inet_fold(inet_sum(u, ulen, udp_pseudo_sum(nif->ip, to->ip, ulen)));
	put_be16(u + 6, csum ? csum : 0xffff);
	send_frame(nif, f, ETH_HLEN + IP_HLEN + ulen);
	nif->st.udp_tx++;
	return 0;
}
