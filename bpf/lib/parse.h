// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Packet parsing: Ethernet with up to two VLAN tags, IPv4 (options) or IPv6
 * (extension headers), then TCP/UDP ports or the ICMP echo identifier.
 *
 * Two parsers give the same key for the packets both accept. The fast one
 * reads the common frame (untagged Ethernet, IPv4 without options or IPv6
 * without extension headers, TCP or UDP, to a unicast destination) by
 * direct packet access from the skb's linear part; anything else falls
 * back to the full parser, which reads with bpf_skb_load_bytes() (headers
 * outside the linear part too), checks every read and says why a packet
 * is not steered. Three bpf_skb_load_bytes() calls cost about 55 ns per
 * packet more than direct access on the test machine. */
#pragma once

#include "common.h"
#include "maps.h"
#include "reasons.h"

#define UL_MAX_VLAN_TAGS	2	/* 802.1Q, or 802.1ad + 802.1Q (QinQ) */
#define UL_MAX_IPV6_EXT_HDRS	8	/* more: the packet is not steered */
#define UL_ETH_GROUP_BIT	0x01	/* in the first destination octet */
#define UL_IPV4_FRAG_OFFSET	0x1fff	/* iphdr.frag_off, host order */
#define UL_IPV6_FRAG_OFFSET	0xfff8	/* ipv6_frag_hdr.frag_off, host order */
#define UL_IPV6_OPT_UNIT	8	/* extension header length unit */

/* ICMP types (<linux/icmp.h> would drag in <sys/socket.h>). */
#define UL_ICMP_ECHOREPLY	0
#define UL_ICMP_ECHO		8
/* ICMPv6 neighbour discovery: router solicitation .. redirect (RFC 4861). */
#define UL_ND_FIRST		133
#define UL_ND_LAST		137

struct vlan_tag {
	__be16 tci;
	__be16 proto;			/* next ethertype */
};

struct ipv6_frag_hdr {
	__u8   nexthdr;
	__u8   reserved;
	__be16 frag_off;		/* offset << 3 | M */
	__be32 id;
};

struct l4_ports {
	__be16 src;
	__be16 dst;
};

/* ICMP and ICMPv6 echo request/reply. */
struct icmp_echo {
	__u8   type;
	__u8   code;
	__sum16 csum;
	__be16 id;
	__be16 seq;
};

static __always_inline void addr_from_v4(__u8 *addr, __be32 v4)
{
	addr[10] = 0xff;
	addr[11] = 0xff;
	__builtin_memcpy(&addr[12], &v4, sizeof(v4));
}

static __always_inline bool parse_ipv4(struct __sk_buff *skb, __u32 *off, struct flow_key *key,
				       enum ul_reason *reason)
{
	struct iphdr ip;

	if (bpf_skb_load_bytes(skb, *off, &ip, sizeof(ip)) < 0) {
		*reason = UL_REASON_TRUNCATED;
		return false;
	}
	if (ip.version != 4 || ip.ihl < sizeof(ip) / 4) {
		*reason = UL_REASON_MALFORMED;
		return false;
	}
	/* A non-first fragment has no ports: it passes untouched. The first one
	 * is steered like any packet of its flow; conntrack reassembles the
	 * datagram before routing and the result keeps the first fragment's
	 * mark. */
	if (bpf_ntohs(ip.frag_off) & UL_IPV4_FRAG_OFFSET) {
		*reason = UL_REASON_FRAGMENT;
		return false;
	}
	key->family = UL_AF_INET;
	key->proto = ip.protocol;
	addr_from_v4(key->saddr, ip.saddr);
	addr_from_v4(key->daddr, ip.daddr);
	*off += ip.ihl * 4;
	return true;
}

static __always_inline bool parse_ipv6(struct __sk_buff *skb, __u32 *off, struct flow_key *key,
				       enum ul_reason *reason)
{
	struct ipv6hdr ip6;
	__u8 nexthdr;

	if (bpf_skb_load_bytes(skb, *off, &ip6, sizeof(ip6)) < 0) {
		*reason = UL_REASON_TRUNCATED;
		return false;
	}
	if (ip6.version != 6) {
		*reason = UL_REASON_MALFORMED;
		return false;
	}
	key->family = UL_AF_INET6;
	__builtin_memcpy(key->saddr, &ip6.saddr, UL_ADDR_LEN);
	__builtin_memcpy(key->daddr, &ip6.daddr, UL_ADDR_LEN);
	nexthdr = ip6.nexthdr;
	*off += sizeof(ip6);

	for (int i = 0; i < UL_MAX_IPV6_EXT_HDRS; i++) {
		struct ipv6_frag_hdr frag;
		struct ipv6_opt_hdr opt;

		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, *off, &opt, sizeof(opt)) < 0) {
				*reason = UL_REASON_TRUNCATED;
				return false;
			}
			nexthdr = opt.nexthdr;
			*off += ((__u32)opt.hdrlen + 1) * UL_IPV6_OPT_UNIT;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, *off, &frag, sizeof(frag)) < 0) {
				*reason = UL_REASON_TRUNCATED;
				return false;
			}
			/* Same choice as IPv4: the first fragment is steered. */
			if (bpf_ntohs(frag.frag_off) & UL_IPV6_FRAG_OFFSET) {
				*reason = UL_REASON_FRAGMENT;
				return false;
			}
			nexthdr = frag.nexthdr;
			*off += sizeof(frag);
			break;
		default:
			key->proto = nexthdr;
			return true;
		}
	}
	*reason = UL_REASON_OTHER_L4;
	return false;
}

static __always_inline bool icmp_is_echo(const struct flow_key *key, __u8 type)
{
	if (key->family == UL_AF_INET && key->proto == IPPROTO_ICMP)
		return type == UL_ICMP_ECHO || type == UL_ICMP_ECHOREPLY;
	if (key->family == UL_AF_INET6 && key->proto == IPPROTO_ICMPV6)
		return type == ICMPV6_ECHO_REQUEST || type == ICMPV6_ECHO_REPLY;
	return false;
}

static __always_inline bool parse_l4(struct __sk_buff *skb, __u32 off, struct flow_key *key,
				     enum ul_reason *reason)
{
	struct icmp_echo echo;
	struct l4_ports ports;

	switch (key->proto) {
	case IPPROTO_TCP:
	case IPPROTO_UDP:
		if (bpf_skb_load_bytes(skb, off, &ports, sizeof(ports)) < 0) {
			*reason = UL_REASON_TRUNCATED;
			return false;
		}
		key->sport = bpf_ntohs(ports.src);
		key->dport = bpf_ntohs(ports.dst);
		return true;
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, off, &echo, sizeof(echo)) < 0) {
			*reason = UL_REASON_TRUNCATED;
			return false;
		}
		if (key->proto == IPPROTO_ICMPV6 && echo.type >= UL_ND_FIRST && echo.type <= UL_ND_LAST) {
			*reason = UL_REASON_ND;
			return false;
		}
		if (!icmp_is_echo(key, echo.type)) {
			*reason = UL_REASON_OTHER_L4;
			return false;
		}
		key->sport = bpf_ntohs(echo.id);
		return true;
	default:
		*reason = UL_REASON_OTHER_L4;
		return false;
	}
}

/* Multicast, broadcast and link-local destinations are never routed to an
 * uplink. */
static __always_inline bool dst_routable(const struct flow_key *key, enum ul_reason *reason)
{
	const __u8 *d = key->daddr;

	if (key->family == UL_AF_INET) {
		if ((d[12] & 0xf0) == 0xe0 ||					/* 224.0.0.0/4 */
		    (d[12] == 0xff && d[13] == 0xff && d[14] == 0xff && d[15] == 0xff)) {
			*reason = UL_REASON_MULTICAST;
			return false;
		}
		if (d[12] == 169 && d[13] == 254) {				/* 169.254.0.0/16 */
			*reason = UL_REASON_LINK_LOCAL;
			return false;
		}
		return true;
	}
	if (d[0] == 0xff) {							/* ff00::/8 */
		*reason = UL_REASON_MULTICAST;
		return false;
	}
	if (d[0] == 0xfe && (d[1] & 0xc0) == 0x80) {				/* fe80::/10 */
		*reason = UL_REASON_LINK_LOCAL;
		return false;
	}
	return true;
}

/* The full parser: fills key from the packet. Returns false, with the
 * reason, for a packet that is no TCP, UDP or ICMP echo flow. Like the fast
 * parser it leaves the destination's routability to flow_steer(), which
 * checks it for a new flow: both parsers then give the same verdict for
 * the same flow (LAN egress counts a reply on its pinned flow whichever
 * parser read it). */
static __always_inline bool parse_flow_slow(struct __sk_buff *skb, struct flow_key *key,
					    enum ul_reason *reason, __u32 *l3_off, __u32 *l4_off)
{
	__u32 off = sizeof(struct ethhdr);
	struct ethhdr eth;
	__be16 proto;
	bool ok;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0) {
		*reason = UL_REASON_TRUNCATED;
		return false;
	}
	proto = eth.h_proto;
	for (int i = 0; i < UL_MAX_VLAN_TAGS; i++) {
		struct vlan_tag tag;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (bpf_skb_load_bytes(skb, off, &tag, sizeof(tag)) < 0) {
			*reason = UL_REASON_TRUNCATED;
			return false;
		}
		proto = tag.proto;
		off += sizeof(tag);
	}

	*l3_off = off;
	if (proto == bpf_htons(ETH_P_IP)) {
		ok = parse_ipv4(skb, &off, key, reason);
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		ok = parse_ipv6(skb, &off, key, reason);
	} else {
		*reason = proto == bpf_htons(ETH_P_ARP) ? UL_REASON_ARP : UL_REASON_NOT_IP;
		return false;
	}
	if (!ok || !parse_l4(skb, off, key, reason))
		return false;
	*l4_off = off;
	if (eth.h_dest[0] & UL_ETH_GROUP_BIT) {
		*reason = UL_REASON_MULTICAST;
		return false;
	}
	return true;
}

/* Bytes the fast parser reads: Ethernet, the fixed IP header, the ports. */
#define UL_FAST_V4_LEN	(sizeof(struct ethhdr) + sizeof(struct iphdr) + sizeof(struct l4_ports))
#define UL_FAST_V6_LEN	(sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + sizeof(struct l4_ports))
#define UL_IPV4_IHL_MIN	5			/* words: no options */

static __always_inline bool l4_has_ports(__u8 proto)
{
	return proto == IPPROTO_TCP || proto == IPPROTO_UDP;
}

/* The fast parser: true with the key filled for the common frame, false
 * for anything it does not read (the full parser then decides). It leaves
 * the destination's routability to the caller, who checks it for a new
 * flow only: a pinned flow's destination passed when it was pinned. */
static __always_inline bool parse_flow_fast(const struct __sk_buff *skb, struct flow_key *key,
					    __u32 *l4_off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	const struct ethhdr *eth = data;
	const struct l4_ports *ports;

	if (data + UL_FAST_V4_LEN > data_end || (eth->h_dest[0] & UL_ETH_GROUP_BIT))
		return false;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		const struct iphdr *ip = data + sizeof(*eth);

		if (ip->version != 4 || ip->ihl != UL_IPV4_IHL_MIN ||
		    (ip->frag_off & bpf_htons(UL_IPV4_FRAG_OFFSET)) || !l4_has_ports(ip->protocol))
			return false;
		ports = (const void *)(ip + 1);
		*l4_off = sizeof(*eth) + sizeof(*ip);
		key->family = UL_AF_INET;
		key->proto = ip->protocol;
		addr_from_v4(key->saddr, ip->saddr);
		addr_from_v4(key->daddr, ip->daddr);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		const struct ipv6hdr *ip6 = data + sizeof(*eth);

		if (data + UL_FAST_V6_LEN > data_end || ip6->version != 6 || !l4_has_ports(ip6->nexthdr))
			return false;
		ports = (const void *)(ip6 + 1);
		*l4_off = sizeof(*eth) + sizeof(*ip6);
		key->family = UL_AF_INET6;
		key->proto = ip6->nexthdr;
		__builtin_memcpy(key->saddr, &ip6->saddr, UL_ADDR_LEN);
		__builtin_memcpy(key->daddr, &ip6->daddr, UL_ADDR_LEN);
	} else {
		return false;
	}
	key->sport = bpf_ntohs(ports->src);
	key->dport = bpf_ntohs(ports->dst);
	return true;
}

/* Fills key, and the offsets of the IP and transport headers, from the
 * packet, by the fast parser where it can. Returns false, with the reason,
 * for a packet that is no TCP, UDP or ICMP echo flow. A true return does
 * not say that the destination is routable: dst_routable() does. */
static __always_inline bool parse_flow(struct __sk_buff *skb, struct flow_key *key,
				       enum ul_reason *reason, __u32 *l3_off, __u32 *l4_off)
{
	if (parse_flow_fast(skb, key, l4_off)) {
		*l3_off = sizeof(struct ethhdr);
		return true;
	}
	slow_parse_count();
	__builtin_memset(key, 0, sizeof(*key));
	return parse_flow_slow(skb, key, reason, l3_off, l4_off);
}

/* TCP flags (the 14th byte of the header). */
#define UL_TCP_FLAGS_OFF	13
#define UL_TCP_FIN		0x01
#define UL_TCP_SYN		0x02
#define UL_TCP_RST		0x04
#define UL_TCP_ACK		0x10

/* Whether the packet opens a TCP connection: a SYN without ACK, FIN or RST
 * (SYN-FIN and SYN-RST open nothing, and a packet of a lost flow carrying
 * them must be looked up like any other). Read only for a new flow. */
static __always_inline bool tcp_opens(struct __sk_buff *skb, const struct flow_key *key, __u32 l4_off)
{
	__u8 flags;

	if (key->proto != IPPROTO_TCP ||
	    bpf_skb_load_bytes(skb, l4_off + UL_TCP_FLAGS_OFF, &flags, sizeof(flags)) < 0)
		return false;
	return (flags & (UL_TCP_FIN | UL_TCP_SYN | UL_TCP_RST | UL_TCP_ACK)) == UL_TCP_SYN;
}
