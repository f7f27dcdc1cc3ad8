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

// printStatus writes the status as a table for people.
func printStatus(w io.Writer, st agent.Status, now time.Time) {
	fmt.Fprintf(w, "config %s\n", st.Config)
	if st.AllLinesDown {
		fmt.Fprintln(w, "ALL LINES DOWN: the last usable lines keep carrying traffic")
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LINE\tNR\tINTERFACE\tADDRESS\tUSABLE\tHEALTH\tSINCE\tRTT\tJITTER\tLOSS\tWEIGHT\tWHY")
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
		fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%v\t%s\t%s\t%s\t%s\t%.0f%%\t%d/%d\t%s\n",
			l.Name, l.Number, l.Interface, orDash(l.Address), l.Usable, health, since,
			seconds(l.RTTSeconds), seconds(l.JitterSeconds), l.LossRatio*100,
			l.WeightEffective, l.WeightConfigured, l.HealthWhy)
	}
	tw.Flush()
	if len(st.Attached) > 0 {
		var ifs []string
		for ifname, mode := range st.Attached {
			ifs = append(ifs, ifname+" "+mode)
		}
		sort.Strings(ifs)
		fmt.Fprintf(w, "datapath attached: %s\n", strings.Join(ifs, ", "))
	}
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
