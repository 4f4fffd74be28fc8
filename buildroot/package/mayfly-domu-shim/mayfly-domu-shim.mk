################################################################################
#
# mayfly-domu-shim: domu-shim from the Mayfly workspace, static, for the domU template
#
################################################################################

MAYFLY_DOMU_SHIM_VERSION = $(MAYFLY_WORKSPACE_VERSION)
MAYFLY_DOMU_SHIM_SITE = $(MAYFLY_WORKSPACE)
MAYFLY_DOMU_SHIM_SITE_METHOD = local
MAYFLY_DOMU_SHIM_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = $(MAYFLY_RSYNC_EXCLUSIONS)
MAYFLY_DOMU_SHIM_LICENSE = GPL-3.0-or-later
MAYFLY_DOMU_SHIM_LICENSE_FILES = LICENSE
MAYFLY_DOMU_SHIM_DEPENDENCIES = mayfly-vendor
MAYFLY_DOMU_SHIM_CARGO_BUILD_OPTS = --package domu-shim --bin domu-shim $(MAYFLY_CARGO_VENDOR_OPTS)
# The template's initramfs holds only /init: link glibc statically.
MAYFLY_DOMU_SHIM_CARGO_ENV = \
	CARGO_TARGET_$(call UPPERCASE,$(RUSTC_TARGET_NAME))_RUSTFLAGS="-C target-feature=+crt-static"
MAYFLY_DOMU_SHIM_PRE_BUILD_HOOKS += MAYFLY_CHECK_RUSTC
MAYFLY_DOMU_SHIM_INSTALL_STAGING = YES
MAYFLY_DOMU_SHIM_INSTALL_TARGET = NO

define MAYFLY_DOMU_SHIM_INSTALL_STAGING_CMDS
	$(INSTALL) -D -m 0755 $(@D)/$(MAYFLY_CARGO_OUT)/domu-shim \
		$(STAGING_DIR)/usr/libexec/mayfly/domu-shim
endef

$(eval $(cargo-package))
