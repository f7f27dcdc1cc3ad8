// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Steering: pin every flow to a line and mark its packets for that line's
 * routing table. */
#pragma once

#include <asm-generic/errno-base.h>

#include "classify.h"
#include "common.h"
#include "ct.h"
#include "hash.h"
#include "maps.h"
#include "parse.h"
#include "policy.h"
#include "reasons.h"

static __always_inline void mark_for_line(struct __sk_buff *skb, const struct line *ln)
{
	if (ln && ln->mark)
		skb->mark = (skb->mark & ~mark_mask) | (ln->mark & mark_mask);
}

/* A live line for a new flow, from its bucket, or UL_NO_LINE. */
static __always_inline __u32 pick_line(const struct flow_key *key)
{
	__u32 line = bucket_line(flow_hash(key));

	return line_live(line_lookup(line)) ? line : UL_NO_LINE;
}

/* A policy's pick for a flow: a live line, or UL_NO_LINE and what the
 * policy wants then. */
struct policy_pick {
	__u32 line;
	__u32 resort;			/* UL_LAST_RESORT_*, when line is UL_NO_LINE */
	bool  own;			/* line is from the policy's own buckets */
};

/* A live line of policy's buckets for the flow. A policy with none falls
 * back to policy 0's buckets unless its last resort says otherwise. */
static __always_inline struct policy_pick pick_policy_line(const struct flow_key *key, __u32 policy)
{
	const struct policy *pol = policy_lookup(policy);
	struct policy_pick p = { .line = UL_NO_LINE, .resort = UL_LAST_RESORT_DEFAULT };
	__u32 hash = flow_hash(key);

	if (pol) {
		p.line = policy_bucket_line(policy, hash);
		if (line_live(line_lookup(p.line))) {
			p.own = true;
			return p;
		}
		p.line = UL_NO_LINE;
		if (pol->last_resort != UL_LAST_RESORT_DEFAULT) {
			p.resort = pol->last_resort;
			return p;
		}
	}
	p.line = bucket_line(hash);
	if (!line_live(line_lookup(p.line)))
		p.line = UL_NO_LINE;
	p.own = !policy;
	return p;
}

/* The mark of a last resort, 0 when the control plane configured none (the
 * policy then falls back to policy 0, as with UL_LAST_RESORT_DEFAULT). */
static __always_inline __u32 last_resort_mark(const struct rule_cfg *cfg, __u32 resort)
{
	if (!cfg)
		return 0;
	if (resort == UL_LAST_RESORT_UNREACHABLE)
		return cfg->unreach_mark;
	if (resort == UL_LAST_RESORT_BLACKHOLE)
		return cfg->blackhole_mark;
	return 0;
}

/* The line a flow moved off its dead line gets: one of its own policy's.
 * A flow of policy 0 (every flow of a gateway without rules) picks as a
 * new flow of a gateway without rules does. */
static __always_inline __u32 pick_moved_line(const struct flow_key *key, __u32 flags)
{
	__u32 policy = flow_policy(flags);
	struct policy_pick p;

	if (!policy)
		return pick_line(key);
	p = pick_policy_line(key, policy);
	/* Unreachable or blackhole: the flow stays on its dead line, whose
	 * table answers prohibit. */
	if (p.line == UL_NO_LINE && p.resort != UL_LAST_RESORT_DEFAULT &&
	    !last_resort_mark(rule_cfg_lookup(), p.resort))
		return pick_line(key);
	return p.line;
}

static __always_inline __u32 sticky_scope(const struct rule_verdict *v)
{
	if (v->flags & RULE_F_STICKY_PER_RULE)
		return UL_STICKY_PER_RULE | ((__u32)v->rule % UL_MAX_RULES);
	return v->policy % UL_MAX_POLICIES;
}

/* The line of a sticky client's last new flow, if that came within the
 * rule's sticky time and the line is live and still in the policy's
 * current tier (it has a bucket in the policy's table); the entry is then
 * refreshed. Else UL_NO_LINE. */
static __always_inline __u32 sticky_line(const struct sticky_key *sk, const struct rule_verdict *v, __u64 now)
{
	struct sticky *s = bpf_map_lookup_elem(&ul_sticky, sk);
	__u32 policy = v->policy % UL_MAX_POLICIES, line;
	const struct policy *pol;

	if (!s || s->last_ns + v->sticky_ns <= now)
		return UL_NO_LINE;
	line = s->line;
	pol = bpf_map_lookup_elem(&ul_policies, &policy);
	if (!pol || line >= UL_MAX_LINES || !(pol->lines & (1U << line)) || !line_live(line_lookup(line)))
		return UL_NO_LINE;
	if (s->last_ns < now)
		s->last_ns = now;
	return line;
}

/* The line of a new flow that a rule set classified: its sticky line, or
 * its policy's. UL_NO_LINE when there is none, with *reason saying why;
 * a last resort of unreachable or blackhole marks the packet for it. */
static __always_inline __u32 pick_classified_line(struct __sk_buff *skb, const struct flow_key *key,
						  const struct rule_cfg *cfg, const struct rule_verdict *v,
						  __u64 now, enum ul_reason *reason)
{
	struct sticky_key sk = { .scope = sticky_scope(v) };
	struct policy_pick p;
	__u32 line, mark;

	if (v->sticky_ns) {
		__builtin_memcpy(sk.addr, key->saddr, UL_ADDR_LEN);
		line = sticky_line(&sk, v, now);
		if (line != UL_NO_LINE)
			return line;
	}
	p = pick_policy_line(key, v->policy % UL_MAX_POLICIES);
	if (p.line != UL_NO_LINE) {
		if (v->sticky_ns && p.own) {
			struct sticky s = { .line = p.line, .last_ns = now };

			bpf_map_update_elem(&ul_sticky, &sk, &s, BPF_ANY);
		}
		return p.line;
	}
	*reason = UL_REASON_NO_LIVE_LINE;
	if (p.resort == UL_LAST_RESORT_DEFAULT)
		return UL_NO_LINE;
	mark = last_resort_mark(cfg, p.resort);
	if (!mark)
		return pick_line(key);
	skb->mark = (skb->mark & ~mark_mask) | (mark & mark_mask);
	*reason = p.resort == UL_LAST_RESORT_UNREACHABLE ? UL_REASON_POLICY_UNREACHABLE
							 : UL_REASON_POLICY_BLACKHOLE;
	return UL_NO_LINE;
}

static __always_inline void line_nat_addr(const struct line *ln, __u8 family, __u8 *addr)
{
	__builtin_memcpy(addr, family == UL_AF_INET ? ln->nat_addr4 : ln->nat_addr6, UL_ADDR_LEN);
}

/* Stores last_seen only when the coarse clock moved forward: most packets
 * of a busy flow then write nothing but the counters. Never back: two CPUs
 * may hold different times for one tick (ul_now(): a CPU that read the
 * clock between the tick's jiffies and coarse clock updates keeps the
 * previous tick's time), and last_seen stays at or after first_seen. */
static __always_inline void flow_touch(struct flow *flow, __u64 now)
{
	if (flow->last_seen < now)
		flow->last_seen = now;
}

/* Forwarded packets and bytes of a flow: its line's, and its policy's when
 * a rule set classified it. */
static __always_inline void forwarded_count(__u32 line, __u32 flags, __u32 len, bool tx)
{
	struct line_stats *stats = line_stats_lookup(line);

	if (stats)
		stats_add(stats, len, tx);
	policy_count(flags, len, tx);
}

/* Flow counters are atomic adds: LAN ingress and egress of one flow may
 * run on two CPUs at once. Measured against plain adds in
 * BenchmarkLANIngressVsEmpty they cost nothing more (median 39 ns added
 * either way); the cost of a flow written from two CPUs is the cache line
 * moving, which plain adds would pay too. */
static __always_inline void flow_count_tx(struct flow *flow, __u32 len, __u64 now)
{
	__sync_fetch_and_add(&flow->tx_packets, 1);
	__sync_fetch_and_add(&flow->tx_bytes, len);
	flow_touch(flow, now);
}

static __always_inline enum ul_reason flow_steer_pinned(struct __sk_buff *skb,
							const struct flow_key *key,
							struct flow *flow, __u64 now)
{
	enum ul_reason reason = UL_REASON_EXISTING_FLOW;
	const struct line *ln = line_lookup(flow->line), *new_ln;
	__u32 line;

	if (line_live(ln))
		goto out;
	if (key->proto == IPPROTO_TCP) {
		/* NAT would break a moved TCP connection anyway: it stays, and
		 * the dead line's table answers prohibit, so that the client
		 * fails fast instead of hanging. */
		reason = UL_REASON_DEAD_LINE_TCP;
		goto out;
	}
	/* UDP and ICMP move: the next packet leaves by the new line and gets
	 * a new NAT mapping there. With nowhere to go, they stay. */
	line = pick_moved_line(key, flow->flags);
	new_ln = line_lookup(line);
	if (!new_ln) {
		reason = UL_REASON_NO_LIVE_LINE;
		goto out;
	}
	ln = new_ln;
	flow->line = line;
	line_nat_addr(ln, key->family, flow->nat_addr);
	reason = UL_REASON_MOVED_FLOW;
out:
	mark_for_line(skb, ln);
	flow_count_tx(flow, skb->len, now);
	/* A packet held on a dead line meets its prohibit route: it does not
	 * leave by the line, so the line does not count it. */
	if (line_live(ln))
		forwarded_count(flow->line, flow->flags, skb->len, true);
	return reason;
}

static __always_inline enum ul_reason flow_steer_new(struct __sk_buff *skb, const struct flow_key *key,
						     __u64 now, __u32 l3_off, __u32 l4_off)
{
	struct flow flow = {
		.first_seen = now,
		.last_seen = now,
		.tx_packets = 1,
		.tx_bytes = skb->len,
	};
	enum ul_reason reason = UL_REASON_RECOVERED_CT;
	const struct rule_cfg *cfg;
	struct rule_verdict v;
	const struct line *ln;
	struct flow *winner;
	bool classified;
	__u32 line;
	int err;

	/* A flow the map lost keeps the line conntrack says it uses: never
	 * another, unless that line is dead and the flow may move. A TCP SYN
	 * opens a connection that conntrack cannot know yet (its lookup is
	 * about 300 ns, a third of a new flow): it skips the lookup. Any other
	 * TCP segment of a connection conntrack does not know either is not
	 * pinned: picking a line would be a guess, and a wrong one breaks the
	 * connection for good. After an HA takeover that is a segment of a
	 * connection conntrackd had not synced here yet: it passes unmarked,
	 * and the HA guard rule drops it. */
	if (tcp_opens(skb, key, l4_off)) {
		line = UL_NO_LINE;
	} else {
		bool unknown = false;

		line = ct_recover_line(skb, key, flow.nat_addr, &unknown);
		if (unknown && key->proto == IPPROTO_TCP)
			return UL_REASON_TCP_UNKNOWN;
	}
	/* A recovered flow is classified too: its flags then say which policy
	 * a UDP flow moves within when its line dies. */
	cfg = rule_cfg_lookup();
	classified = classify(skb, key, l3_off, cfg, &v);
	ln = line_lookup(line);
	if (ln && (line_live(ln) || key->proto == IPPROTO_TCP)) {
		flow.flags = FLOW_F_RECOVERED;
	} else {
		if (classified) {
			line = pick_classified_line(skb, key, cfg, &v, now, &reason);
		} else {
			line = pick_line(key);
			reason = UL_REASON_NO_LIVE_LINE;
		}
		ln = line_lookup(line);
		if (!ln)
			return reason;
		line_nat_addr(ln, key->family, flow.nat_addr);
		reason = UL_REASON_NEW_FLOW;
	}
	flow.line = line;
	if (classified)
		flow.flags |= FLOW_F_CLASSIFIED | flow_policy_flags(v.rule, v.policy);

	err = flow_insert(key, &flow);
	if (!err && classified)
		policy_flow_count(v.policy % UL_MAX_POLICIES);
	if (!err && line_live(ln))		/* not a TCP flow recovered onto a dead line */
		forwarded_count(line, flow.flags, skb->len, true);
	if (err == -EEXIST) {
		/* Another CPU pinned the flow first: follow it. */
		winner = flow_lookup(key);
		if (winner)
			return flow_steer_pinned(skb, key, winner, now);
	} else if (err) {
		reason = UL_REASON_FLOW_UPDATE_ERR;
	}
	mark_for_line(skb, ln);
	return reason;
}

/* LAN ingress: the line of the packet's flow, pinning it on first sight. */
static __always_inline enum ul_reason flow_steer(struct __sk_buff *skb, const struct flow_key *key,
						 __u32 l3_off, __u32 l4_off)
{
	__u64 now = ul_now();
	struct flow *flow = flow_lookup(key);

	enum ul_reason reason;

	if (flow)
		return flow_steer_pinned(skb, key, flow, now);
	/* Checked only on a miss: multicast and link-local destinations, the
	 * gateway's own addresses and foreign sources never get a flow, so the
	 * common case costs one lookup. */
	if (!dst_routable(key, &reason))
		return reason;
	if (addr_is_local(key->daddr))
		return UL_REASON_LOCAL_DST;
	/* A spoofed or bogon source gets no flow (nftables drops it). */
	if (!src_on_lan(key->family, key->saddr))
		return UL_REASON_FOREIGN_SRC;
	return flow_steer_new(skb, key, now, l3_off, l4_off);
}

/* Turns the key of a LAN egress packet (Internet to client) into the key
 * its flow was pinned under (client to Internet). ICMP echo keeps the
 * identifier in sport. */
static __always_inline void flow_key_reverse(struct flow_key *key)
{
	__u8 addr[UL_ADDR_LEN];
	__u16 port;

	__builtin_memcpy(addr, key->saddr, UL_ADDR_LEN);
	__builtin_memcpy(key->saddr, key->daddr, UL_ADDR_LEN);
	__builtin_memcpy(key->daddr, addr, UL_ADDR_LEN);
	if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) {
		port = key->sport;
		key->sport = key->dport;
		key->dport = port;
	}
}

/* LAN egress: counts a packet of a pinned flow on its way back to the client. */
static __always_inline void flow_count_rx(struct __sk_buff *skb, struct flow_key *key)
{
	struct flow *flow;

	flow_key_reverse(key);
	flow = flow_lookup(key);
	if (!flow)
		return;
	__sync_fetch_and_add(&flow->rx_packets, 1);
	__sync_fetch_and_add(&flow->rx_bytes, skb->len);
	flow_touch(flow, ul_now());
	forwarded_count(flow->line, flow->flags, skb->len, false);
}
