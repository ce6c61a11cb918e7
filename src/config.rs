//! Configuration: `main.cf` in Postfix syntax, `-o name=value` overrides, and the typed
//! parameters qmqpd uses. Owns parsing, `$name` expansion and validation; does not know
//! about sockets, logging backends or the access-list syntax (see `access`).
//!
//! Order of work in [`load`]: read the logical lines of `main.cf` ([`parse`]), apply the
//! `-o` overrides (last setting of a name wins), warn about unknown names, then expand and
//! validate every known parameter into [`Params`]. The unexpanded settings are kept for
//! `qmqpd -n` ([`Config::write_explicit`]).

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every parameter qmqpd reads, typed and validated.
#[derive(Debug, Clone)]
pub struct Params {
    /// The queue (`tmp/`, `new/`, `cur/` below it).
    pub queue_directory: PathBuf,
    /// Empty, or `addr:port` where the listener answers HAProxy's agent check.
    pub qmqpd_agent_check_listen: String,
    /// Free bytes on the queue file system below which the agent check answers `drain`.
    pub qmqpd_agent_check_minfree: u64,
    /// Free inodes on the queue file system below which the agent check answers `drain`.
    pub qmqpd_agent_check_mininodes: u64,
    /// Raw (expanded) match list; parsed by `access::MatchList::parse`.
    pub qmqpd_authorized_clients: String,
    /// Limit for one read or write on the connection (> 0).
    pub qmqpd_timeout: Duration,
    /// Tarpit before every non-K reply (may be 0).
    pub qmqpd_error_delay: Duration,
    /// Log `name[addr]:port` instead of `name[addr]`.
    pub qmqpd_client_port_logging: bool,
    /// Look up the client's name in DNS.
    pub qmqpd_peername_lookup: bool,
    /// Raw (expanded) match list of the peers that may send a PROXY header.
    pub qmqpd_upstream_proxy_clients: String,
    /// Every connection starts with a PROXY header (`haproxy`), or none does (empty).
    pub qmqpd_upstream_proxy_protocol: bool,
    /// Limit for reading the PROXY header (> 0).
    pub qmqpd_upstream_proxy_timeout: Duration,
    /// Largest request in bytes, envelope included; 0 means no limit (see [`Params::size_limit`]).
    pub message_size_limit: u64,
    /// Longest sender or recipient (>= 1).
    pub line_length_limit: u64,
    /// Received: headers at which a message is rejected (>= 1).
    pub hopcount_limit: u64,
    /// Turn every `D` reply into `Z`.
    pub soft_bounce: bool,
    /// Characters allowed as VERP delimiters (non-empty).
    pub verp_delimiter_filter: String,
    /// Raw (expanded) match list.
    pub debug_peer_list: String,
    /// Extra verbosity steps for clients in `debug_peer_list`.
    pub debug_peer_level: u32,
    /// Limit for the whole connection (> 0).
    pub daemon_timeout: Duration,
    /// Accepted for Postfix compatibility; qmqpd has no internal IPC (> 0).
    pub ipc_timeout: Duration,
    /// Listener mode: exit after this long without a connection (may be 0).
    pub max_idle: Duration,
    /// Listener mode: exit after this many connections (>= 1).
    pub max_use: u64,
    /// Listener mode: most connections served at once (>= 1).
    pub default_process_limit: u64,
    /// Empty or `transport:[nexthop[:port]]`, recorded in each queue file.
    pub content_filter: String,
    /// Empty or a subset of the four Postfix options, recorded in each queue file.
    pub receive_override_options: String,
    /// Our name in the Received: header (a valid host name).
    pub myhostname: String,
    /// Our software name in the Received: header.
    pub mail_name: String,
    /// The user qmqpd runs as when started as root (non-empty).
    pub mail_owner: String,
    /// Canonical lowercase syslog facility name without `LOG_` (e.g. `mail`, `local3`).
    pub syslog_facility: String,
    /// Tag prefix: `syslog_name/qmqpd`, or `qmqpd` when empty.
    pub syslog_name: String,
    /// Log to this file instead of syslog when non-empty.
    pub maillog_file: String,
}

impl Params {
    /// The request size limit, or `None` when `message_size_limit` is 0 (no limit, as Postfix).
    pub fn size_limit(&self) -> Option<u64> {
        match self.message_size_limit {
            0 => None,
            limit => Some(limit),
        }
    }
}

impl Default for Params {
    /// The DESIGN §6 defaults (the same values `qmqpd -d` prints).
    fn default() -> Params {
        Params {
            queue_directory: PathBuf::from("/var/spool/qmqpd"),
            qmqpd_agent_check_listen: String::new(),
            qmqpd_agent_check_minfree: 104_857_600,
            qmqpd_agent_check_mininodes: 10_000,
            qmqpd_authorized_clients: "127.0.0.0/8, [::1]/128".to_owned(),
            qmqpd_timeout: Duration::from_secs(300),
            qmqpd_error_delay: Duration::from_secs(1),
            qmqpd_client_port_logging: false,
            qmqpd_peername_lookup: true,
            qmqpd_upstream_proxy_clients: "127.0.0.0/8, [::1]/128".to_owned(),
            qmqpd_upstream_proxy_protocol: false,
            qmqpd_upstream_proxy_timeout: Duration::from_secs(5),
            message_size_limit: 10_240_000,
            line_length_limit: 2048,
            hopcount_limit: 50,
            soft_bounce: false,
            verp_delimiter_filter: "-=+".to_owned(),
            debug_peer_list: String::new(),
            debug_peer_level: 2,
            daemon_timeout: Duration::from_secs(18000),
            ipc_timeout: Duration::from_secs(3600),
            max_idle: Duration::from_secs(100),
            max_use: 100,
            default_process_limit: 100,
            content_filter: String::new(),
            receive_override_options: String::new(),
            myhostname: default_hostname(),
            mail_name: "qmqpd".to_owned(),
            mail_owner: "qmqpd".to_owned(),
            syslog_facility: "mail".to_owned(),
            syslog_name: String::new(),
            maillog_file: String::new(),
        }
    }
}

/// The configuration directory when neither `-c` nor `$MAIL_CONFIG` names one.
pub const DEFAULT_CONFIG_DIR: &str = "/etc/qmqpd";

/// Where the configuration comes from (already extracted from argv/env by the binary).
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// `-c DIR` (a missing `main.cf` there is an error).
    pub dir: Option<PathBuf>,
    /// `$MAIL_CONFIG` (a missing `main.cf` there is an error too; empty counts as unset).
    pub mail_config: Option<PathBuf>,
    /// Each `-o` argument, `name=value` (or `{ name = value }`).
    pub overrides: Vec<String>,
}

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every known parameter, expanded and validated.
    pub params: Params,
    /// Problems that do not stop qmqpd, e.g. `/etc/qmqpd/main.cf, line 7: unknown parameter "foo"`.
    pub warnings: Vec<String>,
    /// The directory `main.cf` was looked for in.
    pub config_directory: PathBuf,
    /// The explicit settings (file, then `-o`), unexpanded, one per name, for `-n`.
    explicit: Vec<Setting>,
}

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

/// Why the configuration cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// `main.cf` could not be opened or read.
    Read { path: PathBuf, source: io::Error },
    /// A logical line or `-o` argument is not `name = value`.
    Syntax {
        origin: String,
        reason: &'static str,
        text: String,
    },
    /// A parameter's (expanded) value is not acceptable.
    Invalid {
        origin: String,
        name: &'static str,
        value: String,
        reason: Cow<'static, str>,
    },
    /// A `$` expression in a parameter's value cannot be expanded.
    Expand {
        origin: String,
        name: &'static str,
        reason: String,
    },
    /// Expanding a parameter leads back to a parameter being expanded.
    Loop {
        origin: String,
        name: &'static str,
        chain: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Read { path, source } => {
                write!(f, "cannot read {}: {}", path.display(), source)
            }
            ConfigError::Syntax {
                origin,
                reason,
                text,
            } => write!(f, "{origin}: {reason}: \"{text}\""),
            ConfigError::Invalid {
                origin,
                name,
                value,
                reason,
            } => write!(f, "{origin}: bad {name} value \"{value}\": {reason}"),
            ConfigError::Expand {
                origin,
                name,
                reason,
            } => write!(f, "{origin}: cannot expand {name}: {reason}"),
            ConfigError::Loop {
                origin,
                name,
                chain,
            } => write!(f, "{origin}: macro loop in parameter \"{name}\": {chain}"),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConfigError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The parameters qmqpd knows, sorted by name (byte order, as postconf sorts).
const KNOWN: [&str; 32] = [
    "content_filter",
    "daemon_timeout",
    "debug_peer_level",
    "debug_peer_list",
    "default_process_limit",
    "hopcount_limit",
    "ipc_timeout",
    "line_length_limit",
    "mail_name",
    "mail_owner",
    "maillog_file",
    "max_idle",
    "max_use",
    "message_size_limit",
    "myhostname",
    "qmqpd_agent_check_listen",
    "qmqpd_agent_check_minfree",
    "qmqpd_agent_check_mininodes",
    "qmqpd_authorized_clients",
    "qmqpd_client_port_logging",
    "qmqpd_error_delay",
    "qmqpd_peername_lookup",
    "qmqpd_timeout",
    "qmqpd_upstream_proxy_clients",
    "qmqpd_upstream_proxy_protocol",
    "qmqpd_upstream_proxy_timeout",
    "queue_directory",
    "receive_override_options",
    "soft_bounce",
    "syslog_facility",
    "syslog_name",
    "verp_delimiter_filter",
];

/// Parameters that exist only for `$name` expansion and cannot be set.
const READ_ONLY: [&str; 3] = ["config_directory", "process_id", "process_name"];

/// Our process name, for `$process_name` and the default syslog tag.
const PROCESS_NAME: &str = "qmqpd";

/// Postfix's limit on nested macro evaluation.
const MAX_NESTING: usize = 100;
/// The longest expanded value: a few lines of `$name` references can otherwise double their
/// way to gigabytes.
const MAX_EXPANDED: usize = 1 << 20;

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

/// The built-in default of a known parameter, as `-d` prints it; `myhostname` is computed.
fn default_value(name: &str) -> Option<&'static str> {
    Some(match name {
        "content_filter"
        | "debug_peer_list"
        | "maillog_file"
        | "qmqpd_agent_check_listen"
        | "qmqpd_upstream_proxy_protocol"
        | "receive_override_options"
        | "syslog_name" => "",
        "daemon_timeout" => "18000s",
        "debug_peer_level" => "2",
        "default_process_limit" | "max_use" => "100",
        "hopcount_limit" => "50",
        "ipc_timeout" => "3600s",
        "line_length_limit" => "2048",
        "mail_name" | "mail_owner" => "qmqpd",
        "max_idle" => "100s",
        "message_size_limit" => "10240000",
        "qmqpd_agent_check_minfree" => "104857600",
        "qmqpd_agent_check_mininodes" => "10000",
        "qmqpd_authorized_clients" | "qmqpd_upstream_proxy_clients" => "127.0.0.0/8, [::1]/128",
        "qmqpd_client_port_logging" | "soft_bounce" => "no",
        "qmqpd_error_delay" => "1s",
        "qmqpd_peername_lookup" => "yes",
        "qmqpd_timeout" => "300s",
        "qmqpd_upstream_proxy_timeout" => "5s",
        "queue_directory" => "/var/spool/qmqpd",
        "syslog_facility" => "mail",
        "verp_delimiter_filter" => "-=+",
        _ => return None,
    })
}

/// The host's name as Postfix would default `myhostname`: gethostname(), plus
/// `.localdomain` when it has no dot. No DNS.
fn default_hostname() -> String {
    let name = nix::unistd::gethostname()
        .ok()
        .and_then(|name| name.into_string().ok())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    if name.contains('.') {
        name
    } else {
        name + ".localdomain"
    }
}

/// One explicit setting: from `main.cf` or `-o`, unexpanded.
#[derive(Debug, Clone)]
struct Setting {
    name: String,
    value: String,
    /// `FILE, line N` or `-o ARG`, for messages.
    origin: String,
}

/// Load the configuration: `main.cf` from the chosen directory, then the `-o` overrides.
pub fn load(source: &Source) -> Result<Config, ConfigError> {
    let mail_config = source
        .mail_config
        .as_ref()
        .filter(|dir| !dir.as_os_str().is_empty());
    match (&source.dir, mail_config) {
        (Some(dir), _) | (None, Some(dir)) => load_from(dir, true, &source.overrides),
        (None, None) => load_from(Path::new(DEFAULT_CONFIG_DIR), false, &source.overrides),
    }
}

/// Load `dir/main.cf`; a missing file is an error only when the directory was `named`.
fn load_from(dir: &Path, named: bool, overrides: &[String]) -> Result<Config, ConfigError> {
    let path = dir.join("main.cf");
    let mut warnings = Vec::new();
    let origin = path.to_string_lossy();
    let entries = match File::open(&path) {
        Ok(file) => {
            read_entries(BufReader::new(file), &origin, &mut warnings).map_err(|err| match err {
                // The reader only knows the origin text; give the real path back.
                ConfigError::Read { source, .. } => ConfigError::Read {
                    path: path.clone(),
                    source,
                },
                other => other,
            })?
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound && !named => Vec::new(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    build(&entries, &origin, overrides, dir.to_path_buf(), warnings)
}

/// Parse main.cf text into (line number, name, raw value) entries (logical lines joined).
///
/// Warnings (a continuation line with nothing before it, a NUL byte) are dropped here;
/// [`load`] reports them in [`Config::warnings`].
pub fn parse<R: BufRead>(reader: R, origin: &str) -> Result<Vec<Entry>, ConfigError> {
    read_entries(reader, origin, &mut Vec::new())
}

/// [`parse`], collecting warnings.
fn read_entries<R: BufRead>(
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
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r' | '\x0b' | '\x0c')
}

/// [`is_space`] for bytes.
fn is_space_byte(byte: u8) -> bool {
    is_space(char::from(byte))
}

/// A parameter-name character: `[A-Za-z0-9_]`.
fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// At most `max` characters of `text`, with `...` when cut.
fn shorten(text: &str, max: usize) -> Cow<'_, str> {
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
fn split_override(arg: &str) -> Result<(&str, &str), ConfigError> {
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

/// Merge entries and overrides, warn, expand and validate.
fn build(
    entries: &[Entry],
    file_origin: &str,
    overrides: &[String],
    config_directory: PathBuf,
    mut warnings: Vec<String>,
) -> Result<Config, ConfigError> {
    let mut explicit: Vec<Setting> = Vec::with_capacity(entries.len() + overrides.len());
    for entry in entries {
        let origin = format!("{file_origin}, line {}", entry.line);
        set(
            &mut explicit,
            &entry.name,
            &entry.value,
            origin,
            true,
            &mut warnings,
        );
    }
    for arg in overrides {
        let (name, value) = split_override(arg)?;
        set(
            &mut explicit,
            name,
            value,
            format!("-o {arg}"),
            false,
            &mut warnings,
        );
    }
    warn_unknown(&explicit, &mut warnings);
    let directory_text = config_directory.to_string_lossy();
    let params = {
        let resolver = Resolver {
            explicit: &explicit,
            config_directory: &directory_text,
            hostname: OnceCell::new(),
        };
        resolver.params()?
    };
    Ok(Config {
        params,
        warnings,
        config_directory,
        explicit,
    })
}

/// Record one explicit setting; the last one of a name wins.
fn set(
    explicit: &mut Vec<Setting>,
    name: &str,
    value: &str,
    origin: String,
    from_file: bool,
    warnings: &mut Vec<String>,
) {
    if READ_ONLY.contains(&name) {
        warnings.push(format!(
            "{origin}: parameter \"{name}\" is read-only; setting ignored"
        ));
        return;
    }
    match explicit.iter_mut().find(|setting| setting.name == name) {
        Some(setting) => {
            if from_file && setting.value != value {
                warnings.push(format!(
                    "{origin}: overriding earlier entry: {name}={}",
                    setting.value
                ));
            }
            value.clone_into(&mut setting.value);
            setting.origin = origin;
        }
        None => explicit.push(Setting {
            name: name.to_owned(),
            value: value.to_owned(),
            origin,
        }),
    }
}

/// Warn about settings qmqpd does not know, unless another value refers to them by
/// `$name` (user-defined helper parameters, as postconf allows).
fn warn_unknown(explicit: &[Setting], warnings: &mut Vec<String>) {
    let unknown = |setting: &&Setting| !KNOWN.contains(&setting.name.as_str());
    if !explicit.iter().any(|setting| unknown(&setting)) {
        return;
    }
    let mut referenced: Vec<&str> = Vec::new();
    for setting in explicit {
        for_each_reference(&setting.value, |name| referenced.push(name));
    }
    for setting in explicit.iter().filter(unknown) {
        if !referenced.contains(&setting.name.as_str()) {
            warnings.push(format!(
                "{}: unknown parameter \"{}\"",
                setting.origin, setting.name
            ));
        }
    }
}

/// Call `found` with the name of every `$name`, `${name...}` and `$(name...)` in `value`,
/// conditional branches included.
fn for_each_reference<'a>(value: &'a str, mut found: impl FnMut(&'a str)) {
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        let after = rest.get(dollar + 1..).unwrap_or("");
        if let Some(literal) = after.strip_prefix('$') {
            rest = literal;
            continue;
        }
        let after = after
            .strip_prefix('{')
            .or_else(|| after.strip_prefix('('))
            .unwrap_or(after);
        let end = after
            .find(|c: char| !is_name_char(c))
            .unwrap_or(after.len());
        let (name, tail) = after.split_at(end);
        if !name.is_empty() {
            found(name);
        }
        rest = tail;
    }
}

/// Why a `$` expression could not be expanded.
enum ExpandError {
    Syntax(String),
    /// The chain of parameter names, ending with the repeated one.
    Loop(String),
}

/// Stops an expansion that grows past `MAX_EXPANDED`.
fn check_expanded_len(out: &str) -> Result<(), ExpandError> {
    if out.len() > MAX_EXPANDED {
        return Err(ExpandError::Syntax(format!(
            "expanded value is longer than {MAX_EXPANDED} bytes"
        )));
    }
    Ok(())
}

/// Looks up and expands parameter values: explicit settings, then defaults, then the
/// read-only parameters.
struct Resolver<'a> {
    explicit: &'a [Setting],
    config_directory: &'a str,
    /// The computed `myhostname` default, only when something needs it.
    hostname: OnceCell<String>,
}

impl Resolver<'_> {
    /// The raw (unexpanded) value of `name`, or `None` when it is undefined.
    fn raw(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some(setting) = self.explicit.iter().find(|setting| setting.name == name) {
            return Some(Cow::Borrowed(&setting.value));
        }
        match name {
            "myhostname" => Some(Cow::Borrowed(self.hostname.get_or_init(default_hostname))),
            "config_directory" => Some(Cow::Borrowed(self.config_directory)),
            "process_name" => Some(Cow::Borrowed(PROCESS_NAME)),
            "process_id" => Some(Cow::Owned(std::process::id().to_string())),
            _ => default_value(name).map(Cow::Borrowed),
        }
    }

    /// Where `name` was set, for messages.
    fn origin(&self, name: &str) -> String {
        self.explicit
            .iter()
            .find(|setting| setting.name == name)
            .map_or_else(
                || "built-in default".to_owned(),
                |setting| setting.origin.clone(),
            )
    }

    /// The expanded value of the known parameter `name`, free of control characters.
    fn value(&self, name: &'static str) -> Result<String, ConfigError> {
        let raw = self.raw(name).unwrap_or_default();
        let value = if raw.contains('$') {
            let mut out = String::with_capacity(raw.len());
            let mut stack = vec![name];
            self.expand(&raw, &mut out, &mut stack, 0)
                .map_err(|err| match err {
                    ExpandError::Syntax(reason) => ConfigError::Expand {
                        origin: self.origin(name),
                        name,
                        reason,
                    },
                    ExpandError::Loop(chain) => ConfigError::Loop {
                        origin: self.origin(name),
                        name,
                        chain,
                    },
                })?;
            out
        } else {
            raw.into_owned()
        };
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(self.invalid(name, value, "control character in value"));
        }
        Ok(value)
    }

    /// A validation error for `name`.
    fn invalid(
        &self,
        name: &'static str,
        value: String,
        reason: impl Into<Cow<'static, str>>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin(name),
            name,
            value,
            reason: reason.into(),
        }
    }

    /// Expand `text` into `out`; `stack` holds the parameters being expanded.
    fn expand<'s>(
        &'s self,
        text: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        if depth > MAX_NESTING {
            return Err(ExpandError::Syntax(format!(
                "unreasonable macro call nesting: \"{}\"",
                shorten(text, 30)
            )));
        }
        let mut rest = text;
        while let Some(dollar) = rest.find('$') {
            out.push_str(rest.get(..dollar).unwrap_or(""));
            let after = rest.get(dollar + 1..).unwrap_or("");
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                continue;
            }
            let (expression, tail) = split_reference(after, text)?;
            self.expand_expression(expression, out, stack, depth)?;
            check_expanded_len(out)?;
            rest = tail;
        }
        out.push_str(rest);
        check_expanded_len(out)
    }

    /// Expand the inside of `$name`, `${...}` or `$(...)`.
    fn expand_expression<'s>(
        &'s self,
        expression: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        if expression.trim_start_matches(is_space).starts_with('{') {
            return Err(ExpandError::Syntax(format!(
                "logical expressions are not supported: \"{expression}\""
            )));
        }
        let name_end = expression
            .find(|c: char| !is_name_char(c))
            .unwrap_or(expression.len());
        let (name, rest) = expression.split_at(name_end);
        if name.is_empty() {
            return Err(ExpandError::Syntax(format!(
                "empty macro name: \"{expression}\""
            )));
        }
        let mut operator = rest.chars().next();
        let mut rest = rest.get(1..).unwrap_or("");
        match operator {
            None => return self.expand_parameter(name, out, stack, depth),
            Some('?' | ':') => {}
            Some(_) => {
                return Err(ExpandError::Syntax(format!(
                    "attribute name syntax error at \"{expression}\""
                )));
            }
        }
        // Postfix tests the raw value: set means defined and non-empty.
        let is_set = self.raw(name).is_some_and(|value| !value.is_empty());
        if operator == Some('?') {
            let (if_set, after) = split_operand(rest, expression)?;
            if is_set {
                self.expand(if_set, out, stack, depth + 1)?;
            }
            if after.is_empty() {
                return Ok(());
            }
            rest = after.strip_prefix(':').ok_or_else(|| {
                ExpandError::Syntax(format!("\":\" expected at \"{after}\" in \"{expression}\""))
            })?;
            operator = Some(':');
        }
        if operator == Some(':') {
            let (if_unset, after) = split_operand(rest, expression)?;
            if !is_set {
                self.expand(if_unset, out, stack, depth + 1)?;
            }
            if !after.is_empty() {
                return Err(ExpandError::Syntax(format!(
                    "unexpected input at \"{after}\" in \"{expression}\""
                )));
            }
        }
        Ok(())
    }

    /// Append the expanded value of parameter `name` (empty when undefined).
    fn expand_parameter<'s>(
        &'s self,
        name: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        let Some(value) = self.raw(name) else {
            return Ok(());
        };
        if !value.contains('$') {
            out.push_str(&value);
            return Ok(());
        }
        if stack.contains(&name) {
            let mut chain = stack.join(" -> ");
            chain.push_str(" -> ");
            chain.push_str(name);
            return Err(ExpandError::Loop(chain));
        }
        // Only explicit settings can hold a `$`, so the name lives as long as `self`.
        let Some(setting) = self.explicit.iter().find(|setting| setting.name == name) else {
            out.push_str(&value);
            return Ok(());
        };
        stack.push(&setting.name);
        let result = self.expand(&setting.value, out, stack, depth + 1);
        stack.pop();
        result
    }

    /// Build every typed parameter.
    fn params(&self) -> Result<Params, ConfigError> {
        Ok(Params {
            queue_directory: PathBuf::from(self.non_empty("queue_directory")?),
            qmqpd_agent_check_listen: self.agent_check_listen()?,
            qmqpd_agent_check_minfree: self.number("qmqpd_agent_check_minfree", 0)?,
            qmqpd_agent_check_mininodes: self.number("qmqpd_agent_check_mininodes", 0)?,
            qmqpd_authorized_clients: self.value("qmqpd_authorized_clients")?,
            qmqpd_timeout: self.time("qmqpd_timeout", 1)?,
            qmqpd_error_delay: self.time("qmqpd_error_delay", 0)?,
            qmqpd_client_port_logging: self.boolean("qmqpd_client_port_logging")?,
            qmqpd_peername_lookup: self.boolean("qmqpd_peername_lookup")?,
            qmqpd_upstream_proxy_clients: self.value("qmqpd_upstream_proxy_clients")?,
            qmqpd_upstream_proxy_protocol: self.upstream_proxy_protocol()?,
            qmqpd_upstream_proxy_timeout: self.time("qmqpd_upstream_proxy_timeout", 1)?,
            message_size_limit: self.number("message_size_limit", 0)?,
            line_length_limit: self.number("line_length_limit", 1)?,
            hopcount_limit: self.number("hopcount_limit", 1)?,
            soft_bounce: self.boolean("soft_bounce")?,
            verp_delimiter_filter: self.non_empty("verp_delimiter_filter")?,
            debug_peer_list: self.value("debug_peer_list")?,
            debug_peer_level: self.debug_peer_level()?,
            daemon_timeout: self.time("daemon_timeout", 1)?,
            ipc_timeout: self.time("ipc_timeout", 1)?,
            max_idle: self.time("max_idle", 0)?,
            max_use: self.number("max_use", 1)?,
            default_process_limit: self.number("default_process_limit", 1)?,
            content_filter: self.content_filter()?,
            receive_override_options: self.receive_override_options()?,
            myhostname: self.myhostname()?,
            mail_name: self.value("mail_name")?,
            mail_owner: self.non_empty("mail_owner")?,
            syslog_facility: self.syslog_facility()?,
            syslog_name: self.value("syslog_name")?,
            maillog_file: self.value("maillog_file")?,
        })
    }

    /// A string parameter that must not be empty.
    fn non_empty(&self, name: &'static str) -> Result<String, ConfigError> {
        let value = self.value(name)?;
        if value.is_empty() {
            return Err(self.invalid(name, value, "must not be empty"));
        }
        Ok(value)
    }

    /// A time parameter of at least `min_secs` seconds.
    fn time(&self, name: &'static str, min_secs: u64) -> Result<Duration, ConfigError> {
        let value = self.value(name)?;
        match time_value(&value) {
            Ok(time) if time.as_secs() >= min_secs => Ok(time),
            Ok(_) => Err(self.invalid(name, value, "must be greater than zero")),
            Err(reason) => Err(self.invalid(name, value, reason)),
        }
    }

    /// A `yes`/`no` parameter.
    fn boolean(&self, name: &'static str) -> Result<bool, ConfigError> {
        let value = self.value(name)?;
        if value.eq_ignore_ascii_case("yes") {
            Ok(true)
        } else if value.eq_ignore_ascii_case("no") {
            Ok(false)
        } else {
            Err(self.invalid(name, value, "expected \"yes\" or \"no\""))
        }
    }

    /// An unsigned decimal parameter of at least `min`.
    fn number(&self, name: &'static str, min: u64) -> Result<u64, ConfigError> {
        let value = self.value(name)?;
        match decimal(&value) {
            Ok(number) if number >= min => Ok(number),
            Ok(_) => Err(self.invalid(name, value, format!("must be at least {min}"))),
            Err(reason) => Err(self.invalid(name, value, reason)),
        }
    }

    /// `debug_peer_level`: a decimal u32.
    fn debug_peer_level(&self) -> Result<u32, ConfigError> {
        let name = "debug_peer_level";
        let value = self.value(name)?;
        match decimal(&value).map(u32::try_from) {
            Ok(Ok(level)) => Ok(level),
            Ok(Err(_)) => Err(self.invalid(name, value, "number too large")),
            Err(reason) => Err(self.invalid(name, value, reason)),
        }
    }

    /// `content_filter`: empty or `transport:[nexthop[:port]]`.
    fn content_filter(&self) -> Result<String, ConfigError> {
        let name = "content_filter";
        let value = self.value(name)?;
        match check_content_filter(&value) {
            Ok(()) => Ok(value),
            Err(reason) => Err(self.invalid(name, value, reason)),
        }
    }

    /// `receive_override_options`: a subset of [`OVERRIDE_OPTIONS`].
    fn receive_override_options(&self) -> Result<String, ConfigError> {
        let name = "receive_override_options";
        let value = self.value(name)?;
        let unknown = value
            .split(|c: char| c == ',' || is_space(c))
            .find(|word| !word.is_empty() && !OVERRIDE_OPTIONS.contains(word));
        match unknown {
            None => Ok(value),
            Some(word) => {
                let reason = format!(
                    "unknown option \"{word}\" (known: {})",
                    OVERRIDE_OPTIONS.join(", ")
                );
                Err(self.invalid(name, value, reason))
            }
        }
    }

    /// `qmqpd_upstream_proxy_protocol`: empty (off) or `haproxy` (v1 or v2, detected).
    fn upstream_proxy_protocol(&self) -> Result<bool, ConfigError> {
        let name = "qmqpd_upstream_proxy_protocol";
        let value = self.value(name)?;
        match value.trim() {
            "" => Ok(false),
            "haproxy" => Ok(true),
            _ => Err(self.invalid(name, value, "expected empty or \"haproxy\"")),
        }
    }

    /// `qmqpd_agent_check_listen`: empty (off) or a numeric `addr:port`.
    fn agent_check_listen(&self) -> Result<String, ConfigError> {
        let name = "qmqpd_agent_check_listen";
        let value = self.value(name)?;
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Ok(String::new());
        }
        match trimmed.parse::<std::net::SocketAddr>() {
            Ok(_) => Ok(trimmed.to_owned()),
            Err(_) => Err(self.invalid(name, value, "expected empty or a numeric address:port")),
        }
    }

    /// `myhostname`: a syntactically valid host name, as Postfix requires.
    fn myhostname(&self) -> Result<String, ConfigError> {
        let name = "myhostname";
        let value = self.value(name)?;
        match check_hostname(&value) {
            Ok(()) => Ok(value),
            Err(reason) => Err(self.invalid(name, value, reason)),
        }
    }

    /// `syslog_facility`: a syslog facility name, returned in canonical form.
    fn syslog_facility(&self) -> Result<String, ConfigError> {
        let name = "syslog_facility";
        let value = self.value(name)?;
        let lower = value.to_ascii_lowercase();
        let bare = lower.strip_prefix("log_").unwrap_or(&lower);
        match FACILITIES.iter().find(|&&facility| facility == bare) {
            Some(facility) => Ok((*facility).to_owned()),
            None => Err(self.invalid(name, value, "unknown syslog facility")),
        }
    }
}

/// Split the reference after a `$`: `(name...)`/`{name...}` with balanced brackets, or a
/// bare name. Returns the expression and the text after the reference.
fn split_reference<'t>(after: &'t str, whole: &str) -> Result<(&'t str, &'t str), ExpandError> {
    let close = match after.chars().next() {
        Some('{') => Some(('{', '}')),
        Some('(') => Some(('(', ')')),
        _ => None,
    };
    let (expression, tail) = match close {
        Some((open, close)) => {
            let mut level = 0usize;
            let end = after.char_indices().find_map(|(index, c)| {
                if c == open {
                    level += 1;
                } else if c == close {
                    level = level.saturating_sub(1);
                    if level == 0 {
                        return Some(index);
                    }
                }
                None
            });
            let Some(end) = end else {
                return Err(ExpandError::Syntax(format!(
                    "truncated macro reference: \"{whole}\""
                )));
            };
            (
                after.get(1..end).unwrap_or(""),
                after.get(end + 1..).unwrap_or(""),
            )
        }
        None => {
            let end = after
                .find(|c: char| !is_name_char(c))
                .unwrap_or(after.len());
            after.split_at(end)
        }
    };
    if expression.is_empty() {
        return Err(ExpandError::Syntax(format!(
            "empty macro name: \"{whole}\""
        )));
    }
    Ok((expression, tail))
}

/// One result operand of `?` or `:`: `{text}` (whitespace around it ignored, text after it
/// returned), or else all the remaining text.
fn split_operand<'t>(text: &'t str, expression: &str) -> Result<(&'t str, &'t str), ExpandError> {
    let trimmed = text.trim_start_matches(is_space);
    if !trimmed.starts_with('{') {
        return Ok((text, ""));
    }
    let mut level = 0usize;
    let end = trimmed.char_indices().find_map(|(index, c)| {
        match c {
            '{' => level += 1,
            '}' => {
                level = level.saturating_sub(1);
                if level == 0 {
                    return Some(index);
                }
            }
            _ => {}
        }
        None
    });
    let Some(end) = end else {
        return Err(ExpandError::Syntax(format!(
            "unbalanced {{}} in \"{expression}\""
        )));
    };
    Ok((
        trimmed.get(1..end).unwrap_or(""),
        trimmed
            .get(end + 1..)
            .unwrap_or("")
            .trim_start_matches(is_space),
    ))
}

/// An unsigned decimal number: digits only.
fn decimal(value: &str) -> Result<u64, &'static str> {
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

/// Write `name = value` with whitespace runs in the value made single spaces, as postconf.
fn write_setting<W: Write>(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    let mut line = String::with_capacity(name.len() + value.len() + 4);
    line.push_str(name);
    line.push_str(" =");
    for word in value.split(is_space).filter(|word| !word.is_empty()) {
        line.push(' ');
        line.push_str(word);
    }
    line.push('\n');
    w.write_all(line.as_bytes())
}

impl Config {
    /// `qmqpd -n`: parameters set in main.cf or with -o, unexpanded, `name = value`, sorted by name.
    pub fn write_explicit<W: Write>(&self, mut w: W) -> io::Result<()> {
        let mut settings: Vec<&Setting> = self.explicit.iter().collect();
        settings.sort_by(|a, b| a.name.cmp(&b.name));
        for setting in settings {
            write_setting(&mut w, &setting.name, &setting.value)?;
        }
        w.flush()
    }
}

/// `qmqpd -d`: every parameter's default, `name = value`, sorted by name (postconf's format).
pub fn write_defaults<W: Write>(mut w: W) -> io::Result<()> {
    let hostname = default_hostname();
    let process_id = std::process::id().to_string();
    let mut lines: Vec<(&str, &str)> = KNOWN
        .iter()
        .map(|&name| match name {
            "myhostname" => (name, hostname.as_str()),
            _ => (name, default_value(name).unwrap_or("")),
        })
        .collect();
    lines.push(("config_directory", DEFAULT_CONFIG_DIR));
    lines.push(("process_id", &process_id));
    lines.push(("process_name", PROCESS_NAME));
    lines.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, value) in lines {
        write_setting(&mut w, name, value)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(text: &str) -> Vec<Entry> {
        parse(text.as_bytes(), "main.cf").unwrap()
    }

    fn config(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let entries = read_entries(text.as_bytes(), "main.cf", &mut warnings)?;
        let overrides: Vec<String> = overrides.iter().map(|arg| arg.to_string()).collect();
        build(
            &entries,
            "main.cf",
            &overrides,
            PathBuf::from("/etc/qmqpd"),
            warnings,
        )
    }

    fn params(text: &str) -> Params {
        config(text, &[]).unwrap().params
    }

    fn error(text: &str) -> String {
        config(text, &[]).unwrap_err().to_string()
    }

    fn explicit(config: &Config) -> String {
        let mut out = Vec::new();
        config.write_explicit(&mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn params_upstream_proxy_and_agent_check() {
        let p = Params::default();
        assert!(!p.qmqpd_upstream_proxy_protocol);
        assert_eq!(p.qmqpd_upstream_proxy_timeout, Duration::from_secs(5));
        assert_eq!(p.qmqpd_agent_check_listen, "");
        let p = params(
            "qmqpd_upstream_proxy_protocol = haproxy\nqmqpd_upstream_proxy_timeout = 2s\n\
             qmqpd_agent_check_listen = [2001:db8::1]:8628\nqmqpd_agent_check_minfree = 0\n",
        );
        assert!(p.qmqpd_upstream_proxy_protocol);
        assert_eq!(p.qmqpd_upstream_proxy_timeout, Duration::from_secs(2));
        assert_eq!(p.qmqpd_agent_check_listen, "[2001:db8::1]:8628");
        assert_eq!(p.qmqpd_agent_check_minfree, 0);
        assert!(error("qmqpd_upstream_proxy_protocol = nginx\n").contains("haproxy"));
        assert!(error("qmqpd_upstream_proxy_timeout = 0\n").contains("greater than zero"));
        assert!(error("qmqpd_agent_check_listen = localhost:80\n").contains("address:port"));
    }

    #[test]
    fn parse_joins_continuation_keeping_leading_whitespace() {
        let got = entries("a = one,\n  two\n\tthree\nb=x\n");
        assert_eq!(
            got,
            vec![
                Entry {
                    line: 1,
                    name: "a".into(),
                    value: "one,  two\tthree".into()
                },
                Entry {
                    line: 4,
                    name: "b".into(),
                    value: "x".into()
                },
            ]
        );
    }

    #[test]
    fn parse_keeps_logical_line_open_across_comments_and_blank_lines() {
        let got = entries("a = 1\n# note\n\n   \n  2\n#x\nb = 3");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].value, "1  2");
        assert_eq!((got[1].line, got[1].value.as_str()), (7, "3"));
    }

    #[test]
    fn parse_treats_hash_after_text_as_value() {
        let got = entries("  # indented comment\na = x # not a comment\n");
        assert_eq!(got[0].value, "x # not a comment");
    }

    #[test]
    fn parse_trims_whitespace_and_carriage_returns() {
        let got = entries("name\t =  value  \r\n  more \r\nother=\r\n");
        assert_eq!(got[0].name, "name");
        assert_eq!(got[0].value, "value    more");
        assert_eq!(got[1].value, "");
    }

    #[test]
    fn parse_warns_on_continuation_without_logical_line() {
        let mut warnings = Vec::new();
        let got = read_entries(
            "# head\n  orphan = 1\n  more\na = 2\n".as_bytes(),
            "main.cf",
            &mut warnings,
        )
        .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].line, got[0].name.as_str()), (4, "a"));
        assert_eq!(
            warnings,
            vec!["main.cf, line 2: logical line must not start with whitespace: \"orphan = 1\""]
        );
    }

    #[test]
    fn parse_rejects_missing_equals_naming_file_and_line() {
        let err = parse("a = 1\n\nbroken value\n".as_bytes(), "/etc/qmqpd/main.cf").unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/qmqpd/main.cf, line 3: missing '=' after attribute name: \"broken value\""
        );
    }

    #[test]
    fn parse_reports_first_line_of_continued_logical_line() {
        let err = parse("a = 1\nbroken\n  value\n".as_bytes(), "main.cf").unwrap_err();
        assert_eq!(
            err.to_string(),
            "main.cf, line 2: missing '=' after attribute name: \"broken  value\""
        );
    }

    #[test]
    fn parse_rejects_missing_name() {
        let err = parse("= value\n".as_bytes(), "main.cf").unwrap_err();
        assert_eq!(
            err.to_string(),
            "main.cf, line 1: missing attribute name: \"= value\""
        );
    }

    #[test]
    fn parse_rejects_invalid_utf8() {
        let err = parse(&b"a = \xff\n"[..], "main.cf").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("main.cf, line 1: invalid UTF-8")
        );
    }

    #[test]
    fn parse_ignores_invalid_utf8_in_comments() {
        let got = parse(&b"# caf\xe9\na = b\n"[..], "main.cf").unwrap();
        assert_eq!(got[0].value, "b");
    }

    #[test]
    fn parse_truncates_at_nul_with_warning() {
        let mut warnings = Vec::new();
        let got = read_entries(&b"a = x\0y\n"[..], "main.cf", &mut warnings).unwrap();
        assert_eq!(got[0].value, "x");
        assert_eq!(
            warnings,
            vec!["main.cf, line 1: text after null byte ignored"]
        );
    }

    #[test]
    fn build_duplicate_name_last_wins_with_warning() {
        let config = config("mail_name = one\nmail_name = two\n", &[]).unwrap();
        assert_eq!(config.params.mail_name, "two");
        assert_eq!(
            config.warnings,
            vec!["main.cf, line 2: overriding earlier entry: mail_name=one"]
        );
        assert_eq!(explicit(&config), "mail_name = two\n");
    }

    #[test]
    fn build_defaults_match_params_default() {
        let built = config("", &[]).unwrap();
        assert_eq!(
            format!("{:?}", built.params),
            format!("{:?}", Params::default())
        );
        assert!(built.warnings.is_empty());
    }

    #[test]
    fn known_names_sorted_with_defaults() {
        assert!(KNOWN.windows(2).all(|pair| pair[0] < pair[1]));
        for name in KNOWN {
            assert!(
                default_value(name).is_some() || name == "myhostname",
                "{name}"
            );
        }
    }

    #[test]
    fn expand_dollar_name_braces_and_parens() {
        let p = params("x = X\nmail_name = a$x-${x}-$(x)b\n");
        assert_eq!(p.mail_name, "aX-X-Xb");
    }

    #[test]
    fn expand_double_dollar_is_literal_dollar() {
        let p = params("mail_name = a$$x$$\n");
        assert_eq!(p.mail_name, "a$x$");
    }

    #[test]
    fn expand_undefined_name_is_empty() {
        let p = params("mail_name = [$nothing_here]\n");
        assert_eq!(p.mail_name, "[]");
    }

    #[test]
    fn expand_is_recursive_and_uses_defaults() {
        let p = params("a = $b/$mail_owner\nb = ${c}\nc = C$$\nmail_name = $a\n");
        assert_eq!(p.mail_name, "C$/qmqpd");
    }

    #[test]
    fn expand_read_only_parameters() {
        let p = params(
            "queue_directory = $config_directory/q\nmail_name = $process_name:$process_id\n",
        );
        assert_eq!(p.queue_directory, PathBuf::from("/etc/qmqpd/q"));
        assert_eq!(p.mail_name, format!("qmqpd:{}", std::process::id()));
    }

    #[test]
    fn expand_conditional_forms() {
        let text = "full = F\nempty =\n\
                    mail_name = <${full?yes}|${empty?yes}|${full:no}|${empty:no}|${unset:$full}>\n";
        assert_eq!(params(text).mail_name, "<yes|||no|F>");
    }

    #[test]
    fn expand_conditional_curly_ternary() {
        let text = "full = F\n\
                    mail_name = ${full?{a}:{b}}/${nope?{a} : {b}}/${full?{$full}:b}\n";
        assert_eq!(params(text).mail_name, "a/b/F");
    }

    #[test]
    fn expand_conditional_plain_text_keeps_colon() {
        // Postfix 2.x compatibility: unbraced text after '?' runs to the end.
        assert_eq!(params("x = 1\nmail_name = ${x?a:b}\n").mail_name, "a:b");
    }

    #[test]
    fn expand_detects_loop_naming_parameter() {
        let err = error("a = $b\nb = ${a}\nmail_name = x$a\n");
        assert_eq!(
            err,
            "main.cf, line 3: macro loop in parameter \"mail_name\": mail_name -> a -> b -> a"
        );
    }

    #[test]
    fn expand_detects_self_reference() {
        let err = error("mail_name = x$mail_name\n");
        assert_eq!(
            err,
            "main.cf, line 1: macro loop in parameter \"mail_name\": mail_name -> mail_name"
        );
    }

    #[test]
    fn expand_test_of_own_value_is_not_loop() {
        assert_eq!(params("mail_name = ${mail_name?set}\n").mail_name, "set");
    }

    #[test]
    fn expand_rejects_syntax_errors() {
        assert_eq!(
            error("mail_name = ${x\n"),
            "main.cf, line 1: cannot expand mail_name: truncated macro reference: \"${x\""
        );
        assert_eq!(
            error("mail_name = a$\n"),
            "main.cf, line 1: cannot expand mail_name: empty macro name: \"a$\""
        );
        assert!(error("mail_name = $-\n").contains("empty macro name"));
        assert!(error("mail_name = ${}\n").contains("empty macro name"));
        assert!(error("mail_name = ${a-b}\n").contains("attribute name syntax error"));
        assert!(error("mail_name = ${a?{b}x}\n").contains("\":\" expected"));
        assert!(error("mail_name = ${a?{b}:{c}d}\n").contains("unexpected input"));
        assert!(error("mail_name = ${a?{b}\n").contains("truncated macro reference"));
        assert!(error("mail_name = ${{a} == {b}?x}\n").contains("not supported"));
    }

    #[test]
    fn expand_bounds_expanded_size() {
        let mut text = String::from("a = xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n");
        for i in 0..30 {
            let prev = if i == 0 {
                "a".to_owned()
            } else {
                format!("b{}", i - 1)
            };
            text.push_str(&format!("b{i} = ${prev}${prev}\n"));
        }
        text.push_str("mail_name = $b29\n");
        let entries = parse(text.as_bytes(), "main.cf").unwrap();
        let err = build(
            &entries,
            "main.cf",
            &[],
            PathBuf::from("/etc/qmqpd"),
            Vec::new(),
        )
        .err()
        .unwrap()
        .to_string();
        assert!(err.contains("expanded value is longer than"), "{err}");
    }

    #[test]
    fn parse_rejects_names_that_expansion_cannot_reach() {
        assert!(split_override("#x=1").is_err());
        assert!(split_override("a-b=1").is_err());
        assert!(split_override("good_name2=1").is_ok());
        assert!(parse(&b"a.b = 1\n"[..], "main.cf").is_err());
    }

    #[test]
    fn expand_bounds_nesting() {
        let mut value = String::new();
        for _ in 0..150 {
            value.push_str("${mail_owner?");
        }
        value.push('x');
        for _ in 0..150 {
            value.push('}');
        }
        let err = error(&format!("mail_name = {value}\n"));
        assert!(err.contains("unreasonable macro call nesting"), "{err}");
    }

    #[test]
    fn override_replaces_file_value() {
        let config = config("mail_name = file\n", &["mail_name=cli", "max_use=5"]).unwrap();
        assert_eq!(config.params.mail_name, "cli");
        assert_eq!(config.params.max_use, 5);
        assert!(config.warnings.is_empty());
        assert_eq!(explicit(&config), "mail_name = cli\nmax_use = 5\n");
    }

    #[test]
    fn override_accepts_brace_form() {
        let config = config("", &["{ mail_name = a  b }", " {syslog_name=x}"]).unwrap();
        assert_eq!(config.params.mail_name, "a  b");
        assert_eq!(config.params.syslog_name, "x");
    }

    #[test]
    fn override_expands_against_file() {
        let config = config("base = /srv\n", &["queue_directory=$base/q"]).unwrap();
        assert_eq!(config.params.queue_directory, PathBuf::from("/srv/q"));
    }

    #[test]
    fn override_rejects_bad_syntax() {
        let err = config("", &["mail_name"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "-o mail_name: missing '=' after attribute name: \"mail_name\""
        );
        let err = config("", &["{ a = b"]).unwrap_err();
        assert!(err.to_string().starts_with("-o { a = b: missing '}'"));
    }

    #[test]
    fn override_validation_error_names_argument() {
        let err = config("", &["qmqpd_timeout=0"]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "-o qmqpd_timeout=0: bad qmqpd_timeout value \"0\": must be greater than zero"
        );
    }

    #[test]
    fn unknown_parameter_is_warning() {
        let config = config("foo = 1\nmail_name = x\n", &["bar=2"]).unwrap();
        assert_eq!(
            config.warnings,
            vec![
                "main.cf, line 1: unknown parameter \"foo\"",
                "-o bar=2: unknown parameter \"bar\"",
            ]
        );
    }

    #[test]
    fn unknown_parameter_referenced_by_value_is_not_warned() {
        let config = config(
            "mynetworks = 10.0.0.0/8\nqmqpd_authorized_clients = ${mynetworks}, $$x\n",
            &[],
        )
        .unwrap();
        assert!(config.warnings.is_empty(), "{:?}", config.warnings);
        assert_eq!(config.params.qmqpd_authorized_clients, "10.0.0.0/8, $x");
    }

    #[test]
    fn read_only_parameter_setting_is_ignored() {
        let config = config("process_name = evil\nmail_name = $process_name\n", &[]).unwrap();
        assert_eq!(config.params.mail_name, "qmqpd");
        assert_eq!(
            config.warnings,
            vec!["main.cf, line 1: parameter \"process_name\" is read-only; setting ignored"]
        );
        assert_eq!(explicit(&config), "mail_name = $process_name\n");
    }

    #[test]
    fn validate_times() {
        assert_eq!(
            error("x = 1\nqmqpd_timeout = 0s\n"),
            "main.cf, line 2: bad qmqpd_timeout value \"0s\": must be greater than zero"
        );
        assert_eq!(
            error("daemon_timeout = 5x\n"),
            "main.cf, line 1: bad daemon_timeout value \"5x\": unit must be one of s, m, h, d, w"
        );
        assert!(error("ipc_timeout = 0\n").starts_with("main.cf, line 1: bad ipc_timeout"));
        let p = params("qmqpd_error_delay = 0\nmax_idle = 0s\nqmqpd_timeout = 2m\n");
        assert_eq!(p.qmqpd_error_delay, Duration::ZERO);
        assert_eq!(p.max_idle, Duration::ZERO);
        assert_eq!(p.qmqpd_timeout, Duration::from_secs(120));
    }

    #[test]
    fn validate_booleans() {
        assert_eq!(
            error("soft_bounce = true\n"),
            "main.cf, line 1: bad soft_bounce value \"true\": expected \"yes\" or \"no\""
        );
        let p = params("soft_bounce = YES\nqmqpd_peername_lookup = no\n");
        assert!(p.soft_bounce);
        assert!(!p.qmqpd_peername_lookup);
    }

    #[test]
    fn validate_integers() {
        assert_eq!(
            error("hopcount_limit = +5\n"),
            "main.cf, line 1: bad hopcount_limit value \"+5\": expected an unsigned decimal number"
        );
        assert!(error("max_use = -1\n").contains("expected an unsigned decimal number"));
        assert!(error("max_use = 99999999999999999999\n").contains("number too large"));
        assert_eq!(
            error("line_length_limit = 0\n"),
            "main.cf, line 1: bad line_length_limit value \"0\": must be at least 1"
        );
        assert!(error("default_process_limit = 0\n").contains("must be at least 1"));
        assert_eq!(
            error("debug_peer_level = 4294967296\n"),
            "main.cf, line 1: bad debug_peer_level value \"4294967296\": number too large"
        );
        let p = params("message_size_limit = 0\ndebug_peer_level = 4294967295\n");
        assert_eq!(p.size_limit(), None);
        assert_eq!(p.debug_peer_level, u32::MAX);
        assert_eq!(Params::default().size_limit(), Some(10_240_000));
    }

    #[test]
    fn validate_syslog_facility() {
        assert_eq!(
            params("syslog_facility = LOG_Local3\n").syslog_facility,
            "local3"
        );
        assert_eq!(
            params("syslog_facility = AUTHPRIV\n").syslog_facility,
            "authpriv"
        );
        assert_eq!(
            error("syslog_facility = local8\n"),
            "main.cf, line 1: bad syslog_facility value \"local8\": unknown syslog facility"
        );
    }

    #[test]
    fn validate_non_empty_strings() {
        assert_eq!(
            error("verp_delimiter_filter =\n"),
            "main.cf, line 1: bad verp_delimiter_filter value \"\": must not be empty"
        );
        assert!(error("mail_owner = $unset\n").starts_with("main.cf, line 1: bad mail_owner"));
        assert!(error("queue_directory =\n").starts_with("main.cf, line 1: bad queue_directory"));
    }

    #[test]
    fn validate_content_filter() {
        for good in [
            "",
            "smtp:",
            "scan:[127.0.0.1]:10025",
            "lmtp:unix:/run/x",
            "a.b_c-d:host",
        ] {
            assert_eq!(
                params(&format!("content_filter = {good}\n")).content_filter,
                good
            );
        }
        assert_eq!(
            error("content_filter = :host\n"),
            "main.cf, line 1: bad content_filter value \":host\": empty transport name"
        );
        assert!(error("content_filter = smtp\n").contains("expected transport:"));
        assert!(error("content_filter = sm/tp:x\n").contains("bad character '/'"));
        assert!(error("content_filter = smtp:[::1\n").contains("missing ']'"));
        assert!(error("content_filter = smtp:[::1]:99999\n").contains("bad port"));
        assert!(error("content_filter = smtp:a b\n").contains("whitespace"));
    }

    #[test]
    fn validate_receive_override_options() {
        let text =
            "receive_override_options = no_milters, no_address_mappings no_header_body_checks\n";
        assert_eq!(
            params(text).receive_override_options,
            "no_milters, no_address_mappings no_header_body_checks"
        );
        assert!(
            error("receive_override_options = no_milters,no_unknown_recipient_checks,bogus\n")
                .starts_with(
                    "main.cf, line 1: bad receive_override_options value \"no_milters,no_unknown_recipient_checks,bogus\": unknown option \"bogus\""
                )
        );
    }

    #[test]
    fn validate_myhostname() {
        assert_eq!(
            params("myhostname = mx.example.org\n").myhostname,
            "mx.example.org"
        );
        assert!(error("myhostname = bad..name\n").contains("misplaced dot"));
        assert!(error("myhostname = 192.0.2.1\n").contains("numeric host name"));
        assert!(error("myhostname = a b\n").contains("invalid character"));
    }

    #[test]
    fn validate_rejects_control_characters() {
        let err = config("", &["mail_name=a\r\nX-Evil: 1"]).unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
    }

    #[test]
    fn parse_time_accepts_suffixes() {
        assert_eq!(parse_time("0"), Ok(Duration::ZERO));
        assert_eq!(parse_time("7"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_time("7s"), Ok(Duration::from_secs(7)));
        assert_eq!(parse_time("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_time("3h"), Ok(Duration::from_secs(10800)));
        assert_eq!(parse_time("1d"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_time("2w"), Ok(Duration::from_secs(1_209_600)));
        assert_eq!(
            parse_time("2147483647"),
            Ok(Duration::from_secs(2_147_483_647))
        );
    }

    #[test]
    fn parse_time_rejects_bad_values() {
        for bad in ["", "s", "-1", "+1", "1.5s", "1 s", "1S", "1ms", "1x"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse_time("5x").unwrap_err(),
            "bad time value \"5x\": unit must be one of s, m, h, d, w"
        );
        assert!(parse_time("2147483648").unwrap_err().contains("too large"));
        assert!(
            parse_time("99999999999999999999w")
                .unwrap_err()
                .contains("too large")
        );
    }

    #[test]
    fn write_explicit_sorts_normalises_and_keeps_unexpanded() {
        let config = config(
            "z = 1\nqmqpd_authorized_clients = $z,\n    10.0.0.0/8\t [::1]\nmail_name =\n",
            &["a={ x }", "{ b = y  z }"],
        )
        .unwrap();
        assert_eq!(
            explicit(&config),
            "a = { x }\nb = y z\nmail_name =\nqmqpd_authorized_clients = $z, 10.0.0.0/8 [::1]\nz = 1\n"
        );
    }

    #[test]
    fn write_defaults_prints_sorted_table() {
        let mut out = Vec::new();
        write_defaults(&mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let names: Vec<&str> = lines
            .iter()
            .map(|line| line.split(" =").next().unwrap())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert_eq!(lines.len(), KNOWN.len() + READ_ONLY.len());
        for expected in [
            "config_directory = /etc/qmqpd",
            "content_filter =",
            "daemon_timeout = 18000s",
            "debug_peer_level = 2",
            "max_idle = 100s",
            "message_size_limit = 10240000",
            "process_name = qmqpd",
            "qmqpd_authorized_clients = 127.0.0.0/8, [::1]/128",
            "qmqpd_client_port_logging = no",
            "qmqpd_error_delay = 1s",
            "qmqpd_peername_lookup = yes",
            "qmqpd_timeout = 300s",
            "verp_delimiter_filter = -=+",
        ] {
            assert!(lines.contains(&expected), "{expected}");
        }
        let host = lines
            .iter()
            .find_map(|line| line.strip_prefix("myhostname = "))
            .unwrap();
        assert!(host.contains('.'));
    }

    #[test]
    fn load_missing_default_file_means_defaults() {
        let dir = tempfile::TempDir::new().unwrap();
        let config = load_from(dir.path(), false, &["mail_name=x".to_string()]).unwrap();
        assert_eq!(config.params.mail_name, "x");
        assert_eq!(config.config_directory, dir.path());
    }

    #[test]
    fn load_missing_named_file_is_error() {
        let dir = tempfile::TempDir::new().unwrap();
        let source = Source {
            dir: Some(dir.path().to_path_buf()),
            ..Source::default()
        };
        let err = load(&source).unwrap_err();
        let main_cf = dir.path().join("main.cf");
        assert!(
            err.to_string()
                .starts_with(&format!("cannot read {}: ", main_cf.display())),
            "{err}"
        );
        let source = Source {
            mail_config: Some(dir.path().to_path_buf()),
            ..Source::default()
        };
        assert!(matches!(load(&source), Err(ConfigError::Read { .. })));
    }

    #[test]
    fn load_reads_main_cf_from_dir_before_mail_config() {
        let dir = tempfile::TempDir::new().unwrap();
        let other = tempfile::TempDir::new().unwrap();
        std::fs::write(
            dir.path().join("main.cf"),
            "# test\nqueue_directory = $config_directory/queue\nfoo = bar\n",
        )
        .unwrap();
        let source = Source {
            dir: Some(dir.path().to_path_buf()),
            mail_config: Some(other.path().to_path_buf()),
            overrides: vec!["max_use=7".into()],
        };
        let config = load(&source).unwrap();
        assert_eq!(config.params.queue_directory, dir.path().join("queue"));
        assert_eq!(config.params.max_use, 7);
        assert_eq!(config.config_directory, dir.path());
        let main_cf = dir.path().join("main.cf");
        assert_eq!(
            config.warnings,
            vec![format!(
                "{}, line 3: unknown parameter \"foo\"",
                main_cf.display()
            )]
        );
    }

    #[test]
    fn load_error_names_file_and_line() {
        let dir = tempfile::TempDir::new().unwrap();
        std::fs::write(dir.path().join("main.cf"), "\n\nmax_idle = soon\n").unwrap();
        let source = Source {
            mail_config: Some(dir.path().to_path_buf()),
            ..Source::default()
        };
        let err = load(&source).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{}, line 3: bad max_idle value \"soon\": expected a number with an optional unit s, m, h, d or w",
                dir.path().join("main.cf").display()
            )
        );
    }
}
