//! Connections to one collector, with blocking I/O.
//!
//! ```text
//! UDP  one datagram per message (RFC 5426), no framing:   <PRI>1 ...
//! TCP  octet counting (RFC 6587 §3.4.1):                  MSG-LEN SP SYSLOG-MSG ...
//!      MSG-LEN = decimal byte count of SYSLOG-MSG, no leading zeros
//! TLS  the same frames inside TLS records (RFC 5425 §4.3)
//! ```
//!
//! A batch is one `write_all` of all its frames and a flush. A write that returns only
//! says the kernel took the bytes; [`Connection::check_open`] then tells whether the
//! collector has since closed or reset the connection (TCP FIN/RST, a TLS close_notify
//! or alert, or for UDP a queued ICMP port-unreachable). The exporter uses both to decide
//! when events count as delivered (see the crate docs).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};

use crate::config::{CollectorConfig, TransportKind};

/// How long connecting, the TLS handshake and one write may block.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a connection could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The address did not resolve.
    #[error("resolving {address}: {source}")]
    Resolve {
        /// As configured.
        address: String,
        /// The resolver's error.
        source: io::Error,
    },
    /// Connecting (or binding the UDP socket) failed on every resolved address.
    #[error("connecting to {address}: {source}")]
    Connect {
        /// As configured.
        address: String,
        /// The last error.
        source: io::Error,
    },
    /// The TLS server name is not a DNS name or an IP address.
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    /// The TLS handshake failed (certificate not trusted, wrong name, refused client
    /// certificate, ...).
    #[error("TLS handshake with {address}: {source}")]
    Handshake {
        /// As configured.
        address: String,
        /// What failed.
        source: io::Error,
    },
    /// Writing or flushing failed.
    #[error("write: {0}")]
    Write(io::Error),
    /// A datagram went out shorter than the message.
    #[error("datagram of {len} bytes sent as {sent}")]
    ShortDatagram {
        /// Message length.
        len: usize,
        /// Bytes sent.
        sent: usize,
    },
    /// The collector closed the connection.
    #[error("collector closed the connection")]
    PeerClosed,
    /// The collector reset the connection or (UDP) is not listening.
    #[error("collector unreachable: {0}")]
    Unreachable(io::Error),
}

/// An open connection.
pub enum Connection {
    /// Connected UDP socket.
    Udp(UdpSocket),
    /// TCP stream.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Udp(_) => "Connection::Udp",
            Self::Tcp(_) => "Connection::Tcp",
            Self::Tls(_) => "Connection::Tls",
        })
    }
}

fn resolve(address: &str) -> Result<Vec<SocketAddr>, TransportError> {
    let addrs: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|source| TransportError::Resolve {
            address: address.into(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(TransportError::Resolve {
            address: address.into(),
            source: io::Error::new(io::ErrorKind::NotFound, "no address"),
        });
    }
    Ok(addrs)
}

fn tcp(address: &str) -> Result<TcpStream, TransportError> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    for addr in resolve(address)? {
        match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Ok(s) => {
                let setup = s
                    .set_nodelay(true)
                    .and_then(|()| s.set_write_timeout(Some(IO_TIMEOUT)))
                    .and_then(|()| s.set_read_timeout(Some(IO_TIMEOUT)));
                match setup {
                    Ok(()) => return Ok(s),
                    Err(e) => last = e,
                }
            }
            Err(e) => last = e,
        }
    }
    Err(TransportError::Connect {
        address: address.into(),
        source: last,
    })
}

impl Connection {
    /// Connects to collector `c`; `tls` is its client configuration when the transport is
    /// TLS. Blocks at most about [`IO_TIMEOUT`] per address (and once more for a handshake).
    pub fn open(
        c: &CollectorConfig,
        tls: Option<&Arc<ClientConfig>>,
    ) -> Result<Self, TransportError> {
        match (c.transport, tls) {
            (TransportKind::Udp, _) => {
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
                for addr in resolve(&c.address)? {
                    let local: SocketAddr = if addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                    };
                    match UdpSocket::bind(local).and_then(|s| s.connect(addr).map(|()| s)) {
                        Ok(s) => return Ok(Self::Udp(s)),
                        Err(e) => last = e,
                    }
                }
                Err(TransportError::Connect {
                    address: c.address.clone(),
                    source: last,
                })
            }
            (TransportKind::Tcp, _) => Ok(Self::Tcp(tcp(&c.address)?)),
            (TransportKind::Tls, Some(config)) => {
                let name = c
                    .server_name
                    .clone()
                    .or_else(|| c.host().map(str::to_owned))
                    .unwrap_or_default();
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|_| TransportError::ServerName(name))?;
                let mut sock = tcp(&c.address)?;
                let mut conn = ClientConnection::new(config.clone(), server_name).map_err(|e| {
                    TransportError::Handshake {
                        address: c.address.clone(),
                        source: io::Error::other(e),
                    }
                })?;
                // The handshake's round trips; each read or write is bounded by the socket
                // timeouts, and the handshake has a handful of flights.
                for _ in 0..16 {
                    if !conn.is_handshaking() {
                        break;
                    }
                    conn.complete_io(&mut sock)
                        .map_err(|source| TransportError::Handshake {
                            address: c.address.clone(),
                            source,
                        })?;
                }
                if conn.is_handshaking() {
                    return Err(TransportError::Handshake {
                        address: c.address.clone(),
                        source: io::Error::new(io::ErrorKind::TimedOut, "handshake did not end"),
                    });
                }
                Ok(Self::Tls(Box::new(StreamOwned::new(conn, sock))))
            }
            (TransportKind::Tls, None) => Err(TransportError::Handshake {
                address: c.address.clone(),
                source: io::Error::other("no TLS configuration"),
            }),
        }
    }

    /// Sends `messages` as one batch: frames written and flushed (TCP, TLS), or one
    /// datagram each (UDP).
    pub fn send(
        &mut self,
        messages: &[String],
        frames: &mut Vec<u8>,
    ) -> Result<(), TransportError> {
        match self {
            Self::Udp(sock) => {
                for m in messages {
                    let sent = sock.send(m.as_bytes()).map_err(|e| {
                        if e.kind() == io::ErrorKind::ConnectionRefused {
                            TransportError::Unreachable(e)
                        } else {
                            TransportError::Write(e)
                        }
                    })?;
                    if sent != m.len() {
                        return Err(TransportError::ShortDatagram { len: m.len(), sent });
                    }
                }
                Ok(())
            }
            Self::Tcp(stream) => {
                octet_count(messages, frames);
                stream.write_all(frames).map_err(TransportError::Write)?;
                stream.flush().map_err(TransportError::Write)
            }
            Self::Tls(stream) => {
                octet_count(messages, frames);
                stream.write_all(frames).map_err(TransportError::Write)?;
                stream.flush().map_err(TransportError::Write)
            }
        }
    }

    /// Whether the collector has, as far as this host can tell without blocking, kept the
    /// connection open: `Err` if it closed or reset it (TCP, TLS), or if an ICMP error
    /// came back for an earlier datagram (UDP). Reads and drops anything the collector
    /// sent (TLS session tickets; syslog collectors send nothing else).
    pub fn check_open(&mut self) -> Result<(), TransportError> {
        let mut buf = [0u8; 4096];
        match self {
            Self::Udp(sock) => {
                nonblocking(sock.set_nonblocking(true))?;
                let r = (|| {
                    for _ in 0..64 {
                        match sock.recv(&mut buf) {
                            Ok(_) => continue,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) => return Err(TransportError::Unreachable(e)),
                        }
                    }
                    Ok(())
                })();
                nonblocking(sock.set_nonblocking(false))?;
                r
            }
            Self::Tcp(stream) => {
                nonblocking(stream.set_nonblocking(true))?;
                let r = (|| {
                    for _ in 0..64 {
                        match stream.read(&mut buf) {
                            Ok(0) => return Err(TransportError::PeerClosed),
                            Ok(_) => continue,
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) => return Err(TransportError::Unreachable(e)),
                        }
                    }
                    Ok(())
                })();
                nonblocking(stream.set_nonblocking(false))?;
                r
            }
            Self::Tls(stream) => {
                nonblocking(stream.sock.set_nonblocking(true))?;
                let r = (|| {
                    for _ in 0..64 {
                        match stream.conn.read_tls(&mut stream.sock) {
                            Ok(0) => return Err(TransportError::PeerClosed),
                            Ok(_) => {
                                let state = stream.conn.process_new_packets().map_err(|e| {
                                    TransportError::Unreachable(io::Error::other(e))
                                })?;
                                if state.peer_has_closed() {
                                    return Err(TransportError::PeerClosed);
                                }
                                // Application data from a syslog collector is unexpected:
                                // drop it.
                                let mut plain = stream.conn.reader();
                                for _ in 0..64 {
                                    match plain.read(&mut buf) {
                                        Ok(n) if n > 0 => continue,
                                        _ => break,
                                    }
                                }
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                            Err(e) => return Err(TransportError::Unreachable(e)),
                        }
                    }
                    Ok(())
                })();
                nonblocking(stream.sock.set_nonblocking(false))?;
                r
            }
        }
    }
}

fn nonblocking(r: io::Result<()>) -> Result<(), TransportError> {
    r.map_err(TransportError::Unreachable)
}

/// Appends the RFC 6587 octet-counted frames of `messages` to a cleared `out`.
pub fn octet_count(messages: &[String], out: &mut Vec<u8>) {
    out.clear();
    for m in messages {
        out.extend_from_slice(m.len().to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(m.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn octet_counting_frames() {
        let mut out = Vec::new();
        octet_count(&["<13>1 - - - - - -".into(), "é".into()], &mut out);
        assert_eq!(out, "17 <13>1 - - - - - -2 é".as_bytes());
    }

    #[test]
    fn tcp_peer_close_is_seen() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let c = CollectorConfig::new("t", TransportKind::Tcp, &addr);
        let mut conn = Connection::open(&c, None).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        conn.send(&["<13>1 - - - - - - hi".into()], &mut Vec::new())
            .unwrap();
        let mut got = [0u8; 23];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"20 <13>1 - - - - - - hi");
        conn.check_open().unwrap();
        drop(server);
        // The FIN arrives asynchronously: poll for it with a deadline.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match conn.check_open() {
                Err(TransportError::PeerClosed) => break,
                Err(e) => panic!("unexpected {e}"),
                Ok(()) => assert!(std::time::Instant::now() < deadline, "close not seen"),
            }
            std::thread::yield_now();
        }
    }

    #[test]
    fn udp_port_unreachable_is_seen() {
        // Bind and drop a socket to get a loopback port nobody listens on.
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = CollectorConfig::new("u", TransportKind::Udp, &format!("127.0.0.1:{port}"));
        let mut conn = Connection::open(&c, None).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = conn
                .send(&["<13>1 - - - - - -".into()], &mut Vec::new())
                .and_then(|()| conn.check_open());
            if let Err(TransportError::Unreachable(_)) = r {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "ICMP error not seen: {r:?}"
            );
            std::thread::yield_now();
        }
    }
}
