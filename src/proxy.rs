//! The PROXY protocol header (HAProxy's doc/proxy-protocol.txt, versions 1 and 2) that a
//! balancer sends before the client's own bytes, naming the client it forwards.
//!
//! Owns reading and checking the header over any `Read`: the version is detected from the
//! first bytes, every read is bounded (v1 at most 107 bytes, v2 at most 16 bytes plus a
//! declared length of at most [`V2_MAX_LEN`]), and nothing past the header's last byte is
//! ever read, so the QMQP request that follows stays in the connection. Does not decide
//! which peers may send a header or what the server does with it (that is `server`).

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The longest v1 header, `\r\n` included.
pub const V1_MAX_LEN: usize = 107;
/// The v2 signature: the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The largest v2 address-and-TLV block accepted (the header declares up to 65535; what
/// HAProxy sends is a few hundred bytes even with every TLV it knows).
pub const V2_MAX_LEN: usize = 4096;

/// What a valid header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// The balancer forwarded a connection from `source` (the client) to `destination`.
    Proxied {
        version: u8,
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// A v2 `LOCAL` command: the balancer speaks for itself (its health check); the
    /// connection's own peer is the client.
    Local,
    /// A connection of a kind without an IP address (v1 `UNKNOWN`, v2 `UNSPEC` or `AF_UNIX`):
    /// the connection's own peer stays the client.
    Unknown { version: u8, family: &'static str },
}

/// Why no valid header could be read.
#[derive(Debug)]
pub enum ProxyError {
    /// Reading failed (a timeout included).
    Io(io::Error),
    /// The connection ended before its first byte (a balancer's plain TCP check does that).
    Closed,
    /// The connection ended inside the header.
    Eof,
    /// The connection does not start with a PROXY signature.
    Missing { first: Vec<u8> },
    /// A header that breaks the protocol.
    Malformed(String),
    /// A v1 header without `\r\n` within its limit, or a v2 length above [`V2_MAX_LEN`].
    TooLong { limit: usize },
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::Io(e) if e.kind() == io::ErrorKind::TimedOut => {
                write!(f, "timeout while reading the PROXY header")
            }
            ProxyError::Io(e) => write!(f, "cannot read the PROXY header: {e}"),
            ProxyError::Closed => write!(f, "lost connection before the PROXY header"),
            ProxyError::Eof => write!(f, "lost connection while reading the PROXY header"),
            ProxyError::Missing { first } => write!(
                f,
                "no PROXY header: the connection starts with {:?}",
                crate::logging::sanitize(first)
            ),
            ProxyError::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
            ProxyError::TooLong { limit } => {
                write!(f, "PROXY header longer than {limit} bytes")
            }
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProxyError::Io(e) => Some(e),
            _ => None,
        }
    }
}

fn malformed(why: impl Into<String>) -> ProxyError {
    ProxyError::Malformed(why.into())
}

/// Fills `buf` completely; `Eof` when the connection ends first.
fn read_full<R: Read>(rdr: &mut R, buf: &mut [u8]) -> Result<(), ProxyError> {
    rdr.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => ProxyError::Eof,
        _ => ProxyError::Io(e),
    })
}

/// Reads one PROXY header, v1 or v2, and not one byte more.
pub fn read_header<R: Read>(rdr: &mut R) -> Result<Header, ProxyError> {
    // The shortest valid header ("PROXY UNKNOWN\r\n", 15 bytes) is longer than the v2
    // signature, so 12 bytes can always be read before deciding; the first one alone
    // already tells a client that sends no header at all.
    let mut start = [0u8; 12];
    read_full(rdr, &mut start[..1]).map_err(|e| match e {
        ProxyError::Eof => ProxyError::Closed,
        other => other,
    })?;
    if start[0] != b'P' && start[0] != b'\r' {
        return Err(ProxyError::Missing {
            first: start[..1].to_vec(),
        });
    }
    read_full(rdr, &mut start[1..])?;
    if start == V2_SIGNATURE {
        read_v2(rdr)
    } else if start.starts_with(b"PROXY ") {
        read_v1(rdr, &start)
    } else {
        Err(ProxyError::Missing {
            first: start.to_vec(),
        })
    }
}

/// Reads the rest of a v1 header whose first bytes are `start`, up to its `\r\n`.
fn read_v1<R: Read>(rdr: &mut R, start: &[u8]) -> Result<Header, ProxyError> {
    let mut line = Vec::with_capacity(V1_MAX_LEN);
    line.extend_from_slice(start);
    // Byte by byte: the request follows the `\n` at once, and none of it may be taken.
    while !line.ends_with(b"\n") {
        if line.len() >= V1_MAX_LEN {
            return Err(ProxyError::TooLong { limit: V1_MAX_LEN });
        }
        let mut byte = [0u8; 1];
        read_full(rdr, &mut byte)?;
        line.push(byte[0]);
    }
    parse_v1(&line)
}

/// Parses a whole v1 line, `PROXY ... \r\n`.
pub fn parse_v1(line: &[u8]) -> Result<Header, ProxyError> {
    if line.len() > V1_MAX_LEN {
        return Err(ProxyError::TooLong { limit: V1_MAX_LEN });
    }
    let text = line
        .strip_suffix(b"\r\n")
        .ok_or_else(|| malformed("v1 line does not end with CRLF"))?;
    let text = std::str::from_utf8(text).map_err(|_| malformed("v1 line is not ASCII"))?;
    if !text.is_ascii() || text.bytes().any(|b| b.is_ascii_control()) {
        return Err(malformed("v1 line holds control characters"));
    }
    let rest = text
        .strip_prefix("PROXY ")
        .ok_or_else(|| malformed("v1 line does not start with \"PROXY \""))?;
    let mut words = rest.split(' ');
    let family = words.next().unwrap_or_default();
    let v6 = match family {
        // Whatever follows UNKNOWN is ignored (the spec's words).
        "UNKNOWN" => {
            return Ok(Header::Unknown {
                version: 1,
                family: "UNKNOWN",
            });
        }
        "TCP4" => false,
        "TCP6" => true,
        other => {
            return Err(malformed(format!(
                "v1 protocol {:?} is none of TCP4, TCP6, UNKNOWN",
                crate::logging::sanitize(other.as_bytes())
            )));
        }
    };
    let fields: Vec<&str> = words.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(malformed(format!(
            "v1 {family} line has {} fields after the protocol, not 4",
            fields.len()
        )));
    };
    let address = |text: &str| -> Result<IpAddr, ProxyError> {
        let bad = || {
            malformed(format!(
                "v1 {family} address {:?} is invalid",
                crate::logging::sanitize(text.as_bytes())
            ))
        };
        if v6 {
            text.parse::<Ipv6Addr>().map(IpAddr::V6).map_err(|_| bad())
        } else {
            text.parse::<Ipv4Addr>().map(IpAddr::V4).map_err(|_| bad())
        }
    };
    let source = SocketAddr::new(address(src)?, parse_v1_port(sport)?);
    let destination = SocketAddr::new(address(dst)?, parse_v1_port(dport)?);
    Ok(Header::Proxied {
        version: 1,
        source,
        destination,
    })
}

/// A v1 port: 1 to 5 decimal digits, no leading zero, at most 65535.
fn parse_v1_port(text: &str) -> Result<u16, ProxyError> {
    let bad = || {
        malformed(format!(
            "v1 port {:?} is invalid",
            crate::logging::sanitize(text.as_bytes())
        ))
    };
    if text.is_empty()
        || text.len() > 5
        || !text.bytes().all(|b| b.is_ascii_digit())
        || (text.len() > 1 && text.starts_with('0'))
    {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

/// Reads the rest of a v2 header after its signature: 4 fixed bytes, then exactly the
/// declared length.
fn read_v2<R: Read>(rdr: &mut R) -> Result<Header, ProxyError> {
    let mut fixed = [0u8; 4];
    read_full(rdr, &mut fixed)?;
    let [ver_cmd, family, hi, lo] = fixed;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    check_v2_fixed(ver_cmd, family)?;
    if len > V2_MAX_LEN {
        return Err(ProxyError::TooLong {
            limit: 16 + V2_MAX_LEN,
        });
    }
    let mut block = vec![0u8; len];
    read_full(rdr, &mut block)?;
    parse_v2_block(ver_cmd, family, &block)
}

/// Checks the version/command and family/transport bytes of a v2 header.
fn check_v2_fixed(ver_cmd: u8, family: u8) -> Result<(), ProxyError> {
    if ver_cmd >> 4 != 2 {
        return Err(malformed(format!("v2 version {} is not 2", ver_cmd >> 4)));
    }
    if ver_cmd & 0x0f > 1 {
        return Err(malformed(format!(
            "v2 command {} is neither LOCAL nor PROXY",
            ver_cmd & 0x0f
        )));
    }
    if family >> 4 > 3 || family & 0x0f > 2 {
        return Err(malformed(format!("v2 family/transport byte {family:#04x}")));
    }
    Ok(())
}

/// Parses a whole v2 header (signature, fixed part and block), for tests and the fuzzer.
pub fn parse_v2(header: &[u8]) -> Result<Header, ProxyError> {
    let rest = header
        .strip_prefix(&V2_SIGNATURE[..])
        .ok_or_else(|| ProxyError::Missing {
            first: header.iter().take(12).copied().collect(),
        })?;
    let [ver_cmd, family, hi, lo, ref block @ ..] = *rest else {
        return Err(ProxyError::Eof);
    };
    check_v2_fixed(ver_cmd, family)?;
    let len = usize::from(u16::from_be_bytes([hi, lo]));
    if len > V2_MAX_LEN {
        return Err(ProxyError::TooLong {
            limit: 16 + V2_MAX_LEN,
        });
    }
    match block.len().cmp(&len) {
        std::cmp::Ordering::Less => Err(ProxyError::Eof),
        std::cmp::Ordering::Greater => Err(malformed("bytes after the v2 header")),
        std::cmp::Ordering::Equal => parse_v2_block(ver_cmd, family, block),
    }
}

/// Interprets the address block of a v2 header; TLVs after the addresses are ignored.
fn parse_v2_block(ver_cmd: u8, family: u8, block: &[u8]) -> Result<Header, ProxyError> {
    // LOCAL: the receiver must ignore the address block, whatever it holds.
    if ver_cmd & 0x0f == 0 {
        return Ok(Header::Local);
    }
    let short = |need: usize| {
        malformed(format!(
            "v2 address block of {} bytes is shorter than {need}",
            block.len()
        ))
    };
    match family >> 4 {
        0 => Ok(Header::Unknown {
            version: 2,
            family: "UNSPEC",
        }),
        1 => {
            let Some(&[a, b, c, d, e, f, g, h, sp0, sp1, dp0, dp1]) = block.first_chunk::<12>()
            else {
                return Err(short(12));
            };
            Ok(Header::Proxied {
                version: 2,
                source: SocketAddr::new(
                    Ipv4Addr::new(a, b, c, d).into(),
                    u16::from_be_bytes([sp0, sp1]),
                ),
                destination: SocketAddr::new(
                    Ipv4Addr::new(e, f, g, h).into(),
                    u16::from_be_bytes([dp0, dp1]),
                ),
            })
        }
        2 => {
            let Some(addrs) = block.first_chunk::<36>() else {
                return Err(short(36));
            };
            let (src, rest) = addrs.split_at(16);
            let (dst, ports) = rest.split_at(16);
            let ip = |bytes: &[u8]| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(bytes);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |i: usize| u16::from_be_bytes([ports[i], ports[i + 1]]);
            Ok(Header::Proxied {
                version: 2,
                source: SocketAddr::new(ip(src), port(0)),
                destination: SocketAddr::new(ip(dst), port(2)),
            })
        }
        _ => {
            if block.len() < 216 {
                return Err(short(216));
            }
            Ok(Header::Unknown {
                version: 2,
                family: "AF_UNIX",
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that counts what was taken, to prove nothing past the header is read.
    fn read_counted(bytes: &[u8]) -> (Result<Header, ProxyError>, usize) {
        let mut cursor = io::Cursor::new(bytes);
        let result = read_header(&mut cursor);
        (result, usize::try_from(cursor.position()).unwrap())
    }

    fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(ver_cmd);
        h.push(family);
        h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
        h.extend_from_slice(block);
        h
    }

    fn sa(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn read_header_v1_tcp4_stops_at_crlf() {
        let header = b"PROXY TCP4 192.0.2.7 203.0.113.1 56324 628\r\n";
        let mut input = header.to_vec();
        input.extend_from_slice(b"17:2:x\n,3:s@x,3:r@x,,");
        let (result, used) = read_counted(&input);
        assert_eq!(
            result.unwrap(),
            Header::Proxied {
                version: 1,
                source: sa("192.0.2.7:56324"),
                destination: sa("203.0.113.1:628"),
            }
        );
        assert_eq!(used, header.len());
    }

    #[test]
    fn read_header_v1_tcp6_and_unknown() {
        let (result, _) = read_counted(b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 628\r\n");
        assert_eq!(
            result.unwrap(),
            Header::Proxied {
                version: 1,
                source: sa("[2001:db8::7]:65535"),
                destination: sa("[2001:db8::1]:628"),
            }
        );
        let (result, used) = read_counted(b"PROXY UNKNOWN ff:: 1.2.3.4 1 2\r\nrest");
        assert_eq!(
            result.unwrap(),
            Header::Unknown {
                version: 1,
                family: "UNKNOWN"
            }
        );
        assert_eq!(used, 32);
        let (result, _) = read_counted(b"PROXY UNKNOWN\r\n");
        assert!(matches!(result, Ok(Header::Unknown { .. })));
    }

    #[test]
    fn read_header_v1_rejects_bad_fields() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 203.0.113.1 56324\r\n"[..],
            b"PROXY TCP4 192.0.2.7 203.0.113.1 56324 628 9\r\n",
            b"PROXY TCP4 2001:db8::1 203.0.113.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.1 65536 628\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.1 0628 628\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.1 +1 628\r\n",
            b"PROXY TCP4  192.0.2.7 203.0.113.1 1 628\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.1 1 628\n",
            b"PROXY UDP4 192.0.2.7 203.0.113.1 1 628\r\n",
            b"PROXY TCP4 192.0.2.7 203.0.113.1 1 628\x00\r\n",
        ] {
            let (result, _) = read_counted(bad);
            assert!(
                matches!(result, Err(ProxyError::Malformed(_))),
                "{:?}: {result:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn read_header_v1_stops_at_107_bytes() {
        let mut long = b"PROXY UNKNOWN ".to_vec();
        long.resize(200, b'x');
        let (result, used) = read_counted(&long);
        assert!(matches!(result, Err(ProxyError::TooLong { limit: 107 })));
        assert_eq!(used, V1_MAX_LEN);
        // Exactly 107 bytes is still a header.
        let mut max = b"PROXY UNKNOWN ".to_vec();
        max.resize(105, b'x');
        max.extend_from_slice(b"\r\n");
        assert!(matches!(read_counted(&max).0, Ok(Header::Unknown { .. })));
    }

    #[test]
    fn read_header_refuses_a_missing_header_at_the_first_byte() {
        let (result, used) = read_counted(b"17:2:x\n,3:s@x,3:r@x,,");
        assert!(matches!(result, Err(ProxyError::Missing { ref first }) if first == b"1"));
        assert_eq!(used, 1);
        let (result, _) = read_counted(b"PROXZ TCP4 1.2.3.4 1.2.3.4 1 2\r\n");
        assert!(matches!(result, Err(ProxyError::Missing { .. })));
        assert!(matches!(read_counted(b"").0, Err(ProxyError::Closed)));
        assert!(matches!(read_counted(b"P").0, Err(ProxyError::Eof)));
        assert!(matches!(
            read_counted(b"PROXY TCP4").0,
            Err(ProxyError::Eof)
        ));
        assert!(matches!(
            read_counted(b"PROXY TCP4 1.2.3.4 ").0,
            Err(ProxyError::Eof)
        ));
    }

    #[test]
    fn read_header_v2_inet_ignores_tlvs_and_reads_no_further() {
        let mut block = vec![192, 0, 2, 7, 203, 0, 113, 1, 0xdc, 0x04, 0x02, 0x74];
        // A TLV (PP2_TYPE_UNIQUE_ID) the server does not use.
        block.extend_from_slice(&[0x05, 0x00, 0x03, b'a', b'b', b'c']);
        let header = v2(0x21, 0x11, &block);
        let mut input = header.clone();
        input.extend_from_slice(b"17:2:x\n,");
        let (result, used) = read_counted(&input);
        assert_eq!(
            result.unwrap(),
            Header::Proxied {
                version: 2,
                source: sa("192.0.2.7:56324"),
                destination: sa("203.0.113.1:628"),
            }
        );
        assert_eq!(used, header.len());
        assert_eq!(parse_v2(&header).unwrap(), read_counted(&header).0.unwrap());
    }

    #[test]
    fn read_header_v2_inet6_local_unspec_unix() {
        let mut block = Vec::new();
        block.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        block.extend_from_slice(&[0x00, 0x50, 0x02, 0x74]);
        assert_eq!(
            read_counted(&v2(0x21, 0x21, &block)).0.unwrap(),
            Header::Proxied {
                version: 2,
                source: sa("[2001:db8::7]:80"),
                destination: sa("[2001:db8::1]:628"),
            }
        );
        // LOCAL ignores whatever address block it carries.
        assert_eq!(read_counted(&v2(0x20, 0x00, &[])).0.unwrap(), Header::Local);
        assert_eq!(
            read_counted(&v2(0x20, 0x11, &[1, 2, 3])).0.unwrap(),
            Header::Local
        );
        assert_eq!(
            read_counted(&v2(0x21, 0x00, &[])).0.unwrap(),
            Header::Unknown {
                version: 2,
                family: "UNSPEC"
            }
        );
        assert_eq!(
            read_counted(&v2(0x21, 0x31, &[0; 216])).0.unwrap(),
            Header::Unknown {
                version: 2,
                family: "AF_UNIX"
            }
        );
    }

    #[test]
    fn read_header_v2_rejects_bad_fixed_bytes_and_short_blocks() {
        for (ver_cmd, family, block) in [
            (0x11, 0x11, &[0u8; 12][..]),
            (0x22, 0x11, &[0; 12]),
            (0x21, 0x41, &[0; 12]),
            (0x21, 0x13, &[0; 12]),
            (0x21, 0x11, &[0; 11]),
            (0x21, 0x21, &[0; 35]),
            (0x21, 0x31, &[0; 100]),
        ] {
            let (result, _) = read_counted(&v2(ver_cmd, family, block));
            assert!(
                matches!(result, Err(ProxyError::Malformed(_))),
                "{ver_cmd:#x} {family:#x} {}: {result:?}",
                block.len()
            );
        }
    }

    #[test]
    fn read_header_v2_caps_the_declared_length_before_reading() {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        header.extend_from_slice(&[0; 64]);
        let (result, used) = read_counted(&header);
        assert!(matches!(result, Err(ProxyError::TooLong { .. })));
        assert_eq!(used, 16);
        // A declared length the connection does not deliver.
        let mut short = v2(0x21, 0x11, &[0; 12]);
        short.truncate(20);
        assert!(matches!(read_counted(&short).0, Err(ProxyError::Eof)));
    }

    #[test]
    fn proxy_error_display_names_the_problem() {
        let e = read_counted(b"17:").0.unwrap_err();
        assert_eq!(
            e.to_string(),
            "no PROXY header: the connection starts with \"1\""
        );
        let timeout = ProxyError::Io(io::ErrorKind::TimedOut.into());
        assert_eq!(
            timeout.to_string(),
            "timeout while reading the PROXY header"
        );
    }
}
