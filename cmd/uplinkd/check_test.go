// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// check prints warnings and "ok" for a good config, and the errors with
// exit status 2 (a usageError) for a bad one, touching no kernel state.
func TestCheck(t *testing.T) {
	dir := t.TempDir()
	const base = `lan: {interfaces: [eth0]}
uplinks:
  - {name: fiber, interface: eth1, gateway: 203.0.113.1}
  - {name: dsl, interface: eth2, gateway: 198.51.100.1}
prefix_sets:
  - {name: banks, file: banks.txt}
rules:
  - {dst_set: banks, line: fiber, sticky: 30m}
`
	if err := os.WriteFile(filepath.Join(dir, "banks.txt"), []byte("198.18.0.0/15\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, yaml     string
		stdout, stderr string // stderr: a substring
		bad            string // the error: a substring; "" for none
	}{
		{"ok", base, "ok\n", "", ""},
		{"warning", base + "  - {dst: 198.18.1.0/24, line: dsl}\n", "ok\n", "c.yaml:9: rules[1]: shadowed by rules[0] (rule-1)\n", ""},
		{"errors", base + "  - {dst: 198.18.1.1/24, line: cable}\n", "", "", "c.yaml:9: rules[1].dst: 198.18.1.1/24 has host bits set: 198.18.1.0/24?\n" + dir + "/c.yaml:9: rules[1].line: unknown line \"cable\""},
		{"bad set file", strings.Replace(base, "banks.txt", "none.txt", 1), "", "", "c.yaml:6: prefix_sets[0].file: " + dir + "/none.txt: no such file or directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(dir, "c.yaml")
			if err := os.WriteFile(file, []byte(tc.yaml), 0o600); err != nil {
				t.Fatal(err)
			}
			var stdout, stderr bytes.Buffer
			err := run([]string{"check", "-c", file}, &stdout, &stderr)
			var ue usageError
			switch {
			case tc.bad == "" && err != nil:
				t.Fatalf("check: %v", err)
			case tc.bad != "" && (!errors.As(err, &ue) || !strings.Contains(err.Error(), tc.bad)):
				t.Fatalf("check: %v (%T), want a usage error (exit 2) with %q", err, err, tc.bad)
			}
			if stdout.String() != tc.stdout || !strings.Contains(stderr.String(), tc.stderr) {
				t.Errorf("stdout %q stderr %q; want %q and %q", stdout.String(), stderr.String(), tc.stdout, tc.stderr)
			}
		})
	}
	var stdout, stderr bytes.Buffer
	if err := run([]string{"check"}, &stdout, &stderr); !errors.As(err, new(usageError)) {
		t.Errorf("check without -c: %v, want a usage error", err)
	}
}
