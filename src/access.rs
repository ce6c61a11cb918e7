//! Postfix match lists over client addresses and host names.
//!
//! Owns the parsing and matching of lists such as `qmqpd_authorized_clients` and
//! `debug_peer_list`: IPv4/IPv6 addresses and networks (with Postfix's strict rules on host
//! bits and leading zeros), host and domain names, `/file` patterns and `!` negation. Every
//! pattern is checked and precomputed at parse time so that a match per connection is a
//! short loop without allocation. It does not find out who the client is (that is `peer`)
//! nor read `main.cf` (that is `config`).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net};

/// Deepest chain of `/file` patterns naming other files.
const MAX_FILE_DEPTH: usize = 10;

/// Largest pattern file read, in bytes.
const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Longest piece of a comment quoted in a warning, in characters.
const COMMENT_QUOTE_CHARS: usize = 40;

/// A parsed match list such as `qmqpd_authorized_clients`.
#[derive(Debug, Clone)]
pub struct MatchList {
    entries: Vec<Entry>,
    needs_name: bool,
    warnings: Vec<String>,
}

/// One pattern of a list, with its negation already resolved.
#[derive(Debug, Clone)]
struct Entry {
    negate: bool,
    pattern: Pattern,
}

/// What one pattern matches.
#[derive(Debug, Clone)]
enum Pattern {
    /// A network; a single address is a /32 or /128 network. IPv4-mapped IPv6 patterns
    /// are stored as IPv4, as client addresses are canonicalised.
    Network(IpNet),
    /// A host or domain name, lowercase, stored with a leading dot (`.example.com`) so
    /// that a subdomain test is one suffix comparison. `itself` is true for a plain name
    /// (`example.com` matches itself and its subdomains) and false for `.example.com`
    /// (strictly below).
    Name { dotted: String, itself: bool },
}

/// A configuration error in a match list.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// A `!` with no pattern after it.
    #[error("{at}: no pattern after \"!\"")]
    MissingPattern {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
    },
    /// An address or network pattern that is not valid.
    #[error("{at}: bad network pattern {pattern:?}: {reason}")]
    BadNetwork {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The pattern as written.
        pattern: String,
        /// Why it is refused.
        reason: String,
    },
    /// A host or domain name pattern that is not valid.
    #[error("{at}: bad host name pattern {pattern:?}: {reason}")]
    BadName {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The pattern as written.
        pattern: String,
        /// Why it is refused.
        reason: String,
    },
    /// A Postfix `type:table` lookup, which qmqpd does not support.
    #[error(
        "{at}: unsupported lookup table {pattern:?}: qmqpd supports addresses, \
         networks, host names and /file patterns"
    )]
    UnsupportedTable {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The pattern as written.
        pattern: String,
    },
    /// A `/file` pattern whose file cannot be read. The OS error is part of the text (not
    /// `source`) so that it is printed once whether the caller logs with `{}` or `{:#}`.
    #[error("{at}: cannot read pattern file {path:?}: {error}")]
    ReadFile {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The file named by the pattern.
        path: String,
        /// The operating system's error.
        error: std::io::Error,
    },
    /// A `/file` pattern whose file is larger than qmqpd reads.
    #[error("{at}: pattern file {path:?} is larger than {limit} bytes")]
    FileTooLarge {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The file named by the pattern.
        path: String,
        /// The largest size read, in bytes.
        limit: u64,
    },
    /// `/file` patterns nested deeper than the limit (usually a file naming itself).
    #[error(
        "{at}: pattern file {path:?} is nested more than {limit} files deep \
         (does a file name itself?)"
    )]
    NestingTooDeep {
        /// Parameter name, with file and line when inside a `/file`.
        at: String,
        /// The file that would exceed the limit.
        path: String,
        /// The deepest nesting allowed.
        limit: usize,
    },
}

impl MatchList {
    /// Parse `value` of parameter `param`; `/file` patterns are read now.
    pub fn parse(param: &str, value: &str) -> Result<MatchList, AccessError> {
        let mut parser = Parser {
            param,
            entries: Vec::new(),
            warnings: Vec::new(),
        };
        let place = Place { param, file: None };
        parser.parse_text(value, &place, false, 0)?;
        let needs_name = parser
            .entries
            .iter()
            .any(|entry| matches!(entry.pattern, Pattern::Name { .. }));
        Ok(MatchList {
            entries: parser.entries,
            needs_name,
            warnings: parser.warnings,
        })
    }

    /// First match decides; `!` negates; no match means false.
    /// `name`: the verified client host name (None when unknown); `addr`: the client address
    /// (None when unknown). The address is canonicalised here too (IpAddr::to_canonical).
    pub fn matches(&self, name: Option<&str>, addr: Option<IpAddr>) -> bool {
        let addr = addr.map(|addr| addr.to_canonical());
        let name = if self.needs_name {
            name.and_then(usable_name)
        } else {
            None
        };
        for entry in &self.entries {
            let hit = match &entry.pattern {
                Pattern::Network(net) => addr.is_some_and(|addr| net.contains(&addr)),
                Pattern::Name { dotted, itself } => {
                    name.is_some_and(|name| name_matches(name, dotted, *itself))
                }
            };
            if hit {
                return !entry.negate;
            }
        }
        false
    }

    /// True when some pattern is a host/domain name (so the caller must find the name).
    pub fn needs_name(&self) -> bool {
        self.needs_name
    }

    /// Non-fatal remarks found while parsing (e.g. "#comment after other text").
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
}

/// Where a pattern was written, for messages: the parameter, and the file and line.
struct Place<'a> {
    param: &'a str,
    file: Option<(&'a str, usize)>,
}

impl fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.file {
            None => write!(f, "{}", self.param),
            Some((path, line)) => write!(f, "{}: {}, line {line}", self.param, path.escape_debug()),
        }
    }
}

/// Collects entries and warnings while a value and its files are parsed.
struct Parser<'a> {
    param: &'a str,
    entries: Vec<Entry>,
    warnings: Vec<String>,
}

impl Parser<'_> {
    /// Parse one parameter value or one logical line of a file; a `#` token ends it.
    /// Returns false when a comment ended the text.
    fn parse_text(
        &mut self,
        text: &str,
        place: &Place<'_>,
        negate: bool,
        depth: usize,
    ) -> Result<bool, AccessError> {
        let mut rest = text;
        while let Some((token, after)) = next_token(rest) {
            if token.starts_with('#') {
                let start = rest.trim_start_matches(is_separator);
                self.warn_comment(place, start);
                return Ok(false);
            }
            self.parse_token(token, place, negate, depth)?;
            rest = after;
        }
        Ok(true)
    }

    /// Record the "#comment after other text" warning, quoting the start of the comment.
    fn warn_comment(&mut self, place: &Place<'_>, comment: &str) {
        let mut quoted: String = comment.chars().take(COMMENT_QUOTE_CHARS).collect();
        if comment.chars().nth(COMMENT_QUOTE_CHARS).is_some() {
            quoted.push_str("...");
        }
        self.warnings.push(format!(
            "{place}: #comment after other text is not allowed, ignoring {quoted:?}"
        ));
    }

    /// Resolve `!`s, then read a `/file` or add one pattern.
    fn parse_token(
        &mut self,
        token: &str,
        place: &Place<'_>,
        negate: bool,
        depth: usize,
    ) -> Result<(), AccessError> {
        let pattern = token.trim_start_matches('!');
        let bangs = token.len().saturating_sub(pattern.len());
        let negate = negate ^ (bangs % 2 == 1);
        if pattern.is_empty() {
            return Err(AccessError::MissingPattern {
                at: place.to_string(),
            });
        }
        if pattern.starts_with('/') {
            return self.parse_file(pattern, place, negate, depth.saturating_add(1));
        }
        let pattern = parse_pattern(pattern, place)?;
        self.entries.push(Entry { negate, pattern });
        Ok(())
    }

    /// Read the file of a `/file` pattern and parse its logical lines.
    fn parse_file(
        &mut self,
        path: &str,
        place: &Place<'_>,
        negate: bool,
        depth: usize,
    ) -> Result<(), AccessError> {
        if depth > MAX_FILE_DEPTH {
            return Err(AccessError::NestingTooDeep {
                at: place.to_string(),
                path: path.to_string(),
                limit: MAX_FILE_DEPTH,
            });
        }
        let read_error = |error| AccessError::ReadFile {
            at: place.to_string(),
            path: path.to_string(),
            error,
        };
        let file = File::open(path).map_err(read_error)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(read_error)?;
        if u64::try_from(bytes.len()).map_or(true, |len| len > MAX_FILE_BYTES) {
            return Err(AccessError::FileTooLarge {
                at: place.to_string(),
                path: path.to_string(),
                limit: MAX_FILE_BYTES,
            });
        }
        // Invalid UTF-8 becomes U+FFFD, which no pattern accepts: an error, not a skip.
        let text = String::from_utf8_lossy(&bytes);
        // As Postfix's readlline: `#` lines and blank lines are skipped, a line starting
        // with whitespace continues the logical line, so a comment after text on one line
        // silences the continuation lines of the same logical line too.
        let mut in_comment = false;
        for (index, line) in text.lines().enumerate() {
            let trimmed = line.trim_start_matches(is_blank);
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            if trimmed.len() == line.len() {
                in_comment = false;
            }
            if in_comment {
                continue;
            }
            let line_place = Place {
                param: self.param,
                file: Some((path, index.saturating_add(1))),
            };
            in_comment = !self.parse_text(line, &line_place, negate, depth)?;
        }
        Ok(())
    }
}

/// Split off the first token of `text`: (token, the text after it).
fn next_token(text: &str) -> Option<(&str, &str)> {
    let start = text.trim_start_matches(is_separator);
    if start.is_empty() {
        return None;
    }
    let end = start.find(is_separator).unwrap_or(start.len());
    start.split_at_checked(end)
}

/// Pattern separators: whitespace and commas, as Postfix's CHARS_COMMA_SP.
fn is_separator(c: char) -> bool {
    c == ',' || is_blank(c)
}

/// Whitespace inside a value or a file line.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n' | '\x0b' | '\x0c')
}

/// Characters allowed in a host name pattern and in a client name that can match one.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')
}

/// Turn one pattern (without `!`) into an address, network or name pattern.
fn parse_pattern(text: &str, place: &Place<'_>) -> Result<Pattern, AccessError> {
    let bad_network = |reason: String| AccessError::BadNetwork {
        at: place.to_string(),
        pattern: text.to_string(),
        reason,
    };
    if let Some(inside) = text.strip_prefix('[') {
        let (addr_text, prefix) = split_bracketed(inside).map_err(bad_network)?;
        let addr = parse_address(addr_text).map_err(bad_network)?;
        return make_network(addr, prefix, true).map_err(bad_network);
    }
    let (addr_text, prefix) = match text.split_once('/') {
        Some((addr_text, prefix)) => (addr_text, Some(prefix)),
        None => (text, None),
    };
    if text.contains(':') {
        // Only an IPv6 address may hold a colon; anything else is Postfix's `type:table`.
        if is_ipv6_like(addr_text) {
            let addr = parse_address(addr_text).map_err(bad_network)?;
            return make_network(addr, prefix, false).map_err(bad_network);
        }
        return Err(AccessError::UnsupportedTable {
            at: place.to_string(),
            pattern: text.to_string(),
        });
    }
    let dotted_number = text.chars().all(|c| c.is_ascii_digit() || c == '.')
        && text.contains(|c: char| c.is_ascii_digit());
    if prefix.is_some() || dotted_number {
        if !addr_text.chars().all(|c| c.is_ascii_digit() || c == '.') {
            return Err(bad_network("not an IPv4 address or network".to_string()));
        }
        let addr = parse_ipv4(addr_text).map_err(bad_network)?;
        return make_network(IpAddr::V4(addr), prefix, false).map_err(bad_network);
    }
    parse_name(text).map_err(|reason| AccessError::BadName {
        at: place.to_string(),
        pattern: text.to_string(),
        reason,
    })
}

/// True when `text` parses as IPv6, possibly after removing a zone id (refused later).
fn is_ipv6_like(text: &str) -> bool {
    let addr = text.split_once('%').map_or(text, |(addr, _)| addr);
    addr.parse::<Ipv6Addr>().is_ok()
}

/// Split the text after `[` into the address and the prefix length, accepting
/// `addr]`, `addr]/n` and `addr/n]`.
fn split_bracketed(inside: &str) -> Result<(&str, Option<&str>), String> {
    let Some((within, after)) = inside.split_once(']') else {
        return Err("missing \"]\"".to_string());
    };
    match (within.split_once('/'), after.strip_prefix('/')) {
        (Some((addr, prefix)), None) if after.is_empty() => Ok((addr, Some(prefix))),
        (None, None) if after.is_empty() => Ok((within, None)),
        (None, Some(prefix)) => Ok((within, Some(prefix))),
        _ => Err(format!("unexpected text {after:?} after \"]\"")),
    }
}

/// Parse an IPv4 or IPv6 address strictly (no leading zeros, no zone id).
fn parse_address(text: &str) -> Result<IpAddr, String> {
    if let Some((_, zone)) = text.split_once('%') {
        return Err(format!("zone id {:?} is not allowed", format!("%{zone}")));
    }
    if text.chars().all(|c| c.is_ascii_digit() || c == '.') {
        return parse_ipv4(text).map(IpAddr::V4);
    }
    text.parse::<Ipv6Addr>()
        .map(IpAddr::V6)
        .map_err(|_| "not an IPv4 or IPv6 address".to_string())
}

/// Parse dotted-quad IPv4 with Postfix's (inet_pton's) strictness: four decimal octets,
/// no leading zeros, each at most 255.
fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    let four_octets = || "not an IPv4 address: expected four decimal octets".to_string();
    if text.split('.').count() != 4 {
        return Err(four_octets());
    }
    let mut parts = text.split('.');
    let mut octets = [0u8; 4];
    for slot in &mut octets {
        let part = parts.next().ok_or_else(four_octets)?;
        if part.is_empty() || !part.chars().all(|c| c.is_ascii_digit()) {
            return Err(four_octets());
        }
        if part.len() > 1 && part.starts_with('0') {
            return Err(format!(
                "octet {part:?} has a leading zero (octal or decimal is ambiguous)"
            ));
        }
        *slot = part
            .parse::<u8>()
            .map_err(|_| format!("octet {part:?} is larger than 255"))?;
    }
    Ok(Ipv4Addr::from(octets))
}

/// Build the network for `addr` and an optional prefix length, refusing host bits and
/// turning an IPv4-mapped IPv6 network into its IPv4 network.
fn make_network(addr: IpAddr, prefix: Option<&str>, bracketed: bool) -> Result<Pattern, String> {
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let len = match prefix {
        None => max,
        Some(text) => parse_prefix(text, max)?,
    };
    let net = IpNet::new(addr, len).map_err(|_| format!("prefix length {len} exceeds {max}"))?;
    if net.addr() != net.network() {
        let suggestion = match net.network() {
            IpAddr::V6(network) if bracketed => format!("[{network}]/{len}"),
            network => format!("{network}/{len}"),
        };
        return Err(format!("host bits set, use {suggestion}"));
    }
    Ok(Pattern::Network(canonical_network(net)))
}

/// Parse a prefix length: decimal, no leading zero, at most `max`.
fn parse_prefix(text: &str, max: u8) -> Result<u8, String> {
    if text.is_empty() || !text.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("prefix length {text:?} is not a number"));
    }
    if text.len() > 1 && text.starts_with('0') {
        return Err(format!("prefix length {text:?} has a leading zero"));
    }
    match text.parse::<u8>() {
        Ok(len) if len <= max => Ok(len),
        _ => Err(format!("prefix length {text} exceeds {max}")),
    }
}

/// An IPv6 network inside `::ffff:0:0/96` (prefix 96 or longer) as the IPv4 network it
/// denotes; client addresses are canonicalised, so the IPv6 form could never match.
fn canonical_network(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net
        && let Some(v4) = v6.addr().to_ipv4_mapped()
        && let Some(len) = v6.prefix_len().checked_sub(96)
        && let Ok(v4net) = Ipv4Net::new(v4, len)
    {
        return IpNet::V4(v4net);
    }
    net
}

/// Check a host or domain name pattern and store it lowercase with a leading dot.
fn parse_name(text: &str) -> Result<Pattern, String> {
    let (body, itself) = match text.strip_prefix('.') {
        Some(body) => (body, false),
        None => (text, true),
    };
    let body = body.strip_suffix('.').unwrap_or(body);
    if let Some(c) = body.chars().find(|&c| !is_name_char(c)) {
        return Err(format!(
            "character {c:?} is not allowed (use letters, digits, \".\", \"-\" and \"_\")"
        ));
    }
    if body.is_empty() || body.split('.').any(str::is_empty) {
        return Err("empty label in name".to_string());
    }
    let mut dotted = String::with_capacity(body.len().saturating_add(1));
    dotted.push('.');
    dotted.push_str(&body.to_ascii_lowercase());
    Ok(Pattern::Name { dotted, itself })
}

/// The client name as it can match a name pattern: without one trailing dot, and None
/// when it is "unknown", empty or not a syntactically valid host name (a supervisor's
/// REMOTEHOST can hold any bytes).
fn usable_name(name: &str) -> Option<&str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.eq_ignore_ascii_case("unknown")
        || name.is_empty()
        || !name.chars().all(is_name_char)
        || name.split('.').any(str::is_empty)
    {
        return None;
    }
    Some(name)
}

/// Compare a client name with a name pattern stored as `.domain`, case-insensitively.
fn name_matches(name: &str, dotted: &str, itself: bool) -> bool {
    let name = name.as_bytes();
    let dotted = dotted.as_bytes();
    if itself
        && dotted
            .get(1..)
            .is_some_and(|domain| name.eq_ignore_ascii_case(domain))
    {
        return true;
    }
    name.len() > dotted.len()
        && name
            .len()
            .checked_sub(dotted.len())
            .and_then(|start| name.get(start..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case(dotted))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const PARAM: &str = "qmqpd_authorized_clients";

    fn list(value: &str) -> MatchList {
        MatchList::parse(PARAM, value).unwrap()
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn addr_ok(list: &MatchList, text: &str) -> bool {
        list.matches(None, ip(text))
    }

    fn name_ok(list: &MatchList, name: &str) -> bool {
        list.matches(Some(name), ip("192.0.2.99"))
    }

    fn error(value: &str) -> String {
        MatchList::parse(PARAM, value).unwrap_err().to_string()
    }

    fn write(dir: &Path, name: &str, text: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }

    #[test]
    fn default_list_matches_loopback_only() {
        let list = list("127.0.0.0/8, [::1]/128");
        assert!(addr_ok(&list, "127.0.0.1"));
        assert!(addr_ok(&list, "127.255.0.9"));
        assert!(addr_ok(&list, "::1"));
        assert!(addr_ok(&list, "::ffff:127.0.0.2"));
        assert!(!addr_ok(&list, "192.0.2.1"));
        assert!(!addr_ok(&list, "::2"));
        assert!(!list.matches(None, None));
        assert!(!list.needs_name());
        assert!(list.warnings().is_empty());
    }

    #[test]
    fn ipv4_address_matches_only_itself() {
        let list = list("192.0.2.1");
        assert!(addr_ok(&list, "192.0.2.1"));
        assert!(!addr_ok(&list, "192.0.2.2"));
        assert!(!list.matches(Some("host.example.com"), None));
    }

    #[test]
    fn ipv4_cidr_matches_inside_not_outside() {
        let list = list("10.0.0.0/8 192.168.4.0/22");
        assert!(addr_ok(&list, "10.200.3.4"));
        assert!(addr_ok(&list, "192.168.7.255"));
        assert!(!addr_ok(&list, "192.168.8.0"));
        assert!(!addr_ok(&list, "11.0.0.1"));
    }

    #[test]
    fn ipv4_zero_prefix_matches_all_ipv4() {
        let list = list("0.0.0.0/0");
        assert!(addr_ok(&list, "203.0.113.5"));
        assert!(addr_ok(&list, "::ffff:203.0.113.5"));
        assert!(!addr_ok(&list, "2001:db8::1"));
    }

    #[test]
    fn ipv4_bracketed_matches() {
        let list = list("[192.0.2.1], [198.51.100.0]/24");
        assert!(addr_ok(&list, "192.0.2.1"));
        assert!(addr_ok(&list, "198.51.100.77"));
        assert!(!addr_ok(&list, "192.0.2.2"));
    }

    #[test]
    fn ipv6_bracketed_address_matches() {
        let list = list("[2001:db8::1]");
        assert!(addr_ok(&list, "2001:db8::1"));
        assert!(addr_ok(&list, "2001:db8:0:0:0:0:0:1"));
        assert!(!addr_ok(&list, "2001:db8::2"));
        assert!(!addr_ok(&list, "192.0.2.1"));
    }

    #[test]
    fn ipv6_bracketed_cidr_matches_both_forms() {
        for value in ["[2001:db8::]/32", "[2001:db8::/32]", "[2001:DB8::]/32"] {
            let list = list(value);
            assert!(addr_ok(&list, "2001:db8:ffff::1"), "{value}");
            assert!(!addr_ok(&list, "2001:db9::1"), "{value}");
        }
    }

    #[test]
    fn ipv6_bare_address_and_cidr_match() {
        let list = list("::1, 2001:db8:1::/48");
        assert!(addr_ok(&list, "::1"));
        assert!(addr_ok(&list, "2001:db8:1:2::3"));
        assert!(!addr_ok(&list, "2001:db8:2::3"));
    }

    #[test]
    fn mapped_client_cannot_bypass_ipv4_negation() {
        let list = list("!127.0.0.1, 127.0.0.0/8");
        assert!(!addr_ok(&list, "::ffff:127.0.0.1"));
        assert!(!addr_ok(&list, "127.0.0.1"));
        assert!(addr_ok(&list, "::ffff:127.0.0.2"));
    }

    #[test]
    fn mapped_pattern_matches_ipv4_client() {
        let list = list("[::ffff:192.0.2.1], ::ffff:198.51.100.0/120");
        assert!(addr_ok(&list, "192.0.2.1"));
        assert!(addr_ok(&list, "::ffff:192.0.2.1"));
        assert!(addr_ok(&list, "198.51.100.200"));
        assert!(!addr_ok(&list, "192.0.2.2"));
    }

    #[test]
    fn negation_decides_when_first() {
        let list = list("!192.168.0.1, 192.168.0.0/24");
        assert!(!addr_ok(&list, "192.168.0.1"));
        assert!(addr_ok(&list, "192.168.0.2"));
    }

    #[test]
    fn first_match_wins_over_later_negation() {
        let list = list("192.168.0.0/24, !192.168.0.1");
        assert!(addr_ok(&list, "192.168.0.1"));
    }

    #[test]
    fn negation_toggles_with_each_bang() {
        assert!(addr_ok(&list("!!192.0.2.1"), "192.0.2.1"));
        assert!(!addr_ok(&list("!!!192.0.2.1, 0.0.0.0/0"), "192.0.2.1"));
        assert!(addr_ok(&list("!!!192.0.2.1, 0.0.0.0/0"), "192.0.2.2"));
    }

    #[test]
    fn empty_value_matches_nothing() {
        for value in ["", "  ", " , ,\t"] {
            let list = list(value);
            assert!(!list.matches(Some("localhost"), ip("127.0.0.1")));
            assert!(!list.needs_name());
        }
    }

    #[test]
    fn name_exact_matches_case_insensitively() {
        let list = list("Host.Example.COM");
        assert!(name_ok(&list, "host.example.com"));
        assert!(name_ok(&list, "HOST.EXAMPLE.COM"));
        assert!(name_ok(&list, "host.example.com."));
        assert!(!name_ok(&list, "other.example.com"));
        assert!(!name_ok(&list, "example.com"));
        assert!(!name_ok(&list, "xhost.example.com"));
        assert!(list.needs_name());
    }

    #[test]
    fn name_dot_domain_matches_strictly_below() {
        let list = list(".example.com");
        assert!(name_ok(&list, "a.example.com"));
        assert!(name_ok(&list, "a.b.EXAMPLE.com"));
        assert!(!name_ok(&list, "example.com"));
        assert!(!name_ok(&list, "badexample.com"));
    }

    #[test]
    fn name_parent_domain_matches_subdomains() {
        let list = list("example.com");
        assert!(name_ok(&list, "example.com"));
        assert!(name_ok(&list, "mx.example.com"));
        assert!(name_ok(&list, "a.b.example.com"));
        assert!(!name_ok(&list, "badexample.com"));
        assert!(!name_ok(&list, "example.com.evil.net"));
    }

    #[test]
    fn name_pattern_trailing_dot_is_ignored() {
        let list = list("example.com. .example.org.");
        assert!(name_ok(&list, "example.com"));
        assert!(name_ok(&list, "a.example.org"));
        assert!(!name_ok(&list, "example.org"));
    }

    #[test]
    fn name_pattern_never_matches_unknown_name() {
        let list = list("example.com, unknown, localhost");
        assert!(!list.matches(None, ip("127.0.0.1")));
        assert!(!list.matches(Some("unknown"), ip("127.0.0.1")));
        assert!(!list.matches(Some("UNKNOWN"), ip("127.0.0.1")));
        assert!(!list.matches(Some(""), ip("127.0.0.1")));
        assert!(list.matches(Some("localhost"), None));
    }

    #[test]
    fn name_with_bad_characters_never_matches() {
        let list = list(".example.com");
        assert!(!name_ok(&list, "evil\n.example.com"));
        assert!(!name_ok(&list, "evil host.example.com"));
        assert!(!name_ok(&list, "..example.com"));
    }

    #[test]
    fn negated_name_passes_unknown_name_to_next_pattern() {
        let list = list("!bad.example.com, 192.0.2.0/24");
        assert!(list.matches(None, ip("192.0.2.1")));
        assert!(!list.matches(Some("bad.example.com"), ip("192.0.2.1")));
        assert!(list.matches(Some("good.example.com"), ip("192.0.2.1")));
    }

    #[test]
    fn address_pattern_ignores_name() {
        let list = list("192.0.2.1");
        assert!(!list.matches(Some("192.0.2.1"), ip("192.0.2.2")));
    }

    #[test]
    fn needs_name_only_for_name_patterns() {
        assert!(!list("127.0.0.1 [::1] 10.0.0.0/8").needs_name());
        assert!(list("127.0.0.1 !mx.example.com").needs_name());
    }

    #[test]
    fn comment_after_text_warns_and_ends_value() {
        let list = list("127.0.0.1 #local, 10.0.0.0/8");
        assert!(addr_ok(&list, "127.0.0.1"));
        assert!(!addr_ok(&list, "10.0.0.1"));
        assert_eq!(list.warnings().len(), 1);
        assert_eq!(
            list.warnings()[0],
            "qmqpd_authorized_clients: #comment after other text is not allowed, \
             ignoring \"#local, 10.0.0.0/8\""
        );
    }

    #[test]
    fn file_patterns_with_comments_and_continuation() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = write(
            dir.path(),
            "clients",
            "# trusted hosts\n\
             \n\
             192.0.2.1, 192.0.2.2\n\
             \x20 198.51.100.0/24\n\
             \t# indented comment\n\
             [2001:db8::]/32 mx.example.com\r\n\
             !203.0.113.1\n\
             203.0.113.0/24\n",
        );
        let list = list(&format!("10.0.0.1 {path} 172.16.0.0/12"));
        for good in ["10.0.0.1", "192.0.2.2", "198.51.100.9", "2001:db8::5"] {
            assert!(addr_ok(&list, good), "{good}");
        }
        assert!(addr_ok(&list, "203.0.113.2"));
        assert!(!addr_ok(&list, "203.0.113.1"));
        assert!(addr_ok(&list, "172.16.0.1"));
        assert!(list.matches(Some("MX.example.com"), ip("192.0.2.200")));
        assert!(list.needs_name());
        assert!(list.warnings().is_empty());
    }

    #[test]
    fn file_negated_negates_every_entry() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = write(
            dir.path(),
            "bad",
            "192.0.2.1\n!192.0.2.2\nbad.example.com\n",
        );
        let list = list(&format!("!{path}, 192.0.2.0/24"));
        assert!(!addr_ok(&list, "192.0.2.1"));
        assert!(addr_ok(&list, "192.0.2.2"));
        assert!(addr_ok(&list, "192.0.2.3"));
        assert!(!list.matches(Some("bad.example.com"), ip("192.0.2.3")));
    }

    #[test]
    fn file_comment_after_text_ignores_rest_of_logical_line() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = write(
            dir.path(),
            "clients",
            "192.0.2.1 # note 192.0.2.2\n  192.0.2.3\n192.0.2.4\n",
        );
        let list = list(&path);
        assert!(addr_ok(&list, "192.0.2.1"));
        assert!(!addr_ok(&list, "192.0.2.2"));
        assert!(!addr_ok(&list, "192.0.2.3"));
        assert!(addr_ok(&list, "192.0.2.4"));
        assert_eq!(list.warnings().len(), 1);
        assert!(
            list.warnings()[0].contains(&format!("{path}, line 1: #comment after other text")),
            "{}",
            list.warnings()[0]
        );
    }

    #[test]
    fn file_nested_up_to_limit_is_read() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut next = write(dir.path(), "f10", "192.0.2.10\n");
        for depth in (1..10).rev() {
            next = write(dir.path(), &format!("f{depth}"), &format!("{next}\n"));
        }
        let list = list(&next);
        assert!(addr_ok(&list, "192.0.2.10"));
    }

    #[test]
    fn file_nested_beyond_limit_is_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut next = write(dir.path(), "f11", "192.0.2.11\n");
        for depth in (1..11).rev() {
            next = write(dir.path(), &format!("f{depth}"), &format!("{next}\n"));
        }
        let message = error(&next);
        assert!(
            message.contains("f11\" is nested more than 10 files deep"),
            "{message}"
        );
    }

    #[test]
    fn file_naming_itself_is_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("loop").to_str().unwrap().to_string();
        std::fs::write(&path, format!("192.0.2.1 {path}\n")).unwrap();
        assert!(matches!(
            MatchList::parse(PARAM, &path),
            Err(AccessError::NestingTooDeep { limit: 10, .. })
        ));
    }

    #[test]
    fn file_unreadable_is_error_naming_path() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("missing").to_str().unwrap().to_string();
        assert_eq!(
            error(&path),
            format!(
                "qmqpd_authorized_clients: cannot read pattern file \"{path}\": \
                 No such file or directory (os error 2)"
            )
        );
    }

    #[test]
    fn file_too_large_is_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = dir.path().join("huge");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(MAX_FILE_BYTES + 1).unwrap();
        let message = error(path.to_str().unwrap());
        assert!(
            message.ends_with("is larger than 16777216 bytes"),
            "{message}"
        );
    }

    #[test]
    fn file_bad_pattern_error_names_file_and_line() {
        let dir = tempfile::TempDir::new().unwrap();
        let path = write(dir.path(), "clients", "192.0.2.1\n\n10.1.0.0/8\n");
        assert_eq!(
            error(&path),
            format!(
                "qmqpd_authorized_clients: {path}, line 3: bad network pattern \
                 \"10.1.0.0/8\": host bits set, use 10.0.0.0/8"
            )
        );
    }

    #[test]
    fn parse_rejects_host_bits() {
        assert_eq!(
            error("192.168.0.1/24"),
            "qmqpd_authorized_clients: bad network pattern \"192.168.0.1/24\": \
             host bits set, use 192.168.0.0/24"
        );
        assert_eq!(
            error("[2001:db8::1]/32"),
            "qmqpd_authorized_clients: bad network pattern \"[2001:db8::1]/32\": \
             host bits set, use [2001:db8::]/32"
        );
        assert_eq!(
            error("2001:db8::1/32"),
            "qmqpd_authorized_clients: bad network pattern \"2001:db8::1/32\": \
             host bits set, use 2001:db8::/32"
        );
    }

    #[test]
    fn parse_rejects_leading_zero() {
        assert_eq!(
            error("010.0.0.0/8"),
            "qmqpd_authorized_clients: bad network pattern \"010.0.0.0/8\": \
             octet \"010\" has a leading zero (octal or decimal is ambiguous)"
        );
        assert!(error("1.2.3.04").contains("octet \"04\" has a leading zero"));
        assert!(error("[::ffff:010.0.0.1]").contains("bad network pattern"));
        assert!(error("10.0.0.0/08").contains("prefix length \"08\" has a leading zero"));
    }

    #[test]
    fn parse_rejects_long_prefix() {
        assert_eq!(
            error("10.0.0.0/33"),
            "qmqpd_authorized_clients: bad network pattern \"10.0.0.0/33\": \
             prefix length 33 exceeds 32"
        );
        assert!(error("[::1]/129").contains("prefix length 129 exceeds 128"));
        assert!(error("[::]/999").contains("prefix length 999 exceeds 128"));
        assert!(error("10.0.0.0/").contains("prefix length \"\" is not a number"));
    }

    #[test]
    fn parse_rejects_bad_dotted_numbers() {
        for value in [
            "1.2.3",
            "1.2.3.4.5",
            "256.0.0.1",
            "1..2.3",
            "1.2.3.4.",
            "12345",
        ] {
            let message = error(value);
            assert!(
                message.starts_with(&format!(
                    "qmqpd_authorized_clients: bad network pattern \"{value}\": "
                )),
                "{message}"
            );
        }
        assert!(error("256.0.0.1").ends_with("octet \"256\" is larger than 255"));
        assert!(error("example.com/24").ends_with("not an IPv4 address or network"));
    }

    #[test]
    fn parse_rejects_zone_id() {
        assert_eq!(
            error("fe80::1%eth0"),
            "qmqpd_authorized_clients: bad network pattern \"fe80::1%eth0\": \
             zone id \"%eth0\" is not allowed"
        );
        assert!(error("[fe80::1%eth0]").contains("zone id \"%eth0\" is not allowed"));
    }

    #[test]
    fn parse_rejects_bad_brackets() {
        assert!(error("[::1").ends_with("missing \"]\""));
        assert!(error("[::1]x").ends_with("unexpected text \"x\" after \"]\""));
        assert!(error("[::/0]/0").contains("unexpected text"));
        assert!(error("[example.com]").ends_with("not an IPv4 or IPv6 address"));
    }

    #[test]
    fn parse_rejects_bang_without_pattern() {
        assert_eq!(
            error("127.0.0.1, !"),
            "qmqpd_authorized_clients: no pattern after \"!\""
        );
        assert!(matches!(
            MatchList::parse(PARAM, "!! 127.0.0.1"),
            Err(AccessError::MissingPattern { .. })
        ));
    }

    #[test]
    fn parse_rejects_lookup_table() {
        assert_eq!(
            error("hash:/etc/x"),
            "qmqpd_authorized_clients: unsupported lookup table \"hash:/etc/x\": \
             qmqpd supports addresses, networks, host names and /file patterns"
        );
        assert!(matches!(
            MatchList::parse(PARAM, "127.0.0.1 !cidr:/etc/postfix/clients"),
            Err(AccessError::UnsupportedTable { .. })
        ));
        assert!(matches!(
            MatchList::parse(PARAM, "$mynetworks:x"),
            Err(AccessError::UnsupportedTable { .. })
        ));
    }

    #[test]
    fn parse_rejects_bad_name_characters() {
        assert_eq!(
            error("exa$mple.com"),
            "qmqpd_authorized_clients: bad host name pattern \"exa$mple.com\": \
             character '$' is not allowed (use letters, digits, \".\", \"-\" and \"_\")"
        );
        assert!(error("a..example.com").ends_with("empty label in name"));
        assert!(error(".").ends_with("empty label in name"));
    }

    #[test]
    fn error_names_the_parameter() {
        let message = MatchList::parse("debug_peer_list", "10.0.0.1/8")
            .unwrap_err()
            .to_string();
        assert!(message.starts_with("debug_peer_list: "), "{message}");
    }
}
