// SPDX-License-Identifier: Apache-2.0

package config

import (
	"errors"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"unicode"

	"go.yaml.in/yaml/v3"
)

// FieldError is a problem with one field of a config file. It prints as
// "FILE:LINE: FIELD: MESSAGE", the way compilers report errors, so that
// editors can jump to it.
type FieldError struct {
	File  string
	Line  int
	Field string // e.g. "uplinks[1].gateway"; empty for the whole file
	Msg   string
}

func (e *FieldError) Error() string {
	var b strings.Builder
	b.WriteString(oneLine(e.File))
	if e.Line > 0 {
		fmt.Fprintf(&b, ":%d", e.Line)
	}
	if e.Field != "" {
		b.WriteString(": " + oneLine(e.Field))
	}
	b.WriteString(": " + oneLine(e.Msg))
	return b.String()
}

// oneLine escapes the control characters of s (a newline becomes \n): the
// file's own text (a key, a name in a list) ends up in messages, and a
// newline there would split one error into lines that name no file.
func oneLine(s string) string {
	if !strings.ContainsFunc(s, unicode.IsControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if unicode.IsControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

// List is a list in the file that may also be written as its one item:
// `proto: udp` is `proto: [udp]`. A scalar keeps the field's own path
// (rules[2].proto), an item of a list its index (rules[2].proto[1]).
type List []string

var listType = reflect.TypeFor[List]()

// positions maps a field path ("uplinks[1].gateway") to its line in the file.
type positions map[string]int

// decoder walks a YAML node tree into a Go value, rejecting unknown keys and
// recording where each field stands, so that every later error can name
// the file, the line and the field.
type decoder struct {
	file string
	pos  positions
	errs []error
}

func (d *decoder) fail(line int, field, format string, args ...any) {
	d.errs = append(d.errs, &FieldError{File: d.file, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)})
}

// decode fills v (a pointer) from n; path is v's field path.
func (d *decoder) decode(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	if path != "" {
		d.pos[path] = n.Line
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // an empty value keeps the default
	}
	if v.Kind() == reflect.Pointer && v.Type().Elem().Kind() == reflect.Struct {
		v.Set(reflect.New(v.Type().Elem()))
		v = v.Elem()
	}
	switch v.Kind() {
	case reflect.Struct:
		d.decodeStruct(n, v, path)
	case reflect.Slice:
		if n.Kind == yaml.ScalarNode && v.Type() == listType {
			v.Set(reflect.ValueOf(List{n.Value}))
			return
		}
		if n.Kind != yaml.SequenceNode {
			d.fail(n.Line, path, "want a list, got %s", kindName(n))
			return
		}
		s := reflect.MakeSlice(v.Type(), len(n.Content), len(n.Content))
		for i, item := range n.Content {
			d.decode(item, s.Index(i), fmt.Sprintf("%s[%d]", path, i))
		}
		v.Set(s)
	default:
		if n.Kind != yaml.ScalarNode {
			d.fail(n.Line, path, "want a single value, got %s", kindName(n))
			return
		}
		t := v.Type()
		if t.Kind() == reflect.Pointer {
			t = t.Elem()
		}
		if isInteger(t) && n.Tag != "!!int" {
			// yaml would truncate 2.5 to 2.
			d.fail(n.Line, path, "want a whole number, got %q", n.Value)
			return
		}
		if err := n.Decode(v.Addr().Interface()); err != nil {
			d.fail(n.Line, path, "%s", scalarError(err, n, t))
		}
	}
}

func (d *decoder) decodeStruct(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.MappingNode {
		d.fail(n.Line, path, "want a mapping of keys, got %s", kindName(n))
		return
	}
	fields := map[string]reflect.Value{}
	var known []string
	var collect func(v reflect.Value)
	collect = func(v reflect.Value) {
		for i := 0; i < v.NumField(); i++ {
			name, opts, _ := strings.Cut(v.Type().Field(i).Tag.Get("yaml"), ",")
			switch {
			case opts == "inline":
				collect(v.Field(i))
			case name != "" && name != "-":
				fields[name] = v.Field(i)
				known = append(known, name)
			}
		}
	}
	collect(v)
	seen := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		sub := k.Value
		if path != "" {
			sub = path + "." + k.Value
		}
		if line, dup := seen[k.Value]; dup {
			d.fail(k.Line, sub, "duplicate key (first at line %d)", line)
			continue
		}
		seen[k.Value] = k.Line
		fv, ok := fields[k.Value]
		if !ok {
			d.fail(k.Line, sub, "unknown key (known here: %s)", strings.Join(known, ", "))
			continue
		}
		d.decode(val, fv, sub)
	}
}

func isInteger(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Uint, reflect.Uint8,
		reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	case reflect.Int64:
		return t.String() != "time.Duration"
	}
	return false
}

func kindName(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	default:
		return fmt.Sprintf("%q", n.Value)
	}
}

// scalarError rewrites yaml's "cannot unmarshal !!str `x` into int" into
// something a person reads at a glance.
func scalarError(err error, n *yaml.Node, t reflect.Type) string {
	var te *yaml.TypeError
	if errors.As(err, &te) {
		want := t.Kind().String()
		switch t.Kind() {
		case reflect.Int64:
			want = "a whole number"
			if t.String() == "time.Duration" {
				want = "a duration such as 200ms"
			}
		case reflect.Int, reflect.Int32, reflect.Uint32, reflect.Uint8, reflect.Uint16, reflect.Uint64:
			want = "a whole number"
		case reflect.Bool:
			want = "true or false"
		case reflect.String:
			want = "a string"
		}
		return fmt.Sprintf("want %s, got %q", want, n.Value)
	}
	return err.Error()
}

// yamlError turns a syntax error from the YAML parser into a FieldError
// with the line number the parser reported.
func yamlError(file string, err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 0
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if _, err := fmt.Sscanf(rest, "%d:", &line); err == nil {
			_, msg, _ = strings.Cut(rest, ": ")
		}
	}
	return &FieldError{File: file, Line: line, Msg: "malformed YAML: " + msg}
}
