//! The parameter table: every parameter qmqpd reads, declared once as one row
//! `name: Type = default, parser` (Postfix's `{name, default, &var, min, max}`). The row gives
//! the known name, the built-in default `qmqpd -d` prints, the typed field of [`Params`] and
//! the function that validates an expanded value into that field. Adding a parameter is
//! adding a row here; nothing else in `config` names parameters one by one.

use std::path::PathBuf;
use std::time::Duration;

use super::ConfigError;
use super::expand::Resolver;
use super::value::{
    boolean, commit_method, content_filter, hostname, level, non_empty, number, override_options,
    path, socket_address_or_empty, syslog_facility, text, time, upstream_proxy_protocol,
};
use crate::queue::CommitMethod;

/// A parameter's built-in default.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Builtin {
    /// This text, expanded and validated like an explicit setting.
    Fixed(&'static str),
    /// The host's name (`myhostname`): computed, only when needed.
    Hostname,
}

/// One row of the table, as the untyped parts of `config` see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Row {
    /// The parameter name in `main.cf`.
    pub(crate) name: &'static str,
    /// Its built-in default.
    pub(crate) default: Builtin,
}

use Builtin::{Fixed, Hostname};

/// Declares [`Params`], [`TABLE`], `Params::resolve` and `Default for Params` from the rows.
macro_rules! parameters {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty = $default:expr, $parse:expr; )*) => {
        /// Every parameter qmqpd reads, typed and validated.
        #[derive(Debug, Clone)]
        pub struct Params {
            $( $(#[$doc])* pub $name: $ty, )*
        }

        /// Every known parameter, in the order they are validated (the first bad one is
        /// reported).
        pub(crate) const TABLE: &[Row] = &[ $( Row { name: stringify!($name), default: $default } ),* ];

        impl Params {
            /// Expands and validates every parameter.
            pub(crate) fn resolve(resolver: &Resolver<'_>) -> Result<Params, ConfigError> {
                Ok(Params { $( $name: resolver.typed(stringify!($name), $parse)?, )* })
            }
        }

        impl Default for Params {
            /// The built-in defaults (the same values `qmqpd -d` prints).
            fn default() -> Params {
                Params { $( $name: builtin($default, $parse), )* }
            }
        }
    };
}

parameters! {
    /// The queue (`tmp/`, `new/`, `cur/` below it).
    queue_directory: PathBuf = Fixed("/var/spool/qmqpd"), path;
    /// How a message gets its name in `new/`: `linkat` of an unnamed `O_TMPFILE` file,
    /// `rename` from `tmp/`, or `auto` (`linkat` where the file system supports it).
    queue_commit_method: CommitMethod = Fixed("auto"), commit_method;
    /// Raw (expanded) match list; parsed by `access::MatchList::parse`.
    qmqpd_authorized_clients: String = Fixed("127.0.0.0/8, [::1]/128"), text;
    /// Limit for one read or write on the connection (> 0).
    qmqpd_timeout: Duration = Fixed("300s"), time(1);
    /// Tarpit before every non-K reply (may be 0).
    qmqpd_error_delay: Duration = Fixed("1s"), time(0);
    /// Log `name[addr]:port` instead of `name[addr]`.
    qmqpd_client_port_logging: bool = Fixed("no"), boolean;
    /// Look up the client's name in DNS.
    qmqpd_peername_lookup: bool = Fixed("yes"), boolean;
    /// Every connection starts with a PROXY header (`haproxy`), or none does (empty).
    qmqpd_upstream_proxy_protocol: bool = Fixed(""), upstream_proxy_protocol;
    /// Raw (expanded) match list of the peers that may send a PROXY header.
    qmqpd_upstream_proxy_clients: String = Fixed("127.0.0.0/8, [::1]/128"), text;
    /// Limit for reading the PROXY header (> 0).
    qmqpd_upstream_proxy_timeout: Duration = Fixed("5s"), time(1);
    /// Empty, or `addr:port` where the listener answers HAProxy's agent check.
    qmqpd_agent_check_listen: String = Fixed(""), socket_address_or_empty;
    /// Free bytes on the queue file system below which the agent check answers `drain`.
    qmqpd_agent_check_minfree: u64 = Fixed("104857600"), number(0);
    /// Free inodes on the queue file system below which the agent check answers `drain`.
    qmqpd_agent_check_mininodes: u64 = Fixed("10000"), number(0);
    /// Largest request in bytes, envelope included; 0 means no limit (see [`Params::size_limit`]).
    message_size_limit: u64 = Fixed("10240000"), number(0);
    /// Longest sender or recipient (>= 1).
    line_length_limit: u64 = Fixed("2048"), number(1);
    /// Received: headers at which a message is rejected (>= 1).
    hopcount_limit: u64 = Fixed("50"), number(1);
    /// Turn every `D` reply into `Z`.
    soft_bounce: bool = Fixed("no"), boolean;
    /// Characters allowed as VERP delimiters (non-empty).
    verp_delimiter_filter: String = Fixed("-=+"), non_empty;
    /// Raw (expanded) match list.
    debug_peer_list: String = Fixed(""), text;
    /// Extra verbosity steps for clients in `debug_peer_list`.
    debug_peer_level: u32 = Fixed("2"), level;
    /// Limit for the whole connection (> 0).
    daemon_timeout: Duration = Fixed("18000s"), time(1);
    /// Accepted for Postfix compatibility; qmqpd has no internal IPC (> 0).
    ipc_timeout: Duration = Fixed("3600s"), time(1);
    /// Listener mode: exit after this long without a connection (may be 0).
    max_idle: Duration = Fixed("100s"), time(0);
    /// Listener mode: exit after this many connections (>= 1).
    max_use: u64 = Fixed("100"), number(1);
    /// Listener mode: most connections served at once (>= 1).
    default_process_limit: u64 = Fixed("100"), number(1);
    /// Empty or `transport:[nexthop[:port]]`, recorded in each queue file.
    content_filter: String = Fixed(""), content_filter;
    /// Empty or a subset of the four Postfix options, recorded in each queue file.
    receive_override_options: String = Fixed(""), override_options;
    /// Our name in the Received: header (a valid host name).
    myhostname: String = Hostname, hostname;
    /// Our software name in the Received: header.
    mail_name: String = Fixed("qmqpd"), text;
    /// The user qmqpd runs as when started as root (non-empty).
    mail_owner: String = Fixed("qmqpd"), non_empty;
    /// Canonical lowercase syslog facility name without `LOG_` (e.g. `mail`, `local3`).
    syslog_facility: String = Fixed("mail"), syslog_facility;
    /// Tag prefix: `syslog_name/qmqpd`, or `qmqpd` when empty.
    syslog_name: String = Fixed(""), text;
    /// Log to this file instead of syslog when non-empty.
    maillog_file: String = Fixed(""), text;
}

impl Params {
    /// The request size limit, or `None` when `message_size_limit` is 0 (no limit, as Postfix).
    pub(crate) fn size_limit(&self) -> Option<u64> {
        match self.message_size_limit {
            0 => None,
            limit => Some(limit),
        }
    }
}

/// The table row of a known parameter.
pub(crate) fn row(name: &str) -> Option<&'static Row> {
    TABLE.iter().find(|row| row.name == name)
}

/// A typed built-in default. The fixed defaults are valid (a unit test parses each one); a
/// host name that fails validation leaves `myhostname` empty here, and `load` reports it.
fn builtin<T: Default>(default: Builtin, parse: impl Fn(&str) -> Result<T, super::Reason>) -> T {
    match default {
        Fixed(text) => parse(text).unwrap_or_default(),
        Hostname => parse(&default_hostname()).unwrap_or_default(),
    }
}

/// The host's name as Postfix would default `myhostname`: gethostname(), plus
/// `.localdomain` when it has no dot. No DNS.
pub(crate) fn default_hostname() -> String {
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
