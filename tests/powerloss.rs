//! Power loss, simulated for real: the queue directory on a LazyFS mount, real clients
//! (Postfix's qmqp-source and qmqpc) loading qmqpd in each server mode (one process per
//! connection under tcpserver, a socket-activated listener, `--listen`) and for each commit
//! method qmqpd offers, and power cuts at random moments of the load. A power cut is what
//! a real one does: every process on the "machine" dies (the server's whole session is
//! stopped, then killed) and every write not yet fsynced is lost (`lazyfs::clear-cache`);
//! then the server starts again and the load goes on. At the end, everything a client heard `K`
//! for must be in `new/` (or `cur/`) complete and byte-exact, nothing in `new/` may be
//! short or unparsable, and what is left in `tmp/` must be cleaned by a later run.
//!
//! A negative control (a writer that renames into `new/` without fsyncing its file) must
//! fail the same check, so the check is shown to catch lost data; and `qmqp-queue deliver`
//! runs under the same power cuts: after each, every acknowledged message is delivered or
//! still in the queue (none is lost), and in the end each was delivered, at least once.
//!
//! LazyFS (FUSE) has no `O_TMPFILE` and passes directory operations straight through, so
//! the `linkat` commit path, the fsyncs of directories and the claims of `qmqp-queue
//! deliver` (renames into `cur/`) are cut in `ext4.rs` instead: the queue on a real ext4
//! whose disk is an image on LazyFS. docs/reliability.md says what each covers and what it
//! cannot.
//!
//! Repeat a run's random moments with the `QMQPD_FAULT_SEED` it printed.

mod common;
#[path = "powerloss/ext4.rs"]
mod ext4;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::lazyfs::{Crashed, LazyFs};
use common::rng::Rng;
use common::{
    InteropTool, TestQueue, clear_qmqpd_env, describe, free_port, interop_tool, qmqpc_bin,
    qmqpd_bin, require_tool, run_bounded, text,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Attempts of a run whose LazyFS crashed (see `Crashed`).
const LAZYFS_ATTEMPTS: usize = 3;
/// Cache of each LazyFS mount: what the load writes between two power cuts fits easily.
const CACHE_MB: u32 = 512;
/// Power cuts at random moments during the load of one run (one more follows the load).
const CUTS: usize = 3;
/// Random time between two power cuts, and from the last one to the end of the load.
const CUT_EVERY_MS: (u64, u64) = (1500, 3500);
/// qmqpc client threads of one run (each one message per connection, one after the other).
const QMQPC_CLIENTS: usize = 3;
/// Sessions of one qmqp-source run.
const SOURCE_SESSIONS: usize = 3;
/// Safety net for one client run or one launcher start: far longer than any takes.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// How long the processes of a power cut may take to die (LazyFS hangs otherwise).
const STOP_LIMIT: Duration = Duration::from_secs(30);
/// How long a server may take to listen after its start.
const START_LIMIT: Duration = Duration::from_secs(30);
/// Pause of a client whose server is down, so it does not spin.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// qmqp-source's recipient (numbered copies of it when a run has several).
const SOURCE_RECIPIENT: &str = "rcpt@example.net";

// ---------------------------------------------------------------------------------------
// The "machine": processes that die together in a power cut.

/// A program started in a session of its own (`setsid`), so that a power cut can kill it
/// with everything it started (qmqpd children of tcpserver, `--exec` commands of
/// qmqp-queue, which run in process groups of their own). Drop kills the session too.
struct Machine {
    child: Child,
    what: String,
    output: PathBuf,
    /// Set once the session was killed.
    off: bool,
}

impl Machine {
    /// Starts `program args` in a new session, its output in `output`.
    fn start(
        setsid: &Path,
        what: &str,
        output: PathBuf,
        program: &Path,
        args: &[String],
    ) -> Machine {
        let log = File::create(&output).expect("cannot create an output file");
        let mut cmd = Command::new(setsid);
        cmd.arg(program).args(args);
        let child = clear_qmqpd_env(&mut cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the output file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
        Machine {
            child,
            what: what.to_owned(),
            output,
            off: false,
        }
    }

    /// What the program printed so far.
    fn output_text(&self) -> String {
        std::fs::read(&self.output)
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    /// Kills every process of the session and waits (at most STOP_LIMIT) until none is
    /// left; false when some are still there (stuck in a request to a LazyFS that stopped
    /// answering). All are stopped (SIGSTOP) before any is killed, so that none sees
    /// another die: an `--exec` command reading a message from qmqp-queue would otherwise
    /// read the end of its pipe when qmqp-queue dies first, and finish with half a message,
    /// which no power cut does.
    fn power_off(&mut self) -> bool {
        self.freeze();
        let sid = self.sid();
        let deadline = Instant::now() + STOP_LIMIT;
        loop {
            let members = session_members(sid);
            for &(pid, _) in &members {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            // Reaps our own child (the others are reparented and reaped elsewhere).
            let reaped = !matches!(self.child.try_wait(), Ok(None));
            if members.is_empty() && reaped {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// `setsid` made the child a session leader: its pid is the session ID.
    fn sid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pid fits in i32")
    }

    /// Sends SIGSTOP to every process of the session, each once, without waiting for them
    /// to stop: from then on none of them does anything more in user space. One in a
    /// system call (an fsync, a write) stops when the call returns, before it can act on
    /// the result; until then the kernel carries the call on. `power_off` then kills them.
    fn stop_now(&mut self) {
        let sid = self.sid();
        let mut stopped = BTreeSet::new();
        // Again until no new member shows up (a child forked meanwhile).
        for _ in 0..200 {
            let new: Vec<i32> = session_members(sid)
                .into_iter()
                .map(|(pid, _)| pid)
                .filter(|pid| !stopped.contains(pid))
                .collect();
            if new.is_empty() {
                break;
            }
            for pid in new {
                let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
                stopped.insert(pid);
            }
        }
    }

    /// Stops (SIGSTOP) every process of the session, once, and waits until all have
    /// stopped (at most about a second).
    fn freeze(&mut self) {
        if self.off {
            return;
        }
        self.off = true;
        let sid = self.sid();
        for _ in 0..200 {
            let running: Vec<i32> = session_members(sid)
                .into_iter()
                .filter(|&(_, state)| state != 'T')
                .map(|(pid, _)| pid)
                .collect();
            if running.is_empty() {
                break;
            }
            for pid in running {
                let _ = kill(Pid::from_raw(pid), Signal::SIGSTOP);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if !self.power_off() {
            eprintln!("{}: processes of its session survived SIGKILL", self.what);
        }
    }
}

/// A power cut: every process of `machines` dies, then the data LazyFS holds unsynced
/// goes. Err when LazyFS failed: it crashed, or it stopped answering so that processes
/// hang in its requests (then it is killed, which ends them).
fn power_cut(fs: &mut LazyFs, machines: &mut [&mut Machine]) -> Result<(), Crashed> {
    let mut stuck = Vec::new();
    for machine in machines.iter_mut() {
        if !machine.power_off() {
            stuck.push(machine.what.clone());
        }
    }
    if !stuck.is_empty() {
        let why = fs.kill();
        for machine in machines.iter_mut() {
            machine.power_off();
        }
        return Err(Crashed(format!(
            "LazyFS stopped answering: {} still hung in its requests {STOP_LIMIT:?} after \
             SIGKILL; {why}",
            stuck.join(", ")
        )));
    }
    fs.clear_cache()
}

/// Live processes whose session is `sid`, with their state letter, from /proc/PID/stat:
/// not zombies, unless a zombie thread-group leader still has threads (stuck in the
/// kernel).
fn session_members(sid: i32) -> Vec<(i32, char)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp session ...": comm may hold spaces and parentheses.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let fields: Vec<&str> = after.split_whitespace().collect();
        let state = fields.first().and_then(|s| s.chars().next()).unwrap_or('?');
        let threads = std::fs::read_dir(format!("/proc/{pid}/task")).map_or(1, |d| d.count());
        let live = !matches!(state, 'Z' | 'X') || threads > 1;
        if live && fields.get(3).and_then(|s| s.parse::<i32>().ok()) == Some(sid) {
            pids.push((pid, state));
        }
    }
    pids
}

/// True when something listens on 127.0.0.1:`port` (from /proc/net/tcp).
fn is_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&want.as_str()) && fields.get(3) == Some(&"0A")
        })
    })
}

// ---------------------------------------------------------------------------------------
// Server modes and commit methods.

/// How qmqpd gets its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One qmqpd per connection, stdin/stdout, under ucspi-tcp's tcpserver.
    Tcpserver,
    /// One qmqpd serving a listening socket passed by systemd-socket-activate (Accept=no).
    Listener,
    /// `qmqpd --listen`.
    Listen,
}

/// The tools a mode needs, found once: None when one is missing (skipped, or a failure
/// under QMQPD_REQUIRE_INTEROP=1).
struct Tools {
    setsid: PathBuf,
    launcher: Option<PathBuf>,
    source: InteropTool,
}

impl Tools {
    fn find(mode: Mode) -> Option<Tools> {
        let setsid = require_tool("setsid")?;
        let launcher = match mode {
            Mode::Tcpserver => Some(require_tool("tcpserver")?),
            Mode::Listener => Some(require_tool("systemd-socket-activate")?),
            Mode::Listen => None,
        };
        let source = interop_tool("QMQPD_POSTFIX_ROOT", "usr/sbin/qmqp-source")?;
        Some(Tools {
            setsid,
            launcher,
            source,
        })
    }
}

/// Starts qmqpd in `mode` on a free loopback port and waits until it listens; retries with
/// another port when the launcher exits first (another process took the port).
fn start_server(
    tools: &Tools,
    mode: Mode,
    args: &[String],
    scratch: &Path,
    start: usize,
) -> (Machine, SocketAddr) {
    let mut last = String::new();
    for attempt in 0..5 {
        let port = free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let qmqpd = qmqpd_bin().display().to_string();
        let (program, argv): (PathBuf, Vec<String>) = match (mode, &tools.launcher) {
            (Mode::Tcpserver, Some(tcpserver)) => {
                // -c: more concurrent qmqpd than the clients ever open.
                let mut argv: Vec<String> = ["-R", "-H", "-l0", "-c", "100", "127.0.0.1"]
                    .map(String::from)
                    .to_vec();
                argv.push(port.to_string());
                argv.push(qmqpd);
                argv.extend_from_slice(args);
                (tcpserver.clone(), argv)
            }
            (Mode::Listener, Some(activate)) => {
                let mut argv = vec!["-l".to_owned(), addr.to_string(), qmqpd];
                argv.extend_from_slice(args);
                // Serve until the power cut: no max_use or max_idle exit in between.
                argv.extend(["-o", "max_use=1000000", "-o", "max_idle=0"].map(String::from));
                (activate.clone(), argv)
            }
            _ => {
                let mut argv = vec!["--listen".to_owned(), addr.to_string()];
                argv.extend_from_slice(args);
                (qmqpd_bin(), argv)
            }
        };
        let output = scratch.join(format!("server.{start}.{attempt}.out"));
        let mut server =
            Machine::start(&tools.setsid, &format!("{mode:?}"), output, &program, &argv);
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if is_listening(port) {
                return (server, addr);
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                last = format!("{status}: {}", server.output_text());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{mode:?} did not listen on {addr} within {START_LIMIT:?}:\n{}",
                server.output_text()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
    panic!("{mode:?} exited before listening, 5 times; last: {last}");
}

/// The commit methods to run: every value of `queue_commit_method` when `qmqpd -d` lists
/// the parameter (None: the parameter does not exist, only the tmp/ + rename path does).
fn commit_methods() -> Vec<Option<&'static str>> {
    let out = run_bounded(Command::new(qmqpd_bin()).arg("-d"), b"", RUN_LIMIT);
    assert!(out.status.success(), "qmqpd -d: {}", describe(&out));
    let listed = text(&out.stdout)
        .lines()
        .any(|l| l.split('=').next().map(str::trim) == Some("queue_commit_method"));
    if listed {
        vec![Some("auto"), Some("linkat"), Some("rename")]
    } else {
        vec![None]
    }
}

/// Whether the file system at `dir` can create an unnamed file (`O_TMPFILE`), which the
/// linkat commit path needs; the error when it cannot.
fn o_tmpfile_support(dir: &Path) -> Result<(), nix::Error> {
    use nix::fcntl::{OFlag, open};
    use nix::sys::stat::Mode as Perm;
    let fd = open(
        dir,
        OFlag::O_TMPFILE | OFlag::O_WRONLY,
        Perm::from_bits_truncate(0o600),
    )?;
    let _ = nix::unistd::close(fd);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The clients and their own record of what the server acknowledged.

/// One message a qmqpc client sent (regenerated from its token for the check).
#[derive(Debug, Clone)]
struct Sent {
    /// Unique per message; also its sender's local part.
    token: String,
    big: bool,
    recipients: usize,
    /// The queue ID from the server's `K`; None for any other outcome.
    queue_id: Option<String>,
}

impl Sent {
    fn sender(&self) -> Vec<u8> {
        format!("{}@example.org", self.token).into_bytes()
    }

    fn recipients(&self) -> Vec<Vec<u8>> {
        (0..self.recipients)
            .map(|i| format!("r{i}.{}@example.net", self.token).into_bytes())
            .collect()
    }

    /// The message: a few headers naming the token, then a 1 KiB or 1 MiB body of lines
    /// that differ from message to message.
    fn message(&self) -> Vec<u8> {
        let size = if self.big { 1 << 20 } else { 1 << 10 };
        let mut m = format!(
            "From: {token}@example.org\nTo: r0.{token}@example.net\n\
             Subject: power loss test {token}\nMessage-Id: <{token}@powerloss.example>\n\n",
            token = self.token
        )
        .into_bytes();
        let mut line = 0u64;
        while m.len() < size {
            m.extend_from_slice(
                format!("{} line {line:08}: {}\n", self.token, "x".repeat(40)).as_bytes(),
            );
            line += 1;
        }
        m
    }
}

/// One qmqp-source run: how many `K` it counted.
#[derive(Debug, Clone)]
struct SourceRun {
    sender: String,
    length: usize,
    recipients: usize,
    acked: usize,
}

impl SourceRun {
    /// The recipients qmqp-source sends: the address itself, or numbered copies of it.
    fn recipients(&self) -> Vec<Vec<u8>> {
        if self.recipients == 1 {
            return vec![SOURCE_RECIPIENT.as_bytes().to_vec()];
        }
        (0..self.recipients)
            .map(|i| format!("{i}{SOURCE_RECIPIENT}").into_bytes())
            .collect()
    }
}

/// What the clients share with the test: where the server is (None while the power is
/// off), when to stop, and their records.
struct Load {
    addr: Mutex<Option<SocketAddr>>,
    stop: AtomicBool,
    sent: Mutex<Vec<Sent>>,
    runs: Mutex<Vec<SourceRun>>,
}

impl Load {
    fn new() -> Arc<Load> {
        Arc::new(Load {
            addr: Mutex::new(None),
            stop: AtomicBool::new(false),
            sent: Mutex::new(Vec::new()),
            runs: Mutex::new(Vec::new()),
        })
    }

    fn set_addr(&self, addr: Option<SocketAddr>) {
        *self.addr.lock().unwrap() = addr;
    }

    fn addr(&self) -> Option<SocketAddr> {
        *self.addr.lock().unwrap()
    }
}

/// A qmqpc client: one message per connection until told to stop; 1 in 8 messages is
/// 1 MiB, 1 in 4 has 50 to 200 recipients.
fn run_qmqpc_client(load: Arc<Load>, tag: String, mut rng: Rng) {
    let mut n = 0;
    while !load.stop.load(Ordering::SeqCst) {
        let Some(addr) = load.addr() else {
            thread::sleep(RETRY_PAUSE);
            continue;
        };
        n += 1;
        let mut sent = Sent {
            token: format!("{tag}-{n}"),
            big: rng.range(0, 8) == 0,
            recipients: if rng.range(0, 4) == 0 {
                rng.range(50, 201) as usize
            } else {
                rng.range(1, 4) as usize
            },
            queue_id: None,
        };
        let mut cmd = Command::new(qmqpc_bin());
        cmd.arg("-s")
            .arg(addr.to_string())
            .arg("-f")
            .arg(String::from_utf8_lossy(&sent.sender()).into_owned())
            .arg("--");
        for rcpt in sent.recipients() {
            cmd.arg(String::from_utf8_lossy(&rcpt).into_owned());
        }
        let out = run_bounded(&mut cmd, &sent.message(), RUN_LIMIT);
        let reply = text(&out.stdout);
        if out.status.success() {
            let id = reply.trim().strip_prefix("KOk: queued as ");
            let id = id.unwrap_or_else(|| panic!("qmqpc exited 0 without a K: {}", describe(&out)));
            sent.queue_id = Some(id.to_owned());
        }
        let acked = sent.queue_id.is_some();
        load.sent.lock().unwrap().push(sent);
        if !acked {
            thread::sleep(RETRY_PAUSE);
        }
    }
}

/// A qmqp-source client: runs of 40 messages of 2000 bytes to 25 recipients, every
/// fourth run 4 messages of 1 MiB to 3 recipients, each run with a sender of its own. A
/// lost connection ends a run (qmqp-source gives up); its counter says how many `K` it got.
fn run_source_client(load: Arc<Load>, tool: &InteropTool, tag: String) {
    let mut run = 0;
    while !load.stop.load(Ordering::SeqCst) {
        let Some(addr) = load.addr() else {
            thread::sleep(RETRY_PAUSE);
            continue;
        };
        run += 1;
        let big = run % 4 == 0;
        let (count, length, recipients) = if big { (4, 1 << 20, 3) } else { (40, 2000, 25) };
        let sender = format!("{tag}-{run}@example.org");
        let out = run_bounded(
            tool.command()
                .arg("-c")
                .args(["-s", &SOURCE_SESSIONS.to_string()])
                .args(["-m", &count.to_string()])
                .args(["-l", &length.to_string()])
                .args(["-r", &recipients.to_string()])
                .args(["-f", &sender, "-t", SOURCE_RECIPIENT])
                .arg(addr.to_string()),
            b"",
            RUN_LIMIT,
        );
        // The counter: "1\r2\r3\r...", flushed after each K, then "\n" at a clean end.
        let acked = text(&out.stdout)
            .split(['\r', '\n'])
            .filter_map(|s| s.trim().parse::<usize>().ok())
            .max()
            .unwrap_or(0);
        if out.status.success() {
            assert_eq!(acked, count, "qmqp-source succeeded: {}", describe(&out));
        }
        load.runs.lock().unwrap().push(SourceRun {
            sender,
            length,
            recipients,
            acked,
        });
        if !out.status.success() {
            thread::sleep(RETRY_PAUSE);
        }
    }
}

/// The running client threads; Drop (also on a failure) stops them and waits for them.
struct Clients {
    load: Arc<Load>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Clients {
    /// Starts QMQPC_CLIENTS qmqpc loops and, with `source`, one qmqp-source loop.
    fn start(load: &Arc<Load>, source: Option<&InteropTool>, tag: &str, rng: &mut Rng) -> Clients {
        let mut threads = Vec::new();
        for i in 0..QMQPC_CLIENTS {
            let (load, tag, rng) = (Arc::clone(load), format!("{tag}c{i}"), rng.fork(i as u64));
            threads.push(thread::spawn(move || run_qmqpc_client(load, tag, rng)));
        }
        if let Some(tool) = source {
            let (load, tag) = (Arc::clone(load), format!("{tag}src"));
            let tool = InteropTool {
                path: tool.path.clone(),
                root: tool.root.clone(),
            };
            threads.push(thread::spawn(move || run_source_client(load, &tool, tag)));
        }
        Clients {
            load: Arc::clone(load),
            threads,
        }
    }

    /// Tells the clients to stop and waits for them (each finishes the run it is in).
    fn stop(&mut self) {
        self.load.stop.store(true, Ordering::SeqCst);
        for client in self.threads.drain(..) {
            let ok = client.join().is_ok();
            assert!(ok || thread::panicking(), "a client thread panicked");
        }
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------------------
// The check, against what is on the disk after the power cut.

/// What the check found.
#[derive(Debug, Default)]
struct Verdict {
    /// Everything that breaks the promise; empty when the queue kept it.
    problems: Vec<String>,
    /// qmqpc messages acknowledged with `K`, each found complete.
    acked: usize,
    /// qmqp-source messages acknowledged with `K` (counted per run).
    source_acked: usize,
    /// Files in new/ and cur/, all checked.
    files: usize,
    /// Of those, messages committed whose client never heard `K` (at-least-once).
    unacked_kept: usize,
    /// Leftovers in tmp/.
    tmp: Vec<PathBuf>,
}

/// A queue file's parts, or why it is not one.
struct Parsed {
    attributes: String,
    message: Vec<u8>,
    sender: Vec<u8>,
    recipients: Vec<Vec<u8>>,
}

/// Parses a queue file without panicking: a sequence of netstrings, attributes first.
fn parse_queue_file(bytes: &[u8]) -> Result<Parsed, String> {
    let mut parts = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let colon = rest
            .iter()
            .position(|&b| b == b':')
            .ok_or("a netstring without ':'")?;
        let len: usize = std::str::from_utf8(&rest[..colon])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                format!(
                    "a bad netstring length at byte {}",
                    bytes.len() - rest.len()
                )
            })?;
        let end = colon + 1 + len;
        if rest.get(end) != Some(&b',') {
            return Err(format!(
                "netstring {} of {len} bytes is cut short ({} bytes left)",
                parts.len() + 1,
                rest.len() - colon - 1
            ));
        }
        parts.push(rest[colon + 1..end].to_vec());
        rest = &rest[end + 1..];
    }
    let mut parts = parts.into_iter();
    let (Some(attributes), Some(message), Some(sender)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err("fewer than 3 netstrings".into());
    };
    let recipients: Vec<Vec<u8>> = parts.collect();
    let attributes = String::from_utf8(attributes).map_err(|_| "attributes not UTF-8")?;
    if !attributes.starts_with("qmqpd-queue 1\n") {
        return Err("attributes without the format line".into());
    }
    if recipients.is_empty() {
        return Err("no recipient".into());
    }
    Ok(Parsed {
        attributes,
        message,
        sender,
        recipients,
    })
}

impl Parsed {
    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    }

    /// The message without our Received: header, which must be exactly one (folded) header
    /// naming this queue ID; Err when it is not there.
    fn content(&self) -> Result<&[u8], String> {
        let id = self.attribute("queue_id").ok_or("no queue_id attribute")?;
        let first = self
            .message
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("no line")?;
        let second = self.message[first + 1..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| first + 1 + i)
            .ok_or("no second line")?;
        let header = String::from_utf8_lossy(&self.message[..=second]);
        let ours = header.starts_with("Received: from ")
            && header[first + 1..].starts_with('\t')
            && header.contains(&format!(" with QMQP id {id}; "));
        if !ours {
            return Err(format!("no Received: header of ours first: {header:?}"));
        }
        Ok(&self.message[second + 1..])
    }
}

/// Checks the queue under `queue` (on the disk, after the last power cut) against the
/// clients' records.
fn check_queue(queue: &Path, sent: &[Sent], runs: &[SourceRun]) -> Verdict {
    let mut v = Verdict::default();
    let by_sender: BTreeMap<Vec<u8>, &Sent> = sent.iter().map(|s| (s.sender(), s)).collect();
    let runs_by_sender: BTreeMap<&[u8], &SourceRun> =
        runs.iter().map(|r| (r.sender.as_bytes(), r)).collect();
    let mut found: BTreeMap<Vec<u8>, usize> = BTreeMap::new();
    // qmqp-source sends the same content in every message of a run.
    let mut run_content: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    for sub in ["new", "cur"] {
        for path in list(&queue.join(sub)) {
            v.files += 1;
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let bytes = std::fs::read(&path).unwrap_or_default();
            let q = match parse_queue_file(&bytes) {
                Ok(q) => q,
                Err(why) => {
                    v.problems.push(format!(
                        "{sub}/{name}: {} bytes, not a queue file: {why}",
                        bytes.len()
                    ));
                    continue;
                }
            };
            let content = match q.content() {
                Ok(c) => c,
                Err(why) => {
                    v.problems.push(format!("{sub}/{name}: {why}"));
                    continue;
                }
            };
            if q.attribute("queue_id")
                .is_none_or(|id| !name.starts_with(id))
            {
                v.problems.push(format!(
                    "{sub}/{name}: queue_id attribute {:?} does not name the file",
                    q.attribute("queue_id")
                ));
            }
            *found.entry(q.sender.clone()).or_default() += 1;
            if let Some(s) = by_sender.get(&q.sender) {
                if content != s.message().as_slice() || q.recipients != s.recipients() {
                    v.problems.push(format!(
                        "{sub}/{name}: message {} is not what was sent",
                        s.token
                    ));
                }
                if let Some(id) = &s.queue_id {
                    if q.attribute("queue_id") != Some(id.as_str()) {
                        v.problems.push(format!(
                            "{sub}/{name}: holds {} acknowledged as {id}",
                            s.token
                        ));
                    }
                } else {
                    v.unacked_kept += 1;
                }
            } else if let Some(r) = runs_by_sender.get(q.sender.as_slice()) {
                let head = format!("From: <{}>\nTo: <{SOURCE_RECIPIENT}>\nDate: ", r.sender);
                let same = run_content
                    .entry(q.sender.clone())
                    .or_insert_with(|| content.to_vec());
                if content.len() != r.length
                    || !content.starts_with(head.as_bytes())
                    || content.last() != Some(&b'\n')
                    || content != same.as_slice()
                    || q.recipients != r.recipients()
                {
                    v.problems.push(format!(
                        "{sub}/{name}: qmqp-source message of {} is not what was sent",
                        r.sender
                    ));
                }
            } else {
                v.problems.push(format!(
                    "{sub}/{name}: from {:?}, which no client sent",
                    text(&q.sender)
                ));
            }
        }
    }
    for s in sent {
        let n = found.get(&s.sender()).copied().unwrap_or(0);
        if let Some(id) = &s.queue_id {
            v.acked += 1;
            if n == 0 {
                v.problems.push(format!(
                    "{} acknowledged as {id} has no complete copy in new/ or cur/",
                    s.token
                ));
            }
        }
        if n > 1 {
            v.problems
                .push(format!("{} is in the queue {n} times", s.token));
        }
    }
    for r in runs {
        v.source_acked += r.acked;
        let n = found.get(r.sender.as_bytes()).copied().unwrap_or(0);
        if n < r.acked {
            v.problems.push(format!(
                "qmqp-source run {} got {} K, {n} messages are queued",
                r.sender, r.acked
            ));
        }
    }
    v.tmp = list(&queue.join("tmp"));
    v
}

/// Sorted entries of `dir` (none when it is missing).
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths
}

/// After the power comes back: points the test queue at `disk_queue`, the queue as the
/// disk holds it (for a queue directly on LazyFS its backing directory: LazyFS answers
/// `stat` from its own cache and would hide a changed mtime), ages the `tmp/` leftovers past
/// the 36 hours after which a run removes them, starts a listener (which removes stale
/// `tmp/` files at start), and asserts that they are gone.
fn assert_later_run_cleans_tmp(q: &TestQueue, disk_queue: &Path, leftovers: &[PathBuf]) {
    point_queue_at(q, disk_queue);
    let old = SystemTime::now() - Duration::from_secs(37 * 3600);
    for path in leftovers {
        File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(old))
            .unwrap_or_else(|e| panic!("cannot age tmp/ leftover {}: {e}", path.display()));
    }
    // A listener removes stale tmp/ files when it starts (the one-shot no longer scans
    // tmp/ per message); it must then still queue mail.
    let server = common::Server::start(q, &[]);
    let reply = server.send(
        b"Subject: after the power cuts\n\nbody\n",
        b"c@example.org",
        &[b"r@example.net"],
    );
    assert_eq!(
        reply.status,
        qmqpd::reply::Status::Ok,
        "qmqpd after the power cuts: {reply}\nlog:\n{}",
        q.log_text()
    );
    drop(server);
    let left = list(&disk_queue.join("tmp"));
    assert!(
        left.is_empty(),
        "tmp/ leftovers not cleaned by a later run: {left:?}"
    );
}

// ---------------------------------------------------------------------------------------
// The runs.

/// Where a run's queue lives and how its power is cut: directly on LazyFS (`LazyFs`), or
/// on an ext4 on a disk image on LazyFS (`ext4::Ext4Disk`).
trait Disk {
    /// The directory the queue is made in, while the power is on.
    fn mounted(&self) -> PathBuf;
    /// A scratch directory off the disk (logs, outputs).
    fn scratch(&self) -> PathBuf;
    /// A power cut: every process of `machines` dies and the unsynced data is gone; then,
    /// when `back_on`, the power comes back. Err when LazyFS failed (the run is void).
    fn power_cut(&mut self, machines: &mut [&mut Machine], back_on: bool) -> Result<(), Crashed>;
    /// With the power back on after a cut: the directory that `mounted` is, as the disk
    /// now holds it (what the machine sees after it starts again).
    fn recovered(&self) -> PathBuf;
    /// After the last cut: the directory that `mounted` was, as the disk holds it.
    fn durable(&mut self) -> PathBuf;
    /// Power cuts so far.
    fn cuts(&self) -> usize;
}

impl Disk for LazyFs {
    fn mounted(&self) -> PathBuf {
        self.mnt()
    }

    fn scratch(&self) -> PathBuf {
        LazyFs::scratch(self).to_path_buf()
    }

    fn power_cut(&mut self, machines: &mut [&mut Machine], _back_on: bool) -> Result<(), Crashed> {
        power_cut(self, machines)
    }

    /// The backing directory: LazyFS answers `stat` from its cache (see
    /// `assert_later_run_cleans_tmp`).
    fn recovered(&self) -> PathBuf {
        self.disk()
    }

    fn durable(&mut self) -> PathBuf {
        self.disk()
    }

    fn cuts(&self) -> usize {
        LazyFs::cuts(self)
    }
}

/// Points the queue directory of `q` (a symbolic link) at `disk_queue`.
fn point_queue_at(q: &TestQueue, disk_queue: &Path) {
    std::fs::remove_file(q.queue_dir()).expect("cannot remove the queue link");
    std::os::unix::fs::symlink(disk_queue, q.queue_dir())
        .expect("cannot link the queue to the disk");
}

/// A TestQueue whose queue directory is `queue/` in `dir` (on the disk under test).
fn queue_on(dir: &Path) -> TestQueue {
    let q = TestQueue::new();
    std::fs::create_dir_all(dir.join("queue")).expect("cannot create the queue on the disk");
    std::fs::remove_dir(q.queue_dir()).expect("cannot remove the test queue");
    std::os::unix::fs::symlink(dir.join("queue"), q.queue_dir()).expect("cannot link the queue");
    q
}

/// Runs `run` on a fresh LazyFS mount, again on a new one when LazyFS itself crashed (a
/// void run, not a verdict: see `Crashed`), at most LAZYFS_ATTEMPTS times. None when
/// LazyFS or FUSE is missing (skipped).
fn on_lazyfs(label: &str, run: impl FnMut(&mut LazyFs) -> Result<(), Crashed>) -> Option<()> {
    on_fresh(label, || LazyFs::mount(CACHE_MB), run)
}

/// Runs `run` on a fresh disk from `make`, again on a new one when LazyFS itself crashed,
/// at most LAZYFS_ATTEMPTS times. None when `make` skips.
fn on_fresh<D>(
    label: &str,
    mut make: impl FnMut() -> Option<D>,
    mut run: impl FnMut(&mut D) -> Result<(), Crashed>,
) -> Option<()> {
    let mut crashes = Vec::new();
    for attempt in 1..=LAZYFS_ATTEMPTS {
        let mut disk = make()?;
        match run(&mut disk) {
            Ok(()) => return Some(()),
            Err(Crashed(why)) => {
                eprintln!("{label}: attempt {attempt} void, LazyFS crashed: {why}");
                crashes.push(why);
            }
        }
    }
    panic!(
        "{label}: LazyFS crashed in all {LAZYFS_ATTEMPTS} attempts:\n{}",
        crashes.join("\n")
    );
}

/// The power-loss runs of one server mode: one for each commit method.
fn power_cuts_in_mode(mode: Mode) {
    let Some(tools) = Tools::find(mode) else {
        return;
    };
    for method in commit_methods() {
        let label = format!("{mode:?}, commit {}", method.unwrap_or("tmp/ + rename"));
        let done = on_lazyfs(&label, |fs| {
            let tmpfile = o_tmpfile_support(&fs.mnt());
            let label = match (method, &tmpfile) {
                (None, _) => format!("{mode:?}, commit tmp/ + rename"),
                (Some("auto"), Err(e)) => format!("{mode:?}, commit auto (tmp/ + rename: {e})"),
                (Some(m), _) => format!("{mode:?}, commit {m}"),
            };
            if let (Some("linkat"), Err(e)) = (method, &tmpfile) {
                // Without O_TMPFILE the linkat path cannot run on LazyFS at all: the ext4
                // on a LazyFS disk (ext4.rs) covers it.
                eprintln!("{label}: not run here: LazyFS has no O_TMPFILE ({e}); see ext4.rs");
                return Ok(());
            }
            power_cuts_once(fs, &tools, (mode, method), CUTS, &label).map(drop)
        });
        if done.is_none() {
            return;
        }
    }
}

/// One run: qmqpd in `mode` with commit `method` on `disk`, the load, `cuts` power cuts
/// during it and one after it, then the check. Returns the queue (its log) for the
/// caller's own checks.
fn power_cuts_once<D: Disk>(
    disk: &mut D,
    tools: &Tools,
    (mode, method): (Mode, Option<&str>),
    cuts: usize,
    label: &str,
) -> Result<TestQueue, Crashed> {
    let q = queue_on(&disk.mounted());
    let mut args = q.args();
    if let Some(m) = method {
        args.extend(["-o".to_owned(), format!("queue_commit_method={m}")]);
    }
    let scratch = disk.scratch();
    let mut rng = Rng::new();
    let load = Load::new();
    let (mut server, addr) = start_server(tools, mode, &args, &scratch, 0);
    load.set_addr(Some(addr));
    let started = Instant::now();
    let mut clients = Clients::start(&load, Some(&tools.source), &format!("{mode:?}"), &mut rng);
    for cut in 1..=cuts {
        thread::sleep(Duration::from_millis(
            rng.range(CUT_EVERY_MS.0, CUT_EVERY_MS.1 + 1),
        ));
        load.set_addr(None);
        disk.power_cut(&mut [&mut server], true)?;
        let (s, addr) = start_server(tools, mode, &args, &scratch, cut);
        server = s;
        load.set_addr(Some(addr));
    }
    thread::sleep(Duration::from_millis(
        rng.range(CUT_EVERY_MS.0, CUT_EVERY_MS.1 + 1),
    ));
    // The last cut falls on the clients' last messages; then they are waited for.
    load.stop.store(true, Ordering::SeqCst);
    load.set_addr(None);
    disk.power_cut(&mut [&mut server], false)?;
    clients.stop();
    let sent = load.sent.lock().unwrap().clone();
    let runs = load.runs.lock().unwrap().clone();
    let durable = disk.durable().join("queue");
    let v = check_queue(&durable, &sent, &runs);
    eprintln!(
        "{label}: {} power cuts in {:.1} s; {} qmqpc messages sent, {} acknowledged and \
         checked byte for byte; {} qmqp-source runs, {} acknowledged; {} files in new/ and \
         cur/ ({} committed without a K reaching the client); {} tmp/ leftovers",
        disk.cuts(),
        started.elapsed().as_secs_f64(),
        sent.len(),
        v.acked,
        runs.len(),
        v.source_acked,
        v.files,
        v.unacked_kept,
        v.tmp.len()
    );
    assert!(
        v.problems.is_empty(),
        "{label}: the queue broke its promise:\n{}\nlog:\n{}",
        v.problems.join("\n"),
        q.log_text()
    );
    assert!(
        v.acked > 0 && v.source_acked > 0,
        "{label}: the load got no K at all:\n{}",
        q.log_text()
    );
    assert_later_run_cleans_tmp(&q, &durable, &v.tmp);
    Ok(q)
}

#[test]
fn power_cuts_under_tcpserver_lose_no_acknowledged_message() {
    power_cuts_in_mode(Mode::Tcpserver);
}

#[test]
fn power_cuts_under_socket_activated_listener_lose_no_acknowledged_message() {
    power_cuts_in_mode(Mode::Listener);
}

#[test]
fn power_cuts_under_listen_lose_no_acknowledged_message() {
    power_cuts_in_mode(Mode::Listen);
}

/// Appends `payload` as a netstring.
fn put_netstring(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(format!("{}:", payload.len()).as_bytes());
    out.extend_from_slice(payload);
    out.push(b',');
}

/// Control message `i` of a negative control: its record (`K`'d as `CONTROL{i}`) and the
/// queue file a writer in the test puts into new/ for it. Even ones are to be synced.
fn control_file(i: usize) -> (Sent, Vec<u8>) {
    let synced = i.is_multiple_of(2);
    let s = Sent {
        token: format!("control{i}-{}", if synced { "synced" } else { "unsynced" }),
        big: false,
        recipients: 2,
        queue_id: Some(format!("CONTROL{i:02}")),
    };
    let id = s.queue_id.clone().expect("set above");
    let mut message =
        format!("Received: from c (c [127.0.0.1])\n\tby h (qmqpd) with QMQP id {id}; date\n")
            .into_bytes();
    message.extend_from_slice(&s.message());
    let mut bytes = Vec::new();
    put_netstring(
        &mut bytes,
        format!("qmqpd-queue 1\nqueue_id={id}\n").as_bytes(),
    );
    put_netstring(&mut bytes, &message);
    put_netstring(&mut bytes, &s.sender());
    for rcpt in s.recipients() {
        put_netstring(&mut bytes, &rcpt);
    }
    (s, bytes)
}

/// Asserts that the check of a negative control's queue `disk_queue` (after its power
/// cut) reports every control file written without its fsync, and only those.
fn assert_check_catches_unsynced(label: &str, disk_queue: &Path, sent: &[Sent]) {
    let v = check_queue(disk_queue, sent, &[]);
    let unsynced = sent
        .iter()
        .filter(|s| s.token.ends_with("-unsynced"))
        .count();
    eprintln!(
        "{label}: {unsynced} files committed without their fsync, {} with it; the check \
         reports:\n{}",
        sent.len() - unsynced,
        v.problems.join("\n")
    );
    let lost: BTreeSet<&str> = sent
        .iter()
        .filter(|s| s.token.ends_with("-unsynced"))
        .map(|s| s.queue_id.as_deref().expect("set above"))
        .collect();
    for id in &lost {
        assert!(
            v.problems.iter().any(|p| p.contains(&format!("new/{id}:"))),
            "{label}: the check missed the lost control file {id}: {:?}",
            v.problems
        );
    }
    assert!(
        v.problems.iter().all(|p| lost
            .iter()
            .any(|id| p.contains(&format!(" {id}")) || p.contains(&format!("/{id}:")))),
        "{label}: only the unsynced files are lost: {:?}",
        v.problems
    );
}

/// The negative control: a writer that renames into new/ before its data is on the disk
/// (it fsyncs the directory, not the file) loses every message it acknowledged, and the
/// check says so for each; the same writer with the fdatasync loses none.
#[test]
fn rename_before_fsync_loses_data_and_the_check_catches_it() {
    let Some(mut fs) = LazyFs::mount(64) else {
        return;
    };
    let queue = fs.mnt().join("queue");
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(queue.join(sub)).expect("cannot create the queue");
    }
    let mut sent = Vec::new();
    for i in 0..20 {
        let (s, bytes) = control_file(i);
        let id = s.queue_id.clone().expect("set by control_file");
        let tmp = queue.join("tmp").join(&id);
        std::fs::write(&tmp, &bytes).expect("cannot write a control file");
        if s.token.ends_with("-synced") {
            File::open(&tmp)
                .and_then(|f| f.sync_data())
                .expect("cannot fsync a control file");
        }
        std::fs::rename(&tmp, queue.join("new").join(&id)).expect("cannot rename a control file");
        File::open(queue.join("new"))
            .and_then(|d| d.sync_all())
            .expect("cannot fsync new/");
        sent.push(s);
    }
    // Before the power cut, everything reads back fine: only the cut tells them apart.
    let before = check_queue(&queue, &sent, &[]);
    assert!(
        before.problems.is_empty(),
        "before the cut: {:?}",
        before.problems
    );
    if let Err(Crashed(why)) = fs.clear_cache() {
        panic!("the negative control has no verdict: {why}");
    }
    assert_check_catches_unsynced("negative control (rename)", &fs.disk().join("queue"), &sent);
}

/// The queue IDs that the `--exec` command recorded as delivered (`ID.PID.delivered`).
fn delivered_ids(out_dir: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut ids: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for path in list(out_dir) {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if let Some(stem) = name.strip_suffix(".delivered") {
            let id = stem.split('.').next().unwrap_or_default().to_owned();
            ids.entry(id).or_default().push(path);
        }
    }
    ids
}

/// Queue IDs of the files in `dir` (a file is named ID.HOST).
fn queued_ids(dir: &Path) -> BTreeSet<String> {
    list(dir)
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()?
                .split('.')
                .next()
                .map(str::to_owned)
        })
        .collect()
}

/// `qmqp-queue deliver --exec` under power cuts while qmqpd --listen takes a load, the queue
/// directly on LazyFS: after every cut, every acknowledged message is delivered or still
/// in the queue, and no delivered message is back in new/ (directory operations pass
/// straight through LazyFS, so a claim is on the disk at once: only qmqp-queue itself
/// could put a delivered message back there); at the end a last `deliver --once` (taking
/// back the claims the cuts left in cur/) empties the queue, and every acknowledged
/// message was delivered, byte for byte, to all its recipients.
#[test]
fn power_cuts_during_deliver_neither_lose_nor_leave_delivered_messages_waiting() {
    let Some(tools) = Tools::find(Mode::Listen) else {
        return;
    };
    on_lazyfs("deliver", |fs| {
        let run = deliver_under_power_cuts(fs, &tools, CUTS, "deliver")?;
        assert!(
            run.back_in_new.is_empty(),
            "deliver: delivered and back in new/ after a power cut, on a disk where the \
             claim cannot be undone: {:?}",
            run.back_in_new
        );
        Ok(())
    });
}

/// Longest wait for the deliverer to catch up with the load before the quiet cut (it
/// is then cut anyway).
const DRAIN_LIMIT: Duration = Duration::from_secs(60);

/// What a run of `deliver_under_power_cuts` saw beyond its own checks.
struct DeliverRun {
    /// Delivered messages that a cut put back into new/ (their claim undone), in all cuts.
    back_in_new: Vec<String>,
}

/// One run of `qmqp-queue deliver --exec` under `cuts` power cuts at random moments of a
/// load taken by qmqpd --listen on `disk`, then one quiet cut (the load over, the
/// deliverer caught up), then a last `deliver --once --stale-time 0` with the power back.
///
/// qmqp-queue's documented promise under a power loss: a message may be delivered twice,
/// never lost. So after each cut, on the disk as it comes back, every acknowledged message
/// must be delivered (the command's own record, written off the disk before it exits 0) or
/// still in new/ or cur/. A message delivered since the last cut that is back in the queue
/// (its claim or its removal undone by the cut, or its removal not yet made) is allowed:
/// it is delivered again; each cut says how many came back. At the end every acknowledged
/// message was delivered, byte for byte, to all its recipients, and the queue is empty.
fn deliver_under_power_cuts<D: Disk>(
    disk: &mut D,
    tools: &Tools,
    cuts: usize,
    label: &str,
) -> Result<DeliverRun, Crashed> {
    let q = queue_on(&disk.mounted());
    let args = q.args();
    let scratch = disk.scratch();
    let out_dir = scratch.join("delivered");
    std::fs::create_dir(&out_dir).expect("cannot create the delivery directory");
    // The receiving side, off the cut disk: the envelope, then the message, renamed into
    // place once complete (so a record exists only for a whole message).
    let exec = format!(
        "f={}/\"$QUEUE_ID\".$$; printf '%s\\n' \"$SENDER\" \"$@\" > \"$f.env\" && \
         cat > \"$f.msg\" && mv \"$f.msg\" \"$f.delivered\"",
        out_dir.display()
    );
    let queue_bin = PathBuf::from(env!("CARGO_BIN_EXE_qmqp-queue"));
    let mut deliver_args = args.clone();
    deliver_args.extend(["deliver".to_owned(), "--exec".to_owned(), exec.clone()]);
    let start_deliverer = |n: usize| {
        let output = scratch.join(format!("deliver.{n}.out"));
        Machine::start(
            &tools.setsid,
            "qmqp-queue deliver",
            output,
            &queue_bin,
            &deliver_args,
        )
    };
    let mut rng = Rng::new();
    let load = Load::new();
    let (mut server, addr) = start_server(tools, Mode::Listen, &args, &scratch, 0);
    let mut deliverer = start_deliverer(0);
    load.set_addr(Some(addr));
    let started = Instant::now();
    let mut clients = Clients::start(&load, None, "deliver", &mut rng);
    let mut run = DeliverRun {
        back_in_new: Vec::new(),
    };
    let (mut came_back, mut claims) = (0, 0);
    // Delivery records of each message at the previous cut.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    // The queue as the disk holds it after the last cut.
    let mut disk_queue = PathBuf::new();
    for cut in 1..=cuts + 1 {
        let quiet = cut > cuts;
        thread::sleep(Duration::from_millis(
            rng.range(CUT_EVERY_MS.0, CUT_EVERY_MS.1 + 1),
        ));
        if quiet {
            // The load ends and the deliverer catches up; then the cut. The server commits
            // nothing any more, so on a journalling file system nothing forces the
            // deliverer's latest claims and removals to the disk: the cut undoes them.
            clients.stop();
            wait_for_deliveries(&load, &out_dir, &disk.mounted().join("queue"));
        }
        load.set_addr(None);
        disk.power_cut(&mut [&mut server, &mut deliverer], !quiet)?;
        let queue = if quiet {
            disk.durable()
        } else {
            disk.recovered()
        }
        .join("queue");
        disk_queue.clone_from(&queue);
        let delivered = delivered_ids(&out_dir);
        let (new, cur) = (
            queued_ids(&queue.join("new")),
            queued_ids(&queue.join("cur")),
        );
        let sent = load.sent.lock().unwrap().clone();
        let lost: Vec<&str> = sent
            .iter()
            .filter_map(|s| s.queue_id.as_deref())
            .filter(|id| !delivered.contains_key(*id) && !new.contains(*id) && !cur.contains(*id))
            .collect();
        assert!(
            lost.is_empty(),
            "{label}: after power cut {cut}, acknowledged messages neither delivered nor in \
             the queue: {lost:?}\nlog:\n{}",
            q.log_text()
        );
        let again = |ids: &BTreeSet<String>| -> Vec<String> {
            ids.iter()
                .filter(|id| {
                    delivered.get(*id).map_or(0, Vec::len) > seen.get(*id).copied().unwrap_or(0)
                })
                .cloned()
                .collect()
        };
        let (in_new, in_cur) = (again(&new), again(&cur));
        let undelivered_claims = cur.len() - in_cur.len();
        eprintln!(
            "{label}: power cut {cut}{}: {} messages delivered since the last cut came back \
             ({} into new/: the claim undone; {} in cur/: the removal undone or not yet \
             made); {undelivered_claims} claims of messages not delivered in cur/; {} in \
             new/",
            if quiet { " (quiet, the load over)" } else { "" },
            in_new.len() + in_cur.len(),
            in_new.len(),
            in_cur.len(),
            new.len()
        );
        came_back += in_new.len() + in_cur.len();
        claims += undelivered_claims;
        run.back_in_new.extend(in_new);
        seen = delivered
            .iter()
            .map(|(id, r)| (id.clone(), r.len()))
            .collect();
        if !quiet {
            let (s, addr) = start_server(tools, Mode::Listen, &args, &scratch, cut);
            server = s;
            deliverer = start_deliverer(cut);
            load.set_addr(Some(addr));
        }
    }
    // The power is back (no deliverer runs): a last run takes back every claim the dead
    // deliverers left and delivers what the cuts left in the queue.
    point_queue_at(&q, &disk_queue);
    let out = run_bounded(
        Command::new(&queue_bin).args(&args).args([
            "deliver",
            "--once",
            "--stale-time",
            "0",
            "--exec",
            &exec,
        ]),
        b"",
        RUN_LIMIT,
    );
    assert!(
        out.status.success(),
        "{label}: last deliver: {}\nlog:\n{}",
        describe(&out),
        q.log_text()
    );
    for sub in ["new", "cur", "failed"] {
        let left = list(&disk_queue.join(sub));
        assert!(
            left.is_empty(),
            "{label}: {sub}/ after the last deliver: {left:?}"
        );
    }
    let delivered = delivered_ids(&out_dir);
    let sent = load.sent.lock().unwrap().clone();
    let mut acked = 0;
    let mut twice = 0;
    for s in sent.iter().filter(|s| s.queue_id.is_some()) {
        acked += 1;
        let id = s.queue_id.as_deref().expect("filtered");
        let records = delivered.get(id).unwrap_or_else(|| {
            panic!(
                "{label}: {} acknowledged as {id} was never delivered",
                s.token
            )
        });
        let mut rcpts = BTreeSet::new();
        for path in records {
            let message = std::fs::read(path).expect("cannot read a delivered message");
            let want = s.message();
            assert!(
                message.starts_with(b"Received: from ") && message.ends_with(&want),
                "{label}: {} delivered as {} is not the message sent: {} bytes, the message \
                 {} plus our header; it starts {:?}",
                s.token,
                path.display(),
                message.len(),
                want.len(),
                text(&message[..message.len().min(300)])
            );
            let env = std::fs::read_to_string(path.with_extension("env"))
                .expect("cannot read a delivered envelope");
            let mut lines = env.lines();
            assert_eq!(lines.next().map(str::as_bytes), Some(s.sender().as_slice()));
            rcpts.extend(lines.map(|l| l.as_bytes().to_vec()));
        }
        let want: BTreeSet<Vec<u8>> = s.recipients().into_iter().collect();
        assert_eq!(
            rcpts, want,
            "{label}: {} was not delivered to its recipients",
            s.token
        );
        twice += usize::from(records.len() > 1);
    }
    eprintln!(
        "{label}: {} power cuts in {:.1} s; {} messages sent, {acked} acknowledged, none \
         lost, each delivered byte for byte; {came_back} delivered messages came back into \
         the queue at the cuts ({} into new/), and {claims} claims of undelivered messages \
         were in cur/; {twice} messages were delivered more than once (at least once, as \
         promised)",
        disk.cuts(),
        started.elapsed().as_secs_f64(),
        sent.len(),
        run.back_in_new.len()
    );
    assert!(
        acked > 0,
        "{label}: the load got no K at all:\n{}",
        q.log_text()
    );
    Ok(run)
}

/// Waits (at most DRAIN_LIMIT) until new/ in `queue` is empty and every message the load
/// got a `K` for was delivered or is claimed in cur/ (by a deliverer a cut killed: it is
/// taken back only when stale).
fn wait_for_deliveries(load: &Load, out_dir: &Path, queue: &Path) {
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline {
        let delivered = delivered_ids(out_dir);
        let cur = queued_ids(&queue.join("cur"));
        let caught_up = list(&queue.join("new")).is_empty()
            && load
                .sent
                .lock()
                .unwrap()
                .iter()
                .filter_map(|s| s.queue_id.as_deref())
                .all(|id| delivered.contains_key(id) || cur.contains(id));
        if caught_up {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("the deliverer did not catch up within {DRAIN_LIMIT:?}: cut anyway");
}
