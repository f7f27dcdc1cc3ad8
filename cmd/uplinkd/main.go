// SPDX-License-Identifier: Apache-2.0

// Command uplinkd makes one Linux gateway use several Internet uplinks at
// once. See README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/vishvananda/netns"

	"github.com/uplinkd/uplinkd/control/agent"
	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/metrics"
	"github.com/uplinkd/uplinkd/control/plan"
	"github.com/uplinkd/uplinkd/control/statefile"
)

// usageError is a mistake in the command line or the config: exit 2.
type usageError struct{ error }

const usage = `uplinkd: use several Internet uplinks at once.

Usage:
  uplinkd run  -c FILE     apply the config and keep it applied until SIGTERM/SIGINT; SIGHUP reloads it
  uplinkd plan -c FILE     print the kernel state as ip/nft/sysctl commands; touches nothing
  uplinkd check -c FILE    check the config (and its prefix-set files) without the kernel: warnings on stderr,
                           "ok" and exit 0, or the errors and exit 2
  uplinkd down [-c FILE]   remove everything uplinkd installed (the config names custom numbers)
  uplinkd line down|up NAME -c FILE   take a line out of service (no new flows; its TCP flows get a reset,
                                      its UDP flows move) or bring it back
  uplinkd reload [-c FILE]            make the running agent re-read its config: prints what changed, or the
                                      errors (the running config stays); SIGHUP does the same, silently
  uplinkd status [-c FILE] [--json]   each line: usable, health and why, RTT/jitter/loss, weights; attach modes
  uplinkd flows [-c FILE] [--json] [--line L] [--client A] [--proto P] [--port N] [--sort bytes|age|idle] [--limit N]
                                      the flow table from the pinned flow map (no agent needed): client, remote,
                                      line, NAT source, packets and bytes each way, age, idle
  uplinkd top [-c FILE] [--once]      a live view: per-line throughput bars, state, RTT/loss, the top flows by rate
  uplinkd events [-c FILE] [--json] [--follow]   what happened to the lines (the agent keeps the last 1024)
  uplinkd features [-c FILE]          what this kernel offers uplinkd: attach mode, recovery from conntrack, ...;
                                      exit 1 when it lacks something the config needs
  uplinkd ha configs -c FILE [-o DIR]  an HA pair: write (or print) keepalived's and conntrackd's configs
                                      and the notify script for this gateway
  uplinkd ha notify master|backup|fault -c FILE   keepalived's notify script telling the agent
  uplinkd ha check [-lines] -c FILE   keepalived's track scripts: exit 0 while the agent runs
                                      (-lines: and is ready, its lines fit here, the master's VIPs in place)
  uplinkd lab up|down|exec|demo ...   a network namespace lab (see uplinkd lab -h)
`

func main() {
	err := run(os.Args[1:], os.Stdout, os.Stderr)
	var ue usageError
	switch {
	case err == nil:
	case errors.As(err, &ue):
		fmt.Fprintln(os.Stderr, "uplinkd:", err)
		os.Exit(2)
	default:
		fmt.Fprintln(os.Stderr, "uplinkd:", err)
		os.Exit(1)
	}
}

func run(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return usageError{errors.New("no command")}
	}
	cmd, args := args[0], args[1:]
	switch cmd {
	case "run":
		return cmdRun(args, stderr)
	case "plan":
		return cmdPlan(args, stdout, stderr)
	case "check":
		return cmdCheck(args, stdout, stderr)
	case "down":
		return cmdDown(args, stderr)
	case "lab":
		return cmdLab(args, stdout, stderr)
	case "line":
		return cmdLine(args, stdout, stderr)
	case "features":
		return cmdFeatures(args, stdout, stderr)
	case "reload":
		return cmdReload(args, stdout, stderr)
	case "status":
		return cmdStatus(args, stdout, stderr)
	case "events":
		return cmdEvents(args, stdout, stderr)
	case "flows":
		return cmdFlows(args, stdout, stderr)
	case "top":
		return cmdTop(args, stdout, stderr)
	case "ha":
		return cmdHA(args, stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return usageError{fmt.Errorf("unknown command %q", cmd)}
}

// parseFlags parses a subcommand's flags; extra arguments are an error.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) error {
	fs.SetOutput(stderr)
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usageError{fmt.Errorf("%s: unexpected arguments %q", fs.Name(), fs.Args())}
	}
	return nil
}

// loadConfig reads the config named by -c; a bad config is a usage error.
func loadConfig(file string) (*config.Config, error) {
	if file == "" {
		return nil, usageError{errors.New("-c FILE is required")}
	}
	c, err := config.Load(file)
	if err != nil {
		return nil, usageError{err}
	}
	return c, nil
}

// optionalConfig reads the config named by -c, or gives the defaults
// where there is none.
func optionalConfig(file string) (config.Config, error) {
	if file == "" {
		return config.Default(), nil
	}
	// Its numbers and directories only: a prefix-set file gone or broken
	// must not keep one from removing uplinkd or reading its state.
	c, err := config.LoadWithoutPrefixSets(file)
	if err != nil {
		return config.Config{}, usageError{err}
	}
	return *c, nil
}

// agentFor opens the current namespace and checks cfg against it.
func agentFor(cfg *config.Config, log *slog.Logger) (*agent.Agent, *agent.Env, error) {
	env, err := agent.OpenEnv(netns.None())
	if err != nil {
		return nil, nil, err
	}
	a, err := agent.NewAgent(cfg, env, log)
	if err != nil {
		env.Close()
		return nil, nil, usageError{err}
	}
	return a, env, nil
}

func cmdPlan(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("plan", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		return err
	}
	a, env, err := agentFor(cfg, slog.New(slog.DiscardHandler))
	if err != nil {
		return err
	}
	defer env.Close()
	for _, w := range cfg.Warnings {
		fmt.Fprintf(stdout, "# warning: %s\n", w)
	}
	plan.Render(stdout, a.Desired(), cfg.Routing.Protocol)
	plan.RenderPolicies(stdout, cfg, a.Lines())
	if cfg.HA != nil {
		fmt.Fprintln(stdout, "\n# HA pair: the daemons' configs this gateway expects (uplinkd ha configs -c FILE -o DIR writes them)")
		return cmdHAConfigs([]string{"-c", *file}, stdout, stderr)
	}
	return nil
}

// cmdCheck checks a config as Load does, touching neither the kernel nor
// the agent: what can be checked before installing it.
func cmdCheck(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		return err
	}
	if err := agent.CheckRules(cfg); err != nil {
		return usageError{err}
	}
	for _, w := range cfg.Warnings {
		fmt.Fprintln(stderr, w) // FILE:LINE: first, as editors want it
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}

func cmdRun(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(stderr, nil))
	for _, w := range cfg.Warnings {
		log.Warn("config", "warning", w)
	}
	a, env, err := agentFor(cfg, log)
	if err != nil {
		return err
	}
	defer env.Close()
	defer a.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				c, err := config.Load(*file)
				if err != nil {
					log.Error("reloading config, keeping the old one", "err", err)
					continue
				}
				for _, w := range c.Warnings {
					log.Warn("config", "warning", w)
				}
				_ = a.Reconfigure(ctx, c)
			}
		}
	}()
	// The metrics endpoint opens once the agent runs, and stops with it;
	// an address it cannot listen on stops the agent.
	ctx, stopRun := context.WithCancel(ctx)
	defer stopRun()
	metricsErr := make(chan error, 1)
	if listen := cfg.Metrics.Listen; listen != "" {
		go func() {
			if err := metrics.ServeOnceRunning(ctx, listen, a.Status, log); err != nil {
				metricsErr <- fmt.Errorf("metrics.listen: %w (the kernel state stays applied: free the address or change metrics.listen, then run again)", err)
				stopRun()
			}
		}()
	}
	if err := a.Run(ctx); err != nil {
		return err
	}
	select {
	case err := <-metricsErr:
		return err
	default:
	}
	log.Info("stopped; kernel state left in place (uplinkd down removes it)")
	return nil
}

func cmdDown(args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("down", flag.ContinueOnError)
	file := fs.String("c", "", "config `file` (optional: only its routing numbers and state_dir are used)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	// A running agent would put back what down removes, and could save
	// its own sysctl values as the originals: down waits for no one and
	// refuses instead.
	if _, err := os.Lstat(cfg.StateDir); err == nil {
		lock, err := statefile.Acquire(cfg.StateDir)
		if errors.Is(err, statefile.ErrLocked) {
			return fmt.Errorf("down: an agent is running (%w): stop it first (SIGTERM, or systemctl stop uplinkd), then down", err)
		}
		if err != nil {
			return err
		}
		defer lock.Release()
	}
	if _, err := os.Stat(cfg.Datapath.PinDir); err == nil {
		pins, err := statefile.LockDir(cfg.Datapath.PinDir)
		if err != nil {
			return fmt.Errorf("down: %w: stop it first", err)
		}
		defer pins.Release()
	}
	env, err := agent.OpenEnv(netns.None())
	if err != nil {
		return err
	}
	defer env.Close()
	return agent.Down(&cfg, env)
}

func cmdLine(args []string, stdout, stderr io.Writer) error {
	if len(args) < 2 || (args[0] != "down" && args[0] != "up") {
		return usageError{errors.New("line: want line down NAME -c FILE, or line up NAME -c FILE")}
	}
	verb, name := args[0], args[1]
	fs := flag.NewFlagSet("line "+verb, flag.ContinueOnError)
	file := fs.String("c", "", "config `file`")
	if err := parseFlags(fs, args[2:], stderr); err != nil {
		return err
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		return err
	}
	known := false
	for _, u := range cfg.Lines {
		known = known || u.Name == name
	}
	if !known {
		return usageError{fmt.Errorf("line %s: no line %q in %s", verb, name, *file)}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	msg, err := agent.SetLineDown(ctx, cfg.StateDir, name, verb == "down")
	if err != nil {
		return err
	}
	fmt.Fprintln(stdout, msg)
	return nil
}

func cmdReload(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("reload", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: checked here first (a bad one is refused with its errors, exit 2); its state_dir names the agent, which re-reads its own config file")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	msg, err := ctlsock.Call(ctx, cfg.StateDir, ctlsock.Request{Cmd: "reload"})
	if msg != "" {
		fmt.Fprint(stdout, msg+"\n")
	}
	if errors.Is(err, ctlsock.ErrNoAgent) {
		return fmt.Errorf("reload: no agent runs with state dir %s", cfg.StateDir)
	}
	return err
}

func cmdFeatures(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("features", flag.ContinueOnError)
	file := fs.String("c", "", "config `file` (optional: its nftables table name and datapath settings are used)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	env, err := agent.OpenEnv(netns.None())
	if err != nil {
		return err
	}
	defer env.Close()
	k := agent.CheckKernel(env, cfg.Routing.NFTTable)
	k.Report(stdout)
	return k.Refuse(&cfg)
}
