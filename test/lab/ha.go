// SPDX-License-Identifier: Apache-2.0

package lab

// The HA lab: two gateways, an active/standby pair, on one LAN and the
// same lines, each segment a bridge of its own in the switch namespace
// (multicast snooping off, so that VRRP's adverts reach the peer), and a
// direct sync link between the gateways for conntrackd.
//
//	c1..cN ─eth0─ sw(lan) ─lan0─ gw1, gw2
//	gw1, gw2 ─wanN─ sw(lineN) ─down0─ ispN ─up0─ srv (servers on lo)
//	gw1 ─sync0─ gw2
//
// Clients use the LAN's virtual address as their gateway; ISP n routes
// line n's subnet (the virtual address included) back to the segment.
// The gateways get their interfaces and own addresses only: the virtual
// addresses are keepalived's, routes, sysctls and NAT the agent's.

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// gatewayRE names the gateways of an HA lab: gw1, gw2.
var gatewayRE = regexp.MustCompile(`^gw[0-9]+$`)

// HAOptions size an HA lab. Zero values mean defaults.
type HAOptions struct {
	Prefix  string // namespace name prefix; default "ul" + 6 random hex digits
	Clients int    // LAN clients, default 1, 1..16
	ISPs    int    // lines, default 2, 1..8
	Servers int    // server addresses on srv, default 1, 1..8
}

// HALab is a built HA topology. Close removes it.
type HALab struct {
	Prefix      string
	Gateways    []*HAGateway // gw1 (priority 150), gw2 (priority 100)
	Switch      *Host        // the bridges: lan, line1, line2, ...
	Clients     []*Host
	ISPs        []*Host
	Server      *Host
	LANVIP      netip.Prefix // 192.0.2.1/24: the clients' gateway
	Lines       []Line       // per line: Name, Interface, Gateway, VIP (Address is gw1's)
	ServerAddrs []netip.Addr
}

// HAGateway is one gateway of the pair.
type HAGateway struct {
	*Host
	N             int          // 1, 2
	LANInterface  string       // "lan0"
	LANAddress    netip.Prefix // its own: 192.0.2.(1+N)/24
	Lines         []Line       // its own line addresses: .1+N in each /28; VIP .4
	SyncInterface string       // "sync0"
	SyncAddress   netip.Addr   // 203.0.113.(248+N)
	Peer          netip.Addr   // the other gateway's SyncAddress
	Priority      int          // VRRP priority: 150 for gw1, 100 for gw2

	mu      sync.Mutex
	daemons []*Daemon
	stale   []string // files a crash leaves behind (conntrackd's lock)
}

// haLine returns line n's addressing for gateway g (1-based both): the
// ISP at .1, gateway g at .1+g, the VIP at .4 of the line's /28.
func haLine(n, g int) Line {
	u := LineFor(n)
	base := u.Address.Masked().Addr().As4()
	at := func(host byte) netip.Addr {
		a := base
		a[3] += host
		return netip.AddrFrom4(a)
	}
	u.Address = netip.PrefixFrom(at(byte(1+g)), 28)
	u.VIP = netip.PrefixFrom(at(4), 28)
	return u
}

// NewHA builds an HA lab. On error everything it created is removed.
func NewHA(opts HAOptions) (hl *HALab, err error) {
	o := Options{Prefix: opts.Prefix, Clients: opts.Clients, ISPs: opts.ISPs, Servers: opts.Servers}
	if err := o.fill(); err != nil {
		return nil, err
	}
	if o.ISPs > 8 {
		return nil, fmt.Errorf("an HA lab has at most 8 lines, got %d", o.ISPs)
	}
	if Exists(o.Prefix) {
		return nil, fmt.Errorf("lab %q already exists (see Remove)", o.Prefix)
	}
	hl = &HALab{Prefix: o.Prefix, LANVIP: netip.MustParsePrefix("192.0.2.1/24")}
	b := &builder{lab: &Lab{Prefix: o.Prefix}, handles: map[*Host]*netlink.Handle{}}
	defer func() {
		b.close()
		if err != nil {
			for _, h := range b.created {
				err = errors.Join(err, deleteNamed(h.Name))
			}
			hl = nil
		}
	}()
	for g := 1; g <= 2; g++ {
		h, err := b.host("gw" + strconv.Itoa(g))
		if err != nil {
			return nil, err
		}
		gw := &HAGateway{
			Host: h, N: g, LANInterface: "lan0",
			LANAddress:    netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + g)}), 24),
			SyncInterface: "sync0",
			SyncAddress:   netip.AddrFrom4([4]byte{203, 0, 113, byte(248 + g)}),
			Peer:          netip.AddrFrom4([4]byte{203, 0, 113, byte(248 + 3 - g)}),
			Priority:      map[int]int{1: 150, 2: 100}[g],
		}
		for n := 1; n <= o.ISPs; n++ {
			gw.Lines = append(gw.Lines, haLine(n, g))
		}
		hl.Gateways = append(hl.Gateways, gw)
	}
	if hl.Switch, err = b.host("sw"); err != nil {
		return nil, err
	}
	for i := 1; i <= o.Clients; i++ {
		h, err := b.host("c" + strconv.Itoa(i))
		if err != nil {
			return nil, err
		}
		hl.Clients = append(hl.Clients, h)
	}
	for n := 1; n <= o.ISPs; n++ {
		h, err := b.host("isp" + strconv.Itoa(n))
		if err != nil {
			return nil, err
		}
		hl.ISPs = append(hl.ISPs, h)
		hl.Lines = append(hl.Lines, haLine(n, 1))
	}
	if hl.Server, err = b.host("srv"); err != nil {
		return nil, err
	}
	for i := 0; i < o.Servers; i++ {
		hl.ServerAddrs = append(hl.ServerAddrs, netip.AddrFrom4([4]byte{203, 0, 113, byte(100 + i)}))
	}
	return hl, hl.build(b)
}

func (hl *HALab) build(b *builder) error {
	sw := b.handles[hl.Switch]
	bridge := func(name string) (*netlink.Bridge, error) {
		off := false
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}, MulticastSnooping: &off}
		if err := sw.LinkAdd(br); err != nil {
			return nil, fmt.Errorf("creating bridge %s: %w", name, err)
		}
		if err := sw.LinkSetUp(br); err != nil {
			return nil, fmt.Errorf("bringing up %s: %w", name, err)
		}
		return br, nil
	}
	// plug connects host h's interface ifname to bridge br (switch port
	// port) and gives it address p.
	plug := func(br *netlink.Bridge, port string, h *Host, ifname string, p netip.Prefix) (netlink.Link, error) {
		l, swPort, err := b.veth(h, ifname, hl.Switch, port)
		if err != nil {
			return nil, err
		}
		if err := sw.LinkSetMaster(swPort, br); err != nil {
			return nil, fmt.Errorf("attaching %s to %s: %w", port, br.Name, err)
		}
		return l, b.addr(h, l, p)
	}

	lan, err := bridge("lan")
	if err != nil {
		return err
	}
	for _, g := range hl.Gateways {
		if _, err := plug(lan, g.Name[len(hl.Prefix)+1:]+"-lan", g.Host, g.LANInterface, g.LANAddress); err != nil {
			return err
		}
	}
	for i, c := range hl.Clients {
		eth, err := plug(lan, "c"+strconv.Itoa(i+1), c, "eth0", ClientAddr(i+1))
		if err != nil {
			return err
		}
		if err := b.route(c, eth, netip.Prefix{}, hl.LANVIP.Addr()); err != nil {
			return err
		}
	}

	for i, isp := range hl.ISPs {
		n := i + 1
		u := hl.Lines[i]
		br, err := bridge("line" + strconv.Itoa(n))
		if err != nil {
			return err
		}
		for _, g := range hl.Gateways {
			if _, err := plug(br, g.Name[len(hl.Prefix)+1:]+"-"+u.Interface, g.Host, u.Interface, g.Lines[i].Address); err != nil {
				return err
			}
		}
		if _, err := plug(br, "isp"+strconv.Itoa(n), isp, "down0", netip.PrefixFrom(u.Gateway, u.Address.Bits())); err != nil {
			return err
		}
		up, srvSide, err := b.veth(isp, "up0", hl.Server, "isp"+strconv.Itoa(n))
		if err != nil {
			return err
		}
		// As ISPs do (BCP 38): a packet from the line with a source
		// that is not the line's is dropped (strict reverse path), so
		// a flow that leaves by another line than its NAT source's
		// breaks here as it would in the field.
		err = isp.Do(func() error {
			for _, k := range []string{"all", "down0"} {
				if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+k+"/rp_filter", []byte("1"), 0); err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("setting rp_filter in %s: %w", isp.Name, err)
		}
		ispNet, srvNet := transit(n)
		if err := b.addr(isp, up, ispNet); err != nil {
			return err
		}
		if err := b.addr(hl.Server, srvSide, srvNet); err != nil {
			return err
		}
		if err := b.route(isp, up, netip.Prefix{}, srvNet.Addr()); err != nil {
			return err
		}
		// Replies to line n (either gateway, or the VIP) go back through
		// ISP n; no route to the LAN.
		if err := b.route(hl.Server, srvSide, u.Address.Masked(), ispNet.Addr()); err != nil {
			return err
		}
	}

	g1, g2 := hl.Gateways[0], hl.Gateways[1]
	s1, s2, err := b.veth(g1.Host, g1.SyncInterface, g2.Host, g2.SyncInterface)
	if err != nil {
		return err
	}
	if err := b.addr(g1.Host, s1, netip.PrefixFrom(g1.SyncAddress, 30)); err != nil {
		return err
	}
	if err := b.addr(g2.Host, s2, netip.PrefixFrom(g2.SyncAddress, 30)); err != nil {
		return err
	}

	lo, err := b.handles[hl.Server].LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo in %s: %w", hl.Server.Name, err)
	}
	for _, a := range hl.ServerAddrs {
		if err := b.addr(hl.Server, lo, netip.PrefixFrom(a, 32)); err != nil {
			return err
		}
	}
	return b.waitUp(5 * time.Second)
}

// Close stops the daemons the lab started and removes every namespace of
// the lab. It is safe to call more than once.
func (hl *HALab) Close() error {
	if hl == nil {
		return nil
	}
	var errs []error
	for _, g := range hl.Gateways {
		errs = append(errs, g.StopDaemons())
		// What the daemons left running (a notify script) or the caller
		// did not stop: only this lab's processes live in its namespaces.
		errs = append(errs, g.killAll())
	}
	hosts := []*Host{hl.Switch, hl.Server}
	for _, g := range hl.Gateways {
		hosts = append(hosts, g.Host)
	}
	hosts = append(hosts, hl.Clients...)
	hosts = append(hosts, hl.ISPs...)
	for _, h := range hosts {
		if h != nil {
			errs = append(errs, deleteNamed(h.Name))
		}
	}
	return errors.Join(errs...)
}

// PinDir is the gateway's own bpffs directory for its agent.
func (g *HAGateway) PinDir() string { return "/sys/fs/bpf/uplinkd-" + g.Name }

// Other returns the gateway's peer.
func (hl *HALab) Other(g *HAGateway) *HAGateway {
	if g == hl.Gateways[0] {
		return hl.Gateways[1]
	}
	return hl.Gateways[0]
}

// HAConfigOptions shape the config HALab.Config writes for a gateway.
type HAConfigOptions struct {
	StateDir       string        // required
	PinDir         string        // default the gateway's PinDir
	Flows          uint32        // datapath.flow_entries; default 65536
	Weights        []int         // per line; default 1 each
	AdvertInterval time.Duration // ha.advert_interval; default 100ms
	Extra          string        // appended as is (top-level YAML)
}

// Config returns gateway g's uplinkd config: its LAN interface, every line
// with its own address, gateway and VIP, snat, and the ha block.
func (hl *HALab) Config(g *HAGateway, o HAConfigOptions) string {
	if o.PinDir == "" {
		o.PinDir = g.PinDir()
	}
	if o.Flows == 0 {
		o.Flows = 1 << 16
	}
	if o.AdvertInterval == 0 {
		o.AdvertInterval = 100 * time.Millisecond
	}
	var b strings.Builder
	fmt.Fprintf(&b, "lan:\n  interfaces: [%s]\nnat: snat\nuplinks:\n", g.LANInterface)
	for i, u := range g.Lines {
		fmt.Fprintf(&b, "  - name: %s\n    interface: %s\n    gateway: %s\n    address: %s\n    vip: %s\n",
			u.Name, u.Interface, u.Gateway, u.Address, u.VIP)
		if i < len(o.Weights) {
			fmt.Fprintf(&b, "    weight: %d\n", o.Weights[i])
		}
	}
	fmt.Fprintf(&b, "ha:\n  sync_interface: %s\n  address: %s\n  peer: %s\n  priority: %d\n  virtual_router_id: 51\n  advert_interval: %v\n  lan_vip: %s\n",
		g.SyncInterface, g.SyncAddress, g.Peer, g.Priority, o.AdvertInterval, hl.LANVIP)
	fmt.Fprintf(&b, "state_dir: %s\ndatapath:\n  pin_dir: %s\n  flow_entries: %d\n", o.StateDir, o.PinDir, o.Flows)
	b.WriteString(o.Extra)
	return b.String()
}

// Daemon is a process the lab runs in a gateway (keepalived, conntrackd).
type Daemon struct {
	Name string
	cmd  *exec.Cmd
	log  lockedBuffer
	done chan struct{}
	err  error
}

// Log returns what the daemon wrote to stdout and stderr.
func (d *Daemon) Log() string { return d.log.String() }

// Exited reports whether the process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func (g *HAGateway) start(name string, args ...string) (*Daemon, error) {
	d := &Daemon{Name: name, done: make(chan struct{})}
	d.cmd = g.Command(context.Background(), name, args...)
	d.cmd.Stdout, d.cmd.Stderr = &d.log, &d.log
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s in %s: %w", name, g.Name, err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.done) }()
	g.mu.Lock()
	g.daemons = append(g.daemons, d)
	g.mu.Unlock()
	return d, nil
}

// StartConntrackd runs `conntrackd -C conf` in the foreground in the
// gateway, and returns once it answers `conntrackd -C conf -s`. lock is
// its lock file (General.LockFile), which HardFail removes as a reboot
// would.
func (g *HAGateway) StartConntrackd(conf, lock string) (*Daemon, error) {
	d, err := g.start("conntrackd", "-C", conf)
	if err != nil {
		return nil, err
	}
	g.mu.Lock()
	g.stale = append(g.stale, lock)
	g.mu.Unlock()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := g.Run(ctx, "conntrackd", "-C", conf, "-s")
		cancel()
		if err == nil {
			return d, nil
		}
		if d.Exited() || time.Now().After(deadline) {
			return d, fmt.Errorf("conntrackd in %s not answering: %v\n%s", g.Name, err, d.Log())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartKeepalived runs keepalived (VRRP only, in the foreground, logging
// to its stderr) with conf, its pid files in dir, which HardFail
// removes, as a reboot clears /run: keepalived
// refuses to start while one names a live process, and a killed VRRP
// child may linger as a zombie until init reaps it.
func (g *HAGateway) StartKeepalived(conf, dir string) (*Daemon, error) {
	pids := []string{filepath.Join(dir, "keepalived.pid"), filepath.Join(dir, "keepalived-vrrp.pid"),
		filepath.Join(dir, "keepalived-checkers.pid")}
	g.mu.Lock()
	g.stale = append(g.stale, pids...)
	g.mu.Unlock()
	return g.start("keepalived", "-n", "-l", "-D", "-P", "-f", conf, "-p", pids[0], "-r", pids[1], "-c", pids[2])
}

// Daemons returns the daemons the lab started in the gateway.
func (g *HAGateway) Daemons() []*Daemon {
	g.mu.Lock()
	defer g.mu.Unlock()
	return append([]*Daemon(nil), g.daemons...)
}

// StopDaemons stops the gateway's daemons (SIGTERM, after 5 s SIGKILL)
// and waits for them.
func (g *HAGateway) StopDaemons() error {
	g.mu.Lock()
	ds := g.daemons
	g.daemons = nil
	g.mu.Unlock()
	var errs []error
	// keepalived first: it gives the VIPs up.
	for i := len(ds) - 1; i >= 0; i-- {
		d := ds[i]
		if d.Exited() {
			continue
		}
		_ = d.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
			_ = d.cmd.Process.Kill()
			<-d.done
			errs = append(errs, fmt.Errorf("%s in %s did not stop on SIGTERM within 5s", d.Name, g.Name))
		}
	}
	return errors.Join(errs...)
}

// Processes returns the ids of the processes whose network namespace is
// the gateway's (this process excluded).
func (g *HAGateway) Processes() ([]int, error) {
	var want unix.Stat_t
	if err := unix.Stat(g.Path(), &want); err != nil {
		return nil, fmt.Errorf("stat %s: %w", g.Path(), err)
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var st unix.Stat_t
		if unix.Stat("/proc/"+e.Name()+"/ns/net", &st) != nil {
			continue // gone, or a zombie
		}
		if st.Dev == want.Dev && st.Ino == want.Ino {
			pids = append(pids, pid)
		}
	}
	return pids, nil
}

// killAll kills every process in the gateway's namespace and waits until
// none is left.
func (g *HAGateway) killAll() error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids, err := g.Processes()
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				return nil
			}
			return err
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("processes %v still in %s after SIGKILL", pids, g.Name)
		}
		for _, pid := range pids {
			_ = unix.Kill(pid, unix.SIGKILL)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// HardFail fails the gateway the way a power cut would: every process in
// its namespace (keepalived, its VRRP child and notify scripts,
// conntrackd, the agent) is stopped, its links go down, then the
// processes are killed (SIGKILL). What a reboot would not keep is then
// removed: the VIPs keepalived left on its interfaces, the kernel's
// conntrack table, conntrackd's lock file. It returns the moment the
// links went down.
func (hl *HALab) HardFail(g *HAGateway) (time.Time, error) {
	// Stopped first, so that no process reacts to the links going down
	// (keepalived would send a priority-0 advert, or its child would get
	// the parent's death signal and release the VIPs gracefully).
	signalled := map[int]bool{}
	for round := 0; ; round++ {
		pids, err := g.Processes()
		if err != nil {
			return time.Time{}, err
		}
		fresh := 0
		for _, pid := range pids {
			if !signalled[pid] {
				signalled[pid] = true
				fresh++
				_ = unix.Kill(pid, unix.SIGSTOP)
			}
		}
		if fresh == 0 {
			break
		}
		if round > 50 {
			return time.Time{}, fmt.Errorf("processes keep appearing in %s", g.Name)
		}
	}
	at := time.Now()
	if err := g.setLinks(false); err != nil {
		return at, err
	}
	if err := g.killAll(); err != nil {
		return at, err
	}
	g.mu.Lock()
	ds, stale := g.daemons, g.stale
	g.daemons, g.stale = nil, nil
	g.mu.Unlock()
	for _, d := range ds {
		select {
		case <-d.done:
		case <-time.After(5 * time.Second):
			return at, fmt.Errorf("%s in %s not reaped after SIGKILL", d.Name, g.Name)
		}
	}
	var errs []error
	for _, f := range stale {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	errs = append(errs, hl.dropVIPs(g))
	ctx, cancel := context.WithTimeout(context.Background(), faultTimeout)
	defer cancel()
	if out, err := g.Run(ctx, "conntrack", "-F"); err != nil && !strings.Contains(out, "0 flow entries") {
		errs = append(errs, err)
	}
	return at, errors.Join(errs...)
}

// dropVIPs removes the lab's virtual addresses from g's interfaces.
func (hl *HALab) dropVIPs(g *HAGateway) error {
	nh, err := g.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	vips := map[string]netip.Prefix{g.LANInterface: hl.LANVIP}
	for _, u := range g.Lines {
		vips[u.Interface] = u.VIP
	}
	var errs []error
	for ifname, vip := range vips {
		l, err := nh.LinkByName(ifname)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		addrs, err := nh.AddrList(l, unix.AF_INET)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == vip.Addr() {
				if err := nh.AddrDel(l, &a); err != nil {
					errs = append(errs, fmt.Errorf("removing %s from %s in %s: %w", vip, ifname, g.Name, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// HasVIP reports whether the gateway holds the LAN's virtual address.
func (hl *HALab) HasVIP(g *HAGateway) bool {
	nh, err := g.Netlink()
	if err != nil {
		return false
	}
	defer nh.Close()
	l, err := nh.LinkByName(g.LANInterface)
	if err != nil {
		return false
	}
	addrs, _ := nh.AddrList(l, unix.AF_INET)
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok && ip.Unmap() == hl.LANVIP.Addr() {
			return true
		}
	}
	return false
}

// Revive brings a hard-failed gateway's links up again (its daemons and
// agent are the caller's to start) and waits until they are up.
func (g *HAGateway) Revive() error {
	if err := g.setLinks(true); err != nil {
		return err
	}
	nh, err := g.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	deadline := time.Now().Add(faultTimeout)
	for {
		links, err := nh.LinkList()
		if err != nil {
			return err
		}
		var down []string
		for _, l := range links {
			if a := l.Attrs(); l.Type() == "veth" && a.OperState != netlink.OperUp {
				down = append(down, a.Name)
			}
		}
		if len(down) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("links %v of %s not up after %v", down, g.Name, faultTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// SetLink sets one of the gateway's links up or down (a cable pulled on
// the gateway's side: its daemons see it) and waits until it has or has
// lost its carrier.
func (g *HAGateway) SetLink(ifname string, up bool) error {
	nh, err := g.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	l, err := nh.LinkByName(ifname)
	if err != nil {
		return fmt.Errorf("finding %s in %s: %w", ifname, g.Name, err)
	}
	if up {
		err = nh.LinkSetUp(l)
	} else {
		err = nh.LinkSetDown(l)
	}
	if err != nil {
		return fmt.Errorf("setting %s in %s up=%v: %w", ifname, g.Name, up, err)
	}
	deadline := time.Now().Add(faultTimeout)
	for {
		l, err := nh.LinkByName(ifname)
		if err != nil {
			return err
		}
		if (l.Attrs().OperState == netlink.OperUp) == up {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s in %s still %s after %v", ifname, g.Name, l.Attrs().OperState, faultTimeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// setLinks sets every link of the gateway but lo up or down.
func (g *HAGateway) setLinks(up bool) error {
	nh, err := g.Netlink()
	if err != nil {
		return err
	}
	defer nh.Close()
	links, err := nh.LinkList()
	if err != nil {
		return fmt.Errorf("listing links in %s: %w", g.Name, err)
	}
	for _, l := range links {
		if l.Attrs().Name == "lo" {
			continue
		}
		if up {
			err = nh.LinkSetUp(l)
		} else {
			err = nh.LinkSetDown(l)
		}
		if err != nil {
			return fmt.Errorf("setting %s in %s up=%v: %w", l.Attrs().Name, g.Name, up, err)
		}
	}
	return nil
}

// lockedBuffer is a strings.Builder safe for a process's output
// goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *lockedBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *lockedBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
