// SPDX-License-Identifier: Apache-2.0

package routing

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/uplinkd/uplinkd/control/plan"
)

var (
	dflt = netip.MustParsePrefix("0.0.0.0/0")
	gw1  = netip.MustParseAddr("198.51.100.1")
	gw2  = netip.MustParseAddr("198.51.100.17")
)

// state is a two-line desired state with the given multipath weights.
func state(w1, w2 int) plan.State {
	return plan.State{
		Rules: []plan.Rule{
			{Priority: 50, Table: plan.TableMain, SuppressPrefixLen: 0},
			{Priority: 201, Table: 201, Src: netip.MustParsePrefix("198.51.100.0/28"), SuppressPrefixLen: -1},
			{Priority: 202, Table: 202, Src: netip.MustParsePrefix("198.51.100.16/28"), SuppressPrefixLen: -1},
			{Priority: 222, Table: 222, SuppressPrefixLen: -1},
		},
		Routes: []plan.Route{
			{Table: 201, Dst: dflt, Type: plan.Unicast, Nexthops: []plan.Nexthop{{Gateway: gw1, Device: "wan1", Weight: 1}}},
			{Table: 201, Dst: dflt, Type: plan.Prohibit, Metric: 1},
			{Table: 202, Dst: dflt, Type: plan.Unicast, Nexthops: []plan.Nexthop{{Gateway: gw2, Device: "wan2", Weight: 1}}},
			{Table: 202, Dst: dflt, Type: plan.Prohibit, Metric: 1},
			{Table: 222, Dst: dflt, Type: plan.Unicast, Nexthops: []plan.Nexthop{{Gateway: gw1, Device: "wan1", Weight: w1}, {Gateway: gw2, Device: "wan2", Weight: w2}}},
		},
	}
}

func TestReconcileIdempotent(t *testing.T) {
	k := &Fake{}
	res, err := Reconcile(k, state(1, 1))
	if err != nil {
		t.Fatal(err)
	}
	if res.RulesAdded != 4 || res.RoutesReplaced != 5 {
		t.Errorf("first apply: %v", res)
	}
	k.Log = nil
	res, err = Reconcile(k, state(1, 1))
	if err != nil || res.Changed() || len(k.Log) != 0 {
		t.Errorf("second apply changed something: %v %v %q", res, err, k.Log)
	}
}

// A weight change replaces exactly the multipath route, nothing else.
func TestReconcileMinimal(t *testing.T) {
	k := &Fake{}
	if _, err := Reconcile(k, state(1, 1)); err != nil {
		t.Fatal(err)
	}
	k.Log = nil
	res, err := Reconcile(k, state(1, 3))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"~ ip route replace default table 222 nexthop via 198.51.100.1 dev wan1 weight 1 nexthop via 198.51.100.17 dev wan2 weight 3"}
	if !slices.Equal(k.Log, want) || res.RoutesReplaced != 1 {
		t.Errorf("log = %q\nwant %q", k.Log, want)
	}
}

// Rules and routes that are no longer wanted go; the new rule is added
// before the stale one is deleted.
func TestReconcileRemovesStale(t *testing.T) {
	k := &Fake{}
	if _, err := Reconcile(k, state(1, 1)); err != nil {
		t.Fatal(err)
	}
	next := state(1, 1)
	next.Rules[1].Src = netip.MustParsePrefix("198.51.100.32/28") // line 1 renumbered
	next.Routes = slices.Delete(next.Routes, 2, 3)                // line 2 lost its address
	k.Log = nil
	if _, err := Reconcile(k, next); err != nil {
		t.Fatal(err)
	}
	log := strings.Join(k.Log, "\n")
	add := strings.Index(log, "+ ip rule add prio 201 from 198.51.100.32/28")
	del := strings.Index(log, "- ip rule add prio 201 from 198.51.100.0/28")
	if add < 0 || del < 0 || add > del {
		t.Errorf("want the new rule added before the old deleted:\n%s", log)
	}
	if !strings.Contains(log, "- ip route replace default via 198.51.100.17 dev wan2 table 202") {
		t.Errorf("stale route not deleted:\n%s", log)
	}
	if _, err := Reconcile(k, next); err != nil {
		t.Fatal(err)
	}
}

// A failure does not stop the rest; the error names what failed; the next
// reconcile finishes the job.
func TestReconcilePartialFailure(t *testing.T) {
	want := state(1, 1)
	k := &Fake{Fail: map[string]string{"ReplaceRoute": want.Routes[0].Key(), "AddRule": want.Rules[2].Key()}}
	res, err := Reconcile(k, want)
	if err == nil {
		t.Fatal("no error")
	}
	for _, s := range []string{"replacing route", "table 201", "injected ReplaceRoute failure", "adding rule ip rule add prio 202", "injected AddRule failure"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error %q lacks %q", err, s)
		}
	}
	if res.RoutesReplaced != 4 || res.RulesAdded != 3 {
		t.Errorf("result %v: the other changes must still be made", res)
	}
	res, err = Reconcile(k, want)
	if err != nil || res.RoutesReplaced != 1 || res.RulesAdded != 1 {
		t.Errorf("second reconcile: %v %v", res, err)
	}
}

func TestRemove(t *testing.T) {
	k := &Fake{}
	if _, err := Reconcile(k, state(1, 1)); err != nil {
		t.Fatal(err)
	}
	res, err := Remove(k)
	if err != nil || res.RulesDeleted != 4 || res.RoutesDeleted != 5 || len(k.RuleSet) != 0 || len(k.RouteSet) != 0 {
		t.Errorf("remove: %v %v, left %v %v", res, err, k.RuleSet, k.RouteSet)
	}
}
