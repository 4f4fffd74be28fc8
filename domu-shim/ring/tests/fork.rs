//! The sandbox shape: the agent creates the memfd ring and the eventfds, forks, and the child
//! (the "guest") maps the inherited memfd and talks to the agent across processes.

// Test data is built with deliberate truncating casts.
#![allow(clippy::cast_possible_truncation)]
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use mayfly_ring::{
    Backend, EventFdNotifier, Frontend, Geometry, MmapMem, Request, Response, RingError,
};

const TIMEOUT: Duration = Duration::from_secs(20);
const ROUNDS: u32 = 500;

/// The child's whole life: attach, run a few hundred calls, commit. Returns an exit code.
fn guest(memfd: i32, notifier: &EventFdNotifier, len: usize) -> i32 {
    // SAFETY: `memfd` is the agent's memfd, inherited across fork and open for the child's
    // whole life (the child never closes it).
    let fd = unsafe { BorrowedFd::borrow_raw(memfd) };
    let Ok(mem) = MmapMem::from_fd(fd, len) else {
        return 10;
    };
    let Ok(mut front) = Frontend::attach(mem) else {
        return 11;
    };
    let ready = Request::Ready {
        protocol_version: mayfly_ring::wire::PROTOCOL_VERSION,
        handlers: Vec::new(),
    };
    if !matches!(
        front.call(&ready, notifier, Some(TIMEOUT)),
        Ok(Response::Ok)
    ) {
        return 12;
    }
    for i in 0..ROUNDS {
        let put = Request::Put {
            key: i.to_be_bytes().to_vec(),
            value: vec![i as u8; (i as usize * 131) % 70_000 % 65_537],
        };
        if front.call(&put, notifier, Some(TIMEOUT)).ok() != Some(Response::Ok) {
            return 13;
        }
    }
    let commit = Request::Commit { result: vec![] };
    match front.call(&commit, notifier, Some(TIMEOUT)) {
        Ok(Response::Committed) => 0,
        _ => 14,
    }
}

#[test]
fn a_forked_guest_talks_to_the_agent() {
    let geometry = Geometry::DEFAULT;
    let len = geometry.total_len();
    let mem = MmapMem::memfd(c"mayfly-ring-fork", len).unwrap();
    let memfd = mem.fd().unwrap().as_raw_fd();
    let (agent_bell, guest_bell) = EventFdNotifier::pair().unwrap();
    let mut backend = Backend::new(mem, geometry).unwrap();

    // SAFETY: the child only runs `guest` (ring calls, heap allocation, which glibc keeps
    // usable after fork) and leaves with `_exit`, never returning into the test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = std::panic::catch_unwind(|| guest(memfd, &guest_bell, len)).unwrap_or(99);
        // SAFETY: ends the child without running the parent's destructors or harness.
        unsafe { libc::_exit(code) };
    }
    drop(guest_bell);

    let mut served = 0u32;
    let outcome: Result<(), RingError> = (|| loop {
        let request = backend.recv_request(&agent_bell, Some(TIMEOUT))?;
        served += 1;
        let (response, done) = match request.body {
            Request::Commit { .. } => (Response::Committed, true),
            _ => (Response::Ok, false),
        };
        backend.send_response(request.id, &response, &agent_bell)?;
        if done {
            return Ok(());
        }
    })();

    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    outcome.unwrap();
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    assert_eq!(libc::WEXITSTATUS(status), 0);
    assert_eq!(served, ROUNDS + 2);
}
