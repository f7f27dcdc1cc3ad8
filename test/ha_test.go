// SPDX-License-Identifier: Apache-2.0

package test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"github.com/uplinkd/uplinkd/control/config"
	"net/netip"
	"os"
	osexec "os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	agentpkg "github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/ha"
	"github.com/uplinkd/uplinkd/loader"
	"github.com/uplinkd/uplinkd/test/lab"
)

// haPair is an HA lab with uplinkd, keepalived and (unless a control run
// leaves it out) conntrackd on both gateways.
type haPair struct {
	hl         *lab.HALab
	cfgs       [2]string // uplinkd config files
	dirs       [2]string // what `uplinkd ha configs` wrote, under /run
	agents     [2]*agent
	conntrackd bool
	sysctls    map[string]string // set in both gateways once their agents run
}

type haOptions struct {
	noConntrackd bool
	sysctls      map[string]string // e.g. net/netfilter/nf_conntrack_tcp_loose: 0
	clients      int
	weights      [2][]int // per gateway, per line
}

// newHAPair builds the lab, writes each gateway's config and daemon
// configs, starts both agents and daemons (gw1 first: it becomes master)
// and waits until gw1 is master and gw2 standby. Everything is removed at
// the end of the test.
func newHAPair(t testing.TB, o haOptions) *haPair {
	t.Helper()
	if uplinkd == "" {
		t.Skip("needs root")
	}
	if os.Getenv("UPLINKD_EMULATED_VM") != "" {
		// VRRP adverts every 100 ms between two keepalived daemons: in the
		// kernel matrix's emulated (TCG) guests a late advert makes the
		// backup take over on its own. What the kernel does for a
		// takeover (conntrack recovery) has tests of its own there.
		t.Skip("an HA pair needs real time for VRRP's 100 ms adverts: not in an emulated VM; it runs on the host kernel")
	}
	for _, bin := range []string{"keepalived", "conntrackd"} {
		if _, err := os.Stat("/usr/sbin/" + bin); err != nil {
			t.Skipf("needs %s (make deps)", bin)
		}
	}
	if o.clients == 0 {
		o.clients = 2
	}
	hl, err := lab.NewHA(lab.HAOptions{Clients: o.clients})
	if err != nil {
		t.Fatal(err)
	}
	p := &haPair{hl: hl, conntrackd: !o.noConntrackd, sysctls: o.sysctls}
	t.Cleanup(func() {
		if t.Failed() {
			p.logDaemons(t)
		}
		if err := hl.Close(); err != nil {
			t.Error(err)
		}
	})
	for i, g := range hl.Gateways {
		state := t.TempDir()
		p.cfgs[i] = writeConfig(t, hl.Config(g, lab.HAConfigOptions{StateDir: state, Weights: o.weights[i]}))
		// keepalived's script security refuses scripts under a
		// world-writable directory such as /tmp.
		p.dirs[i] = filepath.Join("/run", "uplinkd-ha-"+g.Name)
		if err := os.Mkdir(p.dirs[i], 0o755); err != nil {
			t.Fatal(err)
		}
		dir := p.dirs[i]
		t.Cleanup(func() { os.RemoveAll(dir) })
		if out, err := hostRun(uplinkd, "ha", "configs", "-c", p.cfgs[i], "-o", dir); err != nil {
			t.Fatalf("uplinkd ha configs: %v\n%s", err, out)
		}
	}
	for i := range hl.Gateways {
		p.startAgent(t, i)
	}
	for i := range hl.Gateways {
		p.startDaemons(t, i)
		if i == 0 {
			p.waitRole(t, 0, "master")
		}
	}
	p.waitRole(t, 1, "standby")
	// Both ready for the VIPs (uplinkd ha check passes): until then each
	// has a lower VRRP priority, and a failure of the other would be met
	// by one that is still starting.
	for i := range hl.Gateways {
		p.waitReady(t, i)
	}
	// keepalived gives the priority back after ha.LinesRise good checks.
	time.Sleep(ha.LinesRise*time.Second + 500*time.Millisecond)
	return p
}

// readyAfter is how long an agent of the pair waits before it may hold
// the VIPs (ha.ReadyAfter of gw1's config).
func (p *haPair) readyAfter() time.Duration {
	c, err := config.Load(p.cfgs[0])
	if err != nil {
		return 5 * time.Second
	}
	return ha.ReadyAfter(c)
}

// waitReady waits until gateway i's agent answers keepalived's track
// script (uplinkd ha check) with ready.
func (p *haPair) waitReady(t testing.TB, i int) {
	t.Helper()
	a := p.agents[i]
	a.waitFor(t, "ready for the VIPs", func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := ctlsock.Call(ctx, a.stateDir, ctlsock.Request{Cmd: "ha-check"})
		return err == nil
	})
}

// hostRun runs a command on the host (not in a lab namespace).
func hostRun(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := osexec.CommandContext(ctx, name, args...).CombinedOutput()
	return string(out), err
}

// tryStatus is status without failing the test.
func (a *agent) tryStatus() (agentpkg.Status, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var st agentpkg.Status
	err := ctlsock.CallData(ctx, a.stateDir, ctlsock.Request{Cmd: "status"}, &st)
	return st, err
}

func (p *haPair) gw(i int) *lab.HAGateway { return p.hl.Gateways[i] }

// startAgent starts gateway i's agent and sets the pair's sysctls.
func (p *haPair) startAgent(t testing.TB, i int) {
	t.Helper()
	p.agents[i] = startAgentIn(t, p.gw(i).Host, p.cfgs[i])
	for k, v := range p.sysctls {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		_, err := p.gw(i).Run(ctx, "sysctl", "-qw", strings.ReplaceAll(k, "/", ".")+"="+v)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
	}
}

// startDaemons starts gateway i's conntrackd (unless left out) and
// keepalived.
func (p *haPair) startDaemons(t testing.TB, i int) {
	t.Helper()
	g, dir := p.gw(i), p.dirs[i]
	if p.conntrackd {
		if _, err := g.StartConntrackd(filepath.Join(dir, ha.ConntrackdConf), ha.ConntrackdLock(p.agents[i].stateDir)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := g.StartKeepalived(filepath.Join(dir, ha.KeepalivedConf), dir); err != nil {
		t.Fatal(err)
	}
}

func (p *haPair) logDaemons(t testing.TB) {
	for _, g := range p.hl.Gateways {
		for _, d := range g.Daemons() {
			t.Logf("%s of %s:\n%s", d.Name, g.Name, d.Log())
		}
	}
}

// role is gateway i's HA role as its agent reports it ("" if it does not
// answer).
func (p *haPair) role(i int) string {
	a := p.agents[i]
	if a == nil {
		return ""
	}
	st, err := a.tryStatus()
	if err != nil || st.HA == nil {
		return ""
	}
	return st.HA.Role
}

// waitRole waits until gateway i's agent reports role.
func (p *haPair) waitRole(t testing.TB, i int, role string) {
	t.Helper()
	p.agents[i].waitFor(t, "in HA role "+role, func() bool { return p.role(i) == role })
}

// hardFail fails gateway i hard (lab.HardFail: links down, every process
// killed) and returns when.
func (p *haPair) hardFail(t testing.TB, i int) time.Time {
	t.Helper()
	at, err := p.hl.HardFail(p.gw(i))
	if err != nil {
		t.Fatal(err)
	}
	<-p.agents[i].done // reaped: its cleanup finds it gone
	p.agents[i] = nil
	return at
}

// revive brings a hard-failed gateway back as after a reboot: none of the
// agent's kernel state left (uplinkd down), links up, then the agent, and
// the daemons.
func (p *haPair) revive(t testing.TB, i int) {
	t.Helper()
	g := p.gw(i)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if out, err := g.Run(ctx, uplinkd, "down", "-c", p.cfgs[i]); err != nil {
		t.Fatalf("uplinkd down: %v\n%s", err, out)
	}
	if err := g.Revive(); err != nil {
		t.Fatal(err)
	}
	p.startAgent(t, i)
	p.startDaemons(t, i)
}

// haFlow is a long flow through the pair; serverFirst ones are checked by
// the server speaking first.
type haFlow struct {
	*flow
	serverFirst bool
	n           int // round, for unique payloads
}

func (f *haFlow) String() string {
	who := "client"
	if f.serverFirst {
		who = "server"
	}
	return fmt.Sprintf("%v (%s first)", f.flow, who)
}

// haEchoServer starts the pair's echo server on the server's first
// address, port 7, until the test ends.
func haEchoServer(tb testing.TB, p *haPair) *lab.EchoServer {
	tb.Helper()
	srv, err := lab.StartEchoServer(p.hl.Server, p.hl.ServerAddrs[0], 7)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { srv.Close() })
	return srv
}

// openHAFlows opens tcp TCP and udp UDP flows to srv from the pair's
// clients, alternately; every other one of each kind is server-first.
func openHAFlows(t testing.TB, p *haPair, srv *lab.EchoServer, tcp, udp int) []*haFlow {
	t.Helper()
	var fs []*haFlow
	t.Cleanup(func() {
		for _, f := range fs {
			f.close()
		}
	})
	clients := p.hl.Clients
	for i := range tcp + udp {
		f := &haFlow{flow: &flow{client: clients[i%len(clients)]}}
		var err error
		if i < tcp {
			f.serverFirst = i%2 == 1
			f.tcp, f.seen, err = lab.DialTCP(f.client, srv.Addr, 2*time.Second)
			if err == nil {
				f.rd = bufio.NewReader(f.tcp)
			}
		} else {
			f.serverFirst = (i-tcp)%2 == 1
			if f.udp, err = lab.OpenUDPFlow(f.client, srv.Addr); err == nil {
				f.seen, err = f.udp.Query([]byte("hello"), 2*time.Second)
			}
		}
		if err != nil {
			t.Fatalf("flow %d: %v", i, err)
		}
		fs = append(fs, f)
	}
	return fs
}

// haTraffic starts the pair's echo server, opens tcp TCP and udp UDP long
// flows through the master (openHAFlows) and a UDP probe flow, all closed
// when the test ends, and checks that the flows use every line.
func haTraffic(tb testing.TB, p *haPair, tcp, udp int) (*lab.EchoServer, []*haFlow, *lab.UDPFlow) {
	tb.Helper()
	srv := haEchoServer(tb, p)
	fs := openHAFlows(tb, p, srv, tcp, udp)
	probe, err := lab.OpenUDPFlow(p.hl.Clients[0], srv.Addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { probe.Close() })
	checkNATSources(tb, p, fs)
	return srv, fs, probe
}

// push has the server speak first on the server-first TCP flows (their
// client reads it in check).
func pushTCP(t testing.TB, srv *lab.EchoServer, fs []*haFlow) {
	t.Helper()
	for _, f := range fs {
		if f.tcp != nil && f.serverFirst {
			f.n++
			if err := srv.Push(f.seen, []byte(fmt.Sprintf("push %d\n", f.n))); err != nil {
				t.Errorf("%v: %v", f, err)
			}
		}
	}
}

// check makes one exchange on the flow, the server first for server-first
// flows (for TCP its push must have been made with pushTCP). TCP gets
// timeout for the whole exchange (retransmissions included); UDP gets up
// to 3 tries of a second.
func (f *haFlow) check(srv *lab.EchoServer, timeout time.Duration) error {
	if f.tcp != nil {
		_ = f.tcp.SetDeadline(time.Now().Add(timeout))
		if f.serverFirst {
			want := fmt.Sprintf("push %d\n", f.n)
			if line, err := f.rd.ReadString('\n'); err != nil || line != want {
				return fmt.Errorf("%w: waiting for the server's %q: read %q, %v", errBroken, strings.TrimSpace(want), line, err)
			}
		}
		if _, err := f.tcp.Write([]byte("ping\n")); err != nil {
			return fmt.Errorf("%w: %v", errBroken, err)
		}
		if line, err := f.rd.ReadString('\n'); err != nil || line != "ping\n" {
			return fmt.Errorf("%w: read %q, %v", errBroken, line, err)
		}
		return nil
	}
	var lastErr error
	for try := 0; try < 3; try++ {
		f.n++
		payload := []byte(fmt.Sprintf("round %d", f.n))
		var seen netip.AddrPort
		var err error
		if f.serverFirst {
			if err = srv.PushUDP(f.seen, payload); err == nil {
				seen, err = f.udp.Receive(payload, time.Second)
			}
		}
		if err == nil && (!f.serverFirst || seen == f.seen) {
			// Then the client: the gateway's datapath pins flows on
			// what the LAN sends.
			seen, err = f.udp.Query(payload, time.Second)
		}
		if err == nil {
			if seen != f.seen {
				return fmt.Errorf("%w: now seen as %s", errMoved, seen)
			}
			return nil
		}
		lastErr = err
	}
	return fmt.Errorf("%w: %v", errBroken, lastErr)
}

// checkHAFlows checks every flow (concurrently: a broken one takes its
// whole timeout) and counts the broken and moved ones.
func checkHAFlows(srv *lab.EchoServer, fs []*haFlow, timeout time.Duration) (broken, moved int, detail []string) {
	errs := make([]error, len(fs))
	done := make(chan struct{})
	for i, f := range fs {
		go func() {
			errs[i] = f.check(srv, timeout)
			done <- struct{}{}
		}()
	}
	for range fs {
		<-done
	}
	for i, err := range errs {
		switch {
		case err == nil:
			continue
		case errors.Is(err, errBroken):
			broken++
		case errors.Is(err, errMoved):
			moved++
		}
		detail = append(detail, fmt.Sprintf("%v: %v", fs[i], err))
	}
	return broken, moved, detail
}

// lineOfVIP is the index of the line whose VIP addr is, -1 if none.
func lineOfVIP(hl *lab.HALab, addr netip.Addr) int {
	for i, u := range hl.Lines {
		if u.VIP.Addr() == addr {
			return i
		}
	}
	return -1
}

// checkHAPins asserts that gateway i's flow table has every flow on the
// line whose VIP the server sees it from, with that VIP as its NAT source;
// recovered says the line must have come from conntrack (the flows were
// synced to this gateway, not started through it). It returns the flows'
// entries.
func checkHAPins(t testing.TB, p *haPair, i int, fs []*haFlow, recovered bool) map[*haFlow]loader.Flow {
	t.Helper()
	dp, err := loader.Load(loader.Options{PinDir: p.gw(i).PinDir(), FlowEntries: 1 << 16})
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	table := map[flowID]loader.Flow{}
	if err := dp.Flows(func(f loader.Flow) bool { table[flowID{f.Proto, f.Src}] = f; return true }); err != nil {
		t.Fatal(err)
	}
	out := map[*haFlow]loader.Flow{}
	wrong := 0
	for _, f := range fs {
		pin, ok := table[f.id()]
		want := lineOfVIP(p.hl, f.seen.Addr())
		switch {
		case !ok:
			t.Errorf("%s: %v is not in the flow table", p.gw(i).Name, f)
		case pin.Line != want:
			t.Errorf("%s: %v is pinned to line %d, its NAT source is line %d's VIP", p.gw(i).Name, f, pin.Line, want)
		case pin.NATAddr.IsValid() && pin.NATAddr != f.seen.Addr():
			t.Errorf("%s: %v has NAT source %s in the flow table", p.gw(i).Name, f, pin.NATAddr)
		case recovered && !pin.Recovered:
			t.Errorf("%s: %v was not recovered from conntrack: %+v", p.gw(i).Name, f, pin)
		default:
			out[f] = pin
			continue
		}
		wrong++
	}
	if wrong == 0 {
		t.Logf("%s: all %d flows pinned to the line of their VIP (recovered from conntrack: %v)", p.gw(i).Name, len(fs), recovered)
	}
	return out
}

// checkCounting makes another exchange on every flow and asserts that
// gateway i's counters of each grew both ways.
func checkCounting(t testing.TB, p *haPair, srv *lab.EchoServer, fs []*haFlow, i int, before map[*haFlow]loader.Flow) {
	t.Helper()
	pushTCP(t, srv, fs)
	if broken, moved, detail := checkHAFlows(srv, fs, 5*time.Second); broken+moved > 0 {
		t.Errorf("%d broken, %d moved: %v", broken, moved, detail)
	}
	after := checkHAPins(t, p, i, fs, false)
	stuck := 0
	for f, b := range before {
		a, ok := after[f]
		if ok && (a.TxPackets <= b.TxPackets || a.RxPackets <= b.RxPackets) {
			t.Errorf("%s: %v: counters did not grow: tx %d→%d rx %d→%d", p.gw(i).Name, f, b.TxPackets, a.TxPackets, b.RxPackets, a.RxPackets)
			stuck++
		}
	}
	if stuck == 0 {
		t.Logf("%s: the counters of all %d flows grew both ways", p.gw(i).Name, len(before))
	}
}

// haTakeover is what one takeover measured.
type haTakeover struct {
	role          time.Duration // from the failure until the new master's agent says master
	answer        time.Duration // from the failure until a probe flow is answered
	broken, moved int
	detail        []string
}

// takeover fails gateway from hard and waits until gateway to is master:
// the server speaks first on the server-first TCP flows right away (its
// segments arrive while the VIPs move), a probe flow asks until answered,
// then every flow is checked.
func takeover(t testing.TB, p *haPair, srv *lab.EchoServer, fs []*haFlow, probe *lab.UDPFlow, from, to int) haTakeover {
	t.Helper()
	var r haTakeover
	answered := make(chan time.Time, 1)
	at := p.hardFail(t, from)
	pushTCP(t, srv, fs)
	// The client-first UDP flows keep talking through the takeover, a
	// datagram every 10 ms (voice, games): theirs reach the new master
	// while the VIPs move, before and after its notify script ran. Their
	// echoes are skipped by the checks' queries.
	chatting := make(chan struct{})
	var chatters sync.WaitGroup
	for _, f := range fs {
		if f.udp == nil || f.serverFirst {
			continue
		}
		chatters.Add(1)
		go func() {
			defer chatters.Done()
			for {
				select {
				case <-chatting:
					return
				case <-time.After(10 * time.Millisecond):
					_, _ = f.udp.Conn.Write([]byte("chat"))
				}
			}
		}()
	}
	defer func() {
		close(chatting)
		chatters.Wait()
	}()
	go func() {
		for time.Since(at) < agentWait {
			select {
			case <-chatting: // takeover returned (or failed the test)
				answered <- time.Time{}
				return
			default:
			}
			if _, err := probe.Query([]byte(fmt.Sprint("probe ", time.Now().UnixNano())), 20*time.Millisecond); err == nil {
				answered <- time.Now()
				return
			}
		}
		answered <- time.Time{}
	}()
	p.agents[to].waitFor(t, "master", func() bool { return p.role(to) == "master" })
	r.role = time.Since(at)
	time.Sleep(200 * time.Millisecond) // chat on past the notify script
	if a := <-answered; !a.IsZero() {
		r.answer = a.Sub(at)
	}
	r.broken, r.moved, r.detail = checkHAFlows(srv, fs, 10*time.Second)
	return r
}

// checkNATSources asserts that every flow is NAT'd to a line's VIP and
// that both lines carry flows.
func checkNATSources(t testing.TB, p *haPair, fs []*haFlow) {
	t.Helper()
	per := map[int]int{}
	for _, f := range fs {
		n := lineOfVIP(p.hl, f.seen.Addr())
		if n < 0 {
			t.Errorf("%v: NAT source is no line's VIP", f)
		}
		per[n]++
	}
	if len(per) != len(p.hl.Lines) {
		t.Fatalf("flows by line: %v, want flows on all %d lines", per, len(p.hl.Lines))
	}
	t.Logf("flows by line: %v", per)
}

// An HA pair of gateways (keepalived moving the VIPs, conntrackd syncing
// the connections, uplinkd on both) carries 40 long TCP connections (half
// with the server speaking first) and 20 UDP flows (likewise) over both
// lines through gw1, the master. gw1 fails hard (links down, every process
// killed): gw2 takes over with none of them broken, each still reaching
// the server from the same NAT source (its line's VIP), its flow table
// holding each on that line. gw1 comes back and preempts: the same. With
// tcp_loose=0 too; and a control run without conntrackd, where flows must
// break, shows that the test can fail.
func TestHATakeover(t *testing.T) {
	for _, tc := range []struct {
		name       string
		o          haOptions
		wantBroken bool
	}{
		{"conntrackd", haOptions{}, false},
		{"tcp_loose=0", haOptions{sysctls: map[string]string{"net/netfilter/nf_conntrack_tcp_loose": "0"}}, false},
		// The datapath's buckets differ between the gateways (weights
		// here; adaptive weights or a late line do it too): a flow may
		// not be given its line again by the hash, only by conntrack.
		{"weights-differ", haOptions{weights: [2][]int{{1, 1}, {1, 4}}}, false},
		{"control-without-conntrackd", haOptions{noConntrackd: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newHAPair(t, tc.o)
			srv, fs, probe := haTraffic(t, p, 40, 20)
			pushTCP(t, srv, fs)
			if broken, moved, detail := checkHAFlows(srv, fs, 5*time.Second); broken+moved > 0 {
				t.Fatalf("before any failure: %d broken, %d moved: %v", broken, moved, detail)
			}
			checkHAPins(t, p, 0, fs, false)
			if _, err := probe.Query([]byte("hello"), 2*time.Second); err != nil {
				t.Fatal(err)
			}
			// Every source the server has seen: a flow that reached it
			// from another (re-NAT'd) would be a new one.
			peers := srv.Peers()
			samePeers := func(what string) {
				t.Helper()
				if now := srv.Peers(); !slices.Equal(now, peers) {
					t.Errorf("%s: the server saw new sources: %v, before %v", what, now, peers)
				}
			}

			r := takeover(t, p, srv, fs, probe, 0, 1)
			t.Logf("takeover by gw2: master after %v, probe answered after %v; %d/%d flows broken, %d moved",
				r.role.Round(time.Millisecond), r.answer.Round(time.Millisecond), r.broken, len(fs), r.moved)
			if tc.wantBroken {
				if r.broken+r.moved == 0 {
					t.Fatalf("without conntrackd no flow broke: the test cannot tell a working takeover from a broken one")
				}
				t.Logf("control run: as expected, flows broke: %v", r.detail)
				return
			}
			if r.broken+r.moved > 0 {
				t.Errorf("takeover: %d broken, %d moved: %v", r.broken, r.moved, r.detail)
				p.dumpConntrack(t, 1)
			}
			newMaster := func(what string, gw int) {
				samePeers(what)
				// keepalived's notify script told the new master's agent.
				p.agents[gw].waitFor(t, "notified master", func() bool {
					st, err := p.agents[gw].tryStatus()
					return err == nil && st.HA != nil && st.HA.Notified == "master"
				})
				checkCounting(t, p, srv, fs, gw, checkHAPins(t, p, gw, fs, true))
				name := fmt.Sprintf("gw%d", gw+1)
				if st := p.agents[gw].status(t); st.HA == nil || st.HA.Takeovers < 1 {
					t.Errorf("%s's status after the %s: %+v, want ha.takeovers >= 1", name, what, st.HA)
				} else {
					logHA(t, name, st)
				}
			}
			newMaster("takeover", 1)

			// Fail-back: gw1 comes back and preempts (priority 150).
			start := time.Now()
			p.revive(t, 0)
			pushTCP(t, srv, fs)
			p.waitRole(t, 0, "master")
			back := time.Since(start)
			p.waitRole(t, 1, "standby")
			broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second)
			t.Logf("fail-back to gw1: master %v after its start; %d/%d flows broken, %d moved",
				back.Round(time.Millisecond), broken, len(fs), moved)
			if broken+moved > 0 {
				t.Errorf("fail-back: %d broken, %d moved: %v", broken, moved, detail)
				p.dumpConntrack(t, 0)
			}
			newMaster("fail-back", 0)
			for _, l := range p.agents[1].status(t).Lines {
				if !l.Usable || l.Health != "up" {
					t.Errorf("gw2, standby again: line %s is not usable and up: %+v", l.Name, l)
				}
			}
		})
	}
}

// dumpConntrack logs gateway i's conntrack table.
func (p *haPair) dumpConntrack(t testing.TB, i int) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	out, err := p.gw(i).Run(ctx, "conntrack", "-L")
	t.Logf("conntrack table of %s (%v):\n%s", p.gw(i).Name, err, out)
}

// BenchmarkHATakeover times takeovers in the HA lab: gw1, the master,
// fails hard (lab.HardFail) while 40 TCP and 20 UDP flows run through it;
// from the moment its links go down until gw2's agent reports master
// (takeover-ms) and until a UDP probe flow asking every 20 ms is answered
// (answer-ms), and the flows broken or moved by the takeover and by the
// fail-back that follows each (gw1 back, it preempts). Medians and maxima
// of 10 trials. Run with -benchtime=1x.
func BenchmarkHATakeover(b *testing.B) {
	const trials = 10
	p := newHAPair(b, haOptions{})
	srv, fs, probe := haTraffic(b, p, 40, 20)

	var role, answer []time.Duration
	broken, failback := 0, 0
	for range b.N * trials {
		r := takeover(b, p, srv, fs, probe, 0, 1)
		role, answer = append(role, r.role), append(answer, r.answer)
		broken += r.broken + r.moved
		if r.broken+r.moved > 0 {
			b.Logf("takeover: %d broken, %d moved: %v", r.broken, r.moved, r.detail)
		}
		p.revive(b, 0)
		pushTCP(b, srv, fs)
		p.waitRole(b, 0, "master")
		p.waitRole(b, 1, "standby")
		fb, fm, detail := checkHAFlows(srv, fs, 10*time.Second)
		failback += fb + fm
		if fb+fm > 0 {
			b.Logf("fail-back: %d broken, %d moved: %v", fb, fm, detail)
		}
	}
	slices.Sort(role)
	slices.Sort(answer)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	b.ReportMetric(0, "ns/op")
	b.ReportMetric(ms(role[len(role)/2]), "takeover-median-ms")
	b.ReportMetric(ms(role[len(role)-1]), "takeover-max-ms")
	b.ReportMetric(ms(answer[len(answer)/2]), "answer-median-ms")
	b.ReportMetric(ms(answer[len(answer)-1]), "answer-max-ms")
	b.ReportMetric(float64(broken), "flows-broken")
	b.ReportMetric(float64(failback), "failback-flows-broken")
	b.ReportMetric(float64(len(role)), "trials")
	b.ReportMetric(float64(len(fs)), "flows")
}

// logHA logs a gateway's HA status: its takeovers, and when keepalived's
// notify script told the agent (after conntrackd's commit) compared with
// when the agent saw the VIP.
func logHA(t testing.TB, name string, st agentpkg.Status) {
	t.Helper()
	h := st.HA
	gap := "no notify"
	if h.LastTakeover != nil && h.NotifiedAt != nil {
		gap = fmt.Sprintf("notify %q %v after the VIP", h.Notified, h.NotifiedAt.Sub(*h.LastTakeover).Round(time.Millisecond))
	}
	t.Logf("%s: role %s, takeovers %d, applied in %.1f ms, %s", name, h.Role, h.Takeovers, 1000*h.TakeoverApplySeconds, gap)
}

// The master loses one line's link (its cable, not the line: the ISP is
// still there for the standby): keepalived on it goes to FAULT and the
// standby takes over every VIP; no flow breaks, those of that line
// included. The link comes back: the master preempts again, and its agent
// has reinstalled the line's routes (a link going down deletes them), so
// again no flow breaks. gw1's agent ran all along: its pins went when it
// became standby (stale once the peer forwards), and every flow's line
// was recovered from the conntrack entries gw2 synced back.
func TestHALineLinkDown(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv := haEchoServer(t, p)
	fs := openHAFlows(t, p, srv, 40, 20)
	checkNATSources(t, p, fs)
	peers := srv.Peers()
	g1 := p.gw(0)
	wan := g1.Lines[0].Interface

	start := time.Now()
	if err := g1.SetLink(wan, false); err != nil {
		t.Fatal(err)
	}
	pushTCP(t, srv, fs)
	p.waitRole(t, 1, "master")
	t.Logf("gw1's %s down: gw2 master after %v", wan, time.Since(start).Round(time.Millisecond))
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("gw1's %s down, gw2 master: %d broken, %d moved: %v", wan, broken, moved, detail)
		p.dumpConntrack(t, 1)
	}

	start = time.Now()
	if err := g1.SetLink(wan, true); err != nil {
		t.Fatal(err)
	}
	pushTCP(t, srv, fs)
	p.waitRole(t, 0, "master")
	p.waitRole(t, 1, "standby")
	t.Logf("gw1's %s up: gw1 master again after %v", wan, time.Since(start).Round(time.Millisecond))
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("gw1's %s up, gw1 master again: %d broken, %d moved: %v", wan, broken, moved, detail)
		p.dumpConntrack(t, 0)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		out, _ := g1.Run(ctx, "ip", "route", "show", "table", "all")
		t.Logf("routes of gw1:\n%s", out)
	}
	if now := srv.Peers(); !slices.Equal(now, peers) {
		t.Errorf("the server saw new sources: %v, before %v", now, peers)
	}
	checkHAPins(t, p, 0, fs, true)
}

// The standby's agent takes a line down and back up (the operator's
// `uplinkd line down`; a health failure does the same) while the master
// carries the flows: the standby holds the master's connections for a
// takeover, and taking its line down must not lose them. Then the master
// fails: no flow breaks.
func TestHAStandbyLineDown(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv, fs, probe := haTraffic(t, p, 40, 20)
	g2, line := p.gw(1), p.hl.Lines[0].Name
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, cmd := range []string{"down", "up"} {
		if out, err := g2.Run(ctx, uplinkd, "line", cmd, line, "-c", p.cfgs[1]); err != nil {
			t.Fatalf("uplinkd line %s %s on gw2: %v\n%s", cmd, line, err, out)
		}
	}
	p.agents[1].waitFor(t, line+" up again on gw2", func() bool {
		st, err := p.agents[1].tryStatus()
		if err != nil {
			return false
		}
		for _, l := range st.Lines {
			if l.Name == line {
				return l.Usable
			}
		}
		return false
	})
	for _, e := range p.agents[1].events() {
		if e.Kind == events.ConntrackFlush {
			t.Logf("gw2: %s %s %v", e.Line, e.Msg, e.Fields)
		}
	}
	pushTCP(t, srv, fs)
	if broken, moved, detail := checkHAFlows(srv, fs, 5*time.Second); broken+moved > 0 {
		t.Fatalf("through gw1, after gw2's line went down and up: %d broken, %d moved: %v", broken, moved, detail)
	}
	r := takeover(t, p, srv, fs, probe, 0, 1)
	t.Logf("takeover by gw2: master after %v; %d/%d flows broken, %d moved", r.role.Round(time.Millisecond), r.broken, len(fs), r.moved)
	if r.broken+r.moved > 0 {
		t.Errorf("takeover after gw2's line went down and up: %d broken, %d moved: %v", r.broken, r.moved, r.detail)
	}
	checkHAPins(t, p, 1, fs, true)
}

// The master's agent dies (kill -9) while keepalived and conntrackd run
// on: its track script (uplinkd ha check) fails, keepalived faults and
// the standby takes over, with every flow. A restarted agent brings the
// gateway back as standby, and then master again once it is ready.
func TestHAAgentDeathHandsOver(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv := haEchoServer(t, p)
	fs := openHAFlows(t, p, srv, 20, 10)
	checkNATSources(t, p, fs)
	start := time.Now()
	p.agents[0].kill9(t)
	p.waitRole(t, 1, "master")
	t.Logf("gw1's agent killed: gw2 master after %v", time.Since(start).Round(time.Millisecond))
	pushTCP(t, srv, fs)
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("after gw1's agent died: %d broken, %d moved: %v", broken, moved, detail)
	}
	p.startAgent(t, 0)
	p.waitRole(t, 0, "master")
	p.waitRole(t, 1, "standby")
	pushTCP(t, srv, fs)
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("after gw1's agent came back: %d broken, %d moved: %v", broken, moved, detail)
	}
}

// Long, steady UDP flows (a VPN, a call) outlive conntrack's UDP stream
// timeout on the standby: the master's kernel refreshes its entries with
// every packet, but conntrack sends no event for a refresh, so conntrackd
// has nothing to sync and the standby's copies would expire while the
// flows still run. Here the stream timeout is 6 s on both gateways and the
// flows talk every 200 ms for 3 timeouts; then the master fails hard: none
// of them may break or move. The master's agent has conntrackd resync
// every third of the timeout, which keeps the standby's copies fresh.
// The gateways' weights differ, so that a flow whose copy expired would
// not even be given its line again by the hash.
func TestHALongUDPFlows(t *testing.T) {
	const streamTimeout = 6 * time.Second
	p := newHAPair(t, haOptions{
		sysctls: map[string]string{"net/netfilter/nf_conntrack_udp_timeout_stream": fmt.Sprint(int(streamTimeout.Seconds()))},
		weights: [2][]int{{1, 1}, {1, 4}},
	})
	srv, fs, probe := haTraffic(t, p, 0, 20)
	for _, f := range fs {
		_ = f.udp.Conn.SetDeadline(time.Time{}) // Query's
	}
	for end := time.Now().Add(3 * streamTimeout); time.Now().Before(end); {
		for _, f := range fs {
			if _, err := f.udp.Conn.Write([]byte("chat")); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
	if broken, moved, detail := checkHAFlows(srv, fs, 5*time.Second); broken+moved > 0 {
		t.Fatalf("before any failure: %d broken, %d moved: %v", broken, moved, detail)
	}
	st := p.agents[0].status(t).HA
	if st == nil || st.ResyncEverySeconds != streamTimeout.Seconds()/3 || st.Resyncs < 5 || st.ResyncErrors > 0 {
		t.Fatalf("gw1's conntrackd resyncs after %v: %+v, want one every %v, at least 5, no error", 3*streamTimeout, st, streamTimeout/3)
	}
	t.Logf("gw1 (master) had conntrackd resync %d times, every %vs", st.Resyncs, st.ResyncEverySeconds)
	if p2 := p.agents[1].status(t).HA; p2 == nil || p2.Resyncs+p2.ResyncErrors > 0 {
		t.Errorf("gw2 (standby) resynced: %+v", p2)
	}
	r := takeover(t, p, srv, fs, probe, 0, 1)
	t.Logf("takeover by gw2 after %v of steady UDP: master after %v; %d/%d flows broken, %d moved",
		3*streamTimeout, r.role.Round(time.Millisecond), r.broken, len(fs), r.moved)
	if r.broken+r.moved > 0 {
		t.Errorf("takeover: %d broken, %d moved: %v", r.broken, r.moved, r.detail)
		p.dumpConntrack(t, 1)
	}
}

// Someone removes a line's VIP on the master: its check (uplinkd ha check
// -lines) fails, the peer takes over, and the gateway takes every VIP back
// once its check passes again (keepalived adds them all). The VIP is back
// and no flow breaks, those of that line included.
func TestHAVIPRemovedByOthers(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv, fs, _ := haTraffic(t, p, 20, 10)
	g1, line := p.gw(0), p.hl.Lines[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	hasVIP := func() bool {
		out, err := g1.Run(ctx, "ip", "-br", "addr", "show", "dev", g1.Lines[0].Interface)
		return err == nil && strings.Contains(out, line.VIP.String())
	}
	if out, err := g1.Run(ctx, "ip", "addr", "del", line.VIP.String(), "dev", g1.Lines[0].Interface); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	start := time.Now()
	pushTCP(t, srv, fs)
	p.agents[0].waitFor(t, line.Name+"'s VIP back on gw1", hasVIP)
	p.waitRole(t, 0, "master")
	p.waitRole(t, 1, "standby")
	t.Logf("%s's VIP back on gw1, master, after %v; gw2 took over %d times meanwhile",
		line.Name, time.Since(start).Round(time.Millisecond), p.agents[1].status(t).HA.Takeovers)
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("%d broken, %d moved: %v", broken, moved, detail)
	}
}

// A line's link goes down on both gateways (the line's switch died): the
// master stays master (a fault on a line's link would leave the whole
// site without a gateway), and the other line's flows go on.
func TestHALineLinkDownOnBoth(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv, fs, _ := haTraffic(t, p, 20, 10)
	for i := range p.hl.Gateways {
		g := p.gw(i)
		if err := g.SetLink(g.Lines[0].Interface, false); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(4 * time.Second) // both checks fail within 2 s: a fault or a handover would have shown
	if r0, r1 := p.role(0), p.role(1); r0 != "master" || r1 != "standby" {
		t.Fatalf("with %s's link down on both gateways: gw1 %q, gw2 %q; want gw1 master, gw2 standby", p.hl.Lines[0].Name, r0, r1)
	}
	if n := p.agents[1].status(t).HA.Takeovers; n != 0 {
		t.Errorf("gw2 took over %d times meanwhile, want 0", n)
	}
	var other []*haFlow
	for _, f := range fs {
		if lineOfVIP(p.hl, f.seen.Addr()) == 1 {
			other = append(other, f)
		}
	}
	pushTCP(t, srv, other)
	if broken, moved, detail := checkHAFlows(srv, other, 10*time.Second); broken+moved > 0 {
		t.Errorf("%s's flows with the other line's link down on both: %d broken, %d moved: %v", p.hl.Lines[1].Name, broken, moved, detail)
	}
	t.Logf("gw1 stayed master; %d flows of %s unbroken", len(other), p.hl.Lines[1].Name)
}

// The master's agent restarts (an upgrade): it finds itself master and is
// ready at once, so the VIPs stay (its track script would otherwise fail
// for the first seconds and hand them to the peer and back). No flow
// breaks.
func TestHAMasterAgentRestart(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv, fs, _ := haTraffic(t, p, 20, 10)
	p.agents[0].stop(t)
	p.startAgent(t, 0)
	p.waitRole(t, 0, "master")
	time.Sleep(p.readyAfter() + 2*time.Second) // past its start: any handover would have come
	if st := p.agents[1].status(t).HA; st.Takeovers != 0 || st.Role != "standby" {
		t.Errorf("gw1's agent restarted: gw2 %s with %d takeovers, want standby, 0", st.Role, st.Takeovers)
	}
	pushTCP(t, srv, fs)
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("%d broken, %d moved: %v", broken, moved, detail)
	}
}

// The master's line goes down by its probes while the line works for the
// peer (ISP 1 drops gw1's own line address, not the VIP): gw1's check
// fails, gw2 takes over, and gw1 keeps the VIP's connections (a flush
// would reach gw2 through conntrackd): no flow breaks, those of that line
// included.
func TestHAMasterLineDownByProbes(t *testing.T) {
	p := newHAPair(t, haOptions{})
	srv, fs, _ := haTraffic(t, p, 20, 10)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	isp, own := p.hl.ISPs[0], p.gw(0).Lines[0].Address.Addr().String()
	for _, cmd := range [][]string{
		{"add", "table", "inet", "haprobe"},
		{"add", "chain", "inet", "haprobe", "hin", "{ type filter hook input priority 0; }"},
		{"add", "chain", "inet", "haprobe", "hfwd", "{ type filter hook forward priority 0; }"},
		{"add", "rule", "inet", "haprobe", "hin", "ip", "saddr", own, "drop"},
		{"add", "rule", "inet", "haprobe", "hfwd", "ip", "saddr", own, "drop"},
		{"add", "rule", "inet", "haprobe", "hfwd", "ip", "daddr", own, "drop"},
	} {
		if out, err := isp.Run(ctx, "nft", cmd...); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
	}
	start := time.Now()
	pushTCP(t, srv, fs)
	p.waitRole(t, 1, "master")
	t.Logf("gw1's %s down by its probes: gw2 master after %v", p.hl.Lines[0].Name, time.Since(start).Round(time.Millisecond))
	if broken, moved, detail := checkHAFlows(srv, fs, 10*time.Second); broken+moved > 0 {
		t.Errorf("%d broken, %d moved: %v", broken, moved, detail)
		p.dumpConntrack(t, 1)
	}
	if n := p.agents[0].countEvents(events.ConntrackFlush, p.hl.Lines[0].Name, "address="+p.hl.Lines[0].VIP.Addr().String()); n > 0 {
		t.Errorf("gw1 flushed %s's VIP %d times", p.hl.Lines[0].Name, n)
	}
}
