//! What qmqpd adds to and notices in a message while its bytes stream past: our Received:
//! header, leading `From ` lines turned into `X-Mailbox-Line:`, an empty line before content
//! that starts with white space, the Received: hop count and the Message-ID of the primary header
//! block. Memory stays constant whatever the message size. Owns no I/O but the `Write` it is
//! given; where the bytes come from and go to is `session`'s business.

use std::io::{self, Write};
use std::net::IpAddr;

use crate::netstring;

/// The longest Message-ID value kept for the log.
const MESSAGE_ID_MAX: usize = 512;
const MAILBOX_LINE: &[u8] = b"X-Mailbox-Line: ";
const FROM_: &[u8] = b"From ";
/// The most output held back while leading From_ lines are counted (memory stays bounded).
const MAILBOX_LINES_MAX: usize = 64 * 1024;

/// What our Received: header says.
pub struct Origin<'a> {
    /// The client's verified name, or "unknown".
    pub client_name: &'a str,
    /// The client's address, or None when unknown.
    pub client_addr: Option<IpAddr>,
    pub myhostname: &'a str,
    pub mail_name: &'a str,
    pub queue_id: &'a str,
    /// RFC 5322 date.
    pub date: &'a str,
}

/// Our Received: header, two lines, LF-terminated. No `for` clause: Bcc stays invisible.
pub fn received_header(origin: &Origin<'_>) -> Vec<u8> {
    let name = header_safe(origin.client_name);
    let addr = match origin.client_addr {
        Some(IpAddr::V6(a)) => format!("IPv6:{a}"),
        Some(IpAddr::V4(a)) => a.to_string(),
        None => "unknown".to_owned(),
    };
    format!(
        "Received: from {name} ({name} [{addr}])\n\tby {} ({}) with QMQP id {}; {}\n",
        header_safe(origin.myhostname),
        header_safe(origin.mail_name),
        origin.queue_id,
        origin.date
    )
    .into_bytes()
}

/// Keeps host-name characters; anything else becomes `?` so a header cannot be forged.
fn header_safe(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' | ':' => c,
            _ => '?',
        })
        .collect()
}

/// How the leading lines of the content are being classified.
#[derive(Clone, Copy)]
enum Start {
    /// At a leading line: counting its `>`s; `matched` bytes of "From " seen after them.
    Line { quotes: u64, matched: usize },
    /// In the rest of a leading From_ line, up to its newline; `converted` unless the
    /// held-back output overflowed (see `Rewriter::hold`).
    FromLine { converted: bool },
    /// Past the leading From_ lines: the rest passes through.
    Done,
}

/// Streams one message into a netstring: `LEN:` + Received: + rewritten content + `,`.
///
/// Every leading `From ` line (after any `>`s) becomes an `X-Mailbox-Line:` header, as in
/// Postfix, so that the real header block after them stays a header block (and its Received:
/// lines are counted). Each such line makes the message longer, so the output is held back
/// until the first other line shows how many there are: at most `MAILBOX_LINES_MAX` bytes.
pub struct Rewriter {
    received: Vec<u8>,
    content_len: u64,
    start: Start,
    /// Leading From_ lines turned into X-Mailbox-Line: headers so far.
    mailbox_lines: u64,
    /// Output held back until the netstring length is known; None once `LEN:` is written.
    held: Option<Vec<u8>>,
    headers: HeaderScan,
}

impl Rewriter {
    /// `content_len` is the message length the client declared.
    pub fn new(received: Vec<u8>, content_len: u64) -> Rewriter {
        Rewriter {
            received,
            content_len,
            start: Start::Line {
                quotes: 0,
                matched: 0,
            },
            mailbox_lines: 0,
            held: Some(Vec::new()),
            headers: HeaderScan::new(),
        }
    }

    /// Received: headers in the primary header block so far, ours included.
    pub fn hops(&self) -> u64 {
        self.headers.hops
    }

    /// The Message-ID value of the primary header block, without surrounding blanks.
    pub fn message_id(&self) -> Option<&[u8]> {
        self.headers.trimmed_message_id()
    }

    /// Feeds the next content bytes.
    pub fn push<W: Write>(&mut self, mut chunk: &[u8], out: &mut W) -> io::Result<()> {
        loop {
            match self.start {
                Start::Done => return self.write(chunk, true, out),
                Start::FromLine { converted } => {
                    let Some(end) = chunk.iter().position(|&b| b == b'\n') else {
                        return self.write(chunk, converted, out);
                    };
                    let (line, rest) = chunk.split_at(end + 1);
                    self.write(line, converted, out)?;
                    chunk = rest;
                    self.start = Start::Line {
                        quotes: 0,
                        matched: 0,
                    };
                }
                Start::Line { quotes, matched } => {
                    let Some(&byte) = chunk.first() else {
                        return Ok(());
                    };
                    if quotes == 0 && matched == 0 && (byte == b' ' || byte == b'\t') {
                        // Leading white space would continue the header above it.
                        self.end_leading_lines(b"\n", out)?;
                        continue;
                    }
                    if matched == 0 && byte == b'>' {
                        self.start = Start::Line {
                            quotes: quotes.saturating_add(1),
                            matched,
                        };
                    } else if FROM_.get(matched) == Some(&byte) {
                        self.start = Start::Line {
                            quotes,
                            matched: matched + 1,
                        };
                        if matched + 1 == FROM_.len() {
                            self.start_mailbox_line(quotes, out)?;
                        }
                    } else {
                        // Not a From_ line: give back what was held of it, byte included.
                        self.end_leading_lines(b"", out)?;
                        self.write_quotes(quotes, true, out)?;
                        self.write(&FROM_[..matched], true, out)?;
                        continue;
                    }
                    chunk = &chunk[1..];
                }
            }
        }
    }

    /// Ends the message: flushes anything pending and writes the closing `,`.
    pub fn finish<W: Write>(&mut self, out: &mut W) -> io::Result<()> {
        if let Start::Line { quotes, matched } = self.start {
            self.end_leading_lines(b"", out)?;
            self.write_quotes(quotes, true, out)?;
            self.write(&FROM_[..matched], true, out)?;
        }
        self.release(b"", out)?;
        out.write_all(b",")
    }

    /// A leading line turned out to be a From_ line: writes its start, converted when the
    /// netstring length is still open.
    fn start_mailbox_line<W: Write>(&mut self, quotes: u64, out: &mut W) -> io::Result<()> {
        let converted = self.held.is_some();
        if converted {
            self.mailbox_lines += 1;
            self.write(MAILBOX_LINE, true, out)?;
        }
        self.write_quotes(quotes, converted, out)?;
        self.write(FROM_, converted, out)?;
        self.start = Start::FromLine { converted };
        Ok(())
    }

    /// The first line that is not a From_ line: the leading lines are over.
    fn end_leading_lines<W: Write>(&mut self, prefix: &[u8], out: &mut W) -> io::Result<()> {
        self.start = Start::Done;
        self.release(prefix, out)
    }

    /// Writes the netstring length, our header, `prefix` and the held-back output, once.
    /// After an overflow the length is already written and `prefix` cannot be added.
    fn release<W: Write>(&mut self, prefix: &[u8], out: &mut W) -> io::Result<()> {
        let Some(held) = self.held.take() else {
            return Ok(());
        };
        let added = self
            .mailbox_lines
            .checked_mul(MAILBOX_LINE.len() as u64)
            .and_then(|n| n.checked_add(self.received.len() as u64))
            .and_then(|n| n.checked_add(prefix.len() as u64));
        let total = added
            .and_then(|n| n.checked_add(self.content_len))
            .ok_or_else(|| io::Error::other("message length overflow"))?;
        netstring::write_len(out, total)?;
        let received = std::mem::take(&mut self.received);
        self.emit(&received, out)?;
        self.emit(&held, out)?;
        self.emit(prefix, out)
    }

    /// Writes `count` `>`s.
    fn write_quotes<W: Write>(&mut self, count: u64, scan: bool, out: &mut W) -> io::Result<()> {
        const QUOTES: [u8; 64] = [b'>'; 64];
        let mut left = count;
        while left > 0 {
            let n = left.min(QUOTES.len() as u64);
            self.write(&QUOTES[..n as usize], scan, out)?;
            left -= n;
        }
        Ok(())
    }

    /// Output: held back while the length is open, else scanned (unless `scan` is false: the
    /// raw From_ lines after an overflow, which must not end the header block) and written.
    fn write<W: Write>(&mut self, bytes: &[u8], scan: bool, out: &mut W) -> io::Result<()> {
        if let Some(held) = &mut self.held {
            if held.len().saturating_add(bytes.len()) <= MAILBOX_LINES_MAX {
                held.extend_from_slice(bytes);
                return Ok(());
            }
            // Absurdly many leading From_ lines: fix the length as it stands; later ones are
            // kept as they are, and the header scan skips them.
            self.release(b"", out)?;
        }
        if scan {
            self.emit(bytes, out)
        } else {
            out.write_all(bytes)
        }
    }

    fn emit<W: Write>(&mut self, bytes: &[u8], out: &mut W) -> io::Result<()> {
        self.headers.scan(bytes);
        out.write_all(bytes)
    }
}

/// Where the header scanner is within a line of the primary header block.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Line {
    /// At the first byte of a line.
    Start,
    /// Inside a field name; `len` bytes so far.
    Name { len: usize },
    /// White space between the field name and the colon.
    BeforeColon { len: usize },
    /// In a field's value (or a continuation line).
    Value,
    /// Past the primary header block: nothing more to notice.
    Body,
}

/// Notices Received: and Message-ID: fields of the primary header block.
struct HeaderScan {
    line: Line,
    /// Lowercased first bytes of the current field name.
    name: [u8; 16],
    /// True while the current field's value is the Message-ID.
    in_message_id: bool,
    hops: u64,
    message_id: Option<Vec<u8>>,
}

impl HeaderScan {
    fn new() -> HeaderScan {
        HeaderScan {
            line: Line::Start,
            name: [0; 16],
            in_message_id: false,
            hops: 0,
            message_id: None,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.line = match (self.line, byte) {
                (Line::Body, _) => return,
                (Line::Start, b'\n' | b'\r') => Line::Body,
                (Line::Start, b' ' | b'\t') => {
                    self.capture(byte);
                    Line::Value
                }
                (Line::Start, _) => {
                    self.in_message_id = false;
                    self.name_byte(0, byte)
                }
                (Line::Name { len }, b':') if len > 0 => self.field(len),
                (Line::Name { len }, b' ' | b'\t') if len > 0 => Line::BeforeColon { len },
                (Line::Name { len }, _) => self.name_byte(len, byte),
                (Line::BeforeColon { len }, b':') => self.field(len),
                (Line::BeforeColon { len }, b' ' | b'\t') => Line::BeforeColon { len },
                (Line::BeforeColon { .. }, _) => Line::Body,
                (Line::Value, b'\n') => Line::Start,
                (Line::Value, _) => {
                    self.capture(byte);
                    Line::Value
                }
            };
        }
    }

    /// A byte of a field name; anything that cannot be in one ends the header block.
    fn name_byte(&mut self, len: usize, byte: u8) -> Line {
        if !(33..=126).contains(&byte) || byte == b':' {
            return Line::Body;
        }
        if let Some(slot) = self.name.get_mut(len) {
            *slot = byte.to_ascii_lowercase();
        }
        Line::Name {
            len: len.saturating_add(1),
        }
    }

    /// A complete field name followed by its colon.
    fn field(&mut self, len: usize) -> Line {
        let name = self.name.get(..len).unwrap_or(&[]);
        if name == b"received" {
            self.hops = self.hops.saturating_add(1);
        } else if name == b"message-id" && self.message_id.is_none() {
            self.in_message_id = true;
            self.message_id = Some(Vec::new());
        }
        Line::Value
    }

    fn capture(&mut self, byte: u8) {
        if !self.in_message_id {
            return;
        }
        if let Some(id) = &mut self.message_id {
            let blank = byte == b' ' || byte == b'\t' || byte == b'\r';
            if blank && (id.is_empty() || id.last() == Some(&b' ')) {
                return;
            }
            if id.len() < MESSAGE_ID_MAX {
                id.push(if blank { b' ' } else { byte });
            }
        }
    }
}

impl HeaderScan {
    /// Drops the trailing blank a folded or CRLF-ended Message-ID leaves behind.
    fn trimmed_message_id(&self) -> Option<&[u8]> {
        let id = self.message_id.as_deref()?;
        let end = id.iter().rposition(|&b| b != b' ').map_or(0, |i| i + 1);
        id.get(..end).filter(|id| !id.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(content: &[u8], chunk: usize) -> (Vec<u8>, u64, Option<Vec<u8>>) {
        let received = b"Received: x\n".to_vec();
        let mut rw = Rewriter::new(received, content.len() as u64);
        let mut out = Vec::new();
        for piece in content.chunks(chunk.max(1)) {
            rw.push(piece, &mut out).unwrap();
        }
        rw.finish(&mut out).unwrap();
        (out, rw.hops(), rw.message_id().map(<[u8]>::to_vec))
    }

    fn body_of(netstring: &[u8]) -> &[u8] {
        let colon = netstring.iter().position(|&b| b == b':').unwrap();
        let len: usize = std::str::from_utf8(&netstring[..colon])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(
            netstring.len(),
            colon + 1 + len + 1,
            "netstring length is exact"
        );
        assert_eq!(netstring.last(), Some(&b','));
        &netstring[colon + 1..colon + 1 + len]
    }

    #[test]
    fn rewriter_keeps_plain_message_and_counts_our_header() {
        for chunk in [1, 3, 1000] {
            let (out, hops, _) = rewrite(b"Subject: hi\n\nbody\n", chunk);
            assert_eq!(body_of(&out), b"Received: x\nSubject: hi\n\nbody\n");
            assert_eq!(hops, 1);
        }
    }

    #[test]
    fn rewriter_turns_from_line_into_mailbox_line() {
        for chunk in [1, 2, 1000] {
            let (out, _, _) = rewrite(b"From a@b Mon\nSubject: x\n\nb\n", chunk);
            assert_eq!(
                body_of(&out),
                b"Received: x\nX-Mailbox-Line: From a@b Mon\nSubject: x\n\nb\n"
            );
            let (out, _, _) = rewrite(b">>From a@b\n\nb\n", chunk);
            assert_eq!(
                body_of(&out),
                b"Received: x\nX-Mailbox-Line: >>From a@b\n\nb\n"
            );
        }
    }

    #[test]
    fn rewriter_turns_every_leading_from_line_into_mailbox_line() {
        let msg = b"From a@b Mon\n>From c@d Tue\nReceived: r\nSubject: x\n\nFrom body\n";
        for chunk in [1, 2, 5, 1000] {
            let (out, hops, _) = rewrite(msg, chunk);
            assert_eq!(
                body_of(&out),
                b"Received: x\nX-Mailbox-Line: From a@b Mon\nX-Mailbox-Line: >From c@d Tue\n\
                  Received: r\nSubject: x\n\nFrom body\n"
            );
            assert_eq!(hops, 2, "the Received: after the From_ lines is counted");
        }
        let (out, _, _) = rewrite(b"From a\n\tindented\n", 3);
        assert_eq!(
            body_of(&out),
            b"Received: x\nX-Mailbox-Line: From a\n\n\tindented\n",
            "white space after the From_ lines still gets its empty line"
        );
        let (out, _, _) = rewrite(b"From a\nFrom b", 1);
        assert_eq!(
            body_of(&out),
            b"Received: x\nX-Mailbox-Line: From a\nX-Mailbox-Line: From b"
        );
    }

    #[test]
    fn rewriter_bounds_held_back_from_lines_and_still_counts_hops() {
        let mut msg = Vec::new();
        while msg.len() <= MAILBOX_LINES_MAX {
            msg.extend_from_slice(b"From someone@example.org Mon Jan  1 00:00:00 2026\n");
        }
        msg.extend_from_slice(b"Received: a\nReceived: b\n\nbody\n");
        let (out, hops, _) = rewrite(&msg, 4096);
        let body = body_of(&out);
        assert!(body.starts_with(b"Received: x\nX-Mailbox-Line: From someone"));
        assert!(body.ends_with(b"\nReceived: a\nReceived: b\n\nbody\n"));
        assert_eq!(
            hops, 3,
            "the raw From_ lines past the bound do not end the headers"
        );
    }

    #[test]
    fn rewriter_leaves_near_misses_alone() {
        for content in [
            &b">Fro"[..],
            b"Fromage: x\n",
            b">> quoted\n",
            b"",
            b">",
            b"From",
        ] {
            let (out, _, _) = rewrite(content, 1);
            let mut want = b"Received: x\n".to_vec();
            want.extend_from_slice(content);
            assert_eq!(
                body_of(&out),
                &want[..],
                "{:?}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn rewriter_puts_empty_line_before_leading_white_space() {
        let (out, hops, _) = rewrite(b" Received: fake\n\nx", 1);
        assert_eq!(body_of(&out), b"Received: x\n\n Received: fake\n\nx");
        assert_eq!(hops, 1, "the indented line is body, not a header");
        let (out, _, _) = rewrite(b"\tx", 5);
        assert_eq!(body_of(&out), b"Received: x\n\n\tx");
    }

    #[test]
    fn rewriter_counts_received_headers_of_primary_block_only() {
        let msg =
            b"Received: a\nreceived : b\n\tfolded\nRECEIVED: c\nSubject: s\n\nReceived: body\n";
        let (_, hops, _) = rewrite(msg, 1);
        assert_eq!(hops, 4);
        let msg = b"Received: a\r\n\r\nReceived: body\r\n";
        let (_, hops, _) = rewrite(msg, 7);
        assert_eq!(hops, 2);
        let msg = b"not a header line\nReceived: a\n";
        let (_, hops, _) = rewrite(msg, 7);
        assert_eq!(hops, 1);
    }

    #[test]
    fn rewriter_finds_message_id() {
        let (_, _, id) = rewrite(b"Subject: a\nMessage-ID:  <abc@x>\r\n\n", 1);
        assert_eq!(id.as_deref(), Some(&b"<abc@x>"[..]));
        let (_, _, id) = rewrite(b"message-id:\n <folded@x>\nX: y\n\n", 2);
        assert_eq!(id.as_deref(), Some(&b"<folded@x>"[..]));
        let (_, _, id) = rewrite(b"Subject: a\n\nMessage-ID: <body@x>\n", 100);
        assert_eq!(id, None);
    }

    #[test]
    fn rewriter_bounds_message_id() {
        let mut msg = b"Message-ID: <".to_vec();
        msg.extend(std::iter::repeat_n(b'a', 10_000));
        msg.extend_from_slice(b">\n\n");
        let (_, _, id) = rewrite(&msg, 4096);
        assert_eq!(id.unwrap().len(), MESSAGE_ID_MAX);
    }

    #[test]
    fn received_header_writes_ipv6_literal() {
        let origin = Origin {
            client_name: "host.example",
            client_addr: Some("2001:db8::1".parse().unwrap()),
            myhostname: "mx.example",
            mail_name: "qmqpd",
            queue_id: "ID1",
            date: "Sat, 28 Nov 2026 12:00:00 +0000",
        };
        assert_eq!(
            String::from_utf8(received_header(&origin)).unwrap(),
            "Received: from host.example (host.example [IPv6:2001:db8::1])\n\tby mx.example \
             (qmqpd) with QMQP id ID1; Sat, 28 Nov 2026 12:00:00 +0000\n"
        );
    }

    #[test]
    fn received_header_neutralises_hostile_names() {
        let origin = Origin {
            client_name: "evil\nBcc: x (y)",
            client_addr: Some("192.0.2.1".parse().unwrap()),
            myhostname: "mx",
            mail_name: "qmqpd",
            queue_id: "ID",
            date: "D",
        };
        let h = String::from_utf8(received_header(&origin)).unwrap();
        assert!(h.starts_with("Received: from evil?Bcc:?x??y? (evil?Bcc:?x??y? [192.0.2.1])\n"));
    }
}
