// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/test/lab"
)

// demoRates are the lines' capacities in Mbit/s, first line first: the
// weights follow them.
var demoRates = []int{60, 40, 20, 60, 40, 20, 60, 40}

// labDemo is the main job on a built-in default: a lab of lines of
// different capacity, the agent, bulk TCP and short connections on every
// line for the whole demo, one gateway silenced with its carrier up, the
// failover and the recovery timed, and a summary.
func labDemo(args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("lab demo", flag.ContinueOnError)
	isps := fs.Int("isps", 3, "number of ISPs (lines), 2..8")
	short := fs.Bool("short", false, "shorter phases and no plan listing (the test suite runs this)")
	bulk := fs.Int("bulk", 4, "long-lived bulk TCP flows per client, 1..32")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *isps < 2 || *isps > 8 || *bulk < 1 || *bulk > 32 {
		return usageError{errors.New("lab demo: -isps wants 2..8, -bulk 1..32")}
	}
	phase := 5 * time.Second
	if *short {
		phase = 2 * time.Second
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	say := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }

	l, err := lab.New(lab.Options{ISPs: *isps, Clients: 3})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		say("lab %s removed", l.Prefix)
	}()
	weights := make([]int, *isps)
	for i := range weights {
		weights[i] = demoRates[i] / 20
		if err := l.SetRate(i+1, demoRates[i]); err != nil {
			return err
		}
	}
	say("lab %s: 3 clients on %s, a gateway, %d ISPs, a server %s", l.Prefix, l.LANAddress.Masked(), *isps, l.ServerAddrs[0])
	for i, u := range l.Lines {
		say("  line %s on %s: %d Mbit/s each way, weight %d", u.Name, u.Interface, demoRates[i], weights[i])
	}

	dir, err := os.MkdirTemp("", "uplinkd-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfgFile := filepath.Join(dir, "uplinkd.yaml")
	if err := os.WriteFile(cfgFile, []byte(l.Config(lab.ConfigOptions{StateDir: dir, Weights: weights})), 0o600); err != nil {
		return err
	}
	if !*short {
		say("\n$ uplinkd plan -c %s   (in the gateway)", cfgFile)
		out, err := l.Gateway.Run(ctx, exe(), "plan", "-c", cfgFile)
		if err != nil {
			return err
		}
		fmt.Fprint(stdout, indent(out))
	}

	run := l.Gateway.Command(context.Background(), exe(), "run", "-c", cfgFile)
	agentLog, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		return err
	}
	run.Stdout, run.Stderr = agentLog, agentLog
	if err := run.Start(); err != nil {
		return fmt.Errorf("starting the agent: %w", err)
	}
	defer func() {
		_ = run.Process.Signal(syscall.SIGTERM)
		_ = run.Wait()
		if out, derr := l.Gateway.Run(context.Background(), exe(), "down", "-c", cfgFile); derr != nil {
			err = errors.Join(err, derr)
		} else {
			fmt.Fprint(stdout, out)
		}
		say("agent stopped, uplinkd down: the gateway is as before")
		if err != nil {
			log, _ := os.ReadFile(agentLog.Name())
			fmt.Fprintf(stderr, "agent log:\n%s", indent(string(log)))
		}
	}()
	if err := waitAgent(ctx, dir); err != nil {
		return err
	}
	say("\nagent running in %s", l.Gateway.Name)

	srv, err := lab.StartEchoServer(l.Server, l.ServerAddrs[0], 7)
	if err != nil {
		return err
	}
	defer srv.Close()
	tr, err := startTraffic(ctx, l, srv.Addr, *bulk)
	if err != nil {
		return err
	}
	defer tr.stop()
	lineOf := map[netip.Addr]string{}
	for _, u := range l.Lines {
		lineOf[u.Address.Addr()] = u.Name
	}
	say("traffic: %d bulk TCP flows (echoed, so both ways) and short connections from every client, for the whole demo", len(tr.bulk))
	if err := sleep(ctx, phase); err != nil {
		return err
	}

	say("\n$ uplinkd status   (in the gateway)")
	if out, err := l.Gateway.Run(ctx, exe(), "status", "-c", cfgFile); err == nil {
		fmt.Fprint(stdout, indent(out))
	}
	say("$ uplinkd top --once")
	if out, err := l.Gateway.Run(ctx, exe(), "top", "--once", "-c", cfgFile, "--flows", "5"); err == nil {
		fmt.Fprint(stdout, indent(out))
	}

	victim := l.Lines[0]
	say("\n%s: %s's gateway goes silent, its carrier stays up: only the probes can see it", time.Now().Format("15:04:05.000"), victim.Name)
	start := time.Now()
	tr.markFault(true)
	if err := l.SetGatewaySilent(1, true); err != nil {
		return err
	}
	if err := waitLine(ctx, l, victim, false); err != nil {
		return err
	}
	failover := time.Since(start)
	tr.markFault(false)
	say("the agent took %s out of service %v after the fault", victim.Name, failover.Round(time.Millisecond))
	if err := sleep(ctx, phase); err != nil {
		return err
	}
	broken := tr.brokenByLine(lineOf)
	say("established bulk flows broken so far, by line: %v (those of %s get a reset: their path is gone)", broken, victim.Name)

	start = time.Now()
	if err := l.SetGatewaySilent(1, false); err != nil {
		return err
	}
	if err := waitLine(ctx, l, victim, true); err != nil {
		return err
	}
	recovery := time.Since(start)
	say("%s: %s answers again: back in service %v later (after up_after good rounds of probes: new flows only)", time.Now().Format("15:04:05.000"), victim.Name, recovery.Round(time.Millisecond))
	if err := sleep(ctx, phase/2); err != nil {
		return err
	}
	tr.stop()

	var st agent.Status
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	err = ctlsock.CallData(sctx, dir, ctlsock.Request{Cmd: "status"}, &st)
	cancel()
	if err != nil {
		return err
	}
	say("\nsummary")
	tw := tabwriter.NewWriter(stdout, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "  line\tcapacity\tweight\ttx\trx\tflows pinned\tbulk flows\tbroken")
	perLine := tr.bulkByLine(lineOf)
	for i, ln := range st.Lines {
		fmt.Fprintf(tw, "  %s\t%d Mbit/s\t%d\t%s\t%s\t%d\t%d\t%d\n", ln.Name, demoRates[i], ln.WeightConfigured,
			bytesText(ln.TxBytes), bytesText(ln.RxBytes), ln.Flows, perLine[ln.Name], broken[ln.Name])
	}
	tw.Flush()
	ok, failedInFault, failedOutside := tr.shortCounts()
	say("  failover %v, recovery %v; short connections: %d ok, %d failed while the line was being judged, %d failed otherwise",
		failover.Round(time.Millisecond), recovery.Round(time.Millisecond), ok, failedInFault, failedOutside)
	var bad []string
	for _, f := range tr.bulk {
		if name := lineOf[f.seen.Addr()]; name != victim.Name && f.broken.Load() {
			bad = append(bad, fmt.Sprintf("a bulk flow on the healthy line %s broke: %v", name, f.why.Load()))
		}
	}
	if failedOutside > 0 {
		bad = append(bad, fmt.Sprintf("%d short connections failed outside the failover, the first %v", failedOutside, tr.firstFail.Load()))
	}
	if len(bad) > 0 {
		return fmt.Errorf("demo: %v", bad)
	}
	say("  flows on the healthy lines: none broken")
	return nil
}

// waitAgent waits until the agent answers on its control socket.
func waitAgent(ctx context.Context, stateDir string) error {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		c, cancel := context.WithTimeout(ctx, time.Second)
		_, err := ctlsock.Call(c, stateDir, ctlsock.Request{Cmd: "ping"})
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.Join(ctx.Err(), errors.New("the agent did not answer within 30s"))
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-time.After(d):
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// traffic is the demo's load: long bulk flows and a stream of short
// connections from every client.
type traffic struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	bulk   []*bulkFlow
	// The fault's window, UnixNano: from the fault to the agent's action
	// (faultTo 0 while it lasts).
	faultFrom, faultTo atomic.Int64
	ok                 atomic.Int64
	firstFail          atomic.Value // string: the first failure outside a fault
	failIn             atomic.Int64 // failed while a line was being judged
	failOut            atomic.Int64
	once               sync.Once
}

type bulkFlow struct {
	seen    netip.AddrPort
	broken  atomic.Bool
	stalled atomic.Bool
	why     atomic.Value // string: how and when it broke
}

func (f *bulkFlow) fail(what string, err error) {
	if errors.Is(err, os.ErrDeadlineExceeded) {
		// Slow, not broken: a flow starved by the lab's token buckets
		// can wait out a few retransmission timeouts.
		f.stalled.Store(true)
		return
	}
	if !f.broken.Swap(true) {
		f.why.Store(fmt.Sprintf("%s %s at %s: %v", f.seen, what, time.Now().Format("15:04:05.000"), err))
	}
}

func startTraffic(ctx context.Context, l *lab.Lab, dst netip.AddrPort, perClient int) (*traffic, error) {
	ctx, cancel := context.WithCancel(ctx)
	t := &traffic{cancel: cancel}
	for i := range perClient * len(l.Clients) {
		c, seen, err := lab.DialTCP(l.Clients[i%len(l.Clients)], dst, 3*time.Second)
		if err != nil {
			t.stop()
			return nil, err
		}
		f := &bulkFlow{seen: seen}
		t.bulk = append(t.bulk, f)
		t.wg.Add(2)
		go func() { // writer
			defer t.wg.Done()
			defer c.Close()
			buf := make([]byte, 16<<10)
			for ctx.Err() == nil {
				_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
				if _, err := c.Write(buf); err != nil {
					if ctx.Err() != nil {
						return
					}
					f.fail("write", err)
					if !errors.Is(err, os.ErrDeadlineExceeded) {
						return
					}
				}
			}
		}()
		go func() { // reader: the echo
			defer t.wg.Done()
			buf := make([]byte, 64<<10)
			for {
				if _, err := c.Read(buf); err != nil {
					if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
						f.fail("read", err)
					}
					return
				}
			}
		}()
	}
	for _, h := range l.Clients {
		t.wg.Add(1)
		go func() {
			defer t.wg.Done()
			for ctx.Err() == nil {
				began := time.Now()
				c, _, err := lab.DialTCP(h, dst, dialTimeout)
				switch {
				case ctx.Err() != nil:
				case err == nil:
					c.Close()
					t.ok.Add(1)
				case t.duringFault(began):
					t.failIn.Add(1)
				default:
					if t.failOut.Add(1) == 1 {
						t.firstFail.Store(fmt.Sprintf("%s at %s: %v", h.Name, began.Format("15:04:05.000"), err))
					}
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	return t, nil
}

// dialTimeout bounds a short connection: over a line its bulk flows
// saturate, a SYN dropped by the token bucket is sent again after 1 s.
const dialTimeout = 3 * time.Second

// markFault marks the start (on) and the end of a fault's judgement:
// short connections that fail meanwhile, or that began up to a dial
// timeout before it, are the failover's, not a defect.
func (t *traffic) markFault(on bool) {
	if on {
		t.faultTo.Store(0)
		t.faultFrom.Store(time.Now().UnixNano())
		return
	}
	t.faultTo.Store(time.Now().UnixNano())
}

func (t *traffic) duringFault(began time.Time) bool {
	from, to := t.faultFrom.Load(), t.faultTo.Load()
	if from == 0 {
		return false
	}
	b := began.UnixNano()
	return b >= from-int64(dialTimeout) && (to == 0 || b <= to)
}

func (t *traffic) stop() {
	t.once.Do(func() {
		t.cancel()
		t.wg.Wait()
	})
}

func (t *traffic) brokenByLine(lineOf map[netip.Addr]string) map[string]int {
	out := map[string]int{}
	for _, f := range t.bulk {
		if f.broken.Load() {
			out[lineOf[f.seen.Addr()]]++
		}
	}
	return out
}

func (t *traffic) bulkByLine(lineOf map[netip.Addr]string) map[string]int {
	out := map[string]int{}
	for _, f := range t.bulk {
		out[lineOf[f.seen.Addr()]]++
	}
	return out
}

func (t *traffic) shortCounts() (ok, failedInFault, failedOutside int64) {
	return t.ok.Load(), t.failIn.Load(), t.failOut.Load()
}
