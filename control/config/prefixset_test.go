// SPDX-License-Identifier: Apache-2.0

package config

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// badSetFiles are prefix-set files and their errors, one each, as
// "set.txt:LINE: message" with the file's directory left out.
var badSetFiles = []struct {
	name, text string
	want       []string
}{
	{"bad lines", "# banks\n10.0.0.0/8\n10.1.2.3/8\n\nbank.example # a name\nfe80::1%eth0\n::ffff:10.0.0.1\n", []string{
		"set.txt:3: 10.1.2.3/8 has host bits set: 10.0.0.0/8?",
		`set.txt:5: want a prefix (192.0.2.0/24, 2001:db8::/32) or an address, got "bank.example"`,
		`set.txt:6: want a prefix (192.0.2.0/24, 2001:db8::/32) or an address, got "fe80::1%eth0"`,
		"set.txt:7: ::ffff:10.0.0.1 is IPv4 written as IPv6: write it as IPv4",
	}},
	{"long line", strings.Repeat("1", 5000) + "\n", []string{"set.txt: a line longer than 4096 bytes"}},
	{"many bad lines", strings.Repeat("x\n", 20), []string{
		`set.txt:1: want a prefix`, `set.txt:2: want a prefix`, `set.txt:3: want a prefix`, `set.txt:4: want a prefix`, `set.txt:5: want a prefix`,
		`set.txt:6: want a prefix`, `set.txt:7: want a prefix`, `set.txt:8: want a prefix`, `set.txt:9: want a prefix`, `set.txt:10: want a prefix`,
		"set.txt:10: too many errors, the rest of the file is not read",
	}},
}

// ReadPrefixSet names the file and the line of each problem.
func TestReadPrefixSetErrors(t *testing.T) {
	for _, tc := range badSetFiles {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			f := filepath.Join(dir, "set.txt")
			if err := os.WriteFile(f, []byte(tc.text), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := ReadPrefixSet(f)
			lines := strings.Split(fmt.Sprint(err), "\n")
			if err == nil || len(lines) != len(tc.want) {
				t.Fatalf("ReadPrefixSet:\n%v\nwant %d errors", err, len(tc.want))
			}
			for i, w := range tc.want {
				if w = filepath.Join(dir, w); !strings.HasPrefix(lines[i], w) {
					t.Errorf("error %d: %s\nwant: %s", i, lines[i], w)
				}
			}
		})
	}
	dir := t.TempDir()
	for _, tc := range []struct{ path, want string }{
		{filepath.Join(dir, "none.txt"), dir + "/none.txt: no such file or directory"},
		{dir, dir + ": not a regular file (d---------)"},
		{"/dev/null", "/dev/null: not a regular file"},
	} {
		if _, err := ReadPrefixSet(tc.path); err == nil || !strings.HasPrefix(err.Error(), tc.want) {
			t.Errorf("ReadPrefixSet(%s) = %v, want %s", tc.path, err, tc.want)
		}
	}
}

// An address is its /32 or /128; a prefix listed twice is kept once;
// comments and blanks are skipped.
func TestReadPrefixSet(t *testing.T) {
	f := filepath.Join(t.TempDir(), "ok.txt")
	if err := os.WriteFile(f, []byte("192.0.2.1\n2001:db8::1 # host\n\t192.0.2.1/32\n\n# x\n10.0.0.0/8\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, err := ReadPrefixSet(f)
	want := []netip.Prefix{netip.MustParsePrefix("192.0.2.1/32"), netip.MustParsePrefix("2001:db8::1/128"), netip.MustParsePrefix("10.0.0.0/8")}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("ReadPrefixSet = %v, %v; want %v", got, err, want)
	}
}

// A file without prefixes is an empty set, not an error: Load warns that
// the rules on it match nothing.
func TestEmptyPrefixSet(t *testing.T) {
	for _, text := range []string{"", "# nothing yet\n\n"} {
		f := filepath.Join(t.TempDir(), "set.txt")
		if err := os.WriteFile(f, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		if p, err := ReadPrefixSet(f); err != nil || len(p) != 0 {
			t.Errorf("%q: %v %v, want an empty set", text, p, err)
		}
	}
}
