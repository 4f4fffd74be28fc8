################################################################################
#
# mayfly-vendor: the pinned, vendored crates the Mayfly Rust packages build from
#
################################################################################

MAYFLY_VENDOR_VERSION = pinned
MAYFLY_VENDOR_SITE = $(or $(call qstrip,$(BR2_PACKAGE_MAYFLY_VENDOR_DIR)),$(MAYFLY_WORKSPACE)/target/mayfly-vendor)
MAYFLY_VENDOR_SITE_METHOD = local
MAYFLY_VENDOR_LICENSE = MIT, Apache-2.0, BSD-3-Clause, ISC, Unicode-3.0 (see deny.toml)
MAYFLY_VENDOR_INSTALL_TARGET = NO

# Refuse a vendored tree that is not the one pinned for this Cargo.lock.
define MAYFLY_VENDOR_VERIFY_PIN
	$(BR2_EXTERNAL_MAYFLY_PATH)/scripts/vendor-crates.sh verify $(@D)
endef
MAYFLY_VENDOR_POST_RSYNC_HOOKS += MAYFLY_VENDOR_VERIFY_PIN

$(eval $(generic-package))
