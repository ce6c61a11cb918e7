//! Reading `main.cf`: physical lines joined into logical `name = value` lines, comments and
//! blank lines skipped, as Postfix reads it; and the `-o name=value` argument syntax. Knows
//! nothing about which names exist or what their values mean.

use std::borrow::Cow;
use std::io::BufRead;
use std::path::PathBuf;

use super::ConfigError;

/// One logical `name = value` line of `main.cf`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The physical line the logical line starts on (1-based).
    pub line: usize,
    /// The parameter name.
    pub name: String,
    /// The raw value: unexpanded, surrounding whitespace removed.
    pub value: String,
}

/// Parse main.cf text into (line number, name, raw value) entries (logical lines joined).
///
/// Warnings (a continuation line with nothing before it, a NUL byte) are dropped here;
/// [`load`](super::load) reports them in [`Config::warnings`](super::Config::warnings).
pub fn parse<R: BufRead>(reader: R, origin: &str) -> Result<Vec<Entry>, ConfigError> {
    read_entries(reader, origin, &mut Vec::new())
}

/// [`parse`], collecting warnings.
pub(crate) fn read_entries<R: BufRead>(
    mut reader: R,
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<Vec<Entry>, ConfigError> {
    /// What the lines read so far have left open.
    #[derive(Clone, Copy)]
    enum Pending {
        Nothing,
        /// Continuation lines before any logical line: warned about once, then skipped.
        Orphan,
        /// A logical line that started on this physical line.
        Line(usize),
    }

    let mut entries = Vec::new();
    let mut logical: Vec<u8> = Vec::new();
    let mut physical: Vec<u8> = Vec::new();
    let mut pending = Pending::Nothing;
    let mut line_number = 0usize;
    loop {
        physical.clear();
        let read = reader
            .read_until(b'\n', &mut physical)
            .map_err(|source| ConfigError::Read {
                path: PathBuf::from(origin),
                source,
            })?;
        if read == 0 {
            break;
        }
        line_number = line_number.saturating_add(1);
        if physical.last() == Some(&b'\n') {
            physical.pop();
        }
        // CRLF files: the CR is whitespace to Postfix; dropping it per physical line keeps
        // it out of joined values.
        if physical.last() == Some(&b'\r') {
            physical.pop();
        }
        match physical.iter().find(|&&byte| !is_space_byte(byte)) {
            None | Some(b'#') => continue,
            Some(_) => {}
        }
        let continues = physical.first().is_some_and(|&byte| is_space_byte(byte));
        match (&pending, continues) {
            (Pending::Line(_), true) => logical.extend_from_slice(&physical),
            (Pending::Orphan, true) => {}
            (Pending::Nothing, true) => {
                let text = String::from_utf8_lossy(&physical);
                warnings.push(format!(
                    "{origin}, line {line_number}: logical line must not start with whitespace: \"{}\"",
                    shorten(text.trim_start_matches(is_space), 30)
                ));
                pending = Pending::Orphan;
            }
            (_, false) => {
                if let Pending::Line(first) = pending {
                    entries.push(finish_entry(&mut logical, first, origin, warnings)?);
                }
                logical.clear();
                logical.extend_from_slice(&physical);
                pending = Pending::Line(line_number);
            }
        }
    }
    if let Pending::Line(first) = pending {
        entries.push(finish_entry(&mut logical, first, origin, warnings)?);
    }
    Ok(entries)
}

/// Turn one logical line into an entry.
fn finish_entry(
    logical: &mut Vec<u8>,
    line: usize,
    origin: &str,
    warnings: &mut Vec<String>,
) -> Result<Entry, ConfigError> {
    if let Some(nul) = logical.iter().position(|&byte| byte == 0) {
        // Postfix handles the line as a C string, so it ends at the NUL.
        warnings.push(format!(
            "{origin}, line {line}: text after null byte ignored"
        ));
        logical.truncate(nul);
    }
    let text = std::str::from_utf8(logical).map_err(|_| ConfigError::Syntax {
        origin: format!("{origin}, line {line}"),
        reason: "invalid UTF-8",
        text: String::from_utf8_lossy(logical).into_owned(),
    })?;
    let (name, value) = split_nameval(text).map_err(|reason| ConfigError::Syntax {
        origin: format!("{origin}, line {line}"),
        reason,
        text: text.to_owned(),
    })?;
    Ok(Entry {
        line,
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

/// Postfix's whitespace (isspace in the C locale).
pub(crate) fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// [`is_space`] for bytes.
fn is_space_byte(byte: u8) -> bool {
    is_space(char::from(byte))
}

/// A parameter-name character: `[A-Za-z0-9_]`.
pub(crate) fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// At most `max` characters of `text`, with `...` when cut.
pub(crate) fn shorten(text: &str, max: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((cut, _)) => Cow::Owned(format!("{}...", text.get(..cut).unwrap_or(text))),
        None => Cow::Borrowed(text),
    }
}

/// Split `name = value` as Postfix's split_nameval does: whitespace around the name, the
/// `=` and the value is dropped; the name ends at whitespace or `=`.
fn split_nameval(text: &str) -> Result<(&str, &str), &'static str> {
    let text = text.trim_start_matches(is_space);
    if text.is_empty() || text.starts_with('=') {
        return Err("missing attribute name");
    }
    let name_end = text
        .find(|c: char| is_space(c) || c == '=')
        .unwrap_or(text.len());
    let (name, rest) = text.split_at(name_end);
    let value = rest
        .trim_start_matches(is_space)
        .strip_prefix('=')
        .ok_or("missing '=' after attribute name")?;
    // Only names that `$name` can refer to, so `qmqpd -n` output always reads back.
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err("attribute name holds characters other than letters, digits and '_'");
    }
    Ok((name, value.trim_matches(is_space)))
}

/// Split one `-o` argument: `name=value`, or `{ name = value }` as master.cf allows.
pub(crate) fn split_override(arg: &str) -> Result<(&str, &str), ConfigError> {
    let syntax = |reason| ConfigError::Syntax {
        origin: format!("-o {arg}"),
        reason,
        text: arg.to_owned(),
    };
    let trimmed = arg.trim_matches(is_space);
    let inner = match trimmed.strip_prefix('{') {
        Some(rest) => rest
            .strip_suffix('}')
            .ok_or_else(|| syntax("missing '}' at end of \"{ name = value }\""))?,
        None => trimmed,
    };
    split_nameval(inner).map_err(syntax)
}
