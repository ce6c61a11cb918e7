//! qmqp-queue: list, show and deliver the messages in qmqpd's queue.
//!
//! `qmqp-queue [-c DIR] [-o name=value]... [-v]... list [--json] | show ID | deliver ...`.
//! This file is the command-line shell: arguments, configuration (found as qmqpd finds it),
//! logging, signals, the listing formats and the exit status. Claiming and delivering
//! messages is `qmqpd::deliver`'s job.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{SigSet, Signal};

use qmqpd::config::{self, Source};
use qmqpd::deliver::{Deliverer, Options, Target};
use qmqpd::logging::{self, LogSetup};
use qmqpd::queue::{self, Envelope, Message, QueueError, State};

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
            list(&queue_dir, *json)
        }
        Cmd::Show { id } => {
            warn_on_stderr(&cfg.warnings);
            show(&queue_dir, id)
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

/// Shows bytes from a file for a terminal: UTF-8 kept, control characters and invalid bytes
/// escaped (`\n`, `\xNN`), nothing cut.
fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
                    let mut utf8 = [0u8; 4];
                    for b in c.encode_utf8(&mut utf8).bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// A JSON string literal for bytes (invalid UTF-8 becomes U+FFFD).
fn json_string(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `arrival_time` (`secs.micros`) as an ISO 8601 UTC date, or None when it is not one.
fn arrival_date(value: &str) -> Option<String> {
    let secs_text = value.split('.').next()?;
    if secs_text.is_empty() || !secs_text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: i64 = secs_text.parse().ok()?;
    let c = qmqpd::date::civil(secs);
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        c.year, c.month, c.day, c.hour, c.minute, c.second
    ))
}

/// `arrival_time` when it is a plain decimal number (for JSON), else None.
fn arrival_number(value: &str) -> Option<&str> {
    let mut parts = value.splitn(2, '.');
    let whole = parts.next()?;
    let frac = parts.next();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(whole) && frac.is_none_or(digits)).then_some(value)
}

/// One `list` line for people.
fn list_line(m: &Message, env: &Envelope) -> String {
    let arrival = env
        .attributes
        .get("arrival_time")
        .and_then(arrival_date)
        .unwrap_or_else(|| "-".into());
    format!(
        "{:<18} {:<4} {:>10} {:<20} {:>5}  <{}>",
        m.queue_id,
        m.state.dir_name(),
        env.message_len,
        arrival,
        env.recipients.len(),
        escape(&env.sender)
    )
}

/// One `list --json` line: an object per message.
fn json_line(m: &Message, env: &Envelope) -> String {
    let arrival = env
        .attributes
        .get("arrival_time")
        .and_then(arrival_number)
        .unwrap_or("null");
    let recipients: Vec<String> = env.recipients.iter().map(|r| json_string(r)).collect();
    format!(
        "{{\"queue_id\":{},\"file\":{},\"state\":\"{}\",\"arrival_time\":{},\"size\":{},\"sender\":{},\"nrcpt\":{},\"recipients\":[{}]}}",
        json_string(m.queue_id.as_bytes()),
        json_string(m.name.as_encoded_bytes()),
        m.state.dir_name(),
        arrival,
        env.message_len,
        json_string(&env.sender),
        env.recipients.len(),
        recipients.join(",")
    )
}

/// The `list` total line, in `mailq`'s words.
fn total_line(count: usize, bytes: u64) -> String {
    if count == 0 {
        return "Mail queue is empty".into();
    }
    let kbytes = bytes.div_ceil(1024);
    let plural = if count == 1 { "" } else { "s" };
    format!("-- {kbytes} Kbytes in {count} Request{plural}.")
}

/// Ends a listing: a closed pipe (`| head`) is not an error worth a message.
fn output_status(result: io::Result<()>) -> Option<u8> {
    match result {
        Ok(()) => None,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Some(EXIT_OK),
        Err(e) => {
            let _ = writeln!(io::stderr(), "qmqp-queue: cannot write output: {e}");
            Some(EXIT_IOERR)
        }
    }
}

/// `list`: the messages in `new/` and `cur/`, oldest first, and a total.
fn list(queue_dir: &Path, json: bool) -> u8 {
    let messages = match queue::list_messages(queue_dir, &[State::New, State::Cur]) {
        Ok(messages) => messages,
        Err(e) => {
            let _ = writeln!(io::stderr(), "qmqp-queue: fatal: {e}");
            return EXIT_IOERR;
        }
    };
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut unreadable = false;
    let mut count = 0usize;
    let mut bytes = 0u64;
    if !json && !messages.is_empty() {
        let header = format!(
            "{:<18} {:<4} {:>10} {:<20} {:>5}  SENDER",
            "QUEUE_ID", "STATE", "SIZE", "ARRIVAL", "NRCPT"
        );
        if let Some(code) = output_status(writeln!(out, "{header}")) {
            return code;
        }
    }
    for m in &messages {
        let env = match queue::read_envelope(&m.path) {
            Ok(env) => env,
            // Delivered or moved since the directory was read.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = out.flush();
                let _ = writeln!(
                    io::stderr(),
                    "qmqp-queue: warning: cannot read {}: {e}",
                    m.path.display()
                );
                unreadable = true;
                continue;
            }
        };
        count += 1;
        bytes = bytes.saturating_add(env.message_len);
        let line = if json {
            json_line(m, &env)
        } else {
            list_line(m, &env)
        };
        if let Some(code) = output_status(writeln!(out, "{line}")) {
            return code;
        }
    }
    if !json && let Some(code) = output_status(writeln!(out, "{}", total_line(count, bytes))) {
        return code;
    }
    if let Some(code) = output_status(out.flush()) {
        return code;
    }
    if unreadable { EXIT_IOERR } else { EXIT_OK }
}

/// `show`: attributes, envelope, then the message exactly as stored.
fn show(queue_dir: &Path, id: &str) -> u8 {
    // A message can move between directories while we look (claimed, deferred): look again.
    for _attempt in 0..3 {
        let message = match queue::find_message(queue_dir, id) {
            Ok(Some(m)) => m,
            Ok(None) => {
                let _ = writeln!(
                    io::stderr(),
                    "qmqp-queue: no message \"{}\" in {}",
                    id.escape_debug(),
                    queue_dir.display()
                );
                return EXIT_NO_MESSAGE;
            }
            Err(e) => {
                let _ = writeln!(io::stderr(), "qmqp-queue: fatal: {e}");
                return EXIT_IOERR;
            }
        };
        let env = match queue::read_envelope(&message.path) {
            Ok(env) => env,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = writeln!(
                    io::stderr(),
                    "qmqp-queue: cannot read {}: {e}",
                    message.path.display()
                );
                return EXIT_IOERR;
            }
        };
        let mut file = match File::open(&message.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                let _ = writeln!(
                    io::stderr(),
                    "qmqp-queue: cannot open {}: {e}",
                    message.path.display()
                );
                return EXIT_IOERR;
            }
        };
        let stdout = io::stdout();
        let mut out = BufWriter::new(stdout.lock());
        let written = write_show(&mut out, &message, &env, &mut file).and_then(|()| out.flush());
        return output_status(written).unwrap_or(EXIT_OK);
    }
    let _ = writeln!(
        io::stderr(),
        "qmqp-queue: message \"{}\" keeps moving: try again",
        id.escape_debug()
    );
    EXIT_TEMPFAIL
}

/// Writes `show`'s output; the message is copied from `file` byte for byte.
fn write_show<W: Write>(
    out: &mut W,
    message: &Message,
    env: &Envelope,
    file: &mut File,
) -> io::Result<()> {
    writeln!(out, "*** ATTRIBUTES ***")?;
    for (name, value) in &env.attributes.pairs {
        writeln!(
            out,
            "{}={}",
            escape(name.as_bytes()),
            escape(value.as_bytes())
        )?;
    }
    writeln!(out, "*** ENVELOPE ***")?;
    writeln!(
        out,
        "file: {}/{}",
        message.state.dir_name(),
        escape(message.name.as_encoded_bytes())
    )?;
    writeln!(out, "state: {}", message.state.dir_name())?;
    writeln!(out, "size: {}", env.message_len)?;
    writeln!(out, "sender: <{}>", escape(&env.sender))?;
    for rcpt in &env.recipients {
        writeln!(out, "recipient: <{}>", escape(rcpt))?;
    }
    if let Some(reason) = queue::failure_reason(message) {
        for line in reason.lines() {
            writeln!(out, "reason: {}", escape(line.as_bytes()))?;
        }
    }
    writeln!(out, "*** MESSAGE ***")?;
    file.seek(SeekFrom::Start(env.message_offset))?;
    let copied = io::copy(&mut file.take(env.message_len), out)?;
    if copied != env.message_len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("message ended after {copied} of {} bytes", env.message_len),
        ));
    }
    Ok(())
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

    #[test]
    fn escape_keeps_utf8_and_escapes_controls() {
        assert_eq!(escape("é<a@b>".as_bytes()), "é<a@b>");
        assert_eq!(escape(b"a\nb\x1b\xff"), "a\\nb\\x1b\\xff");
    }

    #[test]
    fn json_string_escapes_quotes_and_controls() {
        assert_eq!(json_string(b"a\"b\\c\n\x01"), "\"a\\\"b\\\\c\\n\\u0001\"");
        assert_eq!(json_string(b"\xff"), "\"\u{fffd}\"");
    }

    #[test]
    fn arrival_formats_validate_the_attribute() {
        assert_eq!(
            arrival_date("1764333296.123456").as_deref(),
            Some("2025-11-28T12:34:56Z")
        );
        assert_eq!(arrival_date("x"), None);
        assert_eq!(
            arrival_number("1764333296.123456"),
            Some("1764333296.123456")
        );
        assert_eq!(arrival_number("17643"), Some("17643"));
        assert_eq!(arrival_number("1.2.3"), None);
        assert_eq!(arrival_number("1."), None);
        assert_eq!(arrival_number("nan"), None);
    }

    #[test]
    fn total_line_speaks_like_mailq() {
        assert_eq!(total_line(0, 0), "Mail queue is empty");
        assert_eq!(total_line(1, 1), "-- 1 Kbytes in 1 Request.");
        assert_eq!(total_line(3, 2049), "-- 3 Kbytes in 3 Requests.");
    }
}
