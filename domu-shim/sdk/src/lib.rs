//! The handler SDK: what a Mayfly transaction handler sees.
//!
//! A **handler** is a plain function that runs one transaction inside a fresh, single-use
//! domain. It gets a [`Ctx`] and the client's payload, reads and writes data only through
//! the [`Db`] API, and returns a result (committed) or a [`HandlerError`] (aborted):
//!
//! ```
//! use mayfly_sdk::{Ctx, HandlerError, MemDb, Registry};
//!
//! fn greet(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
//!     let name = std::str::from_utf8(payload)
//!         .map_err(|_| HandlerError::bad_request("name is not UTF-8"))?;
//!     let key = format!("greeted/{name}");
//!     let seen = ctx.db().get(key.as_bytes())?.is_some();
//!     ctx.db().put(key.as_bytes(), b"1")?;
//!     Ok(if seen { b"welcome back".to_vec() } else { b"hello".to_vec() })
//! }
//!
//! let mut registry = Registry::new();
//! registry.register("greet", greet).unwrap();
//!
//! // Unit-test it without a ring:
//! let mut db = MemDb::new();
//! let handler = registry.get("greet").unwrap();
//! let mut ctx = mayfly_sdk::Ctx::new(&mut db, [0; 16], [7; 32]);
//! assert_eq!(handler(&mut ctx, b"ann").unwrap(), b"hello");
//! assert_eq!(handler(&mut ctx, b"ann").unwrap(), b"welcome back");
//! ```
//!
//! Modules:
//! - [`db`]: the [`Db`] trait, [`DbError`], [`Scan`], [`LogLevel`];
//! - [`limits`]: the size caps the agent enforces, checked locally too;
//! - [`ctx`]: [`Ctx`], what a handler receives;
//! - [`rng`]: [`HandlerRng`], the deterministic ChaCha20 RNG seeded per transaction;
//! - [`handler`]: [`Handler`] and [`HandlerError`];
//! - [`registry`]: [`Registry`], handler names to functions;
//! - [`memdb`]: [`MemDb`], an in-memory [`Db`] for unit tests.
//!
//! The SDK depends on nothing else of Mayfly: the guest runtime (`domu-shim`) implements
//! [`Db`] over the shared-memory ring, and tests use [`MemDb`]. A handler cannot reach files,
//! sockets or processes: the domain it runs in is confined, and only the [`Db`] API reaches
//! data.

//!
//! # Features
//!
//! `std` (default) only lets the crate link `std`; the SDK itself is `no_std` + `alloc`
//! code, so the same handlers build for the freestanding Mayfly PV guest kernel
//! (`default-features = false`), the Linux PV guest and the sandbox.

#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod ctx;
pub mod db;
pub mod handler;
pub mod limits;
pub mod memdb;
pub mod registry;
pub mod rng;

pub use ctx::Ctx;
pub use db::{Db, DbError, LogLevel, Scan};
pub use handler::{Handler, HandlerError};
pub use memdb::MemDb;
pub use registry::{Registry, RegistryError};
pub use rng::HandlerRng;

/// The RNG traits [`HandlerRng`] implements (so `rand`-based code can use it).
pub use rand_core;
