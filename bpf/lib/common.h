// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Headers, constants and the volatile const configuration shared by all
 * uplinkd programs. */
#pragma once

#include <stdbool.h>
#include <linux/types.h>
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Address families as stored in flow_key.family (from <sys/socket.h>). */
#define UL_AF_INET	2
#define UL_AF_INET6	10

/* Every address in a map is 16 bytes: IPv6 as is, IPv4 as IPv4-mapped IPv6
 * (::ffff:a.b.c.d), so that one key type serves both families and Go's
 * netip.AddrFrom16(...).Unmap() reads it back. */
#define UL_ADDR_LEN	16

/* Uplinks ("lines") the datapath can steer to. */
#define UL_MAX_LINES	16

/* Slots of the bucket table a new flow picks its line from: the control
 * plane fills them in proportion to the lines' weights. */
#define UL_NUM_BUCKETS	1024

/* Bucket value meaning "no live line". */
#define UL_NO_LINE	0xffffffffU

/* Configuration, set from Go before the programs are loaded. */

/* The fwmark bits uplinkd uses by default, clear of Cilium's 0xf00,
 * kube-proxy's 0xc000 and tailscale's 0xff0000. The Go side reads this
 * default (and UL_MAX_LINES, UL_NUM_BUCKETS, the flow map's size) from the
 * object: they are defined here only. */
#define UL_DEFAULT_MARK_MASK	0x1f000000

/* Bits of skb->mark that belong to uplinkd; the others are preserved. */
volatile const __u32 mark_mask = UL_DEFAULT_MARK_MASK;

/* The tick a CPU last read the clock in, and what it read. */
struct clock_cache {
	__u64 jiffies;
	__u64 ns;
};

/* Per CPU: ul_now() reads the clock once per tick, not per packet. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct clock_cache);
} ul_clock SEC(".maps");

/* Flow timestamps: CLOCK_MONOTONIC at tick resolution (1-10 ms), plenty for
 * first and last seen. bpf_ktime_get_coarse_ns() is a helper call, about
 * 9 ns per packet on the test machine; bpf_jiffies64() is inlined by the
 * verifier and changes when the coarse clock does, so the coarse clock is
 * read once per tick and CPU and cached. */
static __always_inline __u64 ul_now(void)
{
	__u32 zero = 0;
	struct clock_cache *c = bpf_map_lookup_elem(&ul_clock, &zero);
	__u64 jiffies = bpf_jiffies64();

	if (!c)
		return bpf_ktime_get_coarse_ns();
	if (c->jiffies != jiffies) {
		c->jiffies = jiffies;
		c->ns = bpf_ktime_get_coarse_ns();
	}
	return c->ns;
}
