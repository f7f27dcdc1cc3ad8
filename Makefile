# uplinkd: `make help` lists the targets.
#
# Everything runs as root on Debian (12 or later) with Go installed; the
# targets install the Debian packages they need themselves.

GO         ?= go
CLANG      ?= clang-19
LLVM_STRIP ?= llvm-strip-19
BPF_CFLAGS ?= -O2 -g -Wall -Werror
export CLANG LLVM_STRIP BPF_CFLAGS

BIN        := bin/uplinkd
MODULE     := github.com/uplinkd/uplinkd
GOTEST     ?= $(GO) test -count=1 -timeout 20m
# Debian packages: the tools tests and the demo call (ip, tc, nft, bpftool,
# conntrack, ping, iperf3, modprobe; keepalived and conntrackd for the HA
# pair's lab), the pinned clang for `make generate`,
# and what boots the kernel matrix (QEMU, a static busybox for the initrd).
RUN_PKGS   := iproute2 nftables bpftool conntrack iputils-ping iperf3 kmod keepalived conntrackd
GEN_PKGS   := clang-19 llvm-19
VM_PKGS    := qemu-system-x86 busybox-static cpio kmod xz-utils zstd
# The kernel matrix: Debian 12's 6.1, bookworm-backports' 6.12, and the
# newest kernel in trixie-backports (see test/vm/vmtest.sh).
KERNELS    ?= 6.1 6.12 newest
KERNEL     ?= 6.12
# What `make test` runs on each kernel of the matrix: the tests that prove
# what differs between kernels, one name a line with why (`make vmtest-all`
# runs every test there).
VM_SUBSET  ?= test/vm/subset.txt
# How long `make test` fuzzes the datapath; `make fuzz` takes FUZZTIME too.
FUZZ_SHORT ?= 20s
FUZZTIME   ?= 10m

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: demo
demo: deps build ## the main job on a built-in default: a namespace lab, the agent, traffic over every line, a failover, cleanup
	./$(BIN) lab demo

.PHONY: test
test: deps bpffs check-generated ## every test (needs root): unit, BPF_PROG_TEST_RUN, namespace lab, a short fuzz, and the kernel matrix on VM_SUBSET (the full matrix is vmtest-all)
	$(GO) vet ./...
	$(GOTEST) $$($(GO) list ./... | grep -vx '$(MODULE)/test')
	$(MAKE) faults FAULT_TESTS=.
	$(GO) test -run '^$$' -fuzz FuzzLANPrograms -fuzztime $(FUZZ_SHORT) ./loader/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZ_SHORT) ./control/config/
	$(MAKE) vmtest-subset

# The safety tests: each logs a "fault-report:" row for `make faults`.
FAULT_TESTS ?= Test(RunWithoutBPFFSMounted|ReloadIntoForeignTableRefused|PinDirNotOnBPFFS|DownRefusedWhileAgentRuns|LineDownSignalsNoStranger|ForeignObjects.*|ForwardingNeverWithoutFirewall|RepairsOfOthersEdits|OneAgentPerPinDir|LineIdentityFollowsName|FailedStartKeepsAWorkingGateway|ControlSocket|SpoofedSourceDropped|BadConfigTouchesNothing)$$

.PHONY: faults
faults: deps bpffs ## the fault suite: every safety test, then one table (faults injected, survived, flows lost on healthy lines, leftovers after down, foreign objects touched, bad inputs); make test runs it with FAULT_TESTS=. (all of ./test)
	@bash -o pipefail -c '$(GO) test -count=1 -v -run "$(FAULT_TESTS)" ./test/ | test/faults-table'

.PHONY: fuzz
fuzz: deps bpffs ## fuzz the datapath (LAN ingress and egress) and the config parser, FUZZTIME each (default 10m)
	$(GO) test -run '^$$' -fuzz FuzzLANPrograms -fuzztime $(FUZZTIME) ./loader/
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime $(FUZZTIME) ./control/config/

.PHONY: vmtest
vmtest: deps vm-deps ## every loader and integration test in a VM booting a stock Debian kernel: KERNEL=6.1|6.12|newest (VMTEST_RUN=Pattern narrows)
	test/vm/vmtest.sh $(KERNEL)

.PHONY: vmtest-all
vmtest-all: deps vm-deps ## the full kernel matrix: every loader and integration test on each of KERNELS, one summary line per kernel (about 13 min here)
	test/vm/matrix.sh $(KERNELS)

.PHONY: vmtest-subset
vmtest-subset: deps vm-deps ## the kernel matrix on the tests in VM_SUBSET only, as make test runs it
	VMTEST_LIST=$(VM_SUBSET) test/vm/matrix.sh $(KERNELS)

.PHONY: bench
bench: deps bpffs ## benchmarks, then one table of every figure: ns/packet vs an empty program (test run and real traffic), new flows (1M-flow map), `uplinkd flows` over 1M flows (time, peak RSS), forwarding K vs U vs M (kernel multipath alone, the datapath, mwan3-style: TCP 1/4 streams, 64-byte UDP, medians of 9 alternating rounds, ratios to K), failover and recovery times, agent CPU and memory, HA takeover time and flows broken
	@bash -o pipefail -c '{ \
		$(GO) test -count=1 -run "^$$" -bench . -benchtime 20000x ./loader/ && \
		$(GO) test -count=1 -run "^$$" -bench . -benchtime 3x ./control/flows/ && \
		$(GO) test -count=1 -run "^$$" -bench . -benchtime 1x -timeout 40m ./test/; } | test/bench-table'

.PHONY: build
build: ## build bin/uplinkd (no clang needed: the BPF objects are committed)
	$(GO) build -o $(BIN) ./cmd/uplinkd

# Where `make install` puts uplinkd; the unit (cmd/uplinkd/dist/uplinkd.service)
# names these paths, and cmd/uplinkd/dist_test.go checks that they agree.
# DESTDIR stages the files under another root (a package build, a test).
SBIN_DIR   := /usr/local/sbin
UNIT_DIR   := /etc/systemd/system
CONF_DIR   := /etc/uplinkd
# systemd runs this machine (what sd_booted(3) checks).
SYSTEMD_UP  = test -z "$(DESTDIR)" && test -d /run/systemd/system

.PHONY: install
install: build ## install the binary, the systemd unit and (where there is none) the example config /etc/uplinkd/uplinkd.yaml; DESTDIR=... stages them
	install -D -m 0755 $(BIN) $(DESTDIR)$(SBIN_DIR)/uplinkd
	install -D -m 0644 cmd/uplinkd/dist/uplinkd.service $(DESTDIR)$(UNIT_DIR)/uplinkd.service
	@if [ -e $(DESTDIR)$(CONF_DIR)/uplinkd.yaml ] || [ -L $(DESTDIR)$(CONF_DIR)/uplinkd.yaml ]; then \
		echo "kept $(DESTDIR)$(CONF_DIR)/uplinkd.yaml (the example is cmd/uplinkd/dist/uplinkd.yaml)"; \
	else \
		echo "install -D -m 0644 cmd/uplinkd/dist/uplinkd.yaml $(DESTDIR)$(CONF_DIR)/uplinkd.yaml"; \
		install -D -m 0644 cmd/uplinkd/dist/uplinkd.yaml $(DESTDIR)$(CONF_DIR)/uplinkd.yaml; \
	fi
	@if $(SYSTEMD_UP); then echo systemctl daemon-reload; systemctl daemon-reload; fi
	@echo "next: edit $(CONF_DIR)/uplinkd.yaml, check it with uplinkd plan -c $(CONF_DIR)/uplinkd.yaml, then systemctl enable --now uplinkd"

.PHONY: uninstall
uninstall: ## remove the binary and the unit (refused while the service runs); keeps the config and the kernel state (uplinkd down removes that: run it first)
	@if $(SYSTEMD_UP) && systemctl -q is-active uplinkd.service; then \
		echo "uplinkd.service is running: systemctl disable --now uplinkd, then uplinkd down -c $(CONF_DIR)/uplinkd.yaml to remove its kernel state, then make uninstall"; \
		exit 1; \
	fi
	@if $(SYSTEMD_UP) && systemctl -q is-enabled uplinkd.service 2>/dev/null; then echo systemctl disable uplinkd.service; systemctl disable uplinkd.service; fi
	rm -f $(DESTDIR)$(SBIN_DIR)/uplinkd $(DESTDIR)$(UNIT_DIR)/uplinkd.service
	@if $(SYSTEMD_UP); then echo systemctl daemon-reload; systemctl daemon-reload; fi
	@echo "kept $(DESTDIR)$(CONF_DIR)/uplinkd.yaml"

.PHONY: generate
generate: gen-deps ## rebuild the BPF objects and their Go bindings with the pinned clang
	$(GO) generate ./...

.PHONY: check-generated
check-generated: generate ## fail when the committed BPF objects differ from what `make generate` builds
	@git diff --exit-code --stat -- '*_bpfel.go' '*_bpfel.o' || \
		{ echo "generated BPF files are stale: run make generate and commit them"; exit 1; }

.PHONY: deps
deps: root ## install the Debian packages the tests and the demo call
	@./.ci/apt-install $(RUN_PKGS)
	$(GO) mod download

.PHONY: vm-deps
vm-deps: root
	@./.ci/apt-install $(VM_PKGS)

.PHONY: gen-deps
gen-deps: root
	@./.ci/apt-install $(GEN_PKGS)

.PHONY: bpffs
bpffs: root
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

.PHONY: root
root:
	@test "$$(id -u)" = 0 || { echo "run as root: the tests create network namespaces and load BPF programs"; exit 1; }

.PHONY: clean
clean: ## remove build output
	rm -rf bin
