// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/uplinkd/uplinkd/control/ctlsock"
	"github.com/uplinkd/uplinkd/control/ha"
)

// cmdHA is `uplinkd ha configs` (write keepalived's and conntrackd's
// configs and the notify script for this gateway) and `uplinkd ha notify`
// (keepalived's notify script telling the agent of a transition).
func cmdHA(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		return usageError{errors.New("ha: want ha configs -c FILE [-o DIR], ha notify master|backup|fault -c FILE, or ha check -c FILE")}
	}
	switch args[0] {
	case "configs":
		return cmdHAConfigs(args[1:], stdout, stderr)
	case "check":
		return cmdHACheck(args[1:], stdout, stderr)
	case "notify":
		return cmdHANotify(args[1:], stdout, stderr)
	}
	return usageError{fmt.Errorf("ha: unknown command %q (configs, notify, check)", args[0])}
}

// haPaths is where the configs go and what the notify script calls.
func haPaths(dir, file string) (ha.Paths, error) {
	exe, err := os.Executable()
	if err != nil {
		return ha.Paths{}, fmt.Errorf("finding the uplinkd binary: %w", err)
	}
	absDir, err := filepath.Abs(dir)
	if err != nil {
		return ha.Paths{}, err
	}
	absFile, err := filepath.Abs(file)
	if err != nil {
		return ha.Paths{}, err
	}
	return ha.Paths{Dir: absDir, Uplinkd: exe, ConfigFile: absFile}, nil
}

func cmdHAConfigs(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ha configs", flag.ContinueOnError)
	file := fs.String("c", "", "config `file` with an ha block")
	dir := fs.String("o", "", "write the files into this `directory` (created 0755; the notify script 0755); empty: print them")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := loadConfig(*file)
	if err != nil {
		return err
	}
	if cfg.HA == nil {
		return usageError{fmt.Errorf("ha configs: %s has no ha block", *file)}
	}
	out := *dir
	if out == "" {
		out = "/etc/uplinkd/ha"
	}
	paths, err := haPaths(out, *file)
	if err != nil {
		return err
	}
	files, err := ha.Render(cfg, paths)
	if err != nil {
		return err
	}
	names := slices.Sorted(maps.Keys(files))
	if *dir == "" {
		for _, n := range names {
			fmt.Fprintf(stdout, "# --- %s ---\n%s\n", filepath.Join(paths.Dir, n), files[n])
		}
		return nil
	}
	if err := os.MkdirAll(paths.Dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", paths.Dir, err)
	}
	for _, n := range names {
		mode := os.FileMode(0o644)
		if n == ha.NotifyScript {
			mode = 0o755
		}
		if err := writeFileAtomic(filepath.Join(paths.Dir, n), []byte(files[n]), mode); err != nil {
			return err
		}
		fmt.Fprintln(stdout, "wrote", filepath.Join(paths.Dir, n))
	}
	return nil
}

// writeFileAtomic writes a file whole or not at all (a daemon reading it
// meanwhile sees the old one).
func writeFileAtomic(name string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	if err := os.Rename(tmp.Name(), name); err != nil {
		return fmt.Errorf("writing %s: %w", name, err)
	}
	return nil
}

func cmdHANotify(args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || !slices.Contains([]string{"master", "backup", "fault"}, args[0]) {
		return usageError{errors.New("ha notify: want master, backup or fault, then -c FILE")}
	}
	state := args[0]
	fs := flag.NewFlagSet("ha notify", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its state_dir names the agent")
	if err := parseFlags(fs, args[1:], stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	// keepalived waits for its notify script: never long.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	msg, err := ctlsock.Call(ctx, cfg.StateDir, ctlsock.Request{Cmd: "ha-notify", Line: state})
	if msg != "" {
		fmt.Fprintln(stdout, msg)
	}
	if errors.Is(err, ctlsock.ErrNoAgent) {
		return fmt.Errorf("ha notify: no agent runs with state dir %s", cfg.StateDir)
	}
	return err
}

// cmdHACheck is keepalived's track scripts. Bare, the gateway's fault
// check: exit 0 while the agent runs and has applied its config (it
// answers over the control socket within a second), 1 otherwise; without
// a running agent a gateway must not hold the VIPs. With -lines, the
// weighted one: 1 also while the agent is starting or one of its lines is
// not fit here (the agent's ha-check says why), which lowers the VRRP
// priority. Configs from before -lines call it bare: its meaning there
// stays what they were written for.
func cmdHACheck(args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("ha check", flag.ContinueOnError)
	file := fs.String("c", "", "config `file`: its state_dir names the agent")
	lines := fs.Bool("lines", false, "also fail while the agent is starting or a line is not fit here (the weighted track script)")
	if err := parseFlags(fs, args, stderr); err != nil {
		return err
	}
	cfg, err := optionalConfig(*file)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	req := ctlsock.Request{Cmd: "ping"}
	if *lines {
		req.Cmd = "ha-check"
	}
	if _, err := ctlsock.Call(ctx, cfg.StateDir, req); err != nil {
		return fmt.Errorf("ha check: the agent of %s: %w", cfg.StateDir, err)
	}
	return nil
}
