//! The qmqpd process: arguments -> configuration -> logging -> privileges -> connection(s)
//! -> exit status. Nothing but the protocol reply is ever written to the client; nothing is
//! printed to stderr unless stderr is known not to be the client connection.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::{CString, OsString};
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::{Context, anyhow, bail};
use nix::unistd::{Uid, User};

use qmqpd::agent::{self, Thresholds};
use qmqpd::config::{self, Config, Source};
use qmqpd::listen::{self, Incoming, Listener, Passed};
use qmqpd::logging::{self, LogSetup};
use qmqpd::peer::LaunchEnv;
use qmqpd::queue::STALE_TMP_AGE;
use qmqpd::reply::{Rejection, Reply};
use qmqpd::server::{self, Connection, Limits, Service, StopSignal};
use qmqpd::session::Outcome;

/// Exit status: the transaction ended normally (K, D, or the client went away).
const EXIT_OK: i32 = 0;
/// Exit status: the client got Z because of a local problem.
const EXIT_TEMPFAIL: i32 = 75;
/// Exit status: configuration error.
const EXIT_CONFIG: i32 = 78;

const USAGE: &str =
    "usage: qmqpd [-c config_dir] [-o name=value]... [-v]... [--listen addr:port]... | -n | -d";

fn main() {
    std::process::exit(run());
}

/// What the command line asks for.
#[derive(Default)]
struct Args {
    config_dir: Option<PathBuf>,
    overrides: Vec<String>,
    verbose: u32,
    listen: Vec<String>,
    print_explicit: bool,
    print_defaults: bool,
    help: bool,
}

fn parse_args(mut argv: impl Iterator<Item = OsString>) -> anyhow::Result<Args> {
    let mut args = Args::default();
    let value = |argv: &mut dyn Iterator<Item = OsString>, flag: &str| {
        argv.next()
            .and_then(|v| v.into_string().ok())
            .ok_or_else(|| anyhow!("option {flag} needs a value"))
    };
    while let Some(arg) = argv.next() {
        let arg = arg
            .into_string()
            .map_err(|a| anyhow!("argument is not UTF-8: {a:?}"))?;
        match arg.as_str() {
            "-c" => args.config_dir = Some(PathBuf::from(value(&mut argv, "-c")?)),
            "-o" => args.overrides.push(value(&mut argv, "-o")?),
            "-n" => args.print_explicit = true,
            "-d" => args.print_defaults = true,
            "-h" | "--help" => args.help = true,
            "--listen" => args.listen.push(value(&mut argv, "--listen")?),
            _ if arg.starts_with("--listen=") => {
                args.listen
                    .push(arg.trim_start_matches("--listen=").to_owned());
            }
            _ if arg.len() > 1 && arg.starts_with('-') && arg[1..].bytes().all(|b| b == b'v') => {
                args.verbose += u32::try_from(arg.len() - 1).unwrap_or(u32::MAX);
            }
            _ => bail!("unexpected argument {arg:?}"),
        }
    }
    Ok(args)
}

fn run() -> i32 {
    logging::install_panic_hook();
    // The environment is read here, once, before any thread starts.
    let env = LaunchEnv::from_env();
    let systemd_fds = listen::take_systemd_fds();
    let mail_config = std::env::var_os("MAIL_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);

    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(e) => {
            let waiting = waiting_client(false, systemd_fds.as_deref().unwrap_or(&[]));
            return fail_config(&format!("{e:#}; {USAGE}"), &waiting);
        }
    };
    if args.help {
        println!("{USAGE}");
        return EXIT_OK;
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
                EXIT_CONFIG
            }
        };
    }
    let waiting = waiting_client(
        !args.listen.is_empty(),
        systemd_fds.as_deref().unwrap_or(&[]),
    );
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => return fail_config(&e.to_string(), &waiting),
    };
    if let Err(e) = init_logging(&cfg, args.verbose) {
        // Logging goes nowhere useful; the client still gets its Z.
        return fail_config(&format!("{e:#}"), &waiting);
    }
    for warning in &cfg.warnings {
        log::warn!("{warning}");
    }
    let mode = match systemd_fds.and_then(|fds| listen::choose(&args.listen, fds)) {
        Ok(mode) => mode,
        Err(e) => return fail_logged(&e, &waiting),
    };
    // Bound before giving up root, like the QMQP listeners.
    let agent = match (&mode, cfg.params.qmqpd_agent_check_listen.as_str()) {
        (_, "") => None,
        (Incoming::Listen(_), addr) => match std::net::TcpListener::bind(addr) {
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
    let env = match mode {
        Incoming::Listen(_) => LaunchEnv::default(),
        _ => env,
    };
    let svc = match Service::new(cfg.params, env) {
        Ok(svc) => svc,
        Err(e) => return fail_logged(&e.to_string(), &waiting),
    };
    match (mode, waiting) {
        (Incoming::Listen(listeners), _) => {
            serve_listeners(svc, &listeners, agent, !args.listen.is_empty())
        }
        // The waiting client is the connection on stdin/stdout or the passed socket.
        (_, Waiting::Client(conn)) => serve_once(&svc, conn),
        (_, Waiting::Nobody) => fail_logged(
            "cannot use the client connection (stdin/stdout or the socket systemd passed)",
            &Waiting::Nobody,
        ),
    }
}

/// Serves one connection and maps its outcome to the exit status.
fn serve_once(svc: &Service, conn: Connection) -> i32 {
    let outcome = server::serve_connection(svc, conn);
    remove_stale_tmp(svc);
    exit_status(&outcome)
}

/// The one place that maps a transaction's outcome to an exit status.
fn exit_status(outcome: &Outcome) -> i32 {
    if outcome.local_failure() {
        EXIT_TEMPFAIL
    } else {
        EXIT_OK
    }
}

fn serve_listeners(
    svc: Service,
    listeners: &[Listener],
    agent: Option<std::net::TcpListener>,
    self_bound: bool,
) -> i32 {
    let stop = match StopSignal::install() {
        Ok(stop) => stop,
        Err(e) => {
            return fail_logged(
                &format!("cannot set up signal handling: {e}"),
                &Waiting::Nobody,
            );
        }
    };
    remove_stale_tmp(&svc);
    let params = &svc.params;
    let limits = Limits {
        max_use: (!self_bound).then_some(params.max_use),
        // max_idle = 0 means no idle exit (exiting before the first accept would make systemd
        // start the service again at once).
        max_idle: (!self_bound && !params.max_idle.is_zero()).then_some(params.max_idle),
        process_limit: usize::try_from(params.default_process_limit).unwrap_or(usize::MAX),
    };
    for l in listeners {
        log::info!("listening on {l}");
    }
    if let Some(agent) = agent {
        let limits = Thresholds {
            min_free_bytes: params.qmqpd_agent_check_minfree,
            min_free_inodes: params.qmqpd_agent_check_mininodes,
        };
        let addr = params.qmqpd_agent_check_listen.clone();
        if let Err(e) = agent::spawn(agent, svc.queue.dir().to_path_buf(), limits) {
            return fail_logged(
                &format!("cannot start the agent check on {addr}: {e}"),
                &Waiting::Nobody,
            );
        }
        log::info!("answering HAProxy agent checks on {addr}");
    }
    match server::run_listeners(Arc::new(svc), listeners, limits, &stop) {
        Ok(served) => {
            log::info!("served {served} connections: exiting");
            EXIT_OK
        }
        Err(e) => {
            log::error!("accept loop failed: {e}");
            EXIT_TEMPFAIL
        }
    }
}

fn remove_stale_tmp(svc: &Service) {
    match svc.queue.remove_stale_tmp(STALE_TMP_AGE, SystemTime::now()) {
        Ok(0) => {}
        Ok(n) => log::info!(
            "removed {n} stale files from {}/tmp",
            svc.queue.dir().display()
        ),
        Err(e) => log::debug!("cannot scan {}/tmp: {e}", svc.queue.dir().display()),
    }
}

fn init_logging(cfg: &Config, verbose: u32) -> anyhow::Result<()> {
    let level = match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    logging::init(&LogSetup {
        program: "qmqpd",
        syslog_facility: cfg.params.syslog_facility.clone(),
        syslog_name: cfg.params.syslog_name.clone(),
        maillog_file: cfg.params.maillog_file.clone(),
        level,
        stderr_ok: stderr_ok(),
    })
}

/// Stderr may carry messages only when it is not the client connection (or is a terminal).
fn stderr_ok() -> bool {
    io::stderr().is_terminal() || !logging::stderr_is_connection(None)
}

/// Started as root: become `mail_owner` (with its groups) before reading the client.
fn switch_user(name: &str) -> anyhow::Result<()> {
    if !Uid::effective().is_root() {
        return Ok(());
    }
    let user = User::from_name(name)
        .with_context(|| format!("cannot look up mail_owner {name:?}"))?
        .ok_or_else(|| anyhow!("mail_owner {name:?}: no such user"))?;
    if user.uid.is_root() {
        log::warn!("mail_owner {name:?} is root: qmqpd keeps running with all privileges");
        return Ok(());
    }
    let cname = CString::new(name).context("mail_owner holds a NUL byte")?;
    nix::unistd::initgroups(&cname, user.gid)
        .with_context(|| format!("cannot set the groups of {name:?}"))?;
    nix::unistd::setgid(user.gid).with_context(|| format!("cannot set group id {}", user.gid))?;
    nix::unistd::setuid(user.uid).with_context(|| format!("cannot set user id {}", user.uid))?;
    Ok(())
}

/// Who waits for a reply when qmqpd must give up before serving: the client on
/// stdin/stdout, a connected socket passed by systemd, or nobody (listener modes).
enum Waiting {
    Client(Connection),
    Nobody,
}

fn waiting_client(listen: bool, systemd_fds: &[Passed]) -> Waiting {
    let conn = match systemd_fds {
        _ if listen => return Waiting::Nobody,
        [] => Connection::stdio(),
        [Passed::Tcp(fd) | Passed::Unix(fd)]
            if matches!(listen::is_listening(fd.as_fd()), Ok(false)) =>
        {
            fd.try_clone().and_then(Connection::socket)
        }
        _ => return Waiting::Nobody,
    };
    conn.map_or(Waiting::Nobody, Waiting::Client)
}

/// A configuration error before logging is set up: tell whoever can hear it, give a waiting
/// client its Z, exit 78.
fn fail_config(msg: &str, waiting: &Waiting) -> i32 {
    let defaults = config::Params::default();
    let setup = LogSetup {
        program: "qmqpd",
        syslog_facility: defaults.syslog_facility,
        syslog_name: defaults.syslog_name,
        maillog_file: String::new(),
        level: log::LevelFilter::Info,
        stderr_ok: stderr_ok(),
    };
    if logging::init(&setup).is_err() || io::stderr().is_terminal() {
        eprintln!("qmqpd: fatal: {msg}");
    }
    fail_logged(msg, waiting)
}

/// A configuration error with logging set up (or unavailable): log, reply Z, exit 78.
fn fail_logged(msg: &str, waiting: &Waiting) -> i32 {
    log::error!("fatal: {msg}");
    if let Waiting::Client(conn) = waiting {
        server::refuse(conn, &Reply::Rejected(Rejection::Internal));
    }
    EXIT_CONFIG
}

fn print_with(f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> i32 {
    let mut out = io::stdout().lock();
    match f(&mut out).and_then(|()| out.flush()) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            eprintln!("qmqpd: cannot write: {e}");
            EXIT_TEMPFAIL
        }
    }
}
