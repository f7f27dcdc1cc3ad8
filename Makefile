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
GOTEST     ?= $(GO) test -count=1 -timeout 20m
# Debian packages: the tools tests and the demo call (ip, tc, nft, bpftool,
# conntrack, ping, iperf3), and the pinned clang for `make generate`.
RUN_PKGS   := iproute2 nftables bpftool conntrack iputils-ping iperf3
GEN_PKGS   := clang-19 llvm-19

.PHONY: help
help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

.PHONY: demo
demo: deps build ## the main job on a built-in default: a namespace lab, the agent, traffic over every line, a failover, cleanup
	./$(BIN) lab demo

.PHONY: test
test: deps bpffs check-generated ## every test (needs root): unit, BPF_PROG_TEST_RUN, namespace lab
	$(GO) vet ./...
	$(GOTEST) ./...

.PHONY: bench
bench: deps bpffs ## benchmarks: ns/packet vs an empty program, 1M-flow map, throughput with vs without the datapath, failover and recovery times, agent CPU and memory
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 20000x ./loader/
	$(GO) test -count=1 -run '^$$' -bench . -benchtime 1x -timeout 30m ./test/

.PHONY: build
build: ## build bin/uplinkd (no clang needed: the BPF objects are committed)
	$(GO) build -o $(BIN) ./cmd/uplinkd

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
