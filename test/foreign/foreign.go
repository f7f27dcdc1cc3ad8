// SPDX-License-Identifier: Apache-2.0

// Package foreign is someone else's BPF program, for tests that uplinkd
// coexists with it. Test-only: it takes a testing.TB, so that nothing the
// uplinkd binary imports links the testing package.
package foreign

import (
	"testing"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
)

// Program is someone else's TC program, for tests that uplinkd
// coexists with it: it counts the packets it sees in counter[0] and
// returns TC_ACT_UNSPEC ("next"). Both are closed when the test ends.
func Program(tb testing.TB) (prog *ebpf.Program, counter *ebpf.Map) {
	tb.Helper()
	counter, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { counter.Close() })
	prog, err = ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:    "foreign",
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.LoadMapPtr(asm.R1, counter.FD()),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, -1).WithSymbol("out"),
			asm.Return(),
		},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { prog.Close() })
	return prog, counter
}

// Count reads a ForeignProgram's counter.
func Count(tb testing.TB, counter *ebpf.Map) uint64 {
	tb.Helper()
	var n uint64
	if err := counter.Lookup(uint32(0), &n); err != nil {
		tb.Fatal(err)
	}
	return n
}
