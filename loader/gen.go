// SPDX-License-Identifier: Apache-2.0

package loader

// The generated uplinkd_bpfel.{go,o} and empty_bpfel.{go,o} are committed, so
// that building needs no clang. Regenerate with: go generate ./loader/...

//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel -type flow_key -type flow -type line -type line_stats -type lan_prefix -type rule_bitmap -type rule_prefix -type rule_lan_key -type rule_action -type rule_cfg -type policy -type policy_buckets -type sticky_key -type sticky -type v4_node -type v4_tree -type v4_common -type rule_lan_slot uplinkd ../bpf/uplinkd.c -- -I../bpf/include
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel empty ../bpf/empty.c -- -I../bpf/include
//go:generate go tool bpf2go -cc clang-19 -strip llvm-strip-19 -cflags "-O2 -g -Wall -Werror -mcpu=v3" -target bpfel floor ../bpf/floor.c -- -I../bpf/include
