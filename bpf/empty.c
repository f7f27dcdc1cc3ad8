// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* The cheapest possible TC program: the baseline the loader's benchmarks
 * compare the datapath with. */

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

SEC("tc")
int uplinkd_empty(struct __sk_buff *skb)
{
	return TC_ACT_UNSPEC;
}

char __license[] SEC("license") = "Dual BSD/GPL";
