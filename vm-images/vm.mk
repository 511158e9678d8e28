# VM test targets; included from the top-level Makefile (`include vm-images/vm.mk`).
# Guests are User-Mode Linux (see vm-images/README.md). Everything runs as root.
# Leave the including Makefile's default goal alone wherever this is included.
VM_SAVED_DEFAULT_GOAL := $(.DEFAULT_GOAL)
VM_DIR := $(patsubst %/,%,$(dir $(lastword $(MAKEFILE_LIST))))
CARGO ?= cargo

.PHONY: vm-bins vm-image vm-smoke vm-smoke-standin vm-two-host vm-clean vm-test

# The project's vocabulary target; more VM tests join it as they land.
vm-test: vm-smoke

vm-bins:
	$(CARGO) build --release --bins

# Guest root image with the release mirrord/mirrorctl (cached under .cache/vm).
vm-image: vm-bins
	$(VM_DIR)/build-image.sh

# One guest: mirrord@r0 + nbd-attach@r0 (nbd-client -C 4), fio verify, ext4, clean stop.
vm-smoke: vm-bins
	VM_SMOKE_SERVER=mirrord $(VM_DIR)/smoke.sh

# The same test with nbdkit standing in for mirrord (checks the harness alone).
vm-smoke-standin:
	VM_SMOKE_SERVER=standin $(VM_DIR)/smoke.sh

# Skeleton, not part of vm-test yet: two guests, mirrord peers, OCFS2 on both.
vm-two-host: vm-bins
	$(VM_DIR)/two-host.sh

vm-clean:
	rm -rf $(VM_DIR)/../.cache/vm

.DEFAULT_GOAL := $(VM_SAVED_DEFAULT_GOAL)
