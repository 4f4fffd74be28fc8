//! PROXY protocol version 2 (binary) on the client API's listener: behind a TCP load
//! balancer every connection comes from the balancer, so the client's own address arrives
//! in a header the balancer writes before the first byte of the client's. Read only from
//! the configured trusted addresses ([`ProxyNet`]); the layout is in docs/formats.md §6.
//!
//! The header is attacker input (anyone who can reach the port when a balancer is
//! misconfigured): it is read with exact reads (never a byte of the stream after it), its
//! length is bounded ([`MAX_PAYLOAD`]) and every field is checked; anything else closes
//! the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

/// The 12 bytes every version 2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Largest address-and-TLV part accepted, bytes (the addresses of TCP over IPv6 take 36;
/// the rest is TLVs, which are skipped).
pub const MAX_PAYLOAD: usize = 512;

/// Most trusted networks in the configuration.
pub const MAX_NETS: usize = 256;

/// Why a header was refused, or the trusted list not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyError {
    /// The first 12 bytes are not the version 2 signature.
    #[error("no PROXY protocol v2 signature")]
    Signature,
    /// The version nibble is not 2, or the command neither LOCAL nor PROXY.
    #[error("PROXY header version/command byte {0:#04x} is not 0x20 (LOCAL) or 0x21 (PROXY)")]
    VersionCommand(u8),
    /// A PROXY command for another family or protocol than TCP over IPv4 or IPv6.
    #[error(
        "PROXY header family/protocol byte {0:#04x} is not 0x11 (TCP/IPv4) or 0x21 (TCP/IPv6)"
    )]
    Family(u8),
    /// The declared length is above [`MAX_PAYLOAD`] or below what the family needs.
    #[error("PROXY header length {len} is not within {min}..={MAX_PAYLOAD}")]
    Length {
        /// The declared length.
        len: usize,
        /// What the family needs.
        min: usize,
    },
    /// The connection ended or failed within the header.
    #[error("reading the PROXY header: {0}")]
    Io(String),
    /// A trusted network that does not parse.
    #[error("trusted proxy {text:?}: {reason}")]
    Net {
        /// The entry as given.
        text: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// More trusted networks than [`MAX_NETS`].
    #[error("{0} trusted proxies given, at most {MAX_NETS}")]
    TooManyNets(usize),
}

/// One trusted network: an address and a prefix length (`10.1.2.3`, `10.0.0.0/8`,
/// `fd00::/8`). An IPv4-mapped IPv6 peer is compared as its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyNet {
    addr: IpAddr,
    prefix: u8,
}

impl ProxyNet {
    /// Parses `ADDR` or `ADDR/PREFIX`.
    pub fn parse(text: &str) -> Result<Self, ProxyError> {
        let bad = |reason| ProxyError::Net {
            text: text.to_owned(),
            reason,
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| bad("not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| bad("prefix length not within 0..=32 (IPv4) or 0..=128 (IPv6)"))?,
        };
        Ok(Self { addr, prefix })
    }

    /// Parses a list (at most [`MAX_NETS`]).
    pub fn parse_all(texts: &[String]) -> Result<Vec<Self>, ProxyError> {
        if texts.len() > MAX_NETS {
            return Err(ProxyError::TooManyNets(texts.len()));
        }
        texts.iter().map(|t| Self::parse(t)).collect()
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for ProxyNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What a header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// `LOCAL`: the proxy's own connection (a health check); the peer address stands.
    Local,
    /// `PROXY`: the client's source address.
    Proxied(SocketAddr),
}

/// Parses the 16 fixed bytes; returns the command's family byte check result and the
/// length of the rest.
fn fixed(head: &[u8; 16]) -> Result<(bool, usize), ProxyError> {
    if head[..12] != SIGNATURE {
        return Err(ProxyError::Signature);
    }
    let local = match head[12] {
        0x20 => true,
        0x21 => false,
        other => return Err(ProxyError::VersionCommand(other)),
    };
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let min = if local {
        0
    } else {
        match head[13] {
            0x11 => 12,
            0x21 => 36,
            other => return Err(ProxyError::Family(other)),
        }
    };
    if len < min || len > MAX_PAYLOAD {
        return Err(ProxyError::Length { len, min });
    }
    Ok((local, len))
}

/// Parses a whole header (16 fixed bytes and the rest); for tests and vectors.
pub fn parse(bytes: &[u8]) -> Result<Header, ProxyError> {
    let head: &[u8; 16] = bytes
        .get(..16)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| ProxyError::Io("shorter than 16 bytes".into()))?;
    let (local, len) = fixed(head)?;
    let rest = bytes
        .get(16..16 + len)
        .ok_or_else(|| ProxyError::Io("shorter than its length".into()))?;
    Ok(addresses(local, head[13], rest))
}

fn addresses(local: bool, family: u8, rest: &[u8]) -> Header {
    if local {
        return Header::Local;
    }
    let port = |at: usize| u16::from_be_bytes([rest[at], rest[at + 1]]);
    if family == 0x11 {
        let ip = Ipv4Addr::new(rest[0], rest[1], rest[2], rest[3]);
        Header::Proxied(SocketAddr::new(IpAddr::V4(ip), port(8)))
    } else {
        let mut octets = [0u8; 16];
        octets.copy_from_slice(&rest[..16]);
        Header::Proxied(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(octets)),
            port(32),
        ))
    }
}

/// Reads one header from `stream`, byte-exact: the 16 fixed bytes, then the declared rest
/// (bounded by [`MAX_PAYLOAD`]); nothing after it.
pub(crate) async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Header, ProxyError> {
    let io = |e: std::io::Error| ProxyError::Io(e.to_string());
    let mut head = [0u8; 16];
    stream.read_exact(&mut head).await.map_err(io)?;
    let (local, len) = fixed(&head)?;
    let mut rest = [0u8; MAX_PAYLOAD];
    let rest = &mut rest[..len];
    stream.read_exact(rest).await.map_err(io)?;
    Ok(addresses(local, head[13], rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../docs/vectors")
            .join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        (0..text.trim().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text.trim()[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn the_documented_vectors_parse_to_their_addresses() {
        assert_eq!(
            parse(&vector("proxy-v2-tcp4.hex")),
            Ok(Header::Proxied("203.0.113.7:51234".parse().unwrap()))
        );
        assert_eq!(
            parse(&vector("proxy-v2-tcp6.hex")),
            Ok(Header::Proxied("[2001:db8::7]:443".parse().unwrap()))
        );
        assert_eq!(parse(&vector("proxy-v2-local.hex")), Ok(Header::Local));
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = vector("proxy-v2-tcp4.hex");
        let mut bad = good.clone();
        bad[3] = b'X';
        assert_eq!(parse(&bad), Err(ProxyError::Signature));
        let mut bad = good.clone();
        bad[12] = 0x11; // version 1
        assert_eq!(parse(&bad), Err(ProxyError::VersionCommand(0x11)));
        let mut bad = good.clone();
        bad[13] = 0x12; // UDP
        assert_eq!(parse(&bad), Err(ProxyError::Family(0x12)));
        let mut bad = good.clone();
        bad[15] = 11; // shorter than TCP/IPv4's addresses
        assert_eq!(parse(&bad), Err(ProxyError::Length { len: 11, min: 12 }));
        let mut bad = good.clone();
        bad[14] = 0xff; // 65,292 bytes declared
        assert!(matches!(parse(&bad), Err(ProxyError::Length { .. })));
        assert!(matches!(parse(&good[..20]), Err(ProxyError::Io(_))));
    }

    #[test]
    fn trusted_networks_match_by_prefix() {
        let net = ProxyNet::parse("10.1.0.0/16").unwrap();
        assert!(net.contains("10.1.200.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.0.9".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let one = ProxyNet::parse("127.0.0.2").unwrap();
        assert!(one.contains("127.0.0.2".parse().unwrap()));
        assert!(!one.contains("127.0.0.1".parse().unwrap()));
        let any6 = ProxyNet::parse("::/0").unwrap();
        assert!(any6.contains("2001:db8::1".parse().unwrap()));
        assert!(!any6.contains("10.0.0.1".parse().unwrap()));
        assert!(ProxyNet::parse("10.0.0.0/33").is_err());
        assert!(ProxyNet::parse("proxy.example").is_err());
        let many = vec!["10.0.0.1".to_owned(); MAX_NETS + 1];
        assert_eq!(
            ProxyNet::parse_all(&many),
            Err(ProxyError::TooManyNets(MAX_NETS + 1))
        );
    }
}
