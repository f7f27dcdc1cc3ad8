// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* uplinkd datapath: TC programs that pin every flow from the LAN to one
 * uplink ("line") by its fwmark, and count per flow and per line. All of
 * them return TC_ACT_UNSPEC ("next" under TCX): other programs still run
 * and nothing is ever dropped here. */

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

	if (parse_flow(skb, &key, &reason))
		reason = flow_steer(skb, &key);
	reason_count(reason);
	return TC_ACT_UNSPEC;
}

/* LAN egress: count the replies, de-NATed, per flow. */
SEC("tc")
int uplinkd_lan_out(struct __sk_buff *skb)
{
	struct flow_key key = {};
	enum ul_reason reason;

	if (parse_flow(skb, &key, &reason))
		flow_count_rx(skb, &key);
	return TC_ACT_UNSPEC;
}

/* Uplink egress: transmitted packets and bytes of the line. */
SEC("tc")
int uplinkd_up_out(struct __sk_buff *skb)
{
	line_count(skb, true);
	return TC_ACT_UNSPEC;
}

/* Uplink ingress: received packets and bytes of the line. */
SEC("tc")
int uplinkd_up_in(struct __sk_buff *skb)
{
	line_count(skb, false);
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual BSD/GPL";
