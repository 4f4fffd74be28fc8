//! Mayfly's sandbox domain backend: the embedded default where there is no Xen.
//!
//! **This is process isolation, not hardware virtualization.** A "domain" here is a Linux
//! process forked from a paused, fully initialised zygote (a copy-on-write clone of a
//! template), confined by namespaces, an empty chroot, an unprivileged uid, resource limits
//! and a seccomp allowlist. It shares the host kernel: a kernel vulnerability reachable
//! through the few allowed system calls is an escape. The Xen backend is the product; this
//! backend runs the same ring protocol, shim, handlers, ledger and policy code.
//!
//! ```text
//!  agent (multi-threaded)                          zygote (single-threaded, exec'd)
//!  Sandbox::start ── socketpair, fork+exec ───────▶ new net/mnt/ipc/uts namespaces,
//!     │               (pre_exec: PDEATHSIG,         own process group, empty chroot,
//!     │                unshare)                     seccomp filter (once, inherited),
//!     │                                             blocks on the control socket
//!     │  refill thread (never waits for a clone):          │
//!     │  memfd ring + eventfds ── Clone (SCM_RIGHTS) ─────▶ fork ──▶ clone: fds 3-5,
//!     │  supervisor thread:                                │          rlimits, own uid,
//!     │  ◀────────────── Spawned + pidfd (SCM_RIGHTS) ─────┘          child(ring) ═╗
//!     │     └─▶ pool (forked clones)                                   Ready ══════╣
//!     │  take(): reads the clone's Ready (normally there already) ◀════════════════╝
//!     │     └─▶ SandboxDomain ══ Start / requests / Commit ══▶
//!     │  destroy(): pidfd_send_signal(SIGKILL), wait pidfd + report, or
//!     │  destroy_in_background(): SIGKILL, and a callback when the report comes
//!     │  supervisor thread ◀── Exited / Killed / Stopped (code, signal, CPU) ── zygote
//! ```
//!
//! No thread waits on one clone's way in or out: the refill thread sends a request and goes
//! on, the supervisor (which reads the zygote's messages anyway) pools the forked clone and
//! completes background destroys; on this kind of machine a cross-thread wake-up costs about
//! as much CPU as a ring round trip (`cargo bench -p mayfly-sandbox --bench primitives`).
//!
//! The sandbox is three crates over one protocol: this one, the **agent side**; the
//! **template side**, `mayfly-sandbox-zygote` (the zygote loop, each clone's confinement,
//! the seccomp allowlist), which the template executable `mayfly-zygote` links without any
//! of this crate; and `mayfly-sandbox-proto`, the control protocol and the system calls both
//! use, which depends on neither.
//!
//! The pieces of this crate, by module:
//! - [`config`]: [`SandboxConfig`] and [`Limits`], with their defaults;
//! - [`backend`]: [`Sandbox`] (the [`mayfly_domain::DomainBackend`]) and [`SandboxDomain`];
//! - [`cgroup`]: the control group of the zygote and all its clones (CPU weight and quota
//!   below the agent's, memory and pids limits; cgroup v2 or v1), entered by the zygote
//!   before it forks, so clones cost no cgroup work;
//! - [`reconcile`]: removal of a previous run's leftovers at start-up;
//! - [`uids`]: the claim on the clones' uid range;
//! - `spawn`, `clone`, `sys`: spawning the zygote, one clone seen from the agent, the
//!   agent's own system calls.
//!
//! `unsafe` is allowed in this crate only narrowly (the `pre_exec` hook that spawns the
//! zygote, `malloc_trim`), each block with its `SAFETY` argument. See `README.md` for what
//! is isolated by what and how it maps to the Xen backend.

pub mod backend;
pub mod cgroup;
mod clone;
pub mod config;
pub mod reconcile;
pub mod spawn;
mod sys;
pub mod uids;

pub use backend::{CreateError, Sandbox, SandboxDomain, SandboxError, BACKEND};
pub use clone::CloneError;
pub use config::{ConfigError, Limits, SandboxConfig};
pub use mayfly_sandbox_proto::{ProtoError, Stage};
pub use reconcile::{ReconcileError, ReconcileReport};
pub use spawn::SpawnError;
pub use sys::release_free_heap;
