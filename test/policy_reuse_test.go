// SPDX-License-Identifier: Apache-2.0

package test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/test/lab"
)

// Policy ids at their limit: 63 policies and balanced take every id, so
// that a config replacing policy first by another gives the new one the
// removed one's id. These tests check that the new policy inherits
// nothing of the removed one's: not its pinned flows, not its counters,
// not the flows the old rules pin while the change is under way.

// reusePolicies is 63 policies, the first named first, of dsl1.
func reusePolicies(first string) string {
	return reusePoliciesOf(first, "      - {line: dsl1}\n")
}

// reusePoliciesOf is reusePolicies with the first one's members (YAML
// list items).
func reusePoliciesOf(first, members string) string {
	var b strings.Builder
	b.WriteString("policies:\n")
	fmt.Fprintf(&b, "  - name: %s\n    members:\n%s", first, members)
	for i := 1; i < 63; i++ {
		fmt.Fprintf(&b, "  - name: p%02d\n    members:\n      - {line: dsl%d}\n", i, 1+i%3)
	}
	return b.String()
}

// reuseRules sends srv's traffic to policy toSrv, the second server
// address's to toOther.
func reuseRules(l *lab.Lab, srv netip.AddrPort, toSrv, toOther string) string {
	return fmt.Sprintf("rules:\n  - name: to-srv\n    dst: %s\n    policy: %s\n  - name: to-other\n    dst: %s\n    policy: %s\n",
		srv.Addr(), toSrv, l.ServerAddrs[1], toOther)
}

// queries sends n echo queries over u, each answered.
func queries(t *testing.T, u *lab.UDPFlow, prefix string, n int) {
	t.Helper()
	for i := range n {
		if _, err := u.Query([]byte(fmt.Sprint(prefix, i)), emulated(2*time.Second)); err != nil {
			t.Fatal(err)
		}
	}
}

// checkInheritsNothing fails when policy name has flows, pinned flows or
// traffic: no traffic matches its rule.
func checkInheritsNothing(t *testing.T, a *agent, name string, id int) {
	t.Helper()
	for _, p := range a.status(t).Policies {
		if p.Name != name {
			continue
		}
		if p.ID != id {
			t.Fatalf("policy %s took id %d, not the removed policy's %d: the test's premise failed", name, p.ID, id)
		}
		if p.Flows != 0 || p.Pinned != 0 || p.TxPackets != 0 || p.RxPackets != 0 {
			t.Errorf("policy %s (id %d, the removed policy's) shows flows %d, pinned %d, tx %d packets %d bytes, rx %d packets %d bytes; want 0 (no traffic matches its rule)",
				name, p.ID, p.Flows, p.Pinned, p.TxPackets, p.TxBytes, p.RxPackets, p.RxBytes)
		}
		return
	}
	t.Fatalf("no policy %s in the status", name)
}

func policyID(t *testing.T, a *agent, name string) int {
	t.Helper()
	for _, p := range a.status(t).Policies {
		if p.Name == name {
			return p.ID
		}
	}
	t.Fatalf("no policy %s in the status", name)
	return -1
}

// reuseStart starts an agent whose policy old (every id taken) gets the
// echo server's traffic; newConfig is the config that replaces old by
// new, which takes old's id.
func reuseStart(t *testing.T) (l *lab.Lab, a *agent, srv *lab.EchoServer, file, newConfig string) {
	t.Helper()
	l, state := policyLab(t)
	srv = echoServer(t, l)
	file = writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: reusePolicies("old") + reuseRules(l, srv.Addr, "old", "p01")}))
	a = startPolicyAgent(t, l, file)
	newConfig = l.Config(lab.ConfigOptions{StateDir: state, Extra: reusePolicies("new") + reuseRules(l, srv.Addr, "p02", "new")})
	return l, a, srv, file, newConfig
}

// reuseFlow opens a UDP flow of old's, answered 5 times.
func reuseFlow(t *testing.T, l *lab.Lab, srv *lab.EchoServer) *lab.UDPFlow {
	t.Helper()
	u, err := lab.OpenUDPFlow(l.Clients[0], srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	queries(t, u, "q", 5)
	return u
}

// A restart whose config replaces policy old by new.
func TestPolicyIDReuseAcrossRestart(t *testing.T) {
	t.Parallel()
	l, a, srv, _, newConfig := reuseStart(t)
	u := reuseFlow(t, l, srv)
	oldID := policyID(t, a, "old")
	a.stop(t)
	b := startPolicyAgent(t, l, writeConfig(t, newConfig))
	queries(t, u, "r", 3)
	checkInheritsNothing(t, b, "new", oldID)
}

// The same by a reload.
func TestPolicyIDReuseAcrossReload(t *testing.T) {
	t.Parallel()
	l, a, srv, file, newConfig := reuseStart(t)
	u := reuseFlow(t, l, srv)
	oldID := policyID(t, a, "old")
	a.status(t) // a count of the flows, which the status reuses while the map does not change
	a.reload(t, file, newConfig)
	queries(t, u, "r", 3)
	checkInheritsNothing(t, a, "new", oldID)
}

// New flows all through a reload that gives old's id to new: those the
// old rules pin while the reload is under way are not new's.
func TestPolicyIDReuseDuringReload(t *testing.T) {
	t.Parallel()
	l, a, srv, file, newConfig := reuseStart(t)
	stop, done := make(chan struct{}), make(chan int)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				done <- n
				return
			default:
			}
			_ = l.Clients[0].Do(func() error {
				c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(srv.Addr))
				if err != nil {
					return err
				}
				c.Write([]byte("x"))
				c.Close()
				n++
				return nil
			})
		}
	}()
	time.Sleep(200 * time.Millisecond)
	a.reload(t, file, newConfig)
	time.Sleep(200 * time.Millisecond)
	close(stop)
	sent := <-done
	leaked, total := 0, 0
	for _, line := range strings.Split(strings.TrimSpace(gw(t, l, uplinkd, "flows", "--json", "--proto", "udp", "-c", file)), "\n") {
		var r struct{ Policy, Rule string }
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatal(err)
		}
		total++
		if r.Policy == "new" {
			if leaked == 0 {
				t.Logf("e.g. %s", line)
			}
			leaked++
		}
	}
	t.Logf("%d new UDP flows sent, %d pinned, %d of them policy new's", sent, total, leaked)
	if total < sent/2 {
		t.Errorf("only %d of %d flows pinned: the test did not run as meant", total, sent)
	}
	if leaked > 0 {
		t.Errorf("%d flows of the removed policy old (pinned by the old rules during the reload) are policy new's", leaked)
	}
}

// kill -9 of a start whose config gives old's id to new, as soon as
// policies.json names new: the next start must still see the id reused
// and free it. (policies.json named new before the datapath was loaded
// and old's flows forgotten: a kill in between, which this caught every
// time, left new with old's flows. It is written once the datapath is in
// step now.)
func TestPolicyIDReuseKilledStart(t *testing.T) {
	t.Parallel()
	l, a, srv, _, newConfig := reuseStart(t)
	u := reuseFlow(t, l, srv)
	oldID := policyID(t, a, "old")
	a.stop(t)
	file := writeConfig(t, newConfig)
	b := spawnAgent(t, l, file)
	names := filepath.Join(b.stateDir, "policies.json")
	deadline := time.Now().Add(emulated(30 * time.Second))
	for {
		if data, _ := os.ReadFile(names); strings.Contains(string(data), `"new"`) {
			break
		}
		if time.Now().After(deadline) {
			b.kill9(t)
			t.Fatalf("policies.json did not name policy new within %v", emulated(30*time.Second))
		}
		time.Sleep(200 * time.Microsecond)
	}
	b.kill9(t)
	c := startPolicyAgent(t, l, file)
	queries(t, u, "r", 3)
	checkInheritsNothing(t, c, "new", oldID)
}

// A new policy with a removed one's id does not inherit its sticky
// clients: new gives dsl1 1 of 256 shares, old gave it all.
func TestPolicyIDReuseSticky(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	srv := echoServer(t, l)
	rules := func(pol string) string {
		return fmt.Sprintf("rules:\n  - name: to-srv\n    dst: %s\n    policy: %s\n    sticky: 1h\n", srv.Addr.Addr(), pol)
	}
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: reusePolicies("old") + rules("old")}))
	a := startPolicyAgent(t, l, file)
	c1 := dial{[]*lab.Host{l.Clients[0]}, srv.Addr, 0}
	if got := newLines(t, l, c1, 2); !allOn(got, 1) {
		t.Fatalf("c1 under old (dsl1 only): %s", fmtLines(got))
	}
	oldID := policyID(t, a, "old")
	a.reload(t, file, l.Config(lab.ConfigOptions{StateDir: state,
		Extra: reusePoliciesOf("new", "      - {line: dsl1, weight: 1}\n      - {line: dsl2, weight: 255}\n") + rules("new")}))
	if id := policyID(t, a, "new"); id != oldID {
		t.Fatalf("new took id %d, not old's %d: the test's premise failed", id, oldID)
	}
	if got := newLines(t, l, c1, 1); got[0] == 1 {
		t.Errorf("c1's first flow under new left by dsl1, old's sticky line (new gives dsl1 1 of 256): new inherited old's sticky client")
	}
}
