//! Parameter values: Postfix's time values, booleans, numbers, and the checks of the
//! parameters with their own syntax. Each parser takes an expanded value and returns the
//! typed value or the reason it is not acceptable; `config` adds the name and the origin.

use std::borrow::Cow;
use std::path::PathBuf;
use std::time::Duration;

use super::Reason;
use super::file::is_space;
use crate::queue::CommitMethod;

/// Postfix's largest time value (conv_time keeps seconds in an int).
const MAX_TIME_SECS: u64 = i32::MAX as u64;

/// `receive_override_options` words (Postfix's, minus the ones qmqpd cannot honour).
const OVERRIDE_OPTIONS: [&str; 4] = [
    "no_unknown_recipient_checks",
    "no_address_mappings",
    "no_header_body_checks",
    "no_milters",
];

/// syslog(3) facility names.
const FACILITIES: [&str; 20] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
    "ftp", "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
];

/// Any text.
pub(crate) fn text(value: &str) -> Result<String, Reason> {
    Ok(value.to_owned())
}

/// Text that must not be empty.
pub(crate) fn non_empty(value: &str) -> Result<String, Reason> {
    if value.is_empty() {
        return Err("must not be empty".into());
    }
    Ok(value.to_owned())
}

/// A path that must not be empty.
pub(crate) fn path(value: &str) -> Result<PathBuf, Reason> {
    non_empty(value).map(PathBuf::from)
}

/// A time value of at least `min_secs` seconds.
pub(crate) fn time(min_secs: u64) -> impl Fn(&str) -> Result<Duration, Reason> {
    move |value| match time_value(value) {
        Ok(time) if time.as_secs() >= min_secs => Ok(time),
        Ok(_) => Err("must be greater than zero".into()),
        Err(reason) => Err(reason.into()),
    }
}

/// `queue_commit_method`: `auto`, `linkat` or `rename`.
pub(crate) fn commit_method(value: &str) -> Result<CommitMethod, Reason> {
    [
        CommitMethod::Auto,
        CommitMethod::Linkat,
        CommitMethod::Rename,
    ]
    .into_iter()
    .find(|method| method.name() == value.trim())
    .ok_or_else(|| "expected \"auto\", \"linkat\" or \"rename\"".into())
}

/// `qmqpd_upstream_proxy_protocol`: empty (off) or `haproxy` (PROXY v1 or v2, detected).
pub(crate) fn upstream_proxy_protocol(value: &str) -> Result<bool, Reason> {
    match value.trim() {
        "" => Ok(false),
        "haproxy" => Ok(true),
        _ => Err("expected empty or \"haproxy\"".into()),
    }
}

/// Empty (off) or a numeric `address:port` (`qmqpd_agent_check_listen`).
pub(crate) fn socket_address_or_empty(value: &str) -> Result<String, Reason> {
    let trimmed = value.trim();
    if trimmed.is_empty() || trimmed.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(trimmed.to_owned());
    }
    Err("expected empty or a numeric address:port".into())
}

/// `yes` or `no`, in any case.
pub(crate) fn boolean(value: &str) -> Result<bool, Reason> {
    if value.eq_ignore_ascii_case("yes") {
        Ok(true)
    } else if value.eq_ignore_ascii_case("no") {
        Ok(false)
    } else {
        Err("expected \"yes\" or \"no\"".into())
    }
}

/// An unsigned decimal number of at least `min`.
pub(crate) fn number(min: u64) -> impl Fn(&str) -> Result<u64, Reason> {
    move |value| match decimal(value) {
        Ok(number) if number >= min => Ok(number),
        Ok(_) => Err(format!("must be at least {min}").into()),
        Err(reason) => Err(reason.into()),
    }
}

/// A decimal `u32` (`debug_peer_level`).
pub(crate) fn level(value: &str) -> Result<u32, Reason> {
    match decimal(value).map(u32::try_from) {
        Ok(Ok(level)) => Ok(level),
        Ok(Err(_)) => Err("number too large".into()),
        Err(reason) => Err(reason.into()),
    }
}

/// `content_filter`: empty or `transport:[nexthop[:port]]`.
pub(crate) fn content_filter(value: &str) -> Result<String, Reason> {
    check_content_filter(value).map(|()| value.to_owned())
}

/// `receive_override_options`: a subset of [`OVERRIDE_OPTIONS`].
pub(crate) fn override_options(value: &str) -> Result<String, Reason> {
    let unknown = value
        .split(|c: char| c == ',' || is_space(c))
        .find(|word| !word.is_empty() && !OVERRIDE_OPTIONS.contains(word));
    match unknown {
        None => Ok(value.to_owned()),
        Some(word) => Err(format!(
            "unknown option \"{word}\" (known: {})",
            OVERRIDE_OPTIONS.join(", ")
        )
        .into()),
    }
}

/// `myhostname`: a syntactically valid host name, as Postfix requires.
pub(crate) fn hostname(value: &str) -> Result<String, Reason> {
    check_hostname(value)?;
    Ok(value.to_owned())
}

/// `syslog_facility`: a syslog facility name, returned in canonical form.
pub(crate) fn syslog_facility(value: &str) -> Result<String, Reason> {
    let lower = value.to_ascii_lowercase();
    let bare = lower.strip_prefix("log_").unwrap_or(&lower);
    match FACILITIES.iter().find(|&&facility| facility == bare) {
        Some(facility) => Ok((*facility).to_owned()),
        None => Err("unknown syslog facility".into()),
    }
}

/// An unsigned decimal number: digits only.
pub(crate) fn decimal(value: &str) -> Result<u64, &'static str> {
    if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err("expected an unsigned decimal number");
    }
    value.parse().map_err(|_| "number too large")
}

/// [`parse_time`] without the value in the message.
fn time_value(value: &str) -> Result<Duration, &'static str> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (digits, unit) = value.split_at(digits_end);
    if digits.is_empty() {
        return Err("expected a number with an optional unit s, m, h, d or w");
    }
    let scale: u64 = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 604_800,
        _ => return Err("unit must be one of s, m, h, d, w"),
    };
    let secs = digits
        .parse::<u64>()
        .ok()
        .and_then(|number| number.checked_mul(scale))
        .filter(|&secs| secs <= MAX_TIME_SECS)
        .ok_or("time too large (at most 2147483647s)")?;
    Ok(Duration::from_secs(secs))
}

/// Postfix time value: integer + optional s/m/h/d/w suffix (default unit s).
///
/// At most 2147483647 seconds, as Postfix, so callers can add it to an `Instant` safely.
pub fn parse_time(value: &str) -> Result<Duration, String> {
    time_value(value).map_err(|reason| format!("bad time value \"{value}\": {reason}"))
}

/// Check `transport:[nexthop[:port]]`.
fn check_content_filter(value: &str) -> Result<(), Cow<'static, str>> {
    if value.is_empty() {
        return Ok(());
    }
    if value.contains(is_space) {
        return Err("whitespace in value".into());
    }
    let Some((transport, nexthop)) = value.split_once(':') else {
        return Err("expected transport:[nexthop[:port]]".into());
    };
    if transport.is_empty() {
        return Err("empty transport name".into());
    }
    if let Some(bad) = transport
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!("bad character '{bad}' in transport name \"{transport}\"").into());
    }
    // A bracketed next hop ([host] or [host]:port) must close, and its port must be one.
    if let Some(bracketed) = nexthop.strip_prefix('[') {
        let Some((_, after)) = bracketed.split_once(']') else {
            return Err("missing ']' in next hop".into());
        };
        if !after.is_empty() {
            let port = after.strip_prefix(':').unwrap_or("");
            if !port.bytes().all(|byte| byte.is_ascii_digit())
                || port.parse::<u16>().map_or(true, |port| port == 0)
            {
                return Err(format!("bad port \"{after}\" after next hop").into());
            }
        }
    }
    Ok(())
}

/// Postfix's valid_hostname rules: labels of `[A-Za-z0-9_-]`, 1..63 bytes, no leading or
/// trailing hyphen, at most 255 bytes, not all numeric.
fn check_hostname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("must not be empty");
    }
    if name.len() > 255 {
        return Err("longer than 255 characters");
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("misplaced dot");
        }
        if label.len() > 63 {
            return Err("label longer than 63 characters");
        }
        if !label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("invalid character in host name");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("misplaced hyphen");
        }
    }
    if name.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return Err("numeric host name");
    }
    Ok(())
}
