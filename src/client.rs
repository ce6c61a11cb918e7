//! The QMQP client: encodes one request, streams it to a server and reads the reply.
//!
//! Used by `qmqpc`, by `qmqp-queue`'s relay, by the tests and by the benchmarks. It owns the
//! client side of the protocol only (request encoding, reply parsing, finding and connecting
//! to a server); the server side is `session`'s. The message is streamed from any `Read` in
//! constant memory, whatever its size.

use std::fmt;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::netstring::{self, NetstringError, encoded_len};

/// The QMQP port (cr.yp.to/proto/qmqp.html).
pub(crate) const DEFAULT_PORT: u16 = 628;

/// The longest reply payload `send` accepts, in bytes.
pub const MAX_REPLY_LEN: u64 = 64 * 1024;
/// Read buffer for the reply's payload: a whole ordinary reply in one read.
const REPLY_BUFFER: usize = 1024;

/// The reply's class: the crate's one K/Z/D type, named here too for the client's users.
pub use crate::reply::Status;

/// The server's reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The class given by the first byte.
    pub status: Status,
    /// The text after the status letter (lossily decoded as UTF-8).
    pub text: String,
}

impl fmt::Display for Reply {
    /// The reply line: the status letter then the text, control characters escaped so a
    /// server cannot write to the user's terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.status.letter())?;
        for c in self.text.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

/// Why a request got no valid reply.
#[derive(Debug)]
pub enum ClientError {
    /// Reading the message, writing the request or reading the reply failed.
    Io(io::Error),
    /// The server answered something that is not a QMQP reply; holds why, quoting it.
    BadReply(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "{e}"),
            ClientError::BadReply(why) => write!(f, "bad reply from server: {why}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Display already shows the I/O error itself: skip it so chains do not repeat it.
            ClientError::Io(e) => e.source(),
            ClientError::BadReply(_) => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

/// Length in bytes of a slice, as u64.
fn byte_len(bytes: &[u8]) -> Option<u64> {
    u64::try_from(bytes.len()).ok()
}

/// The payload length of the outer netstring: the message, sender and recipient netstrings.
fn request_len(message_len: u64, sender: &[u8], recipients: &[&[u8]]) -> Option<u64> {
    let mut total = encoded_len(message_len)?.checked_add(encoded_len(byte_len(sender)?)?)?;
    for rcpt in recipients {
        total = total.checked_add(encoded_len(byte_len(rcpt)?)?)?;
    }
    Some(total)
}

/// Writes the whole request, copying exactly `message_len` bytes of `message`.
fn write_request<W: Write, M: Read>(
    wtr: &mut W,
    message: &mut M,
    message_len: u64,
    sender: &[u8],
    recipients: &[&[u8]],
) -> Result<(), ClientError> {
    let total = request_len(message_len, sender, recipients).ok_or_else(|| {
        ClientError::Io(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("request too long: message of {message_len} bytes"),
        ))
    })?;
    netstring::write_len(wtr, total)?;
    netstring::write_len(wtr, message_len)?;
    let copied = io::copy(&mut message.take(message_len), wtr)?;
    if copied != message_len {
        return Err(ClientError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("message ended after {copied} of {message_len} bytes"),
        )));
    }
    wtr.write_all(b",")?;
    netstring::write_netstring(wtr, sender)?;
    for rcpt in recipients {
        netstring::write_netstring(wtr, rcpt)?;
    }
    wtr.write_all(b",")?;
    wtr.flush()?;
    Ok(())
}

/// Quotes reply bytes for an error message, at most the first 200 of them.
fn quote(bytes: &[u8]) -> String {
    const SHOWN: usize = 200;
    match bytes.get(..SHOWN) {
        Some(head) if bytes.len() > SHOWN => format!("\"{}\"...", head.escape_ascii()),
        _ => format!("\"{}\"", bytes.escape_ascii()),
    }
}

/// A reader that keeps every byte consumed through it, so errors can quote the reply.
struct Recorded<R> {
    rdr: BufReader<R>,
    seen: Vec<u8>,
}

impl<R: Read> Read for Recorded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.rdr.read(buf)?;
        self.seen
            .extend_from_slice(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

impl<R: Read> BufRead for Recorded<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.rdr.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        let buf = self.rdr.buffer();
        self.seen.extend_from_slice(buf.get(..n).unwrap_or(buf));
        self.rdr.consume(n);
    }
}

impl<R> Recorded<R> {
    /// The reply ended early: nothing at all is an I/O error, a part of one a bad reply.
    fn lost(&self, e: NetstringError) -> ClientError {
        match e {
            NetstringError::Lost(e) if e.kind() != io::ErrorKind::UnexpectedEof => {
                ClientError::Io(e)
            }
            NetstringError::Timeout(e) => ClientError::Io(e),
            _ if self.seen.is_empty() => ClientError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed without a reply",
            )),
            _ => ClientError::BadReply(format!("truncated reply {}", quote(&self.seen))),
        }
    }

    /// Why the reply's `LEN:` could not be read.
    fn bad_len(&self, e: NetstringError) -> ClientError {
        let seen = &self.seen;
        let why = match e {
            NetstringError::Lost(_) | NetstringError::Timeout(_) => return self.lost(e),
            NetstringError::Format if matches!(seen.as_slice(), [b'0', digit, ..] if digit.is_ascii_digit()) => {
                "reply length has a leading zero"
            }
            NetstringError::Format if seen.is_empty() || !seen.iter().all(u8::is_ascii_digit) => {
                "reply is not a netstring"
            }
            // All digits, and more of them than the limit allows.
            NetstringError::Format | NetstringError::Overflow => {
                return too_long(seen);
            }
        };
        ClientError::BadReply(format!("{why}: {}", quote(seen)))
    }
}

/// A reply length over [`MAX_REPLY_LEN`].
fn too_long(seen: &[u8]) -> ClientError {
    ClientError::BadReply(format!(
        "reply longer than {MAX_REPLY_LEN} bytes: {}",
        quote(seen)
    ))
}

/// Reads the reply netstring (payload at most [`MAX_REPLY_LEN`] bytes) and classifies it.
/// Never reads past the reply's `,`.
pub fn read_reply<R: Read>(rdr: &mut R) -> Result<Reply, ClientError> {
    // The length one byte a read, so nothing after the `:` is taken; enough budget for the
    // longest allowed `LEN:`, so a longer length stops at once.
    let mut head = Recorded {
        rdr: BufReader::with_capacity(1, &mut *rdr),
        seen: Vec::new(),
    };
    let mut budget = netstring::len_prefix_size(MAX_REPLY_LEN);
    let len = match netstring::read_len(&mut head, Some(&mut budget)) {
        Ok(len) if len <= MAX_REPLY_LEN => len,
        Ok(_) => return Err(too_long(&head.seen)),
        Err(e) => return Err(head.bad_len(e)),
    };
    // Then exactly the payload and its `,`.
    let rest = len + 1;
    let mut body = Recorded {
        seen: head.seen,
        rdr: BufReader::with_capacity(REPLY_BUFFER, rdr.take(rest)),
    };
    let mut payload = Vec::new();
    // Bounded by MAX_REPLY_LEN just above.
    let len = usize::try_from(len).map_err(|_| too_long(&body.seen))?;
    netstring::read_exact_into(&mut body, len, &mut payload).map_err(|e| body.lost(e))?;
    match netstring::read_comma(&mut body) {
        Ok(()) => {}
        Err(NetstringError::Format) => {
            return Err(ClientError::BadReply(format!(
                "reply netstring does not end with a comma: {}",
                quote(&body.seen)
            )));
        }
        Err(e) => return Err(body.lost(e)),
    }
    let status = match payload.first().copied().and_then(Status::from_byte) {
        Some(status) => status,
        None => {
            return Err(ClientError::BadReply(format!(
                "reply does not start with K, Z or D: {}",
                quote(&payload)
            )));
        }
    };
    let text = String::from_utf8_lossy(payload.get(1..).unwrap_or_default()).into_owned();
    Ok(Reply { status, text })
}

/// Send one QMQP request whose message (exactly `message_len` bytes) is read from `message`,
/// then read the reply netstring (at most 64 KiB; a reply not a netstring or not starting with
/// K/Z/D is BadReply). Streams the message: constant memory whatever its size.
///
/// When writing fails because the server closed the connection (it may have replied early,
/// as Postfix's qmqpd does), the reply is still read if it can be; otherwise the write error
/// is returned.
pub fn send<S: Read + Write, M: Read>(
    stream: &mut S,
    message: &mut M,
    message_len: u64,
    sender: &[u8],
    recipients: &[&[u8]],
) -> Result<Reply, ClientError> {
    let written = {
        let mut wtr = BufWriter::with_capacity(64 * 1024, &mut *stream);
        write_request(&mut wtr, message, message_len, sender, recipients)
    };
    match written {
        Ok(()) => read_reply(stream),
        Err(ClientError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
            ) =>
        {
            read_reply(stream).map_err(|_| ClientError::Io(e))
        }
        Err(e) => Err(e),
    }
}

/// Encode a whole request into bytes (tests and small messages).
pub fn encode_request(message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> Vec<u8> {
    let mut body = netstring::encode(message);
    body.extend(netstring::encode(sender));
    for rcpt in recipients {
        body.extend(netstring::encode(rcpt));
    }
    netstring::encode(&body)
}

/// Splits "host", "host:port", "[v6]", "[v6]:port" or a bare IPv6 address into host and port.
pub fn parse_server(server: &str) -> io::Result<(String, u16)> {
    let invalid = |why: &str| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{why}: \"{}\"", server.escape_debug()),
        )
    };
    let (host, port) = if let Some(rest) = server.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| invalid("missing ] in server address"))?;
        match after {
            "" => (host, None),
            _ => {
                let port = after
                    .strip_prefix(':')
                    .ok_or_else(|| invalid("junk after ] in server address"))?;
                (host, Some(port))
            }
        }
    } else if server.matches(':').count() > 1 {
        (server, None) // a bare IPv6 address
    } else {
        match server.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (server, None),
        }
    };
    if host.is_empty() {
        return Err(invalid("empty host in server address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(invalid("bad port in server address")),
        },
    };
    Ok((host.to_string(), port))
}

/// Connect to "host", "host:port", "[v6]:port" (default port 628) with a timeout.
///
/// A name is looked up without glibc's NSS (`resolve`: /etc/hosts and DNS, the name taken as
/// absolute), bounded by `timeout`. Every address it resolves to is tried in turn, each
/// bounded by `timeout`; the connected stream gets `timeout` as its read and write timeout too.
pub fn connect(server: &str, timeout: Duration) -> io::Result<TcpStream> {
    let (host, port) = parse_server(server)?;
    let literal = host.parse::<std::net::IpAddr>().ok();
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => {
            let now = std::time::Instant::now();
            let deadline = now
                .checked_add(timeout)
                .unwrap_or(now + Duration::from_secs(3600));
            crate::resolve::HostFiles::default()
                .forward(&host, deadline)
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("look-up of \"{}\" timed out", host.escape_debug()),
                    )
                })?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, port))
                .collect()
        }
    };
    let literal = literal.is_some();
    let mut last = io::Error::new(
        io::ErrorKind::NotFound,
        format!("no address found for \"{}\"", host.escape_debug()),
    );
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                stream.set_read_timeout(Some(timeout))?;
                stream.set_write_timeout(Some(timeout))?;
                return Ok(stream);
            }
            // Name the address only when the caller gave a name, not the address itself.
            Err(e) if literal => last = e,
            Err(e) => last = io::Error::new(e.kind(), format!("{addr}: {e}")),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// An in-memory connection: reads come from `input`, writes go to `output`.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Duplex {
        fn new(input: &[u8]) -> Duplex {
            Duplex {
                input: Cursor::new(input.to_vec()),
                output: Vec::new(),
            }
        }
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// A connection whose writes fail as if the server had closed it after replying.
    struct ClosedEarly {
        input: Cursor<Vec<u8>>,
    }

    impl Read for ClosedEarly {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for ClosedEarly {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn reply_of(bytes: &[u8]) -> Result<Reply, ClientError> {
        read_reply(&mut Cursor::new(bytes.to_vec()))
    }

    fn bad_reply_text(bytes: &[u8]) -> String {
        match reply_of(bytes) {
            Err(ClientError::BadReply(why)) => why,
            other => panic!("expected BadReply, got {other:?}"),
        }
    }

    #[test]
    fn encode_request_nests_message_sender_recipients() {
        // One netstring holding the message, sender and recipient netstrings, in that order
        // (cr.yp.to/proto/qmqp.html); 9 + 30 + 30 = 69 inner bytes.
        let got = encode_request(
            b"Hello\n",
            b"djb@silverton.berkeley.edu",
            &[b"djb@silverton.berkeley.edu"],
        );
        let want: &[u8] =
            b"69:6:Hello\n,26:djb@silverton.berkeley.edu,26:djb@silverton.berkeley.edu,,";
        assert_eq!(got, want);
    }

    #[test]
    fn encode_request_allows_empty_sender_and_counts_many_recipients() {
        let got = encode_request(b"", b"", &[b"a@b", b"c@d"]);
        assert_eq!(got, b"18:0:,0:,3:a@b,3:c@d,,".to_vec());
    }

    #[test]
    fn encode_request_counts_multi_digit_lengths() {
        let message = vec![b'x'; 1000];
        let got = encode_request(&message, b"s", &[b"r"]);
        // 1000:...,  = 4 + 1 + 1000 + 1; 1:s, = 4; 1:r, = 4
        assert!(got.starts_with(b"1014:1000:"));
        assert!(got.ends_with(b",1:s,1:r,,"));
    }

    #[test]
    fn request_len_rejects_overflow() {
        assert_eq!(request_len(u64::MAX - 5, b"", &[b""]), None);
    }

    #[test]
    fn read_reply_parses_k_z_d() {
        assert_eq!(
            reply_of(b"19:KOk: queued as 1234,").unwrap(),
            Reply {
                status: Status::Ok,
                text: "Ok: queued as 1234".into()
            }
        );
        assert_eq!(
            reply_of(b"30:ZError: queue file write error,").unwrap(),
            Reply {
                status: Status::TempFail,
                text: "Error: queue file write error".into()
            }
        );
        assert_eq!(
            reply_of(b"25:DError: message too large,").unwrap(),
            Reply {
                status: Status::PermFail,
                text: "Error: message too large".into()
            }
        );
    }

    #[test]
    fn read_reply_accepts_bare_letter() {
        assert_eq!(reply_of(b"1:K,").unwrap().text, "");
    }

    #[test]
    fn read_reply_rejects_unknown_status() {
        assert!(bad_reply_text(b"3:Xyz,").contains("K, Z or D"));
        assert!(bad_reply_text(b"0:,").contains("K, Z or D"));
    }

    #[test]
    fn read_reply_rejects_non_netstrings() {
        assert!(bad_reply_text(b"KOk").contains("not a netstring"));
        assert!(bad_reply_text(b":K,").contains("not a netstring"));
        assert!(bad_reply_text(b"2xK,").contains("not a netstring"));
        assert!(bad_reply_text(b"02:KK,").contains("leading zero"));
        assert!(bad_reply_text(b"0x:K,").contains("not a netstring"));
        assert!(bad_reply_text(b"1234567:K").contains("longer than 65536"));
        assert!(bad_reply_text(b"2:KOk").contains("comma"));
    }

    #[test]
    fn read_reply_rejects_truncated() {
        assert!(bad_reply_text(b"20:KOk: queued").contains("truncated"));
        assert!(bad_reply_text(b"2:KK").contains("truncated"));
        assert!(bad_reply_text(b"20").contains("truncated"));
    }

    #[test]
    fn read_reply_reports_no_reply_as_io() {
        match reply_of(b"") {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof),
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn read_reply_rejects_oversize() {
        assert!(bad_reply_text(b"65537:K").contains("longer than 65536"));
        assert!(bad_reply_text(b"99999999999999999999999:K").contains("longer than"));
        let mut big = b"65536:K".to_vec();
        big.extend(std::iter::repeat_n(b'x', 65535));
        big.push(b',');
        assert_eq!(reply_of(&big).unwrap().text.len(), 65535);
    }

    #[test]
    fn reply_display_escapes_control_characters() {
        let reply = Reply {
            status: Status::PermFail,
            text: "a\x1b[2Jb\n".into(),
        };
        assert_eq!(reply.to_string(), "Da\\u{1b}[2Jb\\n");
    }

    #[test]
    fn send_writes_request_and_reads_reply() {
        let mut conn = Duplex::new(b"11:KOk: queued,");
        let message = b"Subject: x\n\nbody\n";
        let reply = send(
            &mut conn,
            &mut Cursor::new(message),
            17,
            b"s@example.org",
            &[b"r1@example.net", b"r2@example.net"],
        )
        .unwrap();
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.text, "Ok: queued");
        assert_eq!(
            conn.output,
            encode_request(
                message,
                b"s@example.org",
                &[b"r1@example.net", b"r2@example.net"]
            )
        );
    }

    #[test]
    fn send_sends_only_message_len_bytes() {
        let mut conn = Duplex::new(b"1:K,");
        send(&mut conn, &mut Cursor::new(b"abcdef"), 3, b"", &[b"r"]).unwrap();
        assert_eq!(conn.output, encode_request(b"abc", b"", &[b"r"]));
    }

    #[test]
    fn send_rejects_short_message() {
        let mut conn = Duplex::new(b"1:K,");
        match send(&mut conn, &mut Cursor::new(b"ab"), 3, b"", &[b"r"]) {
            Err(ClientError::Io(e)) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
                assert!(e.to_string().contains("2 of 3"));
            }
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn send_reads_early_reply_after_write_failure() {
        let mut conn = ClosedEarly {
            input: Cursor::new(b"22:DError: not authorized,".to_vec()),
        };
        let reply = send(&mut conn, &mut Cursor::new(b"hi"), 2, b"", &[b"r"]).unwrap();
        assert_eq!(reply.status, Status::PermFail);
    }

    #[test]
    fn send_reports_write_failure_without_reply() {
        let mut conn = ClosedEarly {
            input: Cursor::new(Vec::new()),
        };
        match send(&mut conn, &mut Cursor::new(b"hi"), 2, b"", &[b"r"]) {
            Err(ClientError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("expected Io, got {other:?}"),
        }
    }

    #[test]
    fn parse_server_accepts_forms() {
        assert_eq!(parse_server("mx").unwrap(), ("mx".into(), 628));
        assert_eq!(
            parse_server("127.0.0.1:6280").unwrap(),
            ("127.0.0.1".into(), 6280)
        );
        assert_eq!(parse_server("[::1]:6280").unwrap(), ("::1".into(), 6280));
        assert_eq!(parse_server("[::1]").unwrap(), ("::1".into(), 628));
        assert_eq!(
            parse_server("2001:db8::1").unwrap(),
            ("2001:db8::1".into(), 628)
        );
    }

    #[test]
    fn parse_server_rejects_bad_ports_and_hosts() {
        for bad in [
            "mx:", "mx:0", "mx:70000", "mx:+1", "mx:x", ":628", "[::1", "[::1]x", "[]:1",
        ] {
            assert!(parse_server(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn connect_reaches_loopback_listener() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let stream = connect(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).unwrap();
        assert_eq!(stream.peer_addr().unwrap().port(), port);
    }
}
