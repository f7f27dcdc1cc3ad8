// SPDX-License-Identifier: Apache-2.0

package flows

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/loader"
)

type fakeSource []loader.Flow

func (s fakeSource) Flows(fn func(loader.Flow) bool) error {
	for _, f := range s {
		if !fn(f) {
			return nil
		}
	}
	return nil
}

var now = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func fakeFlows(n int) fakeSource {
	r := rand.New(rand.NewPCG(1, 2))
	var s fakeSource
	for i := range n {
		proto := uint8(6)
		if i%3 == 0 {
			proto = 17
		}
		s = append(s, loader.Flow{
			Proto: proto,
			Src:   netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i%5)}), uint16(40000+i)),
			Dst:   netip.AddrPortFrom(netip.MustParseAddr("203.0.113.100"), uint16(443-i%2*390)),
			Line:  i % 2, NATAddr: netip.AddrFrom4([4]byte{198, 51, 100, byte(2 + i%2*16)}),
			TxBytes: r.Uint64N(1 << 20), RxBytes: r.Uint64N(1 << 20),
			FirstSeen: now.Add(-time.Duration(r.Int64N(int64(time.Hour)))),
			LastSeen:  now.Add(-time.Duration(r.Int64N(int64(time.Minute)))),
		})
	}
	return s
}

func collect(t *testing.T, src Source, q Query) []Row {
	t.Helper()
	var rows []Row
	if err := Run(src, q, Names{Lines: map[int]string{1: "dsl1", 2: "dsl2"}}, now, func(r Row) error { rows = append(rows, r); return nil }); err != nil {
		t.Fatal(err)
	}
	return rows
}

func TestFiltersSelectExactly(t *testing.T) {
	src := fakeFlows(300)
	client, _ := ParseClient("192.0.2.11")
	for _, c := range []struct {
		q    Query
		want func(Row) bool
	}{
		{Query{Line: "dsl2"}, func(r Row) bool { return r.Line == "dsl2" && r.LineNumber == 2 }},
		{Query{Line: "1"}, func(r Row) bool { return r.Line == "dsl1" }},
		{Query{Client: client}, func(r Row) bool { return r.Client == "192.0.2.11" }},
		{Query{Proto: 17}, func(r Row) bool { return r.Proto == "udp" }},
		{Query{Port: 53}, func(r Row) bool { return r.RemotePort == 53 }},
		{Query{Proto: 6, Line: "dsl1", Port: 443}, func(r Row) bool { return r.Proto == "tcp" && r.Line == "dsl1" && r.RemotePort == 443 }},
	} {
		rows := collect(t, src, c.q)
		want := 0
		for _, f := range src {
			if c.want(rowOf(&f, Names{Lines: map[int]string{1: "dsl1", 2: "dsl2"}}, now)) {
				want++
			}
		}
		if len(rows) != want || want == 0 {
			t.Errorf("%+v: %d rows, want %d", c.q, len(rows), want)
		}
		for _, r := range rows {
			if !c.want(r) {
				t.Errorf("%+v selected %+v", c.q, r)
			}
		}
	}
	if err := Run(src, Query{Line: "dsl9"}, Names{Lines: map[int]string{1: "dsl1"}}, now, func(Row) error { return nil }); err == nil {
		t.Error("an unknown line is no error")
	}
	if err := Run(src, Query{Sort: "size"}, Names{}, now, func(Row) error { return nil }); err == nil {
		t.Error("an unknown sort is no error")
	}
}

// A sorted top-N equals the first N of the full sort, for every order.
func TestTopNIsTheSortsHead(t *testing.T) {
	src := fakeFlows(1000)
	for _, by := range Sorts {
		all := collect(t, src, Query{Sort: by})
		top := collect(t, src, Query{Sort: by, Limit: 20})
		if len(all) != 1000 || len(top) != 20 {
			t.Fatalf("%s: %d and %d rows", by, len(all), len(top))
		}
		if !slices.Equal(top, all[:20]) {
			t.Errorf("%s: top 20 differs from the head of the full sort", by)
		}
		key := map[string]func(Row) float64{
			"bytes": func(r Row) float64 { return float64(r.TxBytes + r.RxBytes) },
			"age":   func(r Row) float64 { return r.AgeSeconds },
			"idle":  func(r Row) float64 { return r.IdleSecs },
		}[by]
		if !slices.IsSortedFunc(all, func(a, b Row) int { return int(key(b) - key(a)) }) {
			t.Errorf("%s: not sorted highest first", by)
		}
	}
	if rows := collect(t, src, Query{Limit: 7}); len(rows) != 7 {
		t.Errorf("limit without sort: %d rows", len(rows))
	}
}

func TestParse(t *testing.T) {
	for _, s := range []string{"tcp", "UDP", "icmp", "47"} {
		if _, err := ParseProto(s); err != nil {
			t.Errorf("%s: %v", s, err)
		}
	}
	for _, s := range []string{"", "0", "256", "tcpx", "6.0"} {
		if _, err := ParseProto(s); err == nil {
			t.Errorf("%q accepted", s)
		}
	}
	if p, err := ParseClient("192.0.2.77/24"); err != nil || p.String() != "192.0.2.0/24" {
		t.Errorf("prefix: %v %v", p, err)
	}
	if _, err := ParseClient("client1"); err == nil {
		t.Error("a name accepted as client")
	}
	c, _ := Count(fakeFlows(10))
	if c.Total != 10 || c.PerLine[1] != 5 || c.PerLine[2] != 5 || c.PerPolicy[0] != 10 {
		t.Errorf("count: %+v", c)
	}
}

// A flow names the rule that matched it and its policy; a flow no rule
// matched has the balanced policy and no rule.
func TestRowPolicyAndRule(t *testing.T) {
	names := Names{Rules: []string{"sip", "banks"}, Policies: []string{"balanced", "voip", "line:dsl2"}}
	now := time.Now()
	for _, c := range []struct {
		rule, policy     int
		wantRule, wantPo string
	}{
		{1, 2, "banks", "line:dsl2"},
		{-1, 0, "", "balanced"},
		{5, 9, "5", "9"}, // numbers the names do not know (a reload under way)
	} {
		r := rowOf(&loader.Flow{Rule: c.rule, Policy: c.policy}, names, now)
		if r.Rule != c.wantRule || r.Policy != c.wantPo {
			t.Errorf("rule %d policy %d: row says rule %q policy %q, want %q %q", c.rule, c.policy, r.Rule, r.Policy, c.wantRule, c.wantPo)
		}
	}
	if r := rowOf(&loader.Flow{Rule: -1}, Names{}, now); r.Policy != "balanced" || r.Rule != "" {
		t.Errorf("without names: rule %q policy %q, want none and balanced", r.Rule, r.Policy)
	}
}
