# nbd-mirror: the project's vocabulary as make targets.
#
#   make build        release binaries (target/release/mirrord, mirrorctl)
#   make test         deps, fmt check, clippy, all cargo tests (unit, sim,
#                     integration with real NBD clients), then `make sim`
#                     (1,000 seeds); what CI runs
#   make lint         fmt check, clippy, script syntax checks
#   make test-reference   the NBD client/bad-input tests against qemu-nbd,
#                     to tell a test bug from a server bug
#   make man          regenerate man/*.8 and completions/ from the clap definitions
#                     (tests/cli_docs.rs checks them in cargo-test; commit the result)
#   make deb          tools/build-deb.sh: target/deb/nbd-mirror_VERSION_ARCH.deb
#   make deb-check    make deb, then lintian on it (installs lintian if missing)
#   make demo         tools/demo.sh (installs what it needs first: install-deps.sh demo)
#   make bench        tools/bench/bench.sh (BENCH_SECONDS per job, default 10;
#                     BENCH_ROUNDS rounds, default 3, medians reported), then bench-resync
#   make bench-resync tools/bench/resync_bench.sh (full resync vs TCP copy, 2 GiB;
#                     fio during a full resync vs in sync)
#   make fuzz         tools/fuzz.sh (FUZZ_SECONDS, default 60)
#   make vm-smoke / vm-test   from vm-images/vm.mk, when present
#
# Which binaries the integration tests run: the ones cargo builds for the
# test run itself (debug profile, so debug_assert! invariants are live).
# Set MIRRORD_BIN / MIRRORCTL_BIN to test other builds, e.g.
#   make test MIRRORD_BIN=$PWD/target/release/mirrord MIRRORCTL_BIN=$PWD/target/release/mirrorctl
# The benchmark always uses the release build.

CARGO ?= cargo
FUZZ_SECONDS ?= 60
BENCH_SECONDS ?= 10
BENCH_ROUNDS ?= 3
PYTHON := /usr/bin/python3

export MIRRORD_BIN
export MIRRORCTL_BIN

SHELL_SCRIPTS := $(wildcard tools/*.sh tools/bench/*.sh .ci/run vm-images/*.sh vm-images/lib/*.sh \
	vm-images/tests/*.sh vm-images/guest/vm-init vm-images/guest/vm-run)
PY_SCRIPTS := $(wildcard tests/clients/*.py tools/bench/*.py)

.PHONY: all build deps demo-deps man deb deb-check test lint fmt-check clippy scripts-check cargo-test test-reference demo bench fuzz

all: build

build:
	$(CARGO) build --release --bins

deps:
	tools/install-deps.sh

test: deps lint cargo-test sim chaos vm-ci

cargo-test:
	$(CARGO) test --all-targets
	$(CARGO) test --doc

lint: fmt-check clippy scripts-check

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

scripts-check:
	@for f in $(SHELL_SCRIPTS); do bash -n "$$f" || exit 1; done
	@if command -v shellcheck >/dev/null 2>&1; then shellcheck -S warning $(SHELL_SCRIPTS); fi
	@$(PYTHON) -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' $(PY_SCRIPTS)
	@echo "scripts-check: $(words $(SHELL_SCRIPTS)) shell and $(words $(PY_SCRIPTS)) python scripts parse"

test-reference: deps
	NBD_TEST_SERVER=qemu-nbd $(CARGO) test --test nbd_qemu_clients --test nbd_libnbd_clients \
		--test nbd_fio --test nbd_bad_input --test daemon_lifecycle

deb: build
	tools/build-deb.sh

deb-check: deb
	tools/check-deb.sh

man:
	MIRROR_UPDATE_DOCS=1 $(CARGO) test --test cli_docs generated_pages_and_completions_are_current

demo: demo-deps build
	tools/demo.sh

# Only what the demo needs (nbdcopy, python3), so a first `make demo` on a
# fresh Debian 12 machine works without the whole test toolset.
demo-deps:
	tools/install-deps.sh demo

bench: deps build
	BENCH_SECONDS=$(BENCH_SECONDS) BENCH_ROUNDS=$(BENCH_ROUNDS) tools/bench/bench.sh
	tools/bench/resync_bench.sh

# Full resync of a 2 GiB disk against a plain TCP copy, bytes moved by an
# incremental (1%) and a checksum resync, an application's IOPS and the resync's
# rate during a full resync (tools/bench/resync_bench.sh; `make bench` runs it too).
.PHONY: bench-resync
bench-resync: build
	tools/bench/resync_bench.sh

fuzz:
	FUZZ_SECONDS=$(FUZZ_SECONDS) tools/fuzz.sh

# vm-smoke / vm-test (written separately; absent is fine).
-include vm-images/vm.mk

# The deterministic simulator (src/sim, mirror-sim): SEEDS seeds (default 1000),
# release build with debug assertions and overflow checks on, in its own target
# dir so `make build` is not rebuilt. A failing seed prints its replay command.
# Metadata writes fail now and then (one in 500, until the faults stop; the
# summary counts them); `mirror-sim --no-meta-failures` turns that off.
SEEDS ?= 1000
SIM_BIN := target/sim/release/mirror-sim
SIM_BUILD := CARGO_TARGET_DIR=target/sim CARGO_PROFILE_RELEASE_DEBUG_ASSERTIONS=true \
	CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true $(CARGO) build --release --bin mirror-sim

.PHONY: sim sim-long
sim:
	$(SIM_BUILD)
	$(SIM_BIN) --seeds $(SEEDS)

sim-long:
	$(SIM_BUILD)
	$(SIM_BIN) --seeds 100000

# Real-process chaos (tools/chaos/chaos.py): TRIALS trials (default 20) of two
# release mirrord processes on loopback under kill -9, link partitions, restarts
# and resyncs, with a logging NBD client; afterwards every acknowledged write is
# checked on both backing files and the files are compared. Trial i uses seed
# SEED+i (SEED random if unset); a failing trial prints `make chaos TRIALS=1
# SEED=N` and keeps its directory. The driver enforces 120 s per trial and
# 60 + 30 x TRIALS s overall; `timeout` is the backstop if the driver itself hangs.
TRIALS ?= 20
.PHONY: chaos
chaos: build
	timeout -k 30 $$((180 + 30 * $(TRIALS))) $(PYTHON) tools/chaos/chaos.py --trials $(TRIALS) $(if $(SEED),--seed $(SEED))
