################################################################################
#
# Mayfly BR2_EXTERNAL tree: settings shared by the packages, then the packages.
#
################################################################################

# The Mayfly repository this tree lives in: the Rust packages build from it (site method
# "local"), never from a download.
MAYFLY_WORKSPACE = $(realpath $(BR2_EXTERNAL_MAYFLY_PATH)/..)
MAYFLY_WORKSPACE_VERSION = workspace

# What the local rsync of the workspace leaves out: build output and the vendored crates
# (those come through the mayfly-vendor package).
MAYFLY_RSYNC_EXCLUSIONS = \
	--exclude /target --exclude /buildroot/output --exclude /fuzz \
	--exclude '/*/*/fuzz/target'

# Cargo resolves crates.io from the vendored, pinned tree only; with cargo-package's
# --offline --locked nothing is downloaded and Cargo.lock cannot change.
MAYFLY_CARGO_VENDOR_OPTS = \
	--config "source.crates-io.replace-with='mayfly-vendored'" \
	--config "source.mayfly-vendored.directory='$(MAYFLY_VENDOR_DIR)'"

# Where cargo-package leaves the binaries.
MAYFLY_CARGO_OUT = target/$(RUSTC_TARGET_NAME)/$(if $(BR2_ENABLE_DEBUG),debug,release)

# The workspace declares rust-version 1.95; refuse an older host-rustc with a clear message
# instead of a cargo error deep in the build.
define MAYFLY_CHECK_RUSTC
	$(BR2_EXTERNAL_MAYFLY_PATH)/scripts/check-rustc.sh $(HOST_DIR)/bin/rustc 1.95
endef

include $(sort $(wildcard $(BR2_EXTERNAL_MAYFLY_PATH)/package/*/*.mk))
