// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
)

// askAgent sends req to the agent of the config's state dir and decodes
// its answer into out; no agent is a clear error, never a hang.
func askAgent(ctx context.Context, stateDir string, req ctlsock.Request, out any) error {
	err := ctlsock.CallData(ctx, stateDir, req, out)
	if errors.Is(err, ctlsock.ErrNoAgent) {
		return fmt.Errorf("%s: no agent runs with state dir %s", req.Cmd, stateDir)
	}
	return err
}

func cmdStatus(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its state_dir names the agent")
	asJSON := fs.Bool("json", false, "print the agent's status as one JSON object (schema: README)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var st agent.Status
	if err := askAgent(ctx, cfg.StateDir, ctlsock.Request{Cmd: "status"}, &st); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	printStatus(stdout, st, time.Now())
	return nil
}

// printStatus writes the status as tables for people.
func printStatus(w io.Writer, st agent.Status, now time.Time) {
	fmt.Fprintf(w, "config %s\n", st.Config)
	if st.AllLinesDown {
		fmt.Fprintln(w, "ALL LINES DOWN: the last usable lines keep carrying traffic")
	}
	if h := st.HA; h != nil {
		fmt.Fprintf(w, "ha: %s for %v, %d takeovers", h.Role, now.Sub(h.Since).Round(time.Second), h.Takeovers)
		if h.LastTakeover != nil {
			fmt.Fprintf(w, ", the last %v ago (kernel state applied in %v)", now.Sub(*h.LastTakeover).Round(time.Second),
				time.Duration(h.TakeoverApplySeconds*float64(time.Second)).Round(time.Millisecond))
		}
		if h.Notified != "" {
			fmt.Fprintf(w, "; keepalived said %s", h.Notified)
		}
		fmt.Fprintln(w)
		if h.Role == "master" || h.Resyncs+h.ResyncErrors > 0 {
			fmt.Fprintf(w, "ha: conntrackd resyncs every %v: %d done, %d failed", time.Duration(h.ResyncEverySeconds*float64(time.Second)), h.Resyncs, h.ResyncErrors)
			if h.ResyncError != "" {
				fmt.Fprintf(w, "; failing: %s", h.ResyncError)
			}
			fmt.Fprintln(w)
		}
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tNR\tINTERFACE\tADDRESS\tUSABLE\tHEALTH\tSINCE\tRTT\tJITTER\tLOSS\tWEIGHT\tTX\tRX\tTX/s\tRX/s\tFLOWS\tWHY")
	for _, l := range st.Lines {
		health := l.Health
		switch {
		case l.OperatorDown:
			health += ",operator-down"
		case !l.Carrier:
			health += ",no-carrier"
		}
		since := "-"
		if !l.HealthSince.IsZero() {
			since = now.Sub(l.HealthSince).Round(time.Second).String()
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%v\t%s\t%s\t%s\t%s\t%.0f%%\t%d/%d\t%s\t%s\t%s\t%s\t%d\t%s\n",
			l.Name, l.Number, l.Interface, orDash(l.Address), l.Usable, health, since,
			seconds(l.RTTSeconds), seconds(l.JitterSeconds), l.LossRatio*100,
			l.WeightEffective, l.WeightConfigured, bytesText(l.TxBytes), bytesText(l.RxBytes),
			bitsText(l.TxBytesPerSecond), bitsText(l.RxBytesPerSecond), l.Flows, l.HealthWhy)
	}
	tw.Flush()
	fmt.Fprintf(w, "total: tx %s, rx %s, %d flows; flow map %d of %d entries", bytesText(st.Totals.TxBytes), bytesText(st.Totals.RxBytes),
		st.Totals.Flows, st.FlowMap.Entries, st.FlowMap.Capacity)
	if st.FlowMap.EvictedAtLeast > 0 {
		fmt.Fprintf(w, ", at least %d flows evicted (raise datapath.flow_entries)", st.FlowMap.EvictedAtLeast)
	}
	fmt.Fprintf(w, "; %d reconcile errors, %d repairs of others' changes\n", st.ReconcileErrors, st.Restored)
	if st.DatapathError != "" {
		fmt.Fprintf(w, "datapath figures missing: %s\n", st.DatapathError)
	}
	if len(st.Attached) > 0 {
		fmt.Fprintf(w, "datapath attached: %s\n", joinSorted(st.Attached, " "))
	}
	if len(st.Policies) > 0 {
		tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "POLICY	ID	TIER	LINES	LAST RESORT	NEW FLOWS	PINNED	TX	RX")
		for _, p := range st.Policies {
			tier := strconv.Itoa(p.Tier)
			if p.Tier == 0 {
				tier = "none: last resort"
			}
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\t%d\t%d\t%s\t%s\n", p.Name, p.ID, tier, orDash(strings.Join(p.Lines, ",")), p.LastResort,
				p.Flows, p.Pinned, bytesText(p.TxBytes), bytesText(p.RxBytes))
		}
		tw.Flush()
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "RULE	POLICY	HITS")
		for _, r := range st.Rules {
			fmt.Fprintf(tw, "%s\t%s\t%d\n", r.Name, r.Policy, r.Hits)
		}
		tw.Flush()
	}
	if len(st.Reasons) > 0 {
		nonzero := map[string]string{}
		for r, n := range st.Reasons {
			if n > 0 {
				nonzero[r] = strconv.FormatUint(n, 10)
			}
		}
		fmt.Fprintf(w, "LAN packets by reason: %s\n", joinSorted(nonzero, "="))
	}
}

// joinSorted writes a map as "k<sep>v, ..." sorted by key.
func joinSorted(m map[string]string, sep string) string {
	var out []string
	for k, v := range m {
		out = append(out, k+sep+v)
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}

// bitsText is a rate in bytes per second as bits per second for people.
func bitsText(bytesPerSecond float64) string {
	b := bytesPerSecond * 8
	for _, u := range []struct {
		div  float64
		unit string
	}{{1e9, "Gbit"}, {1e6, "Mbit"}, {1e3, "kbit"}} {
		if b >= u.div {
			return fmt.Sprintf("%.1f%s", b/u.div, u.unit)
		}
	}
	return fmt.Sprintf("%.0fbit", b)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func seconds(s float64) string {
	return time.Duration(s * float64(time.Second)).Round(10 * time.Microsecond).String()
}

func cmdEvents(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("events", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its state_dir names the agent")
	asJSON := fs.Bool("json", false, "one JSON object per event and line (NDJSON; schema: README)")
	follow := fs.Bool("follow", false, "keep printing new events until interrupted")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	enc := json.NewEncoder(stdout)
	var since uint64
	for {
		var evs []events.Event
		rctx, cancel := context.WithTimeout(ctx, time.Minute)
		err := askAgent(rctx, cfg.StateDir, ctlsock.Request{Cmd: "events", Since: since, Wait: *follow}, &evs)
		cancel()
		if ctx.Err() != nil {
			return nil // interrupted while following
		}
		if err != nil {
			return err
		}
		for _, e := range evs {
			since = e.Seq
			if *asJSON {
				if err := enc.Encode(e); err != nil {
					return err
				}
				continue
			}
			fmt.Fprintln(stdout, formatEvent(e))
		}
		if !*follow {
			return nil
		}
	}
}

// formatEvent writes an event on one line for people.
func formatEvent(e events.Event) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %-15s", e.Time.Local().Format("2006-01-02 15:04:05.000"), e.Kind)
	if e.Line != "" {
		fmt.Fprintf(&b, " %s:", e.Line)
	}
	fmt.Fprintf(&b, " %s", e.Msg)
	keys := make([]string, 0, len(e.Fields))
	for k := range e.Fields {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%q", k, e.Fields[k])
	}
	return b.String()
}
