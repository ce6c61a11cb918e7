//! qmqp-queue: list, show and deliver the messages in qmqpd's queue.
//!
//! `qmqp-queue [-c DIR] [-o name=value]... [-v]... list [--json] | show ID | deliver ...`.
//! This file is the command-line shell: arguments, configuration (found as qmqpd finds it),
//! logging, signals and the exit status. The listings are `qmqpd::queue::listing`'s;
//! claiming and delivering messages is `qmqpd::deliver`'s job.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};

use qmqpd::config::{self, Source};
use qmqpd::deliver::{Deliverer, Options, Target};
use qmqpd::logging::{self, LogSetup};
use qmqpd::queue::QueueError;
use qmqpd::queue::listing::{self, Listed};

const USAGE: &str = "usage: qmqp-queue [-c config_dir] [-o name=value]... [-v]... command
commands:
  list [--json]
  show QUEUE_ID
  deliver (--exec COMMAND | --relay HOST[:PORT]) [--once] [--flush] [--interval TIME]
          [--stale-time TIME] [--timeout TIME] [--min-backoff TIME] [--max-backoff TIME]";

/// Exit status: success.
const EXIT_OK: u8 = 0;
/// Exit status: bad command line (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;
/// Exit status: `show` found no such message (EX_NOINPUT).
const EXIT_NO_MESSAGE: u8 = 66;
/// Exit status: the queue or a queue file could not be read, or output failed (EX_IOERR).
const EXIT_IOERR: u8 = 74;
/// Exit status: `deliver` stopped on a queue-level failure (EX_TEMPFAIL).
const EXIT_TEMPFAIL: u8 = 75;
/// Exit status: configuration error (EX_CONFIG).
const EXIT_CONFIG: u8 = 78;

/// Default `--interval`: how often `deliver` without `--once` looks into `new/`.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// How often a watching deliverer looks for stale claims again.
const STALE_CHECK_EVERY: Duration = Duration::from_secs(60);

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    config_dir: Option<PathBuf>,
    overrides: Vec<String>,
    verbose: u32,
    command: Cmd,
}

/// The subcommand and its options.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    Help,
    List { json: bool },
    Show { id: String },
    Deliver(DeliverArgs),
}

/// `deliver`'s options.
#[derive(Debug, PartialEq, Eq)]
struct DeliverArgs {
    target: Target,
    once: bool,
    flush: bool,
    interval: Duration,
    stale_time: Option<Duration>,
    timeout: Option<Duration>,
    min_backoff: Option<Duration>,
    max_backoff: Option<Duration>,
}

/// The arguments as UTF-8 strings (every option and value qmqp-queue takes is text).
fn utf8_args<I: IntoIterator<Item = OsString>>(argv: I) -> Result<Vec<String>, String> {
    argv.into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|a| format!("argument is not UTF-8: {a:?}"))
        })
        .collect()
}

/// Splits `--name=value` into its parts; `--name` alone gives no value.
fn split_long(arg: &str) -> (&str, Option<&str>) {
    match arg.split_once('=') {
        Some((name, value)) if name.starts_with("--") => (name, Some(value)),
        _ => (arg, None),
    }
}

/// Parses the arguments after the program name.
fn parse_args(argv: Vec<String>) -> Result<Args, String> {
    let mut argv = argv.into_iter();
    let mut config_dir = None;
    let mut overrides = Vec::new();
    let mut verbose = 0u32;
    let command = loop {
        let Some(arg) = argv.next() else {
            return Err("missing command".into());
        };
        match arg.as_str() {
            "-c" => config_dir = Some(PathBuf::from(value_of(&mut argv, "-c")?)),
            "-o" => overrides.push(value_of(&mut argv, "-o")?),
            "-h" | "--help" | "help" => break Cmd::Help,
            _ if arg.len() > 1
                && arg.starts_with('-')
                && arg.bytes().skip(1).all(|b| b == b'v') =>
            {
                let steps = u32::try_from(arg.len() - 1).unwrap_or(u32::MAX);
                verbose = verbose.saturating_add(steps);
            }
            "list" => break parse_list(argv.by_ref())?,
            "show" => break parse_show(argv.by_ref())?,
            "deliver" => break Cmd::Deliver(parse_deliver(argv.by_ref())?),
            _ => {
                return Err(format!(
                    "unknown command or option \"{}\"",
                    arg.escape_debug()
                ));
            }
        }
    };
    if let Some(extra) = argv.next() {
        return Err(format!("unexpected argument \"{}\"", extra.escape_debug()));
    }
    Ok(Args {
        config_dir,
        overrides,
        verbose,
        command,
    })
}

/// The value after an option that takes one.
fn value_of(argv: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    argv.next()
        .ok_or_else(|| format!("option {flag} needs a value"))
}

fn parse_list(argv: &mut impl Iterator<Item = String>) -> Result<Cmd, String> {
    let mut json = false;
    for arg in argv {
        match arg.as_str() {
            "--json" | "-j" => json = true,
            _ => {
                return Err(format!(
                    "list: unexpected argument \"{}\"",
                    arg.escape_debug()
                ));
            }
        }
    }
    Ok(Cmd::List { json })
}

fn parse_show(argv: &mut impl Iterator<Item = String>) -> Result<Cmd, String> {
    let id = argv.next().ok_or("show: missing QUEUE_ID")?;
    Ok(Cmd::Show { id })
}

/// A time option's value (Postfix syntax: a number and an optional s/m/h/d/w suffix).
fn parse_time_option(flag: &str, value: &str, zero_ok: bool) -> Result<Duration, String> {
    let t = config::parse_time(value).map_err(|e| format!("{flag}: {e}"))?;
    if t.is_zero() && !zero_ok {
        return Err(format!("{flag}: must be more than 0: \"{value}\""));
    }
    Ok(t)
}

fn parse_deliver(argv: &mut impl Iterator<Item = String>) -> Result<DeliverArgs, String> {
    let mut target = None;
    let mut args = DeliverArgs {
        target: Target::Exec(String::new()),
        once: false,
        flush: false,
        interval: DEFAULT_INTERVAL,
        stale_time: None,
        timeout: None,
        min_backoff: None,
        max_backoff: None,
    };
    while let Some(arg) = argv.next() {
        let (name, attached) = split_long(&arg);
        let mut value = || match attached {
            Some(v) => Ok(v.to_string()),
            None => value_of(argv, name),
        };
        match name {
            "--exec" => {
                let command = value()?;
                if command.trim().is_empty() {
                    return Err("--exec: empty command".into());
                }
                if target.replace(Target::Exec(command)).is_some() {
                    return Err("deliver: give one --exec or --relay".into());
                }
            }
            "--relay" => {
                let server = value()?;
                qmqpd::client::parse_server(&server).map_err(|e| format!("--relay: {e}"))?;
                if target.replace(Target::Relay(server)).is_some() {
                    return Err("deliver: give one --exec or --relay".into());
                }
            }
            "--once" if attached.is_none() => args.once = true,
            "--flush" if attached.is_none() => args.flush = true,
            "--interval" => args.interval = parse_time_option(name, &value()?, false)?,
            "--stale-time" => args.stale_time = Some(parse_time_option(name, &value()?, true)?),
            "--timeout" => args.timeout = Some(parse_time_option(name, &value()?, false)?),
            "--min-backoff" => args.min_backoff = Some(parse_time_option(name, &value()?, true)?),
            "--max-backoff" => args.max_backoff = Some(parse_time_option(name, &value()?, true)?),
            _ => {
                return Err(format!(
                    "deliver: unknown option \"{}\"",
                    arg.escape_debug()
                ));
            }
        }
    }
    args.target = target.ok_or("deliver: --exec COMMAND or --relay HOST:PORT is required")?;
    Ok(args)
}

impl DeliverArgs {
    /// The library's options: defaults for the target, then what the command line set.
    fn options(&self) -> Options {
        let mut opts = Options::new(self.target.clone());
        opts.flush = self.flush;
        if let Some(t) = self.timeout {
            opts.timeout = t;
        }
        if let Some(t) = self.stale_time {
            opts.stale_time = t;
        }
        if let Some(t) = self.min_backoff {
            opts.min_backoff = t;
        }
        if let Some(t) = self.max_backoff {
            opts.max_backoff = t;
        }
        opts
    }
}

fn main() -> ExitCode {
    logging::install_panic_hook();
    ExitCode::from(run())
}

fn run() -> u8 {
    // The environment is read here, once.
    let mail_config = std::env::var_os("MAIL_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    let args = match utf8_args(std::env::args_os().skip(1)).and_then(parse_args) {
        Ok(args) => args,
        Err(why) => {
            let _ = writeln!(io::stderr(), "qmqp-queue: {why}\n{USAGE}");
            return EXIT_USAGE;
        }
    };
    if args.command == Cmd::Help {
        let _ = writeln!(io::stdout(), "{USAGE}");
        return EXIT_OK;
    }
    let source = Source {
        dir: args.config_dir.clone(),
        mail_config,
        overrides: args.overrides.clone(),
    };
    let cfg = match config::load(&source) {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = writeln!(io::stderr(), "qmqp-queue: fatal: {e}");
            return EXIT_CONFIG;
        }
    };
    let queue_dir = cfg.params.queue_directory.clone();
    match &args.command {
        Cmd::Help => EXIT_OK,
        Cmd::List { json } => {
            warn_on_stderr(&cfg.warnings);
            listed_status(listing::list(
                &queue_dir,
                *json,
                io::stdout().lock(),
                &mut io::stderr(),
            ))
        }
        Cmd::Show { id } => {
            warn_on_stderr(&cfg.warnings);
            listed_status(listing::show(
                &queue_dir,
                id,
                io::stdout().lock(),
                &mut io::stderr(),
            ))
        }
        Cmd::Deliver(d) => {
            let setup = LogSetup {
                program: "qmqp-queue",
                syslog_facility: cfg.params.syslog_facility.clone(),
                syslog_name: cfg.params.syslog_name.clone(),
                maillog_file: cfg.params.maillog_file.clone(),
                level: match args.verbose {
                    0 => log::LevelFilter::Info,
                    1 => log::LevelFilter::Debug,
                    _ => log::LevelFilter::Trace,
                },
                // qmqp-queue never talks to a client: stderr is the operator's.
                stderr_ok: true,
            };
            if let Err(e) = logging::init(&setup) {
                let _ = writeln!(io::stderr(), "qmqp-queue: fatal: {e:#}");
                return EXIT_CONFIG;
            }
            for warning in &cfg.warnings {
                log::warn!("{warning}");
            }
            deliver(&queue_dir, d)
        }
    }
}

fn warn_on_stderr(warnings: &[String]) {
    for warning in warnings {
        let _ = writeln!(io::stderr(), "qmqp-queue: warning: {warning}");
    }
}

/// The exit status for how a `list` or `show` ended.
fn listed_status(end: Listed) -> u8 {
    match end {
        Listed::Done => EXIT_OK,
        Listed::NoSuchMessage => EXIT_NO_MESSAGE,
        Listed::Unreadable => EXIT_IOERR,
        Listed::KeepsMoving => EXIT_TEMPFAIL,
    }
}

/// Set by SIGTERM or SIGINT; wakes a sleeping deliverer.
struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

impl Stop {
    /// Blocks SIGTERM and SIGINT in this thread (and every thread started later; commands
    /// start with a clean mask) and starts a thread that waits for them. Call before
    /// starting any other thread.
    fn install() -> io::Result<Arc<Stop>> {
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block()?;
        let waiter = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(sig) = set.wait() {
                    log::info!("{sig}: stopping after the current message");
                    waiter.flag.store(true, Ordering::SeqCst);
                    let _guard = waiter.lock.lock().unwrap_or_else(PoisonError::into_inner);
                    waiter.wake.notify_all();
                }
            })?;
        Ok(stop)
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Sleeps for `d`, or until stopped.
    fn sleep(&self, d: Duration) {
        let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        if self.is_set() {
            return;
        }
        // A spurious wake-up only makes the deliverer look at the queue early.
        let _ = self
            .wake
            .wait_timeout(guard, d)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// `deliver`: take back stale claims, then drain `new/` (`--once`) or watch it until
/// signalled.
fn deliver(queue_dir: &Path, args: &DeliverArgs) -> u8 {
    let stop = match Stop::install() {
        Ok(stop) => stop,
        Err(e) => {
            log::error!("fatal: cannot set up signal handling: {e}");
            return EXIT_TEMPFAIL;
        }
    };
    match run_deliver(queue_dir, args, &stop) {
        Ok(()) => EXIT_OK,
        Err(e) => {
            log::error!("fatal: {e}");
            EXIT_TEMPFAIL
        }
    }
}

fn run_deliver(queue_dir: &Path, args: &DeliverArgs, stop: &Stop) -> Result<(), QueueError> {
    let mut deliverer = Deliverer::new(queue_dir, args.options())?;
    let via = match &args.target {
        Target::Exec(command) => format!("exec {}", command),
        Target::Relay(server) => format!("relay {server}"),
    };
    log::info!(
        "delivering from {} via {via}{}",
        queue_dir.display(),
        if args.once { " (once)" } else { "" }
    );
    deliverer.take_back_stale(SystemTime::now())?;
    if args.once {
        let claimed = deliverer.drain(&stop.flag)?;
        log::info!("done: {claimed} messages handled");
        return Ok(());
    }
    let mut stale_checked = Instant::now();
    while !stop.is_set() {
        if stale_checked.elapsed() >= STALE_CHECK_EVERY {
            deliverer.take_back_stale(SystemTime::now())?;
            stale_checked = Instant::now();
        }
        deliverer.deliver_pass(false, &stop.flag)?;
        stop.sleep(args.interval);
    }
    log::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()).collect())
    }

    fn deliver_args(args: &[&str]) -> DeliverArgs {
        match parse(args).unwrap().command {
            Cmd::Deliver(d) => d,
            other => panic!("not deliver: {other:?}"),
        }
    }

    #[test]
    fn parse_args_reads_global_options_and_list() {
        let a = parse(&[
            "-c",
            "/etc/q",
            "-o",
            "queue_directory=/q",
            "-vv",
            "list",
            "--json",
        ])
        .unwrap();
        assert_eq!(a.config_dir, Some(PathBuf::from("/etc/q")));
        assert_eq!(a.overrides, vec!["queue_directory=/q".to_string()]);
        assert_eq!(a.verbose, 2);
        assert_eq!(a.command, Cmd::List { json: true });
    }

    #[test]
    fn parse_args_reads_show() {
        assert_eq!(
            parse(&["show", "ABC"]).unwrap().command,
            Cmd::Show { id: "ABC".into() }
        );
    }

    #[test]
    fn parse_args_reads_deliver_options() {
        let d = deliver_args(&[
            "deliver",
            "--exec",
            "cat",
            "--once",
            "--interval=5",
            "--stale-time",
            "0",
            "--timeout",
            "2m",
            "--flush",
        ]);
        assert_eq!(d.target, Target::Exec("cat".into()));
        assert!(d.once && d.flush);
        assert_eq!(d.interval, Duration::from_secs(5));
        assert_eq!(d.stale_time, Some(Duration::ZERO));
        assert_eq!(d.timeout, Some(Duration::from_secs(120)));
        let d = deliver_args(&["deliver", "--relay", "127.0.0.1:6280"]);
        assert_eq!(d.target, Target::Relay("127.0.0.1:6280".into()));
        assert_eq!(d.interval, DEFAULT_INTERVAL);
        assert_eq!(d.options().timeout, qmqpd::deliver::DEFAULT_RELAY_TIMEOUT);
    }

    #[test]
    fn parse_args_rejects_usage_errors() {
        for bad in [
            &[][..],
            &["frob"],
            &["list", "x"],
            &["show"],
            &["show", "A", "B"],
            &["deliver"],
            &["deliver", "--once"],
            &["deliver", "--exec", "a", "--relay", "h:1"],
            &["deliver", "--exec", " "],
            &["deliver", "--relay", "h:0"],
            &["deliver", "--exec", "a", "--interval", "0"],
            &["deliver", "--exec", "a", "--timeout", "1x"],
            &["deliver", "--exec", "a", "--once=yes"],
            &["-c"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
