// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* The datapath's state: map value types, maps and their typed accessors.
 * Every map is pinned by name under the loader's bpffs directory, so that
 * flows and counters survive an agent restart. */
#pragma once

#include "common.h"

/* A flow as LAN ingress sees it, client to Internet. Addresses are 16 bytes
 * (IPv4 as ::ffff:a.b.c.d), ports in host order; an ICMP echo flow has the
 * echo identifier as sport and 0 as dport. pad is always zero. Aligned to 4
 * so that it hashes as 32-bit words. */
struct flow_key {
	__u8  family;			/* UL_AF_INET or UL_AF_INET6 */
	__u8  proto;			/* IPPROTO_TCP, _UDP, _ICMP or _ICMPV6 */
	__u16 pad;
	__u8  saddr[UL_ADDR_LEN];
	__u8  daddr[UL_ADDR_LEN];
	__u16 sport;
	__u16 dport;
} __attribute__((aligned(4)));

/* flow.flags */
#define FLOW_F_RECOVERED	(1U << 0)	/* line taken from conntrack, not the buckets */
#define FLOW_F_CLASSIFIED	(1U << 1)	/* pinned while a rule set was in force: its policy counts it */

struct flow {
	__u32 line;			/* index into ul_lines */
	__u32 flags;			/* FLOW_F_* */
	__u8  nat_addr[UL_ADDR_LEN];	/* NAT source: conntrack's when recovered, else the
					 * line's configured one; zero when unknown */
	__u64 first_seen;		/* ul_now(): CLOCK_MONOTONIC, ns */
	__u64 last_seen;
	__u64 tx_packets;		/* LAN to Internet, at LAN ingress */
	__u64 tx_bytes;
	__u64 rx_packets;		/* Internet to LAN, at LAN egress (after de-NAT) */
	__u64 rx_bytes;
};

/* line.flags */
#define LINE_F_DEAD	(1U << 0)	/* no new flows; pinned flows handled as dead */

struct line {
	__u32 mark;			/* fwmark of the line's rule; 0: line not configured */
	__u32 flags;			/* LINE_F_* */
	__u32 weight;			/* informational: weights act through ul_buckets */
	__u32 ifindex;			/* informational: the uplink interface */
	__u8  nat_addr4[UL_ADDR_LEN];	/* NAT source addresses recorded in new flows */
	__u8  nat_addr6[UL_ADDR_LEN];
};

struct line_stats {
	__u64 tx_packets;		/* LAN ingress: to the Internet over the line */
	__u64 tx_bytes;
	__u64 rx_packets;		/* LAN egress: replies that came in over the line */
	__u64 rx_bytes;
};

/* Every flow seen at LAN ingress and the line it is pinned to. LRU, so that a
 * full table evicts idle flows instead of refusing new ones (an evicted flow
 * is recovered from conntrack). max_entries is set by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 1 << 20);
	__type(key, struct flow_key);
	__type(value, struct flow);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_flows SEC(".maps");

/* Line configuration (mark, dead flag), written by the control plane. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_MAX_LINES);
	__type(key, __u32);
	__type(value, struct line);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_lines SEC(".maps");

/* Line of each bucket, filled by the control plane from the live lines in
 * proportion to their weights: a new flow takes the line of its bucket. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_NUM_BUCKETS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_buckets SEC(".maps");

/* NAT source address -> line, to recover a lost flow's line from conntrack. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u8[UL_ADDR_LEN]);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_nat_src SEC(".maps");

/* The gateway's own addresses: traffic to them is not steered. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u8[UL_ADDR_LEN]);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_local SEC(".maps");

/* A prefix of ul_lan_src: the family, then the 16-byte address; prefixlen
 * counts bits from the family on (an IPv4 /24 is 8 + 96 + 24, v4-mapped;
 * "all of IPv6" is 8, which covers no IPv4 address). */
struct lan_prefix {
	__u32 prefixlen;
	__u8  family;			/* UL_AF_INET or UL_AF_INET6 */
	__u8  addr[UL_ADDR_LEN];
} __attribute__((packed));

/* The LAN's subnets: only flows from them are pinned (as the seed NATs only
 * -s NWI/NMI); the control plane fills it (0.0.0.0/0 and ::/0 where it knows
 * no subnet of a family, so that nothing is refused unknowingly). */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 256);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct lan_prefix);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_lan_src SEC(".maps");

/* Forwarded LAN traffic per line, counted at LAN ingress (tx) and egress
 * (rx) from the flow's line; per CPU, summed by the loader. The gateway's
 * own traffic is only in the uplink interface's counters. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UL_MAX_LINES);
	__type(key, __u32);
	__type(value, struct line_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_line_stats SEC(".maps");

static __always_inline struct flow *flow_lookup(const struct flow_key *key)
{
	return bpf_map_lookup_elem(&ul_flows, key);
}

/* Returns 0 or a negative errno, -EEXIST when another CPU was first. */
static __always_inline int flow_insert(const struct flow_key *key, const struct flow *flow)
{
	return bpf_map_update_elem(&ul_flows, key, flow, BPF_NOEXIST);
}

/* NULL for an index out of range (UL_NO_LINE included). */
static __always_inline const struct line *line_lookup(__u32 line)
{
	return bpf_map_lookup_elem(&ul_lines, &line);
}

static __always_inline bool line_live(const struct line *ln)
{
	return ln && ln->mark && !(ln->flags & LINE_F_DEAD);
}

static __always_inline __u32 bucket_line(__u32 hash)
{
	__u32 bucket = hash % UL_NUM_BUCKETS;
	const __u32 *line = bpf_map_lookup_elem(&ul_buckets, &bucket);

	return line ? *line : UL_NO_LINE;
}

static __always_inline __u32 nat_src_line(const __u8 *addr)
{
	const __u32 *line = bpf_map_lookup_elem(&ul_nat_src, addr);

	return line ? *line : UL_NO_LINE;
}

static __always_inline bool addr_is_local(const __u8 *addr)
{
	return bpf_map_lookup_elem(&ul_local, addr) != NULL;
}

static __always_inline bool src_on_lan(__u8 family, const __u8 *addr)
{
	struct lan_prefix p = { .prefixlen = 8 + UL_ADDR_LEN * 8, .family = family };

	__builtin_memcpy(p.addr, addr, UL_ADDR_LEN);
	return bpf_map_lookup_elem(&ul_lan_src, &p) != NULL;
}

static __always_inline struct line_stats *line_stats_lookup(__u32 line)
{
	return bpf_map_lookup_elem(&ul_line_stats, &line);
}

/* Adds a forwarded packet of len bytes to stats: tx (LAN to Internet) or
 * rx. */
static __always_inline void stats_add(struct line_stats *stats, __u32 len, bool tx)
{
	if (tx) {
		stats->tx_packets++;
		stats->tx_bytes += len;
	} else {
		stats->rx_packets++;
		stats->rx_bytes += len;
	}
}
