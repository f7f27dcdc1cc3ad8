// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Policies: the set of lines a rule sends a new flow to, in tiers. The
 * control plane gives each policy a bucket table of the lines of its first
 * tier with a usable line (weighted, like ul_buckets) and says what the
 * policy does when none is left (its last resort). Policy 0, the balanced
 * one, is ul_buckets itself: a gateway without rules uses nothing else. */
#pragma once

#include "common.h"
#include "maps.h"

#define UL_MAX_POLICIES		64

/* policy.last_resort: what a new flow of a policy with no usable line gets. */
#define UL_LAST_RESORT_DEFAULT		0	/* a line of policy 0 */
#define UL_LAST_RESORT_UNREACHABLE	1	/* rule_cfg.unreach_mark, no flow pinned */
#define UL_LAST_RESORT_BLACKHOLE	2	/* rule_cfg.blackhole_mark, no flow pinned */

/* policy.flags */
#define POLICY_F_SET	(1U << 0)	/* written by the control plane: else policy 0 serves */

struct policy {
	__u32 last_resort;		/* UL_LAST_RESORT_* */
	__u32 flags;			/* POLICY_F_* */
	__u32 lines;			/* bit n: line n has a bucket in the policy's table */
};

struct policy_buckets {
	__u32 line[UL_NUM_BUCKETS];	/* like ul_buckets; UL_NO_LINE: no usable line */
};

/* Stickiness: a client's new flows of one policy (or rule) keep the line
 * the first got, while they come within the rule's sticky time. */
#define UL_STICKY_PER_RULE	0x10000U	/* sticky_key.scope: | rule index */

struct sticky_key {
	__u8  addr[UL_ADDR_LEN];	/* the client: the flow's source address */
	__u32 scope;			/* policy id, or UL_STICKY_PER_RULE | rule */
};

struct sticky {
	__u32 line;
	__u32 pad;
	__u64 last_ns;			/* ul_now() of the client's last new flow */
};

/* The policies, by id (written by the control plane). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct policy);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_policies SEC(".maps");

/* Each policy's bucket table, by id; policy 0's is ul_buckets. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct policy_buckets);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_policy_buckets SEC(".maps");

/* Sticky clients' lines. LRU: a full table forgets the idlest client. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct sticky_key);
	__type(value, struct sticky);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_sticky SEC(".maps");

/* Flows pinned per policy, per CPU (counted while a rule set is in force). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UL_MAX_POLICIES);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_policy_flows SEC(".maps");

/* Forwarded packets and bytes per policy, per CPU, of the flows a rule set
 * classified (those of no rule are policy 0's), counted where their lines
 * count them. A gateway without rules counts nothing here: its lines'
 * counters are the balanced policy's, and its pinned flows pay no more
 * than a test of their flags. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UL_MAX_POLICIES);
	__type(key, __u32);
	__type(value, struct line_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_policy_stats SEC(".maps");

/* flow.flags: the rule (+1, 0: none) and the policy that pinned the flow. */
#define FLOW_RULE_SHIFT		8
#define FLOW_RULE_MASK		0x1fffU		/* bits 8..20 */
#define FLOW_POLICY_SHIFT	24
#define FLOW_POLICY_MASK	0x3fU		/* bits 24..29 */
_Static_assert(UL_MAX_POLICIES - 1 <= FLOW_POLICY_MASK, "policy id must fit flow.flags");

static __always_inline __u32 flow_policy(__u32 flags)
{
	return (flags >> FLOW_POLICY_SHIFT) & FLOW_POLICY_MASK;
}

static __always_inline __u32 flow_policy_flags(__s32 rule, __u32 policy)
{
	return (((__u32)(rule + 1) & FLOW_RULE_MASK) << FLOW_RULE_SHIFT) |
	       ((policy & FLOW_POLICY_MASK) << FLOW_POLICY_SHIFT);
}

/* NULL for policy 0 and for a policy the control plane has not written:
 * policy 0's buckets serve them. */
static __always_inline const struct policy *policy_lookup(__u32 policy)
{
	const struct policy *pol;

	if (!policy)
		return NULL;
	pol = bpf_map_lookup_elem(&ul_policies, &policy);
	return pol && (pol->flags & POLICY_F_SET) ? pol : NULL;
}

static __always_inline __u32 policy_bucket_line(__u32 policy, __u32 hash)
{
	const struct policy_buckets *b = bpf_map_lookup_elem(&ul_policy_buckets, &policy);

	return b ? b->line[hash % UL_NUM_BUCKETS] : UL_NO_LINE;
}

static __always_inline void policy_flow_count(__u32 policy)
{
	__u64 *count = bpf_map_lookup_elem(&ul_policy_flows, &policy);

	if (count)
		*count += 1;
}

/* Counts a forwarded packet of a flow (by its flags) to its policy. */
static __always_inline void policy_count(__u32 flags, __u32 len, bool tx)
{
	__u32 policy = flow_policy(flags);
	struct line_stats *stats;

	if (!(flags & FLOW_F_CLASSIFIED))
		return;
	stats = bpf_map_lookup_elem(&ul_policy_stats, &policy);
	if (stats)
		stats_add(stats, len, tx);
}
