// SPDX-License-Identifier: Apache-2.0

package lab

import (
	"fmt"
	"strings"
)

// Config returns an uplinkd config for the lab's gateway: the LAN
// interface and every uplink with weight 1, the line addresses left to
// discovery (as with DHCP), and state kept in stateDir. extra is appended
// as is (YAML at the top level).
func (l *Lab) Config(stateDir, extra string) string {
	var b strings.Builder
	fmt.Fprintf(&b, "lan:\n  interfaces: [%s]\nuplinks:\n", l.LANInterface)
	for _, u := range l.Uplinks {
		fmt.Fprintf(&b, "  - name: %s\n    interface: %s\n    gateway: %s\n", u.Name, u.Interface, u.Gateway)
	}
	fmt.Fprintf(&b, "nat: masquerade\nstate_dir: %s\n", stateDir)
	b.WriteString(extra)
	return b.String()
}

// HostOf returns the host of a lab by its short name (gw, sw, srv, c1,
// isp2, ...), whether or not this process built the lab.
func HostOf(prefix, name string) (*Host, error) {
	h := &Host{Name: prefix + "-" + name}
	if !nsRE.MatchString(h.Name) {
		return nil, fmt.Errorf("no lab host %q: want gw, sw, srv, cN or ispN", name)
	}
	return h, nil
}
