#!/usr/bin/env bash
# The kernel matrix: test/vm/vmtest.sh on each kernel, then one line per
# kernel (kernel, attach mode, recovery from conntrack, tests passed,
# failed and skipped, time). The kernels are fetched one after the other,
# then booted up to VMTEST_JOBS at a time (default 3, all of them: each VM
# emulates its CPUs on one host thread, and three on two cores finish
# sooner than two and then one). Fails when any kernel failed (a test
# failed, none ran, or one VMTEST_LIST names did not run: see vmtest.sh).
# VMTEST_LIST or VMTEST_RUN, like vmtest.sh's other variables, goes to
# every kernel's run: `make test` runs the tests of test/vm/subset.txt
# (make vmtest-subset), `make vmtest-all` all of them.
#
#   test/vm/matrix.sh [KERNEL...]     (default: 6.1 6.12 newest)
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(6.1 6.12 newest)
jobs=${VMTEST_JOBS:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# Fetched one at a time (apt), then booted by package name.
declare -A pkg
for k in "${kernels[@]}"; do
	pkg[$k]=$(VMTEST_PREPARE_ONLY=1 "$here/vmtest.sh" "$k" | tail -1) || exit 1
	[ -n "${pkg[$k]}" ] || exit 1
done
start=$SECONDS
for k in "${kernels[@]}"; do
	while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n; done
	("$here/vmtest.sh" "${pkg[$k]}" >"$out/$k.log" 2>&1; echo $? >"$out/$k.rc") &
done
wait
status=0
summary=()
for k in "${kernels[@]}"; do
	cat "$out/$k.log"
	line=$(grep '^vmtest kernel=' "$out/$k.log" | tail -1)
	[ -n "$line" ] || line="vmtest kernel=$k failed to run"
	summary+=("$line")
	[ "$(cat "$out/$k.rc" 2>/dev/null)" = 0 ] || status=1
done
echo
tests=all
[ -n "${VMTEST_RUN:-}" ] && tests="/$VMTEST_RUN/"
[ -n "${VMTEST_LIST:-}" ] && tests=$VMTEST_LIST
echo "kernel matrix ($jobs at a time, $((SECONDS - start))s in all, tests: $tests):"
printf '  %s\n' "${summary[@]}"
exit "$status"
