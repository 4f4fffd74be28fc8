//! `mayfly-br-check`: static checks of Mayfly's BR2_EXTERNAL tree, for CI machines that cannot
//! run a Buildroot build.
//!
//! [`check_tree`] reads the tree (`buildroot/`) and the Mayfly workspace beside it and reports
//! every broken reference it can find without Buildroot:
//!
//! - `external.desc` names the tree; `Config.in` sources only files that exist, and every
//!   package directory is sourced; `external.mk` includes every package's `.mk`.
//! - every package has `Config.in` defining `BR2_PACKAGE_<NAME>` and `<name>.mk` ending in an
//!   `$(eval $(…-package))`; files it names under `$(<NAME>_PKGDIR)` or the tree exist; a
//!   cargo `--package`/`--bin` names a crate and binary of the workspace; a downloaded source
//!   is listed in the package's `.hash` file.
//! - every `BR2_PACKAGE_<TREE>_*` symbol used in a defconfig or a `Config.in` is defined here;
//!   every tree path in a defconfig exists (post scripts also executable); a custom kernel
//!   version has its hash in the global patch directory; the kernel fragment is well formed,
//!   sets nothing twice and has the Xen dom0/domU options; GRUB has `multiboot2` and `tpm`.
//! - board scripts name only board files that exist; `genimage.cfg`'s partitions name images
//!   it defines or the tree builds (the root file system) and its EFI files come from
//!   something the tree builds; `grub.cfg` loads only files on that partition, and each
//!   "(<profile> profile)" entry boots with exactly that server profile's Xen and dom0
//!   command lines (`hw/profiles`), the dom0 line followed by the root file system's
//!   arguments `root=PARTUUID=<uuid> rootfstype=squashfs ro rootwait`, where `<uuid>` is the
//!   `partition-uuid` of a `genimage.cfg` partition holding `rootfs.squashfs`.
//! - `vendor.pin` has its digests; with [`Options::shellcheck`], every shell script passes
//!   `shellcheck`.
//!
//! Paths listed in `pending-paths.txt` (written by another part of the project, not yet
//! merged) are warnings while missing.

#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The tree is broken.
    Error,
    /// Worth knowing; the tree still passes.
    Warning,
}

/// One problem, located in a file of the tree.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// The file (relative to the tree or the workspace) the problem is in.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{kind}: {}: {}", self.file, self.message)
    }
}

/// The check could not run at all.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The tree directory does not exist.
    #[error("{0} is not a directory")]
    NoTree(PathBuf),
    /// Listing a directory of the tree failed.
    #[error("cannot list {path}: {source}")]
    List {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `shellcheck` was asked for and could not be run.
    #[error("cannot run shellcheck (install it: apt-get install shellcheck): {0}")]
    Shellcheck(std::io::Error),
}

/// What to check.
#[derive(Debug, Clone)]
pub struct Options {
    /// The BR2_EXTERNAL tree (`buildroot/`).
    pub tree: PathBuf,
    /// The Mayfly workspace the packages build from (the tree's parent).
    pub workspace: PathBuf,
    /// Also run `shellcheck` on every shell script.
    pub shellcheck: bool,
}

/// Kernel options the appliance cannot boot dom0 or the domU template without.
pub const REQUIRED_KERNEL_OPTIONS: &[&str] = &[
    "CONFIG_XEN",
    "CONFIG_XEN_PV",
    "CONFIG_XEN_DOM0",
    "CONFIG_XEN_DEV_EVTCHN",
    "CONFIG_XEN_GNTDEV",
    "CONFIG_XEN_GRANT_DEV_ALLOC",
    "CONFIG_XEN_PRIVCMD",
    "CONFIG_XENFS",
    "CONFIG_XEN_SYS_HYPERVISOR",
    "CONFIG_HVC_XEN",
    "CONFIG_BLK_DEV_INITRD",
    "CONFIG_DEVTMPFS",
    "CONFIG_TCG_TPM",
];

/// GRUB modules the boot entry needs: Xen's loader, and TPM measurement.
pub const REQUIRED_GRUB_MODULES: &[&str] = &["multiboot2", "tpm"];

/// Defconfig options whose values are paths (or lists of paths).
const PATH_OPTIONS: &[&str] = &[
    "BR2_ROOTFS_OVERLAY",
    "BR2_ROOTFS_POST_BUILD_SCRIPT",
    "BR2_ROOTFS_POST_FAKEROOT_SCRIPT",
    "BR2_ROOTFS_POST_IMAGE_SCRIPT",
    "BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES",
    "BR2_LINUX_KERNEL_CUSTOM_CONFIG_FILE",
    "BR2_GLOBAL_PATCH_DIR",
    "BR2_ROOTFS_USERS_TABLES",
    "BR2_ROOTFS_DEVICE_TABLE",
    "BR2_PACKAGE_BUSYBOX_CONFIG_FRAGMENT_FILES",
];

/// Accumulates findings while walking the tree.
struct Checker<'a> {
    opts: &'a Options,
    name: String,
    findings: Vec<Finding>,
    pending: BTreeSet<String>,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

/// What `genimage.cfg` lays out, for the GRUB check.
struct Layout {
    /// Files on vfat (EFI) partitions.
    esp_files: BTreeSet<String>,
    /// `partition-uuid`s (lower case) of the partitions holding `rootfs.squashfs`.
    root_uuids: BTreeSet<String>,
}

fn unquote(value: &str) -> &str {
    value
        .trim()
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value.trim())
}

/// `NAME = value` (also `:=`, `+=`) assignments of a makefile, joined over continuation lines.
fn make_assignments(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    let mut logical = String::new();
    for line in text.lines() {
        if let Some(head) = line.strip_suffix('\\') {
            logical.push_str(head);
            logical.push(' ');
            continue;
        }
        logical.push_str(line);
        let whole = std::mem::take(&mut logical);
        if whole.starts_with('\t') || whole.trim_start().starts_with('#') {
            continue;
        }
        for op in [" += ", " := ", " = "] {
            if let Some((name, value)) = whole.split_once(op) {
                let name = name.trim();
                if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    let entry = vars.entry(name.to_owned()).or_insert_with(String::new);
                    if op == " += " && !entry.is_empty() {
                        entry.push(' ');
                        entry.push_str(value.trim());
                    } else {
                        *entry = value.trim().to_owned();
                    }
                }
                break;
            }
        }
    }
    vars
}

/// The text after `marker` up to the first character that cannot be part of a path.
fn paths_after<'t>(text: &'t str, marker: &str) -> Vec<&'t str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(marker) {
        let tail = &rest[i + marker.len()..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || "._/-+*".contains(c)))
            .unwrap_or(tail.len());
        if end > 0 {
            out.push(&tail[..end]);
        }
        rest = &tail[end..];
    }
    out
}

/// Symbols named on a Kconfig line.
fn symbols(line: &str) -> Vec<&str> {
    line.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("BR2_"))
        .collect()
}

impl Checker<'_> {
    fn error(&mut self, file: &str, message: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Error,
            file: file.to_owned(),
            message: message.into(),
        });
    }

    fn warning(&mut self, file: &str, message: impl Into<String>) {
        self.findings.push(Finding {
            severity: Severity::Warning,
            file: file.to_owned(),
            message: message.into(),
        });
    }

    fn tree(&self) -> &Path {
        &self.opts.tree
    }

    fn ext_var(&self) -> String {
        format!("BR2_EXTERNAL_{}_PATH", self.name)
    }

    fn our_symbol_prefix(&self) -> String {
        format!("BR2_PACKAGE_{}_", self.name)
    }

    /// The tree-relative path named by `raw` if it starts with the tree variable.
    fn tree_relative(&self, raw: &str) -> Option<String> {
        let var = self.ext_var();
        for form in [
            format!("$({var})/"),
            format!("${{{var}}}/"),
            format!("${var}/"),
        ] {
            if let Some(rest) = raw.strip_prefix(form.as_str()) {
                return Some(rest.trim_end_matches('/').to_owned());
            }
        }
        None
    }

    /// Reports `relative` (to the tree) if it does not exist; returns whether it exists.
    fn require(&mut self, from: &str, relative: &str, what: &str) -> bool {
        if self.tree().join(relative).exists() {
            return true;
        }
        if self.pending.contains(relative) {
            self.warning(
                from,
                format!("{what} {relative} does not exist yet (listed in pending-paths.txt)"),
            );
        } else {
            self.error(from, format!("{what} {relative} does not exist"));
        }
        false
    }

    fn run(&mut self) -> Result<(), CheckError> {
        let Some(desc) = read(&self.tree().join("external.desc")) else {
            self.error("external.desc", "missing: a BR2_EXTERNAL tree must have it");
            return Ok(());
        };
        match desc
            .lines()
            .find_map(|l| l.strip_prefix("name:"))
            .map(str::trim)
        {
            Some(name)
                if !name.is_empty()
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                self.name = name.to_owned();
            }
            other => {
                self.error(
                    "external.desc",
                    format!("needs a 'name:' of [A-Za-z0-9_] characters, found {other:?}"),
                );
                return Ok(());
            }
        }
        if !desc.lines().any(|l| l.starts_with("desc:")) {
            self.warning("external.desc", "no 'desc:' line");
        }
        self.pending = read(&self.tree().join("pending-paths.txt"))
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .filter_map(|l| l.split_whitespace().next())
            .map(|p| p.trim_end_matches('/').to_owned())
            .collect();

        let defined = self.check_config_in();
        let packages = self.list_dirs("package")?;
        self.check_external_mk(&packages);
        for package in &packages {
            self.check_package(package, &defined);
        }
        let defconfigs = self.list_files("configs")?;
        let mut enabled = BTreeSet::new();
        for defconfig in &defconfigs {
            enabled.extend(self.check_defconfig(defconfig, &defined));
        }
        for board in self.list_dirs("board")? {
            self.check_board(&board, &enabled)?;
        }
        self.check_vendor_pin();
        if self.opts.shellcheck {
            self.run_shellcheck()?;
        }
        Ok(())
    }

    fn list(&self, relative: &str, dirs: bool) -> Result<Vec<String>, CheckError> {
        let path = self.tree().join(relative);
        let entries = match std::fs::read_dir(&path) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(CheckError::List { path, source }),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| CheckError::List {
                path: path.clone(),
                source,
            })?;
            if entry.path().is_dir() == dirs {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        Ok(names)
    }

    fn list_dirs(&self, relative: &str) -> Result<Vec<String>, CheckError> {
        self.list(relative, true)
    }

    fn list_files(&self, relative: &str) -> Result<Vec<String>, CheckError> {
        self.list(relative, false)
    }

    /// Walks `Config.in` and what it sources; returns the symbols defined.
    fn check_config_in(&mut self) -> BTreeSet<String> {
        let mut defined = BTreeSet::new();
        let mut used: Vec<(String, String)> = Vec::new();
        let mut sourced = BTreeSet::new();
        let mut queue = vec!["Config.in".to_owned()];
        while let Some(file) = queue.pop() {
            let Some(text) = read(&self.tree().join(&file)) else {
                if file == "Config.in" {
                    self.error("Config.in", "missing: a BR2_EXTERNAL tree must have it");
                }
                continue;
            };
            for line in text.lines().map(str::trim) {
                if let Some(rest) = line.strip_prefix("source ") {
                    let raw = unquote(rest);
                    match self.tree_relative(raw) {
                        Some(rel) => {
                            if self.require(&file, &rel, "sourced file")
                                && sourced.insert(rel.clone())
                            {
                                queue.push(rel);
                            }
                        }
                        None => self.error(
                            &file,
                            format!("sources {raw}, which is not under ${}", self.ext_var()),
                        ),
                    }
                } else if let Some(sym) = line
                    .strip_prefix("config ")
                    .or_else(|| line.strip_prefix("menuconfig "))
                {
                    defined.insert(sym.trim().to_owned());
                } else if line.starts_with("depends on")
                    || line.starts_with("select ")
                    || line.starts_with("if ")
                    || (line.starts_with("default ") && line.contains(" if "))
                {
                    for sym in symbols(line) {
                        used.push((file.clone(), sym.to_owned()));
                    }
                }
            }
        }
        let prefix = self.our_symbol_prefix();
        for (file, sym) in used {
            if sym.starts_with(&prefix) && !defined.contains(&sym) {
                self.error(
                    &file,
                    format!("uses {sym}, which no Config.in of this tree defines"),
                );
            }
        }
        for package in self.list_dirs("package").unwrap_or_default() {
            let rel = format!("package/{package}/Config.in");
            if !sourced.contains(&rel) {
                self.error("Config.in", format!("does not source {rel}"));
            }
        }
        defined
    }

    fn check_external_mk(&mut self, packages: &[String]) {
        let Some(text) = read(&self.tree().join("external.mk")) else {
            self.error("external.mk", "missing: a BR2_EXTERNAL tree must have it");
            return;
        };
        let wildcard = format!("$({})/package/*/*.mk", self.ext_var());
        let includes: Vec<String> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix("include "))
            .map(str::to_owned)
            .collect();
        if includes.iter().any(|i| i.contains(&wildcard)) {
            return;
        }
        for include in &includes {
            if let Some(rel) = self.tree_relative(include.trim()) {
                self.require("external.mk", &rel, "included file");
            }
        }
        for package in packages {
            let mk = format!("package/{package}/{package}.mk");
            if !includes.iter().any(|i| i.ends_with(&mk)) {
                self.error("external.mk", format!("does not include {mk}"));
            }
        }
    }

    fn workspace_crates(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut crates = BTreeMap::new();
        let root = &self.opts.workspace;
        let Some(text) = read(&root.join("Cargo.toml")) else {
            return crates;
        };
        let Ok(manifest) = text.parse::<toml::Table>() else {
            return crates;
        };
        let members = manifest
            .get("workspace")
            .and_then(|w| w.get("members"))
            .and_then(|m| m.as_array())
            .cloned()
            .unwrap_or_default();
        for member in members.iter().filter_map(|m| m.as_str()) {
            let Some(text) = read(&root.join(member).join("Cargo.toml")) else {
                continue;
            };
            let Ok(crate_toml) = text.parse::<toml::Table>() else {
                continue;
            };
            let Some(name) = crate_toml
                .get("package")
                .and_then(|p| p.get("name"))
                .and_then(|n| n.as_str())
            else {
                continue;
            };
            let mut bins: BTreeSet<String> = crate_toml
                .get("bin")
                .and_then(|b| b.as_array())
                .map(|bins| {
                    bins.iter()
                        .filter_map(|b| b.get("name").and_then(|n| n.as_str()))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            if root.join(member).join("src/main.rs").exists() {
                bins.insert(name.to_owned());
            }
            crates.insert(name.to_owned(), bins);
        }
        crates
    }

    fn check_package(&mut self, package: &str, defined: &BTreeSet<String>) {
        let upper: String = package
            .chars()
            .map(|c| {
                if c == '-' {
                    '_'
                } else {
                    c.to_ascii_uppercase()
                }
            })
            .collect();
        let dir = format!("package/{package}");
        let config = format!("{dir}/Config.in");
        let symbol = format!("BR2_PACKAGE_{upper}");
        if self.tree().join(&config).exists() && !defined.contains(&symbol) {
            self.error(&config, format!("does not define {symbol}"));
        }
        let mk = format!("{dir}/{package}.mk");
        let Some(text) = read(&self.tree().join(&mk)) else {
            self.error(&dir, format!("has no {package}.mk"));
            return;
        };
        let vars = make_assignments(&text);
        let prefix = format!("{upper}_");
        if !vars.keys().any(|k| k.starts_with(&prefix)) {
            self.error(&mk, format!("defines no {prefix}* variable"));
        }
        let infra = text
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .and_then(|l| l.trim().strip_prefix("$(eval $("))
            .and_then(|l| l.strip_suffix("))"))
            .map(str::to_owned);
        match infra.as_deref() {
            Some(i) if i.ends_with("-package") => {}
            _ => self.error(&mk, "does not end with $(eval $(<infrastructure>-package))"),
        }
        for rel in paths_after(&text, &format!("$({upper}_PKGDIR)/")) {
            self.require(&mk, &format!("{dir}/{rel}"), "file");
        }
        for rel in paths_after(&text, &format!("$({})/", self.ext_var())) {
            if !rel.contains('*') {
                self.require(&mk, rel, "file");
            }
        }
        if let Some(opts) = vars.get(&format!("{upper}_CARGO_BUILD_OPTS")) {
            self.check_cargo_opts(&mk, opts);
        }
        let local = vars
            .get(&format!("{upper}_SITE_METHOD"))
            .is_some_and(|m| m == "local");
        let source = vars.get(&format!("{upper}_SOURCE"));
        if !local && source.is_some_and(|s| !s.is_empty()) {
            let version = vars
                .get(&format!("{upper}_VERSION"))
                .cloned()
                .unwrap_or_default();
            let source = source
                .map(|s| s.replace(&format!("$({upper}_VERSION)"), &version))
                .unwrap_or_default();
            let hash = format!("{dir}/{package}.hash");
            match read(&self.tree().join(&hash)) {
                None => self.error(&mk, format!("downloads {source} but there is no {hash}")),
                Some(h) => {
                    self.check_hash_file(&hash, &h);
                    if !h
                        .lines()
                        .any(|l| l.split_whitespace().nth(2) == Some(source.as_str()))
                    {
                        self.error(&hash, format!("has no hash for {source}"));
                    }
                }
            }
        }
    }

    fn check_cargo_opts(&mut self, mk: &str, opts: &str) {
        let crates = self.workspace_crates();
        let words: Vec<&str> = opts.split_whitespace().collect();
        let crate_name = words
            .windows(2)
            .find(|w| w.first() == Some(&"--package"))
            .and_then(|w| w.get(1).copied());
        let bin = words
            .windows(2)
            .find(|w| w.first() == Some(&"--bin"))
            .and_then(|w| w.get(1).copied());
        match crate_name {
            None => self.error(mk, "cargo build options name no --package"),
            Some(name) => match crates.get(name) {
                None => self.error(
                    mk,
                    format!("--package {name} is not a crate of the workspace"),
                ),
                Some(bins) => {
                    if let Some(bin) = bin {
                        if !bins.contains(bin) {
                            self.error(mk, format!("--bin {bin} is not a binary of crate {name}"));
                        }
                    }
                }
            },
        }
    }

    fn check_hash_file(&mut self, file: &str, text: &str) {
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let ok = matches!(fields.as_slice(),
                [algo, digest, _name] if *algo == "sha256"
                    && digest.len() == 64
                    && digest.chars().all(|c| c.is_ascii_hexdigit()));
            if !ok {
                self.error(file, format!("malformed hash line {line:?}"));
            }
        }
    }

    /// Checks one defconfig; returns the options it sets to `y`.
    fn check_defconfig(&mut self, name: &str, defined: &BTreeSet<String>) -> BTreeSet<String> {
        let file = format!("configs/{name}");
        let mut enabled = BTreeSet::new();
        let Some(text) = read(&self.tree().join(&file)) else {
            return enabled;
        };
        let mut values = BTreeMap::new();
        let prefix = self.our_symbol_prefix();
        for line in text.lines().map(str::trim) {
            let (sym, value) = if let Some(rest) = line.strip_prefix("# ") {
                match rest.strip_suffix(" is not set") {
                    Some(sym) if sym.starts_with("BR2_") => (sym, None),
                    _ => continue,
                }
            } else if line.is_empty() || line.starts_with('#') {
                continue;
            } else {
                match line.split_once('=') {
                    Some((sym, value)) if sym.starts_with("BR2_") => (sym, Some(value)),
                    _ => {
                        self.error(&file, format!("not an option line: {line:?}"));
                        continue;
                    }
                }
            };
            if sym.starts_with(&prefix) && !defined.contains(sym) {
                self.error(
                    &file,
                    format!("sets {sym}, which no Config.in of this tree defines"),
                );
            }
            if let Some(value) = value {
                if value == "y" {
                    enabled.insert(sym.to_owned());
                }
                values.insert(sym.to_owned(), unquote(value).to_owned());
            }
        }
        for (sym, value) in &values {
            let is_path_option = PATH_OPTIONS.contains(&sym.as_str());
            for word in value.split_whitespace() {
                match self.tree_relative(word) {
                    Some(rel)
                        if self.require(&file, &rel, &format!("{sym} path"))
                            && sym.contains("_SCRIPT")
                            && !is_executable(&self.tree().join(&rel)) =>
                    {
                        self.error(&file, format!("{sym} script {rel} is not executable"));
                    }
                    Some(_) => {}
                    None if is_path_option => self.error(
                        &file,
                        format!("{sym} path {word} is not under $({})", self.ext_var()),
                    ),
                    None => {}
                }
            }
        }
        for fragment in values
            .get("BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES")
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|w| self.tree_relative(w))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
        {
            self.check_kernel_fragment(&fragment);
        }
        if let (Some(version), Some(patch_dir)) = (
            values.get("BR2_LINUX_KERNEL_CUSTOM_VERSION_VALUE"),
            values
                .get("BR2_GLOBAL_PATCH_DIR")
                .and_then(|d| self.tree_relative(d)),
        ) {
            let hash = format!("{patch_dir}/linux/linux.hash");
            let tarball = format!("linux-{version}.tar.xz");
            match read(&self.tree().join(&hash)) {
                Some(text) => {
                    self.check_hash_file(&hash, &text);
                    if !text
                        .lines()
                        .any(|l| l.split_whitespace().nth(2) == Some(tarball.as_str()))
                    {
                        self.error(&hash, format!("has no hash for {tarball}"));
                    }
                }
                None => self.error(&file, format!("kernel {version} has no hash file {hash}")),
            }
        }
        if let Some(modules) = values.get("BR2_TARGET_GRUB2_BUILTIN_MODULES_EFI") {
            let have: Vec<&str> = modules.split_whitespace().collect();
            for module in REQUIRED_GRUB_MODULES {
                if !have.contains(module) {
                    self.error(&file, format!("GRUB's built-in modules lack {module}"));
                }
            }
        }
        enabled
    }

    fn check_kernel_fragment(&mut self, file: &str) {
        let Some(text) = read(&self.tree().join(file)) else {
            return;
        };
        let mut set: BTreeMap<String, String> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            let (option, value) = if let Some(rest) = line.strip_prefix("# ") {
                match rest.strip_suffix(" is not set") {
                    Some(opt) if opt.starts_with("CONFIG_") => (opt.to_owned(), "n".to_owned()),
                    _ => continue,
                }
            } else if line.is_empty() || line.starts_with('#') {
                continue;
            } else {
                match line.split_once('=') {
                    Some((opt, value))
                        if opt.starts_with("CONFIG_")
                            && opt.chars().all(|c| {
                                c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'
                            })
                            && !value.is_empty() =>
                    {
                        (opt.to_owned(), value.to_owned())
                    }
                    _ => {
                        self.error(file, format!("not a kernel option line: {line:?}"));
                        continue;
                    }
                }
            };
            if set.insert(option.clone(), value).is_some() {
                self.error(file, format!("{option} is set more than once"));
            }
        }
        for option in REQUIRED_KERNEL_OPTIONS {
            if set.get(*option).map(String::as_str) != Some("y") {
                self.error(
                    file,
                    format!("{option}=y is required (Xen dom0 and the domU template)"),
                );
            }
        }
    }

    fn check_board(&mut self, board: &str, enabled: &BTreeSet<String>) -> Result<(), CheckError> {
        let dir = format!("board/{board}");
        let files = self.list_files(&dir)?;
        let mut produced: BTreeSet<String> = BTreeSet::new();
        for script in files.iter().filter(|f| f.ends_with(".sh")) {
            let file = format!("{dir}/{script}");
            let text = read(&self.tree().join(&file)).unwrap_or_default();
            for rel in paths_after(&text, "$BOARD_DIR/") {
                self.require(&file, &format!("{dir}/{rel}"), "board file");
            }
            produced.extend(
                paths_after(&text, "$BINARIES_DIR/")
                    .into_iter()
                    .map(str::to_owned),
            );
        }
        for package in self.list_dirs("package")? {
            let text = read(&self.tree().join(format!("package/{package}/{package}.mk")))
                .unwrap_or_default();
            produced.extend(
                paths_after(&text, "$(BINARIES_DIR)/")
                    .into_iter()
                    .map(str::to_owned),
            );
        }
        if enabled.contains("BR2_TARGET_ROOTFS_CPIO_GZIP") {
            produced.insert("rootfs.cpio.gz".to_owned());
        }
        if enabled.contains("BR2_TARGET_ROOTFS_SQUASHFS") {
            produced.insert("rootfs.squashfs".to_owned());
        }
        if enabled.contains("BR2_TARGET_GRUB2_X86_64_EFI") {
            produced.insert("efi-part/EFI".to_owned());
        }
        let genimage = format!("{dir}/genimage.cfg");
        let layout = match read(&self.tree().join(&genimage)) {
            Some(text) => self.check_genimage(&genimage, &text, &produced),
            None => return Ok(()),
        };
        let grub = format!("{dir}/grub.cfg");
        if let Some(text) = read(&self.tree().join(&grub)) {
            self.check_grub(&grub, &text, &layout);
        }
        Ok(())
    }

    /// Returns the files placed on vfat partitions and the root file system partitions.
    fn check_genimage(&mut self, file: &str, text: &str, produced: &BTreeSet<String>) -> Layout {
        let mut images = BTreeSet::new();
        let mut partition_refs = Vec::new();
        let mut root_uuids = BTreeSet::new();
        // The current partition's image and partition-uuid.
        let mut partition: (Option<String>, Option<String>) = (None, None);
        let mut vfat_files = BTreeSet::new();
        let mut vfat_sources = Vec::new();
        // (block kind, block name) stack.
        let mut stack: Vec<(String, String)> = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            if let Some(head) = line.strip_suffix('{') {
                let mut words = head.split_whitespace();
                let kind = words.next().unwrap_or_default().to_owned();
                let name = words.next().unwrap_or_default().to_owned();
                if stack.is_empty() && kind == "image" {
                    images.insert(name.clone());
                }
                if kind == "file" {
                    vfat_files.insert(name.clone());
                }
                stack.push((kind, name));
            } else if line == "}" {
                if let Some((kind, _)) = stack.pop() {
                    if kind == "partition" {
                        if let (Some(image), Some(uuid)) = std::mem::take(&mut partition) {
                            if image == "rootfs.squashfs" {
                                root_uuids.insert(uuid.to_ascii_lowercase());
                            }
                        }
                    }
                }
            } else if let Some(value) = line.strip_prefix("image = ") {
                let value = unquote(value).to_owned();
                match stack.last().map(|(kind, _)| kind.as_str()) {
                    Some("partition") => {
                        partition.0 = Some(value.clone());
                        partition_refs.push(value);
                    }
                    Some("file") => vfat_sources.push(value),
                    _ => {}
                }
            } else if let Some(value) = line.strip_prefix("partition-uuid = ") {
                if stack.last().map(|(kind, _)| kind.as_str()) == Some("partition") {
                    partition.1 = Some(unquote(value).to_owned());
                }
            }
        }
        if !stack.is_empty() {
            self.error(file, "unbalanced braces");
        }
        for image in partition_refs {
            if !images.contains(&image) && !produced.contains(&image) {
                self.error(
                    file,
                    format!(
                        "a partition uses image {image:?}, which this file does not define and \
                         nothing in the tree produces"
                    ),
                );
            }
        }
        for source in vfat_sources {
            if !produced.contains(&source) {
                self.error(
                    file,
                    format!(
                        "puts {source:?} on the EFI partition, but nothing in the tree produces it \
                         in $BINARIES_DIR"
                    ),
                );
            }
        }
        Layout {
            esp_files: vfat_files,
            root_uuids,
        }
    }

    fn check_grub(&mut self, file: &str, text: &str, layout: &Layout) {
        let esp_files = &layout.esp_files;
        let mut entry: Option<String> = None;
        let mut lines_of: BTreeMap<String, Vec<(String, Vec<String>)>> = BTreeMap::new();
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("menuentry ") {
                // The title is the first (quoted) word; options such as --unrestricted follow.
                let rest = rest.trim_end_matches('{').trim();
                let title = match rest.strip_prefix('"').and_then(|r| r.split_once('"')) {
                    Some((title, _)) => title,
                    None => rest.split_whitespace().next().unwrap_or_default(),
                };
                entry = Some(title.to_owned());
                continue;
            }
            let mut words = line.split_whitespace();
            let command = words.next().unwrap_or_default();
            if !matches!(command, "multiboot2" | "module2" | "linux" | "initrd") {
                continue;
            }
            let Some(path) = words.next() else {
                self.error(file, format!("{command} without a file"));
                continue;
            };
            let name = path.trim_start_matches('/');
            if !esp_files.contains(name) {
                self.error(file, format!("{command} loads {path}, which genimage.cfg does not put on the EFI partition"));
            }
            if let Some(e) = &entry {
                lines_of
                    .entry(e.clone())
                    .or_default()
                    .push((command.to_owned(), words.map(str::to_owned).collect()));
            }
        }
        for (title, lines) in lines_of {
            let Some(profile_name) = title
                .split_once('(')
                .and_then(|(_, r)| r.strip_suffix(" profile)"))
            else {
                continue;
            };
            let profile = match mayfly_hw::profile::shipped_profile(profile_name) {
                Ok(p) => p,
                Err(e) => {
                    self.error(file, format!("entry {title:?}: {e}"));
                    continue;
                }
            };
            let xen = lines.iter().find(|(c, _)| c == "multiboot2");
            let dom0 = lines.iter().find(|(c, _)| c == "module2");
            for (what, line, wanted) in [
                ("Xen", xen, &profile.xen.cmdline),
                ("dom0", dom0, &profile.dom0.cmdline),
            ] {
                let Some((command, args)) = line else {
                    self.error(file, format!("entry {title:?} has no {what} line"));
                    continue;
                };
                let mut args = args.clone();
                if what == "dom0" {
                    self.check_root_args(file, &title, &mut args, layout);
                }
                let have = args.join(" ");
                let want = wanted.split_whitespace().collect::<Vec<_>>().join(" ");
                if have != want {
                    self.error(
                        file,
                        format!(
                            "entry {title:?}: {what} command line {have:?} ({command}) differs \
                             from profile {profile_name}'s {want:?} (hw/profiles/{profile_name}.toml)"
                        ),
                    );
                }
            }
        }
    }

    /// Checks and removes the root file system's arguments at the end of a dom0 command line:
    /// `root=PARTUUID=<uuid> rootfstype=squashfs ro rootwait`, `<uuid>` a root partition's.
    fn check_root_args(
        &mut self,
        file: &str,
        title: &str,
        args: &mut Vec<String>,
        layout: &Layout,
    ) {
        const TAIL: [&str; 3] = ["rootfstype=squashfs", "ro", "rootwait"];
        let n = args.len();
        let root = n
            .checked_sub(TAIL.len() + 1)
            .and_then(|i| args.get(i))
            .and_then(|a| a.strip_prefix("root=PARTUUID="))
            .map(str::to_ascii_lowercase);
        let tail_ok = args
            .get(n.saturating_sub(TAIL.len())..)
            .is_some_and(|t| t.iter().map(String::as_str).eq(TAIL));
        match root {
            Some(uuid) if tail_ok => {
                if !layout.root_uuids.contains(&uuid) {
                    self.error(
                        file,
                        format!(
                            "entry {title:?}: root=PARTUUID={uuid} is no partition-uuid of a \
                             genimage.cfg partition holding rootfs.squashfs"
                        ),
                    );
                }
                args.truncate(n - TAIL.len() - 1);
            }
            _ => self.error(
                file,
                format!(
                    "entry {title:?}: the dom0 command line does not end with \
                     \"root=PARTUUID=<uuid> rootfstype=squashfs ro rootwait\""
                ),
            ),
        }
    }

    fn check_vendor_pin(&mut self) {
        let Some(text) = read(&self.tree().join("vendor.pin")) else {
            self.error(
                "vendor.pin",
                "missing: run scripts/vendor-crates.sh vendor DIR and pin DIR",
            );
            return;
        };
        for key in ["cargo-lock-sha256", "vendor-tree-sha256"] {
            let ok = text.lines().any(|l| {
                let mut w = l.split_whitespace();
                w.next() == Some(key)
                    && w.next()
                        .is_some_and(|d| d.len() == 64 && d.chars().all(|c| c.is_ascii_hexdigit()))
            });
            if !ok {
                self.error("vendor.pin", format!("no valid {key} line"));
            }
        }
    }

    fn shell_scripts(&self, relative: &Path, out: &mut Vec<PathBuf>) -> Result<(), CheckError> {
        let path = self.tree().join(relative);
        let entries = std::fs::read_dir(&path).map_err(|source| CheckError::List {
            path: path.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| CheckError::List {
                path: path.clone(),
                source,
            })?;
            let rel = relative.join(entry.file_name());
            if entry.path().is_dir() {
                // The checker's own crate and build output hold no shell scripts of the image.
                if rel != Path::new("check") && rel != Path::new("output") {
                    self.shell_scripts(&rel, out)?;
                }
                continue;
            }
            let is_script = rel.extension().is_some_and(|e| e == "sh")
                || read(&entry.path()).is_some_and(|t| {
                    let first = t.lines().next().unwrap_or_default();
                    first.starts_with("#!") && (first.ends_with("/sh") || first.ends_with("bash"))
                });
            if is_script {
                out.push(rel);
            }
        }
        Ok(())
    }

    fn run_shellcheck(&mut self) -> Result<(), CheckError> {
        let mut scripts = Vec::new();
        self.shell_scripts(Path::new(""), &mut scripts)?;
        scripts.sort();
        for script in scripts {
            let output = Command::new("shellcheck")
                .arg("--external-sources")
                .arg(&script)
                .current_dir(self.tree())
                .output()
                .map_err(CheckError::Shellcheck)?;
            if !output.status.success() {
                let report = String::from_utf8_lossy(&output.stdout);
                let first = report
                    .lines()
                    .find(|l| l.contains("SC"))
                    .unwrap_or("see shellcheck's output")
                    .trim()
                    .to_owned();
                self.error(
                    &script.to_string_lossy(),
                    format!("shellcheck fails: {first}"),
                );
            }
        }
        Ok(())
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
}

/// Checks the tree; the findings are sorted, errors first.
pub fn check_tree(opts: &Options) -> Result<Vec<Finding>, CheckError> {
    if !opts.tree.is_dir() {
        return Err(CheckError::NoTree(opts.tree.clone()));
    }
    let mut checker = Checker {
        opts,
        name: String::new(),
        findings: Vec::new(),
        pending: BTreeSet::new(),
    };
    checker.run()?;
    let mut findings = checker.findings;
    findings.sort();
    findings.dedup();
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn make_assignments_join_continuations_and_appends() {
        let vars = make_assignments("A = 1\nB = x \\\n\ty\nA += 2\n\tC = not\n# D = no\n");
        assert_eq!(vars.get("A").map(String::as_str), Some("1 2"));
        assert_eq!(vars.get("B").map(String::as_str), Some("x  \ty"));
        assert!(!vars.contains_key("C") && !vars.contains_key("D"));
    }

    #[test]
    fn paths_after_stops_at_non_path_characters() {
        assert_eq!(
            paths_after(
                "cp \"$BOARD_DIR/grub.cfg\" x; $BOARD_DIR/a/b.sh)",
                "$BOARD_DIR/"
            ),
            vec!["grub.cfg", "a/b.sh"]
        );
    }
}
