################################################################################
#
# mayfly-dom0-agent
#
################################################################################

# dom0-agent and its sandbox template, mayfly-zygote, from the Mayfly workspace (the agent
# looks for mayfly-zygote beside its own executable). The appliance runs the Xen backend;
# this mayfly-zygote is cargo's dynamically linked build, which works the same but without
# the speed-ups of scripts/build-zygote.sh's static one.
MAYFLY_DOM0_AGENT_VERSION = $(MAYFLY_WORKSPACE_VERSION)
MAYFLY_DOM0_AGENT_SITE = $(MAYFLY_WORKSPACE)
MAYFLY_DOM0_AGENT_SITE_METHOD = local
MAYFLY_DOM0_AGENT_OVERRIDE_SRCDIR_RSYNC_EXCLUSIONS = $(MAYFLY_RSYNC_EXCLUSIONS)
MAYFLY_DOM0_AGENT_LICENSE = GPL-3.0-or-later
MAYFLY_DOM0_AGENT_LICENSE_FILES = LICENSE
# tpm2-tss: tss-esapi links its ESAPI, found through host-pkgconf.
MAYFLY_DOM0_AGENT_DEPENDENCIES = mayfly-vendor tpm2-tss host-pkgconf
MAYFLY_DOM0_AGENT_CARGO_BUILD_OPTS = --package dom0-agent --bin dom0-agent --bin mayfly-zygote $(MAYFLY_CARGO_VENDOR_OPTS)
MAYFLY_DOM0_AGENT_PRE_BUILD_HOOKS += MAYFLY_CHECK_RUSTC

define MAYFLY_DOM0_AGENT_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0755 $(@D)/$(MAYFLY_CARGO_OUT)/dom0-agent $(TARGET_DIR)/usr/sbin/dom0-agent
	$(INSTALL) -D -m 0755 $(@D)/$(MAYFLY_CARGO_OUT)/mayfly-zygote $(TARGET_DIR)/usr/sbin/mayfly-zygote
endef

$(eval $(cargo-package))
