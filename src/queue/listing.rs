//! What `qmqp-queue list` and `show` print: one line per message (for people, or one JSON
//! object per line), a `mailq`-style total, and one message's attributes, envelope, reason
//! and bytes exactly as stored.
//!
//! Output goes to the writers the caller gives; the outcome says how it ended, and the
//! program maps it to an exit status. Nothing here changes the queue.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

use super::{
    Envelope, Message, State, escape, failure_reason, find_message, list_messages, read_envelope,
};

/// How a `list` or `show` ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listed {
    /// Everything was shown (or the reader closed the pipe, as `| head` does).
    Done,
    /// `show` found no such message.
    NoSuchMessage,
    /// The queue or a queue file could not be read, or the output could not be written.
    Unreadable,
    /// `show`: the message kept moving between directories while we looked.
    KeepsMoving,
}

/// A JSON string literal for bytes (invalid UTF-8 becomes U+FFFD).
fn json_string(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `arrival_time` (`secs.micros`) as an ISO 8601 UTC date, or None when it is not one.
fn arrival_date(value: &str) -> Option<String> {
    let secs_text = value.split('.').next()?;
    if secs_text.is_empty() || !secs_text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs_text.parse().ok()?;
    let c = crate::date::civil(secs);
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    ))
}

/// `arrival_time` when it is a plain decimal number (for JSON), else None.
fn arrival_number(value: &str) -> Option<&str> {
    let mut parts = value.splitn(2, '.');
    let whole = parts.next()?;
    let frac = parts.next();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(whole) && frac.is_none_or(digits)).then_some(value)
}

/// One `list` line for people.
fn list_line(m: &Message, env: &Envelope) -> String {
    let arrival = env
        .attributes
        .get("arrival_time")
        .and_then(arrival_date)
        .unwrap_or_else(|| "-".into());
    format!(
        "{:<18} {:<4} {:>10} {:<20} {:>5}  <{}>",
        m.queue_id,
        m.state.dir_name(),
        env.message_len,
        arrival,
        env.recipients.len(),
        escape(&env.sender)
    )
}

/// One `list --json` line: an object per message.
fn json_line(m: &Message, env: &Envelope) -> String {
    let arrival = env
        .attributes
        .get("arrival_time")
        .and_then(arrival_number)
        .unwrap_or("null");
    let recipients: Vec<String> = env.recipients.iter().map(|r| json_string(r)).collect();
    format!(
        "{{\"queue_id\":{},\"file\":{},\"state\":\"{}\",\"arrival_time\":{},\"size\":{},\"sender\":{},\"nrcpt\":{},\"recipients\":[{}]}}",
        json_string(m.queue_id.as_bytes()),
        json_string(m.name.as_encoded_bytes()),
        m.state.dir_name(),
        arrival,
        env.message_len,
        json_string(&env.sender),
        env.recipients.len(),
        recipients.join(",")
    )
}

/// The `list` total line, in `mailq`'s words.
fn total_line(count: usize, bytes: u64) -> String {
    if count == 0 {
        return "Mail queue is empty".into();
    }
    let kbytes = bytes.div_ceil(1024);
    let plural = if count == 1 { "" } else { "s" };
    format!("-- {kbytes} Kbytes in {count} Request{plural}.")
}

/// Ends a listing when writing failed: a closed pipe (`| head`) is not an error worth a
/// message.
fn output_status<E: Write>(result: io::Result<()>, err: &mut E) -> Option<Listed> {
    match result {
        Ok(()) => None,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Some(Listed::Done),
        Err(e) => {
            let _ = writeln!(err, "qmqp-queue: cannot write output: {e}");
            Some(Listed::Unreadable)
        }
    }
}

/// `list`: the messages in `new/` and `cur/`, oldest first, and a total.
pub fn list<W: Write, E: Write>(queue_dir: &Path, json: bool, out: W, err: &mut E) -> Listed {
    let messages = match list_messages(queue_dir, &[State::New, State::Cur]) {
        Ok(messages) => messages,
        Err(e) => {
            let _ = writeln!(err, "qmqp-queue: fatal: {e}");
            return Listed::Unreadable;
        }
    };
    let mut out = BufWriter::new(out);
    let mut unreadable = false;
    let mut count = 0usize;
    let mut bytes = 0u64;
    if !json && !messages.is_empty() {
        let header = format!(
            "{:<18} {:<4} {:>10} {:<20} {:>5}  SENDER",
            "QUEUE_ID", "STATE", "SIZE", "ARRIVAL", "NRCPT"
        );
        if let Some(end) = output_status(writeln!(out, "{header}"), err) {
            return end;
        }
    }
    for m in &messages {
        let env = match read_envelope(&m.path) {
            Ok(env) => env,
            // Delivered or moved since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = out.flush();
                let _ = writeln!(
                    err,
                    "qmqp-queue: warning: cannot read {}: {e}",
                    m.path.display()
                );
                unreadable = true;
                continue;
            }
        };
        count += 1;
        bytes = bytes.saturating_add(env.message_len);
        let line = if json {
            json_line(m, &env)
        } else {
            list_line(m, &env)
        };
        if let Some(end) = output_status(writeln!(out, "{line}"), err) {
            return end;
        }
    }
    if !json && let Some(end) = output_status(writeln!(out, "{}", total_line(count, bytes)), err) {
        return end;
    }
    if let Some(end) = output_status(out.flush(), err) {
        return end;
    }
    if unreadable {
        Listed::Unreadable
    } else {
        Listed::Done
    }
}

/// `show`: attributes, envelope, then the message exactly as stored.
pub fn show<W: Write, E: Write>(queue_dir: &Path, id: &str, out: W, err: &mut E) -> Listed {
    let mut out = BufWriter::new(out);
    // A message can move between directories while we look (claimed, deferred): look again.
    for _attempt in 0..3 {
        let message = match find_message(queue_dir, id) {
            Ok(Some(m)) => m,
            Ok(None) => {
                let _ = writeln!(
                    err,
                    "qmqp-queue: no message \"{}\" in {}",
                    id.escape_debug(),
                    queue_dir.display()
                );
                return Listed::NoSuchMessage;
            }
            Err(e) => {
                let _ = writeln!(err, "qmqp-queue: fatal: {e}");
                return Listed::Unreadable;
            }
        };
        let env = match read_envelope(&message.path) {
            Ok(env) => env,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = writeln!(
                    err,
                    "qmqp-queue: cannot read {}: {e}",
                    message.path.display()
                );
                return Listed::Unreadable;
            }
        };
        let mut file = match File::open(&message.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = writeln!(
                    err,
                    "qmqp-queue: cannot open {}: {e}",
                    message.path.display()
                );
                return Listed::Unreadable;
            }
        };
        let written = write_show(&mut out, &message, &env, &mut file).and_then(|()| out.flush());
        return output_status(written, err).unwrap_or(Listed::Done);
    }
    let _ = writeln!(
        err,
        "qmqp-queue: message \"{}\" keeps moving: try again",
        id.escape_debug()
    );
    Listed::KeepsMoving
}

/// Writes `show`'s output; the message is copied from `file` byte for byte.
fn write_show<W: Write>(
    out: &mut W,
    message: &Message,
    env: &Envelope,
    file: &mut File,
) -> io::Result<()> {
    writeln!(out, "*** ATTRIBUTES ***")?;
    for (name, value) in &env.attributes.pairs {
        writeln!(
            out,
            "{}={}",
            escape(name.as_bytes()),
            escape(value.as_bytes())
        )?;
    }
    writeln!(out, "*** ENVELOPE ***")?;
    writeln!(
        out,
        "file: {}/{}",
        message.state.dir_name(),
        escape(message.name.as_encoded_bytes())
    )?;
    writeln!(out, "state: {}", message.state.dir_name())?;
    writeln!(out, "size: {}", env.message_len)?;
    writeln!(out, "sender: <{}>", escape(&env.sender))?;
    for rcpt in &env.recipients {
        writeln!(out, "recipient: <{}>", escape(rcpt))?;
    }
    if let Some(reason) = failure_reason(message) {
        for line in reason.lines() {
            writeln!(out, "reason: {}", escape(line.as_bytes()))?;
        }
    }
    writeln!(out, "*** MESSAGE ***")?;
    file.seek(SeekFrom::Start(env.message_offset))?;
    let copied = io::copy(&mut file.take(env.message_len), out)?;
    if copied != env.message_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("message ended after {copied} of {} bytes", env.message_len),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_string_escapes_quotes_and_controls() {
        assert_eq!(json_string(b"a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(json_string(b"\xff"), "\"\u{fffd}\"");
    }

    #[test]
    fn arrival_formats_validate_the_attribute() {
        assert_eq!(
            arrival_date("1764333296.123456").as_deref(),
            Some("2025-11-28T12:34:56Z")
        );
        assert_eq!(arrival_date("x"), None);
        assert_eq!(
            arrival_number("1764333296.123456"),
            Some("1764333296.123456")
        );
        assert_eq!(arrival_number("17643"), Some("17643"));
        assert_eq!(arrival_number("1.2.3"), None);
        assert_eq!(arrival_number("1."), None);
        assert_eq!(arrival_number("nan"), None);
    }

    #[test]
    fn total_line_speaks_like_mailq() {
        assert_eq!(total_line(0, 0), "Mail queue is empty");
        assert_eq!(total_line(1, 1), "-- 1 Kbytes in 1 Request.");
        assert_eq!(total_line(3, 2049), "-- 3 Kbytes in 3 Requests.");
    }
}
