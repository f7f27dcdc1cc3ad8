// SPDX-License-Identifier: Apache-2.0

package routing

import (
	"fmt"
	"strings"

	"github.com/uplinkd/uplinkd/control/plan"
)

// Fake is an in-memory Kernel for tests without root. It holds the
// tagged rules and routes and logs every change as a line of text.
type Fake struct {
	RuleSet  []plan.Rule
	RouteSet []plan.Route
	Log      []string
	// Fail makes the named operation ("AddRule", "ReplaceRoute", ...)
	// return an error once for the rule or route whose Key is given.
	Fail map[string]string
}

var _ Kernel = (*Fake)(nil)

func (f *Fake) fail(op, key string) error {
	if f.Fail[op] == key {
		delete(f.Fail, op)
		return fmt.Errorf("injected %s failure", op)
	}
	return nil
}

// Rules returns a copy of the rule set.
func (f *Fake) Rules() ([]plan.Rule, error) { return append([]plan.Rule(nil), f.RuleSet...), nil }

// AddRule adds r, like the kernel: an existing rule is left alone.
func (f *Fake) AddRule(r plan.Rule) error {
	if err := f.fail("AddRule", r.Key()); err != nil {
		return err
	}
	r.Why = ""
	for _, have := range f.RuleSet {
		if have.Key() == r.Key() {
			return nil
		}
	}
	f.RuleSet = append(f.RuleSet, r)
	plan.SortRules(f.RuleSet)
	f.Log = append(f.Log, "+ "+plan.RuleCommand(r, 0))
	return nil
}

// DelRule deletes r.
func (f *Fake) DelRule(r plan.Rule) error {
	if err := f.fail("DelRule", r.Key()); err != nil {
		return err
	}
	for i, have := range f.RuleSet {
		if have.Key() == r.Key() {
			f.RuleSet = append(f.RuleSet[:i], f.RuleSet[i+1:]...)
			f.Log = append(f.Log, "- "+plan.RuleCommand(r, 0))
			return nil
		}
	}
	return nil
}

// Routes returns a copy of the route set.
func (f *Fake) Routes() ([]plan.Route, error) {
	return append([]plan.Route(nil), f.RouteSet...), nil
}

// ReplaceRoute adds r or replaces the route with its key.
func (f *Fake) ReplaceRoute(r plan.Route) error {
	if err := f.fail("ReplaceRoute", r.Key()); err != nil {
		return err
	}
	r.Why = ""
	f.Log = append(f.Log, "~ "+strings.ReplaceAll(plan.RouteCommand(r, 0), " \\\n   ", ""))
	for i, have := range f.RouteSet {
		if have.Key() == r.Key() {
			f.RouteSet[i] = r
			return nil
		}
	}
	f.RouteSet = append(f.RouteSet, r)
	plan.SortRoutes(f.RouteSet)
	return nil
}

// DelRoute deletes the route with r's key.
func (f *Fake) DelRoute(r plan.Route) error {
	if err := f.fail("DelRoute", r.Key()); err != nil {
		return err
	}
	for i, have := range f.RouteSet {
		if have.Key() == r.Key() {
			f.RouteSet = append(f.RouteSet[:i], f.RouteSet[i+1:]...)
			f.Log = append(f.Log, "- "+strings.ReplaceAll(plan.RouteCommand(r, 0), " \\\n   ", ""))
			return nil
		}
	}
	return nil
}
