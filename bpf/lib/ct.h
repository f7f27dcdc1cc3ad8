// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* Recovering the line of a flow the flow map lost (eviction, fresh maps)
 * from conntrack: the NAT source address of the connection says which line
 * it left by. */
#pragma once

#include "common.h"
#include "maps.h"

#define UL_CT_DIR_ORIGINAL	0	/* enum ip_conntrack_dir */
#define UL_CT_DIR_REPLY		1
#define UL_CT_DIRS		2

/* Just the kernel fields read here; CO-RE relocates them against the running
 * kernel's BTF. */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
union nf_inet_addr {
	__be32 all[4];			/* IPv4 in all[0] */
};

struct nf_conntrack_man {
	union nf_inet_addr u3;
};

struct nf_conntrack_tuple {
	struct nf_conntrack_man src;
	struct {
		union nf_inet_addr u3;
	} dst;
};

struct nf_conntrack_tuple_hash {
	struct nf_conntrack_tuple tuple;
};

struct nf_conn {
	struct nf_conntrack_tuple_hash tuplehash[UL_CT_DIRS];
};
#pragma clang attribute pop

/* The 12-byte layout, which every kernel with these kfuncs accepts. */
struct bpf_ct_opts {
	__s32 netns_id;
	__s32 error;
	__u8  l4proto;
	__u8  dir;
	__u8  reserved[2];
};

/* 1 when the running kernel has the conntrack kfuncs below, in vmlinux or in
 * the loaded nf_conntrack module: set by the loader, which looks them up in
 * the kernel's BTF (loading the module first). At 0 the verifier prunes the
 * calls, so the programs load without them and recovery is off.
 *
 * There is deliberately no `if (!bpf_skb_ct_lookup)` existence check: it
 * compiles to an ld_imm64 of the kfunc, and for a kfunc in a module
 * cilium/ebpf v0.22.0 writes the module's BTF fd index into that
 * instruction's offset, which the verifier rejects ("BPF_LD_IMM64 uses
 * reserved fields", cilium/ebpf issue 2056). Calls take that index in their
 * offset legitimately. */
volatile const __u32 ct_recovery = 0;

/* Weak: a kernel without them still loads the programs (the loader then
 * leaves ct_recovery at 0 and cilium/ebpf poisons the pruned calls). */
extern struct nf_conn *bpf_skb_ct_lookup(struct __sk_buff *skb, struct bpf_sock_tuple *tuple,
					 __u32 tuple_size, struct bpf_ct_opts *opts,
					 __u32 opts_size) __ksym __weak;
extern void bpf_ct_release(struct nf_conn *ct) __ksym __weak;

static __always_inline void ct_addr(__u8 *addr, __u8 family, const union nf_inet_addr *u3)
{
	if (family == UL_AF_INET) {
		addr[10] = 0xff;
		addr[11] = 0xff;
		__builtin_memcpy(&addr[12], &u3->all[0], sizeof(__be32));
	} else {
		__builtin_memcpy(addr, u3->all, UL_ADDR_LEN);
	}
}

/* Returns the line whose NAT address conntrack recorded for this TCP or UDP
 * flow and stores that address in nat_addr, or returns UL_NO_LINE. Outbound
 * flows are SNATed: the address is the reply direction's destination. A
 * reply of a LAN server to a connection that came in through a port forward
 * (DNAT) finds its line in the original direction's destination. *unknown
 * is set when conntrack was asked and has no entry for the flow at all. */
static __always_inline __u32 ct_recover_line(struct __sk_buff *skb, const struct flow_key *key,
					     __u8 *nat_addr, bool *unknown)
{
	struct bpf_ct_opts opts = { .netns_id = BPF_F_CURRENT_NETNS, .l4proto = key->proto };
	__u8 reply_dst[UL_ADDR_LEN] = {}, orig_dst[UL_ADDR_LEN] = {};
	struct bpf_sock_tuple tuple = {};
	__u32 tuple_size, line;
	struct nf_conn *ct;

	if (!ct_recovery || (key->proto != IPPROTO_TCP && key->proto != IPPROTO_UDP))
		return UL_NO_LINE;

	if (key->family == UL_AF_INET) {
		__builtin_memcpy(&tuple.ipv4.saddr, &key->saddr[12], sizeof(tuple.ipv4.saddr));
		__builtin_memcpy(&tuple.ipv4.daddr, &key->daddr[12], sizeof(tuple.ipv4.daddr));
		tuple.ipv4.sport = bpf_htons(key->sport);
		tuple.ipv4.dport = bpf_htons(key->dport);
		tuple_size = sizeof(tuple.ipv4);
	} else {
		__builtin_memcpy(tuple.ipv6.saddr, key->saddr, UL_ADDR_LEN);
		__builtin_memcpy(tuple.ipv6.daddr, key->daddr, UL_ADDR_LEN);
		tuple.ipv6.sport = bpf_htons(key->sport);
		tuple.ipv6.dport = bpf_htons(key->dport);
		tuple_size = sizeof(tuple.ipv6);
	}

	ct = bpf_skb_ct_lookup(skb, &tuple, tuple_size, &opts, sizeof(opts));
	if (!ct) {
		*unknown = true;
		return UL_NO_LINE;
	}
	ct_addr(reply_dst, key->family, &ct->tuplehash[UL_CT_DIR_REPLY].tuple.dst.u3);
	ct_addr(orig_dst, key->family, &ct->tuplehash[UL_CT_DIR_ORIGINAL].tuple.dst.u3);
	bpf_ct_release(ct);

	line = nat_src_line(reply_dst);
	if (line != UL_NO_LINE) {
		__builtin_memcpy(nat_addr, reply_dst, UL_ADDR_LEN);
		return line;
	}
	line = nat_src_line(orig_dst);
	if (line != UL_NO_LINE)
		__builtin_memcpy(nat_addr, orig_dst, UL_ADDR_LEN);
	return line;
}
