// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* The rule classifier: which rule, first in order, a new flow matches, at a
 * cost that does not grow with the number of rules.
 *
 * The control plane compiles the rules into one table per packet field
 * (source and destination address, protocol, DSCP, source and destination
 * port, LAN interface). Each table maps the packet's value to a bitmap of
 * the rules that value satisfies; the rules a packet matches are the AND
 * of its seven bitmaps, and the first of them decides. A lookup costs the
 * same whatever the number of rules; the AND runs over 64-bit words, and a
 * summary word per bitmap (one bit per non-zero word) finds the first word
 * worth looking at without scanning the zero ones.
 *
 * Everything is kept in two generations: the control plane writes a new
 * rule set into the generation not in use, then flips rule_cfg.gen, so a
 * packet never sees half a rule set. The first packet of a flow is the
 * only one classified: a pinned flow never sees a rule again. */
#pragma once

#include "common.h"
#include "maps.h"

/* Rules of one rule set: the bits of a bitmap. */
#define UL_MAX_RULES		4096
#define UL_RULE_WORDS		(UL_MAX_RULES / 64)
/* Distinct bitmaps one rule set may use, over all its tables. */
#define UL_MAX_BITMAPS		8192
/* Rule sets held at once: the one in use and the one being written. */
#define UL_RULE_GENS		2
#define UL_NUM_PROTOS		256
#define UL_NUM_DSCPS		64
#define UL_NUM_PORTS		65536

_Static_assert(UL_RULE_WORDS == 64, "a bitmap's summary is one 64-bit word");

/* IPv4 address tables are a directory over static search trees (an LPM
 * trie's lookup walks a node per bit that differs, each a cache miss of
 * its own: 400 ns at 4096 prefixes). The loader turns a table's prefixes
 * into the intervals of the IPv4 space whose addresses share their
 * longest match, sorted by first address, and stores their first
 * addresses 16 to a node (a cache line), leaves first, then each level
 * above the first addresses of its children's, up to a root. A tree of
 * 3 levels or more has a directory, about a cell per interval (2^8 to
 * 2^16 cells, each a /8 to a /16): the bitmap id when one interval holds
 * the whole cell, else the lowest node of the tree above every interval
 * of the cell, where the walk starts. A lookup reads the directory and,
 * for a cell that prefixes split, a node per level from there (usually
 * one) and the interval's bitmap id. Sized to the intervals, directory,
 * nodes and ids of 4096 rules take about 100 KiB, which the cache keeps
 * (a directory of /16s alone, 256 KiB, missed it). */
#define UL_V4_FANOUT		16
#define UL_V4_MAX_DEPTH		5
#define UL_V4_INTERVALS		131072	/* per table and generation */
#define UL_V4_NODES		9216	/* 8192 leaves and the levels above */
#define UL_ADDR_FIELDS		2	/* source and destination */
_Static_assert(UL_V4_INTERVALS / UL_V4_FANOUT * UL_V4_FANOUT / (UL_V4_FANOUT - 1) + UL_V4_MAX_DEPTH <= UL_V4_NODES,
	       "room for the leaves and the levels above");

#define UL_V4_DIR_CELLS		(1U << 16)	/* at most, per table and generation */
/* A directory entry: a bitmap id, or UL_V4_DIR_TREE | level << 24 | node. */
#define UL_V4_DIR_TREE		(1U << 31)
#define UL_V4_DIR_LEVEL_SHIFT	24
#define UL_V4_DIR_LEVEL_MASK	0x7U
#define UL_V4_DIR_NODE_MASK	0xffffffU

struct v4_node {
	__u32 first[UL_V4_FANOUT];	/* ascending; 0xffffffff past the last child */
};

/* Where a table's tree is in ul_rule_v4_nodes: off[l] is level l's first
 * node (level 0 is the root), relative to the table's part of the map. */
struct v4_tree {
	__u32 depth;			/* levels */
	__u32 dir_shift;		/* the directory's cells: addresses >> dir_shift; 0: none */
	__u32 off[UL_V4_MAX_DEPTH];
};

/* Rules, one bit each (rule r: bit r % 64 of w[r / 64]). any has bit i set
 * when w[i] is not zero. */
struct rule_bitmap {
	__u64 any;
	__u64 w[UL_RULE_WORDS];
};

/* A prefix of ul_rule_src or ul_rule_dst: prefixlen counts bits from gen
 * on (8 for gen, 8 for the family, then the address's: an IPv4 /24 is
 * 8 + 8 + 96 + 24, v4-mapped, like ul_lan_src). */
struct rule_prefix {
	__u32 prefixlen;
	__u8  gen;
	__u8  family;			/* UL_AF_INET or UL_AF_INET6 */
	__u8  addr[UL_ADDR_LEN];
} __attribute__((packed));

#define UL_RULE_PREFIX_FULL	(8 + 8 + UL_ADDR_LEN * 8)

struct rule_lan_key {
	__u32 gen;
	__u32 ifindex;			/* the LAN interface the packet came in by */
};

/* rule_action.flags */
#define RULE_F_STICKY_PER_RULE	(1U << 0)	/* stickiness keyed by the rule, not the policy */

struct rule_action {
	__u32 policy;			/* index into ul_policies */
	__u32 flags;			/* RULE_F_* */
	__u64 sticky_ns;		/* 0: not sticky */
	__u32 id;			/* the rule's number, kept across reloads that move it:
					 * what flows and sticky entries record */
	__u32 pad;
};

/* The fields a rule matches on, one bitmap each. */
enum rule_field {
	RULE_FIELD_SRC,
	RULE_FIELD_DST,
	RULE_FIELD_PROTO,
	RULE_FIELD_DSCP,
	RULE_FIELD_SPORT,
	RULE_FIELD_DPORT,
	RULE_FIELD_LAN,
	RULE_FIELDS,
};

/* rule_cfg.fixed: the field's table gives this bitmap id (the low bits)
 * for every value, so it is not looked up. */
#define UL_RULE_FIELD_FIXED	(1U << 31)

/* The rule sets in force. Everything a generation needs is indexed by it,
 * so that flipping gen is the only change a new rule set makes here: the
 * loader writes the inactive generation's fields first, then gen alone. */
struct rule_cfg {
	__u32 gen;			/* the generation in use: 0 or 1 */
	__u32 words[UL_RULE_GENS];	/* bitmap words in use; 0: no rules, policy 0 for all */
	__u32 nrules[UL_RULE_GENS];	/* informational: the rules of each generation */
	__u32 no_ports[UL_RULE_GENS];	/* both port fields' bitmap for packets without ports */
	__u32 any_lan[UL_RULE_GENS];	/* the bitmap of a LAN interface ul_rule_lan lacks */
	__u32 unreach_mark;		/* mark of the unreachable route; 0: not configured */
	__u32 blackhole_mark;		/* mark of the blackhole route; 0: not configured */
	__u32 fixed[UL_RULE_GENS][RULE_FIELDS];	/* UL_RULE_FIELD_FIXED | id, or 0: look up */
	struct v4_tree v4[UL_ADDR_FIELDS][UL_RULE_GENS];	/* the IPv4 address tables */
};

/* The rule sets' bitmaps: index gen * UL_MAX_BITMAPS + bitmap id. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_MAX_BITMAPS);
	__type(key, __u32);
	__type(value, struct rule_bitmap);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_bitmaps SEC(".maps");

/* The IPv4 address tables' trees: index (field * UL_RULE_GENS + gen) *
 * UL_V4_NODES + node. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_ADDR_FIELDS * UL_RULE_GENS * UL_V4_NODES);
	__type(key, __u32);
	__type(value, struct v4_node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_v4_nodes SEC(".maps");

/* The IPv4 tables' directories: index (field * UL_RULE_GENS + gen) *
 * UL_V4_DIR_CELLS + the address's top 16 bits. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_ADDR_FIELDS * UL_RULE_GENS * UL_V4_DIR_CELLS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_v4_dir SEC(".maps");

/* The /16s of an IPv4 address table that one interval holds whole and
 * whose bitmap is the table's commonest (most /16s have it: the bitmap of
 * the rules that name no address of theirs), a bit each: 8 KiB, which the
 * cache keeps, where the directory (256 KiB) and the tree are misses. An
 * address in such a /16 is looked up here alone. Written, like the rest
 * of a generation, before the flip. */
#define UL_V4_COMMON_WORDS	(UL_V4_DIR_CELLS / 64)

struct v4_common {
	__u32 id;			/* the commonest bitmap id */
	__u32 set;			/* 0: not written, look everything up */
	__u64 cells[UL_V4_COMMON_WORDS];	/* bit c % 64 of cells[c / 64]: /16 c has id */
};

/* Index field * UL_RULE_GENS + gen. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_ADDR_FIELDS * UL_RULE_GENS);
	__type(key, __u32);
	__type(value, struct v4_common);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_v4_common SEC(".maps");

/* The IPv4 intervals' bitmap ids: index (field * UL_RULE_GENS + gen) *
 * UL_V4_INTERVALS + interval. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_ADDR_FIELDS * UL_RULE_GENS * UL_V4_INTERVALS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_v4_ids SEC(".maps");

/* IPv6 prefixes of one table and generation: the config's 65536 in all
 * prefix sets, ::/0 and room for the rules' own. */
#define UL_V6_PREFIXES		(65536 + 4096)

/* IPv6 source and destination address tables: the longest matching
 * prefix's bitmap. Each generation holds ::/0, so every address finds
 * one. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, UL_RULE_GENS * UL_V6_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rule_prefix);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_src SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, UL_RULE_GENS * UL_V6_PREFIXES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct rule_prefix);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_dst SEC(".maps");

/* IP protocol table: index gen * UL_NUM_PROTOS + protocol. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_NUM_PROTOS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_proto SEC(".maps");

/* DSCP table: index gen * UL_NUM_DSCPS + DSCP. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_NUM_DSCPS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_dscp SEC(".maps");

/* Port tables: index gen * UL_NUM_PORTS + port (host order). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_NUM_PORTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_sport SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_NUM_PORTS);
	__type(key, __u32);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_dport SEC(".maps");

/* LAN interfaces some rule names; the others take rule_cfg.any_lan. Read
 * for the interfaces whose ul_rule_lan_slots slot is shared. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, UL_RULE_GENS * 256);
	__type(key, struct rule_lan_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_lan SEC(".maps");

/* The LAN interfaces some rule names, by slot (ifindex % UL_LAN_SLOTS):
 * an array read is a third of a hash lookup (the hash alone cost 25 ns of
 * a new flow at 4096 rules). A slot two named interfaces share says so,
 * and sends the lookup to ul_rule_lan, as does a slot never written (0:
 * the generation was written by an uplinkd without slots, which a new
 * one's programs read until it writes its own). Index gen * UL_LAN_SLOTS
 * + slot. */
#define UL_LAN_SLOTS		64
#define UL_LAN_SLOT_SHARED	0xffffffffU	/* no interface has these: ifindex is an int */
#define UL_LAN_SLOT_EMPTY	0xfffffffeU

struct rule_lan_slot {
	__u32 ifindex;			/* the named interface, UL_LAN_SLOT_EMPTY or _SHARED; 0: not written */
	__u32 id;			/* its bitmap id */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_LAN_SLOTS);
	__type(key, __u32);
	__type(value, struct rule_lan_slot);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_lan_slots SEC(".maps");

/* The bitmap id of LAN interface ifindex in generation gen: its slot's,
 * ul_rule_lan's when the slot is shared or not written, NULL when no rule
 * names it. */
static __always_inline const __u32 *rule_lan_lookup(__u32 gen, __u32 ifindex)
{
	struct rule_lan_key lan = { .gen = gen, .ifindex = ifindex };
	__u32 k = gen * UL_LAN_SLOTS + ifindex % UL_LAN_SLOTS;
	const struct rule_lan_slot *slot = bpf_map_lookup_elem(&ul_rule_lan_slots, &k);

	if (!slot)
		return NULL;
	if (slot->ifindex == ifindex)
		return &slot->id;
	if (slot->ifindex == UL_LAN_SLOT_SHARED || !slot->ifindex)
		return bpf_map_lookup_elem(&ul_rule_lan, &lan);
	return NULL;
}

/* What each rule does: index gen * UL_MAX_RULES + rule. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_MAX_RULES);
	__type(key, __u32);
	__type(value, struct rule_action);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_actions SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct rule_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_cfg SEC(".maps");

/* Flows each rule decided, per CPU: index gen * UL_MAX_RULES + rule. Kept
 * per generation so that the loader zeroes a generation's counters before
 * it is used, and none are lost or misattributed around a flip. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, UL_RULE_GENS * UL_MAX_RULES);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ul_rule_hits SEC(".maps");

static __always_inline const struct rule_cfg *rule_cfg_lookup(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ul_rule_cfg, &zero);
}

/* A rule set's verdict on a new flow. */
struct rule_verdict {
	__s32 rule;			/* the rule's id (rule_action.id); -1: no rule matched */
	__u32 policy;
	__u32 flags;			/* RULE_F_* */
	__u64 sticky_ns;
};

static __always_inline const struct rule_bitmap *rule_bitmap_lookup(__u32 gen, const __u32 *id)
{
	__u32 k;

	if (!id)
		return NULL;
	k = gen * UL_MAX_BITMAPS + (*id % UL_MAX_BITMAPS);
	return bpf_map_lookup_elem(&ul_rule_bitmaps, &k);
}

static __always_inline const __u32 *rule_prefix_lookup(void *map, __u32 gen, __u8 family, const __u8 *addr)
{
	struct rule_prefix p = { .prefixlen = UL_RULE_PREFIX_FULL, .gen = gen, .family = family };

	__builtin_memcpy(p.addr, addr, UL_ADDR_LEN);
	return bpf_map_lookup_elem(map, &p);
}

/* The bitmap id of an IPv4 address (v4-mapped in addr) in the table of
 * field (0: source, 1: destination) of generation gen: the /16's entry in
 * the directory, or the tree walked from the node it names. */
static __always_inline const __u32 *rule_v4_lookup(const struct rule_cfg *cfg, __u32 field, __u32 gen,
						   const __u8 *addr)
{
	const struct v4_tree *t = &cfg->v4[field % UL_ADDR_FIELDS][gen];
	__u32 table = field % UL_ADDR_FIELDS * UL_RULE_GENS + gen;
	const struct v4_common *c;
	__u32 x, idx, k, start, cell;
	const __u32 *dir;

	__builtin_memcpy(&x, addr + 12, sizeof(x));
	x = bpf_ntohl(x);
	start = 0;
	idx = 0;
	c = bpf_map_lookup_elem(&ul_rule_v4_common, &table);
	cell = x >> 16;
	if (c && c->set && (c->cells[(cell / 64) % UL_V4_COMMON_WORDS] >> (cell % 64)) & 1)
		return &c->id;
	if (t->dir_shift) {
		k = table * UL_V4_DIR_CELLS + (x >> (t->dir_shift & 31));
		dir = bpf_map_lookup_elem(&ul_rule_v4_dir, &k);
		if (!dir || !(*dir & UL_V4_DIR_TREE))
			return dir;	/* the /16 has one longest match: its bitmap id */
		start = (*dir >> UL_V4_DIR_LEVEL_SHIFT) & UL_V4_DIR_LEVEL_MASK;
		idx = *dir & UL_V4_DIR_NODE_MASK;
	}
	/* Padding compares above every address but this one, the broadcast
	 * address, which no flow has. */
	if (x == 0xffffffff)
		x--;
	for (int l = 0; l < UL_V4_MAX_DEPTH; l++) {
		const struct v4_node *n;
		__u64 le = 0, d;

		if (l < start)
			continue;
		if (l >= t->depth)
			break;
		k = table * UL_V4_NODES + (t->off[l] + idx) % UL_V4_NODES;
		n = bpf_map_lookup_elem(&ul_rule_v4_nodes, &k);
		if (!n)
			return NULL;
		/* How many firsts are <= x: branchless, one verifier path. */
#pragma unroll
		for (int i = 0; i < UL_V4_FANOUT; i++) {
			d = (__u64)n->first[i] - x - 1;	/* wraps below 0 when first <= x */
			asm volatile("" : "+r"(d));	/* keep clang from making it a branch */
			le += d >> 63;
		}
		/* le >= 1: a node's first first is <= x, by its parent's choice
		 * or the directory's. */
		idx = idx * UL_V4_FANOUT + (__u32)le - 1;
	}
	k = table * UL_V4_INTERVALS + idx % UL_V4_INTERVALS;
	return bpf_map_lookup_elem(&ul_rule_v4_ids, &k);
}

static __always_inline const __u32 *rule_addr_lookup(void *trie, const struct rule_cfg *cfg, __u32 field,
						     __u32 gen, __u8 family, const __u8 *addr)
{
	if (family == UL_AF_INET)
		return rule_v4_lookup(cfg, field, gen, addr);
	return rule_prefix_lookup(trie, gen, family, addr);
}

static __always_inline const __u32 *rule_index_lookup(void *map, __u32 gen, __u32 n, __u32 value)
{
	__u32 k = gen * n + value % n;

	return bpf_map_lookup_elem(map, &k);
}

/* The packet's DSCP: IPv4's TOS or IPv6's traffic class, less ECN. l3_off
 * is the IP header's offset. */
static __always_inline __u8 packet_dscp(struct __sk_buff *skb, __u8 family, __u32 l3_off)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 b[2];

	if (l3_off == sizeof(struct ethhdr) && data + sizeof(struct ethhdr) + sizeof(b) <= data_end)
		__builtin_memcpy(b, data + sizeof(struct ethhdr), sizeof(b));
	else if (bpf_skb_load_bytes(skb, l3_off, b, sizeof(b)) < 0)
		return 0;
	if (family == UL_AF_INET)
		return b[1] >> 2;			/* TOS: DSCP(6) ECN(2) */
	return ((b[0] & 0x0f) << 2) | (b[1] >> 6);	/* version(4) DSCP(6) ECN(2) ... */
}

/* The index of the lowest set bit of a non-zero word: the population count
 * of the bits below it (clang makes it a multiplication and a table
 * lookup). Branchless, so that the verifier follows one path through it,
 * not one per bit pattern. */
static __always_inline __u32 ctz64(__u64 x)
{
	x = (x & -x) - 1;
	x -= (x >> 1) & 0x5555555555555555ULL;
	x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
	x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (x * 0x0101010101010101ULL) >> 56;
}

/* The first rule of generation gen that the packet matches, or -1. Every
 * lookup is into a table of gen's; a missing entry (a rule set being
 * written, which cannot be gen's) matches nothing.
 *
 * A global function, not inlined: the verifier checks it once, on its own,
 * instead of once for every way the program reaches it (inlined, LAN
 * ingress took 180,000 processed instructions to verify; 32,000 so, 8,000
 * before the rules). The call costs a few nanoseconds, on new flows only. */
__attribute__((noinline)) int ul_rule_match(struct __sk_buff *skb, const struct flow_key *key, __u32 l3_off,
					   __u32 gen)
{
	const struct rule_bitmap *bm[RULE_FIELDS];
	const struct rule_cfg *cfg;
	const __u32 *id, *fixed;
	__u64 cand, w;
	__u32 i;

	if (!skb || !key)
		return -1;
	cfg = rule_cfg_lookup();
	if (!cfg)
		return -1;
	gen %= UL_RULE_GENS;

	/* A field no rule narrows (its table one bitmap) is not looked up. */
	fixed = cfg->fixed[gen];
#define FIELD_ID(f, lookup) (fixed[f] & UL_RULE_FIELD_FIXED ? &fixed[f] : (lookup))
	bm[RULE_FIELD_SRC] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_SRC,
		rule_addr_lookup(&ul_rule_src, cfg, 0, gen, key->family, key->saddr)));
	bm[RULE_FIELD_DST] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_DST,
		rule_addr_lookup(&ul_rule_dst, cfg, 1, gen, key->family, key->daddr)));
	bm[RULE_FIELD_PROTO] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_PROTO,
		rule_index_lookup(&ul_rule_proto, gen, UL_NUM_PROTOS, key->proto)));
	bm[RULE_FIELD_DSCP] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_DSCP,
		rule_index_lookup(&ul_rule_dscp, gen, UL_NUM_DSCPS, packet_dscp(skb, key->family, l3_off))));
	if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) {
		bm[RULE_FIELD_SPORT] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_SPORT,
			rule_index_lookup(&ul_rule_sport, gen, UL_NUM_PORTS, key->sport)));
		bm[RULE_FIELD_DPORT] = rule_bitmap_lookup(gen, FIELD_ID(RULE_FIELD_DPORT,
			rule_index_lookup(&ul_rule_dport, gen, UL_NUM_PORTS, key->dport)));
	} else {
		/* An ICMP echo's identifier is no port. */
		bm[RULE_FIELD_SPORT] = rule_bitmap_lookup(gen, &cfg->no_ports[gen]);
		bm[RULE_FIELD_DPORT] = bm[RULE_FIELD_SPORT];
	}
	id = FIELD_ID(RULE_FIELD_LAN, rule_lan_lookup(gen, skb->ingress_ifindex));
#undef FIELD_ID
	bm[RULE_FIELD_LAN] = rule_bitmap_lookup(gen, id ? id : &cfg->any_lan[gen]);

	cand = ~0ULL;
	for (int f = 0; f < RULE_FIELDS; f++) {
		if (!bm[f])
			return -1;
		cand &= bm[f]->any;
	}
	/* At most one pass per word that every field has rules in; most
	 * packets end in the first. */
	w = 0;
	i = 0;
#pragma clang loop unroll(disable)
	for (int n = 0; n < UL_RULE_WORDS; n++) {
		if (!cand)
			break;
		i = ctz64(cand);
		/* The compiler knows i < 64 and would drop the bound the
		 * verifier needs. */
		asm volatile("" : "+r"(i));
		i %= UL_RULE_WORDS;
		w = bm[RULE_FIELD_SRC]->w[i] & bm[RULE_FIELD_DST]->w[i] &
		    bm[RULE_FIELD_PROTO]->w[i] & bm[RULE_FIELD_DSCP]->w[i] &
		    bm[RULE_FIELD_SPORT]->w[i] & bm[RULE_FIELD_DPORT]->w[i] &
		    bm[RULE_FIELD_LAN]->w[i];
		if (w)
			break;
		cand &= cand - 1;
	}
	if (!w)
		return -1;
	return i * 64 + ctz64(w);
}

static __always_inline void rule_hit_count(__u32 gen, __u32 rule)
{
	__u32 k = gen * UL_MAX_RULES + rule % UL_MAX_RULES;
	__u64 *count = bpf_map_lookup_elem(&ul_rule_hits, &k);

	if (count)
		*count += 1;
}

/* Classifies a new flow by the rule set in force, counting the rule's hit.
 * False when no rule set is in force: every flow then takes policy 0, and
 * the only cost was reading rule_cfg. */
static __always_inline bool classify(struct __sk_buff *skb, const struct flow_key *key, __u32 l3_off,
				     const struct rule_cfg *cfg, struct rule_verdict *v)
{
	const struct rule_action *act;
	__u32 gen, k;
	__s32 rule;

	v->rule = -1;
	v->policy = 0;
	v->flags = 0;
	v->sticky_ns = 0;
	if (!cfg)
		return false;
	gen = cfg->gen % UL_RULE_GENS;
	if (!cfg->words[gen])
		return false;
	rule = ul_rule_match(skb, key, l3_off, gen);
	if (rule < 0)
		return true;
	k = gen * UL_MAX_RULES + (__u32)rule % UL_MAX_RULES;
	act = bpf_map_lookup_elem(&ul_rule_actions, &k);
	if (!act)
		return true;
	v->rule = act->id % UL_MAX_RULES;
	v->policy = act->policy;
	v->flags = act->flags;
	v->sticky_ns = act->sticky_ns;
	rule_hit_count(gen, rule);
	return true;
}
