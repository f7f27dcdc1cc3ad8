// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bufio"
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/uplinkd/uplinkd/control/config"
)

// The files `make install` installs (README: "Running as a service").
const (
	distUnit   = "dist/uplinkd.service"
	distConfig = "dist/uplinkd.yaml"
	makefile   = "../../Makefile"
)

// distCaps are the capabilities the unit grants, each for a reason its
// comments give (found by running the agent without each one).
var distCaps = []string{"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"}

// unitFile is a parsed systemd unit: section → key → values, in order
// (a key may repeat), and the comment lines.
type unitFile struct {
	keys     map[string]map[string][]string
	comments string
}

func parseUnit(t *testing.T, file string) unitFile {
	t.Helper()
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	u := unitFile{keys: map[string]map[string][]string{}}
	var section string
	var comments strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "":
		case strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
			comments.WriteString(line + "\n")
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u.keys[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" || strings.HasSuffix(line, `\`) {
				t.Fatalf("%s:%d: not a key=value line in a section (or a continued one, which this test does not read): %q", file, n, line)
			}
			u.keys[section][k] = append(u.keys[section][k], v)
		}
	}
	u.comments = comments.String()
	return u
}

// one is the value of a key set exactly once.
func (u unitFile) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u.keys[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s: want it set once, got %q", section, key, v)
	}
	return v[0]
}

// execArgs splits an Exec*= line into its prefix characters ("-+@:!")
// and its words.
func execArgs(v string) (prefix string, args []string) {
	w := strings.Fields(v)
	if len(w) == 0 {
		return "", nil
	}
	p := strings.TrimLeft(w[0], "-+@:!")
	return w[0][:len(w[0])-len(p)], append([]string{p}, w[1:]...)
}

// makeVars reads the simple NAME := value assignments of the Makefile.
func makeVars(t *testing.T) (map[string]string, string) {
	t.Helper()
	data, err := os.ReadFile(makefile)
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	re := regexp.MustCompile(`(?m)^([A-Z_]+)\s*:?=\s*(.*?)\s*$`)
	for _, m := range re.FindAllStringSubmatch(string(data), -1) {
		vars[m[1]] = m[2]
	}
	return vars, string(data)
}

// installPaths are where `make install` puts the binary, the unit and the
// config, from the Makefile.
func installPaths(t *testing.T) (bin, unit, conf string) {
	t.Helper()
	vars, text := makeVars(t)
	for _, v := range []string{"SBIN_DIR", "UNIT_DIR", "CONF_DIR"} {
		if !filepath.IsAbs(vars[v]) {
			t.Fatalf("Makefile: %s = %q, want an absolute path", v, vars[v])
		}
	}
	bin = vars["SBIN_DIR"] + "/uplinkd"
	unit = vars["UNIT_DIR"] + "/uplinkd.service"
	conf = vars["CONF_DIR"] + "/uplinkd.yaml"
	// The install recipe copies these files to those places.
	for _, want := range []string{
		"$(BIN) $(DESTDIR)$(SBIN_DIR)/uplinkd",
		"cmd/uplinkd/dist/uplinkd.service $(DESTDIR)$(UNIT_DIR)/uplinkd.service",
		"cmd/uplinkd/dist/uplinkd.yaml $(DESTDIR)$(CONF_DIR)/uplinkd.yaml",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("Makefile: the install target does not install %q", want)
		}
	}
	return bin, unit, conf
}

// The unit runs the binary and reads the config where `make install` puts
// them, reloads through `uplinkd reload`, stops with SIGTERM and never
// runs `uplinkd down`, and grants exactly the capabilities it documents.
func TestDistUnitMatchesInstall(t *testing.T) {
	bin, _, conf := installPaths(t)
	u := parseUnit(t, distUnit)

	_, start := execArgs(u.one(t, "Service", "ExecStart"))
	if want := []string{bin, "run", "-c", conf}; !slices.Equal(start, want) {
		t.Errorf("ExecStart = %q, want %q", start, want)
	}
	_, reload := execArgs(u.one(t, "Service", "ExecReload"))
	if want := []string{bin, "reload", "-c", conf}; !slices.Equal(reload, want) {
		t.Errorf("ExecReload = %q, want %q", reload, want)
	}
	for key, want := range map[string]string{
		"Type": "simple", "KillSignal": "SIGTERM", "Restart": "on-failure",
		"NoNewPrivileges": "yes", "ProtectSystem": "strict",
		// The agent writes /proc/sys/net.
		"ProtectKernelTunables": "no",
		// state_dir outlives a stop: `uplinkd down` needs it.
		"RuntimeDirectoryPreserve": "yes",
	} {
		if got := u.one(t, "Service", key); got != want {
			t.Errorf("%s = %q, want %q", key, got, want)
		}
	}
	// Stopping leaves the gateway forwarding: nothing runs `down`.
	for _, key := range []string{"ExecStop", "ExecStopPost"} {
		for _, v := range u.keys["Service"][key] {
			if _, args := execArgs(v); len(args) > 1 && filepath.Base(args[0]) == "uplinkd" {
				t.Errorf("%s=%s: the unit must leave the kernel state on stop", key, v)
			}
		}
	}
	if strings.Contains(strings.Join(slices.Concat(u.keys["Service"]["ExecStartPre"], u.keys["Service"]["ExecStartPost"]), " "), " down") {
		t.Errorf("the unit runs uplinkd down")
	}

	caps := strings.Fields(u.one(t, "Service", "CapabilityBoundingSet"))
	if got, want := slices.Sorted(slices.Values(caps)), slices.Sorted(slices.Values(distCaps)); !slices.Equal(got, want) {
		t.Errorf("CapabilityBoundingSet = %q, want %q", got, want)
	}
	for _, c := range distCaps {
		if !strings.Contains(u.comments, "#  "+c) {
			t.Errorf("%s is not documented in the unit's comments", c)
		}
	}
	if v := u.keys["Service"]["AmbientCapabilities"]; len(v) > 0 {
		t.Errorf("AmbientCapabilities = %q: the agent runs as root, its bounding set is enough", v)
	}
	if v := u.keys["Service"]["User"]; len(v) > 0 {
		t.Errorf("User = %q: the state and pin dirs must be root's", v)
	}
}

// The example config is valid, and so is it with every optional setting
// it shows ("# key: value") switched on; its state and pin dirs are the
// ones the unit makes writable.
func TestDistConfigLoads(t *testing.T) {
	c, err := config.Load(distConfig)
	if err != nil {
		t.Fatalf("%s: %v", distConfig, err)
	}
	for _, l := range c.Lines {
		for _, a := range []string{l.Gateway, l.Address} {
			if a != "" && !strings.HasPrefix(a, "192.0.2.") && !strings.HasPrefix(a, "198.51.100.") && !strings.HasPrefix(a, "203.0.113.") {
				t.Errorf("line %s: %s is not a documentation address (RFC 5737)", l.Name, a)
			}
		}
	}

	data, err := os.ReadFile(distConfig)
	if err != nil {
		t.Fatal(err)
	}
	optional := regexp.MustCompile(`(?m)^(\s*)# (\s*[a-z_]+:(\s.*)?)$`)
	all := optional.ReplaceAll(data, []byte("$1$2"))
	if n := len(optional.FindAll(data, -1)); n < 20 {
		t.Errorf("%s shows %d optional settings, want the keys of README's Config", distConfig, n)
	}
	full := filepath.Join(t.TempDir(), "uplinkd.yaml")
	if err := os.WriteFile(full, all, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Load(full); err != nil {
		t.Errorf("%s with every optional setting on: %v", distConfig, err)
	}

	u := parseUnit(t, distUnit)
	if want := "/run/" + u.one(t, "Service", "RuntimeDirectory"); c.StateDir != want {
		t.Errorf("state_dir %s, but the unit makes %s", c.StateDir, want)
	}
	rw := strings.Fields(u.one(t, "Service", "ReadWritePaths"))
	for _, dir := range []string{c.StateDir, c.Datapath.PinDir} {
		if !slices.ContainsFunc(rw, func(p string) bool { return dir == p || strings.HasPrefix(dir, p+"/") }) {
			t.Errorf("%s is not in the unit's ReadWritePaths %q", dir, rw)
		}
	}
}

// systemd-analyze verify accepts the unit: no unknown keys, bad values or
// missing executables. The binary is not installed here, so a copy of the
// unit runs a stand-in.
func TestDistUnitVerify(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("no systemd-analyze (Debian: apt-get install systemd)")
	}
	bin, _, _ := installPaths(t)
	dir := t.TempDir()
	stub := filepath.Join(dir, "uplinkd")
	if err := os.WriteFile(stub, []byte("#!/bin/sh\nexit 0\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(distUnit)
	if err != nil {
		t.Fatal(err)
	}
	text := strings.ReplaceAll(string(data), bin+" ", stub+" ")
	if !strings.Contains(text, stub+" run ") {
		t.Fatalf("ExecStart does not run %s", bin)
	}
	// verify wants every command to exist: a helper this machine lacks
	// (modprobe comes with Debian's kmod) runs the stand-in too.
	u := parseUnit(t, distUnit)
	for _, v := range u.keys["Service"]["ExecStartPre"] {
		if _, args := execArgs(v); len(args) > 0 {
			if _, err := os.Stat(args[0]); err != nil {
				t.Logf("%s is not on this machine (%v): a stand-in runs instead", args[0], err)
				text = strings.ReplaceAll(text, args[0]+" ", stub+" ")
			}
		}
	}
	unit := filepath.Join(dir, "uplinkd.service")
	if err := os.WriteFile(unit, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"verify", "--man=no", unit}
	if help, _ := exec.Command(analyze, "--help").Output(); bytes.Contains(help, []byte("--recursive-errors")) {
		// Only this unit: others on the machine are not this test's.
		args = slices.Insert(args, 1, "--recursive-errors=no")
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, analyze, args...)
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_COLOR=0", "SYSTEMD_PAGER=", "LC_ALL=C")
	out, err := cmd.CombinedOutput()
	t.Logf("systemd-analyze %s:\n%s", strings.Join(args, " "), out)
	if err != nil {
		t.Fatalf("systemd-analyze verify: %v", err)
	}
	// Unknown keys and unparsable values are warnings ("ignoring"), exit 0.
	for _, line := range strings.Split(string(out), "\n") {
		if strings.Contains(line, "uplinkd.service") {
			t.Errorf("systemd-analyze verify: %s", line)
		}
	}
}

// make install puts the three files under DESTDIR, keeps a config that is
// there already, and make uninstall removes the binary and the unit only.
func TestDistMakeInstall(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary")
	}
	makeTool, err := exec.LookPath("make")
	if err != nil {
		t.Skip("no make")
	}
	if _, err := exec.LookPath("go"); err != nil {
		t.Skip("no go tool to build the binary")
	}
	bin, unit, conf := installPaths(t)
	dest := t.TempDir()
	// BIN: build into the test's dir, not the checkout's bin/.
	run := func(target string) string {
		t.Helper()
		cmd := exec.Command(makeTool, "-C", "../..", target, "DESTDIR="+dest, "BIN="+filepath.Join(dest, "build", "uplinkd"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("make %s: %v\n%s", target, err, out)
		}
		return string(out)
	}
	mode := func(p string) os.FileMode {
		t.Helper()
		st, err := os.Stat(filepath.Join(dest, p))
		if err != nil {
			t.Fatal(err)
		}
		return st.Mode()
	}

	run("install")
	for p, want := range map[string]os.FileMode{bin: 0o755, unit: 0o644, conf: 0o644} {
		if got := mode(p); got != want {
			t.Errorf("%s: mode %v, want %v", p, got, want)
		}
	}
	for p, src := range map[string]string{unit: distUnit, conf: distConfig} {
		got, _ := os.ReadFile(filepath.Join(dest, p))
		want, _ := os.ReadFile(src)
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from %s", p, src)
		}
	}

	// An operator's config is never overwritten.
	mine := []byte("# the operator's\n")
	if err := os.WriteFile(filepath.Join(dest, conf), mine, 0o600); err != nil {
		t.Fatal(err)
	}
	if out := run("install"); !strings.Contains(out, "kept") {
		t.Errorf("make install again did not say it kept the config:\n%s", out)
	}
	if got, _ := os.ReadFile(filepath.Join(dest, conf)); !bytes.Equal(got, mine) {
		t.Errorf("make install overwrote %s: %q", conf, got)
	}

	run("uninstall")
	for _, p := range []string{bin, unit} {
		if _, err := os.Lstat(filepath.Join(dest, p)); !os.IsNotExist(err) {
			t.Errorf("make uninstall left %s (%v)", p, err)
		}
	}
	if got, _ := os.ReadFile(filepath.Join(dest, conf)); !bytes.Equal(got, mine) {
		t.Errorf("make uninstall did not keep %s", conf)
	}
}
