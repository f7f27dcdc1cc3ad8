// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"fmt"
	"net/netip"
	"strings"
)

// ConfigOptions shape the config that Config writes for a lab.
type ConfigOptions struct {
	StateDir   string   // the agent's state_dir; required
	PinDir     string   // datapath.pin_dir; default /sys/fs/bpf/uplinkd-<prefix>, so labs never share maps
	NoDatapath bool     // datapath.enabled: false (the seed's behaviour)
	Attach     string   // datapath.attach; default auto
	Flows      uint32   // datapath.flow_entries; default 65536 (the product's default, 1M, preallocates 176 MiB)
	Weights    []int    // per line; default 1 each
	LineExtra  []string // per line: YAML appended to its block, indented by 4
	Extra      string   // appended as is (YAML at the top level)
	// Order lists the lines (indexes of Lab.Lines) in the order the
	// config names them; nil: all, in order. Weights and LineExtra follow
	// the lines, not the order.
	Order []int
}

// Config returns an uplinkd config for the lab's gateway: the LAN
// interface and every line, the line addresses left to discovery (as
// with DHCP).
func (l *Lab) Config(o ConfigOptions) string {
	var b strings.Builder
	fmt.Fprintf(&b, "lan:\n  interfaces: [%s]\nuplinks:\n", l.LANInterface)
	order := o.Order
	if order == nil {
		for i := range l.Lines {
			order = append(order, i)
		}
	}
	for _, i := range order {
		u := l.Lines[i]
		fmt.Fprintf(&b, "  - name: %s\n    interface: %s\n    gateway: %s\n", u.Name, u.Interface, u.Gateway)
		if i < len(o.Weights) {
			fmt.Fprintf(&b, "    weight: %d\n", o.Weights[i])
		}
		if i < len(o.LineExtra) {
			b.WriteString(o.LineExtra[i])
		}
	}
	if o.PinDir == "" {
		o.PinDir = l.PinDir()
	}
	if o.Flows == 0 {
		o.Flows = 1 << 16
	}
	fmt.Fprintf(&b, "nat: masquerade\nstate_dir: %s\ndatapath:\n  pin_dir: %s\n  flow_entries: %d\n", o.StateDir, o.PinDir, o.Flows)
	if o.NoDatapath {
		b.WriteString("  enabled: false\n")
	}
	if o.Attach != "" {
		fmt.Fprintf(&b, "  attach: %s\n", o.Attach)
	}
	b.WriteString(o.Extra)
	return b.String()
}

// PinDir is the lab's own bpffs directory for the agent's maps and links.
func (l *Lab) PinDir() string { return "/sys/fs/bpf/uplinkd-" + l.Prefix }

// HostOf returns the host of a lab by its short name (gw, sw, srv, c1,
// isp2, ...), whether or not this process built the lab.
func HostOf(prefix, name string) (*Host, error) {
	h := &Host{Name: prefix + "-" + name}
	if !nsRE.MatchString(h.Name) {
		return nil, fmt.Errorf("no lab host %q: want gw, gwN, sw, srv, cN or ispN", name)
	}
	return h, nil
}

// LineOf returns the number (1-based) of the line whose address (or, in
// an HA lab, virtual address) is addr, the NAT source the server sees of a
// flow that left by that line; 0 when no line has it.
func (l *Lab) LineOf(addr netip.Addr) int {
	for i, u := range l.Lines {
		if addr == u.Address.Addr() || u.VIP.IsValid() && addr == u.VIP.Addr() {
			return i + 1
		}
	}
	return 0
}
