#!/usr/bin/env bash
# vmtest: boots a stock Debian kernel under QEMU and runs uplinkd's test
# binaries inside it, so that the datapath is proven on the kernels users
# run, not only on the development machine's.
#
#   test/vm/vmtest.sh KERNEL [PACKAGE...]
#
# KERNEL is 6.1 (bookworm), 6.12 (bookworm-backports), newest (the newest in
# trixie-backports) or a linux-image package name. PACKAGEs are Go packages
# of this module to test (default: ./loader ./test). The exit status is the
# tests'; the last line is a summary, naming the tests that ran (all, a
# VMTEST_LIST file's name, or /the VMTEST_RUN pattern/):
#
#   vmtest kernel=6.12.95+deb12-amd64 attach=tcx ct_recovery=on tests=subset passed=35 failed=0 skipped=2 time=88s
#
# A kernel fails where a test failed, where no test passed or failed
# (nothing was tested), and where a test VMTEST_LIST names did not run.
#
# Environment: VMTEST_CACHE (kernels, initrds, results; default .cache/vmtest
# in the repository, git-ignored), VMTEST_LIST (a file of top-level test
# names, one a line, # comments: only those run; make test uses
# test/vm/subset.txt), VMTEST_RUN (a -test.run pattern, not with
# VMTEST_LIST), VMTEST_ARGS (more test flags), VMTEST_TIMEOUT (seconds,
# default 1500), VMTEST_ACCEL (kvm|tcg, default: kvm where it boots),
# VMTEST_TCG_THREAD (single|multi, default single), VMTEST_PREPARE_ONLY
# (fetch the kernel and build its initrd, run nothing).
#
# Only Debian packages are used: qemu-system-x86, busybox-static, cpio, kmod,
# xz-utils, zstd. Kernels come through apt-get with a private configuration
# (the host's sources, keys and package state are untouched) from the same
# archive the host uses. KVM is used when /dev/kvm works, software emulation
# otherwise.
set -euo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
cache=${VMTEST_CACHE:-$top/.cache/vmtest}
kernel=${1:?usage: vmtest.sh KERNEL [PACKAGE...]}
shift
pkgs=("$@")
[ ${#pkgs[@]} -gt 0 ] || pkgs=(./loader ./test)
timeout_s=${VMTEST_TIMEOUT:-1500}
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

say() { printf 'vmtest: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

[ "$(id -u)" = 0 ] || die "run as root (apt-get, and the tests inside the VM load BPF programs)"
mkdir -p "$cache"

# --- which tests: all, the names in a file, or a pattern ---------------------

listed=()
tests=all
if [ -n "${VMTEST_LIST:-}" ]; then
	[ -z "${VMTEST_RUN:-}" ] || die "VMTEST_LIST and VMTEST_RUN are both set: one or the other"
	[ -f "$VMTEST_LIST" ] || die "VMTEST_LIST: no file $VMTEST_LIST"
	mapfile -t listed < <(sed 's/#.*//' "$VMTEST_LIST" | tr -s ' \t' '\n\n' | grep -v '^$' || true)
	[ ${#listed[@]} -gt 0 ] || die "VMTEST_LIST: no test names in $VMTEST_LIST"
	for t in "${listed[@]}"; do
		[[ $t =~ ^(Test|Fuzz)[A-Za-z0-9_]*$ ]] || die "VMTEST_LIST: $VMTEST_LIST: $t is not a test name"
	done
	# Top-level names, whole: -test.run '^(A|B)$' (subtests all run).
	VMTEST_RUN="^($(IFS='|'; echo "${listed[*]}"))\$"
	tests=$(basename "$VMTEST_LIST")
	tests=${tests%.*}
elif [ -n "${VMTEST_RUN:-}" ]; then
	tests="/$VMTEST_RUN/"
fi

# shq WORD: WORD quoted for the guest's env file, which busybox sh and bash
# source (a pattern holds ( | $).
shq() { printf "'%s'" "${1//\'/\'\\\'\'}"; }

# --- kernels, through apt-get with a private configuration -----------------

aptdir=$cache/apt
apt_opts=(
	-o "Dir::Etc::SourceList=$aptdir/sources.list"
	-o "Dir::Etc::SourceParts=/dev/null"
	-o "Dir::State=$aptdir/state"
	-o "Dir::State::status=$aptdir/state/status"
	-o "Dir::Cache=$aptdir/cache"
	-o "APT::Sandbox::User=root"
	-o "Debug::NoLocking=1"
)

# The Debian archive the host itself uses (its first deb source whose path
# ends in /debian), so that no mirror is written down here.
host_archive() {
	local uri
	uri=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
		awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' | grep -m1 '/debian/*$' || true)
	if [ -z "$uri" ]; then
		uri=$(cat /etc/apt/sources.list 2>/dev/null |
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { print $i; break } }' |
			grep -m1 '/debian/*$' || true)
	fi
	[ -n "$uri" ] || die "no Debian archive in the host's apt sources"
	echo "${uri%/}"
}

apt_update() {
	mkdir -p "$aptdir/state/lists/partial" "$aptdir/cache/archives/partial"
	touch "$aptdir/state/status"
	local archive key=/usr/share/keyrings/debian-archive-keyring.gpg
	archive=$(host_archive)
	{
		for suite in bookworm bookworm-backports trixie-backports; do
			echo "deb [signed-by=$key] $archive $suite main"
		done
	} >"$aptdir/sources.list"
	# Package lists younger than a day are good enough.
	if [ -z "$(find "$aptdir/state/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
		say "updating the private package lists"
		apt-get "${apt_opts[@]}" -qq update >&2
	fi
}

# image_package KERNEL: the linux-image package that KERNEL names.
image_package() {
	local suite
	case $1 in
	6.1) suite=bookworm ;;
	6.12) suite=bookworm-backports ;;
	newest) suite=trixie-backports ;;
	linux-image-*) echo "$1"; return ;;
	*) die "unknown kernel $1: 6.1, 6.12, newest or a linux-image package name" ;;
	esac
	local version
	version=$(apt-cache "${apt_opts[@]}" madison linux-image-amd64 |
		awk -F'|' -v s=" $suite/" 'index($3, s) { gsub(/ /, "", $2); print $2; exit }')
	[ -n "$version" ] || die "no linux-image-amd64 in $suite"
	apt-cache "${apt_opts[@]}" show "linux-image-amd64=$version" |
		awk '/^Depends:/' | grep -o 'linux-image-[^ ,]*-amd64' | head -1
}

# fetch_kernel PACKAGE: downloads and unpacks the kernel and its modules
# into $kdir (once), and sets kver.
fetch_kernel() {
	local pkg=$1
	kdir=$cache/kernels/$pkg
	if [ ! -f "$kdir/ready" ]; then
		say "fetching $pkg"
		rm -rf "$kdir"
		mkdir -p "$kdir/debs" "$kdir/root"
		# Newer kernels split the image into binary and modules packages.
		local deps
		deps=$(apt-cache "${apt_opts[@]}" show "$pkg" | awk '/^Depends:/' | head -1 |
			grep -oE 'linux-(binary|modules)-[^ ,]+' || true)
		(cd "$kdir/debs" && apt-get "${apt_opts[@]}" -qq download "$pkg" $deps >&2)
		for deb in "$kdir"/debs/*.deb; do dpkg-deb -x "$deb" "$kdir/root"; done
		rm -rf "$kdir/debs"
		# /boot/vmlinuz-KVER, or (7.x) usr/lib/modules/KVER/vmlinuz.
		local vmlinuz
		vmlinuz=$(ls "$kdir"/root/boot/vmlinuz-* "$kdir"/root/usr/lib/modules/*/vmlinuz 2>/dev/null | head -1 || true)
		[ -f "$vmlinuz" ] || die "$pkg has no vmlinuz"
		case $vmlinuz in
		*/boot/vmlinuz-*) kver=${vmlinuz##*/vmlinuz-} ;;
		*) kver=$(basename "$(dirname "$vmlinuz")") ;;
		esac
		# Modules live in lib/modules (6.1) or usr/lib/modules (newer):
		# one place for depmod -b and for the guest.
		local src
		for src in "$kdir/root/lib/modules/$kver" "$kdir/root/usr/lib/modules/$kver"; do
			[ -d "$src" ] && break
		done
		mkdir -p "$kdir/mods/lib/modules"
		cp "$vmlinuz" "$kdir/vmlinuz"
		mv "$src" "$kdir/mods/lib/modules/$kver"
		rm -rf "$kdir/root"
		# Quiet: 7.x ships no modules.builtin, which depmod warns about.
		depmod -b "$kdir/mods" "$kver" 2>/dev/null || depmod -b "$kdir/mods" "$kver"
		echo "$kver" >"$kdir/kver"
		make_initrd
		touch "$kdir/ready"
	fi
	kver=$(cat "$kdir/kver")
}

# --- initrd: busybox and just what mounts the root -------------------------

# The modules that mount the host's root: virtio PCI, 9p, overlayfs. Built-in
# ones are skipped by modprobe --show-depends.
root_modules="virtio_pci 9pnet_virtio 9p overlay"

make_initrd() {
	local ird=$kdir/initrd.d
	rm -rf "$ird"
	mkdir -p "$ird"/{bin,dev,proc,sys,mnt/lower,mnt/upper,newroot,modules}
	cp /bin/busybox "$ird/bin/busybox"
	for cmd in sh mount umount mkdir insmod chroot cat echo poweroff sleep ln sed sync chmod; do
		ln -s busybox "$ird/bin/$cmd"
	done
	local n=0 line ko
	: >"$ird/modules/order"
	for m in $root_modules; do
		modprobe -d "$kdir/mods" -S "$kver" --show-depends "$m" 2>/dev/null || true
	done | awk '$1 == "insmod" { print $2 }' | awk '!seen[$0]++' | while read -r ko; do
		n=$((n + 1))
		local out=$ird/modules/$(printf '%02d' "$n")-$(basename "${ko%%.ko*}").ko
		case $ko in
		*.xz) xz -dc "$ko" >"$out" ;;
		*.zst) zstd -qdc "$ko" >"$out" ;;
		*) cp "$ko" "$out" ;;
		esac
		basename "$out" >>"$ird/modules/order"
	done
	cp "$top/test/vm/init" "$ird/init"
	chmod 755 "$ird/init"
	(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$kdir/initrd.gz"
	rm -rf "$ird"
}

# --- test binaries, built on the host (compiling under emulation is slow) ---

build_binaries() {
	local out=$1
	mkdir -p "$out/bin"
	say "building static test binaries"
	(cd "$top" && CGO_ENABLED=0 go build -o "$out/bin/uplinkd" ./cmd/uplinkd)
	# packages: directory, binary, output name, -test.run pattern ("-": all).
	local p
	for p in "${pkgs[@]}"; do
		local name=${p#./}
		name=${name//\//_}
		(cd "$top" && CGO_ENABLED=0 go test -c -o "$out/bin/$name.test" "$p")
		# Before anything loads nf_conntrack in this boot: the programs
		# load, with recovery off, where the kfuncs are missing.
		[ "$p" = ./loader ] && echo "$p $name loader-noct ^TestLoadWithoutConntrackKfuncs\$" >>"$out/packages"
		echo "$p $name $name -" >>"$out/packages"
	done
}

# --- the VM ------------------------------------------------------------------

# KVM where it boots this kernel (a nested /dev/kvm may exist and still
# fail), software emulation otherwise. VMTEST_ACCEL=kvm|tcg forces one.
accel() {
	local want=${VMTEST_ACCEL:-auto}
	if [ "$want" = auto ] && [ -c /dev/kvm ]; then
		if timeout 20 qemu-system-x86_64 -accel kvm -cpu host -m 256M -nographic -no-reboot -nic none \
			-kernel "$kdir/vmlinuz" -append "console=ttyS0 panic=-1 init=/none" </dev/null 2>&1 |
			grep -q "Linux version"; then
			want=kvm
		fi
	fi
	case $want in
	kvm) echo "-accel kvm -cpu host" ;;
	# One host thread for all vCPUs: with multi-threaded TCG (QEMU 7.2) a
	# 7.3 guest died of "Oops: int3" in code the kernel was patching (a
	# static key) while the other vCPU ran it.
	*) echo "-accel tcg,thread=${VMTEST_TCG_THREAD:-single} -cpu max" ;;
	esac
}

main() {
	local pkg
	# A kernel fetched already, named by its package (matrix.sh does so
	# for runs in parallel), needs no apt at all: apt-cache rebuilding its
	# cache in several processes at once loses packages.
	if [[ $kernel == linux-image-* && -f $cache/kernels/$kernel/ready ]]; then
		pkg=$kernel
	else
		apt_update
		pkg=$(image_package "$kernel")
	fi
	[ -n "$pkg" ] || die "could not resolve kernel $kernel"
	fetch_kernel "$pkg"
	# Names for test/vm/vmtest.toml: kernels/6.1, runs/6.1, ...
	if [ "$kernel" != "$pkg" ]; then
		mkdir -p "$cache/runs"
		ln -sfn "$pkg" "$cache/kernels/$kernel"
		ln -sfn "$kver" "$cache/runs/$kernel"
	fi
	if [ -n "${VMTEST_PREPARE_ONLY:-}" ]; then
		echo "$pkg"
		return 0
	fi

	local run=$cache/runs/$kver
	rm -rf "$run"
	mkdir -p "$run/out"
	build_binaries "$run"
	cat >"$run/env" <<-EOF
		VMTEST_TOP=$(shq "$top")
		VMTEST_RUNDIR=$(shq "$run")
		VMTEST_MODULES=$(shq "$kdir/mods/lib/modules")
		VMTEST_TESTS=$(shq "$tests")
		VMTEST_RUN=$(shq "${VMTEST_RUN:-}")
		VMTEST_ARGS=$(shq "${VMTEST_ARGS:-}")
	EOF

	local acc
	acc=$(accel)
	say "booting $kver ($acc)"
	local start=$SECONDS rc=0
	# shellcheck disable=SC2086
	timeout --foreground "$timeout_s" qemu-system-x86_64 $acc \
		-m 2G -smp 2 -nographic -no-reboot -nic none \
		-kernel "$kdir/vmlinuz" -initrd "$kdir/initrd.gz" \
		-append "console=ttyS0 panic=-1 quiet loglevel=3 vmtest.run=$run" \
		-virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap" \
		-virtfs "local,path=$run,mount_tag=results,security_model=none,multidevs=remap" \
		</dev/null | tr -d '\r' | tee "$run/console.log" || rc=$?
	local secs=$((SECONDS - start))
	[ "$rc" = 0 ] || say "qemu exited with $rc"

	local status=1
	[ -f "$run/out/status" ] && status=$(cat "$run/out/status")
	local passed=0 failed=0 skipped=0 p name
	while read -r p _ name _; do
		local raw=$run/out/$name.raw
		[ -f "$raw" ] || { failed=$((failed + 1)); say "$p: no output"; continue; }
		go tool test2json -p "$p" <"$raw" >"$run/out/$name.json" || true
		# Top-level tests; a package that failed with no failing test (a
		# panic, a timeout) counts as one failure.
		read -r a b c < <(awk '
			/"Action":"(pass|fail|skip)"/ && /"Test":"[^"\/]*"/ {
				if ($0 ~ /"Action":"pass"/) p++; else if ($0 ~ /"Action":"fail"/) f++; else s++
				next
			}
			/"Action":"fail"/ && !/"Test":/ { pf++ }
			END { if (pf && !f) f = pf; print p + 0, f + 0, s + 0 }' "$run/out/$name.json")
		passed=$((passed + a)) failed=$((failed + b)) skipped=$((skipped + c))
	done <"$run/packages"
	# Every listed test ran (passed, failed or skipped) in some package: a
	# name that matches nothing would otherwise pass unnoticed.
	# (No grep -q at the end of a pipe: with pipefail, the writer it
	# stops early makes a test that ran look missing.)
	local t ran
	ran=$(sed -nE '/"Action":"(pass|fail|skip)"/ s/.*"Test":"([^"]*)".*/\1/p' "$run"/out/*.json 2>/dev/null || true)
	for t in "${listed[@]}"; do
		if ! grep -qxF -- "$t" <<<"$ran"; then
			failed=$((failed + 1))
			say "$t: in $VMTEST_LIST but it did not run (renamed or removed? the VM stopped early?)"
		fi
	done
	if [ $((passed + failed)) = 0 ]; then
		status=1
		say "no test passed or failed on $kver: nothing was tested"
	fi
	local attach=? ct=?
	if [ -f "$run/out/features" ]; then
		attach=$(awk '$1 == "attach:" { print $2 }' "$run/out/features")
		ct=$(awk '$1 == "ct_recovery:" { print $2 }' "$run/out/features")
	fi
	[ "$status" = 0 ] && [ "$failed" = 0 ] || status=1
	echo "vmtest kernel=$kver attach=$attach ct_recovery=$ct tests=$tests passed=$passed failed=$failed skipped=$skipped time=${secs}s"
	exit "$status"
}

main
