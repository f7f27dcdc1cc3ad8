// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* The floor: the least that any datapath pinning flows in the kernel's LRU
 * hash pays per packet, with uplinkd's own flow map, key and parser and
 * nothing else. The benchmarks run these beside uplinkd's programs, in the
 * same run, to split what uplinkd adds over an empty program into what the
 * map and the headers cost and what uplinkd's own work costs. The agent
 * never attaches them. */

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/maps.h"
#include "lib/parse.h"

/* An existing flow's packet at LAN ingress: read the headers, find the
 * flow, touch nothing. */
SEC("tc")
int uplinkd_floor_lookup(struct __sk_buff *skb)
{
	struct flow_key key = {};
	__u32 l4_off;

	if (parse_flow_fast(skb, &key, &l4_off))
		flow_lookup(&key);
	return TC_ACT_UNSPEC;
}

/* A reply at LAN egress: read the headers, find the flow it belongs to. */
SEC("tc")
int uplinkd_floor_lookup_reply(struct __sk_buff *skb)
{
	struct flow_key key = {};
	__u32 l4_off;

	if (parse_flow_fast(skb, &key, &l4_off)) {
		flow_key_reverse(&key);
		flow_lookup(&key);
	}
	return TC_ACT_UNSPEC;
}

/* A new flow's first packet: read the headers, miss, insert. */
SEC("tc")
int uplinkd_floor_insert(struct __sk_buff *skb)
{
	struct flow_key key = {};
	struct flow flow = {};
	__u32 l4_off;

	if (parse_flow_fast(skb, &key, &l4_off) && !flow_lookup(&key))
		flow_insert(&key, &flow);
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual BSD/GPL";
