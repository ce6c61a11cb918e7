//! The qmqpd process: arguments -> configuration -> logging -> privileges -> connection(s)
//! -> exit status. Nothing but the protocol reply is ever written to the client; nothing is
//! printed to stderr unless stderr is known not to be the client connection.
//!
//! On Linux with glibc the process starts in `entry`, which stands in for Rust's own
//! start-up (see there why): the one module of this program with `unsafe` in it. Elsewhere
//! `main` below is the usual Rust entry point.
#![deny(unsafe_code)]
#![cfg_attr(all(target_os = "linux", target_env = "gnu"), no_main)]
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ffi::OsString;
use std::io::{self, IsTerminal, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use nix::unistd::{Gid, Uid};

use qmqpd::agent::{self, Thresholds};
use qmqpd::config::{self, Config, Source};
use qmqpd::listen::{self, Incoming, Listener};
use qmqpd::logging::{self, LogSetup};
use qmqpd::peer::LaunchEnv;
use qmqpd::program::{self, EX_CONFIG, EX_OK, EX_TEMPFAIL, Stop};
use qmqpd::queue::STALE_TMP_AGE;
use qmqpd::reply::{Rejection, Reply};
use qmqpd::server::{self, Connection, Limits, Service};
use qmqpd::session::Outcome;

const USAGE: &str =
    "usage: qmqpd [-c config_dir] [-o name=value]... [-v]... [--listen addr:port]... | -n | -d";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod entry;

/// The entry point where `entry` cannot stand in for Rust's start-up: there the standard
/// library reads the command line only when it starts the program itself.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(run())
}

/// What the command line asks for.
#[derive(Debug, Default, PartialEq, Eq)]
struct Args {
    config_dir: Option<PathBuf>,
    overrides: Vec<String>,
    verbose: u32,
    listen: Vec<String>,
    print_explicit: bool,
    print_defaults: bool,
    help: bool,
}

fn parse_args(argv: impl IntoIterator<Item = OsString>) -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut args = Args::default();
    let mut parser = lexopt::Parser::from_args(argv);
    while let Some(arg) = parser.next()? {
        match arg {
            Short('c') => args.config_dir = Some(PathBuf::from(parser.value()?)),
            Short('o') => args.overrides.push(parser.value()?.string()?),
            Short('n') => args.print_explicit = true,
            Short('d') => args.print_defaults = true,
            Short('h') | Long("help") => args.help = true,
            Short('v') => args.verbose = args.verbose.saturating_add(1),
            Long("listen") => args.listen.push(parser.value()?.string()?),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(args)
}

fn run() -> u8 {
    logging::install_panic_hook();
    // The environment is read here, once, before any thread starts.
    let env = LaunchEnv::from_env();
    let systemd_fds = listen::take_systemd_fds();
    let mail_config = std::env::var_os("MAIL_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);

    let parsed = parse_args(std::env::args_os().skip(1));
    let listen_args = parsed
        .as_ref()
        .map(|a| a.listen.clone())
        .unwrap_or_default();
    // Where the connections come from is decided here, once; a failure is reported once
    // logging is set up.
    let incoming = systemd_fds.and_then(|fds| listen::classify(listen_args, fds));
    let waiting = waiting_client(&incoming);
    let listener = incoming.as_ref().is_ok_and(Incoming::is_listener);
    let connection = match &incoming {
        Ok(Incoming::Passed(fd)) => Some(fd.as_fd()),
        _ => None,
    };
    let stderr_ok = stderr_ok(listener, connection);
    let args = match parsed {
        Ok(args) => args,
        Err(e) => return fail_config(&format!("{e}; {USAGE}"), stderr_ok, &waiting),
    };
    if args.help {
        println!("{USAGE}");
        return EX_OK;
    }
    if args.print_defaults {
        return print_with(|out| config::write_defaults(out));
    }
    let source = Source {
        dir: args.config_dir.clone(),
        mail_config,
        overrides: args.overrides.clone(),
    };
    let loaded = config::load(&source);
    if args.print_explicit {
        return match loaded {
            Ok(cfg) => print_with(|out| cfg.write_explicit(out)),
            Err(e) => {
                eprintln!("qmqpd: fatal: {e}");
                EX_CONFIG
            }
        };
    }
    let stop = if listener {
        Stop::install(|sig| log::info!("{sig}: stopping: no new connections"))
    } else {
        Stop::watch()
    };
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => return fail_config(&e.to_string(), stderr_ok, &waiting),
    };
    if let Err(e) = init_logging(&cfg, args.verbose, stderr_ok) {
        // Logging goes nowhere useful; the client still gets its Z.
        return fail_config(&format!("{e:#}"), stderr_ok, &waiting);
    }
    for warning in &cfg.warnings {
        log::warn!("{warning}");
    }
    let incoming = match incoming {
        Ok(incoming) => incoming,
        Err(e) => return fail_logged(&e, &waiting),
    };
    // Sockets are bound before giving up root (QMQP's port 628 is privileged).
    let self_bound = matches!(incoming, Incoming::Addresses(_));
    let bound = incoming.bind();
    let agent = match (&bound, cfg.params.qmqpd_agent_check_listen.as_str()) {
        (_, "") => None,
        // The value is a numeric address:port (checked with the configuration): parsed here,
        // so that binding never goes through getaddrinfo (NSS; the binary is static).
        (Some(Ok(_)), addr) => match addr
            .parse::<std::net::SocketAddr>()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
            .and_then(std::net::TcpListener::bind)
        {
            Ok(l) => Some(l),
            Err(e) => {
                return fail_logged(
                    &format!("cannot listen on {addr} (qmqpd_agent_check_listen): {e}"),
                    &waiting,
                );
            }
        },
        (_, _) => {
            log::debug!("qmqpd_agent_check_listen is ignored when serving one connection");
            None
        }
    };
    if let Err(e) = switch_user(&cfg.params.mail_owner) {
        return fail_logged(&format!("{e:#}"), &waiting);
    }
    // The launcher's variables describe the one connection it handed over; a listener's
    // clients are known only from their sockets.
    let env = if listener { LaunchEnv::default() } else { env };
    let mut svc = match Service::new(cfg.params, env) {
        Ok(svc) => svc,
        Err(e) => return fail_logged(&e.to_string(), &waiting),
    };
    let stop = match stop {
        Ok(stop) => stop,
        Err(e) => {
            return fail_logged(&format!("cannot set up signal handling: {e}"), &waiting);
        }
    };
    match (bound, waiting) {
        (Some(Ok(listeners)), _) => serve_listeners(svc, listeners, agent, self_bound, &stop),
        (Some(Err(e)), waiting) => fail_logged(&e, &waiting),
        // The waiting client is the connection on stdin/stdout or the passed socket.
        (None, Waiting::Client(conn)) => {
            svc.cut_off_by(Arc::clone(&stop));
            serve_once(&svc, conn, &stop)
        }
        (None, Waiting::Nobody) => fail_logged(
            "cannot use the client connection (stdin/stdout or the socket systemd passed)",
            &Waiting::Nobody,
        ),
    }
}

/// Serves one connection and maps its outcome to the exit status.
/// A stop signal that came meanwhile cut the request off (the session logged what and
/// removed its queue file); the process then ends by that signal, as it would have.
fn serve_once(svc: &Service, conn: Connection, stop: &Stop) -> u8 {
    let outcome = server::serve_connection(svc, conn);
    if let Some(sig) = stop.signal() {
        program::die_by(sig);
    }
    exit_status(&outcome)
}

/// The one place that maps a transaction's outcome to an exit status.
fn exit_status(outcome: &Outcome) -> u8 {
    if outcome.local_failure() {
        EX_TEMPFAIL
    } else {
        EX_OK
    }
}

fn serve_listeners(
    mut svc: Service,
    listeners: Vec<Listener>,
    agent: Option<std::net::TcpListener>,
    self_bound: bool,
    stop: &Arc<Stop>,
) -> u8 {
    remove_stale_tmp(&svc);
    match Stop::new() {
        Ok(cut_off) => svc.cut_off_by(cut_off),
        Err(e) => log::warn!("cannot set up cutting off transactions at stop: {e}"),
    }
    let params = svc.params();
    let limits = Limits {
        max_use: (!self_bound).then_some(params.max_use),
        // max_idle = 0 means no idle exit (exiting before the first accept would make systemd
        // start the service again at once).
        max_idle: (!self_bound && !params.max_idle.is_zero()).then_some(params.max_idle),
        process_limit: usize::try_from(params.default_process_limit).unwrap_or(usize::MAX),
    };
    for l in &listeners {
        log::info!("listening on {l}");
    }
    if let Some(agent) = agent {
        let thresholds = Thresholds {
            min_free_bytes: params.qmqpd_agent_check_minfree,
            min_free_inodes: params.qmqpd_agent_check_mininodes,
        };
        let addr = params.qmqpd_agent_check_listen.clone();
        let dir = svc.queue().dir().to_path_buf();
        if let Err(e) = agent::spawn(agent, dir, thresholds, Arc::clone(stop)) {
            return fail_logged(
                &format!("cannot start the agent check on {addr}: {e}"),
                &Waiting::Nobody,
            );
        }
        log::info!("answering HAProxy agent checks on {addr}");
    }
    match server::run_listeners(Arc::new(svc), listeners, limits, stop) {
        Ok(served) => {
            log::info!("served {served} connections: exiting");
            EX_OK
        }
        Err(e) => {
            log::error!("accept loop failed: {e}");
            EX_TEMPFAIL
        }
    }
}

/// Removes stale files from `tmp/`: a listener does at start (never per message; a one-shot
/// leaves it to the listener and to `qmqp-queue deliver`).
fn remove_stale_tmp(svc: &Service) {
    match svc
        .queue()
        .remove_stale_tmp(STALE_TMP_AGE, SystemTime::now())
    {
        Ok(0) => {}
        Ok(n) => log::info!(
            "removed {n} stale files from {}/tmp",
            svc.queue().dir().display()
        ),
        Err(e) => log::debug!("cannot scan {}/tmp: {e}", svc.queue().dir().display()),
    }
}

fn init_logging(cfg: &Config, verbose: u32, stderr_ok: bool) -> anyhow::Result<()> {
    let level = program::log_level(verbose);
    logging::init(&LogSetup {
        program: "qmqpd",
        syslog_facility: cfg.params.syslog_facility.clone(),
        syslog_name: cfg.params.syslog_name.clone(),
        maillog_file: cfg.params.maillog_file.clone(),
        level,
        stderr_ok,
    })
}

/// Stderr may carry messages only when it is not the client connection (or is a terminal).
/// The connection is stdin/stdout, or `connection`, the socket systemd passed (Accept=yes:
/// a unit may make it stderr too, `StandardError=socket`).
/// A listener has no client on a standard descriptor: there stderr is usable unless it is
/// a listening socket itself (inetd `wait` mode may pass the socket as fd 2 too).
fn stderr_ok(listener: bool, connection: Option<BorrowedFd<'_>>) -> bool {
    if io::stderr().is_terminal() {
        return true;
    }
    if listener {
        let stderr = io::stderr();
        return nix::sys::stat::fstat(stderr.as_fd()).is_ok()
            && !matches!(listen::is_listening(stderr.as_fd()), Ok(true));
    }
    !logging::stderr_is_connection(connection)
}

/// Started as root: become `mail_owner` (with its groups) before reading the client. The
/// account comes from /etc/passwd and /etc/group, never from NSS (see `qmqpd::users`).
fn switch_user(name: &str) -> anyhow::Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let user = qmqpd::users::find_account(name)
        .with_context(|| format!("cannot look up mail_owner {name:?}"))?
        .ok_or_else(|| anyhow!("mail_owner {name:?}: no such user in /etc/passwd"))?;
    if user.uid == 0 {
        log::warn!("mail_owner {name:?} is root: qmqpd keeps running with all privileges");
        return Ok(());
    }
    let groups: Vec<Gid> = user.groups.iter().copied().map(Gid::from_raw).collect();
    nix::unistd::setgroups(&groups)
        .with_context(|| format!("cannot set the groups of {name:?}"))?;
    let (uid, gid) = (Uid::from_raw(user.uid), Gid::from_raw(user.gid));
    nix::unistd::setgid(gid).with_context(|| format!("cannot set group id {gid}"))?;
    nix::unistd::setuid(uid).with_context(|| format!("cannot set user id {uid}"))?;
    Ok(())
}

/// Who waits for a reply when qmqpd must give up before serving: the client on
/// stdin/stdout, a connected socket passed by systemd, or nobody (listener modes).
enum Waiting {
    Client(Connection),
    Nobody,
}

/// The client on stdin/stdout or the connected socket systemd passed; nobody in the
/// listener modes, or when the source could not be decided.
fn waiting_client(incoming: &Result<Incoming, String>) -> Waiting {
    let conn = match incoming {
        Ok(Incoming::Stdio { socket }) => Connection::stdio(*socket),
        Ok(Incoming::Passed(fd)) => fd.try_clone().and_then(Connection::socket),
        Ok(Incoming::Listen(_) | Incoming::Addresses(_)) | Err(_) => return Waiting::Nobody,
    };
    conn.map_or(Waiting::Nobody, Waiting::Client)
}

/// A configuration error before logging is set up: tell whoever can hear it, give a waiting
/// client its Z, exit 78.
fn fail_config(msg: &str, stderr_ok: bool, waiting: &Waiting) -> u8 {
    let defaults = config::Params::default();
    let setup = LogSetup {
        program: "qmqpd",
        syslog_facility: defaults.syslog_facility,
        syslog_name: defaults.syslog_name,
        maillog_file: String::new(),
        level: log::LevelFilter::Info,
        stderr_ok,
    };
    if logging::init(&setup).is_err() || io::stderr().is_terminal() {
        eprintln!("qmqpd: fatal: {msg}");
    }
    fail_logged(msg, waiting)
}

/// A configuration error with logging set up (or unavailable): log, reply Z, exit 78.
fn fail_logged(msg: &str, waiting: &Waiting) -> u8 {
    log::error!("fatal: {msg}");
    if let Waiting::Client(conn) = waiting {
        server::refuse(conn, &Reply::Rejected(Rejection::Internal));
    }
    EX_CONFIG
}

fn print_with(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> u8 {
    let mut out = io::stdout().lock();
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => EX_OK,
        Err(e) => {
            eprintln!("qmqpd: cannot write: {e}");
            EX_TEMPFAIL
        }
    }
}
