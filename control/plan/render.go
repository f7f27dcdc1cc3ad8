// SPDX-License-Identifier: Apache-2.0

package plan

import (
	"fmt"
	"hash/fnv"
	"io"
	"net/netip"
	"strings"
)

// RuleCommand is the `ip rule add` command for r, tagged with proto (0:
// no tag, for messages about a rule).
func RuleCommand(r Rule, proto int) string {
	var b strings.Builder
	fmt.Fprintf(&b, "ip rule add prio %d", r.Priority)
	if r.Src.IsValid() {
		fmt.Fprintf(&b, " from %s", r.Src)
	}
	if r.Mask != 0 {
		fmt.Fprintf(&b, " fwmark %#x/%#x", r.Mark, r.Mask)
	}
	fmt.Fprintf(&b, " lookup %s", tableName(r.Table))
	if r.SuppressPrefixLen >= 0 {
		fmt.Fprintf(&b, " suppress_prefixlength %d", r.SuppressPrefixLen)
	}
	if proto != 0 {
		fmt.Fprintf(&b, " proto %d", proto)
	}
	return b.String()
}

// RouteCommand is the `ip route replace` command for r, tagged with proto
// (0: no tag, for messages about a route).
func RouteCommand(r Route, proto int) string {
	var b strings.Builder
	b.WriteString("ip route replace ")
	switch r.Type {
	case Prohibit:
		b.WriteString("prohibit ")
	case Unreachable:
		b.WriteString("unreachable ")
	case Blackhole:
		b.WriteString("blackhole ")
	}
	b.WriteString(dstName(r))
	switch {
	case len(r.Nexthops) == 1:
		nh := r.Nexthops[0]
		fmt.Fprintf(&b, " via %s dev %s", nh.Gateway, nh.Device)
	}
	if r.Src.IsValid() {
		fmt.Fprintf(&b, " src %s", r.Src)
	}
	if r.Metric != 0 {
		fmt.Fprintf(&b, " metric %d", r.Metric)
	}
	if proto != 0 {
		fmt.Fprintf(&b, " proto %d", proto)
	}
	fmt.Fprintf(&b, " table %s", tableName(r.Table))
	if len(r.Nexthops) > 1 {
		for _, nh := range r.Nexthops {
			fmt.Fprintf(&b, " \\\n    nexthop via %s dev %s weight %d", nh.Gateway, nh.Device, nh.Weight)
		}
	}
	return b.String()
}

func dstName(r Route) string {
	if r.Dst.Bits() == 0 {
		return "default"
	}
	return r.Dst.String()
}

func tableName(t int) string {
	if t == TableMain {
		return "main"
	}
	return fmt.Sprint(t)
}

// Render writes s as the shell commands that would install it, each with a
// comment saying why it exists, in the order uplinkd applies them.
func Render(w io.Writer, s State, proto int) {
	fmt.Fprintln(w, "# sysctls (the values they replace are saved, and restored by `uplinkd down`)")
	for _, c := range s.Sysctls {
		fmt.Fprintf(w, "sysctl -w %s=%s  # %s\n", c.Name(), c.Value, c.Why)
	}
	fmt.Fprintln(w, "\n# routes, in their tables first")
	for _, r := range s.Routes {
		fmt.Fprintf(w, "# %s\n%s\n", r.Why, RouteCommand(r, proto))
	}
	fmt.Fprintln(w, "\n# then the rules that lead to them")
	for _, r := range s.Rules {
		fmt.Fprintf(w, "# %s\n%s\n", r.Why, RuleCommand(r, proto))
	}
	if s.NAT.Empty() {
		fmt.Fprintln(w, "\n# no NAT and no firewall: no nftables table")
		return
	}
	fmt.Fprintln(w, "\n# NAT and stateful forwarding, in uplinkd's own nftables table (replaced atomically)")
	fmt.Fprintln(w, "nft -f - <<'EOF'")
	fmt.Fprint(w, NFTScript(s.NAT))
	fmt.Fprintln(w, "EOF")
}

// NFTRule is one rule of uplinkd's nftables table, as data: the nat
// package builds its expressions from the fields, Text prints it.
type NFTRule struct {
	Chain    string // ChainPostrouting or ChainForward
	Iif      string // match iifname; "" any
	Oif      string // match oifname; "" any
	CtState  string // match "established,related", "invalid" or "new"; "" any
	Mark     uint32 // with MarkMask: match meta mark & MarkMask == Mark
	MarkMask uint32
	TCP      bool         // match meta l4proto tcp
	NotSYN   bool         // with TCP: match a segment that is not a plain SYN (tcp flags & (syn|ack) != syn)
	IPv4     bool         // match meta nfproto ipv4
	Src      netip.Prefix // match ip saddr (IPv4); zero: any
	Action   string       // NFTMasquerade, NFTSNAT, NFTAccept, NFTDrop, NFTReset, NFTReturn or NFTJumpLANSrc
	SNATTo   netip.Addr   // NFTSNAT only
	Why      string       // the start of the rule's comment in the kernel
}

// NFT chains and actions.
const (
	ChainPrerouting  = "prerouting"
	ChainPostrouting = "postrouting"
	ChainForward     = "forward"
	// ChainLANSrc, a chain without a hook, passes back (return) packets
	// from the LAN's subnets and drops the rest: the seed's -s NWI/NMI.
	ChainLANSrc = "lan_src"
	// ChainOwner, a chain without a hook (it sees no packet), holds the
	// owner rule: the mark by which uplinkd knows the table is its own.
	ChainOwner = "owner"
	// OwnerWhy is the owner rule's reason, the start of its comment.
	OwnerWhy = "uplinkd owns this table"

	NFTMasquerade = "masquerade"
	NFTSNAT       = "snat"
	NFTAccept     = "accept"
	NFTDrop       = "drop"
	NFTReset      = "reject with tcp reset"
	NFTReturn     = "return"
	NFTJumpLANSrc = "jump " + ChainLANSrc
)

// Text is the rule in nft syntax, without its comment.
func (r NFTRule) Text() string {
	var parts []string
	if r.Action == NFTSNAT || r.IPv4 {
		parts = append(parts, "meta nfproto ipv4")
	}
	if r.Iif != "" {
		parts = append(parts, fmt.Sprintf("iifname %q", r.Iif))
	}
	if r.Oif != "" {
		parts = append(parts, fmt.Sprintf("oifname %q", r.Oif))
	}
	if r.CtState != "" {
		parts = append(parts, "ct state "+r.CtState)
	}
	if r.MarkMask != 0 {
		parts = append(parts, fmt.Sprintf("meta mark & 0x%08x == 0x%08x", r.MarkMask, r.Mark))
	}
	switch {
	case r.TCP && r.NotSYN:
		// As nft lists it: the payload match implies l4proto tcp.
		parts = append(parts, "tcp flags != syn / syn,ack")
	case r.TCP:
		parts = append(parts, "meta l4proto tcp")
	}
	if r.Src.IsValid() {
		parts = append(parts, "ip saddr "+r.Src.String())
	}
	parts = append(parts, "counter")
	if r.Action == NFTSNAT {
		parts = append(parts, "snat ip to "+r.SNATTo.String())
	} else if r.Action != "" {
		parts = append(parts, r.Action)
	}
	return strings.Join(parts, " ")
}

// Comment is the rule's comment in the kernel: why it exists, and a hash
// of its text, so that reading the comments back tells whether the kernel
// holds exactly these rules.
func (r NFTRule) Comment() string {
	h := fnv.New32a()
	h.Write([]byte(r.Chain + ":" + r.Text()))
	return fmt.Sprintf("%s [%08x]", r.Why, h.Sum32())
}

// OwnerRule marks the table as uplinkd's: created with it, recognised by
// it, and required before uplinkd replaces or deletes a table.
var OwnerRule = NFTRule{Chain: ChainOwner, Why: OwnerWhy}

// NFTRules lists the rules of the NAT table in order, per chain: the owner
// rule first, then those that act on packets.
func NFTRules(n NAT) []NFTRule {
	rs := []NFTRule{OwnerRule}
	for _, d := range n.Dead {
		rs = append(rs, NFTRule{Chain: ChainPrerouting, Mark: d.Mark, MarkMask: d.Mask, TCP: true, Action: NFTReset,
			Why: "uplinkd: " + d.Line + " is down, its TCP flows get a reset"})
	}
	if n.HAGuard {
		for _, l := range n.Lines {
			rs = append(rs, NFTRule{Chain: ChainPrerouting, Iif: l.Interface, CtState: "new", TCP: true, NotSYN: true, Action: NFTDrop,
				Why: "uplinkd: HA: a TCP segment from " + l.Line + " that is not part of a known connection yet (after a takeover, not synced) would make a clashing entry"})
		}
		for _, lan := range n.LAN {
			rs = append(rs, NFTRule{Chain: ChainPrerouting, Iif: lan, CtState: "new", TCP: true, NotSYN: true, Action: NFTDrop,
				Why: "uplinkd: HA: a TCP segment from " + lan + " that is not part of a known connection yet (after a takeover, not synced) would be NAT'd anew"})
		}
	}
	if n.Mode != "none" {
		for _, l := range n.Lines {
			for _, lan := range n.LAN {
				r := NFTRule{Chain: ChainPostrouting, Iif: lan, Oif: l.Interface, Action: NFTMasquerade, Why: "uplinkd: NAT for " + l.Line}
				if l.Address.IsValid() {
					r.Action, r.SNATTo = NFTSNAT, l.Address
				}
				rs = append(rs, r)
			}
		}
	}
	if len(n.LANSubnets) > 0 {
		for _, lan := range n.LAN {
			rs = append(rs, NFTRule{Chain: ChainForward, Iif: lan, IPv4: true, Action: NFTJumpLANSrc,
				Why: "uplinkd: only the LAN's subnets are forwarded from " + lan})
		}
		for _, p := range n.LANSubnets {
			rs = append(rs, NFTRule{Chain: ChainLANSrc, Src: p, Action: NFTReturn, Why: "uplinkd: a LAN subnet"})
		}
		rs = append(rs, NFTRule{Chain: ChainLANSrc, Action: NFTDrop, Why: "uplinkd: a source outside the LAN's subnets (spoofed or bogon)"})
	}
	if n.Firewall {
		rs = append(rs,
			NFTRule{Chain: ChainForward, CtState: "established,related", Action: NFTAccept, Why: "uplinkd: replies pass"},
			NFTRule{Chain: ChainForward, CtState: "invalid", Action: NFTDrop, Why: "uplinkd: not part of any connection"},
		)
		for _, l := range n.Lines {
			for _, lan := range n.LAN {
				rs = append(rs, NFTRule{Chain: ChainForward, Iif: l.Interface, Oif: lan, Action: NFTDrop, Why: "uplinkd: nothing new from " + l.Line + " into the LAN"})
			}
		}
	}
	return rs
}

// NFTScript is the table as an `nft -f` script that replaces it atomically.
func NFTScript(n NAT) string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s\ndelete table inet %s\ntable inet %s {\n", n.Table, n.Table, n.Table)
	rules := NFTRules(n)
	for _, ch := range []struct{ name, decl string }{
		{ChainPrerouting, "type filter hook prerouting priority mangle; policy accept;"},
		{ChainPostrouting, "type nat hook postrouting priority srcnat; policy accept;"},
		{ChainForward, "type filter hook forward priority filter; policy accept;"},
		{ChainLANSrc, "# no hook: the forward chain jumps here for packets from the LAN"},
		{ChainOwner, "# no hook: it sees no packet, it marks the table as uplinkd's"},
	} {
		var body []string
		for _, r := range rules {
			if r.Chain == ch.name {
				body = append(body, fmt.Sprintf("\t\t%s comment %q", r.Text(), r.Comment()))
			}
		}
		if len(body) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\tchain %s {\n\t\t%s\n%s\n\t}\n", ch.name, ch.decl, strings.Join(body, "\n"))
	}
	b.WriteString("}\n")
	return b.String()
}
