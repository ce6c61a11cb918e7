//! When a deferred message is tried again, and the times logged with each delivery.
//!
//! Postfix's rule: a deferred message waits as long as it has been in the queue, at least
//! the minimal and at most the maximal backoff time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Postfix-style delay: seconds with two decimals below 100, whole seconds above.
pub(super) fn format_delay(secs: f64) -> String {
    if secs < 100.0 {
        format!("{secs:.2}")
    } else {
        format!("{secs:.0}")
    }
}

/// Seconds since the Unix epoch of an `arrival_time` attribute (`secs.micros`).
pub(super) fn parse_arrival(value: &str) -> Option<f64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    value.parse().ok()
}

/// Seconds since the Unix epoch of `t` (0 before the epoch).
pub(super) fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How long a message deferred at `now` waits before its next attempt: its age in the
/// queue, at least `min` and at most `max` (so the waits grow as the message ages).
pub(crate) fn backoff(
    arrival: Option<f64>,
    now: SystemTime,
    min: Duration,
    max: Duration,
) -> Duration {
    let age = arrival
        .map(|a| (unix_secs(now) - a).max(0.0))
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .unwrap_or_default();
    age.min(max).max(min)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_age_within_bounds() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let min = Duration::from_secs(300);
        let max = Duration::from_secs(4000);
        assert_eq!(backoff(Some(999_990.0), now, min, max), min);
        assert_eq!(
            backoff(Some(999_000.0), now, min, max),
            Duration::from_secs(1000)
        );
        assert_eq!(backoff(Some(0.0), now, min, max), max);
        assert_eq!(backoff(None, now, min, max), min);
        assert_eq!(backoff(Some(2e9), now, min, max), min);
    }

    #[test]
    fn parse_arrival_accepts_only_decimal_seconds() {
        assert_eq!(
            parse_arrival("1764000000.123456"),
            Some(1_764_000_000.123_456)
        );
        assert_eq!(parse_arrival(""), None);
        assert_eq!(parse_arrival("-1"), None);
        assert_eq!(parse_arrival("1e9"), None);
        assert_eq!(parse_arrival("nan"), None);
    }

    #[test]
    fn format_delay_rounds_like_postfix() {
        assert_eq!(format_delay(0.1234), "0.12");
        assert_eq!(format_delay(250.6), "251");
    }
}
