################################################################################
#
# mayfly-update
#
################################################################################

MAYFLY_UPDATE_VERSION = $(MAYFLY_WORKSPACE_VERSION)
MAYFLY_UPDATE_SITE = $(MAYFLY_WORKSPACE)
MAYFLY_UPDATE_SITE_METHOD = local
MAYFLY_UPDATE_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = $(MAYFLY_RSYNC_EXCLUSIONS)
MAYFLY_UPDATE_LICENSE = GPL-3.0-or-later
MAYFLY_UPDATE_LICENSE_FILES = LICENSE
MAYFLY_UPDATE_DEPENDENCIES = mayfly-vendor
MAYFLY_UPDATE_CARGO_BUILD_OPTS = --package mayfly-update --bin mayfly-update $(MAYFLY_CARGO_VENDOR_OPTS)
MAYFLY_UPDATE_PRE_BUILD_HOOKS += MAYFLY_CHECK_RUSTC

define MAYFLY_UPDATE_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/$(MAYFLY_CARGO_OUT)/mayfly-update $(TARGET_DIR)/usr/sbin/mayfly-update
endef

$(eval $(cargo-package))
