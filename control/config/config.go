// SPDX-License-Identifier: Apache-2.0

// Package config reads and checks uplinkd's YAML configuration. A Config
// that Load returns is complete (defaults filled in) and consistent; what
// can only be checked against the kernel (interfaces, their addresses) is
// checked by Resolve, with the same file:line:field errors.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/uplinkd/uplinkd/loader"
)

// MaxLANSubnets bounds lan.subnets: the datapath's table of them has room
// for these and the two "all of a family" entries.
const MaxLANSubnets = 254

// MaxLines is the number of lines uplinkd steers between: the size of
// the datapath's line table.
var MaxLines = loader.MaxLines

// NAT modes.
const (
	NATMasquerade = "masquerade" // source address follows the line's address (DHCP, PPPoE)
	NATSNAT       = "snat"       // fixed source address, the line's configured address
	NATNone       = "none"       // the lines route public LAN addresses
)

// Firewall modes.
const (
	FirewallStateful = "stateful" // the seed's keep_state: replies pass, new connections from the lines into the LAN do not
	FirewallNone     = "none"
)

// Config is the whole configuration file.
type Config struct {
	LAN      LAN     `yaml:"lan"`
	Lines    []Line  `yaml:"uplinks"`
	NAT      string  `yaml:"nat"`
	Firewall string  `yaml:"firewall"`
	Routing  Routing `yaml:"routing"`
	// StateDir holds what uplinkd must remember between runs to undo its
	// changes (the sysctl values it replaced).
	StateDir string   `yaml:"state_dir"`
	Datapath Datapath `yaml:"datapath"`
	Health   Health   `yaml:"health"`
	// Weights: static (as configured) or adaptive (the configured weight
	// scaled down by measured loss and latency, within bounds).
	Weights string `yaml:"weights"`

	// Metrics is the Prometheus endpoint.
	Metrics Metrics `yaml:"metrics"`
	// HA makes this gateway one of an active/standby pair; nil: a single
	// gateway.
	HA *HA `yaml:"ha"`

	// PrefixSets, Policies and Rules steer new flows: the first rule that
	// matches a flow names its policy, the lines it may take; a flow no
	// rule matches takes the built-in balanced policy (see PolicyList).
	PrefixSets []PrefixSet `yaml:"prefix_sets"`
	Policies   []Policy    `yaml:"policies"`
	Rules      []Rule      `yaml:"rules"`

	// Warnings are what Load found odd but not wrong (a rule that an
	// earlier one shadows), each "FILE:LINE: FIELD: message".
	Warnings []string `yaml:"-"`

	file string
	pos  positions
	// policyIDs are the policies' ids (RenumberPolicies); nil: by place.
	policyIDs IDs
	// skipSets: the prefix-set files are not read (LoadWithoutPrefixSets).
	skipSets bool
}

// LAN names the interfaces that face the clients.
type LAN struct {
	Interfaces []string `yaml:"interfaces"`
	// Subnets are the sources forwarded (and NATed) from the LAN; empty:
	// the subnets of the LAN interfaces' addresses, followed as they
	// change. Others are dropped and get no flow.
	Subnets        []string       `yaml:"subnets"`
	SubnetPrefixes []netip.Prefix `yaml:"-"`
}

// Line is one Internet line.
type Line struct {
	Name      string `yaml:"name"`
	Interface string `yaml:"interface"`
	Gateway   string `yaml:"gateway"`
	// Address is the line's own address with its prefix length. Empty:
	// the interface's address in the gateway's subnet, followed as it
	// changes.
	Address string `yaml:"address"`
	Weight  int    `yaml:"weight"`
	// Table, Mark: zero means the default numbering (see Routing).
	Table int    `yaml:"table"`
	Mark  uint32 `yaml:"mark"`
	// Health overrides the global health block's probe settings.
	Health *LineHealth `yaml:"health"`
	// VIP is the line's virtual address with its prefix length, in an HA
	// pair: keepalived moves it to the master, and it is the line's NAT
	// source, so that a flow keeps its source across a takeover.
	VIP string `yaml:"vip"`

	// Parsed forms, filled by Load.
	GatewayAddr netip.Addr   `yaml:"-"`
	Prefix      netip.Prefix `yaml:"-"` // zero when Address is empty
	VIPPrefix   netip.Prefix `yaml:"-"` // zero outside an HA pair
	Probe       Probe        `yaml:"-"` // the global health block with this line's overrides
	// Slot is the line's number, 1..MaxLines: its datapath index is
	// Slot-1, its rules' priorities and its default table and mark follow
	// from it. Load numbers lines by position; Renumber keeps each name's
	// number across reorders, reloads and restarts.
	Slot int `yaml:"-"`
	// TableSet and MarkSet: the config gave them; else they follow Slot.
	TableSet bool `yaml:"-"`
	MarkSet  bool `yaml:"-"`
}

// LineHealth is what a line may set differently from the health block.
type LineHealth struct {
	GatewayProbe string   `yaml:"gateway_probe"`
	Targets      []string `yaml:"targets"`
	MinTargets   *int     `yaml:"min_targets"`
}

// Health configures how lines are probed and judged. The defaults take a
// silent gateway out within 400 to 600 ms and ride out 20% random loss and
// a line slowed by its own traffic: a round every 200 ms, a silent target
// probed again every 20 ms, a round failed once 10 probes
// (timeout/retry_interval) over 200 ms (or the line's RTO) went
// unanswered, down after two failed rounds, up after 3 good ones. Rounds
// every 100 ms would take 1.3% of a CPU with 16 lines.
type Health struct {
	Interval      time.Duration `yaml:"interval"`
	Timeout       time.Duration `yaml:"timeout"`        // a target unanswered this long fails the round; at most interval
	RetryInterval time.Duration `yaml:"retry_interval"` // a target silent this long in a round is probed again, timeout/retry_interval probes in all; 0: no retries
	DownAfter     int           `yaml:"down_after"`     // consecutive failed rounds that take a line down
	UpAfter       int           `yaml:"up_after"`       // consecutive good rounds that bring it back
	Window        int           `yaml:"window"`         // rounds over which loss, RTT and jitter are measured
	LineHealth    `yaml:",inline"`
}

// Probe is the probing of one line: its gateway (icmp, arp or none) and
// extra targets beyond it, of which MinTargets must answer in a round.
type Probe struct {
	Gateway    string
	Targets    []netip.Addr
	MinTargets int
}

// Gateway probe methods and weight modes.
const (
	ProbeICMP = "icmp" // echo request to the gateway
	ProbeARP  = "arp"  // ARP request to the gateway, for gateways that drop ICMP
	ProbeNone = "none" // only the extra targets

	WeightsStatic   = "static"
	WeightsAdaptive = "adaptive"
)

// Routing holds the numbers of the kernel objects uplinkd creates. The
// defaults are the seed's: main at priority 50, line n's source rule and
// table at 200+n, the multipath rule and table at 222.
type Routing struct {
	MainPriority      int    `yaml:"main_priority"`
	FwmarkPriority    int    `yaml:"fwmark_priority"` // line n's fwmark rule at FwmarkPriority+n
	SourcePriority    int    `yaml:"source_priority"` // line n's source rule at SourcePriority+n
	MultipathPriority int    `yaml:"multipath_priority"`
	TableBase         int    `yaml:"table_base"` // line n's table is TableBase+n unless set per line
	MultipathTable    int    `yaml:"multipath_table"`
	MarkMask          uint32 `yaml:"mark_mask"` // the fwmark bits uplinkd owns
	// Protocol tags every rule and route uplinkd creates; uplinkd owns
	// exactly the rules and routes with this protocol number.
	Protocol int    `yaml:"protocol"`
	NFTTable string `yaml:"nft_table"` // uplinkd's own nftables table (family inet)
}

// HA is one gateway's part in an active/standby pair. keepalived (VRRP)
// moves the LAN's virtual address and each line's (Line.VIP) to the
// master, and conntrackd copies the master's connections to the standby
// over a direct link; uplinkd runs on both, speaks neither protocol, and
// writes the two daemons' configs (uplinkd ha configs).
type HA struct {
	// SyncInterface is the direct link to the peer, for conntrackd.
	SyncInterface string `yaml:"sync_interface"`
	// Address and Peer are this gateway's and the peer's addresses on it.
	Address string `yaml:"address"`
	Peer    string `yaml:"peer"`
	// Priority is the VRRP priority, 1..254: while both are healthy, the
	// higher one is master (and takes the VIPs back when it returns).
	Priority int `yaml:"priority"`
	// RouterID is the VRRP virtual router ID, one per pair on a segment.
	RouterID int `yaml:"virtual_router_id"`
	// AdvertInterval is how often the master says it is alive (VRRPv3:
	// 10 ms steps); the standby takes over after about 3 missed adverts.
	AdvertInterval time.Duration `yaml:"advert_interval"`
	// LANVIP is the LAN's gateway address with its prefix length, on the
	// first LAN interface.
	LANVIP string `yaml:"lan_vip"`

	AddressAddr, PeerAddr netip.Addr   `yaml:"-"`
	LANVIPPrefix          netip.Prefix `yaml:"-"`
}

// HA defaults.
const (
	DefaultHAPriority       = 100
	DefaultHARouterID       = 51
	DefaultHAAdvertInterval = 100 * time.Millisecond
)

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	// Listen is the host:port the agent serves /metrics on; "" turns the
	// endpoint off. The default is loopback only: another address is
	// reachable from wherever routes lead, so it must be configured.
	Listen string `yaml:"listen"`
}

// DefaultMetricsListen is where the metrics endpoint listens unless the
// config says otherwise: this host only.
const DefaultMetricsListen = "127.0.0.1:9488"

// Datapath configures the eBPF programs that pin flows to lines.
type Datapath struct {
	// Enabled false leaves steering to the kernel's multipath route alone,
	// as the seed did: weight changes then move established flows.
	Enabled     *bool  `yaml:"enabled"`
	PinDir      string `yaml:"pin_dir"`      // bpffs directory for maps and links
	FlowEntries uint32 `yaml:"flow_entries"` // size of the flow table (LRU)
	Attach      string `yaml:"attach"`       // auto (TCX, else tc), tcx, tc
}

// On reports whether the datapath is enabled.
func (d Datapath) On() bool { return d.Enabled == nil || *d.Enabled }

// Attach modes.
const (
	AttachAuto = "auto"
	AttachTCX  = "tcx"
	AttachTC   = "tc"
)

// Defaults for the Datapath block: the datapath's own.
var (
	DefaultPinDir      = loader.DefaultPinDir
	DefaultFlowEntries = loader.DefaultFlowEntries
)

// DefaultMarkMask is the datapath's default part of the fwmark.
var DefaultMarkMask = loader.DefaultMarkMask

// Defaults for the Routing block.
const (
	DefaultMainPriority      = 50
	DefaultFwmarkPriority    = 100
	DefaultSourcePriority    = 200
	DefaultMultipathPriority = 222
	DefaultTableBase         = 200
	DefaultMultipathTable    = 222
	DefaultProtocol          = 0x55
	DefaultNFTTable          = "uplinkd"
	DefaultStateDir          = "/run/uplinkd"
)

// Default returns a Config with no lines and every default filled in.
func Default() Config {
	return Config{
		NAT:      NATMasquerade,
		Firewall: FirewallStateful,
		StateDir: DefaultStateDir,
		Datapath: Datapath{PinDir: DefaultPinDir, FlowEntries: DefaultFlowEntries, Attach: AttachAuto},
		Health: Health{
			Interval: 200 * time.Millisecond, Timeout: 200 * time.Millisecond, RetryInterval: 20 * time.Millisecond,
			DownAfter: 2, UpAfter: 3, Window: 50,
			LineHealth: LineHealth{GatewayProbe: ProbeICMP},
		},
		Weights: WeightsStatic,
		Metrics: Metrics{Listen: DefaultMetricsListen},
		Routing: Routing{
			MainPriority:      DefaultMainPriority,
			FwmarkPriority:    DefaultFwmarkPriority,
			SourcePriority:    DefaultSourcePriority,
			MultipathPriority: DefaultMultipathPriority,
			TableBase:         DefaultTableBase,
			MultipathTable:    DefaultMultipathTable,
			MarkMask:          DefaultMarkMask,
			Protocol:          DefaultProtocol,
			NFTTable:          DefaultNFTTable,
		},
	}
}

// MaxFileSize bounds a config file: a real one is a few KiB.
const MaxFileSize = 1 << 20

// Load reads, parses and checks a config file.
func Load(file string) (*Config, error) { return load(file, false) }

// LoadWithoutPrefixSets is Load without reading the prefix-set files
// (every set is empty), for the commands that need only the config's
// numbers and directories (down, status, flows): a set file gone or
// broken must not keep an operator from removing uplinkd.
func LoadWithoutPrefixSets(file string) (*Config, error) { return load(file, true) }

func load(file string, skipSets bool) (*Config, error) {
	f, err := os.Open(file)
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, MaxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading config: %w", err)
	}
	if len(data) > MaxFileSize {
		return nil, &FieldError{File: file, Msg: fmt.Sprintf("larger than %d bytes: not a config file", MaxFileSize)}
	}
	return parse(file, data, skipSets)
}

// Parse parses and checks config text; file names it in errors, and a
// prefix set's relative file is relative to its directory (Parse reads
// the prefix sets' files). All problems are reported at once, joined.
func Parse(file string, data []byte) (*Config, error) { return parse(file, data, false) }

func parse(file string, data []byte, skipSets bool) (*Config, error) {
	var root, more yaml.Node
	dec := yaml.NewDecoder(bytes.NewReader(data))
	if err := dec.Decode(&root); err != nil && !errors.Is(err, io.EOF) {
		return nil, yamlError(file, err)
	}
	if err := dec.Decode(&more); err == nil {
		return nil, &FieldError{File: file, Line: more.Line, Msg: "a second YAML document: a config is one document"}
	} else if !errors.Is(err, io.EOF) {
		return nil, yamlError(file, err)
	}
	c := Default()
	c.file, c.pos, c.skipSets = file, positions{}, skipSets
	if len(root.Content) == 0 {
		return nil, &FieldError{File: file, Msg: "empty config: at least lan and uplinks are needed"}
	}
	d := &decoder{file: file, pos: c.pos}
	d.decode(root.Content[0], reflect.ValueOf(&c).Elem(), "")
	if len(d.errs) > 0 {
		return nil, errors.Join(d.errs...)
	}
	if err := c.check(); err != nil {
		return nil, err
	}
	return &c, nil
}

// Errorf returns an error about one field, naming the file and the field's
// line: "uplinkd.yaml:7: uplinks[1].interface: ...".
func (c *Config) Errorf(field, format string, args ...any) error {
	line, ok := c.pos[field]
	for f := field; !ok && f != ""; {
		f = parent(f)
		line, ok = c.pos[f]
	}
	return &FieldError{File: c.file, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)}
}

// File is the path the config was read from.
func (c *Config) File() string { return c.file }

func parent(field string) string {
	for i := len(field) - 1; i >= 0; i-- {
		if field[i] == '.' || field[i] == '[' {
			return field[:i]
		}
	}
	return ""
}

var nameRE = regexp.MustCompile(`^[a-z0-9-]{1,15}$`)

// checkHA fills the ha block's defaults and checks it; lanIf and lineIf
// are the interfaces already taken.
func (c *Config) checkHA(lanIf map[string]bool, lineIf map[string]string) []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, c.Errorf(field, format, args...))
	}
	ha := c.HA
	if c.NAT != NATSNAT {
		field := "nat"
		if _, set := c.pos[field]; !set {
			field = "ha" // the default masquerade: name the block that needs snat
		}
		bad(field, "an HA pair needs nat: snat (to each line's vip, which moves with the master; masquerade would NAT to each gateway's own address and break every flow at a takeover), got %q", c.NAT)
	}
	if !c.Datapath.On() {
		bad("datapath.enabled", "an HA pair needs the datapath: after a takeover it gives each flow its line from the connection conntrackd synced")
	}
	// Every VIP is one address that moves: none may be another's, nor a
	// line's own address or gateway.
	taken := map[netip.Addr]string{}
	for i, u := range c.Lines {
		f := fmt.Sprintf("uplinks[%d]", i)
		for _, a := range []netip.Addr{u.GatewayAddr, u.Prefix.Addr()} {
			if a.IsValid() {
				taken[a] = f
			}
		}
	}
	vip := func(field string, p netip.Prefix) {
		switch a := p.Addr(); {
		case !p.IsValid():
		case !unicast(a):
			bad(field, "%s is not a unicast address", a)
		case p.Bits() < 31 && (a == p.Masked().Addr() || a == lastAddr(p)):
			bad(field, "%s is the network or broadcast address of %s", a, p.Masked())
		case taken[a] != "":
			bad(field, "%s is also an address of %s", a, taken[a])
		default:
			taken[a] = field
		}
	}
	for i, u := range c.Lines {
		f := fmt.Sprintf("uplinks[%d].vip", i)
		if u.VIPPrefix.IsValid() && u.Prefix.IsValid() && u.VIPPrefix.Bits() != u.Prefix.Bits() {
			// keepalived adds the VIP with its prefix: a wider one is a
			// connected route over LAN traffic to that range.
			bad(f, "%s: want the line's own prefix length /%d", u.VIPPrefix, u.Prefix.Bits())
			continue
		}
		vip(f, u.VIPPrefix)
	}
	switch {
	case !ValidIfname(ha.SyncInterface):
		bad("ha.sync_interface", "want the interface of the direct link to the peer, got %q", ha.SyncInterface)
	case lanIf[ha.SyncInterface]:
		bad("ha.sync_interface", "%s is a LAN interface: conntrackd's sync needs a link of its own", ha.SyncInterface)
	case lineIf[ha.SyncInterface] != "":
		bad("ha.sync_interface", "%s is the interface of %s: conntrackd's sync needs a link of its own", ha.SyncInterface, lineIf[ha.SyncInterface])
	}
	addr := func(field, v string) netip.Addr {
		a, err := netip.ParseAddr(v)
		if err != nil || !a.Is4() || !unicast(a) {
			bad(field, "want this end's unicast IPv4 address on the sync link, got %q", v)
			return netip.Addr{}
		}
		return a
	}
	ha.AddressAddr = addr("ha.address", ha.Address)
	ha.PeerAddr = addr("ha.peer", ha.Peer)
	if ha.AddressAddr.IsValid() && ha.AddressAddr == ha.PeerAddr {
		bad("ha.peer", "%s is this gateway's own address (ha.address)", ha.PeerAddr)
	}
	if _, set := c.pos["ha.priority"]; !set {
		ha.Priority = DefaultHAPriority
	} else if ha.Priority < 1 || ha.Priority > 254 {
		bad("ha.priority", "want 1..254 (255 is VRRP's address owner), got %d", ha.Priority)
	}
	if _, set := c.pos["ha.virtual_router_id"]; !set {
		ha.RouterID = DefaultHARouterID
	} else if ha.RouterID < 1 || ha.RouterID > 255 {
		bad("ha.virtual_router_id", "want 1..255, got %d", ha.RouterID)
	}
	if _, set := c.pos["ha.advert_interval"]; !set {
		ha.AdvertInterval = DefaultHAAdvertInterval
	} else if a := ha.AdvertInterval; a < 10*time.Millisecond || a > 40950*time.Millisecond || a%(10*time.Millisecond) != 0 {
		bad("ha.advert_interval", "want 10ms..40.95s in steps of 10ms (VRRPv3 centiseconds), got %v", a)
	}
	p, err := netip.ParsePrefix(ha.LANVIP)
	switch {
	case ha.LANVIP == "":
		bad("ha.lan_vip", "missing: the LAN's gateway address, which moves to the master")
	case err != nil || !p.Addr().Is4():
		bad("ha.lan_vip", "want an IPv4 address with prefix length (192.0.2.1/24), got %q", ha.LANVIP)
	default:
		ha.LANVIPPrefix = p
		vip("ha.lan_vip", p)
	}
	for _, a := range []struct {
		field string
		addr  netip.Addr
	}{{"ha.address", ha.AddressAddr}, {"ha.peer", ha.PeerAddr}} {
		if other := taken[a.addr]; a.addr.IsValid() && other != "" {
			bad(a.field, "%s is also an address of %s: the sync link needs addresses of its own", a.addr, other)
		}
	}
	return errs
}

// check fills per-line defaults and checks everything that needs no
// kernel.
func (c *Config) check() error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, c.Errorf(field, format, args...))
	}
	r := &c.Routing

	if len(c.LAN.Interfaces) == 0 {
		bad("lan.interfaces", "at least one LAN interface is needed")
	}
	if n := len(c.Lines); n < 1 || n > MaxLines {
		bad("uplinks", "want 1 to %d lines, got %d", MaxLines, n)
	}
	switch c.NAT {
	case NATMasquerade, NATSNAT, NATNone:
	default:
		bad("nat", "want masquerade, snat or none, got %q", c.NAT)
	}
	switch c.Firewall {
	case FirewallStateful, FirewallNone:
	default:
		bad("firewall", "want stateful or none, got %q", c.Firewall)
	}
	if !filepath.IsAbs(c.StateDir) {
		bad("state_dir", "want an absolute path, got %q", c.StateDir)
	}
	switch c.Datapath.Attach {
	case AttachAuto, AttachTCX, AttachTC:
	default:
		bad("datapath.attach", "want auto, tcx or tc, got %q", c.Datapath.Attach)
	}
	if !filepath.IsAbs(c.Datapath.PinDir) {
		bad("datapath.pin_dir", "want an absolute path in a bpffs, got %q", c.Datapath.PinDir)
	}
	if f := c.Datapath.FlowEntries; f < 1024 || f > 1<<26 {
		bad("datapath.flow_entries", "want 1024..%d, got %d", 1<<26, f)
	}
	h := &c.Health
	switch {
	case h.Interval < 10*time.Millisecond || h.Interval > time.Minute:
		bad("health.interval", "want 10ms..1m, got %v", h.Interval)
	case h.Timeout <= 0 || h.Timeout > h.Interval:
		bad("health.timeout", "want more than 0 and at most the interval (%v), got %v", h.Interval, h.Timeout)
	case h.RetryInterval != 0 && (h.RetryInterval < time.Millisecond || 2*h.RetryInterval > h.Timeout):
		bad("health.retry_interval", "want 0 (no retries) or 1ms..half the timeout (%v), got %v", h.Timeout, h.RetryInterval)
	}
	if h.DownAfter < 1 || h.DownAfter > 100 {
		bad("health.down_after", "want 1..100, got %d", h.DownAfter)
	}
	if h.UpAfter < 1 || h.UpAfter > 1000 {
		bad("health.up_after", "want 1..1000, got %d", h.UpAfter)
	}
	if h.Window < 2 || h.Window > 10000 {
		bad("health.window", "want 2..10000, got %d", h.Window)
	}
	switch c.Weights {
	case WeightsStatic, WeightsAdaptive:
	default:
		bad("weights", "want static or adaptive, got %q", c.Weights)
	}
	if l := c.Metrics.Listen; l != "" {
		if msg := checkListen(l); msg != "" {
			bad("metrics.listen", "%s (\"\" turns the endpoint off)", msg)
		}
	}
	global, globalErrs := c.probe("health", h.LineHealth, Probe{})
	errs = append(errs, globalErrs...)
	if !nameRE.MatchString(r.NFTTable) {
		bad("routing.nft_table", "want 1 to 15 characters of [a-z0-9-], got %q", r.NFTTable)
	}
	if r.Protocol < 5 || r.Protocol > 255 {
		// 0..4 are the kernel's own (unspec, redirect, kernel, boot, static).
		bad("routing.protocol", "want 5..255, got %d", r.Protocol)
	} else if name := otherProtocols[r.Protocol]; name != "" {
		bad("routing.protocol", "%d is %s's (rtnetlink RTPROT_%s): uplinkd would take that daemon's routes and rules for its own", r.Protocol, strings.ToLower(name), name)
	}
	if r.MarkMask == 0 {
		bad("routing.mark_mask", "must not be 0")
	}

	lanIf := map[string]bool{}
	for i, ifname := range c.LAN.Interfaces {
		f := fmt.Sprintf("lan.interfaces[%d]", i)
		switch {
		case !ValidIfname(ifname):
			bad(f, "not a valid interface name: %q", ifname)
		case lanIf[ifname]:
			bad(f, "%s is listed twice", ifname)
		}
		lanIf[ifname] = true
	}

	if len(c.LAN.Subnets) > MaxLANSubnets {
		bad("lan.subnets", "at most %d subnets, got %d", MaxLANSubnets, len(c.LAN.Subnets))
	}
	for i, sn := range c.LAN.Subnets {
		p, err := netip.ParsePrefix(sn)
		switch {
		case err != nil:
			bad(fmt.Sprintf("lan.subnets[%d]", i), "want a prefix such as 192.0.2.0/24, got %q", sn)
		case p != p.Masked():
			bad(fmt.Sprintf("lan.subnets[%d]", i), "%s has host bits set: %s?", p, p.Masked())
		case p.Addr().Is4In6():
			bad(fmt.Sprintf("lan.subnets[%d]", i), "%s is IPv4 written as IPv6: write it as IPv4", p)
		default:
			c.LAN.SubnetPrefixes = append(c.LAN.SubnetPrefixes, p)
		}
	}

	names, ifaces := map[string]string{}, map[string]string{}
	for i := range c.Lines {
		u := &c.Lines[i]
		f := fmt.Sprintf("uplinks[%d]", i)
		if !nameRE.MatchString(u.Name) {
			bad(f+".name", "want 1 to 15 characters of [a-z0-9-], got %q", u.Name)
		} else if prev, dup := names[u.Name]; dup {
			bad(f+".name", "%q is also the name of %s", u.Name, prev)
		} else {
			names[u.Name] = f
		}
		switch {
		case !ValidIfname(u.Interface):
			bad(f+".interface", "not a valid interface name: %q", u.Interface)
		case lanIf[u.Interface]:
			bad(f+".interface", "%s is also a LAN interface", u.Interface)
		case ifaces[u.Interface] != "":
			bad(f+".interface", "%s is also the interface of %s (one line per interface)", u.Interface, ifaces[u.Interface])
		default:
			ifaces[u.Interface] = f
		}
		gw, err := netip.ParseAddr(u.Gateway)
		switch {
		case u.Gateway == "":
			bad(f+".gateway", "missing: the address of the line's router")
		case err != nil || !gw.Is4():
			bad(f+".gateway", "want an IPv4 address, got %q", u.Gateway)
		case !unicast(gw):
			bad(f+".gateway", "%s is not a unicast address a router can have", gw)
		default:
			u.GatewayAddr = gw
		}
		if u.Address != "" {
			p, err := netip.ParsePrefix(u.Address)
			switch {
			case err != nil || !p.Addr().Is4():
				bad(f+".address", "want an IPv4 address with prefix length (203.0.113.2/24), got %q", u.Address)
			case u.GatewayAddr.IsValid() && !p.Contains(u.GatewayAddr):
				bad(f+".gateway", "%s is outside the line's subnet %s", u.GatewayAddr, p.Masked())
			case p.Addr() == u.GatewayAddr:
				bad(f+".address", "%s is the gateway's own address", p.Addr())
			case p.Bits() < 31 && u.GatewayAddr.IsValid() && (u.GatewayAddr == p.Masked().Addr() || u.GatewayAddr == lastAddr(p)):
				bad(f+".gateway", "%s is the network or broadcast address of %s", u.GatewayAddr, p.Masked())
			default:
				u.Prefix = p
			}
		} else if c.NAT == NATSNAT {
			bad(f+".address", "nat: snat needs each line's address")
		}
		if u.VIP != "" {
			p, err := netip.ParsePrefix(u.VIP)
			switch {
			case c.HA == nil:
				bad(f+".vip", "a line's vip belongs to an HA pair: add an ha block, or remove it")
			case err != nil || !p.Addr().Is4():
				bad(f+".vip", "want an IPv4 address with prefix length (203.0.113.10/24), got %q", u.VIP)
			case u.GatewayAddr.IsValid() && !p.Contains(u.GatewayAddr):
				bad(f+".vip", "the gateway %s is outside the vip's subnet %s", u.GatewayAddr, p.Masked())
			case p.Addr() == u.GatewayAddr || p.Addr() == u.Prefix.Addr():
				bad(f+".vip", "%s is the line's gateway or own address: the vip is a third one, which moves between the pair", p.Addr())
			default:
				u.VIPPrefix = p
			}
		} else if c.HA != nil {
			bad(f+".vip", "missing: in an HA pair each line needs the virtual address its flows are NAT'd to")
		}
		u.Probe = global
		if u.Health != nil {
			var perr []error
			u.Probe, perr = c.probe(f+".health", *u.Health, global)
			errs = append(errs, perr...)
		}
		if _, set := c.pos[f+".weight"]; !set && u.Weight == 0 {
			u.Weight = 1
		} else if u.Weight < 1 || u.Weight > 255 {
			bad(f+".weight", "want 1..255, got %d", u.Weight)
		}
		_, u.TableSet = c.pos[f+".table"]
		u.MarkSet = u.Mark != 0
		u.Slot = i + 1
	}
	errs = append(errs, c.number()...)

	if _, set := c.pos["ha"]; set && c.HA == nil {
		bad("ha", "an empty ha block: remove it for a single gateway, or fill it in")
	}
	if c.HA != nil {
		errs = append(errs, c.checkHA(lanIf, ifaces)...)
	}
	errs = append(errs, c.checkPolicies(lanIf)...)

	// A target that is a line's gateway says nothing beyond it.
	gateways := map[netip.Addr]string{}
	for i, u := range c.Lines {
		if u.GatewayAddr.IsValid() {
			gateways[u.GatewayAddr] = fmt.Sprintf("uplinks[%d]", i)
		}
	}
	checkTargets := func(field string, targets []string) {
		for i, t := range targets {
			if a, err := netip.ParseAddr(t); err == nil && gateways[a] != "" {
				bad(fmt.Sprintf("%s.targets[%d]", field, i), "%s is the gateway of %s: it is probed anyway", a, gateways[a])
			}
		}
	}
	checkTargets("health", h.Targets)
	for i, u := range c.Lines {
		if u.Health != nil {
			checkTargets(fmt.Sprintf("uplinks[%d].health", i), u.Health.Targets)
		}
	}

	// Lines are numbered up to MaxLines (see Renumber), whatever their
	// count: each band of rules has room for all of them.
	n := MaxLines
	prio := func(field string, v, span int) {
		if v < 1 || v+span > MaxPriority {
			bad(field, "want a priority in 1..%d, got %d", MaxPriority-span, v)
		}
	}
	prio("routing.main_priority", r.MainPriority, 0)
	prio("routing.fwmark_priority", r.FwmarkPriority, n)
	prio("routing.source_priority", r.SourcePriority, n)
	prio("routing.multipath_priority", r.MultipathPriority, 0)
	if len(errs) > 0 {
		return errors.Join(errs...) // the order checks below assume sane numbers
	}
	if r.MainPriority >= r.FwmarkPriority || r.MainPriority >= r.SourcePriority {
		bad("routing.main_priority", "%d must come before the fwmark (%d) and source (%d) rules", r.MainPriority, r.FwmarkPriority+1, r.SourcePriority+1)
	}
	if r.FwmarkPriority+n >= r.MultipathPriority || r.SourcePriority+n >= r.MultipathPriority {
		bad("routing.multipath_priority", "%d must come after the fwmark (..%d) and source (..%d) rules", r.MultipathPriority, r.FwmarkPriority+n, r.SourcePriority+n)
	}
	if overlap(r.FwmarkPriority, r.SourcePriority, n) {
		bad("routing.source_priority", "the source rules (%d..%d) overlap the fwmark rules (%d..%d)", r.SourcePriority+1, r.SourcePriority+n, r.FwmarkPriority+1, r.FwmarkPriority+n)
	}
	if !ValidTable(r.MultipathTable) {
		bad("routing.multipath_table", "table %d is reserved or out of range (1..252, 256..%d)", r.MultipathTable, maxTable)
	}
	if r.TableBase < 0 || r.TableBase > maxTable-MaxLines {
		bad("routing.table_base", "want 0..%d, got %d", maxTable-MaxLines, r.TableBase)
	}
	return errors.Join(errs...)
}

// number derives each line's default table and mark from its slot and
// checks that tables and marks are unique. A defaulted number is reported
// on the line itself, saying where the number came from.
func (c *Config) number() []error {
	var errs []error
	bad := func(field, format string, args ...any) {
		errs = append(errs, c.Errorf(field, format, args...))
	}
	r := &c.Routing
	tables, marks := map[int]string{}, map[uint32]string{}
	shift := bits.TrailingZeros32(r.MarkMask)
	for i := range c.Lines {
		u := &c.Lines[i]
		f := fmt.Sprintf("uplinks[%d]", i)
		tf, tdesc := f+".table", "table"
		if !u.TableSet {
			u.Table = r.TableBase + u.Slot
			tf, tdesc = f, "its default table (routing.table_base + its number)"
		}
		switch {
		case !ValidTable(u.Table):
			bad(tf, "%s %d is reserved or out of range (1..252, 256..%d)", tdesc, u.Table, maxTable)
		case u.Table == r.MultipathTable:
			bad(tf, "%s %d is also the multipath table", tdesc, u.Table)
		case tables[u.Table] != "":
			bad(tf, "%s %d is also the table of %s", tdesc, u.Table, tables[u.Table])
		default:
			tables[u.Table] = f
		}
		mf, mdesc := f+".mark", "mark"
		if !u.MarkSet {
			u.Mark = uint32(u.Slot) << shift
			mf, mdesc = f, "its default mark (its number in routing.mark_mask)"
		}
		switch {
		case u.Mark&^r.MarkMask != 0 || u.Mark == 0:
			bad(mf, "%s %#x does not fit in mark_mask %#x", mdesc, u.Mark, r.MarkMask)
		case marks[u.Mark] != "":
			bad(mf, "%s %#x is also the mark of %s", mdesc, u.Mark, marks[u.Mark])
		default:
			marks[u.Mark] = f
		}
	}
	return errs
}

// Slots are the lines' numbers by name (see Line.Slot).
type Slots map[string]int

// Slots returns the lines' numbers.
func (c *Config) Slots() Slots {
	s := Slots{}
	for _, u := range c.Lines {
		s[u.Name] = u.Slot
	}
	return s
}

// Renumber gives every line the number it had in prev; a line new to prev
// takes its position's number if that is free, else the lowest free one.
// Default tables and marks follow the numbers; collisions are reported as
// Load reports them. A line's identity (its datapath index, mark, table and
// rule priorities) so follows its name, not its place in the file.
func (c *Config) Renumber(prev Slots) error {
	used := map[int]bool{}
	keep := map[string]bool{}
	for _, u := range c.Lines {
		if n, ok := prev[u.Name]; ok && n >= 1 && n <= MaxLines && !used[n] {
			used[n], keep[u.Name] = true, true
		}
	}
	for i := range c.Lines {
		u := &c.Lines[i]
		if keep[u.Name] {
			u.Slot = prev[u.Name]
			continue
		}
		u.Slot = i + 1
		for n := 1; used[u.Slot]; n++ {
			u.Slot = n
		}
		used[u.Slot] = true
	}
	return errors.Join(c.number()...)
}

// probe resolves a health block (the global one, or a line's overrides
// of base) into a Probe.
func (c *Config) probe(field string, h LineHealth, base Probe) (Probe, []error) {
	var errs []error
	p := base
	if h.GatewayProbe != "" {
		p.Gateway = h.GatewayProbe
	}
	switch p.Gateway {
	case ProbeICMP, ProbeARP, ProbeNone:
	default:
		errs = append(errs, c.Errorf(field+".gateway_probe", "want icmp, arp or none, got %q", h.GatewayProbe))
	}
	if h.Targets != nil {
		p.Targets = nil
		for i, t := range h.Targets {
			a, err := netip.ParseAddr(t)
			tf := fmt.Sprintf("%s.targets[%d]", field, i)
			if err != nil || !a.Is4() {
				errs = append(errs, c.Errorf(tf, "want an IPv4 address, got %q", t))
				continue
			}
			if !unicast(a) {
				errs = append(errs, c.Errorf(tf, "%s is not a unicast address beyond the gateway (unspecified, loopback, multicast or broadcast)", a))
				continue
			}
			if slices.Contains(p.Targets, a) {
				errs = append(errs, c.Errorf(tf, "%s is listed twice", a))
				continue
			}
			p.Targets = append(p.Targets, a)
		}
		p.MinTargets = min(1, len(p.Targets))
	}
	if h.MinTargets != nil {
		p.MinTargets = *h.MinTargets
	}
	if p.MinTargets < 0 || p.MinTargets > len(p.Targets) {
		errs = append(errs, c.Errorf(field+".min_targets", "want 0..%d (the number of targets), got %d", len(p.Targets), p.MinTargets))
	}
	if p.Gateway == ProbeNone && len(p.Targets) == 0 {
		errs = append(errs, c.Errorf(field+".gateway_probe", "none needs targets: nothing would be probed"))
	}
	return p, errs
}

func overlap(a, b, n int) bool { return a < b+n && b < a+n }

// checkListen checks a listen address: an IP address (or nothing, for
// every address) and a port number. It returns what is wrong, or "".
func checkListen(l string) string {
	host, port, err := net.SplitHostPort(l)
	if err != nil {
		return fmt.Sprintf("want host:port such as %s, got %q", DefaultMetricsListen, l)
	}
	if host != "" {
		if a, err := netip.ParseAddr(host); err != nil || a.IsMulticast() {
			return fmt.Sprintf("want an IP address of this host (or none for every address) before the port, got %q", host)
		}
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
		return fmt.Sprintf("want a port number 1..65535, got %q", port)
	}
	return ""
}

// otherProtocols are the rtnetlink protocol numbers the kernel names for
// other routing daemons (include/uapi/linux/rtnetlink.h, and iproute2's
// rt_protos): uplinkd's tag must not be one of them.
var otherProtocols = map[int]string{
	8: "GATED", 9: "RA", 10: "MRT", 11: "ZEBRA", 12: "BIRD", 13: "DNROUTED", 14: "XORP", 15: "NTK",
	16: "DHCP", 17: "MROUTED", 18: "KEEPALIVED", 42: "BABEL", 99: "OPENR", 186: "BGP", 187: "ISIS",
	188: "OSPF", 189: "RIP", 192: "EIGRP",
}

// maxTable is the largest routing table number (the kernel's is 32 bits).
const maxTable = 1<<32 - 1

// MaxPriority is the highest rule priority uplinkd may use: the kernel's
// own main and default rules are at 32766 and 32767.
const MaxPriority = 32765

// ValidTable reports whether uplinkd may use routing table t: not the
// kernel's own (unspec, default, main, local) and within 32 bits.
func ValidTable(t int) bool { return t >= 1 && t <= maxTable && (t < 253 || t > 255) }

// unicast reports whether a can be a router or a probe target: not
// unspecified, loopback, multicast, link-local multicast or the limited
// broadcast address.
func unicast(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// lastAddr is the broadcast address of an IPv4 prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	a := p.Masked().Addr().As4()
	host := uint32(1)<<(32-p.Bits()) - 1
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3]) | host
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// ValidIfname applies the kernel's rule for interface names, which also
// keeps a name one path element.
func ValidIfname(s string) bool {
	if s == "" || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for _, r := range s {
		if r == '/' || r == ':' || r <= ' ' || r > '~' {
			return false
		}
	}
	return true
}
