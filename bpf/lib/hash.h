// SPDX-License-Identifier: GPL-2.0-only OR BSD-2-Clause
/* A stable hash of the flow key (Bob Jenkins' lookup3, as the kernel's
 * jhash2). Computed here from the 5-tuple, never taken from skb->hash, which
 * a client can make the kernel re-pick. */
#pragma once

#include "common.h"
#include "maps.h"

#define UL_JHASH_INITVAL	0xdeadbeef

static __always_inline __u32 ul_rol32(__u32 word, unsigned int shift)
{
	return (word << shift) | (word >> (32 - shift));
}

#define ul_jhash_mix(a, b, c)					\
	do {							\
		a -= c; a ^= ul_rol32(c, 4);  c += b;		\
		b -= a; b ^= ul_rol32(a, 6);  a += c;		\
		c -= b; c ^= ul_rol32(b, 8);  b += a;		\
		a -= c; a ^= ul_rol32(c, 16); c += b;		\
		b -= a; b ^= ul_rol32(a, 19); a += c;		\
		c -= b; c ^= ul_rol32(b, 4);  b += a;		\
	} while (0)

#define ul_jhash_final(a, b, c)					\
	do {							\
		c ^= b; c -= ul_rol32(b, 14);			\
		a ^= c; a -= ul_rol32(c, 11);			\
		b ^= a; b -= ul_rol32(a, 25);			\
		c ^= b; c -= ul_rol32(b, 16);			\
		a ^= c; a -= ul_rol32(c, 4);			\
		b ^= a; b -= ul_rol32(a, 14);			\
		c ^= b; c -= ul_rol32(b, 24);			\
	} while (0)

#define UL_FLOW_KEY_WORDS	(sizeof(struct flow_key) / sizeof(__u32))
_Static_assert(sizeof(struct flow_key) % sizeof(__u32) == 0, "flow_key must hash as words");

static __always_inline __u32 flow_hash(const struct flow_key *key)
{
	const __u32 *k = (const __u32 *)key;
	__u32 len = UL_FLOW_KEY_WORDS;
	__u32 a, b, c;

	a = b = c = UL_JHASH_INITVAL + (len << 2);
	while (len > 3) {
		a += k[0];
		b += k[1];
		c += k[2];
		ul_jhash_mix(a, b, c);
		len -= 3;
		k += 3;
	}
	switch (len) {
	case 3:
		c += k[2];
		/* fallthrough */
	case 2:
		b += k[1];
		/* fallthrough */
	case 1:
		a += k[0];
		ul_jhash_final(a, b, c);
	}
	return c;
}
