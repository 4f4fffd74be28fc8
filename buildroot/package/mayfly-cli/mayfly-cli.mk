################################################################################
#
# mayfly-cli: mayfly from the Mayfly workspace
#
################################################################################

MAYFLY_CLI_VERSION = $(MAYFLY_WORKSPACE_VERSION)
MAYFLY_CLI_SITE = $(MAYFLY_WORKSPACE)
MAYFLY_CLI_SITE_METHOD = local
MAYFLY_CLI_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = $(MAYFLY_RSYNC_EXCLUSIONS)
MAYFLY_CLI_LICENSE = GPL-3.0-or-later
MAYFLY_CLI_LICENSE_FILES = LICENSE
MAYFLY_CLI_DEPENDENCIES = mayfly-vendor
MAYFLY_CLI_CARGO_BUILD_OPTS = --package mayfly --bin mayfly $(MAYFLY_CARGO_VENDOR_OPTS)
MAYFLY_CLI_PRE_BUILD_HOOKS += MAYFLY_CHECK_RUSTC

define MAYFLY_CLI_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/$(MAYFLY_CARGO_OUT)/mayfly $(TARGET_DIR)/usr/bin/mayfly
endef

$(eval $(cargo-package))
