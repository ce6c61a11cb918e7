//! The queue file's format, read and written: an attributes netstring (`qmqpd-queue 1` then
//! `name=value` lines), the message netstring, the sender netstring, one netstring per
//! recipient (docs/queue-format.md).
//!
//! Owns the attribute escaping (a value can never add a line of its own; no length cap) and
//! reading an envelope without holding the message in memory. Where the file lives and how it
//! is made durable is `file`'s job.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::Path;

use crate::netstring;

/// The first line of every queue file's attributes block.
const FORMAT_LINE: &str = "qmqpd-queue 1";

/// Bytes made fit for one line of text: UTF-8 kept, `\n`, `\r`, `\t` and other control
/// characters (and U+2028, U+2029) escaped, invalid bytes as `\xNN`, nothing cut. The one
/// escaping of attribute values, and of what `qmqp-queue` shows on a terminal.
pub(crate) fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    let mut utf8 = [0u8; 4];
                    for &b in c.encode_utf8(&mut utf8).as_bytes() {
                        push_hex(&mut out, b);
                    }
                }
                c => out.push(c),
            }
        }
        for &b in chunk.invalid() {
            push_hex(&mut out, b);
        }
    }
    out
}

/// Appends `\xNN`.
fn push_hex(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push_str("\\x");
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

/// The attributes block at the start of a queue file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `name=value` pairs in file order, `queue_id` first.
    pub pairs: Vec<(String, String)>,
}

impl Attributes {
    /// Adds one attribute; newlines and other control characters in the value are escaped so
    /// a value can never add a line of its own.
    pub fn push(&mut self, name: &str, value: &str) {
        self.pairs.push((name.to_owned(), escape(value.as_bytes())));
    }

    /// The value of an attribute.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The block's payload: the format line, then one `name=value` line each.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{FORMAT_LINE}\n");
        for (name, value) in &self.pairs {
            out.push_str(name);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        }
        out.into_bytes()
    }

    /// Parses a block's payload.
    pub fn decode(payload: &[u8]) -> Option<Attributes> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut lines = text.lines();
        if lines.next()? != FORMAT_LINE {
            return None;
        }
        let mut pairs = Vec::new();
        for line in lines {
            let (name, value) = line.split_once('=')?;
            pairs.push((name.to_owned(), value.to_owned()));
        }
        Some(Attributes { pairs })
    }
}

/// A queue file's envelope, read without holding its message in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Envelope {
    pub(crate) attributes: Attributes,
    /// Length of the stored message (our Received: header included).
    pub(crate) message_len: u64,
    /// Where the message netstring's payload starts in the file.
    pub(crate) message_offset: u64,
    pub(crate) sender: Vec<u8>,
    pub(crate) recipients: Vec<Vec<u8>>,
}

/// Reads a queue file's attributes and envelope, skipping over the message.
pub(crate) fn read_envelope(path: &Path) -> io::Result<Envelope> {
    let mut rdr = EnvelopeReader {
        rdr: BufReader::new(File::open(path)?),
        path,
        offset: 0,
    };
    let (_, attrs) = rdr.field(true)?;
    let attributes = Attributes::decode(&attrs).ok_or_else(|| rdr.bad("bad attributes block"))?;
    let (message_offset, _) = rdr.field(false)?;
    let message_len = rdr.offset - message_offset - 1;
    let (_, sender) = rdr.field(true)?;
    let mut recipients = Vec::new();
    while !rdr.rdr.fill_buf()?.is_empty() {
        recipients.push(rdr.field(true)?.1);
    }
    Ok(Envelope {
        attributes,
        message_len,
        message_offset,
        sender,
        recipients,
    })
}

/// Opens a queue file at its message, reading exactly the message's bytes.
pub(crate) fn open_message(
    path: &Path,
    envelope: &Envelope,
) -> io::Result<io::Take<BufReader<File>>> {
    let mut file = File::open(path)?;
    file.seek(SeekFrom::Start(envelope.message_offset))?;
    Ok(BufReader::with_capacity(64 * 1024, file).take(envelope.message_len))
}

/// Writes a copy of the queue file at `src` holding only the recipients at `keep`: its
/// attributes and message as they are, then the sender and those recipients.
pub(crate) fn write_subset<W: Write>(
    src: &Path,
    envelope: &Envelope,
    keep: &[usize],
    wtr: &mut W,
) -> io::Result<()> {
    // The attributes and message netstrings (up to the message's comma), as they are.
    let copy_len = envelope
        .message_offset
        .checked_add(envelope.message_len)
        .and_then(|end| end.checked_add(1))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad message length"))?;
    let mut src = File::open(src)?;
    let copied = io::copy(&mut (&mut src).take(copy_len), wtr)?;
    if copied != copy_len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    netstring::write_netstring(wtr, &envelope.sender)?;
    for &i in keep {
        if let Some(rcpt) = envelope.recipients.get(i) {
            netstring::write_netstring(wtr, rcpt)?;
        }
    }
    Ok(())
}

/// Reads the netstrings of a queue file, keeping count of the offset.
struct EnvelopeReader<'a> {
    rdr: BufReader<File>,
    path: &'a Path,
    offset: u64,
}

impl EnvelopeReader<'_> {
    /// The longest attributes block, sender or recipient this reader keeps.
    const FIELD_MAX: u64 = 1 << 20;

    fn bad(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", self.path.display()),
        )
    }

    /// Reads one netstring; returns where its payload starts and (when `keep`) the payload.
    fn field(&mut self, keep: bool) -> io::Result<(u64, Vec<u8>)> {
        let len = netstring::read_len(&mut self.rdr, None).map_err(|e| self.bad(&e.to_string()))?;
        let start = self.offset + netstring::len_prefix_size(len);
        let mut buf = Vec::new();
        let read = if keep {
            if len > Self::FIELD_MAX {
                return Err(self.bad("field too long"));
            }
            netstring::read_exact_into(&mut self.rdr, len as usize, &mut buf)
        } else {
            netstring::skip(&mut self.rdr, len)
        };
        read.and_then(|()| netstring::read_comma(&mut self.rdr))
            .map_err(|e| self.bad(&e.to_string()))?;
        self.offset = start + len + 1;
        Ok((start, buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_escape_newlines_and_round_trip() {
        let mut a = Attributes::default();
        a.push("queue_id", "ABC");
        a.push("client_name", "evil\nx=y");
        let enc = a.encode();
        assert_eq!(
            enc,
            b"qmqpd-queue 1\nqueue_id=ABC\nclient_name=evil\\nx=y\n"
        );
        assert_eq!(
            Attributes::decode(&enc).unwrap().get("client_name"),
            Some("evil\\nx=y")
        );
    }

    #[test]
    fn attributes_keep_long_values_whole() {
        let long = "x".repeat(5000);
        let mut a = Attributes::default();
        a.push("content_filter", &long);
        assert_eq!(a.get("content_filter"), Some(long.as_str()));
    }

    #[test]
    fn escape_keeps_utf8_and_escapes_controls() {
        assert_eq!(escape("é<a@b>".as_bytes()), "é<a@b>");
        assert_eq!(escape(b"a\nb\x1b\xff"), "a\\nb\\x1b\\xff");
        assert_eq!(escape("\u{2028}\t\r".as_bytes()), "\\xe2\\x80\\xa8\\t\\r");
    }

    #[test]
    fn write_subset_keeps_message_and_chosen_recipients() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("A.h");
        let mut bytes = netstring::encode(b"qmqpd-queue 1\nqueue_id=A\n");
        bytes.extend(netstring::encode(b"message\n"));
        bytes.extend(netstring::encode(b"s@x"));
        for rcpt in [&b"a@x"[..], b"b@x", b"c@x"] {
            bytes.extend(netstring::encode(rcpt));
        }
        std::fs::write(&path, &bytes).unwrap();
        let envelope = read_envelope(&path).unwrap();
        assert_eq!(envelope.message_len, 8);
        let mut out = Vec::new();
        write_subset(&path, &envelope, &[0, 2], &mut out).unwrap();
        std::fs::write(&path, &out).unwrap();
        let copy = read_envelope(&path).unwrap();
        assert_eq!(copy.recipients, [b"a@x".to_vec(), b"c@x".to_vec()]);
        assert_eq!(copy.attributes, envelope.attributes);
    }
}
