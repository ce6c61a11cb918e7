//! The two date formats qmqpd writes, in UTC.
//!
//! Owns the conversion from Unix seconds to a broken-down UTC date (through the `time`
//! crate's calendar) and its rendering as an RFC 5322 date (our Received: header) and as an
//! RFC 3164 syslog stamp (`maillog_file`).
//! It knows nothing of time zones: everything is UTC, as the `syslog` crate's stamps are.
//! Times before 1970 are clamped to the epoch by the `SystemTime` formatters.

use std::time::{SystemTime, UNIX_EPOCH};

use time::{OffsetDateTime, PrimitiveDateTime};

/// Broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    /// Proleptic Gregorian year, e.g. 2026.
    pub year: i64,
    /// Month of the year, 1 to 12.
    pub month: u32,
    /// Day of the month, 1 to 31.
    pub day: u32,
    /// Hour, 0 to 23.
    pub hour: u32,
    /// Minute, 0 to 59.
    pub minute: u32,
    /// Second, 0 to 59 (Unix time has no leap seconds).
    pub second: u32,
    /// Day of the week, 0 = Sunday to 6 = Saturday.
    pub weekday: u32,
}

const MONTH_NAMES: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const WEEKDAY_NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];

/// Splits Unix seconds into a UTC calendar date and time of day (the `time` crate's
/// calendar). Times beyond what it represents (years -9999 to 9999) are clamped to its
/// first or last second.
pub fn civil(unix_secs: i64) -> Civil {
    let t = OffsetDateTime::from_unix_timestamp(unix_secs).unwrap_or_else(|_| {
        if unix_secs < 0 {
            PrimitiveDateTime::MIN.assume_utc()
        } else {
            PrimitiveDateTime::MAX.assume_utc()
        }
    });
    Civil {
        year: i64::from(t.year()),
        month: u32::from(u8::from(t.month())),
        day: u32::from(t.day()),
        hour: u32::from(t.hour()),
        minute: u32::from(t.minute()),
        second: u32::from(t.second()),
        weekday: u32::from(t.weekday().number_days_from_sunday()),
    }
}

/// Unix seconds of a `SystemTime`, clamped to the epoch for earlier times.
fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(elapsed) => i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    }
}

fn month_name(month: u32) -> &'static str {
    usize::try_from(month)
        .ok()
        .and_then(|m| m.checked_sub(1))
        .and_then(|i| MONTH_NAMES.get(i))
        .copied()
        .unwrap_or("???")
}

fn weekday_name(weekday: u32) -> &'static str {
    usize::try_from(weekday)
        .ok()
        .and_then(|i| WEEKDAY_NAMES.get(i))
        .copied()
        .unwrap_or("???")
}

/// RFC 5322 date: "Sat, 28 Nov 2026 12:40:57 +0000"
///
/// The day of the month is not padded ("Sun, 1 Nov 2026 ..."), as in RFC 5322's examples.
pub(crate) fn rfc5322(t: SystemTime) -> String {
    let c = civil(unix_seconds(t));
    format!(
        "{}, {} {} {:04} {:02}:{:02}:{:02} +0000",
        weekday_name(c.weekday),
        c.day,
        month_name(c.month),
        c.year,
        c.hour,
        c.minute,
        c.second
    )
}

/// syslog RFC 3164 stamp: "Nov 28 12:40:57" (day space-padded as rsyslog shows "Nov  8")
pub(crate) fn syslog_stamp(t: SystemTime) -> String {
    let c = civil(unix_seconds(t));
    format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        month_name(c.month),
        c.day,
        c.hour,
        c.minute,
        c.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn ymd(c: Civil) -> (i64, u32, u32) {
        (c.year, c.month, c.day)
    }

    #[test]
    fn civil_epoch_is_thursday_1970_01_01() {
        let c = civil(0);
        assert_eq!(
            c,
            Civil {
                year: 1970,
                month: 1,
                day: 1,
                hour: 0,
                minute: 0,
                second: 0,
                weekday: 4
            }
        );
    }

    #[test]
    fn civil_leap_day_2000() {
        // 2000-02-29 00:00:00 UTC, a Tuesday (2000 is a leap year: divisible by 400).
        let c = civil(951_782_400);
        assert_eq!(ymd(c), (2000, 2, 29));
        assert_eq!(c.weekday, 2);
        assert_eq!(ymd(civil(951_782_400 + 86_400)), (2000, 3, 1));
    }

    #[test]
    fn civil_leap_day_2024() {
        // 2024-02-29 12:34:56 UTC, a Thursday.
        let c = civil(1_709_210_096);
        assert_eq!(ymd(c), (2024, 2, 29));
        assert_eq!((c.hour, c.minute, c.second, c.weekday), (12, 34, 56, 4));
    }

    #[test]
    fn civil_2100_is_not_leap() {
        // 2100-03-01 00:00:00 UTC, a Monday; the day before is 2100-02-28.
        let c = civil(4_107_542_400);
        assert_eq!(ymd(c), (2100, 3, 1));
        assert_eq!(c.weekday, 1);
        assert_eq!(ymd(civil(4_107_542_400 - 1)), (2100, 2, 28));
    }

    #[test]
    fn civil_handles_times_before_epoch() {
        let c = civil(-1);
        assert_eq!(ymd(c), (1969, 12, 31));
        assert_eq!((c.hour, c.minute, c.second, c.weekday), (23, 59, 59, 3));
    }

    #[test]
    fn civil_extremes_do_not_panic() {
        assert_eq!(civil(i64::MAX).year, 9999);
        assert_eq!(civil(i64::MIN).year, -9999);
    }

    #[test]
    fn rfc5322_formats_2026_date() {
        // 2026-11-28 12:40:57 UTC.
        assert_eq!(
            rfc5322(at(1_795_869_657)),
            "Sat, 28 Nov 2026 12:40:57 +0000"
        );
    }

    #[test]
    fn rfc5322_does_not_pad_day() {
        // 2026-11-01 00:00:00 UTC.
        assert_eq!(rfc5322(at(1_793_491_200)), "Sun, 1 Nov 2026 00:00:00 +0000");
    }

    #[test]
    fn rfc5322_clamps_before_epoch() {
        let before = UNIX_EPOCH - Duration::from_secs(10);
        assert_eq!(rfc5322(before), "Thu, 1 Jan 1970 00:00:00 +0000");
    }

    #[test]
    fn syslog_stamp_formats_2026_date() {
        assert_eq!(syslog_stamp(at(1_795_869_657)), "Nov 28 12:40:57");
    }

    #[test]
    fn syslog_stamp_space_pads_day() {
        // 2026-11-08 09:05:03 UTC.
        assert_eq!(syslog_stamp(at(1_794_128_703)), "Nov  8 09:05:03");
    }
}
