// SPDX-License-Identifier: Apache-2.0

package test

// Issue 12, policies and rules, end to end: the agent's config (prefix
// sets, policies in tiers, ordered rules), its compiler and the datapath's
// classifier, judged by where new flows leave. Each line NATs to its own
// address, so the source the echo server sees names the line of a flow
// (lab.LineOf). The labs have three lines, so the balanced policy, which
// spreads new flows over all three, is told apart from a rule's line by a
// handful of flows: 8 new flows all on one given line happen by chance
// with probability (1/3)^8 < 2e-4.

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/test/lab"
)

// policyLab is the lab of the policy tests: three lines, two clients
// (c1 192.0.2.11, c2 192.0.2.12), two server addresses (203.0.113.100 and
// .101).
func policyLab(t *testing.T) (*lab.Lab, string) {
	t.Helper()
	return newLab(t, lab.Options{ISPs: 3, Clients: 2, Servers: 2})
}

// startPolicyAgent starts the agent on a config with policies or rules,
// saying plainly when this build's config does not know them yet.
func startPolicyAgent(t *testing.T, l *lab.Lab, file string) *agent {
	t.Helper()
	if _, err := config.Load(file); err != nil {
		t.Fatalf("this build refuses the policy config (issue 12's prefix_sets, policies, rules): %v", err)
	}
	return startAgent(t, l, file)
}

// echoServerAt runs an echo server on the lab's server at addr:port until
// the test ends.
func echoServerAt(t *testing.T, l *lab.Lab, addr netip.Addr, port uint16) *lab.EchoServer {
	t.Helper()
	srv, err := lab.StartEchoServer(l.Server, addr, port)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	return srv
}

// dial says how a test opens new TCP connections: from the clients in
// turn, to an echo server, with a traffic class (0: none).
type dial struct {
	from []*lab.Host
	to   netip.AddrPort
	tos  int
}

func (d dial) open(i int, timeout time.Duration) (net.Conn, netip.AddrPort, error) {
	h := d.from[i%len(d.from)]
	if d.tos != 0 {
		return lab.DialTCPTOS(h, d.to, d.tos, timeout)
	}
	return lab.DialTCP(h, d.to, timeout)
}

// tryLines opens n new connections as d says, one after the other, and
// closes them; it returns the line (1-based; 0: an address of no line)
// each left by, as the server saw it. The first failure ends it.
func tryLines(l *lab.Lab, d dial, n int, timeout time.Duration) ([]int, error) {
	var lines []int
	for i := range n {
		c, seen, err := d.open(i, timeout)
		if err != nil {
			return lines, fmt.Errorf("new connection %d: %w", i, err)
		}
		c.Close()
		lines = append(lines, l.LineOf(seen.Addr()))
	}
	return lines, nil
}

// newLines is tryLines where every connection must succeed.
func newLines(t *testing.T, l *lab.Lab, d dial, n int) []int {
	t.Helper()
	lines, err := tryLines(l, d, n, emulated(2*time.Second))
	if err != nil {
		t.Fatalf("from %d clients to %s: %v", len(d.from), d.to, err)
	}
	return lines
}

// allOn reports whether every connection left by one of the lines in want.
func allOn(lines []int, want ...int) bool {
	for _, n := range lines {
		if !slices.Contains(want, n) {
			return false
		}
	}
	return len(lines) > 0
}

// distinct is the number of different lines among lines.
func distinct(lines []int) int {
	return len(slices.Compact(slices.Sorted(slices.Values(lines))))
}

// fmtLines counts connections by line: "dsl1×5 dsl3×3".
func fmtLines(lines []int) string {
	count := map[int]int{}
	for _, n := range lines {
		count[n]++
	}
	var parts []string
	for n := 0; n <= 16; n++ {
		if count[n] == 0 {
			continue
		}
		name := "no-line"
		if n > 0 {
			name = fmt.Sprintf("dsl%d", n)
		}
		parts = append(parts, fmt.Sprintf("%s×%d", name, count[n]))
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, " ")
}

// policyWait bounds how long a test waits for the agent to act on a
// change it cannot be asked about (a line's failover reaching a policy, a
// prefix-set file edited).
var policyWait = emulated(10 * time.Second)

// settle waits, bounded by policyWait, until a batch of n new connections
// as d says satisfies ok, then checks that a fresh batch does too: the
// first batch may satisfy ok by chance (e.g. 8 flows all on one line with
// probability 1/6561 under the balanced policy), two in a row much less.
// The wait fails the test when the agent exits.
func settle(t *testing.T, a *agent, l *lab.Lab, d dial, n int, what string, ok func([]int) bool) {
	t.Helper()
	start := time.Now()
	var last []int
	var lastErr error
	for time.Since(start) < policyWait {
		select {
		case err := <-a.done:
			a.done <- err
			t.Fatalf("%s: the agent exited: %v\n%s", what, err, a.log.String())
		default:
		}
		lines, err := tryLines(l, d, n, emulated(time.Second))
		if err == nil && ok(lines) {
			t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
			if again := newLines(t, l, d, n); !ok(again) {
				t.Errorf("%s held for one batch of new flows, not for the next: %s", what, fmtLines(again))
			}
			return
		}
		last, lastErr = lines, err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v; the last batch of new flows left by %s (error: %v)", what, policyWait, fmtLines(last), lastErr)
}

// refused reports whether a connect failed at once with the answer of a
// gateway that has no route for it: a reset, or ICMP host or net
// unreachable.
func refused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH)
}

// dscpEF is DSCP ef (46) as an IP_TOS byte.
const dscpEF = 46 << 2

// Rules by destination address, destination port, source host and DSCP
// send new flows to their lines, the first matching rule decides, and
// flows no rule matches keep the balanced policy. Each case opens 8 new
// flows: under the balanced policy they would all leave by the expected
// line with probability (1/3)^8 < 2e-4. Each rule names another line than
// the one before it, so an agent that sends everything one way fails.
func TestPolicyRulesSteer(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	web := echoServer(t, l)                           // 203.0.113.100:7
	alt := echoServerAt(t, l, l.ServerAddrs[0], 8)    // 203.0.113.100:8
	second := echoServerAt(t, l, l.ServerAddrs[1], 7) // 203.0.113.101:7
	c1, c2 := l.Clients[:1], l.Clients[1:]
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`policies:
  - name: via2
    members:
      - {line: dsl2}
  - name: via3
    members:
      - {line: dsl3, metric: 0, weight: 1}
rules:
  - name: to-second-server
    dst: %s
    line: dsl1
  - name: port-8
    proto: tcp
    dst_port: 8
    policy: via2
  - name: from-c2
    src: %s
    policy: via3
  - name: voice
    dscp: ef
    line: dsl2
`, l.ServerAddrs[1], lab.ClientAddr(2).Addr())}))
	a := startPolicyAgent(t, l, file)

	for _, c := range []struct {
		what string
		d    dial
		want int
	}{
		{"c1 to the second server address (rule to-second-server)", dial{c1, second.Addr, 0}, 1},
		{"c1 to port 8 (rule port-8, policy via2)", dial{c1, alt.Addr, 0}, 2},
		{"c2 to port 7 (rule from-c2, policy via3)", dial{c2, web.Addr, 0}, 3},
		{"c1 to port 7 with DSCP ef (rule voice)", dial{c1, web.Addr, dscpEF}, 2},
		{"c2 to the second server address (to-second-server comes before from-c2)", dial{c2, second.Addr, 0}, 1},
		{"c2 to port 7 with DSCP ef (from-c2 comes before voice)", dial{c2, web.Addr, dscpEF}, 3},
	} {
		if lines := newLines(t, l, c.d, 8); !allOn(lines, c.want) {
			t.Errorf("%s: new flows left by %s, want all by dsl%d", c.what, fmtLines(lines), c.want)
		} else {
			t.Logf("%s: %s", c.what, fmtLines(lines))
		}
	}
	// No rule matches: the balanced policy, over every line. 24 flows on
	// one line by chance: 3·(1/3)^24 < 1e-10.
	if lines := newLines(t, l, dial{c1, web.Addr, 0}, 24); distinct(lines) < 2 {
		t.Errorf("c1 to port 7 (no rule matches): new flows left by %s, want the balanced policy's spread over the lines", fmtLines(lines))
	}

	// What the operator sees: hits per rule and new flows per policy in
	// the status, and each flow's rule and policy in `uplinkd flows`.
	st := a.status(t)
	hits := map[string]uint64{}
	for _, r := range st.Rules {
		hits[r.Name] = r.Hits
	}
	for rule, want := range map[string]uint64{"to-second-server": 16, "port-8": 8, "from-c2": 16, "voice": 8} {
		if hits[rule] != want {
			t.Errorf("status: rule %s has %d hits, want %d (all: %v)", rule, hits[rule], want, hits)
		}
	}
	newFlows := map[string]uint64{}
	for _, p := range st.Policies {
		newFlows[p.Name] = p.Flows
	}
	for policy, want := range map[string]uint64{"line:dsl1": 16, "via2": 8, "via3": 16, "line:dsl2": 8} {
		if newFlows[policy] != want {
			t.Errorf("status: policy %s has %d new flows, want %d (all: %v)", policy, newFlows[policy], want, newFlows)
		}
	}
	// Every forwarded byte is some policy's: the rules were in force
	// before the first flow, so the policies' traffic adds up to the
	// lines' (once the last flows' closing segments are through).
	type traffic struct{ txPackets, txBytes, rxPackets, rxBytes uint64 }
	var why string
	eventually(t, "the policies' traffic adding up to the lines'", func() bool {
		st := a.status(t)
		var lines, policies traffic
		for _, l := range st.Lines {
			lines.txPackets += l.ForwardedTxPackets
			lines.txBytes += l.ForwardedTxBytes
			lines.rxPackets += l.ForwardedRxPackets
			lines.rxBytes += l.ForwardedRxBytes
		}
		for _, p := range st.Policies {
			if p.Flows > 0 && (p.TxBytes == 0 || p.RxBytes == 0) {
				why = fmt.Sprintf("policy %s: %d new flows but tx %d, rx %d bytes", p.Name, p.Flows, p.TxBytes, p.RxBytes)
				return false
			}
			policies.txPackets += p.TxPackets
			policies.txBytes += p.TxBytes
			policies.rxPackets += p.RxPackets
			policies.rxBytes += p.RxBytes
		}
		why = fmt.Sprintf("forwarded by the lines %+v, by the policies %+v", lines, policies)
		return lines == policies && lines.txBytes > 0
	})
	t.Log(why)
	rows := map[string]int{}
	for _, line := range strings.Split(strings.TrimSpace(gw(t, l, uplinkd, "flows", "--json", "-c", file)), "\n") {
		var r struct{ Rule, Policy string }
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("flows --json line %q: %v", line, err)
		}
		rows[r.Policy+"/"+r.Rule]++
	}
	for key, want := range map[string]int{"via2/port-8": 8, "line:dsl2/voice": 8, "balanced/": 24} {
		if rows[key] != want {
			t.Errorf("flows --json: %d flows of policy/rule %s, want %d (all: %v)", rows[key], key, want, rows)
		}
	}
}

// A policy in tiers: dsl1 at metric 1, dsl2 and dsl3 at metric 2. New
// flows take dsl1; while it is down they take dsl2 and dsl3 (both: the
// tier's lines share by weight); when it is back new flows take it again,
// and the flows opened during the outage stay where they are.
func TestPolicyTiers(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	srv := echoServer(t, l)
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`policies:
  - name: tiered
    members:
      - {line: dsl1, metric: 1}
      - {line: dsl2, metric: 2}
      - {line: dsl3, metric: 2}
rules:
  - name: to-server
    dst: %s
    policy: tiered
`, srv.Addr.Addr())}))
	a := startPolicyAgent(t, l, file)
	d := dial{l.Clients, srv.Addr, 0}

	// (1/3)^8 < 2e-4 under the balanced policy.
	if lines := newLines(t, l, d, 8); !allOn(lines, 1) {
		t.Errorf("dsl1 up: new flows left by %s, want all by dsl1 (the first tier)", fmtLines(lines))
	}

	if err := l.SetGatewaySilent(1, true); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.LineDown, "dsl1")
	eventually(t, "dsl1 out of service", func() bool { return lineOut(t, l, 1) })
	settle(t, a, l, d, 8, "new flows avoid dsl1", func(lines []int) bool { return allOn(lines, 2, 3) })
	// 16 flows of the second tier all on one of its two lines: 2·(1/2)^16 < 4e-5.
	outage := openFlows(t, l, srv.Addr, 16, false)
	var outageLines []int
	for _, f := range outage {
		outageLines = append(outageLines, l.LineOf(f.seen.Addr()))
	}
	if !allOn(outageLines, 2, 3) || distinct(outageLines) != 2 {
		t.Errorf("dsl1 down: flows left by %s, want dsl2 and dsl3 both (the second tier)", fmtLines(outageLines))
	}
	pinned := checkPinned(t, l, outage)

	if err := l.SetGatewaySilent(1, false); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.LineUp, "dsl1")
	eventually(t, "dsl1 back in service", func() bool { return lineIn(t, l, 1) })
	settle(t, a, l, d, 8, "new flows back on dsl1", func(lines []int) bool { return allOn(lines, 1) })

	if broken, moved, detail := checkAll(outage); broken+moved > 0 {
		t.Errorf("flows opened during the outage, after dsl1 came back: %d broken, %d moved: %v", broken, moved, detail)
	}
	for f, line := range checkPinned(t, l, outage) {
		if line != pinned[f] {
			t.Errorf("%v opened during the outage moved from line %d to %d when dsl1 came back", f, pinned[f]+1, line+1)
		}
	}
}

// A policy of one line whose last resort is unreachable: while the line
// is down, a connection its rule matches is refused at once (a reset or
// ICMP unreachable from the gateway) instead of leaving by another line
// or hanging, and flows no rule matches still work on the other lines.
func TestPolicyLastResortUnreachable(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	web := echoServer(t, l)
	strict := echoServerAt(t, l, l.ServerAddrs[1], 7)
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`policies:
  - name: only-dsl1
    members:
      - {line: dsl1}
    last_resort: unreachable
rules:
  - name: strict
    dst: %s
    policy: only-dsl1
`, l.ServerAddrs[1])}))
	a := startPolicyAgent(t, l, file)
	d := dial{l.Clients, strict.Addr, 0}

	if lines := newLines(t, l, d, 8); !allOn(lines, 1) {
		t.Errorf("dsl1 up: new flows to %s left by %s, want all by dsl1", strict.Addr, fmtLines(lines))
	}

	if err := l.SetCarrier(1, false); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.Carrier, "dsl1", "carrier=false")
	eventually(t, "dsl1 out of service", func() bool { return lineOut(t, l, 1) })

	// A refusal comes back in a round trip; the dial's bound only tells
	// it from silence (a SYN dropped somewhere: a timeout), with room for
	// the SYN sent again after 1 s. The gateway's kernel rate-limits the
	// ICMP errors it sends each client: one costs 2 s (route.error_cost
	// and icmp_ratelimit, 1 s each) of a budget of 5-6 s that refills at
	// 1 s/s, so a client tried a third time at once may get silence, not
	// ICMP (seen in this lab with a plain `unreachable` rule). Only
	// refusals spend the budget, and the loop ends at the first one; the
	// clients take turns, so each is refused at most twice.
	bound := emulated(1500 * time.Millisecond)
	try := func(i int) (string, bool) {
		start := time.Now()
		c, seen, err := d.open(i, bound)
		took := time.Since(start).Round(time.Millisecond)
		switch {
		case err == nil:
			c.Close()
			return fmt.Sprintf("connected, leaving by dsl%d", l.LineOf(seen.Addr())), false
		case refused(err):
			return fmt.Sprintf("refused after %v: %v", took, err), true
		default:
			return fmt.Sprintf("failed after %v, not refused: %v", took, err), false
		}
	}
	deadline, i := time.Now().Add(policyWait), 0
	for {
		what, ok := try(i)
		i++
		if ok {
			t.Logf("dsl1 down: a connection to %s %s", strict.Addr, what)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("dsl1 down: a connection to %s %s; want it refused at once (last_resort: unreachable)", strict.Addr, what)
		}
		time.Sleep(200 * time.Millisecond)
	}
	for range 2 { // the other client, then the first again
		if what, ok := try(i); !ok {
			t.Errorf("dsl1 down, again: a connection to %s %s; want it refused at once", strict.Addr, what)
		}
		i++
	}

	if lines := newLines(t, l, dial{l.Clients, web.Addr, 0}, 16); !allOn(lines, 2, 3) {
		t.Errorf("dsl1 down: new flows no rule matches left by %s, want dsl2 and dsl3 only", fmtLines(lines))
	}
}

// sticky: 2s on a policy of the three lines: a client's new flows, each
// opened within the timeout of the one before, all take one line;
// a client's new flow after a pause longer than the timeout picks afresh.
//
// Without stickiness, 8 flows in a row all on one line happen with
// probability (1/3)^7 < 5e-4. After each pause the line is picked afresh
// from three of equal weight: it stays the same with probability 1/3, so
// 20 pauses without a change happen with probability (1/3)^20 < 3e-10
// (the test then waits 20 pauses of 3 s; in the expected case, 1.5).
func TestPolicySticky(t *testing.T) {
	t.Parallel()
	const sticky = 2 * time.Second
	l, state := policyLab(t)
	srv := echoServer(t, l)
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`policies:
  - name: spread
    members:
      - {line: dsl1, weight: 1}
      - {line: dsl2, weight: 1}
      - {line: dsl3, weight: 1}
rules:
  - name: sticky-web
    dst: %s
    policy: spread
    sticky: %v
`, srv.Addr.Addr(), sticky)}))
	startPolicyAgent(t, l, file)

	// burst opens n flows from c one after the other and checks that
	// each took the line of the one before. Only pairs whose second flow
	// was open less than sticky/2 after the first started are judged: the
	// entry may have expired between slower ones (an emulated guest).
	burst := func(c *lab.Host, n int) int {
		t.Helper()
		d := dial{[]*lab.Host{c}, srv.Addr, 0}
		var lines []int
		var prevStart time.Time
		judged := 0
		for i := range n {
			start := time.Now()
			got := newLines(t, l, d, 1)[0]
			if i > 0 && time.Since(prevStart) < sticky/2 {
				judged++
				if got != lines[i-1] {
					t.Errorf("%s: a new flow left by dsl%d, the one just before by dsl%d (sticky %v)", c.Name, got, lines[i-1], sticky)
				}
			}
			lines = append(lines, got)
			prevStart = start
		}
		if judged < n/2 {
			t.Fatalf("%s: only %d of %d new flows opened within %v of the one before: too slow here to judge stickiness", c.Name, judged, n-1, sticky/2)
		}
		t.Logf("%s: %d new flows in a row: %s", c.Name, n, fmtLines(lines))
		return lines[n-1]
	}

	c1 := l.Clients[0]
	line := burst(c1, 8)
	burst(l.Clients[1], 8) // another source, its own entry
	changed := false
	for try := 1; try <= 20 && !changed; try++ {
		time.Sleep(sticky + sticky/2)
		got := newLines(t, l, dial{[]*lab.Host{c1}, srv.Addr, 0}, 1)[0]
		if got != line {
			t.Logf("after pause %d of %v: c1's new flow left by dsl%d instead of dsl%d", try, sticky+sticky/2, got, line)
			changed = true
			line = got
		}
	}
	if !changed {
		t.Fatalf("after 20 pauses longer than sticky (%v), c1's new flows still all left by dsl%d: the stickiness never expires", sticky, line)
	}
	// The new line sticks in turn (by chance: (1/3)^4 < 0.013).
	if got := burst(c1, 5); got != line {
		t.Errorf("c1's flows after the change left by dsl%d, want dsl%d, the line its first flow after the pause took", got, line)
	}
}

// A reload to rules that send the traffic elsewhere moves no established
// flow: TCP and UDP flows opened under the first rules keep their line and
// NAT source and keep working; new flows follow the new rules.
func TestPolicyReloadMovesNoFlow(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	srv := echoServer(t, l)
	opts := lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`rules:
  - name: web
    dst: %s
    line: dsl1
`, srv.Addr.Addr())}
	file := writeConfig(t, l.Config(opts))
	a := startPolicyAgent(t, l, file)
	d := dial{l.Clients, srv.Addr, 0}

	flows := openFlows(t, l, srv.Addr, 16, true) // 8 TCP, 8 UDP
	for _, f := range flows {
		if n := l.LineOf(f.seen.Addr()); n != 1 {
			t.Errorf("%v left by dsl%d under rule web → dsl1", f, n)
		}
	}
	before := checkPinned(t, l, flows)

	opts.Extra = fmt.Sprintf(`policies:
  - name: elsewhere
    members:
      - {line: dsl3}
rules:
  - name: web
    dst: %s
    policy: elsewhere
`, srv.Addr.Addr())
	a.reload(t, file, l.Config(opts))
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Errorf("after the reload: %d flows broken, %d moved: %v", broken, moved, detail)
	}
	for f, line := range checkPinned(t, l, flows) {
		if line != before[f] {
			t.Errorf("%v re-pinned from line %d to %d by the reload", f, before[f]+1, line+1)
		}
	}
	// The agent has applied the new config: new flows follow it now.
	if lines := newLines(t, l, d, 8); !allOn(lines, 3) {
		t.Errorf("after the reload: new flows left by %s, want all by dsl3 (policy elsewhere)", fmtLines(lines))
	}
	if broken, moved, detail := checkAll(flows); broken+moved > 0 {
		t.Errorf("beside new flows by dsl3: %d flows broken, %d moved: %v", broken, moved, detail)
	}
}

// A rule on a prefix set follows the set's file without a reload: the
// server's address added to the file (written in place) brings its new
// flows under the rule; taken out again (the file replaced by a rename,
// as editors save) frees them.
func TestPolicyPrefixSetFile(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	srv := echoServer(t, l)
	set := filepath.Join(t.TempDir(), "servers.txt")
	const without = "# servers reached by dsl2\n203.0.113.200/32\n\n"
	if err := os.WriteFile(set, []byte(without), 0o600); err != nil {
		t.Fatal(err)
	}
	file := writeConfig(t, l.Config(lab.ConfigOptions{StateDir: state, Extra: fmt.Sprintf(`prefix_sets:
  - name: servers
    file: %s
rules:
  - name: to-servers
    dst_set: servers
    line: dsl2
`, set)}))
	a := startPolicyAgent(t, l, file)
	d := dial{l.Clients, srv.Addr, 0}
	notAllOn2 := func(lines []int) bool { return !allOn(lines, 2) }

	// 12 flows all on dsl2 by chance: (1/3)^12 < 2e-6.
	if lines := newLines(t, l, d, 12); !notAllOn2(lines) {
		t.Errorf("%s not in the set: new flows left by %s, want the balanced policy's spread", srv.Addr.Addr(), fmtLines(lines))
	}

	if err := os.WriteFile(set, []byte(without+srv.Addr.Addr().String()+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	settle(t, a, l, d, 8, "new flows to the server added to the set take dsl2", func(lines []int) bool { return allOn(lines, 2) })

	tmp := set + ".new"
	if err := os.WriteFile(tmp, []byte(without), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, set); err != nil {
		t.Fatal(err)
	}
	settle(t, a, l, d, 12, "new flows to the server taken out of the set spread again", notAllOn2)
}

// Policies keep their ids across a reload that reorders them: a flow
// records its policy's id, and a UDP flow whose line dies moves within
// that policy. Here pa (dsl1, then dsl2) and pb (dsl3) swap places in the
// file; pa's flow on dsl1 must move to dsl2 when dsl1 dies, not to pb's
// dsl3, and `flows` must still name pa.
func TestPolicyReorderKeepsPolicy(t *testing.T) {
	t.Parallel()
	l, state := policyLab(t)
	srv := echoServer(t, l) // 203.0.113.100:7
	pa := "  - name: pa\n    members:\n      - {line: dsl1, metric: 1}\n      - {line: dsl2, metric: 2}\n"
	pb := "  - name: pb\n    members:\n      - {line: dsl3}\n"
	toSrv := fmt.Sprintf("  - name: to-srv\n    dst: %s\n    policy: pa\n", srv.Addr.Addr())
	toOther := fmt.Sprintf("  - name: to-other\n    dst: %s\n    policy: pb\n", l.ServerAddrs[1])
	opts := lab.ConfigOptions{StateDir: state, Extra: "policies:\n" + pa + pb + "rules:\n" + toSrv + toOther}
	file := writeConfig(t, l.Config(opts))
	a := startPolicyAgent(t, l, file)
	u, err := lab.OpenUDPFlow(l.Clients[0], srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	seen, err := u.Query([]byte("a"), emulated(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	if n := l.LineOf(seen.Addr()); n != 1 {
		t.Fatalf("pa's UDP flow leaves by dsl%d, want dsl1", n)
	}
	opts.Extra = "policies:\n" + pb + pa + "rules:\n" + toOther + toSrv
	a.reload(t, file, l.Config(opts))
	if now, err := u.Query([]byte("b"), emulated(2*time.Second)); err != nil || now != seen {
		t.Fatalf("after the reload the flow is seen as %v (%v), want %v", now, err, seen)
	}
	policyOf := func() string {
		for _, line := range strings.Split(strings.TrimSpace(gw(t, l, uplinkd, "flows", "--json", "--proto", "udp", "-c", file)), "\n") {
			var r struct{ Policy, Rule string }
			if err := json.Unmarshal([]byte(line), &r); err != nil {
				t.Fatalf("flows --json line %q: %v", line, err)
			}
			return r.Policy + "/" + r.Rule
		}
		return ""
	}
	if got := policyOf(); got != "pa/to-srv" {
		t.Errorf("after the reload flows names the flow's policy/rule %s, want pa/to-srv", got)
	}
	if err := l.SetGatewaySilent(1, true); err != nil {
		t.Fatal(err)
	}
	a.waitEvent(t, 1, events.LineDown, "dsl1")
	var moved netip.AddrPort
	for i := range 20 {
		if moved, err = u.Query([]byte(fmt.Sprint(i)), time.Second); err == nil {
			break
		}
	}
	if err != nil || l.LineOf(moved.Addr()) != 2 {
		t.Errorf("with dsl1 down pa's UDP flow is seen as %v (%v): dsl%d, want dsl2 (pa's second tier)", moved, err, l.LineOf(moved.Addr()))
	}
}
