// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"time"

	"github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/flows"
	"github.com/uplinkd/uplinkd/loader"
)

func cmdFlows(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("flows", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its datapath.pin_dir holds the flow map, its state_dir the line names (no agent needed)")
	pinDir := fs.String("pin-dir", "", "read the flow map pinned in `dir` (instead of the config's)")
	asJSON := fs.Bool("json", false, "one JSON object per flow and line (NDJSON; schema: README)")
	line := fs.String("line", "", "only flows on this line (`name` or number)")
	client := fs.String("client", "", "only flows of this client `address or prefix`")
	proto := fs.String("proto", "", "only flows of this `protocol` (tcp, udp, icmp, icmpv6 or a number)")
	port := fs.Int("port", 0, "only flows with this `port` on either side")
	sortBy := fs.String("sort", "", "order: bytes (most first), age (oldest first), idle (most idle first); default: map order, streamed")
	limit := fs.Int("limit", 0, "at most `n` flows (with --sort: the top n, keeping only n in memory)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	q := flows.Query{Line: *line, Sort: *sortBy, Limit: *limit}
	if *client != "" {
		if q.Client, err = flows.ParseClient(*client); err != nil {
			return usageError{fmt.Errorf("flows: --client: %w", err)}
		}
	}
	if *proto != "" {
		if q.Proto, err = flows.ParseProto(*proto); err != nil {
			return usageError{fmt.Errorf("flows: --proto: %w", err)}
		}
	}
	if *port < 0 || *port > 65535 {
		return usageError{fmt.Errorf("flows: --port: want 0..65535, got %d", *port)}
	}
	q.Port = uint16(*port)
	if *limit < 0 {
		return usageError{fmt.Errorf("flows: --limit: want 0 or more, got %d", *limit)}
	}
	dir := cfg.Datapath.PinDir
	if *pinDir != "" {
		dir = *pinDir
	}
	src, err := loader.OpenStats(dir)
	if errors.Is(err, loader.ErrNoDatapath) {
		return fmt.Errorf("flows: %w (is the agent's pin dir another? -c FILE or --pin-dir)", err)
	}
	if err != nil {
		return fmt.Errorf("flows: %w", err)
	}
	defer src.Close()
	names := flows.Names{Lines: map[int]string{}}
	if slots, err := agent.ReadSlots(cfg.StateDir); err == nil {
		for name, n := range slots {
			names.Lines[n] = name
		}
	}
	if pn, err := agent.ReadPolicyNames(cfg.StateDir); err == nil {
		names.Rules, names.Policies = pn.Rules, pn.Policies
	}
	if q.Line != "" && flows.LineNumber(q.Line, names.Lines) < 0 {
		return usageError{fmt.Errorf("flows: --line: no line %q (lines known from %s: %v)", q.Line, cfg.StateDir, names.Lines)}
	}
	// The policy column only where rules classify flows.
	withPolicy := len(names.Rules) > 0
	w := bufio.NewWriterSize(stdout, 64<<10)
	defer w.Flush()
	enc := json.NewEncoder(w)
	if !*asJSON {
		fmt.Fprintf(w, "%-5s %-39s %-45s %-8s %-15s %10s %10s %10s %10s %8s %8s",
			"PROTO", "CLIENT", "REMOTE", "LINE", "NAT SOURCE", "TX PKTS", "TX BYTES", "RX PKTS", "RX BYTES", "AGE", "IDLE")
		if withPolicy {
			fmt.Fprint(w, "  POLICY (RULE)")
		}
		fmt.Fprintln(w)
	}
	return flows.Run(src, q, names, time.Now(), func(r flows.Row) error {
		if *asJSON {
			return enc.Encode(r)
		}
		_, err := fmt.Fprintf(w, "%-5s %-39s %-45s %-8s %-15s %10d %10s %10d %10s %8s %8s",
			r.Proto, hostPort(r.Client, r.ClientPort), hostPort(r.Remote, r.RemotePort), r.Line, orDash(r.NATSource),
			r.TxPackets, bytesText(r.TxBytes), r.RxPackets, bytesText(r.RxBytes), secondsText(r.AgeSeconds), secondsText(r.IdleSecs))
		if err == nil && withPolicy {
			_, err = fmt.Fprintf(w, "  %s (%s)", r.Policy, orDash(r.Rule))
		}
		if err == nil {
			_, err = fmt.Fprintln(w)
		}
		return err
	})
}

func hostPort(addr string, port uint16) string {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return addr
	}
	return netip.AddrPortFrom(a, port).String()
}

// bytesText is a byte count for people: 1.5M, 300K, 12.
func bytesText(n uint64) string {
	const unit = 1024
	if n < unit {
		return strconv.FormatUint(n, 10)
	}
	v, i := float64(n), -1
	for v >= unit && i < 4 {
		v /= unit
		i++
	}
	return fmt.Sprintf("%.1f%c", v, "KMGTP"[i])
}

func secondsText(s float64) string {
	return (time.Duration(s * float64(time.Second))).Round(time.Second).String()
}
