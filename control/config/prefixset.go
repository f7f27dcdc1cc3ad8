// SPDX-License-Identifier: Apache-2.0

package config

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"strings"
	"syscall"
)

// Limits of prefix sets.
const (
	// MaxPrefixSets bounds prefix_sets.
	MaxPrefixSets = 256
	// MaxPrefixes bounds the prefixes of all sets together (and of one
	// file): the datapath's address tables hold them.
	MaxPrefixes = 65536
	// MaxPrefixSetFileSize bounds a prefix-set file: 65536 prefixes with
	// comments fit in a few MiB.
	MaxPrefixSetFileSize = 16 << 20
	// maxFileErrors is how many bad lines of one file are reported.
	maxFileErrors = 10
)

// ReadPrefixSet reads a prefix-set file: one prefix or address a line,
// '#' starting a comment, blank lines ignored. An address is its /32 or
// /128; a prefix listed twice is kept once. Errors name the file and the
// line ("banks.txt:7: ..."), each a *FieldError. A file without prefixes
// is an empty set: the rules on it match nothing.
func ReadPrefixSet(path string) ([]netip.Prefix, error) {
	fail := func(line int, format string, args ...any) error {
		return &FieldError{File: path, Line: line, Msg: fmt.Sprintf(format, args...)}
	}
	// O_NONBLOCK: opening a FIFO must not wait for a writer; a regular
	// file reads as usual.
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, fail(0, "%s", pathErr(err))
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, fail(0, "%s", pathErr(err))
	} else if !st.Mode().IsRegular() {
		return nil, fail(0, "not a regular file (%s)", st.Mode().Type())
	}
	var (
		out  []netip.Prefix
		seen = map[netip.Prefix]bool{}
		errs []error
	)
	sc := bufio.NewScanner(io.LimitReader(f, MaxPrefixSetFileSize+1))
	sc.Buffer(nil, 4096)
	read := 0
	for n := 1; sc.Scan(); n++ {
		read += len(sc.Bytes()) + 1
		text, _, _ := strings.Cut(sc.Text(), "#")
		text = strings.TrimSpace(text)
		if text == "" {
			continue
		}
		p, msg := parsePrefix(text)
		switch {
		case msg != "":
			errs = append(errs, fail(n, "%s", msg))
		case seen[p]:
		case len(out) == MaxPrefixes:
			return nil, fail(n, "more than %d prefixes", MaxPrefixes)
		default:
			seen[p] = true
			out = append(out, p)
		}
		if len(errs) == maxFileErrors {
			errs = append(errs, fail(n, "too many errors, the rest of the file is not read"))
			break
		}
	}
	switch err := sc.Err(); {
	case errors.Is(err, bufio.ErrTooLong):
		return nil, fail(0, "a line longer than 4096 bytes: not a prefix list")
	case err != nil:
		return nil, fail(0, "%s", pathErr(err))
	case read > MaxPrefixSetFileSize:
		return nil, fail(0, "larger than %d bytes", MaxPrefixSetFileSize)
	case len(errs) > 0:
		return nil, errors.Join(errs...)
	}
	return out, nil
}

// parsePrefix parses a prefix or an address (its /32 or /128), as rules
// and prefix sets write them; it returns what is wrong, or "".
func parsePrefix(s string) (netip.Prefix, string) {
	p, err := netip.ParsePrefix(s)
	if err != nil {
		a, aerr := netip.ParseAddr(s)
		if aerr != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Sprintf("want a prefix (192.0.2.0/24, 2001:db8::/32) or an address, got %q", s)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	switch {
	case p.Addr().Is4In6():
		return netip.Prefix{}, fmt.Sprintf("%s is IPv4 written as IPv6: write it as IPv4", s)
	case p != p.Masked():
		return netip.Prefix{}, fmt.Sprintf("%s has host bits set: %s?", p, p.Masked())
	}
	return p, ""
}

// pathErr is an os error without the path, which the FieldError names.
func pathErr(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}
