//! The tree check against the real tree (it must pass) and against deliberately broken copies
//! of it (each must fail, naming the break).

use std::fs;
use std::path::{Path, PathBuf};

use mayfly_br_check::{check_tree, Finding, Options, Severity};

fn real_tree() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn workspace() -> PathBuf {
    real_tree().join("..").canonicalize().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name();
        // The checker's own crate is no part of the Buildroot tree.
        if name == "check" && from == real_tree() {
            continue;
        }
        let target = to.join(&name);
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).unwrap();
        }
    }
}

fn check(tree: &Path, shellcheck: bool) -> Vec<Finding> {
    check_tree(&Options {
        tree: tree.to_path_buf(),
        workspace: workspace(),
        shellcheck,
    })
    .unwrap()
}

fn errors(findings: &[Finding]) -> Vec<String> {
    findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

/// Copies the tree, applies `breakage`, and asserts an error containing `expected`.
fn broken(breakage: impl FnOnce(&Path), expected: &str) {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("buildroot");
    copy_dir(&real_tree(), &tree);
    assert!(
        errors(&check(&tree, false)).is_empty(),
        "the unbroken copy must pass"
    );
    breakage(&tree);
    let errs = errors(&check(&tree, false));
    assert!(
        errs.iter().any(|e| e.contains(expected)),
        "expected an error containing {expected:?}, got {errs:#?}"
    );
}

fn edit(path: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", path.display());
    fs::write(path, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn the_real_tree_passes_including_shellcheck() {
    let findings = check(&real_tree(), true);
    assert!(errors(&findings).is_empty(), "{findings:#?}");
    // Only paths another part of the project writes may be missing, and only as warnings.
    for warning in findings.iter().filter(|f| f.severity == Severity::Warning) {
        assert!(warning.message.contains("pending-paths.txt"), "{warning}");
    }
}

#[test]
fn a_missing_package_is_caught_where_it_is_sourced_and_enabled() {
    broken(
        |t| fs::remove_dir_all(t.join("package/mayfly-cli")).unwrap(),
        "error: Config.in: sourced file package/mayfly-cli/Config.in does not exist",
    );
    broken(
        |t| fs::remove_dir_all(t.join("package/mayfly-cli")).unwrap(),
        "sets BR2_PACKAGE_MAYFLY_CLI, which no Config.in of this tree defines",
    );
}

#[test]
fn a_misspelt_package_in_the_defconfig_is_caught() {
    broken(
        |t| {
            edit(
                &t.join("configs/mayfly_x86_64_defconfig"),
                "BR2_PACKAGE_MAYFLY_DOM0_AGENT=y",
                "BR2_PACKAGE_MAYFLY_DOM0_AGNET=y",
            )
        },
        "sets BR2_PACKAGE_MAYFLY_DOM0_AGNET",
    );
}

#[test]
fn an_unsourced_package_and_a_bad_select_are_caught() {
    broken(
        |t| {
            edit(
                &t.join("Config.in"),
                "source \"$BR2_EXTERNAL_MAYFLY_PATH/package/mayfly-vendor/Config.in\"\n",
                "",
            )
        },
        "does not source package/mayfly-vendor/Config.in",
    );
    broken(
        |t| {
            edit(
                &t.join("package/mayfly-cli/Config.in"),
                "select BR2_PACKAGE_MAYFLY_VENDOR",
                "select BR2_PACKAGE_MAYFLY_VENDORED",
            )
        },
        "uses BR2_PACKAGE_MAYFLY_VENDORED",
    );
}

#[test]
fn missing_board_files_are_caught() {
    broken(
        |t| fs::remove_file(t.join("board/mayfly/linux-xen.fragment")).unwrap(),
        "BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES path board/mayfly/linux-xen.fragment does not exist",
    );
    broken(
        |t| fs::remove_file(t.join("board/mayfly/post-image.sh")).unwrap(),
        "BR2_ROOTFS_POST_IMAGE_SCRIPT path board/mayfly/post-image.sh does not exist",
    );
    broken(
        |t| fs::remove_file(t.join("board/mayfly/grub.cfg")).unwrap(),
        "error: board/mayfly/post-image.sh: board file board/mayfly/grub.cfg does not exist",
    );
    broken(
        |t| fs::remove_file(t.join("board/mayfly/genimage.cfg")).unwrap(),
        "board file board/mayfly/genimage.cfg does not exist",
    );
    broken(
        |t| fs::remove_file(t.join("package/mayfly-domu-template/initramfs.list")).unwrap(),
        "file package/mayfly-domu-template/initramfs.list does not exist",
    );
}

#[test]
fn a_post_script_that_is_not_executable_is_caught() {
    use std::os::unix::fs::PermissionsExt;
    broken(
        |t| {
            let script = t.join("board/mayfly/post-build.sh");
            fs::set_permissions(&script, fs::Permissions::from_mode(0o644)).unwrap();
        },
        "script board/mayfly/post-build.sh is not executable",
    );
}

#[test]
fn a_missing_overlay_is_an_error_unless_listed_as_pending() {
    let overlay = "board/mayfly/rootfs-overlay";
    broken(
        |t| fs::remove_dir_all(t.join(overlay)).unwrap(),
        "BR2_ROOTFS_OVERLAY path board/mayfly/rootfs-overlay does not exist",
    );
    // Listed in pending-paths.txt (written by another part of the project), the same gap
    // is only a warning.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("buildroot");
    copy_dir(&real_tree(), &tree);
    fs::remove_dir_all(tree.join(overlay)).unwrap();
    fs::write(
        tree.join("pending-paths.txt"),
        format!("{overlay}  dom0 overlay, written elsewhere\n"),
    )
    .unwrap();
    let findings = check(&tree, false);
    assert!(errors(&findings).is_empty(), "{:#?}", errors(&findings));
    assert!(
        findings
            .iter()
            .any(|f| f.severity == Severity::Warning && f.to_string().contains(overlay)),
        "{findings:#?}"
    );
}

#[test]
fn kernel_fragment_breakage_is_caught() {
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/linux-xen.fragment"),
                "CONFIG_XEN_GNTDEV=y\n",
                "",
            )
        },
        "CONFIG_XEN_GNTDEV=y is required",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/linux-xen.fragment"),
                "CONFIG_XENFS=y\n",
                "CONFIG_XENFS=y\nCONFIG_XENFS=m\n",
            )
        },
        "CONFIG_XENFS is set more than once",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/linux-xen.fragment"),
                "CONFIG_XENFS=y",
                "CONFIG_XENFS y",
            )
        },
        "not a kernel option line",
    );
}

#[test]
fn boot_layout_breakage_is_caught() {
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/genimage.cfg"),
                "file xen-a {",
                "file xen-a.gz {",
            )
        },
        "multiboot2 loads /xen-a, which genimage.cfg does not put on the EFI partition",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/genimage.cfg"),
                "image = \"data.ext4\"",
                "image = \"data.img\"",
            )
        },
        "a partition uses image \"data.img\"",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/genimage.cfg"),
                "image = \"vmlinux.stripped\"",
                "image = \"bzImage\"",
            )
        },
        "puts \"bzImage\" on the EFI partition, but nothing in the tree produces it",
    );
    broken(
        |t| edit(&t.join("configs/mayfly_x86_64_defconfig"), " tpm\"", "\""),
        "GRUB's built-in modules lack tpm",
    );
}

#[test]
fn grub_entries_must_match_their_server_profile() {
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/grub.cfg"),
                "iommu=required smt=0",
                "smt=0",
            )
        },
        "Xen command line",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/grub.cfg"),
                "earlyprintk=xen panic=10",
                "earlyprintk=xen",
            )
        },
        "differs from profile production's",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/grub.cfg"),
                "(general profile)",
                "(lab profile)",
            )
        },
        "unknown profile \"lab\"",
    );
    // dom0's root: the partition grub.cfg names must be the one genimage.cfg fills with the
    // root file system, and the root arguments must be there.
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/genimage.cfg"),
                "partition-uuid = \"6d61796c-7966-4c79-8000-726f6f742d61\"",
                "partition-uuid = \"6d61796c-7966-4c79-8000-726f6f742d63\"",
            )
        },
        "root=PARTUUID=6d61796c-7966-4c79-8000-726f6f742d61 is no partition-uuid of a genimage.cfg partition holding rootfs.squashfs",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/grub.cfg"),
                "earlyprintk=xen panic=10 root=PARTUUID=6d61796c-7966-4c79-8000-726f6f742d61 rootfstype=squashfs ro rootwait",
                "earlyprintk=xen panic=10 root=PARTUUID=6d61796c-7966-4c79-8000-726f6f742d61 rootfstype=squashfs rootwait",
            )
        },
        "the dom0 command line does not end with",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/genimage.cfg"),
                "image = \"rootfs.squashfs\"",
                "image = \"rootfs.ext4\"",
            )
        },
        "a partition uses image \"rootfs.ext4\", which this file does not define and nothing in the tree produces",
    );
    // A stray word in front (Debian's old "placeholder" habit) is a difference too.
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/grub.cfg"),
                "module2 /vmlinux-a console=hvc0 earlyprintk=xen panic=10",
                "module2 /vmlinux-a placeholder console=hvc0 earlyprintk=xen panic=10",
            )
        },
        "dom0 command line \"placeholder console=hvc0 earlyprintk=xen panic=10\" (module2) differs",
    );
}

#[test]
fn package_breakage_is_caught() {
    broken(
        |t| {
            edit(
                &t.join("package/mayfly-cli/mayfly-cli.mk"),
                "--package mayfly ",
                "--package mayfly-no-such-crate ",
            )
        },
        "--package mayfly-no-such-crate is not a crate of the workspace",
    );
    broken(
        |t| {
            edit(
                &t.join("package/mayfly-dom0-agent/mayfly-dom0-agent.mk"),
                "--bin dom0-agent",
                "--bin agent",
            )
        },
        "--bin agent is not a binary of crate dom0-agent",
    );
    broken(
        |t| {
            edit(
                &t.join("package/mayfly-xen-dist/mayfly-xen-dist.mk"),
                "4.17.7+13-g2445b30a44\n",
                "4.17.8\n",
            )
        },
        "has no hash for xen_4.17.8.orig.tar.xz",
    );
    broken(
        |t| fs::remove_file(t.join("package/mayfly-xen-dist/mayfly-xen-dist.hash")).unwrap(),
        "but there is no package/mayfly-xen-dist/mayfly-xen-dist.hash",
    );
    broken(
        |t| {
            edit(
                &t.join("package/mayfly-vendor/mayfly-vendor.mk"),
                "$(eval $(generic-package))",
                "",
            )
        },
        "does not end with $(eval $(<infrastructure>-package))",
    );
    broken(
        |t| edit(&t.join("external.mk"), "include $(sort", "# include $(sort"),
        "does not include package/mayfly-cli/mayfly-cli.mk",
    );
    broken(
        |t| {
            edit(
                &t.join("board/mayfly/patches/linux/linux.hash"),
                "linux-6.12.92",
                "linux-6.12.91",
            )
        },
        "has no hash for linux-6.12.92.tar.xz",
    );
}

#[test]
fn a_script_shellcheck_rejects_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("buildroot");
    copy_dir(&real_tree(), &tree);
    assert!(errors(&check(&tree, true)).is_empty());
    // Unquoted expansion of a path: SC2086.
    edit(
        &tree.join("board/mayfly/post-build.sh"),
        "mkdir -p \"$TARGET_DIR/var/lib/mayfly\"",
        "mkdir -p $TARGET_DIR/var/lib/mayfly",
    );
    let errs = errors(&check(&tree, true));
    assert!(
        errs.iter().any(
            |e| e.contains("board/mayfly/post-build.sh: shellcheck fails") && e.contains("SC2086")
        ),
        "{errs:#?}"
    );
}
