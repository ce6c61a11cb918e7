//! `qmqp-queue`'s side of the queue: finding the messages in `new/`, `cur/` and `failed/`,
//! and delivering them out of `new/`.
//!
//! Owns the claim protocol (a message is claimed by renaming it from `new/` into `cur/`; the
//! rename is atomic, so of several deliverers only one wins and the others skip the file),
//! the hand-off (an `--exec` command or a QMQP relay), the one mapping from a command's exit
//! status or a server's reply to sent / deferred / bounced, and what then becomes of the
//! queue file: removed, back into `new/` with its next attempt time as its mtime (as
//! Postfix does with deferred queue files), or into `failed/` with the reason beside it.
//! It logs every outcome in Postfix's words. It does not parse command lines, print
//! listings or install signal handlers: that is `qmqp-queue`'s job.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::client::{self, Status as ReplyStatus};
use crate::logging::sanitize;
use crate::queue::{self, Claim, Envelope, Queue, QueueError, QueueFile, REASON_SUFFIX, State};
use crate::session::verp_delimiters;

/// Default `--timeout` for `--exec`: the longest a command may run (Postfix's
/// `command_time_limit`).
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(1000);
/// Default `--timeout` for `--relay`: the longest one connect, read or write may take
/// (`qmqpd_timeout`).
pub const DEFAULT_RELAY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `--stale-time`: a claim in `cur/` untouched for this long belongs to a deliverer
/// that died, and is taken back into `new/`.
pub const DEFAULT_STALE_TIME: Duration = Duration::from_secs(3600);
/// Default `--min-backoff` (Postfix's `minimal_backoff_time`).
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(300);
/// Default `--max-backoff` (Postfix's `maximal_backoff_time`).
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(4000);

/// Exit statuses of an `--exec` command that mean "try again later": the sysexits codes
/// `EX_OSERR` (71), `EX_CANTCREAT` (73), `EX_IOERR` (74) and `EX_TEMPFAIL` (75), and qmail's
/// 111. Every other non-zero status is permanent.
pub const TEMPORARY_EXIT_CODES: [i32; 5] = [71, 73, 74, 75, 111];

/// The shell that runs `--exec` commands.
const SHELL: &str = "/bin/sh";
/// `$0` of the `--exec` command.
const COMMAND_NAME: &str = "qmqp-queue";
/// How much of a command's output is kept for the log and the reason file.
const OUTPUT_KEEP: usize = 512;
/// How long to wait for a command's output to end after the command exited (a background
/// process may keep the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);
/// Most passes over `new/` one `--once` run makes (each pass claims at least one message).
const MAX_ONCE_PASSES: usize = 1000;

/// The envelope sender for one recipient of a VERP sender, the qmail way: `prefix-@host-@[]`
/// and `user@domain` give `prefix-user=domain@host`. `None` when `sender` is not a VERP
/// sender (as qmqpd recognises them).
pub fn verp_sender(sender: &[u8], recipient: &[u8]) -> Option<Vec<u8>> {
    verp_delimiters(sender)?;
    let base = sender.strip_suffix(b"-@[]")?;
    let at = base.iter().rposition(|&b| b == b'@')?;
    let (local, host) = base.split_at(at);
    let mut out = Vec::with_capacity(base.len().saturating_add(recipient.len()));
    out.extend_from_slice(local);
    match recipient.iter().rposition(|&b| b == b'@') {
        Some(r) => {
            let (user, domain) = recipient.split_at(r);
            out.extend_from_slice(user);
            out.push(b'=');
            out.extend_from_slice(domain.get(1..).unwrap_or_default());
        }
        None => out.extend_from_slice(recipient),
    }
    out.extend_from_slice(host);
    Some(out)
}

/// Where messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `--exec CMD`: `/bin/sh -c CMD qmqp-queue RCPT...`, the message on stdin.
    Exec(String),
    /// `--relay host:port`: one QMQP request per message.
    Relay(String),
}

/// How `deliver` works.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where messages go.
    pub target: Target,
    /// `--exec`: longest run of one command; `--relay`: longest connect, read or write.
    pub timeout: Duration,
    /// Claims in `cur/` untouched for this long are taken back into `new/` (0: all).
    pub stale_time: Duration,
    /// Shortest wait before a deferred message is tried again.
    pub min_backoff: Duration,
    /// Longest wait before a deferred message is tried again.
    pub max_backoff: Duration,
    /// Try every message in `new/` once even when its next attempt time is in the future.
    pub flush: bool,
}

impl Options {
    /// Options with the defaults for `target`.
    pub fn new(target: Target) -> Options {
        let timeout = match target {
            Target::Exec(_) => DEFAULT_EXEC_TIMEOUT,
            Target::Relay(_) => DEFAULT_RELAY_TIMEOUT,
        };
        Options {
            target,
            timeout,
            stale_time: DEFAULT_STALE_TIME,
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            flush: false,
        }
    }
}

/// The class of one delivery attempt's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Delivered: the recipient is done.
    Sent,
    /// Temporary failure: try again later.
    Deferred,
    /// Permanent failure: the recipient goes to `failed/`.
    Bounced,
}

impl Status {
    /// The word Postfix logs (`status=sent`).
    pub fn word(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Deferred => "deferred",
            Status::Bounced => "bounced",
        }
    }
}

/// The result of one attempt: its class and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Sent, deferred or bounced.
    pub status: Status,
    /// The text logged in parentheses after the status.
    pub reason: String,
}

impl Verdict {
    fn new(status: Status, reason: impl Into<String>) -> Verdict {
        Verdict {
            status,
            reason: reason.into(),
        }
    }
}

/// The sysexits name of an exit status, for reasons.
fn sysexits_text(code: i32) -> Option<&'static str> {
    Some(match code {
        64 => "command line usage error",
        65 => "data format error",
        66 => "cannot open input",
        67 => "user unknown",
        68 => "host name unknown",
        69 => "service unavailable",
        70 => "internal software error",
        71 => "system resource problem",
        72 => "critical OS file missing",
        73 => "can't create user output file",
        74 => "input/output error",
        75 => "temporary failure",
        76 => "remote error in protocol",
        77 => "permission denied",
        78 => "local configuration error",
        100 => "permanent failure",
        111 => "temporary failure",
        _ => return None,
    })
}

/// The one mapping from an `--exec` command's end to a verdict: 0 is sent; the codes in
/// [`TEMPORARY_EXIT_CODES`] and death by a signal are deferred; anything else is bounced.
/// `output` (already cleaned) is appended to the reason.
pub fn classify_exit(status: ExitStatus, output: &str) -> Verdict {
    let (class, mut reason) = match (status.code(), status.signal()) {
        (Some(0), _) => (Status::Sent, "delivered via command".to_string()),
        (Some(code), _) => {
            let class = if TEMPORARY_EXIT_CODES.contains(&code) {
                Status::Deferred
            } else {
                Status::Bounced
            };
            let text = match sysexits_text(code) {
                Some(text) => format!("command exited with status {code} ({text})"),
                None => format!("command exited with status {code}"),
            };
            (class, text)
        }
        (None, Some(sig)) => (Status::Deferred, format!("command killed by signal {sig}")),
        (None, None) => (Status::Deferred, format!("command ended: {status}")),
    };
    if !output.is_empty() {
        reason.push_str(": ");
        reason.push_str(output);
    }
    Verdict::new(class, reason)
}

/// The one mapping from a QMQP server's reply to a verdict: K sent, Z deferred, D bounced.
pub fn classify_reply(reply: &client::Reply, relay: &str) -> Verdict {
    let text = sanitize(reply.text.as_bytes());
    match reply.status {
        ReplyStatus::Ok => Verdict::new(Status::Sent, text),
        ReplyStatus::TempFail => {
            Verdict::new(Status::Deferred, format!("host {relay} said: {text}"))
        }
        ReplyStatus::PermFail => {
            Verdict::new(Status::Bounced, format!("host {relay} said: {text}"))
        }
    }
}

/// A command's output made fit for one log line: whitespace runs become one space, at most
/// [`OUTPUT_KEEP`] bytes, control characters escaped.
fn clean_output(raw: &[u8]) -> String {
    let kept = raw.get(..OUTPUT_KEEP).unwrap_or(raw);
    let mut joined = Vec::with_capacity(kept.len());
    let mut space = false;
    for &b in kept {
        if b.is_ascii_whitespace() {
            space = true;
            continue;
        }
        if space && !joined.is_empty() {
            joined.push(b' ');
        }
        space = false;
        joined.push(b);
    }
    let mut text = sanitize(&joined);
    if raw.len() > OUTPUT_KEEP {
        text.push_str("...");
    }
    text
}

/// Postfix-style delay: seconds with two decimals below 100, whole seconds above.
fn format_delay(secs: f64) -> String {
    if secs < 100.0 {
        format!("{secs:.2}")
    } else {
        format!("{secs:.0}")
    }
}

/// Seconds since the Unix epoch of an `arrival_time` attribute (`secs.micros`).
fn parse_arrival(value: &str) -> Option<f64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    value.parse().ok()
}

/// Seconds since the Unix epoch of `t` (0 before the epoch).
fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// How long a message deferred at `now` waits before its next attempt: its age in the
/// queue, at least `min` and at most `max` (so the waits grow as the message ages).
pub fn backoff(arrival: Option<f64>, now: SystemTime, min: Duration, max: Duration) -> Duration {
    let age = arrival
        .map(|a| (unix_secs(now) - a).max(0.0))
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .unwrap_or_default();
    age.min(max).max(min)
}

/// One recipient's verdict (by index into the envelope's recipients).
struct RecipientVerdict {
    index: usize,
    verdict: Verdict,
}

/// Delivers messages out of one queue directory; several may run at once, in one process
/// or many.
pub struct Deliverer {
    queue: Queue,
    opts: Options,
    /// Messages this deliverer deferred: a `--once` run does not try them again.
    deferred: HashSet<OsString>,
}

/// What one pass over `new/` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pass {
    /// Messages claimed (and so delivered, deferred or failed).
    pub claimed: usize,
}

impl Deliverer {
    /// A deliverer for `queue_dir`; creates `tmp/`, `new/`, `cur/` and `failed/` when missing.
    pub fn new(queue_dir: &Path, opts: Options) -> Result<Deliverer, QueueError> {
        // A deliverer makes no new queue file names: the host part is never used.
        let queue = Queue::new(queue_dir, "");
        queue.create_all_dirs()?;
        Ok(Deliverer {
            queue,
            opts,
            deferred: HashSet::new(),
        })
    }

    /// Takes claims in `cur/` untouched for `stale_time` back into `new/` (their deliverer
    /// died); returns how many.
    pub fn take_back_stale(&self, now: SystemTime) -> Result<usize, QueueError> {
        self.queue.take_back_stale(self.opts.stale_time, now)
    }

    /// One pass over `new/`: claims each message that is due, oldest first, and delivers it.
    /// `once`: messages this deliverer deferred earlier are not tried again. Stops between
    /// messages when `stop` is set.
    pub fn deliver_pass(&mut self, once: bool, stop: &AtomicBool) -> Result<Pass, QueueError> {
        let now = SystemTime::now();
        let mut pass = Pass::default();
        for message in queue::list_messages(self.queue.dir(), &[State::New])? {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let retried = self.deferred.contains(&message.name);
            if once && retried {
                continue;
            }
            let ignore_due = !retried && self.opts.flush;
            let Some(claim) = self.queue.claim(&message, ignore_due, now)? else {
                continue;
            };
            pass.claimed += 1;
            self.deliver(claim)?;
        }
        Ok(pass)
    }

    /// Runs passes until one claims nothing (at most [`MAX_ONCE_PASSES`]) or `stop` is set.
    pub fn drain(&mut self, stop: &AtomicBool) -> Result<usize, QueueError> {
        let mut claimed = 0;
        for _ in 0..MAX_ONCE_PASSES {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let pass = self.deliver_pass(true, stop)?;
            if pass.claimed == 0 {
                break;
            }
            claimed += pass.claimed;
        }
        Ok(claimed)
    }

    /// Delivers one claimed message and disposes of its queue file.
    fn deliver(&mut self, claim: Claim) -> Result<(), QueueError> {
        let envelope = match queue::read_envelope(&claim.path) {
            Ok(envelope) => envelope,
            Err(e) => return self.unreadable(claim, &e),
        };
        if envelope.recipients.is_empty() {
            let e = io::Error::new(io::ErrorKind::InvalidData, "no recipients");
            return self.unreadable(claim, &e);
        }
        log::info!(
            "{}: from=<{}>, size={}, nrcpt={} (queue active)",
            claim.queue_id,
            sanitize(&envelope.sender),
            envelope.message_len,
            envelope.recipients.len()
        );
        let (relay, verdicts) = match &self.opts.target {
            Target::Exec(command) => (
                "exec".to_string(),
                self.run_exec(command, &claim, &envelope),
            ),
            Target::Relay(server) => self.run_relay(server, &claim, &envelope),
        };
        let now = SystemTime::now();
        let arrival = envelope
            .attributes
            .get("arrival_time")
            .and_then(parse_arrival);
        let delay = format_delay(arrival.map_or(0.0, |a| (unix_secs(now) - a).max(0.0)));
        let mut lines = Vec::new();
        for v in &verdicts {
            let rcpt = envelope
                .recipients
                .get(v.index)
                .map(|r| sanitize(r))
                .unwrap_or_default();
            let line = format!(
                "to=<{rcpt}>, relay={relay}, delay={delay}, status={} ({})",
                v.verdict.status.word(),
                sanitize(v.verdict.reason.as_bytes())
            );
            log::info!("{}: {line}", claim.queue_id);
            lines.push((v.verdict.status, line));
        }
        self.dispose(claim, &envelope, &verdicts, &lines, arrival, now)
    }

    /// A claimed file that cannot be read: corrupt files go to `failed/`, other errors
    /// (out of descriptors, I/O) back to `new/` for later.
    fn unreadable(&mut self, claim: Claim, e: &io::Error) -> Result<(), QueueError> {
        let corrupt = matches!(
            e.kind(),
            io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
        );
        let reason = format!("cannot read queue file: {e}");
        if corrupt {
            log::warn!("{}: {reason}: moved to failed/", claim.queue_id);
            let line = format!("status=bounced ({})", sanitize(reason.as_bytes()));
            self.move_to_failed(&claim, &[line])
        } else {
            log::warn!("{}: {reason}: back to new/", claim.queue_id);
            let now = SystemTime::now();
            let wait = backoff(None, now, self.opts.min_backoff, self.opts.max_backoff);
            self.move_to_new(&claim, now + wait)
        }
    }

    /// Removes, defers or fails the claimed file (or splits it, when recipients of one
    /// message had different outcomes).
    fn dispose(
        &mut self,
        claim: Claim,
        envelope: &Envelope,
        verdicts: &[RecipientVerdict],
        lines: &[(Status, String)],
        arrival: Option<f64>,
        now: SystemTime,
    ) -> Result<(), QueueError> {
        let with = |status: Status| -> Vec<usize> {
            verdicts
                .iter()
                .filter(|v| v.verdict.status == status)
                .map(|v| v.index)
                .collect()
        };
        let (deferred, bounced) = (with(Status::Deferred), with(Status::Bounced));
        let failed_lines: Vec<String> = lines
            .iter()
            .filter(|(s, _)| *s == Status::Bounced)
            .map(|(_, l)| l.clone())
            .collect();
        let retry_at = now + backoff(arrival, now, self.opts.min_backoff, self.opts.max_backoff);
        let all = envelope.recipients.len();
        if deferred.is_empty() && bounced.is_empty() {
            queue::remove(&claim.path)?;
            self.deferred.remove(&claim.name);
            log::info!("{}: removed", claim.queue_id);
            return Ok(());
        }
        if deferred.len() == all {
            return self.move_to_new(&claim, retry_at);
        }
        if bounced.len() == all {
            return self.move_to_failed(&claim, &failed_lines);
        }
        // Mixed outcomes (VERP runs one command per recipient): keep only the recipients
        // that are not done, in new copies, before the claim goes.
        if !bounced.is_empty() {
            self.write_reason(&claim, &failed_lines)?;
            self.write_subset(&claim, envelope, &bounced, State::Failed, None)?;
            log::info!(
                "{}: {} of {} recipients moved to failed/",
                claim.queue_id,
                bounced.len(),
                all
            );
        }
        if !deferred.is_empty() {
            self.write_subset(&claim, envelope, &deferred, State::New, Some(retry_at))?;
            self.deferred.insert(claim.name.clone());
            log::info!(
                "{}: {} of {} recipients deferred",
                claim.queue_id,
                deferred.len(),
                all
            );
        }
        queue::remove(&claim.path)
    }

    /// Back into `new/`, with `retry_at` as its next attempt time.
    fn move_to_new(&mut self, claim: &Claim, retry_at: SystemTime) -> Result<(), QueueError> {
        if let Err(e) = claim.file.set_modified(retry_at) {
            log::debug!("cannot set the retry time of {}: {e}", claim.path.display());
        }
        let to = self.queue.path(State::New, &claim.name);
        queue::rename(&claim.path, &to)?;
        self.deferred.insert(claim.name.clone());
        Ok(())
    }

    /// Into `failed/`, the reason first so that a failed message always has one.
    fn move_to_failed(&mut self, claim: &Claim, lines: &[String]) -> Result<(), QueueError> {
        self.write_reason(claim, lines)?;
        let to = self.queue.path(State::Failed, &claim.name);
        queue::rename(&claim.path, &to)?;
        self.deferred.remove(&claim.name);
        log::info!("{}: moved to failed/", claim.queue_id);
        Ok(())
    }

    /// Writes `failed/NAME.reason` durably (via `tmp/`): one line per failed recipient.
    fn write_reason(&self, claim: &Claim, lines: &[String]) -> Result<(), QueueError> {
        let mut name = claim.name.clone();
        name.push(REASON_SUFFIX);
        let mut text = String::new();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        self.write_file(&name, ".reason-tmp", State::Failed, None, |f| {
            f.write_all(text.as_bytes())
        })
    }

    /// Writes a copy of the claimed file holding only the recipients at `keep` into
    /// `STATE/NAME` durably, with `mtime` when given.
    fn write_subset(
        &self,
        claim: &Claim,
        envelope: &Envelope,
        keep: &[usize],
        state: State,
        mtime: Option<SystemTime>,
    ) -> Result<(), QueueError> {
        self.write_file(&claim.name, ".split-tmp", state, mtime, |f| {
            queue::write_subset(&claim.path, envelope, keep, f)
        })
    }

    /// Creates `STATE/NAME` through `tmp/NAME` + `tmp_suffix` with the queue's durable create;
    /// `fill` writes its contents. A file that cannot be written whole is removed.
    fn write_file(
        &self,
        name: &OsStr,
        tmp_suffix: &str,
        state: State,
        mtime: Option<SystemTime>,
        fill: impl FnOnce(&mut QueueFile) -> io::Result<()>,
    ) -> Result<(), QueueError> {
        let mut tmp_name = name.to_os_string();
        tmp_name.push(tmp_suffix);
        let write = || -> io::Result<()> {
            let mut file = self.queue.create_in(&tmp_name, state, name)?;
            fill(&mut file)?;
            file.commit_at(mtime)
        };
        write().map_err(|source| QueueError::Write {
            path: self.queue.dir().join("tmp").join(&tmp_name),
            source,
        })
    }

    /// Runs the command once for all recipients, or once per recipient for a VERP sender.
    fn run_exec(&self, command: &str, claim: &Claim, envelope: &Envelope) -> Vec<RecipientVerdict> {
        let rcpts: Vec<&[u8]> = envelope.recipients.iter().map(Vec::as_slice).collect();
        if verp_delimiters(&envelope.sender).is_none() {
            // Recipients are arguments: a big list goes in several runs so that no run
            // exceeds the kernel's limit on arguments (E2BIG would bounce them all).
            let mut verdicts = Vec::with_capacity(rcpts.len());
            for batch in argv_batches(&rcpts, ARGV_BATCH_BYTES) {
                let verdict = self.run_command(
                    command,
                    claim,
                    envelope,
                    &envelope.sender,
                    &rcpts[batch.clone()],
                );
                verdicts.extend(batch.map(|index| RecipientVerdict {
                    index,
                    verdict: verdict.clone(),
                }));
            }
            return verdicts;
        }
        rcpts
            .iter()
            .enumerate()
            .map(|(index, rcpt)| {
                let sender = verp_sender(&envelope.sender, rcpt).unwrap_or_default();
                RecipientVerdict {
                    index,
                    verdict: self.run_command(command, claim, envelope, &sender, &[rcpt]),
                }
            })
            .collect()
    }

    /// `/bin/sh -c COMMAND qmqp-queue RCPT...` with the message on stdin and `SENDER`,
    /// `QUEUE_ID` (and `RECIPIENT` for one recipient) in the environment, `MAIL_CONFIG`
    /// removed from it; its stdout and
    /// stderr are kept for the reason. In its own process group, so a timeout can end it
    /// with everything it started.
    fn run_command(
        &self,
        command: &str,
        claim: &Claim,
        envelope: &Envelope,
        sender: &[u8],
        rcpts: &[&[u8]],
    ) -> Verdict {
        if sender.contains(&0) || rcpts.iter().any(|r| r.contains(&0)) {
            return Verdict::new(Status::Bounced, "address holds a NUL byte");
        }
        // Opened before the command starts: a command must never see an empty or cut
        // message because the queue file could not be read.
        let mut message = match queue::open_message(&claim.path, envelope) {
            Ok(message) => message,
            Err(e) => {
                return Verdict::new(Status::Deferred, format!("cannot read queue file: {e}"));
            }
        };
        let (out_rdr, out_wtr) = match io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w))) {
            Ok((r, w1, w2)) => (r, (w1, w2)),
            Err(e) => return Verdict::new(Status::Deferred, format!("cannot create a pipe: {e}")),
        };
        let mut cmd = Command::new(SHELL);
        cmd.arg("-c")
            .arg(command)
            .arg(COMMAND_NAME)
            .args(rcpts.iter().map(|r| OsStr::from_bytes(r)))
            .env("SENDER", OsStr::from_bytes(sender))
            .env("QUEUE_ID", &claim.queue_id)
            // Ours names qmqpd's configuration; Postfix's sendmail would read it as its own.
            .env_remove("MAIL_CONFIG")
            .stdin(Stdio::piped())
            .stdout(Stdio::from(out_wtr.0))
            .stderr(Stdio::from(out_wtr.1))
            .process_group(0);
        match rcpts {
            [one] => cmd.env("RECIPIENT", OsStr::from_bytes(one)),
            _ => cmd.env_remove("RECIPIENT"),
        };
        let spawned = cmd.spawn();
        // The Command holds our copies of the output pipe's write end: drop them so the
        // reader sees end-of-file when the command (and its children) are done.
        drop(cmd);
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) if e.raw_os_error() == Some(nix::libc::E2BIG) => {
                return Verdict::new(
                    Status::Bounced,
                    format!("cannot run {SHELL}: too many or too long recipients: {e}"),
                );
            }
            Err(e) => return Verdict::new(Status::Deferred, format!("cannot run {SHELL}: {e}")),
        };
        let pid = child.id();
        // The message goes in from a thread of its own, so a command that writes much
        // output before reading its input cannot deadlock with us.
        let (fed_tx, fed_rx) = mpsc::channel::<io::Result<()>>();
        if let Some(mut stdin) = child.stdin.take() {
            let want = envelope.message_len;
            std::thread::spawn(move || {
                let fed = io::copy(&mut message, &mut stdin).and_then(|n| {
                    if n == want {
                        Ok(())
                    } else {
                        Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!("queue file ended after {n} of {want} message bytes"),
                        ))
                    }
                });
                let _ = fed_tx.send(fed);
            });
        }
        let output = Arc::new(Mutex::new(Vec::new()));
        let (out_done_tx, out_done) = mpsc::channel::<()>();
        {
            let output = Arc::clone(&output);
            std::thread::spawn(move || {
                read_output(out_rdr, &output);
                let _ = out_done_tx.send(());
            });
        }
        let (status_tx, status_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = status_tx.send(child.wait());
        });
        let (status, timed_out) = self.wait_command(&status_rx, pid, claim);
        let _ = out_done.recv_timeout(OUTPUT_GRACE);
        let raw = output
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let output = clean_output(&raw);
        // A command may exit without reading all its input (its exit status decides then),
        // but a message we could not read whole is never reported as delivered.
        let fed = fed_rx.recv_timeout(OUTPUT_GRACE).unwrap_or(Ok(()));
        match status {
            _ if timed_out => Verdict::new(
                Status::Deferred,
                format!("command timed out after {}s", self.opts.timeout.as_secs()),
            ),
            Ok(_)
                if fed
                    .as_ref()
                    .is_err_and(|e| e.kind() != io::ErrorKind::BrokenPipe) =>
            {
                let e = fed.err().map(|e| e.to_string()).unwrap_or_default();
                Verdict::new(Status::Deferred, format!("cannot read queue file: {e}"))
            }
            Ok(status) => classify_exit(status, &output),
            Err(e) => Verdict::new(
                Status::Deferred,
                format!("cannot wait for the command: {e}"),
            ),
        }
    }

    /// Waits for the command's exit status, keeping the claim fresh meanwhile; kills its
    /// process group when `timeout` passes. Returns the status and whether it timed out.
    fn wait_command(
        &self,
        status_rx: &mpsc::Receiver<io::Result<ExitStatus>>,
        pid: u32,
        claim: &Claim,
    ) -> (io::Result<ExitStatus>, bool) {
        let beat =
            (self.opts.stale_time / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let deadline = Instant::now().checked_add(self.opts.timeout);
        let mut timed_out = false;
        loop {
            let wait = match deadline {
                Some(d) if !timed_out => d.saturating_duration_since(Instant::now()).min(beat),
                _ => beat,
            };
            match status_rx.recv_timeout(wait) {
                Ok(status) => return (status, timed_out),
                Err(RecvTimeoutError::Disconnected) => {
                    return (Err(io::Error::other("the waiting thread ended")), timed_out);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = claim.file.set_modified(SystemTime::now());
                    if !timed_out && deadline.is_some_and(|d| Instant::now() >= d) {
                        timed_out = true;
                        kill_group(pid);
                    }
                }
            }
        }
    }

    /// Sends the message to the relay; one verdict for all recipients.
    fn run_relay(
        &self,
        server: &str,
        claim: &Claim,
        envelope: &Envelope,
    ) -> (String, Vec<RecipientVerdict>) {
        let (relay, verdict) = self.relay_message(server, claim, envelope);
        let verdicts = (0..envelope.recipients.len())
            .map(|index| RecipientVerdict {
                index,
                verdict: verdict.clone(),
            })
            .collect();
        (relay, verdicts)
    }

    /// One QMQP request: the queue file minus its attributes, streamed from the file.
    fn relay_message(&self, server: &str, claim: &Claim, envelope: &Envelope) -> (String, Verdict) {
        let mut stream = match client::connect(server, self.opts.timeout) {
            Ok(stream) => stream,
            Err(e) => {
                return (
                    "none".to_string(),
                    Verdict::new(Status::Deferred, format!("connect to {server}: {e}")),
                );
            }
        };
        let host = client::parse_server(server).map_or_else(|_| server.to_string(), |(h, _)| h);
        let relay = match stream.peer_addr() {
            Ok(addr) => format!("{host}[{}]:{}", addr.ip(), addr.port()),
            Err(_) => server.to_string(),
        };
        let mut message = match queue::open_message(&claim.path, envelope) {
            Ok(message) => message,
            Err(e) => {
                return (
                    relay,
                    Verdict::new(Status::Deferred, format!("cannot read queue file: {e}")),
                );
            }
        };
        let rcpts: Vec<&[u8]> = envelope.recipients.iter().map(Vec::as_slice).collect();
        let sent = client::send(
            &mut stream,
            &mut message,
            envelope.message_len,
            &envelope.sender,
            &rcpts,
        );
        let verdict = match sent {
            Ok(reply) => classify_reply(&reply, &relay),
            Err(e) => Verdict::new(
                Status::Deferred,
                format!("no valid reply from {relay}: {e}"),
            ),
        };
        (relay, verdict)
    }
}

/// The most bytes of recipient arguments one `--exec` run gets (Linux allows 2 MiB of
/// arguments and environment together; this leaves room for the environment).
const ARGV_BATCH_BYTES: usize = 256 * 1024;

/// Splits recipients into consecutive runs of at most `limit` argument bytes each (a single
/// longer recipient gets a run of its own).
fn argv_batches(rcpts: &[&[u8]], limit: usize) -> Vec<std::ops::Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, rcpt) in rcpts.iter().enumerate() {
        let cost = rcpt.len().saturating_add(1 + std::mem::size_of::<usize>());
        if i > start && bytes.saturating_add(cost) > limit {
            batches.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes = bytes.saturating_add(cost);
    }
    if start < rcpts.len() {
        batches.push(start..rcpts.len());
    }
    batches
}

/// Reads a command's output until end of file, keeping the first [`OUTPUT_KEEP`] bytes
/// (and one more, to know there was more).
fn read_output<R: Read>(mut rdr: R, keep: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 4096];
    loop {
        match rdr.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let mut kept = keep.lock().unwrap_or_else(PoisonError::into_inner);
                let room = (OUTPUT_KEEP + 1).saturating_sub(kept.len());
                kept.extend_from_slice(buf.get(..n.min(room)).unwrap_or_default());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// SIGKILL to the process group of a command started with `process_group(0)`.
fn kill_group(pid: u32) {
    use nix::sys::signal::{Signal, killpg};
    use nix::unistd::Pid;
    if let Ok(pid) = i32::try_from(pid)
        && let Err(e) = killpg(Pid::from_raw(pid), Signal::SIGKILL)
    {
        log::warn!("cannot kill command process group {pid}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netstring;
    use crate::queue::{failure_reason, list_messages};
    use std::fs::{self, File};

    fn exit(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn verp_sender_expands_the_qmail_way() {
        assert_eq!(
            verp_sender(b"list-@lists.example.org-@[]", b"user@example.com").unwrap(),
            b"list-user=example.com@lists.example.org".to_vec()
        );
        assert_eq!(
            verp_sender(b"list-@lists.example.org-@[]", b"postmaster").unwrap(),
            b"list-postmaster@lists.example.org".to_vec()
        );
        assert_eq!(
            verp_sender(b"b+@h-@[]", b"a@b@c").unwrap(),
            b"b+a@b=c@h".to_vec()
        );
    }

    #[test]
    fn argv_batches_split_by_bytes_and_keep_order() {
        let r: Vec<&[u8]> = vec![b"aaaa", b"bbbb", b"cccc", b"dddddddddddddddddddd", b"e"];
        let one = 5 + std::mem::size_of::<usize>();
        assert_eq!(argv_batches(&r, 1 << 20), vec![0..5]);
        assert_eq!(argv_batches(&r, 2 * one), vec![0..2, 2..3, 3..4, 4..5]);
        assert_eq!(argv_batches(&[], 10), Vec::<std::ops::Range<usize>>::new());
    }

    #[test]
    fn verp_sender_ignores_plain_senders() {
        assert_eq!(verp_sender(b"list@example.org", b"u@d"), None);
        assert_eq!(verp_sender(b"", b"u@d"), None);
        assert_eq!(verp_sender(b"-@[]", b"u@d"), None);
    }

    #[test]
    fn classify_exit_maps_sysexits() {
        assert_eq!(classify_exit(exit(0), "").status, Status::Sent);
        for code in [71, 73, 74, 75, 111] {
            assert_eq!(
                classify_exit(exit(code), "").status,
                Status::Deferred,
                "{code}"
            );
        }
        for code in [1, 64, 65, 67, 69, 70, 77, 78, 100, 255] {
            assert_eq!(
                classify_exit(exit(code), "").status,
                Status::Bounced,
                "{code}"
            );
        }
    }

    #[test]
    fn classify_exit_treats_signals_as_temporary() {
        let v = classify_exit(ExitStatus::from_raw(9), "");
        assert_eq!(v.status, Status::Deferred);
        assert_eq!(v.reason, "command killed by signal 9");
    }

    #[test]
    fn classify_exit_reason_names_code_and_output() {
        let v = classify_exit(exit(67), "no such user");
        assert_eq!(
            v.reason,
            "command exited with status 67 (user unknown): no such user"
        );
    }

    #[test]
    fn classify_reply_maps_k_z_d() {
        let reply = |status, text: &str| client::Reply {
            status,
            text: text.into(),
        };
        let k = classify_reply(&reply(ReplyStatus::Ok, "Ok: queued as X"), "h[1.2.3.4]:628");
        assert_eq!(k, Verdict::new(Status::Sent, "Ok: queued as X"));
        let z = classify_reply(&reply(ReplyStatus::TempFail, "Error: x"), "h");
        assert_eq!(z.status, Status::Deferred);
        assert_eq!(z.reason, "host h said: Error: x");
        let d = classify_reply(&reply(ReplyStatus::PermFail, "Error:\ny"), "h");
        assert_eq!(d.status, Status::Bounced);
        assert_eq!(d.reason, "host h said: Error:\\ny");
    }

    #[test]
    fn clean_output_joins_whitespace_and_caps() {
        assert_eq!(clean_output(b"  a\n\n b\tc \n"), "a b c");
        assert_eq!(clean_output(b"\x1b[2J"), "\\x1b[2J");
        let long = vec![b'x'; OUTPUT_KEEP + 10];
        let text = clean_output(&long);
        assert_eq!(text.len(), OUTPUT_KEEP + 3);
        assert!(text.ends_with("..."));
    }

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

    /// A deliverer whose command always succeeds, over a fresh queue.
    fn deliverer(dir: &Path, stale_time: Duration) -> Deliverer {
        let mut opts = Options::new(Target::Exec("cat >/dev/null".into()));
        opts.stale_time = stale_time;
        Deliverer::new(dir, opts).unwrap()
    }

    fn queue_file(recipients: &[&[u8]]) -> Vec<u8> {
        let mut bytes = netstring::encode(b"qmqpd-queue 1\nqueue_id=A\n");
        bytes.extend(netstring::encode(b"message\n"));
        bytes.extend(netstring::encode(b"s@example.org"));
        for rcpt in recipients {
            bytes.extend(netstring::encode(rcpt));
        }
        bytes
    }

    #[test]
    fn deliver_pass_moves_corrupt_and_empty_files_to_failed() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = deliverer(dir.path(), DEFAULT_STALE_TIME);
        fs::write(dir.path().join("new/A.h"), b"12:not a netstring").unwrap();
        fs::write(dir.path().join("new/B.h"), queue_file(&[])).unwrap();
        fs::write(dir.path().join("new/C.h"), queue_file(&[b"r@example.net"])).unwrap();
        let pass = d.deliver_pass(true, &AtomicBool::new(false)).unwrap();
        assert_eq!(pass.claimed, 3);
        let failed = list_messages(dir.path(), &[State::Failed]).unwrap();
        let ids: Vec<&str> = failed.iter().map(|m| m.queue_id.as_str()).collect();
        assert_eq!(ids, ["A", "B"]);
        assert!(
            failure_reason(&failed[1])
                .unwrap()
                .contains("no recipients")
        );
        assert!(
            list_messages(dir.path(), &[State::New, State::Cur])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn deliver_pass_skips_messages_not_yet_due_unless_flushing() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = deliverer(dir.path(), DEFAULT_STALE_TIME);
        let path = dir.path().join("new/A.h");
        fs::write(&path, queue_file(&[b"r@example.net"])).unwrap();
        let later = SystemTime::now() + Duration::from_secs(600);
        File::open(&path).unwrap().set_modified(later).unwrap();
        let stop = AtomicBool::new(false);
        assert_eq!(d.deliver_pass(true, &stop).unwrap().claimed, 0);
        d.opts.flush = true;
        assert_eq!(d.deliver_pass(true, &stop).unwrap().claimed, 1);
        assert!(!path.exists());
    }

    #[test]
    fn deliver_pass_stops_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = deliverer(dir.path(), DEFAULT_STALE_TIME);
        fs::write(dir.path().join("new/A.h"), queue_file(&[b"r@example.net"])).unwrap();
        assert_eq!(
            d.deliver_pass(true, &AtomicBool::new(true))
                .unwrap()
                .claimed,
            0
        );
    }
}
