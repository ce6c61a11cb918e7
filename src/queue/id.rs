//! Queue IDs and queue file names: `QUEUEID.HOSTNAME`, the ID unique on this host and sorting
//! by arrival time, the host part escaped as maildir asks.
//!
//! Owns how names are made and read back; it does not know directories or file contents.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Suffix of the file in `failed/` that records why a message failed.
pub(crate) const REASON_SUFFIX: &str = ".reason";

/// Digits of the queue ID, in ascending byte order so IDs sort by time.
const ID_DIGITS: &[u8; 32] = b"0123456789ABCDEFGHIJKLMNOPQRSTUV";

static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

/// This process's ID, asked of the kernel once (qmqpd never forks).
static PROCESS_ID: OnceLock<u32> = OnceLock::new();

/// A new queue ID: arrival time in microseconds (11 digits), process ID (5 digits) and a
/// per-process counter (2 digits), base 32. Unique on this host; sorts by arrival time.
pub fn new_queue_id(now: SystemTime) -> String {
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let counter = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(18);
    push_base32(&mut id, micros, 11);
    push_base32(
        &mut id,
        u64::from(*PROCESS_ID.get_or_init(std::process::id)),
        5,
    );
    push_base32(&mut id, u64::from(counter), 2);
    id
}

/// Appends the low `width` base-32 digits of `value`, most significant first.
fn push_base32(out: &mut String, value: u64, width: u32) {
    for i in (0..width).rev() {
        let digit = (value >> (5 * i)) & 31;
        out.push(char::from(ID_DIGITS[digit as usize]));
    }
}

/// Makes a host name safe for a maildir file name, as maildir asks (`/` and `:` escaped).
pub(crate) fn file_name_host(host: &str) -> String {
    let mut out = String::with_capacity(host.len());
    for c in host.chars() {
        match c {
            '/' => out.push_str("\\057"),
            ':' => out.push_str("\\072"),
            c if c.is_ascii_graphic() => out.push(c),
            _ => out.push('_'),
        }
    }
    out
}

/// The queue ID part of a queue file name (up to the first dot), lossily decoded.
pub(crate) fn queue_id_of(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    let id = bytes.split(|&b| b == b'.').next().unwrap_or(bytes);
    String::from_utf8_lossy(id).into_owned()
}

/// True for names that are queue files: not hidden, not a `failed/` reason file.
pub(crate) fn is_queue_file_name(name: &OsStr) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty() && !bytes.starts_with(b".") && !bytes.ends_with(REASON_SUFFIX.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn queue_ids_sort_by_time_and_are_unique() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = new_queue_id(t0);
        let b = new_queue_id(t0);
        let c = new_queue_id(t0 + Duration::from_micros(1));
        let d = new_queue_id(t0 + Duration::from_secs(1));
        assert_eq!(a.len(), 18);
        assert_ne!(a, b);
        assert!(a < c && c < d && b < c, "{a} {b} {c} {d}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn file_name_host_escapes_maildir_characters() {
        assert_eq!(file_name_host("a/b:c d"), "a\\057b\\072c_d");
    }

    #[test]
    fn queue_id_of_stops_at_first_dot() {
        assert_eq!(queue_id_of(OsStr::new("ABC.host.example")), "ABC");
        assert_eq!(queue_id_of(OsStr::new("ABC")), "ABC");
    }

    #[test]
    fn is_queue_file_name_skips_hidden_and_reason_files() {
        assert!(is_queue_file_name(OsStr::new("A.h")));
        assert!(!is_queue_file_name(OsStr::new(".A.h")));
        assert!(!is_queue_file_name(OsStr::new("A.h.reason")));
        assert!(!is_queue_file_name(OsStr::new("")));
    }
}
