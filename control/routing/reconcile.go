// SPDX-License-Identifier: Apache-2.0

// Package routing reconciles uplinkd's policy rules and routes: it diffs
// the desired ones against those the kernel holds with uplinkd's protocol
// tag, and applies only the difference. Everything else in the kernel is
// invisible to it.
package routing

import (
	"errors"
	"fmt"

	"github.com/uplinkd/uplinkd/control/plan"
)

// Kernel is the part of netlink that reconciling needs. Rules and Routes
// return only what carries uplinkd's protocol tag; Add/Replace tag what
// they create. Netlink is the real one; Fake records calls for tests.
type Kernel interface {
	Rules() ([]plan.Rule, error)
	AddRule(plan.Rule) error
	DelRule(plan.Rule) error
	Routes() ([]plan.Route, error)
	ReplaceRoute(plan.Route) error
	DelRoute(plan.Route) error
}

// Result counts what a reconcile changed.
type Result struct {
	RulesAdded, RulesDeleted, RoutesReplaced, RoutesDeleted int
}

// Changed reports whether anything was changed.
func (r Result) Changed() bool { return r != Result{} }

func (r Result) String() string {
	return fmt.Sprintf("rules +%d -%d, routes ~%d -%d", r.RulesAdded, r.RulesDeleted, r.RoutesReplaced, r.RoutesDeleted)
}

// Reconcile makes the kernel's tagged rules and routes equal to want.
// Routes go first, so a new rule never points at an empty table; new rules
// are added before stale ones are deleted, so no packet falls through a
// gap. It goes on after a failure and returns what it did with every
// error, joined.
func Reconcile(k Kernel, want plan.State) (Result, error) {
	var res Result
	var errs []error

	haveRoutes, err := k.Routes()
	if err != nil {
		return res, fmt.Errorf("listing routes: %w", err)
	}
	haveRules, err := k.Rules()
	if err != nil {
		return res, fmt.Errorf("listing rules: %w", err)
	}

	routes := map[string]plan.Route{}
	for _, r := range haveRoutes {
		routes[r.Key()] = r
	}
	wantRoutes := map[string]bool{}
	for _, r := range want.Routes {
		wantRoutes[r.Key()] = true
		if have, ok := routes[r.Key()]; ok && have.Equal(r) {
			continue
		}
		if err := k.ReplaceRoute(r); err != nil {
			errs = append(errs, fmt.Errorf("replacing route %s: %w", plan.RouteCommand(r, 0), err))
			continue
		}
		res.RoutesReplaced++
	}

	rules := map[string]bool{}
	for _, r := range haveRules {
		rules[r.Key()] = true
	}
	wantRules := map[string]bool{}
	for _, r := range want.Rules {
		wantRules[r.Key()] = true
		if rules[r.Key()] {
			continue
		}
		if err := k.AddRule(r); err != nil {
			errs = append(errs, fmt.Errorf("adding rule %s: %w", plan.RuleCommand(r, 0), err))
			continue
		}
		res.RulesAdded++
	}
	for _, r := range haveRules {
		if wantRules[r.Key()] {
			continue
		}
		if err := k.DelRule(r); err != nil {
			errs = append(errs, fmt.Errorf("deleting rule %s: %w", plan.RuleCommand(r, 0), err))
			continue
		}
		res.RulesDeleted++
	}
	for _, r := range haveRoutes {
		if wantRoutes[r.Key()] {
			continue
		}
		if err := k.DelRoute(r); err != nil {
			errs = append(errs, fmt.Errorf("deleting route %s: %w", plan.RouteCommand(r, 0), err))
			continue
		}
		res.RoutesDeleted++
	}
	return res, errors.Join(errs...)
}

// Remove deletes every tagged rule, then every tagged route.
func Remove(k Kernel) (Result, error) {
	return Reconcile(k, plan.State{})
}
