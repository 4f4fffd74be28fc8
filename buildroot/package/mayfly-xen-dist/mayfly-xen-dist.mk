################################################################################
#
# mayfly-xen-dist: Xen 4.17 hypervisor and PV toolstack for x86_64
#
################################################################################

MAYFLY_XEN_DIST_VERSION = 4.17.7+13-g2445b30a44
MAYFLY_XEN_DIST_SOURCE = xen_$(MAYFLY_XEN_DIST_VERSION).orig.tar.xz
# A directory URL holding the tarball (see Config.in), or by default target/xen-source/ in the
# Mayfly repository; a copy already in $(BR2_DL_DIR)/mayfly-xen-dist/ is used as it is. The
# hash pins the content wherever it comes from.
MAYFLY_XEN_DIST_SITE = $(or $(call qstrip,$(BR2_PACKAGE_MAYFLY_XEN_DIST_SITE)),file://$(MAYFLY_WORKSPACE)/target/xen-source)
MAYFLY_XEN_DIST_LICENSE = GPL-2.0 (hypervisor, tools), LGPL-2.1 (libraries)
MAYFLY_XEN_DIST_LICENSE_FILES = COPYING
MAYFLY_XEN_DIST_CPE_ID_VENDOR = xen
MAYFLY_XEN_DIST_CPE_ID_PRODUCT = xen
MAYFLY_XEN_DIST_CPE_ID_VERSION = 4.17.7
MAYFLY_XEN_DIST_INSTALL_IMAGES = YES

MAYFLY_XEN_DIST_DEPENDENCIES = \
	host-acpica \
	host-bison \
	host-flex \
	host-pkgconf \
	host-python3 \
	util-linux \
	yajl \
	zlib \
	xz \
	zstd \
	ncurses

# PV only: no QEMU device model, no HVM firmware, no stub domains, no docs. hvmloader, the
# Python bindings and pygrub have no configure option in Xen 4.17: the board's patch
# (board/mayfly/patches/mayfly-xen-dist/, through BR2_GLOBAL_PATCH_DIR) leaves them out.
MAYFLY_XEN_DIST_CONF_OPTS = \
	--disable-qemu-traditional \
	--with-system-qemu=/bin/false \
	--disable-seabios \
	--disable-rombios \
	--disable-ipxe \
	--disable-stubdom \
	--disable-ocamltools \
	--disable-golang \
	--disable-docs \
	--disable-systemd \
	--disable-werror \
	--with-initddir=/etc/init.d

MAYFLY_XEN_DIST_CONF_ENV = PYTHON=$(HOST_DIR)/bin/python3

MAYFLY_XEN_DIST_MAKE_ENV = \
	XEN_TARGET_ARCH=x86_64 \
	CROSS_COMPILE=$(TARGET_CROSS) \
	HOST_EXTRACFLAGS="-Wno-error" \
	XEN_HAS_CHECKPOLICY=n \
	$(TARGET_CONFIGURE_OPTS)

MAYFLY_XEN_DIST_MAKE_OPTS = dist-xen dist-tools

define MAYFLY_XEN_DIST_BUILD_CMDS
	$(MAYFLY_XEN_DIST_MAKE_ENV) $(MAKE) -C $(@D) $(MAYFLY_XEN_DIST_MAKE_OPTS)
endef

# The tools, their libraries and init scripts from dist/install; the hypervisor is not part
# of the root file system.
define MAYFLY_XEN_DIST_INSTALL_TARGET_CMDS
	rsync -a --exclude /boot --exclude /usr/include --exclude '*.a' \
		--exclude /usr/share/doc --exclude /usr/share/man \
		$(@D)/dist/install/ $(TARGET_DIR)/
endef

define MAYFLY_XEN_DIST_INSTALL_STAGING_CMDS
	rsync -a --exclude /boot $(@D)/dist/install/ $(STAGING_DIR)/
endef
MAYFLY_XEN_DIST_INSTALL_STAGING = YES

# The multiboot2 image GRUB loads (post-image.sh puts it in the EFI partition).
define MAYFLY_XEN_DIST_INSTALL_IMAGES_CMDS
	$(INSTALL) -D -m 0644 $(@D)/xen/xen $(BINARIES_DIR)/xen
	$(INSTALL) -D -m 0644 $(@D)/xen/.config $(BINARIES_DIR)/xen.config
endef

$(eval $(autotools-package))
