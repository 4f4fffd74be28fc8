################################################################################
#
# mayfly-domu-template: the PV domU template (vmlinux + initramfs with domu-shim as /init)
#
################################################################################

MAYFLY_DOMU_TEMPLATE_VERSION = $(MAYFLY_WORKSPACE_VERSION)
MAYFLY_DOMU_TEMPLATE_SOURCE =
MAYFLY_DOMU_TEMPLATE_LICENSE = GPL-3.0-or-later (domu-shim), GPL-2.0 (Linux)
MAYFLY_DOMU_TEMPLATE_DEPENDENCIES = linux mayfly-domu-shim

MAYFLY_DOMU_TEMPLATE_LIST = $(MAYFLY_DOMU_TEMPLATE_PKGDIR)/initramfs.list
MAYFLY_DOMU_TEMPLATE_DEST = $(TARGET_DIR)/usr/share/mayfly/template

# One time stamp for every entry of the archive (gen_init_cpio's -t covers directories and
# nodes; files keep their own mtime, hence the touch).
MAYFLY_DOMU_TEMPLATE_MTIME = $(or $(SOURCE_DATE_EPOCH),0)

# gen_init_cpio (a host program of the kernel build, usr/) makes the archive without root and
# with fixed owners; gzip -n adds no name or time, so equal inputs give equal bytes.
define MAYFLY_DOMU_TEMPLATE_BUILD_CMDS
	$(INSTALL) -m 0755 $(STAGING_DIR)/usr/libexec/mayfly/domu-shim $(@D)/init
	touch -d @$(MAYFLY_DOMU_TEMPLATE_MTIME) $(@D)/init
	sed 's|@DOMU_SHIM@|$(@D)/init|' $(MAYFLY_DOMU_TEMPLATE_LIST) > $(@D)/initramfs.list
	$(LINUX_DIR)/usr/gen_init_cpio -t $(MAYFLY_DOMU_TEMPLATE_MTIME) $(@D)/initramfs.list | \
		gzip -n -9 > $(@D)/initramfs.cpio.gz
	$(TARGET_OBJCOPY) --strip-debug $(LINUX_DIR)/vmlinux $(@D)/vmlinux
endef

define MAYFLY_DOMU_TEMPLATE_INSTALL_TARGET_CMDS
	$(INSTALL) -D -m 0644 $(@D)/vmlinux $(MAYFLY_DOMU_TEMPLATE_DEST)/vmlinux
	$(INSTALL) -D -m 0644 $(@D)/initramfs.cpio.gz $(MAYFLY_DOMU_TEMPLATE_DEST)/initramfs.cpio.gz
	cd $(MAYFLY_DOMU_TEMPLATE_DEST) && sha256sum vmlinux initramfs.cpio.gz > SHA256SUMS
endef

$(eval $(generic-package))
