//! Hostile `test.*` handlers (feature `test-handlers`): a guest that misbehaves on purpose.
//!
//! **Never built into a production template.** They exist for the agent's isolation and
//! hostile-guest tests: each one actually attempts its misdeed, and it is the agent's and
//! the sandbox's job to make it fail and report it, not this crate's.
//!
//! They get raw access to the ring ([`RawRing`]) instead of a `Ctx`, and return a
//! [`RawOutcome`]. Those that break the ring return [`RawOutcome::AwaitDestruction`]: the
//! runtime then sends nothing more and waits, without a timeout, for the agent to destroy
//! the domain (so the agent observes the violation, not an exit).
//!
//! | name                | what it does |
//! |---------------------|--------------|
//! | `test.ring_garbage` | overwrites the whole shared area, header included, with RNG bytes; notifies |
//! | `test.bad_index`    | publishes `req_prod + 2^31`; notifies |
//! | `test.overflow`     | publishes `req_prod + slot_count + 1` (more requests than slots); notifies |
//! | `test.huge_length`  | publishes the next slot with a descriptor claiming `u32::MAX` bytes; notifies |
//! | `test.bad_encoding` | publishes the next slot, correctly labelled, holding 256 RNG bytes; notifies |
//! | `test.garbage_then_crash` | publishes the next slot holding 256 RNG bytes without notifying, then `std::process::abort()` (a violation, then a death of its choosing) |
//! | `test.loop_forever` | busy-loops forever |
//! | `test.crash`        | `std::process::abort()` |
//! | `test.open_file`    | opens `/etc/passwd`; commits its first 64 bytes if that worked, else aborts with the error |
//! | `test.socket`       | connects TCP to 127.0.0.1:22 and binds a UDP socket; commits a report if either worked, else aborts with both errors |
//! | `test.spawn`        | runs `/bin/sh -c 'echo escaped'`; commits its output if that worked, else aborts with the error |
//! | `test.random`       | commits 32 bytes from the transaction's RNG (clones must not share RNG state) |
//! | `test.panic`        | panics (caught: aborts with "handler panicked"; release builds: `SIGABRT`) |
//! | `test.doorbell_flood` | rings the agent's doorbell in a loop, publishing nothing |
//! | `test.sleep`        | sends nothing and waits until the agent destroys the domain (holds its slot until the transaction's deadline) |
//!
//! One more, [`ping`] (`test.ping`), is an ordinary SDK handler, not a hostile one: payload
//! `N` (decimal, 1..=[`MAX_PINGS`]), it makes `N` `Get("ping")` calls and commits `N`. It is
//! the ring round-trip benchmark on every backend (each call is one request/response pair).
//! And [`big_writes`] (`test.big_writes`), an SDK handler that buffers a large write set:
//! payload `N` (1..=1024), it puts `N` values of 64 KiB under distinct keys `big/<i>` and
//! commits (the agent's write-set byte bound refuses it past the bound). And [`many_reads`]
//! (`test.many_reads`): payload `N` (1..=[`MAX_MANY_READS`]), it reads `N` distinct keys
//! `many/<i>` and commits `N`; past the ledger's read-set limit (4,096) its read is refused
//! and it aborts with that error (the agent audits the limit once per transaction).
//!
//! The RNG bytes come from the transaction's [`HandlerRng`], so a given entropy seed always
//! produces the same garbage. Raw writes use `mayfly_ring::layout` constants.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use mayfly_ring::layout::{offset, DATA_OFFSET, DESCRIPTOR_SIZE};
use mayfly_ring::mem::MemError;
use mayfly_ring::notify::NotifyError;
use mayfly_ring::wire::WIRE_MAGIC;
use mayfly_ring::{Geometry, Notifier, SharedMem, Wake};
use mayfly_sdk::{Ctx, Handler, HandlerError, HandlerRng};

/// A raw write to the ring failed (the handler then aborts with this as the reason).
#[derive(Debug, thiserror::Error)]
pub enum RawError {
    /// A shared-memory access was refused.
    #[error(transparent)]
    Mem(#[from] MemError),
    /// Notifying the agent failed.
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// An offset computation overflowed.
    #[error("offset of slot {slot} overflows")]
    Offset {
        /// The slot.
        slot: u32,
    },
}

/// What a test handler asks the runtime to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawOutcome {
    /// Commit this result, as a normal handler would.
    Commit(Vec<u8>),
    /// Abort with this reason.
    Abort(String),
    /// The handler broke the ring: send nothing more, wait until the agent destroys the
    /// domain.
    AwaitDestruction,
}

/// A test handler: raw ring access and the payload.
pub type RawHandler = fn(&mut RawRing<'_>, &[u8]) -> RawOutcome;

/// The guest's end of the ring, raw: the shared memory, the notifier, the geometry read at
/// attach time, and the transaction's RNG.
pub struct RawRing<'a> {
    mem: &'a dyn SharedMem,
    notifier: &'a dyn Notifier,
    geometry: Geometry,
    rng: HandlerRng,
}

impl std::fmt::Debug for RawRing<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawRing")
            .field("len", &self.mem.len())
            .field("geometry", &self.geometry)
            .finish_non_exhaustive()
    }
}

impl<'a> RawRing<'a> {
    /// Raw access to an attached ring of `geometry` in `mem`, with the RNG seeded from
    /// `entropy_seed`.
    pub fn new(
        mem: &'a dyn SharedMem,
        notifier: &'a dyn Notifier,
        geometry: Geometry,
        entropy_seed: [u8; 32],
    ) -> Self {
        Self {
            mem,
            notifier,
            geometry,
            rng: HandlerRng::from_seed(entropy_seed),
        }
    }

    /// The shared memory.
    pub fn mem(&self) -> &dyn SharedMem {
        self.mem
    }

    /// The notifier.
    pub fn notifier(&self) -> &dyn Notifier {
        self.notifier
    }

    /// The geometry read at attach time.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The transaction's RNG.
    pub fn rng(&mut self) -> &mut HandlerRng {
        &mut self.rng
    }

    /// The `req_prod` this guest has published (the free-running index of its next
    /// request): the guest is the only writer of that word.
    pub fn req_prod(&self) -> Result<u32, RawError> {
        Ok(self.mem.load_u32_relaxed(offset::REQ_PROD)?)
    }

    /// Publishes `req_prod` (release) and notifies the agent.
    pub fn publish(&self, req_prod: u32) -> Result<(), RawError> {
        self.mem.store_u32_release(offset::REQ_PROD, req_prod)?;
        self.notifier.notify()?;
        Ok(())
    }

    /// Writes the descriptor of the slot of message `index`: `{seq, len}`.
    pub fn write_descriptor(&self, index: u32, seq: u32, len: u32) -> Result<(), RawError> {
        let slot = self.slot_of(index);
        let desc = usize::try_from(slot)
            .ok()
            .and_then(|s| s.checked_mul(DESCRIPTOR_SIZE))
            .and_then(|o| o.checked_add(offset::DESCRIPTORS))
            .ok_or(RawError::Offset { slot })?;
        self.mem.store_u32_relaxed(desc, seq)?;
        self.mem
            .store_u32_relaxed(desc.checked_add(4).ok_or(RawError::Offset { slot })?, len)?;
        Ok(())
    }

    /// Writes `bytes` at the start of the window of the slot of message `index`.
    pub fn write_window(&self, index: u32, bytes: &[u8]) -> Result<(), RawError> {
        let slot = self.slot_of(index);
        let window = usize::try_from(slot)
            .ok()
            .and_then(|s| s.checked_mul(self.geometry.window_size()))
            .and_then(|o| o.checked_add(DATA_OFFSET))
            .ok_or(RawError::Offset { slot })?;
        self.mem.write_bytes(window, bytes)?;
        Ok(())
    }

    fn slot_of(&self, index: u32) -> u32 {
        index & self.geometry.slot_count().wrapping_sub(1)
    }

    /// Waits, without a timeout, until the agent destroys the domain: returns only if the
    /// notifier reports the peer gone or fails.
    pub fn await_destruction(&self) {
        loop {
            match self.notifier.wait(None) {
                Ok(Wake::Notified | Wake::TimedOut) => {}
                Ok(Wake::PeerGone) | Err(_) => return,
            }
        }
    }
}

/// The test handlers, by name.
pub const TEST_HANDLERS: &[(&str, RawHandler)] = &[
    ("test.ring_garbage", ring_garbage),
    ("test.bad_index", bad_index),
    ("test.overflow", overflow),
    ("test.huge_length", huge_length),
    ("test.bad_encoding", bad_encoding),
    ("test.garbage_then_crash", garbage_then_crash),
    ("test.loop_forever", loop_forever),
    ("test.crash", crash),
    ("test.open_file", open_file),
    ("test.socket", socket),
    ("test.spawn", spawn),
    ("test.random", random),
    ("test.panic", panic),
    ("test.doorbell_flood", doorbell_flood),
    ("test.sleep", sleep),
];

/// The test handlers as a map.
pub fn test_handlers() -> &'static BTreeMap<&'static str, RawHandler> {
    static MAP: OnceLock<BTreeMap<&'static str, RawHandler>> = OnceLock::new();
    MAP.get_or_init(|| TEST_HANDLERS.iter().copied().collect())
}

/// The count an SDK test handler's payload names: decimal `1..=max` (at most 10 digits, so
/// the parse is bounded), else a bad request saying so.
fn count_payload(payload: &[u8], max: u32) -> Result<u32, HandlerError> {
    std::str::from_utf8(payload)
        .ok()
        .filter(|t| !t.is_empty() && t.len() <= 10 && t.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|n| (1..=max).contains(n))
        .ok_or_else(|| HandlerError::bad_request(format!("payload must be 1..={max}")))
}

/// Most round trips one `test.ping` transaction may ask for.
pub const MAX_PINGS: u32 = 100_000;

/// `test.ping`: `N` `Get("ping")` round trips, then commits `N` (see the module docs).
pub fn ping(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let count = count_payload(payload, MAX_PINGS)?;
    for _ in 0..count {
        ctx.db().get(b"ping")?;
    }
    Ok(count.to_string().into_bytes())
}

/// Size of each value `test.big_writes` puts (the ledger's largest value).
pub const BIG_VALUE: usize = 64 << 10;

/// `test.big_writes`: puts `N` values of [`BIG_VALUE`] bytes under `big/0` .. `big/N-1`, then
/// commits `N` (see the module docs).
pub fn big_writes(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let count = count_payload(payload, 1024)?;
    let value = vec![0x5a_u8; BIG_VALUE];
    for i in 0..count {
        ctx.db().put(format!("big/{i}").as_bytes(), &value)?;
    }
    Ok(count.to_string().into_bytes())
}

/// Most keys `test.many_reads` reads (twice the ledger's read-set limit).
pub const MAX_MANY_READS: u32 = 8192;

/// `test.many_reads`: reads `N` distinct keys `many/0` .. `many/N-1`, then commits `N` (see
/// the module docs); a refused read ends it with that error.
pub fn many_reads(ctx: &mut Ctx<'_>, payload: &[u8]) -> Result<Vec<u8>, HandlerError> {
    let count = count_payload(payload, MAX_MANY_READS)?;
    for i in 0..count {
        ctx.db().get(format!("many/{i}").as_bytes())?;
    }
    Ok(count.to_string().into_bytes())
}

/// Names of the SDK-style test handlers ([`get_sdk`]).
pub const SDK_TEST_HANDLERS: &[&str] = &["test.ping", "test.big_writes", "test.many_reads"];

/// The SDK-style test handlers: `test.ping`, `test.big_writes` and `test.many_reads`.
pub fn get_sdk(name: &str) -> Option<Handler> {
    match name {
        "test.ping" => Some(ping as Handler),
        "test.big_writes" => Some(big_writes as Handler),
        "test.many_reads" => Some(many_reads as Handler),
        _ => None,
    }
}

/// The test handler named `name`.
pub fn get(name: &str) -> Option<RawHandler> {
    test_handlers().get(name).copied()
}

fn ring_broken(result: Result<(), RawError>) -> RawOutcome {
    match result {
        Ok(()) => RawOutcome::AwaitDestruction,
        Err(e) => RawOutcome::Abort(format!("raw ring write failed: {e}")),
    }
}

/// `test.ring_garbage`: overwrites the whole shared area with RNG bytes, then notifies.
pub fn ring_garbage(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let attempt = (|| -> Result<(), RawError> {
        let len = ring.mem.len();
        let mut chunk = [0u8; 4096];
        let mut at = 0;
        while at < len {
            let n = chunk.len().min(len.saturating_sub(at));
            let part = chunk.get_mut(..n).unwrap_or_default();
            ring.rng.fill_bytes(part);
            ring.mem.write_bytes(at, part)?;
            at = at.saturating_add(n);
        }
        ring.notifier.notify()?;
        Ok(())
    })();
    ring_broken(attempt)
}

/// `test.bad_index`: publishes an absurd `req_prod` (2^31 ahead).
pub fn bad_index(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    ring_broken(
        ring.req_prod()
            .and_then(|p| ring.publish(p.wrapping_add(0x8000_0000))),
    )
}

/// `test.overflow`: publishes `slot_count + 1` requests at once.
pub fn overflow(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let slots = ring.geometry.slot_count();
    ring_broken(
        ring.req_prod()
            .and_then(|p| ring.publish(p.wrapping_add(slots).wrapping_add(1))),
    )
}

/// `test.huge_length`: publishes one request whose descriptor claims `u32::MAX` bytes.
pub fn huge_length(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    ring_broken(ring.req_prod().and_then(|index| {
        ring.write_descriptor(index, index, u32::MAX)?;
        ring.publish(index.wrapping_add(1))
    }))
}

/// `test.bad_encoding`: publishes one correctly labelled request of 256 garbage bytes.
pub fn bad_encoding(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let mut garbage = [0u8; 256];
    ring.rng.fill_bytes(&mut garbage);
    if garbage.starts_with(&WIRE_MAGIC) {
        garbage[0] ^= 0xff;
    }
    ring_broken(ring.req_prod().and_then(|index| {
        ring.write_window(index, &garbage)?;
        ring.write_descriptor(index, index, 256)?;
        ring.publish(index.wrapping_add(1))
    }))
}

/// `test.garbage_then_crash`: publishes one correctly labelled request of 256 garbage
/// bytes without notifying, then aborts: the agent finds the violation in the ring when it
/// looks after the peer is gone, with the domain already dead.
pub fn garbage_then_crash(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let mut garbage = [0u8; 256];
    ring.rng.fill_bytes(&mut garbage);
    if garbage.starts_with(&WIRE_MAGIC) {
        garbage[0] ^= 0xff;
    }
    let published = ring.req_prod().and_then(|index| {
        ring.write_window(index, &garbage)?;
        ring.write_descriptor(index, index, 256)?;
        ring.mem
            .store_u32_release(offset::REQ_PROD, index.wrapping_add(1))?;
        Ok(())
    });
    match published {
        Ok(()) => std::process::abort(),
        Err(e) => RawOutcome::Abort(format!("raw ring write failed: {e}")),
    }
}

/// `test.loop_forever`: spins until killed.
pub fn loop_forever(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

/// `test.doorbell_flood`: notifies the agent in a loop without publishing a request, until
/// the agent destroys the domain.
pub fn doorbell_flood(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    loop {
        let _ = ring.notifier.notify();
    }
}

/// `test.sleep`: sends nothing and waits (without spinning) until the agent destroys the
/// domain, as a guest stuck on I/O would.
pub fn sleep(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    ring.await_destruction();
    RawOutcome::AwaitDestruction
}

/// `test.crash`: aborts the process.
pub fn crash(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    std::process::abort()
}

/// `test.open_file`: tries to read `/etc/passwd`.
pub fn open_file(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    const PATH: &str = "/etc/passwd";
    let mut file = match std::fs::File::open(PATH) {
        Ok(file) => file,
        Err(e) => return RawOutcome::Abort(format!("open {PATH}: {e}")),
    };
    let mut first = vec![0u8; 64];
    match file.read(&mut first) {
        Ok(n) => {
            first.truncate(n);
            RawOutcome::Commit(first)
        }
        Err(e) => RawOutcome::Abort(format!("read {PATH}: {e}")),
    }
}

/// `test.socket`: tries a TCP connection to 127.0.0.1:22 and a UDP socket.
pub fn socket(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let ssh = SocketAddr::from(([127, 0, 0, 1], 22));
    let tcp = TcpStream::connect_timeout(&ssh, Duration::from_secs(2))
        .map(|_| "connected".to_string())
        .map_err(|e| format!("tcp connect {ssh}: {e}"));
    let udp = UdpSocket::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .map(|s| match s.local_addr() {
            Ok(addr) => format!("bound {addr}"),
            Err(_) => "bound".to_string(),
        })
        .map_err(|e| format!("udp bind: {e}"));
    let report = format!(
        "tcp: {}; udp: {}",
        tcp.as_ref().unwrap_or_else(|e| e),
        udp.as_ref().unwrap_or_else(|e| e)
    );
    if tcp.is_ok() || udp.is_ok() {
        RawOutcome::Commit(report.into_bytes())
    } else {
        RawOutcome::Abort(format!("socket attempts failed: {report}"))
    }
}

/// `test.spawn`: tries to run `/bin/sh`.
pub fn spawn(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    match Command::new("/bin/sh")
        .args(["-c", "echo escaped"])
        .output()
    {
        Ok(out) => {
            let mut result = format!("{}: ", out.status).into_bytes();
            result.extend_from_slice(&out.stdout);
            RawOutcome::Commit(result)
        }
        Err(e) => RawOutcome::Abort(format!("spawn /bin/sh: {e}")),
    }
}

/// `test.random`: commits 32 bytes from the transaction's RNG.
pub fn random(ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    let mut bytes = vec![0u8; 32];
    ring.rng.fill_bytes(&mut bytes);
    RawOutcome::Commit(bytes)
}

/// `test.panic`: panics.
pub fn panic(_ring: &mut RawRing<'_>, _payload: &[u8]) -> RawOutcome {
    panic!("test.panic: deliberate handler panic")
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly_sdk::registry::check_handler_name;

    #[test]
    fn names_are_valid_distinct_and_documented() {
        assert_eq!(test_handlers().len(), TEST_HANDLERS.len());
        let docs = include_str!("test_handlers.rs");
        for (name, _) in TEST_HANDLERS {
            check_handler_name(name).unwrap();
            assert!(name.starts_with("test."));
            assert!(
                docs.contains(&format!("//! | `{name}`")),
                "{name} undocumented"
            );
        }
        assert!(get("test.crash").is_some());
        assert!(get("transfer").is_none());
    }
}
