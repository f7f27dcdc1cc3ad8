#!/bin/bash
# Runs inside the vmtest guest, in the host's root: each package's test
# binary from the package's directory, its output kept for test2json on the
# host and shown on the console, then the features report. VMTEST_RUN (from
# the env file vmtest.sh writes: its own, or the names of VMTEST_LIST)
# narrows each run that has no pattern of its own in the packages file.
set -u
run=$(cd "$1" && pwd)
# shellcheck disable=SC1091
. "$run/env"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp UPLINKD_BIN=$run/bin/uplinkd
# The kill -9 trials of TestForwardingNeverWithoutFirewall: 20 on the host,
# fewer in an emulated VM (each start there takes seconds; the ordering it
# proves does not depend on the kernel).
export UPLINKD_KILL_TRIALS=${UPLINKD_KILL_TRIALS:-6}
# Tests that time sub-second protocols between daemons skip in an emulated
# guest (see test/ha_test.go).
export UPLINKD_EMULATED_VM=1
echo "vmtest guest: kernel $(uname -r), $(nproc) CPUs, tests: ${VMTEST_TESTS:-all}"
status=0
while read -r pkg bin name pattern; do
	cd "$VMTEST_TOP/$pkg" || { status=1; continue; }
	args=(-test.v=test2json -test.count=1 -test.timeout=20m)
	[ "$pattern" != - ] && args+=(-test.run "$pattern")
	[ "$pattern" = - ] && [ -n "${VMTEST_RUN:-}" ] && args+=(-test.run "$VMTEST_RUN")
	# shellcheck disable=SC2086
	"$run/bin/$bin.test" "${args[@]}" $VMTEST_ARGS 2>&1 | tee "$run/out/$name.raw" | tr -d '\026'
	[ "${PIPESTATUS[0]}" = 0 ] || status=1
done <"$run/packages"
# Last: it loads nf_conntrack, which the first test needs not loaded.
"$run/bin/uplinkd" features | tee "$run/out/features"
echo "$status" >"$run/out/status"
