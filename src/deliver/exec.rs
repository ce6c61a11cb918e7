//! Running an `--exec` command for a claimed message: `/bin/sh -c COMMAND qmqp-queue
//! RCPT...` with the message on stdin, in its own process group, under a time limit; and the
//! one mapping from how it ended to a verdict.
//!
//! Does not move queue files: the verdicts go back to the deliverer, which disposes.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use super::{Deliverer, RecipientVerdict, Status, Verdict};
use crate::logging::sanitize;
use crate::queue::{self, Claim, Envelope};
use crate::verp::{verp_delimiters, verp_sender};

/// Exit statuses of an `--exec` command that mean "try again later": the sysexits codes
/// `EX_OSERR` (71), `EX_CANTCREAT` (73), `EX_IOERR` (74) and `EX_TEMPFAIL` (75), and qmail's
/// 111. Every other non-zero status is permanent.
pub(crate) const TEMPORARY_EXIT_CODES: [i32; 5] = [71, 73, 74, 75, 111];

/// The shell that runs `--exec` commands.
const SHELL: &str = "/bin/sh";
/// `$0` of the `--exec` command.
const COMMAND_NAME: &str = "qmqp-queue";
/// How much of a command's output is kept for the log and the reason file.
const OUTPUT_KEEP: usize = 512;
/// How long to wait for a command's output to end after the command exited (a background
/// process may keep the pipe open).
const OUTPUT_GRACE: Duration = Duration::from_secs(1);

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
pub(crate) fn classify_exit(status: ExitStatus, output: &str) -> Verdict {
    let (class, mut reason) = match (status.code(), status.signal()) {
        (Some(0), _) => (Status::Ok, "delivered via command".to_string()),
        (Some(code), _) => {
            let class = if TEMPORARY_EXIT_CODES.contains(&code) {
                Status::TempFail
            } else {
                Status::PermFail
            };
            let text = match sysexits_text(code) {
                Some(text) => format!("command exited with status {code} ({text})"),
                None => format!("command exited with status {code}"),
            };
            (class, text)
        }
        (None, Some(sig)) => (Status::TempFail, format!("command killed by signal {sig}")),
        (None, None) => (Status::TempFail, format!("command ended: {status}")),
    };
    if !output.is_empty() {
        reason.push_str(": ");
        reason.push_str(output);
    }
    Verdict::new(class, reason)
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

impl Deliverer {
    /// Runs the command once for all recipients, or once per recipient for a VERP sender.
    pub(super) fn run_exec(
        &self,
        command: &str,
        claim: &Claim,
        envelope: &Envelope,
    ) -> Vec<RecipientVerdict> {
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
            return Verdict::new(Status::PermFail, "address holds a NUL byte");
        }
        // Opened before the command starts: a command must never see an empty or cut
        // message because the queue file could not be read.
        let mut message = match queue::open_message(&claim.path, envelope) {
            Ok(message) => message,
            Err(e) => {
                return Verdict::new(Status::TempFail, format!("cannot read queue file: {e}"));
            }
        };
        let (out_rdr, out_wtr) = match io::pipe().and_then(|(r, w)| Ok((r, w.try_clone()?, w))) {
            Ok((r, w1, w2)) => (r, (w1, w2)),
            Err(e) => return Verdict::new(Status::TempFail, format!("cannot create a pipe: {e}")),
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
                    Status::PermFail,
                    format!("cannot run {SHELL}: too many or too long recipients: {e}"),
                );
            }
            Err(e) => return Verdict::new(Status::TempFail, format!("cannot run {SHELL}: {e}")),
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
                Status::TempFail,
                format!("command timed out after {}s", self.opts.timeout.as_secs()),
            ),
            Ok(_)
                if fed
                    .as_ref()
                    .is_err_and(|e| e.kind() != io::ErrorKind::BrokenPipe) =>
            {
                let e = fed.err().map(|e| e.to_string()).unwrap_or_default();
                Verdict::new(Status::TempFail, format!("cannot read queue file: {e}"))
            }
            Ok(status) => classify_exit(status, &output),
            Err(e) => Verdict::new(
                Status::TempFail,
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

    fn exit(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
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
    fn classify_exit_maps_sysexits() {
        assert_eq!(classify_exit(exit(0), "").status, Status::Ok);
        for code in [71, 73, 74, 75, 111] {
            assert_eq!(
                classify_exit(exit(code), "").status,
                Status::TempFail,
                "{code}"
            );
        }
        for code in [1, 64, 65, 67, 69, 70, 77, 78, 100, 255] {
            assert_eq!(
                classify_exit(exit(code), "").status,
                Status::PermFail,
                "{code}"
            );
        }
    }

    #[test]
    fn classify_exit_treats_signals_as_temporary() {
        let v = classify_exit(ExitStatus::from_raw(9), "");
        assert_eq!(v.status, Status::TempFail);
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
    fn clean_output_joins_whitespace_and_caps() {
        assert_eq!(clean_output(b"  a\n\n b\tc \n"), "a b c");
        assert_eq!(clean_output(b"\x1b[2J"), "\\x1b[2J");
        let long = vec![b'x'; OUTPUT_KEEP + 10];
        let text = clean_output(&long);
        assert_eq!(text.len(), OUTPUT_KEEP + 3);
        assert!(text.ends_with("..."));
    }
}
