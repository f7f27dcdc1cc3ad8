// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Why LAN ingress did, or did not, steer a packet: one reason is counted per
 * packet, at the end of the program. */
#pragma once

#include "common.h"

/* The loader reads the names from BTF ("UL_REASON_NEW_FLOW" -> "new_flow"):
 * add codes before UL_REASON_MAX and nothing else has to change. */
enum ul_reason {
	UL_REASON_NEW_FLOW,		/* new flow pinned to a line picked from the buckets */
	UL_REASON_EXISTING_FLOW,	/* pinned flow, its line is live */
	UL_REASON_RECOVERED_CT,		/* flow map miss, line recovered from conntrack's NAT address */
	UL_REASON_MOVED_FLOW,		/* UDP/ICMP flow moved off its dead line */
	UL_REASON_DEAD_LINE_TCP,	/* TCP flow kept on its dead line, whose table answers prohibit */
	UL_REASON_NO_LIVE_LINE,		/* nothing live to pick: new flows pass unmarked */
	UL_REASON_FLOW_UPDATE_ERR,	/* the flow map refused the new flow: marked, not pinned */
	UL_REASON_NOT_IP,		/* neither IPv4, IPv6 nor ARP */
	UL_REASON_ARP,
	UL_REASON_TRUNCATED,		/* headers cut short */
	UL_REASON_MALFORMED,		/* bad IP version or header length */
	UL_REASON_FRAGMENT,		/* non-first fragment: it has no ports, passed untouched */
	UL_REASON_OTHER_L4,		/* not TCP, UDP or ICMP echo, or too many IPv6 extension headers */
	UL_REASON_ND,			/* IPv6 neighbour discovery */
	UL_REASON_MULTICAST,		/* multicast or broadcast destination, L2 or L3 */
	UL_REASON_LINK_LOCAL,		/* link-local destination */
	UL_REASON_LOCAL_DST,		/* one of the gateway's own addresses (ul_local) */
	UL_REASON_FOREIGN_SRC,		/* a source outside the LAN's subnets (ul_lan_src): no flow */
	UL_REASON_TCP_UNKNOWN,		/* a TCP segment, not a SYN, of a connection neither the flow
					 * map nor conntrack knows: passed unmarked, not pinned */
	UL_REASON_POLICY_UNREACHABLE,	/* the rule's policy has no usable line and its last resort
					 * is unreachable: marked for the unreachable route, not pinned */
	UL_REASON_POLICY_BLACKHOLE,	/* likewise, last resort blackhole: marked for the blackhole route */
	UL_REASON_MAX,
};

/* Puts enum ul_reason into BTF, where the loader finds the names. */
const enum ul_reason ul_reason_max = UL_REASON_MAX;

/* Room for reasons added later, so that a pinned ul_reasons map stays
 * compatible across upgrades. */
#define UL_REASON_SLOTS	64
/* The last slots count what is not a packet's reason: flows whose policy
 * the control plane forgot (their ids went to new policies), packets the
 * full parser read because the fast one could not (counted at LAN ingress
 * and egress alike), and flows the control plane removed. The loader
 * writes the first and the last. */
#define UL_SLOT_FORGOTTEN_FLOWS	(UL_REASON_SLOTS - 3)
#define UL_SLOT_SLOW_PARSE	(UL_REASON_SLOTS - 2)
#define UL_SLOT_REMOVED_FLOWS	(UL_REASON_SLOTS - 1)
_Static_assert(UL_REASON_MAX <= UL_SLOT_FORGOTTEN_FLOWS, "too many reasons");

/* Packets per reason, per CPU: summed by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UL_REASON_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_reasons SEC(".maps");

static __always_inline void slot_count(__u32 slot)
{
	__u64 *count = bpf_map_lookup_elem(&ul_reasons, &slot);

	if (count)
		*count += 1;
}

static __always_inline void reason_count(enum ul_reason reason)
{
	slot_count(reason);
}

static __always_inline void slow_parse_count(void)
{
	slot_count(UL_SLOT_SLOW_PARSE);
}
