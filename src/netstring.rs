//! Netstring codec (`LEN:BYTES,`) over `BufRead`/`Write`.
//!
//! Owns the byte-level rules: decimal length without leading zeros, checked arithmetic,
//! every read bounded by an explicit limit or budget. It does not know what a netstring
//! means (message, sender, recipient, reply, queue file field): that is the job of `session`,
//! `client` and `queue`, which all read and write netstrings through this module only.

use std::fmt;
use std::io::{self, BufRead, Read, Write};

/// Why a netstring could not be read.
#[derive(Debug)]
pub enum NetstringError {
    /// The peer closed the connection, or a read failed for another reason.
    Lost(io::Error),
    /// A read timed out (`io::ErrorKind::TimedOut` or `WouldBlock` from the reader).
    Timeout(io::Error),
    /// The bytes are not a netstring (non-digit, leading zero, missing `:` or `,`).
    Format,
    /// The length does not fit in 64 bits.
    Overflow,
}

impl fmt::Display for NetstringError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetstringError::Lost(e) => write!(f, "lost connection: {e}"),
            NetstringError::Timeout(_) => f.write_str("read timeout"),
            NetstringError::Format => f.write_str("netstring format error"),
            NetstringError::Overflow => f.write_str("netstring length does not fit in 64 bits"),
        }
    }
}

impl std::error::Error for NetstringError {}

impl From<io::Error> for NetstringError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => NetstringError::Timeout(e),
            _ => NetstringError::Lost(e),
        }
    }
}

/// Reads one byte; end of input is `Lost(UnexpectedEof)`.
pub(crate) fn read_byte<R: BufRead>(rdr: &mut R) -> Result<u8, NetstringError> {
    loop {
        let buf = match rdr.fill_buf() {
            Ok(buf) => buf,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        let Some(&byte) = buf.first() else {
            return Err(NetstringError::Lost(io::ErrorKind::UnexpectedEof.into()));
        };
        rdr.consume(1);
        return Ok(byte);
    }
}

/// Reads `LEN:` and returns LEN; every byte read (digits and `:`) is charged to `budget`
/// when one is given, and running out of budget is a format error.
pub fn read_len<R: BufRead>(
    rdr: &mut R,
    mut budget: Option<&mut u64>,
) -> Result<u64, NetstringError> {
    let mut len: u64 = 0;
    let mut digits = 0u32;
    loop {
        if let Some(left) = budget.as_deref_mut() {
            *left = left.checked_sub(1).ok_or(NetstringError::Format)?;
        }
        let byte = read_byte(rdr)?;
        match byte {
            b'0'..=b'9' => {
                if digits == 1 && len == 0 {
                    return Err(NetstringError::Format); // leading zero
                }
                len = len
                    .checked_mul(10)
                    .and_then(|l| l.checked_add(u64::from(byte - b'0')))
                    .ok_or(NetstringError::Overflow)?;
                digits += 1;
            }
            b':' if digits > 0 => return Ok(len),
            _ => return Err(NetstringError::Format),
        }
    }
}

/// Reads the `LEN:` of a netstring from an unbuffered `rdr` in a read or two instead of a
/// read a byte, yet never past the netstring's end: after d digits, the first not `0`, the
/// netstring is known to be at least d + 1 + 10^(d-1) + 1 bytes long, so that much may be
/// asked for. Returns LEN and appends what was read after the `:` to `rest` (at most
/// LEN + 1 bytes, all of them the netstring's). `arrived` is called when the first byte is
/// in. Errors as `read_len`.
pub fn read_len_ahead<R: Read>(
    rdr: &mut R,
    rest: &mut Vec<u8>,
    mut arrived: impl FnMut(),
) -> Result<u64, NetstringError> {
    // More than the 20 digits of the largest u64 and its `:`.
    let mut got = [0u8; 32];
    let mut have = 0;
    loop {
        let mut seen = io::Cursor::new(&got[..have]);
        match read_len(&mut seen, None) {
            Ok(len) => {
                let used = usize::try_from(seen.position()).unwrap_or(have);
                rest.extend_from_slice(&got[used..have]);
                return Ok(len);
            }
            Err(NetstringError::Lost(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
        // Only digits so far; a leading 0 can only be the length 0.
        let least_len = match (have, got[0]) {
            (0, _) | (_, b'0') => 0,
            (digits, _) => 10u64.saturating_pow(u32::try_from(digits - 1).unwrap_or(u32::MAX)),
        };
        let least_total = least_len.saturating_add(have as u64 + 2);
        let room = got.len() - have;
        let want = usize::try_from(least_total - have as u64).map_or(room, |w| w.min(room));
        let n = loop {
            match rdr.read(&mut got[have..have + want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(NetstringError::Lost(io::ErrorKind::UnexpectedEof.into()));
        }
        if have == 0 {
            arrived();
        }
        have += n;
    }
}

/// Reads the `,` that ends a netstring.
pub fn read_comma<R: BufRead>(rdr: &mut R) -> Result<(), NetstringError> {
    match read_byte(rdr)? {
        b',' => Ok(()),
        _ => Err(NetstringError::Format),
    }
}

/// Reads exactly `len` bytes into `buf` (which the caller has bounded).
pub fn read_exact_into<R: BufRead>(
    rdr: &mut R,
    len: usize,
    buf: &mut Vec<u8>,
) -> Result<(), NetstringError> {
    buf.clear();
    let mut left = len;
    while left > 0 {
        let chunk = fill(rdr)?;
        let n = chunk.len().min(left);
        buf.extend_from_slice(&chunk[..n]);
        rdr.consume(n);
        left -= n;
    }
    Ok(())
}

/// Reads and discards exactly `len` bytes.
pub fn skip<R: BufRead>(rdr: &mut R, len: u64) -> Result<(), NetstringError> {
    let mut left = len;
    while left > 0 {
        let chunk = fill(rdr)?;
        let n = usize::try_from(left).map_or(chunk.len(), |l| chunk.len().min(l));
        rdr.consume(n);
        left -= n as u64;
    }
    Ok(())
}

/// Returns the reader's buffered bytes, refilling it; end of input is an error.
pub fn fill<R: BufRead>(rdr: &mut R) -> Result<&[u8], NetstringError> {
    // Two-step borrow: retry on EINTR without holding the buffer.
    loop {
        match rdr.fill_buf() {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
    let buf = rdr.fill_buf()?;
    if buf.is_empty() {
        return Err(NetstringError::Lost(io::ErrorKind::UnexpectedEof.into()));
    }
    Ok(buf)
}

/// Writes `LEN:` for a netstring of `len` bytes.
pub(crate) fn write_len<W: Write>(wtr: &mut W, len: u64) -> io::Result<()> {
    write!(wtr, "{len}:")
}

/// Writes a whole netstring.
pub(crate) fn write_netstring<W: Write>(wtr: &mut W, data: &[u8]) -> io::Result<()> {
    write_len(wtr, data.len() as u64)?;
    wtr.write_all(data)?;
    wtr.write_all(b",")
}

/// The number of bytes `LEN:` takes for a given length.
pub fn len_prefix_size(len: u64) -> u64 {
    u64::from(len.checked_ilog10().unwrap_or(0)) + 2
}

/// The number of bytes a whole netstring of `len` payload bytes takes (`LEN:`, payload,
/// `,`), or None when that does not fit in 64 bits.
pub(crate) fn encoded_len(len: u64) -> Option<u64> {
    len_prefix_size(len).checked_add(len)?.checked_add(1)
}

/// Encodes a whole netstring into a new vector.
pub fn encode(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 22);
    // Writing into a Vec cannot fail.
    let _ = write_netstring(&mut out, data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn len_of(bytes: &[u8]) -> Result<u64, NetstringError> {
        read_len(&mut Cursor::new(bytes), None)
    }

    #[test]
    fn read_len_accepts_zero_and_numbers() {
        assert_eq!(len_of(b"0:").unwrap(), 0);
        assert_eq!(len_of(b"12:").unwrap(), 12);
        assert_eq!(len_of(b"18446744073709551615:").unwrap(), u64::MAX);
    }

    #[test]
    fn read_len_rejects_leading_zero() {
        assert!(matches!(len_of(b"01:"), Err(NetstringError::Format)));
        assert!(matches!(len_of(b"00:"), Err(NetstringError::Format)));
    }

    #[test]
    fn read_len_rejects_non_digits_and_empty() {
        assert!(matches!(len_of(b":"), Err(NetstringError::Format)));
        assert!(matches!(len_of(b"1a:"), Err(NetstringError::Format)));
        assert!(matches!(len_of(b" 1:"), Err(NetstringError::Format)));
        assert!(matches!(len_of(b"-1:"), Err(NetstringError::Format)));
    }

    #[test]
    fn read_len_reports_overflow() {
        assert!(matches!(
            len_of(b"18446744073709551616:"),
            Err(NetstringError::Overflow)
        ));
        assert!(matches!(
            len_of(b"99999999999999999999999999:"),
            Err(NetstringError::Overflow)
        ));
    }

    #[test]
    fn read_len_reports_eof_as_lost() {
        assert!(matches!(len_of(b"12"), Err(NetstringError::Lost(_))));
        assert!(matches!(len_of(b""), Err(NetstringError::Lost(_))));
    }

    #[test]
    fn read_len_charges_budget() {
        let mut budget = 3;
        assert_eq!(
            read_len(&mut Cursor::new(b"12:"), Some(&mut budget)).unwrap(),
            12
        );
        assert_eq!(budget, 0);
        let mut budget = 2;
        assert!(matches!(
            read_len(&mut Cursor::new(b"12:"), Some(&mut budget)),
            Err(NetstringError::Format)
        ));
    }

    #[test]
    fn skip_and_read_exact_stop_at_eof() {
        let mut rdr = Cursor::new(b"abc".to_vec());
        assert!(matches!(skip(&mut rdr, 4), Err(NetstringError::Lost(_))));
        let mut rdr = Cursor::new(b"abcdef".to_vec());
        let mut buf = Vec::new();
        read_exact_into(&mut rdr, 4, &mut buf).unwrap();
        assert_eq!(buf, b"abcd");
        skip(&mut rdr, 2).unwrap();
        assert!(matches!(read_byte(&mut rdr), Err(NetstringError::Lost(_))));
    }

    #[test]
    fn read_comma_rejects_other_bytes() {
        assert!(read_comma(&mut Cursor::new(b",")).is_ok());
        assert!(matches!(
            read_comma(&mut Cursor::new(b";")),
            Err(NetstringError::Format)
        ));
    }

    #[test]
    fn encode_and_prefix_size_agree() {
        for len in [0usize, 1, 9, 10, 99, 100, 12345] {
            let data = vec![b'x'; len];
            let enc = encode(&data);
            assert_eq!(
                enc.len() as u64,
                len_prefix_size(len as u64) + len as u64 + 1
            );
        }
        assert_eq!(encode(b"hello"), b"5:hello,");
    }

    #[test]
    fn encoded_len_counts_digit_boundaries_and_overflow() {
        assert_eq!(encoded_len(0), Some(3));
        assert_eq!(encoded_len(9), Some(12));
        assert_eq!(encoded_len(10), Some(14));
        assert_eq!(encoded_len(u64::MAX - 22), Some(u64::MAX));
        assert_eq!(encoded_len(u64::MAX - 21), None);
        assert_eq!(len_prefix_size(u64::MAX), 21);
    }

    #[test]
    fn timeout_errors_map_to_timeout() {
        let e: NetstringError = io::Error::from(io::ErrorKind::WouldBlock).into();
        assert!(matches!(e, NetstringError::Timeout(_)));
    }

    /// A reader over `bytes` that hands out at most `chunk` bytes a read and counts them.
    struct Trickle<'a> {
        bytes: &'a [u8],
        chunk: usize,
        taken: usize,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk).min(self.bytes.len() - self.taken);
            buf[..n].copy_from_slice(&self.bytes[self.taken..self.taken + n]);
            self.taken += n;
            Ok(n)
        }
    }

    #[test]
    fn read_len_ahead_never_reads_past_the_netstring() {
        for len in [0usize, 1, 9, 10, 11, 99, 100, 1064, 12_345] {
            let mut bytes = encode(&vec![b'x'; len]);
            let end = bytes.len();
            bytes.extend_from_slice(b"AFTER THE END, NEVER TO BE READ");
            for chunk in [1, 2, 3, 7, 64, 1 << 20] {
                let mut rdr = Trickle {
                    bytes: &bytes,
                    chunk,
                    taken: 0,
                };
                let (mut rest, mut arrived) = (Vec::new(), 0);
                let got = read_len_ahead(&mut rdr, &mut rest, || arrived += 1).unwrap();
                assert_eq!(got, len as u64, "{len} in reads of {chunk}");
                assert_eq!(arrived, 1);
                assert!(rdr.taken <= end, "{len}: read {} of {end}", rdr.taken);
                let colon = usize::try_from(len_prefix_size(len as u64)).unwrap();
                assert_eq!(rest, bytes[colon..rdr.taken], "{len} in reads of {chunk}");
            }
        }
    }

    #[test]
    fn read_len_ahead_reports_errors_as_read_len() {
        let ahead = |bytes: &[u8]| {
            let mut rdr = Trickle {
                bytes,
                chunk: 1 << 20,
                taken: 0,
            };
            let mut arrived = false;
            let got = read_len_ahead(&mut rdr, &mut Vec::new(), || arrived = true);
            (got, arrived)
        };
        assert!(matches!(ahead(b""), (Err(NetstringError::Lost(_)), false)));
        assert!(matches!(ahead(b"12"), (Err(NetstringError::Lost(_)), true)));
        assert!(matches!(
            ahead(b"01:x,"),
            (Err(NetstringError::Format), true)
        ));
        assert!(matches!(ahead(b"1x:"), (Err(NetstringError::Format), true)));
        assert!(matches!(ahead(b":"), (Err(NetstringError::Format), true)));
        assert!(matches!(
            ahead(b"123456789012345678901234:"),
            (Err(NetstringError::Overflow), true)
        ));
    }
}
