// SPDX-License-Identifier: Apache-2.0

package loader

import (
	"fmt"

	"github.com/cilium/ebpf"
)

// EmptyProgram loads the cheapest TC program there is (bpf/empty.c: it
// returns TC_ACT_UNSPEC): what benchmarks compare the datapath's programs
// with, on the same hook. The caller closes it.
func EmptyProgram() (*ebpf.Program, error) {
	var objs emptyObjects
	if err := loadEmptyObjects(&objs, nil); err != nil {
		return nil, fmt.Errorf("loading the empty program: %w", err)
	}
	return objs.UplinkdEmpty, nil
}
