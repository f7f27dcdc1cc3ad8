// SPDX-License-Identifier: Apache-2.0

package agent

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/events"
	"github.com/uplinkd/uplinkd/control/statefile"
)

// ctlCall is a control socket request handed to the run loop, which owns
// the agent's state, with where to put the answer.
type ctlCall struct {
	req   ctlsock.Request
	reply chan ctlsock.Reply
}

// call hands req to the run loop and waits for its answer.
func (a *Agent) call(ctx context.Context, req ctlsock.Request) ctlsock.Reply {
	c := ctlCall{req: req, reply: make(chan ctlsock.Reply, 1)}
	timeout := time.After(30 * time.Second)
	select {
	case a.ctl <- c:
	case <-ctx.Done():
		return ctlsock.Reply{Error: "the agent is stopping"}
	case <-timeout:
		return ctlsock.Reply{Error: "the agent is busy: no answer in 30s"}
	}
	select {
	case r := <-c.reply:
		return r
	case <-ctx.Done():
		return ctlsock.Reply{Error: "the agent is stopping"}
	}
}

// control carries out one request, in the run loop.
func (a *Agent) control(req ctlsock.Request) ctlsock.Reply {
	switch req.Cmd {
	case "ping":
		// Answered by the run loop: the agent has applied its config and
		// is keeping it applied.
		return ctlsock.Reply{Message: "running"}
	case "line":
		return a.controlLine(req.Line, req.Down)
	case "reload":
		return a.controlReload()
	case "status":
		return ctlsock.DataReply(a.status())
	case "ha-notify":
		return a.controlHANotify(req.Line)
	case "ha-check":
		return a.controlHACheck(time.Now())
	}
	return ctlsock.Reply{Error: fmt.Sprintf("unknown command %q", req.Cmd)}
}

func (a *Agent) controlLine(name string, down bool) ctlsock.Reply {
	if !slices.ContainsFunc(a.cfg.Lines, func(u config.Line) bool { return u.Name == name }) {
		return ctlsock.Reply{Error: fmt.Sprintf("no line %q in %s", name, a.cfg.File())}
	}
	if err := setLineDown(a.cfg.StateDir, name, down); err != nil {
		return ctlsock.Reply{Error: err.Error()}
	}
	_, err := a.Apply()
	verb := "up: new flows again"
	if down {
		verb = "down: no new flows; its TCP flows get a reset, its UDP and ICMP flows move"
	}
	msg := fmt.Sprintf("line %s %s", name, verb)
	if err != nil {
		return ctlsock.Reply{Message: msg, Error: "applying: " + err.Error()}
	}
	return ctlsock.Reply{Message: msg}
}

// controlReload re-reads the agent's config file: a bad one is refused
// whole, with its errors, and the running state is untouched.
func (a *Agent) controlReload() ctlsock.Reply {
	file := a.cfg.File()
	cfg, err := config.Load(file)
	if err != nil {
		return ctlsock.Reply{Error: "config refused, the running one stays:\n" + err.Error()}
	}
	old := a.cfg
	if err := a.reconfigure(cfg); err != nil {
		return ctlsock.Reply{Error: "config refused, the running one stays:\n" + err.Error()}
	}
	rep, err := a.Apply()
	a.events.Add(events.Config, "", "new config applied", "file", file, "changes", rep.String())
	msg := describeChange(old, cfg) + "kernel: " + rep.String()
	for _, w := range cfg.Warnings {
		msg += "\nwarning: " + w
	}
	if err != nil {
		return ctlsock.Reply{Message: msg, Error: "applying: " + err.Error()}
	}
	return ctlsock.Reply{Message: msg}
}

// describeChange says, a line each, what a new config changes in the lines.
func describeChange(old, cfg *config.Config) string {
	var b strings.Builder
	was := map[string]config.Line{}
	for _, u := range old.Lines {
		was[u.Name] = u
	}
	for _, u := range cfg.Lines {
		w, ok := was[u.Name]
		delete(was, u.Name)
		switch {
		case !ok:
			fmt.Fprintf(&b, "line %s added (%s, table %d, mark %#x)\n", u.Name, u.Interface, u.Table, u.Mark)
		case w.Weight != u.Weight:
			fmt.Fprintf(&b, "line %s: weight %d -> %d (new flows only)\n", u.Name, w.Weight, u.Weight)
		}
	}
	for name := range was {
		fmt.Fprintf(&b, "line %s removed\n", name)
	}
	return b.String()
}

// setLineDown records that an operator took a line down (or brought it
// back), for this agent and those after it.
func setLineDown(stateDir, name string, down bool) error {
	names, err := LinesDown(stateDir)
	if err != nil {
		return err
	}
	names = slices.DeleteFunc(names, func(n string) bool { return n == name })
	if down {
		names = append(names, name)
	}
	slices.Sort(names)
	return statefile.Write(stateDir, linesDownFile, names)
}
