// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Flags shared with bpf/lib/maps.h.
const (
	lineDead       = 1 << 0 // LINE_F_DEAD
	flowRecovered  = 1 << 0 // FLOW_F_RECOVERED
	flowClassified = 1 << 1 // FLOW_F_CLASSIFIED
)

// Line is the datapath's view of a line.
type Line struct {
	// Mark is the fwmark of the line's routing rule, within the mark mask.
	// 0 leaves the line unconfigured: nothing is steered to it.
	Mark uint32
	// Ifindex of the line's interface, for people reading the map.
	Ifindex int
	// Weight, for people reading the map: weights act through SetBuckets.
	Weight uint32
	// Dead lines get no new flows. Their UDP and ICMP flows move to a live
	// line; their TCP flows stay and should get a prohibit route, so that
	// clients fail fast.
	Dead bool
	// NATAddrs are the source addresses the line's NAT gives to flows. A
	// flow lost from the flow map is recovered from conntrack through them;
	// the first of each family is recorded in new flows.
	NATAddrs []netip.Addr
}

// Flow is a flow pinned to a line.
type Flow struct {
	// Proto is the IP protocol: TCP, UDP, ICMP or ICMPv6.
	Proto uint8
	// Src is the LAN side; for ICMP echo, its port is the echo identifier.
	Src netip.AddrPort
	// Dst is the Internet side; port 0 for ICMP echo.
	Dst  netip.AddrPort
	Line int
	// NATAddr is the flow's NAT source address: conntrack's if the flow was
	// recovered, else the line's. Invalid when unknown.
	NATAddr netip.Addr
	// Recovered says the line came from conntrack, not from the buckets.
	Recovered bool
	// Rule is the index of the rule that classified the flow in the rule
	// set in force then; -1 when none did (no rule matched, or no rule set
	// was in force).
	Rule int
	// Policy is the id of the flow's policy: 0 when no rule decided.
	Policy int
	// Tx is LAN to Internet, Rx Internet to LAN; bytes are frame lengths.
	TxPackets, TxBytes, RxPackets, RxBytes uint64
	FirstSeen, LastSeen                    time.Time
}

// LineStats are a line's packets and bytes on its interface.
type LineStats struct {
	TxPackets, TxBytes, RxPackets, RxBytes uint64
}

func checkLine(line int) error {
	if line < 0 || line >= MaxLines {
		return fmt.Errorf("line %d out of range [0, %d)", line, MaxLines)
	}
	return nil
}

// SetLine configures line; the other lines stay as they are.
func (d *Datapath) SetLine(line int, l Line) error {
	return d.setLines(map[int]Line{line: l})
}

// SetLines configures every line at once: lines[i] is line i (the zero
// Line for a number no line has). It reads ul_lines and ul_nat_src in one
// batch each and writes only what differs: a reconcile with nothing to
// change writes nothing.
func (d *Datapath) SetLines(lines []Line) error {
	if len(lines) != MaxLines {
		return fmt.Errorf("line table has %d entries, want %d", len(lines), MaxLines)
	}
	want := make(map[int]Line, len(lines))
	for i, l := range lines {
		want[i] = l
	}
	return d.setLines(want)
}

// setLines writes the lines of want (by index) where the maps differ, and
// leaves the others alone.
func (d *Datapath) setLines(want map[int]Line) error {
	values := make(map[uint32]uplinkdLine, len(want))
	owner := map[[16]byte]uint32{} // the NAT addresses of the lines in want
	for _, line := range slices.Sorted(maps.Keys(want)) {
		if err := checkLine(line); err != nil {
			return err
		}
		l := want[line]
		if l.Mark&^d.markMask != 0 {
			return fmt.Errorf("line %d: mark %#x outside mask %#x", line, l.Mark, d.markMask)
		}
		v := uplinkdLine{Mark: l.Mark, Weight: l.Weight, Ifindex: uint32(l.Ifindex)}
		if l.Dead {
			v.Flags |= lineDead
		}
		for _, a := range l.NATAddrs {
			if !a.IsValid() {
				return fmt.Errorf("line %d: invalid NAT address", line)
			}
			a16 := a.As16()
			switch {
			case a.Unmap().Is4() && v.NatAddr4 == [16]byte{}:
				v.NatAddr4 = a16
			case !a.Unmap().Is4() && v.NatAddr6 == [16]byte{}:
				v.NatAddr6 = a16
			}
			owner[a16] = uint32(line)
		}
		values[uint32(line)] = v
	}

	cur, err := readAll[uint32, uplinkdLine](d.objs.UlLines)
	if err != nil {
		return fmt.Errorf("reading lines: %w", err)
	}
	for _, line := range slices.Sorted(maps.Keys(values)) {
		if v := values[line]; cur[line] != v {
			if err := d.w.put(d.objs.UlLines, line, &v); err != nil {
				return fmt.Errorf("setting line %d: %w", line, err)
			}
		}
	}

	have, err := readAll[[16]byte, uint32](d.objs.UlNatSrc)
	if err != nil {
		return fmt.Errorf("reading NAT addresses: %w", err)
	}
	for a, line := range have {
		if _, mine := values[line]; !mine {
			continue // another line's
		}
		if _, kept := owner[a]; kept {
			continue
		}
		if err := d.w.del(d.objs.UlNatSrc, a); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("line %d: removing NAT address: %w", line, err)
		}
	}
	for a, line := range owner {
		if l, ok := have[a]; ok && l == line {
			continue
		}
		if err := d.w.put(d.objs.UlNatSrc, a, line); err != nil {
			return fmt.Errorf("line %d: adding NAT address %s: %w", line, netip.AddrFrom16(a).Unmap(), err)
		}
	}
	return nil
}

// readAll reads every entry of a small map: in one batch lookup (one
// system call; iterating takes two per entry), or by iterating where the
// kernel has no batch lookup for the map's type.
func readAll[K comparable, V any](m *ebpf.Map) (map[K]V, error) {
	// One more than fits: the kernel then reaches the end in the same
	// call.
	n := int(m.MaxEntries()) + 1
	keys, values := make([]K, n), make([]V, n)
	out := make(map[K]V)
	var cursor ebpf.MapBatchCursor
	for {
		got, err := m.BatchLookup(&cursor, keys, values, nil)
		for i := range got {
			out[keys[i]] = values[i]
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return out, nil
		}
		if errors.Is(err, ebpf.ErrNotSupported) {
			break
		}
		if err != nil {
			return nil, err
		}
	}
	clear(out)
	var (
		k K
		v V
	)
	it := m.Iterate()
	for it.Next(&k, &v) {
		out[k] = v
	}
	return out, it.Err()
}

// mapWriter makes the control plane's writes to the datapath's maps (the
// programs write flows and counters themselves), and counts them: a
// reconcile with nothing to change must make none.
type mapWriter struct{ n atomic.Uint64 }

func (w *mapWriter) put(m *ebpf.Map, key, value any) error {
	w.n.Add(1)
	return m.Put(key, value)
}

func (w *mapWriter) update(m *ebpf.Map, key, value any, flags ebpf.MapUpdateFlags) error {
	w.n.Add(1)
	return m.Update(key, value, flags)
}

func (w *mapWriter) del(m *ebpf.Map, key any) error {
	w.n.Add(1)
	return m.Delete(key)
}

func (w *mapWriter) batchUpdate(m *ebpf.Map, keys, values any) error {
	w.n.Add(1)
	_, err := m.BatchUpdate(keys, values, nil)
	return err
}

// Writes counts the writes this Datapath made to its maps, one a system
// call.
func (d *Datapath) Writes() uint64 { return d.w.n.Load() }

// SetBuckets installs a bucket table (see Buckets), policy 0's. It
// changes the line of new flows only: pinned flows keep theirs. Only the
// buckets that differ from the table in force are written, in one batch,
// and, once rules or policies are in use, policy 0's set of lines
// (ul_policies, which sticky rules read) when it changes.
func (d *Datapath) SetBuckets(lines []int) error {
	if err := checkBuckets(lines); err != nil {
		return err
	}
	if d.policy0Lines.Load() {
		if err := d.setPolicy0Lines(lineSet(lines)); err != nil {
			return err
		}
	}
	cur, err := d.CurrentBuckets()
	if err != nil {
		return err
	}
	var keys, values []uint32
	for b, l := range lines {
		if l == cur[b] {
			continue
		}
		keys = append(keys, uint32(b))
		values = append(values, bucketNoLine)
		if l != NoLine {
			values[len(values)-1] = uint32(l)
		}
	}
	if len(keys) == 0 {
		return nil
	}
	if err := d.w.batchUpdate(d.objs.UlBuckets, keys, values); err != nil {
		return fmt.Errorf("setting buckets: %w", err)
	}
	return nil
}

// setPolicy0Lines records the lines of policy 0's buckets, which sticky
// rules of policy 0 read.
func (d *Datapath) setPolicy0Lines(set uint32) error {
	var p uplinkdPolicy
	if err := d.objs.UlPolicies.Lookup(uint32(0), &p); err != nil {
		return fmt.Errorf("reading policy 0: %w", err)
	}
	if p.Lines == set {
		return nil
	}
	p.Lines = set
	if err := d.w.put(d.objs.UlPolicies, uint32(0), &p); err != nil {
		return fmt.Errorf("setting policy 0's lines: %w", err)
	}
	return nil
}

// CurrentBuckets returns the bucket table in force, the prev of Buckets,
// read in one batch.
func (d *Datapath) CurrentBuckets() ([]int, error) {
	keys := make([]uint32, NumBuckets)
	values := make([]uint32, NumBuckets)
	var cursor ebpf.MapBatchCursor
	n, err := d.objs.UlBuckets.BatchLookup(&cursor, keys, values, nil)
	if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil, fmt.Errorf("reading buckets: %w", err)
	}
	if n != NumBuckets {
		return nil, fmt.Errorf("reading buckets: %d of %d", n, NumBuckets)
	}
	lines := make([]int, NumBuckets)
	for i, b := range keys {
		lines[b] = int(values[i])
		if values[i] == bucketNoLine {
			lines[b] = NoLine
		}
	}
	return lines, nil
}

// SetLocal replaces the set of the gateway's own addresses, to which
// traffic is not steered.
func (d *Datapath) SetLocal(addrs []netip.Addr) error {
	want := map[[16]byte]bool{}
	for _, a := range addrs {
		if !a.IsValid() {
			return errors.New("setting local addresses: invalid address")
		}
		want[a.As16()] = true
	}

	return syncSet(&d.w, d.objs.UlLocal, want, "local address", func(a [16]byte) string { return netip.AddrFrom16(a).Unmap().String() })
}

// syncSet makes the keys of m, a set (every value 1), those of want,
// writing only the difference. Stale keys go first: the sets are small.
func syncSet[K comparable](w *mapWriter, m *ebpf.Map, want map[K]bool, what string, name func(K) string) error {
	have, err := readAll[K, uint8](m)
	if err != nil {
		return fmt.Errorf("reading %ss: %w", what, err)
	}
	for k := range have {
		if want[k] {
			continue
		}
		if err := w.del(m, &k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("removing %s %s: %w", what, name(k), err)
		}
	}
	for k := range want {
		if _, ok := have[k]; ok {
			continue // there already: no write
		}
		if err := w.put(m, &k, uint8(1)); err != nil {
			return fmt.Errorf("adding %s %s: %w", what, name(k), err)
		}
	}
	return nil
}

// flowBatch is how many flows Flows reads per system call.
const flowBatch = 4096

// Flows calls fn for each flow in the flow map until fn returns false. The
// map changes meanwhile: a flow may be missed or seen twice. Memory stays
// bounded whatever the map's size: flowBatch flows are read at a time.
func (s *Stats) Flows(fn func(Flow) bool) error {
	boot, err := bootTime()
	if err != nil {
		return err
	}
	keys := make([]uplinkdFlowKey, flowBatch)
	values := make([]uplinkdFlow, flowBatch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := s.flows.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			if !fn(flowOf(&keys[i], &values[i], boot)) {
				return nil
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("reading flows: %w", err)
		}
	}
}

// removedMu serializes countSlot's read-modify-write: ClearFlows may run
// beside a run loop removing a line.
var removedMu sync.Mutex

// RemoveLine takes a line out of the datapath for good (a new config
// dropped it): its entry goes (dead, no NAT address, so that no flow is
// recovered onto it) and so do the flows pinned to it, so that a line
// given its number later inherits none of them. It returns how many
// flows it removed.
func (d *Datapath) RemoveLine(line int) (int, error) {
	if err := d.SetLine(line, Line{Dead: true}); err != nil {
		return 0, err
	}
	doomed, err := d.flowsWhere(func(f *uplinkdFlow) bool { return int(f.Line) == line })
	if err != nil {
		return 0, err
	}
	removed := 0
	var delErr error
	for _, k := range doomed {
		// One by one: a flow the LRU evicted meanwhile is no error.
		if err := d.w.del(d.objs.UlFlows, &k); err == nil {
			removed++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			delErr = fmt.Errorf("removing a flow of line %d: %w", line, err)
			break
		}
	}
	return removed, errors.Join(delErr, d.countRemoved(removed))
}

// flowsWhere returns the keys of the flows that match, read in batches.
func (d *Datapath) flowsWhere(match func(*uplinkdFlow) bool) ([]uplinkdFlowKey, error) {
	keys := make([]uplinkdFlowKey, flowBatch)
	values := make([]uplinkdFlow, flowBatch)
	var found []uplinkdFlowKey
	var cursor ebpf.MapBatchCursor
	for {
		n, err := d.objs.UlFlows.BatchLookup(&cursor, keys, values, nil)
		for i := range n {
			if match(&values[i]) {
				found = append(found, keys[i])
			}
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return found, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading flows: %w", err)
		}
	}
}

// ForgetPolicies makes the pinned flows of the policies ids no policy's
// (they then move, off a dead line, within policy 0, as a removed
// policy's flows do) and of no rule, zeroes the policies' counters and
// removes their sticky clients: before their ids go to new policies,
// which must not inherit them. It returns how many flows it changed.
func (d *Datapath) ForgetPolicies(ids []int) (int, error) {
	forget := map[int]bool{}
	for _, id := range ids {
		forget[id] = id > 0
	}
	doomed, err := d.flowsWhere(func(f *uplinkdFlow) bool {
		_, policy := flowRulePolicy(f.Flags)
		return forget[policy]
	})
	if err != nil {
		return 0, err
	}
	n, err := d.forgetFlows(doomed)
	if err != nil {
		return n, err
	}
	// The counters after the flows: a packet of a forgotten flow counts
	// no more.
	if err := d.zeroPolicyCounters(ids); err != nil {
		return n, err
	}
	return n, d.forgetStickyClients(forget)
}

// forgetStickyClients removes the sticky clients of the policies forget
// holds: a new policy with one's id must not send a client to the line
// the removed policy gave it.
func (d *Datapath) forgetStickyClients(forget map[int]bool) error {
	var k uplinkdStickyKey
	var doomed []uplinkdStickyKey
	it := d.objs.UlSticky.Iterate()
	for it.Next(&k, new(uplinkdSticky)) {
		if k.Scope&stickyPerRule == 0 && forget[int(k.Scope)] {
			doomed = append(doomed, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("reading sticky clients: %w", err)
	}
	for _, k := range doomed {
		if err := d.w.del(d.objs.UlSticky, &k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("forgetting a sticky client: %w", err)
		}
	}
	return nil
}

// ForgetStalePolicyFlows makes no policy's the pinned flows of policies
// ids that the rule set in force would not give them: those the previous
// rules pinned under an id that was a removed policy's, after
// ForgetPolicies and before the flip to the rules that give the id to its
// new policy. Packets still classifying by the previous rules are waited
// out first. The counters stay: the new policy's first flows are in them.
func (d *Datapath) ForgetStalePolicyFlows(ids []int) (int, error) {
	d.ruleMu.Lock()
	gives := map[[2]int]bool{}
	if d.rules != nil {
		for _, a := range d.rules.Actions {
			gives[[2]int{a.ID, a.Policy}] = true
		}
	}
	flip := d.ruleFlip
	d.ruleMu.Unlock()
	if time.Since(flip) < time.Second {
		waitForReaders()
	}
	forget := map[int]bool{}
	for _, id := range ids {
		forget[id] = id > 0
	}
	doomed, err := d.flowsWhere(func(f *uplinkdFlow) bool {
		rule, policy := flowRulePolicy(f.Flags)
		return forget[policy] && !gives[[2]int{rule, policy}]
	})
	if err != nil {
		return 0, err
	}
	return d.forgetFlows(doomed)
}

// forgetFlows clears the rule, policy and classified flags of the flows
// keyed doomed and returns how many it changed.
func (d *Datapath) forgetFlows(doomed []uplinkdFlowKey) (int, error) {
	changed := 0
	for _, k := range doomed {
		// Read again, one by one: the datapath counts meanwhile, and a
		// flow the LRU evicted is no error.
		var v uplinkdFlow
		if err := d.objs.UlFlows.Lookup(&k, &v); errors.Is(err, ebpf.ErrKeyNotExist) {
			continue
		} else if err != nil {
			return changed, fmt.Errorf("reading a flow: %w", err)
		}
		v.Flags &^= flowClassified | flowRuleMask<<flowRuleShift | flowPolicyMask<<flowPolicyShift
		if err := d.w.update(d.objs.UlFlows, &k, &v, ebpf.UpdateExist); err == nil {
			changed++
		} else if !errors.Is(err, ebpf.ErrKeyNotExist) {
			return changed, errors.Join(fmt.Errorf("forgetting a flow's policy: %w", err),
				d.countSlot(slotForgottenFlowsFromEnd, changed, "forgotten flows"))
		}
	}
	return changed, d.countSlot(slotForgottenFlowsFromEnd, changed, "forgotten flows")
}

// zeroPolicyCounters zeroes the flow, packet and byte counters of policies
// ids, so that a policy taking a removed one's id counts from zero.
func (d *Datapath) zeroPolicyCounters(ids []int) error {
	cpus, err := ebpf.PossibleCPU()
	if err != nil {
		return err
	}
	for _, id := range ids {
		if id <= 0 || id >= MaxPolicies {
			continue
		}
		if err := d.w.update(d.objs.UlPolicyFlows, uint32(id), make([]uint64, cpus), ebpf.UpdateExist); err != nil {
			return fmt.Errorf("zeroing policy %d's flows: %w", id, err)
		}
		if err := d.w.update(d.objs.UlPolicyStats, uint32(id), make([]uplinkdLineStats, cpus), ebpf.UpdateExist); err != nil {
			return fmt.Errorf("zeroing policy %d's bytes: %w", id, err)
		}
	}
	return nil
}

// ClearFlows removes every pinned flow: an HA standby's pins go stale
// while its peer forwards. It returns how many it removed. It takes the
// flows in batches (lookup and delete in one call each), holding no more
// than a batch in memory; it is safe beside the datapath and a run loop
// using d.
func (d *Datapath) ClearFlows() (int, error) {
	keys := make([]uplinkdFlowKey, flowBatch)
	values := make([]uplinkdFlow, flowBatch)
	var cursor ebpf.MapBatchCursor
	removed := 0
	for {
		n, err := d.objs.UlFlows.BatchLookupAndDelete(&cursor, keys, values, nil)
		removed += n
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return removed, errors.Join(fmt.Errorf("removing flows: %w", err), d.countRemoved(removed))
		}
	}
	return removed, d.countRemoved(removed)
}

// countRemoved adds n to the flows the control plane removed, kept in
// the last slot of ul_reasons (no reason uses it), pinned with the flows:
// FlowMapUse tells them from evictions.
func (d *Datapath) countRemoved(n int) error {
	return d.countSlot(slotRemovedFlowsFromEnd, n, "removed flows")
}

// countSlot adds n to a slot of ul_reasons that the control plane counts
// in (on CPU 0's counter).
func (d *Datapath) countSlot(fromEnd uint32, n int, what string) error {
	if n == 0 {
		return nil
	}
	removedMu.Lock()
	defer removedMu.Unlock()
	slot := d.slotFromEnd(fromEnd)
	var perCPU []uint64
	if err := d.objs.UlReasons.Lookup(slot, &perCPU); err != nil {
		return fmt.Errorf("counting %s: %w", what, err)
	}
	perCPU[0] += uint64(n)
	if err := d.w.update(d.objs.UlReasons, slot, perCPU, ebpf.UpdateExist); err != nil {
		return fmt.Errorf("counting %s: %w", what, err)
	}
	return nil
}

func flowOf(k *uplinkdFlowKey, v *uplinkdFlow, boot time.Time) Flow {
	f := Flow{
		Proto:     k.Proto,
		Src:       netip.AddrPortFrom(netip.AddrFrom16(k.Saddr).Unmap(), k.Sport),
		Dst:       netip.AddrPortFrom(netip.AddrFrom16(k.Daddr).Unmap(), k.Dport),
		Line:      int(v.Line),
		Recovered: v.Flags&flowRecovered != 0,
		TxPackets: v.TxPackets,
		TxBytes:   v.TxBytes,
		RxPackets: v.RxPackets,
		RxBytes:   v.RxBytes,
		FirstSeen: boot.Add(time.Duration(v.FirstSeen)),
		LastSeen:  boot.Add(time.Duration(v.LastSeen)),
	}
	if v.NatAddr != [16]byte{} {
		f.NATAddr = netip.AddrFrom16(v.NatAddr).Unmap()
	}
	f.Rule, f.Policy = flowRulePolicy(v.Flags)
	return f
}

// bootTime is when CLOCK_MONOTONIC, the clock of the flow timestamps, was 0.
func bootTime() (time.Time, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return time.Time{}, fmt.Errorf("reading monotonic clock: %w", err)
	}
	return time.Now().Add(-time.Duration(ts.Nano())), nil
}

// LineStats returns the packets and bytes of every line, indexed by line,
// read in one batch.
func (s *Stats) LineStats() ([]LineStats, error) {
	stats, err := perCPUStats(s.lineStats, MaxLines)
	if err != nil {
		return nil, fmt.Errorf("reading line stats: %w", err)
	}
	return stats, nil
}

// PolicyStats returns the packets and bytes forwarded for each policy,
// indexed by policy id, summed over the CPUs: those of the flows pinned
// while a rule set was in force (without one, the lines' counters are
// the balanced policy's). Zero when the pins have no such counters.
func (s *Stats) PolicyStats() ([]LineStats, error) {
	if s.policyStats == nil {
		return make([]LineStats, MaxPolicies), nil
	}
	stats, err := perCPUStats(s.policyStats, MaxPolicies)
	if err != nil {
		return nil, fmt.Errorf("reading policy stats: %w", err)
	}
	return stats, nil
}

// perCPUStats reads the n entries of a per-CPU array of LineStats in one
// batch and sums each over the CPUs.
func perCPUStats(m *ebpf.Map, n int) ([]LineStats, error) {
	sums, err := perCPUFold(m, n, func(sum *uplinkdLineStats, c uplinkdLineStats) {
		sum.TxPackets += c.TxPackets
		sum.TxBytes += c.TxBytes
		sum.RxPackets += c.RxPackets
		sum.RxBytes += c.RxBytes
	})
	if err != nil {
		return nil, err
	}
	stats := make([]LineStats, n)
	for i, s := range sums {
		stats[i] = LineStats{TxPackets: s.TxPackets, TxBytes: s.TxBytes, RxPackets: s.RxPackets, RxBytes: s.RxBytes}
	}
	return stats, nil
}

// Reasons returns how many packets LAN ingress handled for each reason
// ("new_flow", "existing_flow", "not_ip", ...: see bpf/lib/reasons.h).
func (s *Stats) Reasons() (map[string]uint64, error) {
	counts := make(map[string]uint64, len(s.reasonNames))
	for code, name := range s.reasonNames {
		sum, err := s.slotSum(uint32(code))
		if err != nil {
			return nil, fmt.Errorf("reading reason %s: %w", name, err)
		}
		counts[name] = sum
	}
	return counts, nil
}

// The slots of ul_reasons past the reasons, counted from its end
// (UL_SLOT_* in bpf/lib/reasons.h).
const (
	slotForgottenFlowsFromEnd = 3
	slotSlowParseFromEnd      = 2
	slotRemovedFlowsFromEnd   = 1
)

func (s *Stats) slotFromEnd(n uint32) uint32 { return s.reasons.MaxEntries() - n }

// slotSum is one ul_reasons slot summed over the CPUs.
func (s *Stats) slotSum(slot uint32) (uint64, error) {
	var perCPU []uint64
	if err := s.reasons.Lookup(slot, &perCPU); err != nil {
		return 0, err
	}
	var sum uint64
	for _, c := range perCPU {
		sum += c
	}
	return sum, nil
}

// SlowParsed counts the packets (LAN ingress and egress) that the fast,
// direct-access parser could not read and the full one did: VLAN tags,
// IPv4 options, IPv6 extension headers, ICMP, headers outside the skb's
// linear part, and whatever is not steered at all.
func (s *Stats) SlowParsed() (uint64, error) {
	n, err := s.slotSum(s.slotFromEnd(slotSlowParseFromEnd))
	if err != nil {
		return 0, fmt.Errorf("reading slow-parsed packets: %w", err)
	}
	return n, nil
}

// FlowMapUse is how full the flow map has been: the LRU map evicts its
// least recently used flow to make room for a new one, so a flow map
// smaller than the gateway's flows loses pins.
type FlowMapUse struct {
	Capacity int    // max entries
	Inserted uint64 // flows pinned since the maps were created (new and recovered)
	Removed  uint64 // flows the control plane removed (a removed line's, an HA standby's)
	// Forgotten counts the flows whose policy the control plane forgot
	// (their policy's id went to a new policy): they stay, of no policy.
	Forgotten uint64
	// EvictedAtLeast is Inserted less Removed beyond Capacity: flows
	// leave the map only by eviction otherwise, so at least that many were
	// evicted (the LRU may evict a little before it is full: it can be
	// more).
	EvictedAtLeast uint64
}

// FlowMapUse reads the flow map's use from the new-flow counters.
func (s *Stats) FlowMapUse() (FlowMapUse, error) { return s.flowMapUse(nil) }

// FlowMapUseFrom is FlowMapUse with the pins counted from reasons already
// read (Reasons): only the removed flows' slot is read again.
func (s *Stats) FlowMapUseFrom(reasons map[string]uint64) (FlowMapUse, error) {
	if reasons == nil {
		reasons = map[string]uint64{}
	}
	return s.flowMapUse(reasons)
}

// flowMapUse reads the new-flow reasons unless reasons holds them.
func (s *Stats) flowMapUse(reasons map[string]uint64) (FlowMapUse, error) {
	u := FlowMapUse{Capacity: int(s.flows.MaxEntries())}
	for code, name := range s.reasonNames {
		if name != "new_flow" && name != "recovered_ct" {
			continue
		}
		if reasons != nil {
			u.Inserted += reasons[name]
			continue
		}
		n, err := s.slotSum(uint32(code))
		if err != nil {
			return u, fmt.Errorf("reading reason %s: %w", name, err)
		}
		u.Inserted += n
	}
	removed, err := s.slotSum(s.slotFromEnd(slotRemovedFlowsFromEnd))
	if err != nil {
		return u, fmt.Errorf("reading removed flows: %w", err)
	}
	u.Removed = removed
	if u.Forgotten, err = s.slotSum(s.slotFromEnd(slotForgottenFlowsFromEnd)); err != nil {
		return u, fmt.Errorf("reading forgotten flows: %w", err)
	}
	if held := u.Inserted - min(u.Removed, u.Inserted); held > uint64(u.Capacity) {
		u.EvictedAtLeast = held - uint64(u.Capacity)
	}
	return u, nil
}

// allPrefixes allow every source: what ul_lan_src holds until the control
// plane knows the LAN's subnets.
var allPrefixes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}

// lanKey is p as a key of ul_lan_src: family byte, then the 16-byte
// address (IPv4 v4-mapped), the prefix length counting from the family.
func lanKey(p netip.Prefix) uplinkdLanPrefix {
	bits, family := 8+p.Bits(), uint8(unix.AF_INET6)
	if p.Addr().Is4() {
		bits, family = 8+96+p.Bits(), unix.AF_INET
	}
	return uplinkdLanPrefix{Prefixlen: uint32(bits), Family: family, Addr: p.Masked().Addr().As16()}
}

// SetLANSubnets replaces the subnets whose clients get flows: LAN ingress
// pins no flow from another source (a spoofed or bogon one). A family with
// no prefix given is allowed whole, so that nothing is refused for want of
// knowing its subnets.
func (d *Datapath) SetLANSubnets(subnets []netip.Prefix) error {
	want := map[uplinkdLanPrefix]bool{}
	has4, has6 := false, false
	for _, p := range subnets {
		if !p.IsValid() {
			return errors.New("setting LAN subnets: invalid prefix")
		}
		want[lanKey(p)] = true
		has4, has6 = has4 || p.Addr().Is4(), has6 || !p.Addr().Is4()
	}
	if !has4 {
		want[lanKey(allPrefixes[0])] = true
	}
	if !has6 {
		want[lanKey(allPrefixes[1])] = true
	}
	// For an instant a client may miss a subnet: its new flows then pass
	// unmarked, never moved.
	return syncSet(&d.w, d.objs.UlLanSrc, want, "LAN subnet", func(k uplinkdLanPrefix) string {
		a := netip.AddrFrom16(k.Addr)
		bits := int(k.Prefixlen) - 8
		if k.Family == unix.AF_INET {
			a, bits = a.Unmap(), bits-96
		}
		return netip.PrefixFrom(a, bits).String()
	})
}
