// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"errors"
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
	"github.com/florianl/go-tc"
	"github.com/florianl/go-tc/core"
	"golang.org/x/sys/unix"
)

// The tc fallback (kernels without TCX): a clsact qdisc, created only if
// missing, and one cls_bpf filter per hook in direct-action mode at a fixed
// priority and handle, named after the program. Only filters with that
// priority, handle and a ProgPrefix name are ever replaced or deleted.
const (
	tcPriority = 0x7570 // "up"; filters with a lower priority run first
	tcHandle   = 0x1
)

// tcStateSpec describes ul_tc_state, pinned next to the datapath's maps. It
// has an entry (tcKey) for each interface where uplinkd installed filters,
// with tcStateClsact set when uplinkd created the clsact qdisc: that qdisc is
// then removed with the last filter.
var tcStateSpec = &ebpf.MapSpec{
	Name:       "ul_tc_state",
	Type:       ebpf.Hash,
	KeySize:    16,
	ValueSize:  4,
	MaxEntries: 256,
	Pinning:    ebpf.PinByName,
}

// tcKey names an interface: ifindexes are per network namespace, and
// cleaning up by ifindex in another namespace would hit the wrong interface.
type tcKey struct {
	Netns   uint64 // inode of the network namespace
	Ifindex uint32
	_       uint32
}

// currentNetns is the inode of the calling thread's network namespace.
func currentNetns() (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/thread-self/ns/net", &st); err != nil {
		return 0, fmt.Errorf("identifying network namespace: %w", err)
	}
	return st.Ino, nil
}

func tcKeyOf(ifindex int) (tcKey, error) {
	ns, err := currentNetns()
	return tcKey{Netns: ns, Ifindex: uint32(ifindex)}, err
}

// tcStateClsact: uplinkd created the clsact qdisc.
const tcStateClsact uint32 = 1

// tcInfo is tcmsg.tcm_info of a filter: priority and protocol (all).
var tcInfo = uint32(tcPriority)<<16 | uint32(htons(unix.ETH_P_ALL))

func htons(v uint16) uint16 { return v<<8 | v>>8 }

func tcOpen() (*tc.Tc, error) {
	nl, err := tc.Open(&tc.Config{})
	if err != nil {
		return nil, fmt.Errorf("opening rtnetlink: %w", err)
	}
	return nl, nil
}

func tcAttach(state *ebpf.Map, ifindex int, dir direction, prog *ebpf.Program) error {
	key, err := tcKeyOf(ifindex)
	if err != nil {
		return err
	}
	nl, err := tcOpen()
	if err != nil {
		return err
	}
	defer nl.Close()

	var flags uint32
	if err := state.Lookup(&key, &flags); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("reading tc state: %w", err)
	}
	created, err := ensureClsact(nl, ifindex)
	if err != nil {
		return err
	}
	if created {
		flags |= tcStateClsact
	}
	// Recorded before the filter goes in, so that Remove finds it.
	if err := state.Put(&key, flags); err != nil {
		return fmt.Errorf("recording tc state: %w", err)
	}

	parent := core.BuildHandle(tc.HandleRoot, dir.tcParent)
	if f, err := findFilter(nl, ifindex, parent); err != nil {
		return err
	} else if f != nil && !ours(f) {
		return fmt.Errorf("filter priority %#x handle %#x belongs to someone else", tcPriority, tcHandle)
	}

	info, err := prog.Info()
	if err != nil {
		return fmt.Errorf("program info: %w", err)
	}
	fd := uint32(prog.FD())
	name := info.Name
	direct := uint32(tc.BpfActDirect)
	filter := tc.Object{
		Msg: tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Handle:  tcHandle,
			Parent:  parent,
			Info:    tcInfo,
		},
		Attribute: tc.Attribute{
			Kind: "bpf",
			BPF:  &tc.Bpf{FD: &fd, Name: &name, Flags: &direct},
		},
	}
	// Creates the filter, or swaps the program of ours atomically.
	if err := nl.Filter().Replace(&filter); err != nil {
		return fmt.Errorf("adding cls_bpf filter: %w", err)
	}
	return nil
}

// ensureClsact adds a clsact qdisc to ifindex unless it has one, and says
// whether it did.
func ensureClsact(nl *tc.Tc, ifindex int) (bool, error) {
	qdiscs, err := nl.Qdisc().Get()
	if err != nil {
		return false, fmt.Errorf("listing qdiscs: %w", err)
	}
	for _, q := range qdiscs {
		if int(q.Ifindex) == ifindex && q.Kind == "clsact" {
			return false, nil
		}
	}
	if err := nl.Qdisc().Add(clsact(ifindex)); err != nil {
		return false, fmt.Errorf("adding clsact qdisc: %w", err)
	}
	return true, nil
}

func clsact(ifindex int) *tc.Object {
	return &tc.Object{
		Msg: tc.Msg{
			Family:  unix.AF_UNSPEC,
			Ifindex: uint32(ifindex),
			Handle:  core.BuildHandle(tc.HandleRoot, 0),
			Parent:  tc.HandleIngress,
		},
		Attribute: tc.Attribute{Kind: "clsact"},
	}
}

func listFilters(nl *tc.Tc, ifindex int, parent uint32) ([]tc.Object, error) {
	filters, err := nl.Filter().Get(&tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex), Parent: parent})
	if err != nil {
		return nil, fmt.Errorf("listing filters: %w", err)
	}
	return filters, nil
}

// findFilter returns the filter at uplinkd's priority and handle under
// parent, if any.
func findFilter(nl *tc.Tc, ifindex int, parent uint32) (*tc.Object, error) {
	filters, err := listFilters(nl, ifindex, parent)
	if err != nil {
		return nil, err
	}
	for i, f := range filters {
		if f.Info>>16 == tcPriority && f.Handle == tcHandle {
			return &filters[i], nil
		}
	}
	return nil, nil
}

func ours(f *tc.Object) bool {
	return f.Kind == "bpf" && f.BPF != nil && f.BPF.Name != nil && strings.HasPrefix(*f.BPF.Name, ProgPrefix)
}

// tcDetach removes uplinkd's filter from a hook of ifindex, if it put one
// there (see tcCleanup).
func tcDetach(state *ebpf.Map, ifindex int, dir direction) error {
	key, err := tcKeyOf(ifindex)
	if err != nil {
		return err
	}
	var flags uint32
	if err := state.Lookup(&key, &flags); errors.Is(err, ebpf.ErrKeyNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("reading tc state: %w", err)
	}
	nl, err := tcOpen()
	if err != nil {
		return err
	}
	defer nl.Close()
	return tcCleanup(nl, state, key, flags, dir)
}

// tcRemoveAll undoes the tc attachments recorded in state for the current
// network namespace.
func tcRemoveAll(state *ebpf.Map) error {
	netns, err := currentNetns()
	if err != nil {
		return err
	}
	var (
		key   tcKey
		flags uint32
		here  = map[tcKey]uint32{}
		errs  []error
	)
	for it := state.Iterate(); it.Next(&key, &flags); {
		if key.Netns != netns {
			errs = append(errs, fmt.Errorf("tc filters on ifindex %d of network namespace %d: remove them from there", key.Ifindex, key.Netns))
			continue
		}
		here[key] = flags
	}
	if len(here) == 0 {
		return errors.Join(errs...)
	}

	nl, err := tcOpen()
	if err != nil {
		return err
	}
	defer nl.Close()
	for key, flags := range here {
		errs = append(errs, tcCleanup(nl, state, key, flags, ingress, egress))
	}
	return errors.Join(errs...)
}

// tcCleanup deletes uplinkd's filters from the hooks dirs of an interface,
// then, when no filter at all is left there, the clsact qdisc if uplinkd
// created it, and the interface's entry in state.
func tcCleanup(nl *tc.Tc, state *ebpf.Map, key tcKey, flags uint32, dirs ...direction) error {
	ifindex := int(key.Ifindex)
	for _, dir := range dirs {
		parent := core.BuildHandle(tc.HandleRoot, dir.tcParent)
		f, err := findFilter(nl, ifindex, parent)
		if err != nil {
			return err
		}
		if f == nil || !ours(f) {
			continue
		}
		del := tc.Object{
			Msg:       tc.Msg{Family: unix.AF_UNSPEC, Ifindex: uint32(ifindex), Handle: tcHandle, Parent: parent, Info: tcInfo},
			Attribute: tc.Attribute{Kind: "bpf"},
		}
		if err := nl.Filter().Delete(&del); err != nil {
			return fmt.Errorf("deleting filter from ifindex %d: %w", ifindex, err)
		}
	}

	for _, dir := range []direction{ingress, egress} {
		left, err := listFilters(nl, ifindex, core.BuildHandle(tc.HandleRoot, dir.tcParent))
		if err != nil {
			return err
		}
		if len(left) > 0 {
			return nil
		}
	}
	if flags&tcStateClsact != 0 {
		if err := nl.Qdisc().Delete(clsact(ifindex)); err != nil && !errors.Is(err, unix.ENOENT) && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENODEV) {
			return fmt.Errorf("deleting clsact qdisc from ifindex %d: %w", ifindex, err)
		}
	}
	if err := state.Delete(&key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("forgetting tc state of ifindex %d: %w", ifindex, err)
	}
	return nil
}
