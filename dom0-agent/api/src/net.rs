//! The network edge: a tokio runtime, the accept loop, TLS handshakes and hyper's HTTP/1.1
//! connections, each under the limits of [`crate::Limits`].
//!
//! What each limit does, and what hyper does by itself:
//! - more than `max_connections` open: the new connection is answered
//!   `503 Service Unavailable` + `Connection: close` (plain HTTP; a TLS port just closes it)
//!   and closed, at once; at most [`REFUSERS`] such answers are in progress, beyond them the
//!   connection is closed without one;
//! - a request head above `max_header_bytes` or with more than `max_headers` fields: hyper
//!   answers 431 and closes; a malformed request line, URI (a raw 0xFF, say) or header
//!   field: hyper answers 400 and closes; an HTTP/2 preface on the HTTP/1.1 port: hyper
//!   closes the connection at once, without a status (it recognises the preface and has no
//!   HTTP/1.1 answer for it);
//! - a head not complete within `header_timeout` of the connection waiting for it: hyper
//!   closes the connection without a status (hyper 1.x has no 408 for it);
//! - no request in progress and no byte either way for `idle_timeout`: closed (the
//!   effective idle limit is the smaller of `idle_timeout` and `header_timeout`);
//! - a TLS handshake not complete within `header_timeout`: closed; more than
//!   `max_handshakes` TLS handshakes in progress: the new connection is closed at once,
//!   before a byte of it is read. Handshakes run on a thread of their own (`api-tls`):
//!   their CPU — the server's signature, the check of a client certificate — is not the
//!   network threads', so a flood of ClientHellos slows new handshakes, not established
//!   connections;
//! - a response write that makes no progress (the client reads nothing) for
//!   `write_timeout`: closed, whatever the connection holds;
//! - after a TLS reload (SIGHUP), a connection authenticated under the configuration
//!   before: closed after its request in progress (at the next check: every quarter of
//!   the smaller of `idle_timeout` and `write_timeout`, at least every second), a request arriving on it before
//!   that is answered 421 and the connection closed; either is audited
//!   (`api.connection_stale`, through the refusal aggregation) and counted;
//! - from a peer in `proxy_from`: a PROXY protocol v2 header not complete and valid
//!   within `header_timeout`: closed at once, audited (`api.proxy_refused`) and counted;
//! - a body not complete within `body_timeout`: 408, closed; above `max_body` (declared in
//!   Content-Length, or counted as it arrives, chunked or not): 413, closed, and the rest
//!   is not read.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use slog::{debug, info, warn};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::config::ApiError;
use crate::response::error_close;
use crate::shared::Shared;

/// Refusals (503 at the connection limit) written at once, at most.
pub(crate) const REFUSERS: usize = 32;

const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
retry-after: 1\r\nconnection: close\r\ncontent-length: 51\r\n\r\n\
{\"error\":\"overloaded: too many connections are open\"}";

pub(crate) struct Net {
    pub addr: SocketAddr,
    runtime: tokio::runtime::Runtime,
    /// The thread TLS handshakes run on (with TLS only).
    handshake_runtime: Option<tokio::runtime::Runtime>,
    stop: watch::Sender<bool>,
    accept: tokio::task::JoinHandle<()>,
}

impl Net {
    pub(crate) fn start(shared: Arc<Shared>) -> Result<Self, ApiError> {
        let config = &shared.config;
        let listen = config.listen;
        let std_listener =
            std::net::TcpListener::bind(listen).map_err(|source| ApiError::Bind {
                addr: listen,
                source,
            })?;
        std_listener
            .set_nonblocking(true)
            .map_err(|source| ApiError::Bind {
                addr: listen,
                source,
            })?;
        let addr = std_listener.local_addr().unwrap_or(listen);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.workers)
            .max_blocking_threads(config.max_in_flight + crate::shared::AUX_BLOCKING)
            .thread_name("api")
            .enable_io()
            .enable_time()
            .build()
            .map_err(ApiError::Runtime)?;
        let listener = {
            let _guard = runtime.enter();
            TcpListener::from_std(std_listener).map_err(|source| ApiError::Bind {
                addr: listen,
                source,
            })?
        };
        // TLS handshakes (their public-key work: the server's signature, the check of a
        // client's certificate chain and signature) run on a thread of their own, so a
        // flood of them takes that thread's CPU and not the network threads' (the OS
        // shares the cores between them); their sockets stay on the network threads'
        // reactor.
        let handshake_runtime = match &shared.tls {
            Some(_) => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .max_blocking_threads(1)
                    .thread_name("api-tls")
                    .enable_time()
                    .build()
                    .map_err(ApiError::Runtime)?,
            ),
            None => None,
        };
        let handshakes = Arc::new(Handshakes {
            permits: Arc::new(Semaphore::new(config.limits.max_handshakes)),
            runtime: handshake_runtime.as_ref().map(|r| r.handle().clone()),
        });
        let (stop, stop_rx) = watch::channel(false);
        info!(shared.log, "client API listening"; "addr" => %addr, "workers" => config.workers,
            "tls" => shared.tls.is_some(),
            "mutual_tls" => shared.tls.as_ref().is_some_and(crate::tls::Current::mutual),
            "max_connections" => config.limits.max_connections);
        let accept = runtime.spawn(accept_loop(listener, shared, stop_rx, handshakes));
        Ok(Self {
            addr,
            runtime,
            handshake_runtime,
            stop,
            accept,
        })
    }

    pub(crate) fn shutdown(self, shared: &Shared, grace: Duration) {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + grace;
        self.runtime.block_on(async {
            let _ = self.accept.await;
            // Connections close as their requests end (graceful shutdown in each); wait
            // for them, polling with a deadline.
            while shared.metrics.open_connections.load(Ordering::Acquire) > 0
                && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        self.runtime
            .shutdown_timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(r) = self.handshake_runtime {
            // Handshakes left are of connections the runtime above has dropped.
            r.shutdown_background();
        }
    }
}

/// The bound on TLS handshakes and the thread they run on.
struct Handshakes {
    permits: Arc<Semaphore>,
    runtime: Option<tokio::runtime::Handle>,
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    handshakes: Arc<Handshakes>,
) {
    let slots = Arc::new(Semaphore::new(shared.config.limits.max_connections));
    let refusers = Arc::new(Semaphore::new(REFUSERS));
    let epoch = Instant::now();
    loop {
        let accepted = tokio::select! {
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors (EMFILE) or a connection reset before accept: back
                // off briefly instead of spinning on the error.
                warn!(shared.log, "accept failed"; "error" => %e);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                shared
                    .metrics
                    .connections_accepted
                    .fetch_add(1, Ordering::Relaxed);
                let (shared, stop, handshakes) = (shared.clone(), stop.clone(), handshakes.clone());
                tokio::spawn(async move {
                    shared
                        .metrics
                        .open_connections
                        .fetch_add(1, Ordering::AcqRel);
                    connection(stream, peer, &shared, stop, epoch, &handshakes).await;
                    shared
                        .metrics
                        .open_connections
                        .fetch_sub(1, Ordering::AcqRel);
                    drop(permit);
                });
            }
            Err(_) => {
                shared
                    .metrics
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                if shared.tls.is_none() {
                    if let Ok(permit) = refusers.clone().try_acquire_owned() {
                        tokio::spawn(refuse(stream, permit));
                    }
                }
                // Otherwise dropped: closed at once.
            }
        }
    }
}

/// Answers 503 on a connection beyond the limit, then closes it after reading (and
/// discarding) at most 64 KiB for at most a second, so the client sees the answer rather
/// than a reset.
async fn refuse(mut stream: TcpStream, _permit: tokio::sync::OwnedSemaphorePermit) {
    use tokio::io::AsyncReadExt;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(REFUSAL).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut left = 64 * 1024usize;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), std::io::Error>(())
    })
    .await;
}

/// A gauge counted up for as long as the guard lives.
struct InProgress<'a>(&'a AtomicU64);

impl<'a> InProgress<'a> {
    fn new(gauge: &'a AtomicU64) -> Self {
        gauge.fetch_add(1, Ordering::AcqRel);
        Self(gauge)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-connection activity, for the idle timeout.
struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` of the last byte read or written.
    last: AtomicU64,
    /// Requests in progress (the service has them).
    active: AtomicUsize,
    /// 1 + milliseconds since `epoch` when a write first found the socket full, 0 while
    /// writes make progress: for the write timeout.
    write_blocked: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
    /// How long writes have made no progress (zero while they do).
    fn write_blocked_for(&self) -> Duration {
        match self.write_blocked.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now_ms().saturating_sub(since - 1)),
        }
    }
    fn idle_for(&self) -> Duration {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }
}

/// A stream that records its activity.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        match r {
            Poll::Ready(Ok(n)) if n > 0 => {
                self.activity.touch();
                self.activity.write_blocked.store(0, Ordering::Relaxed);
            }
            Poll::Pending => {
                let now = self.activity.now_ms().saturating_add(1);
                let _ = self.activity.write_blocked.compare_exchange(
                    0,
                    now,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            _ => {}
        }
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    stop: watch::Receiver<bool>,
    epoch: Instant,
    handshakes: &Handshakes,
) {
    let Some(peer) = client_address(&mut stream, peer, shared).await else {
        return;
    };
    let activity = Arc::new(Activity {
        epoch,
        last: AtomicU64::new(0),
        active: AtomicUsize::new(0),
        write_blocked: AtomicU64::new(0),
    });
    activity.touch();
    let stream = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let Some(tls) = &shared.tls else {
        let client: Arc<str> = Arc::from(peer.ip().to_string());
        return serve(TokioIo::new(stream), client, shared, stop, activity, None).await;
    };
    let Some((stream, client, generation)) = handshake(stream, peer, shared, tls, handshakes).await
    else {
        return;
    };
    serve(
        TokioIo::new(stream),
        client,
        shared,
        stop,
        activity,
        Some(generation),
    )
    .await;
}

/// The client's address: the peer's, or, from a trusted load balancer (`proxy_from`), the
/// one its PROXY v2 header names (read within the head timeout). `None`: the header was
/// bad or late; the refusal is counted and audited and the connection is to be closed.
async fn client_address(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Arc<Shared>,
) -> Option<SocketAddr> {
    if !shared
        .config
        .proxy_from
        .iter()
        .any(|n| n.contains(peer.ip()))
    {
        return Some(peer);
    }
    // A trusted load balancer: its header names the client, within the head timeout.
    let limit = shared.config.limits.header_timeout;
    let read = tokio::time::timeout(limit, crate::proxy::read(stream)).await;
    match read {
        Ok(Ok(crate::proxy::Header::Proxied(client))) => Some(client),
        Ok(Ok(crate::proxy::Header::Local)) => Some(peer),
        refused => {
            let reason = match refused {
                Ok(Err(e)) => e.to_string(),
                _ => format!("no PROXY header within {} ms", limit.as_millis()),
            };
            shared
                .metrics
                .proxy_headers_refused
                .fetch_add(1, Ordering::Relaxed);
            let by: Arc<str> = Arc::from(peer.ip().to_string());
            let ev = mayfly_ledger::AuditEvent::new(
                "api.proxy_refused",
                mayfly_ledger::Severity::Warning,
            )
            .field("client", by.to_string())
            .field("reason", reason);
            let _ = crate::shared::audit_refusal(
                shared,
                &by,
                "api.proxy_refused",
                "bad PROXY header",
                ev,
            );
            None
        }
    }
}

/// The TLS handshake under `max_handshakes` and the head timeout, on the handshake
/// runtime when there is one; the client's identity (its certificate's SPKI hash under
/// mutual TLS, else its IP address) and the TLS generation it was authenticated under.
/// `None`: refused or failed (counted; the connection is to be closed).
async fn handshake(
    stream: Watched<TcpStream>,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    tls: &crate::tls::Current,
    handshakes: &Handshakes,
) -> Option<(
    tokio_rustls::server::TlsStream<Watched<TcpStream>>,
    Arc<str>,
    u64,
)> {
    // At most max_handshakes in progress: a flood of ClientHellos (or of handshakes left
    // half done) cannot make the network threads spend their time on handshakes' public
    // key operations. Beyond the limit the connection is closed at once, unread.
    let Ok(handshake) = handshakes.permits.clone().try_acquire_owned() else {
        shared
            .metrics
            .tls_handshakes_refused
            .fetch_add(1, Ordering::Relaxed);
        debug!(shared.log, "TLS handshake refused: too many in progress"; "peer" => %peer);
        return None;
    };
    let in_progress = InProgress::new(&shared.metrics.tls_handshakes_in_progress);
    let (config, generation) = tls.get();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let limit = shared.config.limits.header_timeout;
    let handshake_task = tokio::time::timeout(limit, acceptor.accept(stream));
    let handshaken = match &handshakes.runtime {
        Some(runtime) => match runtime.spawn(handshake_task).await {
            Ok(h) => h,
            Err(e) => {
                // The handshake task panicked or was cancelled (at shutdown).
                warn!(shared.log, "TLS handshake task ended"; "peer" => %peer, "error" => %e);
                return None;
            }
        },
        None => handshake_task.await,
    };
    drop(in_progress);
    drop(handshake);
    let stream = match handshaken {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            shared
                .metrics
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            debug!(shared.log, "TLS handshake failed"; "peer" => %peer, "error" => %e);
            return None;
        }
        Err(_) => {
            shared
                .metrics
                .tls_handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            debug!(shared.log, "TLS handshake timed out"; "peer" => %peer);
            return None;
        }
    };
    let client: Arc<str> = if tls.mutual() {
        let id = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::identity);
        match id {
            Some(id) => Arc::from(id),
            None => {
                // The verifier required a certificate, so this is not expected; refuse.
                warn!(shared.log, "client certificate without a usable key"; "peer" => %peer);
                return None;
            }
        }
    } else {
        Arc::from(peer.ip().to_string())
    };
    Some((stream, client, generation))
}

/// Whether a connection authenticated under TLS configuration `generation` is stale (a
/// reload since); `None`: plain HTTP, never.
fn stale(shared: &Shared, generation: Option<u64>) -> bool {
    match (generation, &shared.tls) {
        (Some(g), Some(tls)) => tls.generation() != g,
        _ => false,
    }
}

/// Audits (through the refusal aggregation: repeats of one client are counted) and counts
/// a stale connection being refused a request (`refused`) or closed while idle.
fn audit_stale(shared: &Arc<Shared>, client: &Arc<str>, generation: Option<u64>, refused: bool) {
    shared
        .metrics
        .tls_stale_connections
        .fetch_add(1, Ordering::Relaxed);
    let now = shared.tls.as_ref().map_or(0, |t| t.generation());
    let ev =
        mayfly_ledger::AuditEvent::new("api.connection_stale", mayfly_ledger::Severity::Notice)
            .field("client", client.to_string())
            .field("action", if refused { "refused" } else { "closed" })
            .field("generation", generation.unwrap_or(0).to_string())
            .field("current_generation", now.to_string());
    let _ = crate::shared::audit_refusal(
        shared,
        client,
        "api.connection_stale",
        "TLS configuration reloaded",
        ev,
    );
}

/// One request on a connection: refused with 421 if the connection's TLS generation is
/// stale (audited once per connection), else routed, with the connection's activity kept.
async fn one_request(
    request: Request<Incoming>,
    shared: &Arc<Shared>,
    client: Arc<str>,
    activity: &Activity,
    audited: &AtomicBool,
    generation: Option<u64>,
) -> hyper::Response<crate::response::Body> {
    if stale(shared, generation) {
        // Authenticated under certificates or CAs no longer in force: the
        // client must connect again (and pass the handshake again). 421 says
        // "not on this connection" (RFC 9110 §15.5.20); the body is unread
        // and the connection closes after the answer.
        drop(request);
        if !audited.swap(true, Ordering::AcqRel) {
            audit_stale(shared, &client, generation, true);
        }
        return error_close(
            421,
            "this connection was authenticated under a TLS configuration \
             replaced since; connect again",
        );
    }
    activity.active.fetch_add(1, Ordering::AcqRel);
    let response = crate::routes::handle(request, client, shared.clone()).await;
    activity.touch();
    activity.active.fetch_sub(1, Ordering::AcqRel);
    response
}

/// hyper's HTTP/1.1 connection settings under the API's limits.
fn http1(limits: &crate::config::Limits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_headers(limits.max_headers)
        .max_header_size(limits.max_header_bytes)
        // The read buffer holds a head and what follows it; hyper's default lets it grow
        // to ~400 KiB per connection. A head's worth plus 8 KiB keeps the worst case per
        // connection near max_header_bytes + max_body.
        .max_buf_size((limits.max_header_bytes + 8192).max(16384))
        .keep_alive(true);
    builder
}

async fn serve<I>(
    io: I,
    client: Arc<str>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    activity: Arc<Activity>,
    generation: Option<u64>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = &shared.config.limits;
    // Audited once per connection: by the request it refuses or by its close.
    let audited = Arc::new(AtomicBool::new(false));
    let service = {
        let (shared, activity, audited, client) = (
            shared.clone(),
            activity.clone(),
            audited.clone(),
            client.clone(),
        );
        hyper::service::service_fn(move |request: Request<Incoming>| {
            let (shared, client, activity, audited) = (
                shared.clone(),
                client.clone(),
                activity.clone(),
                audited.clone(),
            );
            async move {
                Ok::<_, Infallible>(
                    one_request(request, &shared, client, &activity, &audited, generation).await,
                )
            }
        })
    };
    let builder = http1(limits);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let idle = limits.idle_timeout;
    let write_timeout = limits.write_timeout;
    // At least every second: a stale connection (TLS reload) is closed within it.
    let tick =
        (idle.min(write_timeout) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut stopping = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(shared.log, "connection ended with an error"; "error" => %e);
                }
                return;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = tokio::time::sleep(tick) => {
                if activity.active.load(Ordering::Acquire) == 0 && activity.idle_for() >= idle {
                    return;
                }
                if !stopping && stale(shared, generation) {
                    // Closed after the request in progress, if any; at once if idle.
                    stopping = true;
                    if !audited.swap(true, Ordering::AcqRel) {
                        audit_stale(shared, &client, generation, false);
                    }
                    conn.as_mut().graceful_shutdown();
                }
                if activity.write_blocked_for() >= write_timeout {
                    // A client that does not read its answers: dropping the connection
                    // closes it and frees its buffers (a transaction in progress still
                    // ends on its own; its answer is lost, its outcome is not).
                    shared.metrics.write_timeouts.fetch_add(1, Ordering::Relaxed);
                    debug!(shared.log, "response write timed out; connection closed");
                    return;
                }
            }
        }
    }
}
