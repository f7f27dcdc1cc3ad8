// SPDX-License-Identifier: Apache-2.0

package sysctl

import (
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"testing"

	"github.com/uplinkd/uplinkd/control/config"
	"github.com/uplinkd/uplinkd/control/plan"
)

// memFS is an in-memory /proc/sys.
type memFS map[string]string

func (m memFS) Get(p string) (string, error) {
	v, ok := m[p]
	if !ok {
		return "", fs.ErrNotExist
	}
	return v, nil
}

func (m memFS) Set(p, v string) error {
	if _, ok := m[p]; !ok {
		return fs.ErrNotExist
	}
	m[p] = v
	return nil
}

var want = []plan.Sysctl{
	{Path: "net/ipv4/ip_forward", Value: "1"},
	{Path: "net/ipv4/fib_multipath_hash_fields", Value: "0x37"},
	{Path: "net/ipv4/conf/wan1/rp_filter", Value: "2"},
}

func TestApplyRestore(t *testing.T) {
	dir := t.TempDir()
	orig := memFS{"net/ipv4/ip_forward": "0", "net/ipv4/fib_multipath_hash_fields": "55", "net/ipv4/conf/wan1/rp_filter": "1"}
	m := maps.Clone(orig)

	n, err := Apply(m, want, dir)
	if err != nil || n != 2 {
		t.Fatalf("Apply = %d, %v; want 2 changes (hash_fields is already 0x37 = 55)", n, err)
	}
	if m["net/ipv4/ip_forward"] != "1" || m["net/ipv4/conf/wan1/rp_filter"] != "2" {
		t.Errorf("not applied: %v", m)
	}
	// A restarted agent (after a crash) must not record its own values
	// as the originals.
	if n, err := Apply(m, want, dir); err != nil || n != 0 {
		t.Errorf("second Apply = %d, %v", n, err)
	}
	n, err = Restore(m, dir)
	if err != nil || n != 2 {
		t.Fatalf("Restore = %d, %v", n, err)
	}
	if !maps.Equal(m, orig) {
		t.Errorf("after Restore %v, want %v", m, orig)
	}
	if _, err := os.Stat(filepath.Join(dir, SavedFile)); !os.IsNotExist(err) {
		t.Errorf("saved file left behind: %v", err)
	}
	if n, err := Restore(m, dir); err != nil || n != 0 {
		t.Errorf("Restore with nothing saved = %d, %v", n, err)
	}
}

// An interface that disappeared takes its sysctls with it: restoring the
// rest still works.
func TestRestoreVanishedInterface(t *testing.T) {
	dir := t.TempDir()
	m := memFS{"net/ipv4/ip_forward": "0", "net/ipv4/fib_multipath_hash_fields": "7", "net/ipv4/conf/wan1/rp_filter": "0"}
	if _, err := Apply(m, want, dir); err != nil {
		t.Fatal(err)
	}
	delete(m, "net/ipv4/conf/wan1/rp_filter")
	if n, err := Restore(m, dir); err != nil || n != 2 {
		t.Errorf("Restore = %d, %v", n, err)
	}
	if m["net/ipv4/ip_forward"] != "0" {
		t.Errorf("ip_forward not restored: %v", m)
	}
}

func TestApplyReportsMissing(t *testing.T) {
	m := memFS{"net/ipv4/ip_forward": "0"}
	n, err := Apply(m, want, t.TempDir())
	if err == nil || n != 1 {
		t.Errorf("Apply = %d, %v; want 1 change and an error for the missing ones", n, err)
	}
}

func TestSame(t *testing.T) {
	for _, c := range []struct {
		a, b string
		same bool
	}{{"0x37", "55", true}, {"1", "1", true}, {"1", "2", false}, {"cubic", "cubic", true}, {"cubic", "bbr", false}} {
		if Same(c.a, c.b) != c.same {
			t.Errorf("Same(%q, %q) = %v", c.a, c.b, !c.same)
		}
	}
}

// A saved-sysctl file edited to name another path (its keys become paths
// below /proc/sys) is refused whole: nothing is written anywhere.
func TestRestoreRefusesForeignKeys(t *testing.T) {
	for _, bad := range []string{
		`{"../../var/tmp/victim": "1"}`,
		`{"net/ipv4/conf/../../../var/tmp/victim/rp_filter": "1"}`,
		`{"kernel/core_pattern": "1"}`,
		`{"net/ipv4/ip_forward": "1; reboot"}`,
	} {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, SavedFile), []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		fs := memFS{"net/ipv4/ip_forward": "1"}
		before := maps.Clone(fs)
		if _, err := Restore(fs, dir); err == nil {
			t.Errorf("%s: restored", bad)
		}
		if !maps.Equal(fs, before) {
			t.Errorf("%s: sysctls changed to %v", bad, fs)
		}
	}
}

// Every sysctl the plan sets is one Restore accepts back.
func TestOwnedCoversThePlan(t *testing.T) {
	lines := []plan.Line{{Line: config.Line{Name: "a", Interface: "wan-1.100"}}}
	for _, s := range plan.Build(ptr(config.Default()), lines).Sysctls {
		if !Owned(s.Path) {
			t.Errorf("plan sets %s, which Owned refuses", s.Path)
		}
	}
}

func ptr[T any](v T) *T { return &v }

// orderFS records the order of writes.
type orderFS struct {
	memFS
	writes []string
}

func (o *orderFS) Set(p, v string) error {
	o.writes = append(o.writes, p)
	return o.memFS.Set(p, v)
}

// Restore turns forwarding back first, before anything else (and before
// the caller removes the firewall).
func TestRestoreForwardingFirst(t *testing.T) {
	dir := t.TempDir()
	f := &orderFS{memFS: memFS{"net/ipv4/ip_forward": "0", "net/ipv4/fib_multipath_hash_fields": "0x7", "net/ipv4/conf/wan1/rp_filter": "1"}}
	if _, err := Apply(f.memFS, want, dir); err != nil {
		t.Fatal(err)
	}
	if _, err := Restore(f, dir); err != nil {
		t.Fatal(err)
	}
	if len(f.writes) != 3 || f.writes[0] != plan.ForwardingSysctl {
		t.Errorf("restored in the order %v, want %s first", f.writes, plan.ForwardingSysctl)
	}
}
