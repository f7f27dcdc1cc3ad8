// SPDX-License-Identifier: Apache-2.0

// Package lab builds a throw-away multi-uplink network in named network
// namespaces: clients behind a switch, a gateway (the device under test),
// several ISP routers and a server host. Integration tests, the demo and the
// benchmarks all run against it.
//
//	c1..cN ─eth0─ sw(br0) ─lan0─ gw ─wanN─ ispN ─up0─ srv (servers on lo)
//
// The gateway only gets its interfaces and addresses; routes, rules,
// sysctls and NAT are left to the agent under test.
package lab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"regexp"
	"runtime"
	"sort"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where iproute2 keeps named network namespaces.
const NetnsDir = "/run/netns"

// Options sizes a lab. Zero values mean defaults.
type Options struct {
	Prefix  string // namespace name prefix; default "ul" + 6 random hex digits
	Clients int    // number of LAN clients, default 1, 1..16
	ISPs    int    // number of uplinks/ISP routers, default 2, 1..16 (the datapath's lines)
	Servers int    // number of server addresses on srv, default 1, 1..8
}

// Line describes one gateway line as the agent would be configured.
type Line struct {
	Name      string       // line name: "dsl1", "dsl2", ...
	Interface string       // gateway interface: "wan1", "wan2", ...
	Address   netip.Prefix // gateway address, e.g. 198.51.100.2/28
	Gateway   netip.Addr   // ISP router address, e.g. 198.51.100.1
	VIP       netip.Prefix // in an HA lab: the line's virtual address (the NAT source); zero otherwise
}

// Lab is a built topology. Close removes it.
type Lab struct {
	Prefix       string       // namespace name prefix of this lab
	Gateway      *Host        // the device under test
	Switch       *Host        // LAN bridge
	Clients      []*Host      // LAN clients c1..cN
	ISPs         []*Host      // ISP routers isp1..ispN
	Server       *Host        // server host behind every ISP
	LANInterface string       // gateway LAN interface: "lan0"
	LANAddress   netip.Prefix // gateway LAN address: 192.0.2.1/24
	Lines        []Line       // one per ISP, same order
	ServerAddrs  []netip.Addr // 203.0.113.100, .101, ...
}

var (
	prefixRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$`)
	nsRE     = regexp.MustCompile(`^(.+)-(gw|gw[0-9]+|sw|srv|c[0-9]+|isp[0-9]+)$`)
)

// ClientAddr returns client i's (1-based) LAN address, 192.0.2.(10+i)/24.
func ClientAddr(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}), 24)
}

// LineFor returns the addressing of line n (1-based).
func LineFor(n int) Line {
	base := byte(16 * (n - 1))
	return Line{
		Name:      "dsl" + strconv.Itoa(n),
		Interface: "wan" + strconv.Itoa(n),
		Address:   netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 51, 100, base + 2}), 28),
		Gateway:   netip.AddrFrom4([4]byte{198, 51, 100, base + 1}),
	}
}

// transit returns the ISP n side and srv side of the ISP n ↔ srv /30.
func transit(n int) (isp, srv netip.Prefix) {
	base := byte(4 * (n - 1))
	isp = netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, base + 1}), 30)
	srv = netip.PrefixFrom(netip.AddrFrom4([4]byte{203, 0, 113, base + 2}), 30)
	return isp, srv
}

// New builds a lab. On error everything it created is removed again.
func New(opts Options) (l *Lab, err error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	if Exists(opts.Prefix) {
		return nil, fmt.Errorf("lab %q already exists (see Remove)", opts.Prefix)
	}
	l = &Lab{
		Prefix:       opts.Prefix,
		LANInterface: "lan0",
		LANAddress:   netip.MustParsePrefix("192.0.2.1/24"),
	}
	b := &builder{lab: l, handles: map[*Host]*netlink.Handle{}}
	defer func() {
		b.close()
		if err != nil {
			for _, h := range b.created {
				err = errors.Join(err, deleteNamed(h.Name))
			}
			l = nil
		}
	}()

	if l.Gateway, err = b.host("gw"); err != nil {
		return nil, err
	}
	if l.Switch, err = b.host("sw"); err != nil {
		return nil, err
	}
	for i := 1; i <= opts.Clients; i++ {
		h, err := b.host("c" + strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		l.Clients = append(l.Clients, h)
	}
	for n := 1; n <= opts.ISPs; n++ {
		h, err := b.host("isp" + strconv.Itoa(n))
		if err != nil {
			return nil, err
		}
		l.ISPs = append(l.ISPs, h)
		l.Lines = append(l.Lines, LineFor(n))
	}
	if l.Server, err = b.host("srv"); err != nil {
		return nil, err
	}
	for i := 0; i < opts.Servers; i++ {
		l.ServerAddrs = append(l.ServerAddrs, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
	}
	return l, b.build()
}

func (o *Options) fill() error {
	if o.Prefix == "" {
		var r [3]byte
		if _, err := rand.Read(r[:]); err != nil {
			return fmt.Errorf("generating prefix: %w", err)
		}
		o.Prefix = "ul" + hex.EncodeToString(r[:])
	}
	if !prefixRE.MatchString(o.Prefix) {
		return fmt.Errorf("invalid lab prefix %q", o.Prefix)
	}
	def := func(v *int, d, max int, what string) error {
		if *v == 0 {
			*v = d
		}
		if *v < 1 || *v > max {
			return fmt.Errorf("%s must be 1..%d, got %d", what, max, *v)
		}
		return nil
	}
	return errors.Join(
		def(&o.Clients, 1, 16, "clients"),
		def(&o.ISPs, 2, 16, "ISPs"),
		def(&o.Servers, 1, 8, "servers"),
	)
}

// Close removes every namespace of the lab, and with them every link.
// It is safe to call more than once.
func (l *Lab) Close() error {
	if l == nil {
		return nil
	}
	var errs []error
	for _, h := range l.hosts() {
		errs = append(errs, deleteNamed(h.Name))
	}
	return errors.Join(errs...)
}

func (l *Lab) hosts() []*Host {
	hs := []*Host{l.Gateway, l.Switch}
	hs = append(hs, l.Clients...)
	hs = append(hs, l.ISPs...)
	hs = append(hs, l.Server)
	out := hs[:0]
	for _, h := range hs {
		if h != nil {
			out = append(out, h)
		}
	}
	return out
}

// Remove deletes every lab namespace named <prefix>-gw, -gwN, -sw, -srv,
// -cN or -ispN, e.g. left over by a killed run. It refuses an empty prefix.
func Remove(prefix string) error {
	if prefix == "" {
		return errors.New("refusing to remove labs with an empty prefix")
	}
	names, err := namespaces()
	if err != nil {
		return err
	}
	var errs []error
	for _, name := range names {
		if m := nsRE.FindStringSubmatch(name); m != nil && m[1] == prefix {
			errs = append(errs, deleteNamed(name))
		}
	}
	return errors.Join(errs...)
}

// List returns the prefixes of the labs that have namespaces in /run/netns.
func List() ([]string, error) {
	names, err := namespaces()
	if err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	var out []string
	for _, name := range names {
		if m := nsRE.FindStringSubmatch(name); m != nil && !seen[m[1]] {
			seen[m[1]] = true
			out = append(out, m[1])
		}
	}
	sort.Strings(out)
	return out, nil
}

// Exists reports whether any namespace of the lab with this prefix exists.
func Exists(prefix string) bool {
	names, _ := namespaces()
	for _, name := range names {
		if m := nsRE.FindStringSubmatch(name); m != nil && m[1] == prefix {
			return true
		}
	}
	return false
}

func namespaces() ([]string, error) {
	ents, err := os.ReadDir(NetnsDir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", NetnsDir, err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names, nil
}

// builder holds the per-namespace netlink handles while New runs.
type builder struct {
	lab     *Lab
	created []*Host
	handles map[*Host]*netlink.Handle
	ifindex int // last ifindex given to a veth's first end
}

func (b *builder) close() {
	for _, h := range b.handles {
		h.Close()
	}
}

// host creates the namespace <prefix>-suffix, brings lo up and applies the
// sysctls every lab host gets.
func (b *builder) host(suffix string) (*Host, error) {
	h := &Host{Name: b.lab.Prefix + "-" + suffix}
	if err := createNamed(h.Name); err != nil {
		if !errors.Is(err, fs.ErrExist) {
			_ = deleteNamed(h.Name) // a half-made bind mount or file
		}
		return nil, fmt.Errorf("creating namespace %s: %w", h.Name, err)
	}
	b.created = append(b.created, h)
	nh, err := h.Netlink()
	if err != nil {
		return h, err
	}
	b.handles[h] = nh
	lo, err := nh.LinkByName("lo")
	if err == nil {
		err = nh.LinkSetUp(lo)
	}
	if err != nil {
		return h, fmt.Errorf("bringing up lo in %s: %w", h.Name, err)
	}
	if suffix == "gw" || gatewayRE.MatchString(suffix) {
		return h, nil // the agent under test owns the gateway's sysctls
	}
	sysctls := map[string]string{
		// IPv6 link-local chatter (RS, MLD, DAD) only adds noise to captures.
		"net/ipv6/conf/all/disable_ipv6":     "1",
		"net/ipv6/conf/default/disable_ipv6": "1",
	}
	if suffix[0] == 'i' { // ispN
		sysctls["net/ipv4/ip_forward"] = "1"
	}
	err = h.Do(func() error {
		for k, v := range sysctls {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0); err != nil {
				return err
			}
		}
		// Bridged frames must not go through netfilter in the switch.
		_ = os.WriteFile("/proc/sys/net/bridge/bridge-nf-call-iptables", []byte("0"), 0)
		return nil
	})
	if err != nil {
		return h, fmt.Errorf("setting sysctls in %s: %w", h.Name, err)
	}
	return h, nil
}

// veth creates the pair a (in host ha) ↔ b (in host hb) and brings both up.
func (b *builder) veth(ha *Host, a string, hb *Host, bname string) (netlink.Link, netlink.Link, error) {
	peerNS, err := hb.NetNS()
	if err != nil {
		return nil, nil, err
	}
	defer peerNS.Close()
	na, nb := b.handles[ha], b.handles[hb]
	// The kernel treats a link whose ifindex equals its peer's (iflink) as
	// a physical NIC and applies its carrier changes only after up to a
	// second; in fresh namespaces both ends would often get the same small
	// index. Giving the first end an index from 100 up avoids that.
	b.ifindex++
	v := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: a, Index: 99 + b.ifindex},
		PeerName:      bname,
		PeerNamespace: netlink.NsFd(peerNS),
	}
	if err := na.LinkAdd(v); err != nil {
		return nil, nil, fmt.Errorf("creating veth %s: %w", a, err)
	}
	la, err := na.LinkByName(a)
	if err != nil {
		return nil, nil, fmt.Errorf("finding %s in %s: %w", a, ha.Name, err)
	}
	lb, err := nb.LinkByName(bname)
	if err != nil {
		return nil, nil, fmt.Errorf("finding %s in %s: %w", bname, hb.Name, err)
	}
	if err := na.LinkSetUp(la); err != nil {
		return nil, nil, fmt.Errorf("bringing up %s: %w", a, err)
	}
	if err := nb.LinkSetUp(lb); err != nil {
		return nil, nil, fmt.Errorf("bringing up %s: %w", bname, err)
	}
	return la, lb, nil
}

func (b *builder) addr(h *Host, l netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: prefixNet(p)}
	if err := b.handles[h].AddrAdd(l, a); err != nil {
		return fmt.Errorf("adding %s to %s in %s: %w", p, l.Attrs().Name, h.Name, err)
	}
	return nil
}

func (b *builder) route(h *Host, l netlink.Link, dst netip.Prefix, via netip.Addr) error {
	r := &netlink.Route{LinkIndex: l.Attrs().Index, Gw: via.AsSlice()}
	if dst.Bits() > 0 {
		r.Dst = prefixNet(dst)
	}
	if err := b.handles[h].RouteAdd(r); err != nil {
		return fmt.Errorf("adding route %s via %s in %s: %w", dst, via, h.Name, err)
	}
	return nil
}

func (b *builder) build() error {
	l := b.lab
	sw := b.handles[l.Switch]
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "br0"}}
	if err := sw.LinkAdd(br); err != nil {
		return fmt.Errorf("creating bridge br0: %w", err)
	}
	if err := sw.LinkSetUp(br); err != nil {
		return fmt.Errorf("bringing up br0: %w", err)
	}
	port := func(p netlink.Link) error {
		if err := sw.LinkSetMaster(p, br); err != nil {
			return fmt.Errorf("attaching %s to br0: %w", p.Attrs().Name, err)
		}
		return nil
	}

	// LAN: gateway and clients on the bridge.
	lan, gwPort, err := b.veth(l.Gateway, l.LANInterface, l.Switch, "gw")
	if err != nil {
		return err
	}
	if err := port(gwPort); err != nil {
		return err
	}
	if err := b.addr(l.Gateway, lan, l.LANAddress); err != nil {
		return err
	}
	for i, c := range l.Clients {
		eth, p, err := b.veth(c, "eth0", l.Switch, "c"+strconv.Itoa(i+1))
		if err != nil {
			return err
		}
		if err := port(p); err != nil {
			return err
		}
		if err := b.addr(c, eth, ClientAddr(i+1)); err != nil {
			return err
		}
		if err := b.route(c, eth, netip.Prefix{}, l.LANAddress.Addr()); err != nil {
			return err
		}
	}

	// Lines: gateway wanN ↔ ispN down0, ispN up0 ↔ srv ispN.
	for i, isp := range l.ISPs {
		n := i + 1
		u := l.Lines[i]
		wan, down, err := b.veth(l.Gateway, u.Interface, isp, "down0")
		if err != nil {
			return err
		}
		if err := b.addr(l.Gateway, wan, u.Address); err != nil {
			return err
		}
		if err := b.addr(isp, down, netip.PrefixFrom(u.Gateway, u.Address.Bits())); err != nil {
			return err
		}
		up, srvSide, err := b.veth(isp, "up0", l.Server, "isp"+strconv.Itoa(n))
		if err != nil {
			return err
		}
		ispNet, srvNet := transit(n)
		if err := b.addr(isp, up, ispNet); err != nil {
			return err
		}
		if err := b.addr(l.Server, srvSide, srvNet); err != nil {
			return err
		}
		if err := b.route(isp, up, netip.Prefix{}, srvNet.Addr()); err != nil {
			return err
		}
		// Replies to line n go back through ISP n; no route to the LAN.
		if err := b.route(l.Server, srvSide, u.Address.Masked(), ispNet.Addr()); err != nil {
			return err
		}
	}

	lo, err := b.handles[l.Server].LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo in %s: %w", l.Server.Name, err)
	}
	for _, a := range l.ServerAddrs {
		if err := b.addr(l.Server, lo, netip.PrefixFrom(a, 32)); err != nil {
			return err
		}
	}
	return b.waitUp(5 * time.Second)
}

// waitUp waits until every veth is operationally up. The kernel applies
// carrier changes (and activates the qdisc) asynchronously, and until then a
// veth drops what it is given. br0 is left out: its operstate follows about
// a second later (linkwatch rate limit) and does not affect forwarding.
func (b *builder) waitUp(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for h, nh := range b.handles {
		for {
			links, err := nh.LinkList()
			if err != nil {
				return fmt.Errorf("listing links in %s: %w", h.Name, err)
			}
			var down []string
			for _, l := range links {
				if a := l.Attrs(); l.Type() == "veth" && a.OperState != netlink.OperUp {
					down = append(down, a.Name+"="+a.OperState.String())
				}
			}
			if len(down) == 0 {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("links in %s not up after %v: %v", h.Name, timeout, down)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// createNamed creates /run/netns/name like `ip netns add`. The work happens
// on a dedicated, never unlocked OS thread, so the thread that was switched
// into the new namespace is discarded instead of going back to the Go
// scheduler.
func createNamed(name string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: see above
		orig, err := netns.Get()
		if err != nil {
			errc <- err
			return
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err != nil {
			errc <- err
			return
		}
		ns.Close()
		errc <- netns.Set(orig)
	}()
	return <-errc
}

// deleteNamed unmounts and removes /run/netns/name; a missing one is fine.
func deleteNamed(name string) error {
	p := NetnsDir + "/" + name
	if err := unmount(p); err != nil {
		return fmt.Errorf("unmounting %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing %s: %w", p, err)
	}
	return nil
}

func unmount(p string) error {
	err := unix.Unmount(p, unix.MNT_DETACH)
	if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil // not a mount point, or already gone
	}
	return err
}
