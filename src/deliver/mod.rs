//! `qmqp-queue`'s deliverer: claiming the messages in `new/`, running their delivery and
//! disposing of their queue files.
//!
//! Owns the hand-off (an `--exec` command in `exec`, a QMQP relay in `relay`), the mapping
//! from a command's exit status or a server's reply to a verdict (K sent, Z deferred, D
//! bounced), the retry schedule (`backoff`), and what then becomes of the queue file:
//! removed, back into `new/` with its next attempt time as its mtime (as Postfix does with
//! deferred queue files), or into `failed/` with the reason beside it. It logs every outcome
//! in Postfix's words. The layout, the claim by rename and the durable create are the
//! `queue` family's; command lines, signals and listings are not this module's either.

mod backoff;
mod exec;
mod relay;

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io::{self, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use backoff::{backoff, format_delay, parse_arrival, unix_secs};

use crate::logging::sanitize;
use crate::queue::{self, Claim, Envelope, Queue, QueueError, QueueFile, REASON_SUFFIX, State};
use crate::reply::Status;

/// Default `--timeout` for `--exec`: the longest a command may run (Postfix's
/// `command_time_limit`).
pub(crate) const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(1000);
/// Default `--timeout` for `--relay`: the longest one connect, read or write may take
/// (`qmqpd_timeout`).
pub const DEFAULT_RELAY_TIMEOUT: Duration = Duration::from_secs(300);
/// Default `--stale-time`: a claim in `cur/` untouched for this long belongs to a deliverer
/// that died, and is taken back into `new/`.
pub(crate) const DEFAULT_STALE_TIME: Duration = Duration::from_secs(3600);
/// Default `--min-backoff` (Postfix's `minimal_backoff_time`).
pub(crate) const DEFAULT_MIN_BACKOFF: Duration = Duration::from_secs(300);
/// Default `--max-backoff` (Postfix's `maximal_backoff_time`).
pub(crate) const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(4000);
/// Most passes over `new/` one `--once` run makes (each pass claims at least one message).
const MAX_ONCE_PASSES: usize = 1000;

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

/// The word Postfix logs for a delivery attempt's status (`status=sent`): K sent, Z
/// deferred, D bounced.
fn status_word(status: Status) -> &'static str {
    match status {
        Status::Ok => "sent",
        Status::TempFail => "deferred",
        Status::PermFail => "bounced",
    }
}

/// The result of one attempt: its class and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Sent (K), deferred (Z) or bounced (D).
    pub(crate) status: Status,
    /// The text logged in parentheses after the status.
    pub(crate) reason: String,
}

impl Verdict {
    fn new(status: Status, reason: impl Into<String>) -> Verdict {
        Verdict {
            status,
            reason: reason.into(),
        }
    }
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

    /// Removes files in `tmp/` older than `STALE_TMP_AGE` (left by a server that died while
    /// writing with `queue_commit_method = rename`, or by a deliverer); returns how many. The
    /// server does not scan `tmp/` per message: this, and a listener's start, do.
    pub fn remove_stale_tmp(&self, now: SystemTime) -> usize {
        match self.queue.remove_stale_tmp(queue::STALE_TMP_AGE, now) {
            Ok(0) => 0,
            Ok(n) => {
                log::info!(
                    "removed {n} stale files from {}/tmp",
                    self.queue.dir().display()
                );
                n
            }
            Err(e) => {
                log::warn!("cannot scan {}/tmp: {e}", self.queue.dir().display());
                0
            }
        }
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
                status_word(v.verdict.status),
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
            let line = format!(
                "status={} ({})",
                status_word(Status::PermFail),
                sanitize(reason.as_bytes())
            );
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
        let (deferred, bounced) = (with(Status::TempFail), with(Status::PermFail));
        let failed_lines: Vec<String> = lines
            .iter()
            .filter(|(s, _)| *s == Status::PermFail)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netstring;
    use crate::queue::{failure_reason, list_messages};
    use std::fs::{self, File};

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
