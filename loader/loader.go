// SPDX-License-Identifier: Apache-2.0

// Package loader loads uplinkd's eBPF datapath (bpf/), pins its maps and
// links in bpffs so that forwarding and flow state survive an agent restart,
// attaches it to the LAN and line interfaces, and gives the control plane
// typed access to its maps.
package loader

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/btf"
	"golang.org/x/sys/unix"
)

const (
	// DefaultPinDir is where maps and links are pinned unless Options says
	// otherwise.
	DefaultPinDir = "/sys/fs/bpf/uplinkd"
	// NoLine in a bucket table means that no line is live.
	NoLine = -1

	// ProgPrefix starts the name of every uplinkd program, so that its
	// attachments are recognised on an interface shared with others.
	ProgPrefix = "uplinkd_"
)

// The datapath's limits and defaults, defined once, in bpf/, and read from
// the object built from it.
var (
	// MaxLines is the number of lines the datapath knows
	// (UL_MAX_LINES).
	MaxLines int
	// NumBuckets is the size of the bucket table new flows pick a line
	// from (UL_NUM_BUCKETS).
	NumBuckets int
	// DefaultFlowEntries is the default size of the flow map.
	DefaultFlowEntries uint32
	// DefaultMarkMask is the default part of the fwmark owned by uplinkd
	// (UL_DEFAULT_MARK_MASK).
	DefaultMarkMask uint32
)

func init() {
	spec, err := loadUplinkd()
	if err != nil {
		panic(fmt.Sprintf("loader: the embedded datapath object: %v", err))
	}
	MaxLines = int(spec.Maps[uplinkdMapUlLines].MaxEntries)
	NumBuckets = int(spec.Maps[uplinkdMapUlBuckets].MaxEntries)
	DefaultFlowEntries = spec.Maps[uplinkdMapUlFlows].MaxEntries
	if err := spec.Variables[uplinkdVarMarkMask].Get(&DefaultMarkMask); err != nil {
		panic(fmt.Sprintf("loader: the embedded datapath object: mark_mask: %v", err))
	}
	if err := checkRuleLimits(spec); err != nil {
		panic(fmt.Sprintf("loader: the embedded datapath object: %v", err))
	}
}

// bucketNoLine is NoLine as stored in ul_buckets (UL_NO_LINE).
const bucketNoLine = ^uint32(0)

// Options configure Load. Zero fields take the defaults.
type Options struct {
	// PinDir is the bpffs directory holding the maps and links.
	PinDir string
	// FlowEntries is the size of the flow map. It must match the size of
	// an already pinned flow map.
	FlowEntries uint32
	// MarkMask selects the bits of skb->mark that uplinkd sets; the others
	// are preserved.
	MarkMask uint32
	// Attach forces an attach mode; "" takes TCX where the kernel has it,
	// else tc. AttachTCX on a kernel without TCX is an error.
	Attach AttachMode
}

func (o Options) withDefaults() Options {
	if o.PinDir == "" {
		o.PinDir = DefaultPinDir
	}
	if o.FlowEntries == 0 {
		o.FlowEntries = DefaultFlowEntries
	}
	if o.MarkMask == 0 {
		o.MarkMask = DefaultMarkMask
	}
	return o
}

// Datapath is the loaded datapath: programs, and the maps pinned under its
// pin directory.
type Datapath struct {
	pinDir   string
	markMask uint32
	mode     AttachMode // forced attach mode; "": auto
	objs     uplinkdObjects
	tcState  *ebpf.Map
	// Stats reads the flows and counters from the maps the programs use.
	Stats
	// ctRecovery is nil when flows the flow map lost are recovered from
	// conntrack, else why not.
	ctRecovery error
	attached   map[string]AttachMode // interface → how its programs are attached
	w          mapWriter             // every write to the maps

	ruleMu   sync.Mutex // SetRuleSet and SetLastResortMarks read, change and write ul_rule_cfg
	rules    *RuleSet   // the rule set this Datapath installed last; nil: none yet
	ruleFlip time.Time  // when it switched the classifier's generation last
	// policy0Lines is set once rules or policies are in use: SetBuckets
	// then keeps policy 0's line set; without them it writes ul_buckets
	// alone, as it always did.
	policy0Lines atomic.Bool
}

// CTRecovery is nil when the datapath recovers flows the flow map lost
// from conntrack, or says why it does not (the kernel lacks the conntrack
// kfuncs).
func (d *Datapath) CTRecovery() error { return d.ctRecovery }

// Attached says how the programs are attached, by interface, as far as this
// Datapath attached them.
func (d *Datapath) Attached() map[string]AttachMode { return maps.Clone(d.attached) }

// Load loads the programs and creates the maps, pinned under opts.PinDir, or
// adopts the maps already pinned there: flows, counters and configuration
// survive a restart. A pinned map that does not fit the programs (another
// size or layout) is an error naming the map; it is never replaced.
func Load(opts Options) (*Datapath, error) {
	opts = opts.withDefaults()

	spec, err := loadUplinkd()
	if err != nil {
		return nil, err
	}
	if err := spec.Variables[uplinkdVarMarkMask].Set(opts.MarkMask); err != nil {
		return nil, fmt.Errorf("setting mark mask: %w", err)
	}
	ctRecovery := conntrackKfuncs()
	if err := spec.Variables[uplinkdVarCtRecovery].Set(boolU32(ctRecovery == nil)); err != nil {
		return nil, fmt.Errorf("setting conntrack recovery: %w", err)
	}
	spec.Maps[uplinkdMapUlFlows].MaxEntries = opts.FlowEntries

	reasons, err := reasonNames(spec.Types)
	if err != nil {
		return nil, err
	}

	if _, err := PreparePinDir(opts.PinDir); err != nil {
		return nil, err
	}

	d := &Datapath{
		pinDir:     opts.PinDir,
		markMask:   opts.MarkMask,
		mode:       opts.Attach,
		ctRecovery: ctRecovery,
		attached:   map[string]AttachMode{},
	}
	pinned := ebpf.MapOptions{PinPath: opts.PinDir}
	if err := spec.LoadAndAssign(&d.objs, &ebpf.CollectionOptions{Maps: pinned}); err != nil {
		return nil, loadError(opts.PinDir, err)
	}
	d.Stats = Stats{
		flows: d.objs.UlFlows, lineStats: d.objs.UlLineStats, reasons: d.objs.UlReasons,
		ruleCfg: d.objs.UlRuleCfg, ruleHits: d.objs.UlRuleHits, policyFlows: d.objs.UlPolicyFlows,
		policyStats: d.objs.UlPolicyStats,
		reasonNames: reasons,
	}
	d.tcState, err = ebpf.NewMapWithOptions(tcStateSpec, pinned)
	if err != nil {
		d.objs.Close()
		return nil, loadError(opts.PinDir, err)
	}
	if err := d.retireLegacy(); err != nil {
		d.Close()
		return nil, err
	}
	if err := d.distrustRuleShortcuts(); err != nil {
		d.Close()
		return nil, err
	}
	// A fresh ul_lan_src allows every source until SetLANSubnets narrows it.
	var k uplinkdLanPrefix
	if err := d.objs.UlLanSrc.NextKey(nil, &k); errors.Is(err, ebpf.ErrKeyNotExist) {
		if err := d.SetLANSubnets(nil); err != nil {
			d.Close()
			return nil, err
		}
	}
	return d, nil
}

// distrustRuleShortcuts turns off the classifier's shortcuts, the IPv4
// common cells and the LAN slots, in both generations: an uplinkd that
// does not know them (an older one, run between two runs of this one)
// may have rewritten a generation's tables under them, and this one's
// programs read that generation until the agent installs its rules. Off
// (a slot's ifindex 0, a table's set 0), they send every lookup the long
// way (directory and tree, ul_rule_lan), which every uplinkd writes; the
// next rule set writes them again. Only those words change, the ids stay:
// a packet classifying meanwhile (the generation is in use) reads the
// shortcut whole or not at all.
func (d *Datapath) distrustRuleShortcuts() error {
	keys := make([]uint32, ruleGens*lanSlotCount)
	for i := range keys {
		keys[i] = uint32(i)
	}
	slots := make([]uplinkdRuleLanSlot, len(keys))
	for i, k := range keys {
		if err := d.objs.UlRuleLanSlots.Lookup(k, &slots[i]); err != nil {
			return fmt.Errorf("reading the LAN slots: %w", err)
		}
		slots[i].Ifindex = 0
	}
	if err := d.w.batchUpdate(d.objs.UlRuleLanSlots, keys, slots); err != nil {
		return fmt.Errorf("resetting the LAN slots: %w", err)
	}
	for k := range uint32(2 * ruleGens) {
		var c uplinkdV4Common
		if err := d.objs.UlRuleV4Common.Lookup(k, &c); err != nil {
			return fmt.Errorf("reading the IPv4 common cells: %w", err)
		}
		if c.Set == 0 {
			continue
		}
		c.Set = 0
		if err := d.w.put(d.objs.UlRuleV4Common, k, &c); err != nil {
			return fmt.Errorf("resetting the IPv4 common cells: %w", err)
		}
	}
	return nil
}

func boolU32(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}

func loadError(pinDir string, err error) error {
	var verr *ebpf.VerifierError
	switch {
	case errors.As(err, &verr):
		return fmt.Errorf("loading datapath: %w\n%+v", err, verr)
	case errors.Is(err, ebpf.ErrMapIncompatible):
		return fmt.Errorf("loading datapath: pinned map in %s does not fit this datapath (remove it to start afresh): %w", pinDir, err)
	default:
		return fmt.Errorf("loading datapath: %w", err)
	}
}

// reasonNames reads the names of enum ul_reason from the object's BTF:
// UL_REASON_NEW_FLOW is "new_flow".
func reasonNames(types *btf.Spec) ([]string, error) {
	var enum *btf.Enum
	if err := types.TypeByName("ul_reason", &enum); err != nil {
		return nil, fmt.Errorf("reading reason names: %w", err)
	}
	names := make([]string, 0, len(enum.Values))
	for _, v := range enum.Values {
		name := strings.ToLower(strings.TrimPrefix(v.Name, "UL_REASON_"))
		if name == "max" {
			continue
		}
		if int(v.Value) != len(names) {
			return nil, fmt.Errorf("reason %s: value %d is not %d", v.Name, v.Value, len(names))
		}
		names = append(names, name)
	}
	return names, nil
}

// Close releases the datapath's file descriptors. Pins, and so the attached
// programs and all state, stay: forwarding goes on.
func (d *Datapath) Close() error {
	return errors.Join(d.objs.Close(), d.tcState.Close())
}

// Remove detaches everything uplinkd attached (the TCX links pinned under
// pinDir and its tc filters) and unpins, by name, the maps and links it
// pins there; the directories go only if that leaves them empty, so
// nothing of anyone else's is removed. Qdiscs and filters of others are
// left alone. Call it in the network namespace of the attach calls: tc
// filters recorded for another namespace are reported as an error, and
// then nothing is unpinned.
func Remove(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := CheckPinDir(pinDir); err != nil {
		return fmt.Errorf("pin dir: %w", err)
	}
	errs := []error{detachLinks(filepath.Join(pinDir, linksDir))}
	tcState, err := ebpf.LoadPinnedMap(filepath.Join(pinDir, tcStateSpec.Name), nil)
	switch {
	case err == nil:
		errs = append(errs, tcRemoveAll(tcState))
		tcState.Close()
	case !errors.Is(err, os.ErrNotExist):
		errs = append(errs, fmt.Errorf("opening tc state: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	names, err := pinnedMapNames()
	if err != nil {
		return err
	}
	for _, name := range append(append(names, tcStateSpec.Name), legacyPins...) {
		if err := os.Remove(filepath.Join(pinDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("unpinning %s: %w", name, err))
		}
	}
	for _, dir := range []string{filepath.Join(pinDir, linksDir), pinDir} {
		if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTEMPTY) {
			errs = append(errs, fmt.Errorf("removing %s: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}

// retireLegacy takes over the pins of an earlier uplinkd that counted a
// line's whole traffic on its uplink (programs there, ul_if_line mapping
// the interfaces to lines) into the same ul_line_stats that now counts the
// LAN's forwarded traffic: the old programs, attached until the agent
// takes them off the lines, find no line any more, the counters start
// from zero (they would otherwise carry the uplinks' traffic, the
// gateway's own included, as forwarded), and ul_if_line is unpinned, so
// that this happens once.
func (d *Datapath) retireLegacy() error {
	pin := filepath.Join(d.pinDir, legacyIfLine)
	m, err := ebpf.LoadPinnedMap(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("opening earlier uplinkd's %s: %w", pin, err)
	}
	defer m.Close()
	var (
		k    uint32
		keys []uint32
	)
	for err = m.NextKey(nil, &k); err == nil; err = m.NextKey(k, &k) {
		keys = append(keys, k)
	}
	if !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("reading %s: %w", pin, err)
	}
	for _, k := range keys {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("emptying %s: %w", pin, err)
		}
	}
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	zero := make([]uplinkdLineStats, cpus)
	for line := range d.objs.UlLineStats.MaxEntries() {
		if err := d.w.put(d.objs.UlLineStats, line, zero); err != nil {
			return fmt.Errorf("zeroing the line counters earlier uplinkd kept: %w", err)
		}
	}
	if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unpinning %s: %w", pin, err)
	}
	return nil
}

// legacyPins are maps that earlier uplinkd pinned and this one no longer
// has: ul_if_line mapped uplink interfaces to lines for the uplink
// programs. Remove takes them too, by name.
var legacyPins = []string{legacyIfLine}

// legacyIfLine is the pin of the map of the uplink programs that an
// earlier uplinkd attached to the lines.
const legacyIfLine = "ul_if_line"

// pinnedMapNames are the maps the datapath pins by name.
func pinnedMapNames() ([]string, error) {
	spec, err := loadUplinkd()
	if err != nil {
		return nil, err
	}
	var names []string
	for name, m := range spec.Maps {
		if m.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	return names, nil
}
