#!/usr/bin/env bash
# The kernel matrix: test/vm/vmtest.sh on each kernel in turn, then one line
# per kernel (kernel, attach mode, recovery from conntrack, tests passed,
# failed and skipped, time). Fails when any kernel failed.
#
#   test/vm/matrix.sh [KERNEL...]     (default: 6.1 6.12 newest)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.12 newest)
summary=()
status=0
for k in "${kernels[@]}"; do
	out=$(mktemp)
	"$here/vmtest.sh" "$k" 2>&1 | tee "$out"
	rc=${PIPESTATUS[0]}
	line=$(grep '^vmtest kernel=' "$out" | tail -1)
	[ -n "$line" ] || line="vmtest kernel=$k failed to run (exit $rc)"
	summary+=("$line")
	[ "$rc" = 0 ] || status=1
	rm -f "$out"
done
echo
echo "kernel matrix:"
printf '  %s\n' "${summary[@]}"
exit "$status"
