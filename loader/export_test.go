// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"net/netip"
	"testing"
)

// What the tests of package loader_test (rules_property_test.go) reach of
// the package's own: they import control/policy, which imports loader, so
// they cannot be in package loader.

// LoadForTest loads a datapath with a small flow map pinned in a fresh
// directory, skipping the test where BPF is not available.
func LoadForTest(tb testing.TB) *Datapath { return load(tb, Options{}) }

// TestPacket is the first packet of a new flow: TCP and UDP with ports,
// ICMP and ICMPv6 echo requests with SrcPort as the identifier.
type TestPacket struct {
	Src, Dst         netip.Addr
	Proto            uint8
	SrcPort, DstPort uint16
	DSCP             uint8
}

func (p TestPacket) packet() packet {
	q := packet{src: p.Src, dst: p.Dst, proto: p.Proto, sport: p.SrcPort, dport: p.DstPort, dscp: p.DSCP}
	switch p.Proto {
	case protoICMP:
		q.icmpType, q.dport = icmpEcho, 0
	case protoICMPv6:
		q.icmpType, q.dport = icmp6Echo, 0
	}
	return q
}

// RunLANIngress runs LAN ingress on p as if it came in by the interface of
// index ifindex, and returns the mark it leaves with.
func (d *Datapath) RunLANIngress(tb testing.TB, p TestPacket, ifindex int) uint32 {
	return runOn(tb, d.objs.UplinkdLanIn, p.packet().bytes(), 0, uint32(ifindex))
}

// PinnedFlow is the flow p's packets are pinned to, if any.
func (d *Datapath) PinnedFlow(tb testing.TB, p TestPacket) (Flow, bool) {
	tb.Helper()
	k := keyOf(p.packet())
	var v uplinkdFlow
	if err := d.objs.UlFlows.Lookup(&k, &v); err != nil {
		return Flow{}, false
	}
	boot, err := bootTime()
	if err != nil {
		tb.Fatal(err)
	}
	return flowOf(&k, &v, boot), true
}

// BenchRuleSet, set by package loader_test, compiles n random rules of a
// realistic shape (control/policy's RandomRules) with policies 0..3, for
// BenchmarkLANIngressNewFlowRules.
var BenchRuleSet func(n int) (RuleSet, error)
