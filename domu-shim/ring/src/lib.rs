//! Mayfly's shared-memory request ring and canonical wire messages.
//!
//! Used by both sides of a transaction: the dom0 agent (the **backend**, trusted) and the
//! guest runtime `domu-shim` (the **frontend**, hostile). The guest sends requests
//! ([`wire::Request`]); the agent answers each with one response ([`wire::Response`]); the
//! transaction itself is the answer to the guest's first request, `Ready`.
//!
//! ```text
//!   agent (backend)                                   guest (frontend)
//!   Backend::recv_request  <── req_prod ── slots ──  Frontend::send_request
//!   Backend::send_response ── rsp_prod ── slots ──>  Frontend::recv_response
//!            \____________ Notifier (eventfds / Xen event channel) ___________/
//! ```
//!
//! The shared pages (default [`Geometry::DEFAULT`]: 69 pages of 4 KiB, 282,624 bytes):
//!
//! ```text
//!  0x00000 +------------------------------------------------------------+
//!          | header: magic "MFRG", version, slot_count, window_size,    |
//!          |         data_offset, total_len                     (agent) |
//!  0x00040 | req_prod, rsp_event                               (guest)  |
//!  0x00080 | rsp_prod, req_event                               (agent)  |
//!  0x00100 | slot descriptors: slot_count x {seq u32, len u32}          |
//!  0x01000 +------------------------------------------------------------+
//!          | window of slot 0 (17 pages): one message, request or reply |
//!  0x12000 +------------------------------------------------------------+
//!          | window of slot 1                                           |
//!  0x23000 +------------------------------------------------------------+
//!          | window of slot 2                                           |
//!  0x34000 +------------------------------------------------------------+
//!          | window of slot 3                                           |
//!  0x45000 +------------------------------------------------------------+
//! ```
//!
//! Modules, bottom up:
//! - [`mem`]: the [`SharedMem`] trait (bounds-checked atomic and volatile access, never a
//!   Rust reference into shared memory) and its `mmap`/memfd and mock implementations;
//! - [`layout`]: [`Geometry`] and the byte layout of the header, descriptors and windows;
//! - [`wire`]: the canonical, big-endian message encoding with a cap on every field;
//! - [`ring`]: [`Frontend`] and [`Backend`], Xen `ring.h`-style producer/consumer logic
//!   with the same barriers, overflow checks and notification suppression;
//! - [`notify`]: the [`Notifier`] trait and its eventfd implementation;
//! - [`xen`] (Linux): the Xen transport — grant mappings through `/dev/xen/gntdev` and
//!   `/dev/xen/gntalloc`, event channels through `/dev/xen/evtchn`.
//!
//! - [`bootinfo`]: the boot-info block that tells a Mayfly PV guest where its ring is
//!   (no xenstore);
//! - [`time`]: the monotonic clock of the timeouts (`std`'s, or one the embedder registers).
//!
//! The full specification, with test vectors, is section 2 of `docs/formats.md`.
//!
//! # Features
//!
//! `std` (default): the operating-system parts — [`MmapMem`], [`EventFdNotifier`], the
//! Linux Xen devices of [`xen`] — and `std`'s clock. Without it the crate is `#![no_std]`
//! with `alloc`: the layout, the wire format, both ring ends, [`MockMem`] and the
//! [`Notifier`] trait, exactly the same code, for the freestanding Mayfly PV guest kernel
//! (`domu-shim/pv-guest`), which brings its own [`SharedMem`] (its mapped grants), its own
//! [`Notifier`] (its event channel) and its own clock ([`time::set_clock`]).

#![cfg_attr(not(feature = "std"), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

extern crate alloc;

pub mod bootinfo;
pub mod layout;
pub mod mem;
pub mod notify;
pub mod ring;
pub mod time;
pub mod wire;
#[cfg(all(feature = "std", target_os = "linux"))]
pub mod xen;

pub use layout::Geometry;
#[cfg(feature = "std")]
pub use mem::MmapMem;
pub use mem::{MockMem, SharedMem};
#[cfg(feature = "std")]
pub use notify::EventFdNotifier;
pub use notify::{Notifier, Wake};
pub use ring::{Backend, Frontend, RingError};
pub use wire::{Envelope, Request, Response};
