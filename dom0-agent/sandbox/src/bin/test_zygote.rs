//! `mayfly-sandbox-test-zygote`: the zygote the sandbox's integration tests spawn (built only
//! with the `test-zygote` feature).
//!
//! Its clones speak the ring minimally: send `Ready`, wait for `Start`, act according to
//! `Start.handler`, and commit a result:
//!
//! | handler | does |
//! |---|---|
//! | `echo` | commits the payload |
//! | `crash` | `abort()` |
//! | `segv` | writes through a null pointer |
//! | `overflow` | recurses until the stack overflows |
//! | `panic` | panics (the clone exits with status 101) |
//! | `loop` | spins forever |
//! | `open` | opens `/etc/passwd` |
//! | `socket` | TCP connect to 127.0.0.1:80 |
//! | `spawn` | runs `/bin/sh -c true` |
//! | `uid` | commits `"<uid> <gid>"` |
//! | `cow` | commits what it sees of the template state, then overwrites it |
//! | `alloc` | grows a buffer to 64 MiB, then tries to reserve 1 GiB more; commits `allocated` or `refused` |
//! | `kill` | payload `"<pid> <signal>"`: `kill(pid, signal)`; commits `sent` or the errno's name |
//! | `fork` | `fork()` (the child `_exit`s at once); commits `forked` or the errno's name |
//! | `bells` | commits, then (after the agent's answer) writes a count into both of its eventfds |
//! | `peek` | commits `"<signal> <wait>"`: the counts its two eventfds held when it started (read before `Ready`) |
//! | `fill` | writes the payload at the start of every page of the ring after the header (as a guest scribbling over the whole shared area would), then commits `filled` |
//! | `pdeathsig` | `prctl(PR_SET_PDEATHSIG, 0)` (would let it outlive the zygote); commits `cleared` or the errno's name |

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mayfly_ring::layout::DATA_OFFSET;
use mayfly_ring::wire::PROTOCOL_VERSION;
use mayfly_ring::{EventFdNotifier, Frontend, MmapMem, Request, Response, SharedMem};
use mayfly_sandbox_zygote::ChildRing;

/// Template state built once in the zygote; each clone gets a copy-on-write copy.
struct Template {
    marker: u64,
    pattern: Vec<u8>,
    /// `--die-before-ready`: every clone exits (status 42) before sending `Ready`, as a
    /// clone whose start-up fails would.
    die_before_ready: bool,
    /// `--ready-extra-handler`: every clone's ring `Ready` announces one handler more than
    /// the template announced on the control socket, as a broken or hostile clone would.
    ready_extra_handler: bool,
}

const TEMPLATE_MARKER: u64 = 0xC0FFEE;
static GLOBAL: AtomicU64 = AtomicU64::new(0);

fn init() -> Template {
    Template {
        marker: TEMPLATE_MARKER,
        pattern: vec![0xAB; 1 << 20],
        die_before_ready: std::env::args().any(|a| a == "--die-before-ready"),
        ready_extra_handler: std::env::args().any(|a| a == "--ready-extra-handler"),
    }
}

fn run(template: &mut Template, ring: ChildRing) -> i32 {
    if template.die_before_ready {
        return 42;
    }
    let Ok(mem) = MmapMem::from_fd(ring.ring.as_fd(), ring.ring_len) else {
        return 10;
    };
    // What the eventfds hold before this clone says anything: nothing, unless the agent
    // handed it an earlier clone's eventfds without draining them (see `bells`).
    let at_start = [
        take_count(ring.signal.as_fd()),
        take_count(ring.wait.as_fd()),
    ];
    let notifier = EventFdNotifier::from_fds(ring.signal, ring.wait);
    let Ok(mut front) = Frontend::attach(mem) else {
        return 11;
    };
    let mut handlers: Vec<String> = HANDLERS.iter().map(|h| (*h).to_owned()).collect();
    if template.ready_extra_handler {
        handlers.push("zzz.not_in_the_template".to_owned());
    }
    let ready = Request::Ready {
        protocol_version: PROTOCOL_VERSION,
        handlers,
    };
    let start = match front.call(&ready, &notifier, None) {
        Ok(Response::Start(start)) => start,
        _ => return 12,
    };
    let result: Vec<u8> = match start.handler.as_str() {
        "echo" => start.payload,
        "bells" => b"rung after the commit".to_vec(),
        "peek" => format!("{} {}", at_start[0], at_start[1]).into_bytes(),
        "fill" => {
            let Ok(raw) = MmapMem::from_fd(ring.ring.as_fd(), ring.ring_len) else {
                return 13;
            };
            for page in (DATA_OFFSET..ring.ring_len).step_by(4096) {
                if raw.write_bytes(page, &start.payload).is_err() {
                    return 14;
                }
            }
            b"filled".to_vec()
        }
        "crash" => std::process::abort(),
        "segv" => {
            // SAFETY: deliberately invalid: the test wants the clone to die of SIGSEGV.
            #[allow(unsafe_code)]
            unsafe {
                std::ptr::null_mut::<u8>().write_volatile(1);
            }
            b"survived a null write".to_vec()
        }
        "overflow" => {
            let depth = recurse(std::hint::black_box(1));
            format!("returned from depth {depth}").into_bytes()
        }
        "panic" => panic!("the handler panicked"),
        "loop" => loop {
            std::hint::spin_loop();
        },
        "open" => match std::fs::File::open("/etc/passwd") {
            Ok(_) => b"opened".to_vec(),
            Err(e) => format!("open failed: {e}").into_bytes(),
        },
        "socket" => match std::net::TcpStream::connect("127.0.0.1:80") {
            Ok(_) => b"connected".to_vec(),
            Err(e) => format!("connect failed: {e}").into_bytes(),
        },
        "spawn" => match std::process::Command::new("/bin/sh")
            .args(["-c", "true"])
            .status()
        {
            Ok(s) => format!("spawned: {s}").into_bytes(),
            Err(e) => format!("spawn failed: {e}").into_bytes(),
        },
        "uid" => format!(
            "{} {}",
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw()
        )
        .into_bytes(),
        "cow" => {
            let seen = format!(
                "marker={} pattern_intact={} global={}",
                template.marker,
                template.pattern.iter().all(|&b| b == 0xAB),
                GLOBAL.load(Ordering::SeqCst)
            );
            template.marker = u64::from(ring.clone_id);
            template.pattern.fill(0xCD);
            GLOBAL.store(u64::from(ring.clone_id), Ordering::SeqCst);
            seen.into_bytes()
        }
        "alloc" => {
            // Grow by reallocation (glibc moves large blocks with mremap), then ask for more
            // than RLIMIT_AS allows.
            let mut v: Vec<u8> = Vec::new();
            for _ in 0..(64 << 20) / 4096 {
                v.extend_from_slice(&[1u8; 4096]);
            }
            match v.try_reserve_exact(1 << 30) {
                Ok(()) => b"allocated".to_vec(),
                Err(_) => b"refused".to_vec(),
            }
        }
        "kill" => {
            let text = String::from_utf8_lossy(&start.payload).into_owned();
            let mut words = text.split_whitespace().map(str::parse::<i32>);
            match (words.next(), words.next()) {
                (Some(Ok(pid)), Some(Ok(signal))) => {
                    // SAFETY: kill(2) takes plain integers.
                    #[allow(unsafe_code)]
                    let rc = unsafe { libc::kill(pid, signal) };
                    errno_result(rc, b"sent")
                }
                _ => b"bad payload".to_vec(),
            }
        }
        "pdeathsig" => {
            // SAFETY: prctl(2) with integer arguments.
            #[allow(unsafe_code)]
            let rc = unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0) };
            errno_result(rc, b"cleared")
        }
        "fork" => {
            // SAFETY: the clone is single-threaded; the child only calls _exit.
            #[allow(unsafe_code)]
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: _exit in the forked child.
                #[allow(unsafe_code)]
                unsafe {
                    libc::_exit(0)
                }
            }
            errno_result(pid, b"forked")
        }
        _ => b"unknown handler".to_vec(),
    };
    let commit = Request::Commit { result };
    match front.call(&commit, &notifier, Some(Duration::from_secs(30))) {
        Ok(Response::Committed) => {
            if start.handler == "bells" {
                // After the agent's last read: counts left in both eventfds for whoever
                // gets them next.
                let count = 0xFFFF_FFFE_u64.to_ne_bytes();
                let _ = nix::unistd::write(notifier.signal_fd(), &count);
                let _ = nix::unistd::write(notifier.wait_fd(), &count);
            }
            0
        }
        _ => 13,
    }
}

/// Reads (and so empties) a non-blocking eventfd's count; 0 if it holds none.
fn take_count(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    let mut count = [0u8; 8];
    match nix::unistd::read(fd, &mut count) {
        Ok(8) => u64::from_ne_bytes(count),
        _ => 0,
    }
}

/// `ok` if `rc` is not negative, else the name of `errno`.
fn errno_result(rc: i32, ok: &[u8]) -> Vec<u8> {
    if rc >= 0 {
        return ok.to_vec();
    }
    match nix::errno::Errno::last() {
        nix::errno::Errno::EPERM => b"EPERM".to_vec(),
        nix::errno::Errno::EAGAIN => b"EAGAIN".to_vec(),
        other => format!("{other:?}").into_bytes(),
    }
}

/// Recursion the optimiser cannot turn into a loop.
#[inline(never)]
fn recurse(n: u64) -> u64 {
    if n == 0 {
        return 0; // never: `n` starts at 1 and the stack ends long before it wraps
    }
    let pad = std::hint::black_box([n; 64]);
    let below = recurse(n.wrapping_add(1));
    std::hint::black_box(pad[0]).wrapping_add(below)
}

/// The handlers `run` answers to, announced to the agent in the zygote's `Ready`.
const HANDLERS: &[&str] = &[
    "alloc",
    "bells",
    "cow",
    "crash",
    "echo",
    "fill",
    "fork",
    "kill",
    "loop",
    "open",
    "overflow",
    "panic",
    "pdeathsig",
    "peek",
    "segv",
    "socket",
    "spawn",
    "uid",
];

fn main() {
    let control = match mayfly_sandbox_zygote::control_fd_from_env() {
        Ok(fd) => fd,
        Err(e) => {
            eprintln!("mayfly-sandbox-test-zygote: {e}");
            std::process::exit(2);
        }
    };
    let handlers = HANDLERS.iter().map(|h| (*h).to_owned()).collect();
    mayfly_sandbox_zygote::zygote_main_with(control, handlers, init, run)
}
