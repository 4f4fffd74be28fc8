//! The template side of the sandbox backend: what the zygote executable (`mayfly-zygote`, or
//! the sandbox's test zygote) runs. [`zygote_main_with`] configures and confines the zygote,
//! announces its handlers, and forks one clone per request, confining each before it runs
//! the guest runtime (module `child`: a clone from `fork` to the guest's code); [`seccomp`]
//! is the allowlist every clone inherits; `hugecode` moves the zygote's read-only image onto
//! huge pages; `private` is the zygote's memory no clone inherits. It speaks the control protocol of `mayfly-sandbox-proto` and holds nothing of
//! the agent's side (`mayfly-sandbox`), so the template executable links none of it.
//!
//! `unsafe` is allowed here narrowly (`fork`, claiming the inherited control fd, fd
//! arrangement in the clone, `wait4`, the image move, the private mapping), each block with
//! its `SAFETY` argument.

mod child;
pub mod hugecode;
mod private;
pub mod seccomp;
mod sys;
pub mod zygote;

pub use mayfly_sandbox_proto::{ProtoError, Stage, CONTROL_FD_ENV};
pub use zygote::{control_fd_from_env, zygote_main, zygote_main_with, ChildRing, ZygoteError};
