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
use std::time::{Duration, Instant, SystemTime};

use qmqpd::config::{self, Source};
use qmqpd::deliver::{Deliverer, Options, Target};
use qmqpd::logging::{self, LogSetup};
use qmqpd::program::{self, EX_CONFIG, EX_IOERR, EX_NOINPUT, EX_OK, EX_TEMPFAIL, EX_USAGE, Stop};
use qmqpd::queue::QueueError;
use qmqpd::queue::listing::{self, Listed};

const USAGE: &str = "usage: qmqp-queue [-c config_dir] [-o name=value]... [-v]... command
commands:
  list [--json]
  show QUEUE_ID
  deliver (--exec COMMAND | --relay HOST[:PORT]) [--once] [--flush] [--interval TIME]
          [--stale-time TIME] [--timeout TIME] [--min-backoff TIME] [--max-backoff TIME]";

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

/// Parses the arguments after the program name: global options, the command, its
/// options. Every option and value qmqp-queue takes is text.
fn parse_args<I: IntoIterator<Item = OsString>>(argv: I) -> Result<Args, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(argv);
    let mut config_dir = None;
    let mut overrides = Vec::new();
    let mut verbose = 0u32;
    let command = loop {
        let Some(arg) = parser.next().map_err(usage)? else {
            return Err("missing command".into());
        };
        match arg {
            Short('c') => config_dir = Some(PathBuf::from(parser.value().map_err(usage)?)),
            Short('o') => overrides.push(text(parser.value().map_err(usage)?)?),
            Short('v') => verbose = verbose.saturating_add(1),
            Short('h') | Long("help") => break Cmd::Help,
            Value(command) => match text(command)?.as_str() {
                "help" => break Cmd::Help,
                "list" => break parse_list(&mut parser)?,
                "show" => break parse_show(&mut parser)?,
                "deliver" => break Cmd::Deliver(parse_deliver(&mut parser)?),
                other => {
                    return Err(format!(
                        "unknown command or option \"{}\"",
                        other.escape_debug()
                    ));
                }
            },
            _ => return Err(usage(arg.unexpected())),
        }
    };
    if let Some(extra) = parser.next().map_err(usage)? {
        return Err(usage(extra.unexpected()));
    }
    Ok(Args {
        config_dir,
        overrides,
        verbose,
        command,
    })
}

/// A command-line error's text.
fn usage(e: lexopt::Error) -> String {
    e.to_string()
}

/// An argument as UTF-8 text.
fn text(arg: OsString) -> Result<String, String> {
    arg.into_string()
        .map_err(|a| format!("argument is not UTF-8: {a:?}"))
}

fn parse_list(parser: &mut lexopt::Parser) -> Result<Cmd, String> {
    use lexopt::prelude::*;
    let mut json = false;
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Long("json") | Short('j') => json = true,
            _ => return Err(format!("list: {}", arg.unexpected())),
        }
    }
    Ok(Cmd::List { json })
}

fn parse_show(parser: &mut lexopt::Parser) -> Result<Cmd, String> {
    match parser.next().map_err(usage)? {
        Some(lexopt::Arg::Value(id)) => Ok(Cmd::Show { id: text(id)? }),
        Some(arg) => Err(format!("show: {}", arg.unexpected())),
        None => Err("show: missing QUEUE_ID".into()),
    }
}

/// A time option's value (Postfix syntax: a number and an optional s/m/h/d/w suffix).
fn parse_time_option(flag: &str, value: &str, zero_ok: bool) -> Result<Duration, String> {
    let t = config::parse_time(value).map_err(|e| format!("{flag}: {e}"))?;
    if t.is_zero() && !zero_ok {
        return Err(format!("{flag}: must be more than 0: \"{value}\""));
    }
    Ok(t)
}

fn parse_deliver(parser: &mut lexopt::Parser) -> Result<DeliverArgs, String> {
    use lexopt::prelude::*;
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
    while let Some(arg) = parser.next().map_err(usage)? {
        let Long(name) = arg else {
            return Err(format!("deliver: {}", arg.unexpected()));
        };
        let name = name.to_owned();
        let flag = format!("--{name}");
        let mut value = || parser.value().map_err(usage).and_then(text);
        match name.as_str() {
            "exec" => {
                let command = value()?;
                if command.trim().is_empty() {
                    return Err("--exec: empty command".into());
                }
                if target.replace(Target::Exec(command)).is_some() {
                    return Err("deliver: give one --exec or --relay".into());
                }
            }
            "relay" => {
                let server = value()?;
                qmqpd::client::parse_server(&server).map_err(|e| format!("--relay: {e}"))?;
                if target.replace(Target::Relay(server)).is_some() {
                    return Err("deliver: give one --exec or --relay".into());
                }
            }
            "once" => args.once = true,
            "flush" => args.flush = true,
            "interval" => args.interval = parse_time_option(&flag, &value()?, false)?,
            "stale-time" => args.stale_time = Some(parse_time_option(&flag, &value()?, true)?),
            "timeout" => args.timeout = Some(parse_time_option(&flag, &value()?, false)?),
            "min-backoff" => args.min_backoff = Some(parse_time_option(&flag, &value()?, true)?),
            "max-backoff" => args.max_backoff = Some(parse_time_option(&flag, &value()?, true)?),
            _ => {
                return Err(format!(
                    "deliver: unknown option \"{}\"",
                    flag.escape_debug()
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
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(why) => {
            let _ = writeln!(io::stderr(), "qmqp-queue: {why}\n{USAGE}");
            return EX_USAGE;
        }
    };
    if args.command == Cmd::Help {
        let _ = writeln!(io::stdout(), "{USAGE}");
        return EX_OK;
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
            return EX_CONFIG;
        }
    };
    let queue_dir = cfg.params.queue_directory.clone();
    match &args.command {
        Cmd::Help => EX_OK,
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
                level: program::log_level(args.verbose),
                // qmqp-queue never talks to a client: stderr is the operator's.
                stderr_ok: true,
            };
            if let Err(e) = logging::init(&setup) {
                let _ = writeln!(io::stderr(), "qmqp-queue: fatal: {e:#}");
                return EX_CONFIG;
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
        Listed::Done => EX_OK,
        Listed::NoSuchMessage => EX_NOINPUT,
        Listed::Unreadable => EX_IOERR,
        Listed::KeepsMoving => EX_TEMPFAIL,
    }
}

/// `deliver`: take back stale claims, then drain `new/` (`--once`) or watch it until
/// signalled.
fn deliver(queue_dir: &Path, args: &DeliverArgs) -> u8 {
    let stop = match Stop::install(|sig| log::info!("{sig}: stopping after the current message")) {
        Ok(stop) => stop,
        Err(e) => {
            log::error!("fatal: cannot set up signal handling: {e}");
            return EX_TEMPFAIL;
        }
    };
    match run_deliver(queue_dir, args, &stop) {
        Ok(()) => EX_OK,
        Err(e) => {
            log::error!("fatal: {e}");
            EX_TEMPFAIL
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
    deliverer.remove_stale_tmp(SystemTime::now());
    if args.once {
        let claimed = deliverer.drain(stop.flag())?;
        log::info!("done: {claimed} messages handled");
        return Ok(());
    }
    let mut stale_checked = Instant::now();
    while !stop.is_set() {
        if stale_checked.elapsed() >= STALE_CHECK_EVERY {
            deliverer.take_back_stale(SystemTime::now())?;
            deliverer.remove_stale_tmp(SystemTime::now());
            stale_checked = Instant::now();
        }
        deliverer.deliver_pass(false, stop.flag())?;
        stop.sleep(args.interval);
    }
    log::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(OsString::from))
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
