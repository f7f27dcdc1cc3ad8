// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"net/netip"
	"time"
)

// Limits of the datapath's rule classifier (bpf/lib/classify.h).
const (
	// MaxRules is how many rules one rule set holds: the bits of a rule
	// bitmap (UL_RULE_WORDS words of 64).
	MaxRules = 4096
	// RuleWords is the number of 64-bit words of a rule bitmap.
	RuleWords = MaxRules / 64
	// MaxBitmaps is how many distinct rule bitmaps one rule set may use.
	MaxBitmaps = 8192
	// MaxPolicies is the number of policies, the built-in balanced one
	// (id 0) included.
	MaxPolicies = 64
)

// Last resorts of a policy whose lines are all unusable.
const (
	LastResortDefault     = 0 // the balanced policy's buckets (policy 0)
	LastResortUnreachable = 1 // marked for the unreachable rule: the client gets ICMP unreachable
	LastResortBlackhole   = 2 // marked for the blackhole rule: dropped silently
)

// PrefixBitmap is an address table entry: packets whose address's longest
// matching prefix is Prefix match the rules of bitmap Bitmap.
type PrefixBitmap struct {
	Prefix netip.Prefix
	Bitmap uint32
}

// PortBitmap is a port table entry: ports First..Last match the rules of
// bitmap Bitmap.
type PortBitmap struct {
	First, Last uint16
	Bitmap      uint32
}

// RuleAction is what a rule does to the new flow it matches.
type RuleAction struct {
	// ID is the rule's number, 0..MaxRules-1, which flows and sticky
	// entries record: kept across reloads that move the rule.
	ID int
	// Policy is the id of the policy whose buckets give the flow its line.
	Policy int
	// Sticky, when positive, keeps a client's new flows on the line it got
	// last, within this time.
	Sticky time.Duration
	// StickyPerRule keys stickiness by the rule instead of the policy.
	StickyPerRule bool
}

// RuleSet is a compiled rule set, in the form the datapath's classifier
// reads: for each field, a table from the packet's value to a bitmap of the
// rules that value satisfies; the first rule whose bit is set in every
// field's bitmap matches. Each table's lookup costs the same whatever the
// number of rules. The zero RuleSet has no rules: every flow takes policy 0.
type RuleSet struct {
	// Words is how many words of each bitmap are in use: (rules+63)/64.
	Words int
	// Bitmaps is the pool the tables point into, each Words long.
	Bitmaps [][]uint64
	// Src and Dst map an address's longest matching prefix to a bitmap;
	// they hold 0.0.0.0/0 and ::/0, so every address finds one.
	Src, Dst []PrefixBitmap
	// Proto maps the IP protocol, DSCP the packet's DSCP, to a bitmap.
	Proto [256]uint32
	DSCP  [64]uint32
	// SrcPort and DstPort cover 0..65535 in order, without gaps.
	SrcPort, DstPort []PortBitmap
	// NoPorts is both port fields' bitmap for packets without ports (ICMP).
	NoPorts uint32
	// LAN maps a LAN interface's index to a bitmap; AnyLAN serves the
	// others.
	LAN    map[int]uint32
	AnyLAN uint32
	// Actions are the rules' actions, in rule order.
	Actions []RuleAction
}
