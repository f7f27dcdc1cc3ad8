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
	"path/filepath"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/test/lab"
)

const labUsage = `Usage:
  uplinkd lab up [-isps N] [-clients N] [-prefix P]   build a lab; prints its prefix and writes an uplinkd config for it
  uplinkd lab down -prefix P                          remove a lab
  uplinkd lab exec -prefix P HOST -- CMD [ARGS...]    run a command in a lab host (gw, sw, srv, cN, ispN)
  uplinkd lab demo [-isps N] [-short]                 build a lab of lines of different capacity, run the agent with
                                                      traffic on every line, silence a gateway, show the failover and
                                                      the recovery, a summary, clean up
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
	isps := fs.Int("isps", 2, "number of ISPs (lines), 1..16")
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
// The bound is generous: an emulated VM of the kernel matrix runs the demo
// ten times slower or more (the time it took is what the demo reports).
func waitLine(ctx context.Context, l *lab.Lab, u lab.Line, up bool) error {
	const bound = 20 * time.Second
	deadline := time.Now().Add(bound)
	for time.Now().Before(deadline) && ctx.Err() == nil {
		routes, _ := l.Gateway.Run(ctx, "ip", "route", "show", "table", "222")
		nft, _ := l.Gateway.Run(ctx, "nft", "list", "table", "inet", "uplinkd")
		if strings.Contains(routes, "dev "+u.Interface+" ") == up && strings.Contains(nft, u.Name+" is down") != up {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("the agent did not act on line %s within %v", u.Name, bound)
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
