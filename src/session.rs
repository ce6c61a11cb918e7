//! One QMQP transaction over any `BufRead + Write` and a queue directory.
//!
//! Stages, each with Postfix's "where" words: the packet header (`N:`), the message, the
//! sender, the recipients and the outer `,`; then the reply. The outer length is a byte
//! budget every field is charged against, so memory and reads stay bounded. Once a request
//! is rejected, the rest of it is read and discarded (the drain rule) so the client can read
//! its reply, unless it is far too large or stops being netstrings. This module never touches
//! a socket, a file descriptor, the environment or an exit code.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::time::SystemTime;

use crate::config::Params;
use crate::logging::sanitize;
use crate::message::{self, Origin, Rewriter};
use crate::netstring::{self, NetstringError};
use crate::peer::Client;
use crate::queue::{self, Attributes, Queue, QueueFile};
use crate::reply::{Rejection, Reply, Where};
use crate::verp::verp_delimiters;

/// A rejected request is drained only while its declared length is at most this many times
/// `message_size_limit`: a larger rejected request gets its reply at once, unread.
const DRAIN_FACTOR: u64 = 4;
/// The drain bound when `message_size_limit` is 0 (no limit): four times the default limit.
const DRAIN_FALLBACK: u64 = 4 * 10_240_000;
/// Read buffer size for the request body: large enough that a big message costs few reads.
/// A smaller request gets a buffer of its own size (a one-shot qmqpd then allocates, and
/// the C library trims, no memory it does not use).
const READ_BUFFER: usize = 64 * 1024;

/// Everything one transaction needs besides the connection.
pub struct Transaction<'a> {
    pub client: &'a Client,
    pub params: &'a Params,
    pub queue: &'a Queue,
    /// The access-list verdict for this client.
    pub authorized: bool,
}

/// How a transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client was sent this reply.
    Replied(Reply),
    /// The client went away or timed out before the end of its request; nothing was queued.
    Lost { at: Where, timeout: bool },
    /// The reply could not be delivered (for a `Queued` reply the message is in the queue).
    ReplyFailed(Reply),
}

/// The result of `serve`, for the caller's logging, connection handling and exit status.
#[derive(Debug)]
pub struct Outcome {
    pub end: End,
    /// True when the whole request, outer `,` included, was read.
    pub request_read: bool,
}

impl Outcome {
    /// True when the client got (or should have got) `Z` because of a problem on our side.
    pub fn local_failure(&self) -> bool {
        match &self.end {
            End::Replied(Reply::Rejected(r)) | End::ReplyFailed(Reply::Rejected(r)) => {
                r.is_local_failure()
            }
            _ => false,
        }
    }
}

/// The error a reader returns when the server cuts the transaction off (the process is
/// being stopped): the transaction ends as a lost connection, logged with this reason
/// (e.g. `stopped by SIGTERM`), and its queue file is removed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct CutOff(pub(crate) String);

/// Why reading stopped early.
enum Stop {
    /// The connection broke, timed out, or was cut off (`cut_off` holds the reason).
    Lost {
        at: Where,
        timeout: bool,
        cut_off: Option<String>,
    },
    /// The client shut down its sending side (end of input) before the end of its request;
    /// it may still read a reply.
    Ended { at: Where },
    /// Reply now without reading further (unparseable or undrainably large request).
    ReplyNow(Rejection),
}

/// Serves one transaction: reads the request from `rdr`, queues it, writes one reply to `wtr`.
/// Never reads a byte past the request's outer `,` (the reader may be shared, as in a ucspi
/// pipeline), so `rdr` needs no buffering of its own.
pub fn serve<R: Read, W: Write>(rdr: &mut R, wtr: &mut W, t: &Transaction<'_>) -> Outcome {
    let mut s = Session::new(t);
    let stop = s.receive(rdr).err();
    let request_read = stop.is_none();
    let reply = match stop {
        Some(Stop::Lost {
            at,
            timeout,
            cut_off,
        }) => {
            let reason = match (&cut_off, timeout) {
                (Some(why), _) => why.as_str(),
                (None, true) => "read timeout",
                (None, false) => "lost connection",
            };
            log::info!(
                "{}: {}: {reason} while {at}",
                s.log_id(),
                t.client.namaddr()
            );
            // A rejected client that stops sending while its request is drained still gets
            // its reply (and the warning is logged): it may only be slow, and without the
            // reply it would retry forever.
            if !(timeout && s.rejection.is_some()) {
                s.file = None;
                return Outcome {
                    end: End::Lost { at, timeout },
                    request_read,
                };
            }
            s.finish()
        }
        Some(Stop::Ended { at }) => {
            // Answered as Postfix answers it: a truncated request is a format error, a
            // denied client hears so. Only a client that sent nothing at all gets no reply.
            if s.started {
                s.reject(Rejection::Format(at));
            }
            if s.rejection.is_none() {
                log::info!(
                    "{}: {}: lost connection while {at}",
                    s.log_id(),
                    t.client.namaddr()
                );
                return Outcome {
                    end: End::Lost { at, timeout: false },
                    request_read,
                };
            }
            s.finish()
        }
        Some(Stop::ReplyNow(why)) => {
            s.reject(why);
            s.finish()
        }
        None => s.finish(),
    };
    let end = s.send_reply(wtr, reply);
    Outcome { end, request_read }
}

/// State of one transaction.
struct Session<'a> {
    t: &'a Transaction<'a>,
    queue_id: Option<String>,
    file: Option<QueueFile>,
    rejection: Option<Rejection>,
    /// Bytes of the outer netstring not yet read.
    budget: u64,
    sender: Vec<u8>,
    recipients: u64,
    message_len: u64,
    message_id: Option<String>,
    field: Vec<u8>,
    /// True once the first byte of the request arrived.
    started: bool,
}

impl<'a> Session<'a> {
    fn new(t: &'a Transaction<'a>) -> Session<'a> {
        Session {
            t,
            queue_id: None,
            file: None,
            rejection: None,
            budget: 0,
            sender: Vec::new(),
            recipients: 0,
            message_len: 0,
            message_id: None,
            field: Vec::new(),
            started: false,
        }
    }

    fn log_id(&self) -> &str {
        self.queue_id.as_deref().unwrap_or("NOQUEUE")
    }

    /// Records a rejection; the queue file goes (removing itself from `tmp/`), so from here
    /// on `file` is None and bytes are discarded. Which one the client hears follows
    /// Postfix: the access verdict and the size limit are decided before anything is read,
    /// and the first malformed or over-long netstring ends Postfix's reading, so it wins over
    /// what is found in the fields (addresses, hops, VERP), which Postfix checks only after
    /// the whole request; among the rest, the first one found.
    fn reject(&mut self, why: Rejection) {
        let replaces = match &self.rejection {
            None => true,
            Some(old) => is_stream_error(&why) && !decided_first(old),
        };
        if replaces {
            self.rejection = Some(why);
        }
        self.file = None;
    }

    /// Writes to the queue file, if the request is still accepted; a failure rejects the
    /// request with a write error.
    fn store(&mut self, bytes: &[u8]) {
        if let Some(file) = &mut self.file
            && let Err(e) = file.write_all(bytes)
        {
            self.write_failed(&e);
        }
    }

    fn write_failed(&mut self, e: &io::Error) {
        log::warn!("{}: cannot write queue file: {e}", self.log_id());
        self.reject(Rejection::WriteError);
    }

    fn receive<R: Read>(&mut self, rdr: &mut R) -> Result<(), Stop> {
        let params = self.t.params;
        if !self.t.authorized {
            self.reject(Rejection::NotAuthorized(self.t.client.namaddr()));
        }
        // Never a byte past the request's end is read.
        let mut ahead = Vec::new();
        let mut started = false;
        let len = netstring::read_len_ahead(rdr, &mut ahead, || started = true);
        self.started = started;
        let len = len.map_err(|e| stop(e, Where::Header, Rejection::TooLarge))?;
        if params.size_limit().is_some_and(|limit| len > limit) {
            self.reject(Rejection::TooLarge);
        }
        let drain_limit = params
            .size_limit()
            .map_or(DRAIN_FALLBACK, |limit| limit.saturating_mul(DRAIN_FACTOR));
        // A request rejected now, or later (hops, addresses...), is drained only when it is
        // not far too large.
        let undrainable = len > drain_limit;
        if self.rejection.is_some() {
            if undrainable {
                return Err(Stop::ReplyNow(Rejection::TooLarge));
            }
        } else {
            self.open_file();
        }
        let give_up = |s: &Self| match (&s.rejection, undrainable) {
            (Some(why), true) => Err(Stop::ReplyNow(why.clone())),
            _ => Ok(()),
        };
        self.budget = len;
        log::debug!("{}: request of {len} bytes", self.log_id());
        // The rest of the request is exactly `len` bytes and the outer `,`, some of them
        // read already.
        let unread = len.saturating_add(1).saturating_sub(ahead.len() as u64);
        let capacity = usize::try_from(unread).map_or(READ_BUFFER, |n| n.clamp(1, READ_BUFFER));
        let mut body =
            BufReader::with_capacity(capacity, io::Cursor::new(ahead).chain(rdr.take(unread)));
        self.receive_message(&mut body)?;
        give_up(self)?;
        self.receive_sender(&mut body)?;
        give_up(self)?;
        while self.budget > 0 {
            self.receive_recipient(&mut body)?;
            give_up(self)?;
        }
        netstring::read_comma(&mut body)
            .map_err(|e| stop(e, Where::Recipient, Rejection::Format(Where::Recipient)))?;
        if self.recipients == 0 {
            self.reject(Rejection::NoRecipients);
        }
        Ok(())
    }

    /// Creates the queue file and writes its attributes block.
    fn open_file(&mut self) {
        let now = SystemTime::now();
        let id = queue::new_queue_id(now);
        let client = self.t.client;
        log::info!("{id}: client={}", client.namaddr());
        self.queue_id = Some(id.clone());
        match self.t.queue.create(&id) {
            Ok(file) => self.file = Some(file),
            Err(e) => {
                self.write_failed(&e);
                return;
            }
        }
        let mut attrs = Attributes::default();
        attrs.push("queue_id", &id);
        attrs.push("arrival_time", &arrival_time(now));
        attrs.push("client_name", &client.name);
        attrs.push("client_address", &client.addr_text());
        attrs.push(
            "client_port",
            &client
                .port
                .map_or_else(|| "unknown".to_owned(), |p| p.to_string()),
        );
        attrs.push("protocol_name", "QMQP");
        let params = self.t.params;
        if !params.content_filter.is_empty() {
            attrs.push("content_filter", &params.content_filter);
        }
        if !params.receive_override_options.is_empty() {
            attrs.push("receive_override_options", &params.receive_override_options);
        }
        let block = netstring::encode(&attrs.encode());
        self.store(&block);
    }

    /// Reads an inner netstring's `LEN:`, charged to the budget, and checks that the payload
    /// and its `,` fit in what is left. A length that does not fit is, in Postfix's words, a
    /// storage limit when it is also over the field's own limit (or beyond 64 bits), else a
    /// format error.
    fn read_field_len<R: BufRead>(&mut self, rdr: &mut R, at: Where) -> Result<u64, Stop> {
        let len = netstring::read_len(rdr, Some(&mut self.budget))
            .map_err(|e| stop(e, at, Rejection::FieldTooLong(at)))?;
        match len.checked_add(1) {
            Some(total) if total <= self.budget => {
                self.budget -= total;
                Ok(len)
            }
            _ => {
                let params = self.t.params;
                let limit = match at {
                    Where::Message if params.message_size_limit > 0 => params.message_size_limit,
                    Where::Message => u64::MAX,
                    _ => params.line_length_limit,
                };
                Err(Stop::ReplyNow(if len > limit {
                    Rejection::FieldTooLong(at)
                } else {
                    Rejection::Format(at)
                }))
            }
        }
    }

    fn receive_message<R: BufRead>(&mut self, rdr: &mut R) -> Result<(), Stop> {
        let at = Where::Message;
        let len = self.read_field_len(rdr, at)?;
        let mut rewriter = self
            .file
            .is_some()
            .then(|| Rewriter::new(self.received_header(), len));
        let hopcount_limit = self.t.params.hopcount_limit;
        let mut left = len;
        let mut first = None;
        while left > 0 {
            let chunk = netstring::fill(rdr).map_err(|e| stop(e, at, Rejection::Format(at)))?;
            let n = usize::try_from(left).map_or(chunk.len(), |l| chunk.len().min(l));
            let chunk = &chunk[..n];
            if first.is_none() {
                first = chunk.first().copied();
            }
            if let (Some(rw), Some(file)) = (&mut rewriter, &mut self.file) {
                if let Err(e) = rw.push(chunk, file) {
                    self.write_failed(&e);
                } else if rw.hops() >= hopcount_limit {
                    self.reject(Rejection::TooManyHops);
                }
            }
            rdr.consume(n);
            left -= n as u64;
        }
        netstring::read_comma(rdr).map_err(|e| stop(e, at, Rejection::Format(at)))?;
        if let Some(mut rw) = rewriter {
            if let Some(file) = &mut self.file
                && let Err(e) = rw.finish(file)
            {
                self.write_failed(&e);
            }
            if rw.hops() >= hopcount_limit {
                self.reject(Rejection::TooManyHops);
            }
            self.message_id = rw.message_id().map(sanitize);
        }
        if len == 1 && first == Some(b'M') {
            self.reject(Rejection::Streaming);
        }
        self.message_len = len;
        log::debug!("{}: message of {len} bytes", self.log_id());
        Ok(())
    }

    fn received_header(&self) -> Vec<u8> {
        let params = self.t.params;
        let date = crate::date::rfc5322(SystemTime::now());
        message::received_header(&Origin {
            client_name: &self.t.client.name,
            client_addr: self.t.client.addr,
            myhostname: &params.myhostname,
            mail_name: &params.mail_name,
            queue_id: self.queue_id.as_deref().unwrap_or(""),
            date: &date,
        })
    }

    /// Reads a sender or recipient into `self.field`; returns false (after skipping it) when
    /// it is longer than `line_length_limit`.
    fn read_address<R: BufRead>(&mut self, rdr: &mut R, at: Where) -> Result<bool, Stop> {
        let len = self.read_field_len(rdr, at)?;
        let fits = len <= self.t.params.line_length_limit;
        let read = match usize::try_from(len) {
            Ok(n) if fits => netstring::read_exact_into(rdr, n, &mut self.field),
            _ => netstring::skip(rdr, len),
        };
        read.and_then(|()| netstring::read_comma(rdr))
            .map_err(|e| stop(e, at, Rejection::Format(at)))?;
        if !fits {
            self.reject(Rejection::FieldTooLong(at));
        }
        Ok(fits)
    }

    fn receive_sender<R: BufRead>(&mut self, rdr: &mut R) -> Result<(), Stop> {
        if !self.read_address(rdr, Where::Sender)? {
            return Ok(());
        }
        self.sender = std::mem::take(&mut self.field);
        if self.sender.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
            self.reject(Rejection::BadSender);
        } else if let Some(delims) = verp_delimiters(&self.sender) {
            let filter = &self.t.params.verp_delimiter_filter;
            if !delims.chars().all(|c| filter.contains(c)) {
                self.reject(Rejection::Verp(delims, filter.clone()));
            }
        }
        log::debug!("{}: sender <{}>", self.log_id(), sanitize(&self.sender));
        let encoded = netstring::encode(&self.sender);
        self.store(&encoded);
        Ok(())
    }

    fn receive_recipient<R: BufRead>(&mut self, rdr: &mut R) -> Result<(), Stop> {
        if !self.read_address(rdr, Where::Recipient)? {
            return Ok(());
        }
        self.recipients += 1;
        log::trace!("{}: recipient <{}>", self.log_id(), sanitize(&self.field));
        if self.field.is_empty() || self.field.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
            self.reject(Rejection::BadRecipient);
        }
        let encoded = netstring::encode(&self.field);
        self.store(&encoded);
        Ok(())
    }

    /// Commits the queue file when everything was fine; decides the reply.
    fn finish(&mut self) -> Reply {
        if let Some(why) = &self.rejection {
            return Reply::Rejected(why.clone());
        }
        let Some(file) = self.file.take() else {
            return Reply::Rejected(Rejection::Internal);
        };
        if let Err(e) = file.commit() {
            self.write_failed(&e);
            return Reply::Rejected(Rejection::WriteError);
        }
        let id = self.queue_id.clone().unwrap_or_default();
        if let Some(mid) = &self.message_id {
            log::info!("{id}: message-id={mid}");
        }
        log::info!(
            "{id}: from=<{}>, size={}, nrcpt={} (queued)",
            sanitize(&self.sender),
            self.message_len,
            self.recipients
        );
        Reply::Queued(id)
    }

    /// Waits `qmqpd_error_delay` before a non-K reply, logs it, and writes it.
    fn send_reply<W: Write>(&self, wtr: &mut W, reply: Reply) -> End {
        let params = self.t.params;
        if let Reply::Rejected(_) = &reply {
            log::warn!(
                "{}: {}: {}",
                self.log_id(),
                self.t.client.namaddr(),
                reply.text()
            );
            if !params.qmqpd_error_delay.is_zero() {
                std::thread::sleep(params.qmqpd_error_delay);
            }
        }
        let bytes = reply.encode(params.soft_bounce);
        match wtr.write_all(&bytes).and_then(|()| wtr.flush()) {
            Ok(()) => End::Replied(reply),
            Err(e) => {
                let reason = match e.kind() {
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "write timeout",
                    _ => "lost connection",
                };
                log::info!(
                    "{}: {}: {reason} while {}",
                    self.log_id(),
                    self.t.client.namaddr(),
                    Where::Reply
                );
                End::ReplyFailed(reply)
            }
        }
    }
}

/// Maps a codec error at `at` to a stop: connection problems end the transaction, format
/// errors reply at once (`overflow` is what a length beyond 64 bits means at this stage).
fn stop(e: NetstringError, at: Where, overflow: Rejection) -> Stop {
    match e {
        NetstringError::Lost(e) if e.kind() == io::ErrorKind::UnexpectedEof => Stop::Ended { at },
        NetstringError::Lost(e) => Stop::Lost {
            at,
            timeout: false,
            cut_off: e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<CutOff>())
                .map(|why| why.0.clone()),
        },
        NetstringError::Timeout(_) => Stop::Lost {
            at,
            timeout: true,
            cut_off: None,
        },
        NetstringError::Format => Stop::ReplyNow(Rejection::Format(at)),
        NetstringError::Overflow => Stop::ReplyNow(overflow),
    }
}

/// A malformed or over-long netstring: where Postfix stops reading and replies.
fn is_stream_error(why: &Rejection) -> bool {
    matches!(why, Rejection::Format(_) | Rejection::FieldTooLong(_))
}

/// Rejections that no later finding overrides: the access verdict and the size limit (known
/// before the request is read), and the first stream error.
fn decided_first(why: &Rejection) -> bool {
    is_stream_error(why) || matches!(why, Rejection::NotAuthorized(_) | Rejection::TooLarge)
}

/// Unix seconds and microseconds, as the attributes block writes arrival_time.
fn arrival_time(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::time::Duration;

    struct Fixture {
        dir: tempfile::TempDir,
        params: Params,
        client: Client,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let params = Params {
                queue_directory: dir.path().join("q"),
                qmqpd_error_delay: Duration::ZERO,
                myhostname: "mx.example".into(),
                ..Params::default()
            };
            let client = Client::at("192.0.2.1".parse().unwrap(), Some(1234));
            Fixture {
                dir,
                params,
                client,
            }
        }

        /// Serves `input`; returns the outcome, the bytes written and how much was read.
        fn serve(&self, input: &[u8], authorized: bool) -> (Outcome, String, u64) {
            let queue = Queue::new(&self.params.queue_directory, "host");
            let t = Transaction {
                client: &self.client,
                params: &self.params,
                queue: &queue,
                authorized,
            };
            let mut rdr = Cursor::new(input.to_vec());
            let mut out = Vec::new();
            let outcome = serve(&mut rdr, &mut out, &t);
            (outcome, String::from_utf8(out).unwrap(), rdr.position())
        }

        fn files(&self, sub: &str) -> usize {
            std::fs::read_dir(self.dir.path().join("q").join(sub)).map_or(0, |d| d.count())
        }
    }

    fn request(message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> Vec<u8> {
        let mut body = netstring::encode(message);
        body.extend(netstring::encode(sender));
        for r in recipients {
            body.extend(netstring::encode(r));
        }
        netstring::encode(&body)
    }

    #[test]
    fn serve_queues_request_and_stops_at_outer_comma() {
        let f = Fixture::new();
        let mut input = request(b"Subject: x\n\nhi\n", b"s@x", &[b"r@y"]);
        let len = input.len() as u64;
        input.extend_from_slice(b"trailing bytes never read");
        let (outcome, reply, read) = f.serve(&input, true);
        assert!(reply.contains(":KOk: queued as "), "{reply}");
        assert!(outcome.request_read);
        assert!(matches!(outcome.end, End::Replied(Reply::Queued(_))));
        assert_eq!(
            read, len,
            "read exactly the {len}-byte request, nothing after it"
        );
        assert_eq!((f.files("new"), f.files("tmp")), (1, 0));
    }

    #[test]
    fn serve_drains_rejected_request_before_replying() {
        let f = Fixture::new();
        let input = request(&vec![b'x'; 100_000], b"s@x", &[b"r@y"]);
        let (outcome, reply, read) = f.serve(&input, false);
        assert_eq!(
            reply,
            "64:DError: unknown[192.0.2.1] is not authorized to use this service,"
        );
        assert_eq!(read, input.len() as u64, "the whole request was read");
        assert!(outcome.request_read);
        assert_eq!(f.files("new"), 0);
    }

    #[test]
    fn serve_replies_at_once_when_too_large_to_drain() {
        let mut f = Fixture::new();
        f.params.message_size_limit = 1000;
        let input = request(&vec![b'x'; 5000], b"s@x", &[b"r@y"]);
        let (outcome, reply, read) = f.serve(&input, true);
        assert_eq!(reply, "25:DError: message too large,");
        // The length and what came with it in the same read (at most 32 bytes).
        assert!(read <= 32, "only the length was read, not {read} bytes");
        assert!(!outcome.request_read);
        let input = request(&vec![b'x'; 3000], b"s@x", &[b"r@y"]);
        let (_, reply, read) = f.serve(&input, true);
        assert_eq!(reply, "25:DError: message too large,");
        assert_eq!(
            read,
            input.len() as u64,
            "within 4x the limit the request is drained"
        );
    }

    #[test]
    fn serve_silent_client_gets_no_reply() {
        let f = Fixture::new();
        let (outcome, reply, _) = f.serve(b"", true);
        assert!(reply.is_empty(), "{reply}");
        assert!(matches!(outcome.end, End::Lost { timeout: false, .. }));
        assert_eq!((f.files("new"), f.files("tmp")), (0, 0));
    }

    #[test]
    fn serve_answers_truncated_request_with_format_error() {
        let f = Fixture::new();
        // 20:5:hello,3:s@x,3:r@y,, cut everywhere: where the input ends decides WHERE.
        let input = request(b"hello", b"s@x", &[b"r@y"]);
        assert_eq!(input.len(), 24);
        for cut in 1..input.len() {
            let at = match cut {
                1..=2 => "receiving QMQP packet header",
                3..=10 => "receiving message content",
                11..=16 => "receiving sender address",
                _ => "receiving recipient address",
            };
            let (outcome, reply, _) = f.serve(&input[..cut], true);
            let want = format!("Dnetstring format error while {at}");
            assert_eq!(
                reply,
                format!("{}:{want},", want.len()),
                "cut after {cut} bytes"
            );
            assert!(!outcome.request_read, "cut {cut}");
        }
        assert_eq!((f.files("new"), f.files("tmp")), (0, 0));
    }

    #[test]
    fn serve_answers_denied_client_that_ends_early() {
        let f = Fixture::new();
        let input = request(b"hello", b"s@x", &[b"r@y"]);
        for cut in [0, 1, 5, 20] {
            let (outcome, reply, _) = f.serve(&input[..cut], false);
            assert_eq!(
                reply, "64:DError: unknown[192.0.2.1] is not authorized to use this service,",
                "cut after {cut} bytes"
            );
            assert!(!outcome.request_read);
        }
        assert_eq!((f.files("new"), f.files("tmp")), (0, 0));
    }

    #[test]
    fn serve_format_error_wins_over_earlier_address_error() {
        let f = Fixture::new();
        // A recipient with a newline, then bytes that are not a netstring (Postfix reports the
        // format error: it stops reading there, and checks addresses only afterwards).
        let mut body = netstring::encode(b"x");
        body.extend(netstring::encode(b"s@x"));
        body.extend(netstring::encode(b"r\n@y"));
        body.extend_from_slice(b"3;r@z,");
        let input = netstring::encode(&body);
        let (_, reply, _) = f.serve(&input, true);
        assert_eq!(
            reply,
            "57:Dnetstring format error while receiving recipient address,"
        );
        // A too-long recipient (a size error where it is read) wins the same way.
        let mut f = Fixture::new();
        f.params.line_length_limit = 10;
        let mut body = netstring::encode(b"x");
        body.extend(netstring::encode(b"bad\nsender"));
        body.extend(netstring::encode(b"a-very-long@recipient"));
        let input = netstring::encode(&body);
        let (_, reply, _) = f.serve(&input, true);
        assert_eq!(
            reply,
            "73:Dnetstring length exceeds storage limit while receiving recipient address,"
        );
        // The access verdict and the size limit are decided before anything is read.
        let (_, reply, _) = f.serve(&input, false);
        assert!(reply.contains("is not authorized"), "{reply}");
    }

    /// Gives its bytes, then times out (a client that stops sending).
    struct Stalls(Cursor<Vec<u8>>);

    impl Read for Stalls {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.0.read(buf)? {
                0 => Err(io::ErrorKind::TimedOut.into()),
                n => Ok(n),
            }
        }
    }

    #[test]
    fn serve_replies_to_a_denied_client_that_stalls_while_drained() {
        let f = Fixture::new();
        let queue = Queue::new(&f.params.queue_directory, "host");
        let t = Transaction {
            client: &f.client,
            params: &f.params,
            queue: &queue,
            authorized: false,
        };
        let input = request(&vec![b'x'; 10_000], b"s@x", &[b"r@y"]);
        let mut rdr = Stalls(Cursor::new(input[..5000].to_vec()));
        let mut out = Vec::new();
        let outcome = serve(&mut rdr, &mut out, &t);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "64:DError: unknown[192.0.2.1] is not authorized to use this service,"
        );
        assert!(!outcome.request_read);
        let t = Transaction {
            authorized: true,
            ..t
        };
        let mut rdr = Stalls(Cursor::new(input[..5000].to_vec()));
        let mut out = Vec::new();
        let outcome = serve(&mut rdr, &mut out, &t);
        assert!(
            out.is_empty(),
            "an accepted request cut short gets no reply"
        );
        assert!(matches!(outcome.end, End::Lost { timeout: true, .. }));
    }

    #[test]
    fn serve_first_rejection_decides() {
        let f = Fixture::new();
        let input = request(b"x", b"bad\nsender", &[b""]);
        let (_, reply, _) = f.serve(&input, true);
        assert_eq!(reply, "33:DError: bad sender address syntax,");
    }

    #[test]
    fn serve_reports_over_long_lengths_as_postfix_does() {
        let f = Fixture::new();
        let wrapped = |parts: &[&[u8]]| netstring::encode(&parts.concat());
        let storage = |at: &str| {
            let text = format!("Dnetstring length exceeds storage limit while receiving {at}");
            format!("{}:{text},", text.len())
        };
        // A length beyond 64 bits, and one beyond both the request and the field's limit.
        let input = wrapped(&[b"99999999999999999999:x,", b"1:s,", b"1:r,"]);
        assert_eq!(f.serve(&input, true).1, storage("message content"));
        let input = wrapped(&[b"1:x,", b"99999:s,", b"1:r,"]);
        assert_eq!(f.serve(&input, true).1, storage("sender address"));
        let input = wrapped(&[b"1:x,", b"1:s,", b"99999999999999999999:r,"]);
        assert_eq!(f.serve(&input, true).1, storage("recipient address"));
        // Beyond the request but within the limit: the lengths disagree, a format error.
        let input = wrapped(&[b"1:x,", b"1:s,", b"2:r,"]);
        assert_eq!(
            f.serve(&input, true).1,
            "57:Dnetstring format error while receiving recipient address,"
        );
    }

    #[test]
    fn serve_write_failure_answers_z_and_counts_as_local() {
        let f = Fixture::new();
        std::fs::write(f.dir.path().join("q"), b"not a directory").unwrap();
        let (outcome, reply, _) = f.serve(&request(b"x", b"s@x", &[b"r@y"]), true);
        assert_eq!(reply, "30:ZError: queue file write error,");
        assert!(outcome.local_failure());
    }
}
