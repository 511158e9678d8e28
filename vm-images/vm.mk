# VM test targets; included from the top-level Makefile (`include vm-images/vm.mk`).
# Guests are User-Mode Linux where it boots, else QEMU with TCG (VM_BACKEND=uml|qemu
# forces one; see vm-images/README.md, "Runner"). Everything runs as root.
# Leave the including Makefile's default goal alone wherever this is included.
VM_SAVED_DEFAULT_GOAL := $(.DEFAULT_GOAL)
VM_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo

.PHONY: vm-deps vm-bins vm-image vm-smoke vm-smoke-standin vm-two-host vm-restart vm-clean vm-test vm-ci bench-vm

# All VM tests: one guest (smoke), two guests with OCFS2 (two-host), and what
# a file system sees when mirrord restarts under load (restart). Each target
# builds the release binaries and the image first (both cached).
vm-test: vm-smoke vm-two-host vm-restart

# What CI can afford: the image (built from scratch on a new machine) and
# the one-guest smoke test.
vm-ci: vm-smoke

# Host packages (user-mode-linux, qemu-system-x86, mmdebstrap, ...) via apt when missing.
vm-deps:
	$(VM_DIR)/deps.sh

vm-bins:
	$(CARGO) build --release --bins

# Guest root image with the release mirrord/mirrorctl (cached under .cache/vm).
vm-image: vm-deps vm-bins
	$(VM_DIR)/build-image.sh

# One guest: mirrord@r0 + nbd-attach@r0 (nbd-client -C 4), fio verify, ext4, clean stop.
vm-smoke: vm-deps vm-bins
	VM_SMOKE_SERVER=mirrord $(VM_DIR)/smoke.sh

# The same test with nbdkit standing in for mirrord (checks the harness alone).
vm-smoke-standin: vm-deps
	VM_SMOKE_SERVER=standin $(VM_DIR)/smoke.sh

# Two guests, mirrord peers (dual-primary), OCFS2 on both, restart and kill -9 of one
# mirrord while both write, power cut of one, resync.
vm-two-host: vm-deps vm-bins
	$(VM_DIR)/two-host.sh

# restart, upgrade, kill -9 and SIGSTOP of mirrord under a mounted ext4 with fio writing,
# units as shipped (mirrorctl attach): fails on any I/O error, lost connection or fsck error.
vm-restart: vm-deps vm-bins
	$(VM_DIR)/restart.sh

# A benchmark, not a test (not in vm-test, make test or CI): nbd-mirror side by
# side with DRBD 8.4 in the same two guests, protocol C, fio on /dev/nbd0 and
# /dev/drbd0 in turns; prints the table with the ratios (docs/BENCH.md).
# VM_BENCH_ROUNDS (3), VM_BENCH_SECONDS (15), VM_BENCH_DISK_SIZE (1G).
bench-vm: vm-deps vm-bins
	$(VM_DIR)/bench-vm.sh

vm-clean:
	rm -rf $(VM_DIR)/../.cache/vm

.DEFAULT_GOAL := $(VM_SAVED_DEFAULT_GOAL)
