// SPDX-License-Identifier: Apache-2.0

// Package policy compiles the ordered rules that give new flows a policy
// into the tables the datapath's classifier reads (loader.RuleSet), and
// computes each policy's bucket table from its members' tiers and weights.
// It is pure: no kernel, no config; the agent maps the config to its types.
//
// Match is the reference, plain first-match over the rules; Classify runs
// the datapath's algorithm over a compiled RuleSet in Go, and the tests hold
// the two to the same answer.
package policy

import (
	"net/netip"
	"slices"
	"time"
)

// PortRange is the ports First..Last, both included.
type PortRange struct {
	First, Last uint16
}

// Rule is one rule: a packet matches when it satisfies every field; an
// empty field is any value.
type Rule struct {
	// Src and Dst are the prefixes an address must be in, IPv4 ones with
	// 4-byte addresses: an IPv4 prefix never holds an IPv6 address, nor the
	// reverse.
	Src, Dst []netip.Prefix
	// Protos are IP protocol numbers.
	Protos []uint8
	// SrcPorts and DstPorts hold only packets with ports (TCP, UDP).
	SrcPorts, DstPorts []PortRange
	// DSCPs are DSCP values, 0..63.
	DSCPs []uint8
	// LANs are the indexes of the LAN interfaces a packet may come in on.
	LANs []int
	// Policy is the id (index in the policy list) of the policy a matched
	// flow takes.
	Policy int
	// Sticky and StickyPerRule are passed on to the datapath: see
	// loader.RuleAction.
	Sticky        time.Duration
	StickyPerRule bool
}

// Packet is what the classifier sees of a new flow's first packet.
// Addresses are valid and without zone; DSCP is 0..63.
type Packet struct {
	Src, Dst netip.Addr
	Proto    uint8
	// SrcPort and DstPort count only when HasPorts (TCP, UDP).
	SrcPort, DstPort uint16
	HasPorts         bool
	DSCP             uint8
	// LAN is the index of the interface the packet came in on.
	LAN int
}

// Match returns the index of the first rule p matches, -1 for none. It is
// the reference the compiled form must agree with.
func Match(rules []Rule, p Packet) int {
	for i, r := range rules {
		if matchPrefixes(r.Src, p.Src) && matchPrefixes(r.Dst, p.Dst) &&
			matchValues(r.Protos, p.Proto) &&
			matchPorts(r.SrcPorts, p.SrcPort, p.HasPorts) &&
			matchPorts(r.DstPorts, p.DstPort, p.HasPorts) &&
			matchValues(r.DSCPs, p.DSCP) && matchValues(r.LANs, p.LAN) {
			return i
		}
	}
	return -1
}

func matchPrefixes(prefixes []netip.Prefix, a netip.Addr) bool {
	if len(prefixes) == 0 {
		return true
	}
	for _, q := range prefixes {
		if q.Contains(a) {
			return true
		}
	}
	return false
}

func matchValues[T comparable](values []T, v T) bool {
	return len(values) == 0 || slices.Contains(values, v)
}

func matchPorts(ranges []PortRange, port uint16, hasPorts bool) bool {
	if len(ranges) == 0 {
		return true
	}
	if !hasPorts {
		return false
	}
	for _, r := range ranges {
		if r.First <= port && port <= r.Last {
			return true
		}
	}
	return false
}
