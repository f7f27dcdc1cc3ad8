// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/uplinkd/uplinkd/test/lab"
)

const labUsage = `Usage:
  uplinkd lab up [-isps N] [-clients N] [-prefix P]   build a lab; prints its prefix and writes an uplinkd config for it
  uplinkd lab down -prefix P                          remove a lab
  uplinkd lab exec -prefix P HOST -- CMD [ARGS...]    run a command in a lab host (gw, sw, srv, cN, ispN)
  uplinkd lab demo [-isps N] [-flows N]               build a lab, run the agent, show traffic over every line,
                                                      kill a line, show the failover, clean up
`

func cmdLab(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, labUsage)
		return usageError{errors.New("lab: no subcommand")}
	}
	switch args[0] {
	case "up":
		return labUp(args[1:], stdout, stderr)
	case "down":
		return labDown(args[1:], stderr)
	case "exec":
		return labExec(args[1:], stdout, stderr)
	case "demo":
		return labDemo(args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, labUsage)
		return nil
	}
	fmt.Fprint(stderr, labUsage)
	return usageError{fmt.Errorf("lab: unknown subcommand %q", args[0])}
}

// labStateDir holds the configs and agent state of labs built by `lab up`.
const labStateDir = "/run/uplinkd-lab"

func labUp(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lab up", flag.ContinueOnError)
	isps := fs.Int("isps", 2, "number of ISPs (lines), 1..8")
	clients := fs.Int("clients", 1, "number of LAN clients, 1..16")
	prefix := fs.String("prefix", "", "namespace name prefix (default: random)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	l, err := lab.New(lab.Options{Prefix: *prefix, ISPs: *isps, Clients: *clients})
	if err != nil {
		return err
	}
	dir := filepath.Join(labStateDir, l.Prefix)
	file := filepath.Join(dir, "uplinkd.yaml")
	if err := os.MkdirAll(dir, 0o700); err == nil {
		err = os.WriteFile(file, []byte(l.Config(lab.ConfigOptions{StateDir: dir})), 0o600)
	}
	if err != nil {
		return errors.Join(fmt.Errorf("writing lab config: %w", err), l.Close())
	}
	fmt.Fprintf(stdout, "lab %s is up: gateway namespace %s, config %s\n", l.Prefix, l.Gateway.Name, file)
	fmt.Fprintf(stdout, "  run the agent:  uplinkd lab exec -prefix %s gw -- %s run -c %s\n", l.Prefix, exe(), file)
	fmt.Fprintf(stdout, "  remove it:      uplinkd lab down -prefix %s\n", l.Prefix)
	return nil
}

func labDown(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("lab down", flag.ContinueOnError)
	prefix := fs.String("prefix", "", "the lab's prefix (printed by lab up)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *prefix == "" {
		return usageError{errors.New("lab down: -prefix is required")}
	}
	if err := lab.Remove(*prefix); err != nil {
		return err
	}
	return os.RemoveAll(filepath.Join(labStateDir, *prefix))
}

func labExec(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("lab exec", flag.ContinueOnError)
	fs.SetOutput(stderr)
	prefix := fs.String("prefix", "", "the lab's prefix (printed by lab up)")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	rest := fs.Args()
	if *prefix == "" || len(rest) < 2 {
		return usageError{errors.New("lab exec: want -prefix P HOST -- CMD [ARGS...]")}
	}
	host, cmdline := rest[0], rest[1:]
	if cmdline[0] == "--" {
		cmdline = cmdline[1:]
	}
	if len(cmdline) == 0 {
		return usageError{errors.New("lab exec: no command")}
	}
	h, err := lab.HostOf(*prefix, host)
	if err != nil {
		return usageError{err}
	}
	if _, err := os.Stat(h.Path()); err != nil {
		return fmt.Errorf("lab host %s: %w", h.Name, err)
	}
	cmd := h.Command(context.Background(), cmdline[0], cmdline[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, stdout, stderr
	return cmd.Run()
}

func exe() string {
	p, err := os.Executable()
	if err != nil {
		return "uplinkd"
	}
	return p
}

// labDemo is the main job on a built-in default: the seed's two lines in a
// lab, the agent, connections from the clients, the failover of a line.
func labDemo(args []string, stdout, stderr io.Writer) (err error) {
	fs := flag.NewFlagSet("lab demo", flag.ContinueOnError)
	isps := fs.Int("isps", 2, "number of ISPs (lines), 1..8")
	flows := fs.Int("flows", 64, "connections per round")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	if *flows < 1 || *flows > 1000 {
		return usageError{fmt.Errorf("lab demo: -flows wants 1..1000, got %d", *flows)}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	say := func(format string, a ...any) { fmt.Fprintf(stdout, format+"\n", a...) }
	l, err := lab.New(lab.Options{ISPs: *isps, Clients: 2})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := l.Close(); cerr != nil {
			err = errors.Join(err, cerr)
		}
		say("lab %s removed", l.Prefix)
	}()
	say("lab %s: 2 clients on %s, gateway, %d ISP routers, server %s", l.Prefix, l.LANAddress.Masked(), *isps, l.ServerAddrs[0])

	dir, err := os.MkdirTemp("", "uplinkd-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	cfgFile := filepath.Join(dir, "uplinkd.yaml")
	if err := os.WriteFile(cfgFile, []byte(l.Config(lab.ConfigOptions{StateDir: dir})), 0o600); err != nil {
		return err
	}
	say("\n$ uplinkd plan -c %s   (in the gateway)", cfgFile)
	if out, err := l.Gateway.Run(ctx, exe(), "plan", "-c", cfgFile); err != nil {
		return err
	} else {
		fmt.Fprint(stdout, indent(out))
	}

	agent := l.Gateway.Command(ctx, exe(), "run", "-c", cfgFile)
	agentLog, err := os.Create(filepath.Join(dir, "agent.log"))
	if err != nil {
		return err
	}
	agent.Stdout, agent.Stderr = agentLog, agentLog
	if err := agent.Start(); err != nil {
		return fmt.Errorf("starting the agent: %w", err)
	}
	defer func() {
		_ = agent.Process.Signal(syscall.SIGTERM)
		_ = agent.Wait()
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
	if err := waitApplied(ctx, l); err != nil {
		return err
	}
	say("\nagent running in %s", l.Gateway.Name)

	srv, err := lab.StartEchoServer(l.Server, l.ServerAddrs[0], 7)
	if err != nil {
		return err
	}
	defer srv.Close()

	round := func(title string, wantLines int) error {
		counts, failed, firstErr := connect(l, srv.Addr, *flows)
		say("\n%s: %d new connections from %d clients", title, *flows, len(l.Clients))
		tw := tabwriter.NewWriter(stdout, 2, 8, 2, ' ', 0)
		fmt.Fprintln(tw, "  line\tinterface\tsource seen by server\tconnections\tshare")
		used := 0
		for _, u := range l.Lines {
			n := counts[u.Address.Addr()]
			if n > 0 {
				used++
			}
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%s\n", u.Name, u.Interface, u.Address.Addr(), n, bar(n, *flows))
		}
		tw.Flush()
		if failed > 0 {
			return fmt.Errorf("%s: %d of %d connections failed, the first with: %w", title, failed, *flows, firstErr)
		}
		if used != wantLines {
			return fmt.Errorf("%s: traffic used %d lines, want %d", title, used, wantLines)
		}
		return nil
	}
	if err := round("all lines up", len(l.Lines)); err != nil {
		return err
	}
	say("\nkilling line %s: carrier down on %s", l.Lines[0].Name, l.Lines[0].Interface)
	start := time.Now()
	if err := l.SetCarrier(1, false); err != nil {
		return err
	}
	if err := waitLine(ctx, l, l.Lines[0], false); err != nil {
		return err
	}
	say("the agent took %s out of service %v after the fault", l.Lines[0].Name, time.Since(start).Round(time.Millisecond))
	if err := round("line "+l.Lines[0].Name+" dead", len(l.Lines)-1); err != nil {
		return err
	}
	start = time.Now()
	if err := l.SetCarrier(1, true); err != nil {
		return err
	}
	if err := waitLine(ctx, l, l.Lines[0], true); err != nil {
		return err
	}
	say("\nline %s has its carrier back: in service %v later (after 5 good rounds of probes)", l.Lines[0].Name, time.Since(start).Round(time.Millisecond))
	if err := round("all lines up again", len(l.Lines)); err != nil {
		return err
	}

	// The harder fault: the gateway stops answering while the carrier
	// stays up. Only probing sees it.
	last := l.Lines[len(l.Lines)-1]
	say("\n%s's gateway goes silent, its carrier stays up", last.Name)
	start = time.Now()
	if err := l.SetGatewaySilent(len(l.Lines), true); err != nil {
		return err
	}
	if err := waitLine(ctx, l, last, false); err != nil {
		return err
	}
	say("the agent's probes took %s out of service %v after the fault", last.Name, time.Since(start).Round(time.Millisecond))
	if err := round("line "+last.Name+" silent", len(l.Lines)-1); err != nil {
		return err
	}
	start = time.Now()
	if err := l.SetGatewaySilent(len(l.Lines), false); err != nil {
		return err
	}
	if err := waitLine(ctx, l, last, true); err != nil {
		return err
	}
	say("\n%s answers again: back in service %v later (after 5 good rounds of probes)", last.Name, time.Since(start).Round(time.Millisecond))
	return round("all lines up again", len(l.Lines))
}

// waitApplied waits until the agent's multipath rule is in the gateway.
func waitApplied(ctx context.Context, l *lab.Lab) error {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		out, _ := l.Gateway.Run(ctx, "ip", "rule", "show", "table", "222")
		if strings.Contains(out, "lookup 222") {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return errors.New("the agent did not apply its rules within 10s")
}

// waitLine waits until the agent has acted on a line going up or down:
// the line is in the multipath route or not, and its TCP reset rule,
// installed after the datapath's buckets are rewritten, is gone or there.
func waitLine(ctx context.Context, l *lab.Lab, u lab.Line, up bool) error {
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		routes, _ := l.Gateway.Run(ctx, "ip", "route", "show", "table", "222")
		nft, _ := l.Gateway.Run(ctx, "nft", "list", "table", "inet", "uplinkd")
		if strings.Contains(routes, "dev "+u.Interface+" ") == up && strings.Contains(nft, u.Name+" is down") != up {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("the agent did not act on line %s within 5s", u.Name)
}

// connect opens n TCP connections from the clients in turn and counts
// the source address the server saw for each.
func connect(l *lab.Lab, dst netip.AddrPort, n int) (map[netip.Addr]int, int, error) {
	counts := map[netip.Addr]int{}
	failed := 0
	var first error
	for i := range n {
		c, seen, err := lab.DialTCP(l.Clients[i%len(l.Clients)], dst, 2*time.Second)
		if err != nil {
			failed++
			if first == nil {
				first = err
			}
			continue
		}
		c.Close()
		counts[seen.Addr()]++
	}
	return counts, failed, first
}

func bar(n, total int) string {
	return fmt.Sprintf("%3d%% %s", 100*n/total, strings.Repeat("#", 30*n/total))
}

func indent(s string) string {
	return "    " + strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", "\n    ") + "\n"
}
