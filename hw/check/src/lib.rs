//! `mayfly-hw`: Mayfly's supported server profiles and the checks of a host against them.
//!
//! - [`profile`]: the profiles shipped in `hw/profiles/*.toml` (schema in `hw/README.md`).
//! - [`host`]: the facts of a host read from `/proc`, `/sys` and `/dev` under an injectable
//!   root, so tests run against fixture trees.
//! - [`xen`]: Xen's physical view for a checker in dom0 ([`xen::XenPhysInfoSource`]): `xl info`
//!   today, `xc_physinfo` directly once the libxenctrl bindings are wired in.
//! - [`check`]: one result per requirement with status and reason, and the verdict.
//! - [`keysource`]: which key source a data directory uses (file or TPM-sealed).
//!
//! ```no_run
//! use mayfly_hw::{check, host, profile};
//! let profile = profile::shipped_profile("production")?;
//! let facts = host::HostFacts::gather(&host::HostFs::new("/"))?;
//! let report = check::evaluate(&profile, &facts, None);
//! println!("passed: {}", report.passed);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![forbid(unsafe_code)]

pub mod check;
pub mod host;
pub mod keysource;
pub mod profile;
pub mod xen;
