// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* uplinkd datapath: TC programs on the LAN interfaces that pin every flow
 * from the LAN to one uplink ("line") by its fwmark, and count per flow and
 * per line. Both return TC_ACT_UNSPEC ("next" under TCX): other programs
 * still run and nothing is ever dropped here. The uplinks carry no program:
 * a forwarded packet's line is known where its flow is, and the gateway's
 * own traffic is in the uplink interface's counters. */

#include "lib/common.h"
#include "lib/flow.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/reasons.h"

/* LAN ingress: pin the flow to a line and mark the packet for it. */
SEC("tc")
int uplinkd_lan_in(struct __sk_buff *skb)
{
	struct flow_key key = {};
	enum ul_reason reason;
	__u32 l3_off, l4_off;

	if (parse_flow(skb, &key, &reason, &l3_off, &l4_off))
		reason = flow_steer(skb, &key, l3_off, l4_off);
	reason_count(reason);
	return TC_ACT_UNSPEC;
}

/* LAN egress: count the replies, de-NATed, per flow and per line. */
SEC("tc")
int uplinkd_lan_out(struct __sk_buff *skb)
{
	struct flow_key key = {};
	enum ul_reason reason;
	__u32 l3_off, l4_off;

	if (parse_flow(skb, &key, &reason, &l3_off, &l4_off))
		flow_count_rx(skb, &key);
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual BSD/GPL";
