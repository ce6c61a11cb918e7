//! Helpers shared by the integration tests: the built binaries, a temporary queue with its
//! qmqpd arguments, a qmqpd listening on loopback, bounded child processes, and finding the
//! real tools (Postfix, nullmailer, ucspi-tcp, xinetd…) that the interop tests drive.
//!
//! A missing tool skips the test with a reason on stderr, or fails it when
//! `QMQPD_REQUIRE_INTEROP=1` (as `.ci/run` sets).
#![allow(dead_code)]

pub mod haproxy;
pub mod lazydisk;
pub mod lazyfs;
pub mod postfix;
pub mod rng;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// How long a test waits for qmqpd to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);
/// How often readiness and child exit are polled.
const POLL: Duration = Duration::from_millis(20);
/// Read/write timeout of the test client's connections: a safety net, never expected to fire.
const IO_LIMIT: Duration = Duration::from_secs(120);

/// The built qmqpd.
pub fn qmqpd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qmqpd"))
}

/// The built qmqpc.
pub fn qmqpc_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qmqpc"))
}

/// The name of the user running the tests (what `mail_owner` must be so qmqpd keeps it).
pub fn current_user() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .expect("cannot look up the current user")
        .unwrap_or_else(|| panic!("uid {uid} has no passwd entry"))
        .name
}

/// A temporary queue + config for one test.
pub struct TestQueue {
    /// dir/queue is the queue_directory, dir/maillog the log, dir/etc the config directory
    /// (an empty main.cf).
    pub dir: tempfile::TempDir,
}

impl TestQueue {
    /// Creates the temporary directory with `etc/main.cf` (empty) and an empty `queue/`.
    pub fn new() -> TestQueue {
        let dir = tempfile::Builder::new()
            .prefix("qmqpd-test.")
            .tempdir()
            .expect("cannot create a temporary directory");
        std::fs::create_dir(dir.path().join("etc")).expect("cannot create etc/");
        // An empty main.cf: all defaults, whether or not qmqpd requires the file under -c.
        std::fs::write(dir.path().join("etc/main.cf"), b"").expect("cannot create main.cf");
        // An empty main.cf: all defaults (a missing file named by -c is an error).
        std::fs::write(dir.path().join("etc/main.cf"), b"").expect("cannot create main.cf");
        std::fs::create_dir(dir.path().join("queue")).expect("cannot create queue/");
        TestQueue { dir }
    }

    /// The queue_directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    /// The configuration directory (an empty main.cf: all defaults).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// The maillog_file.
    pub fn maillog(&self) -> PathBuf {
        self.dir.path().join("maillog")
    }

    /// Contents of maillog ("" if none).
    pub fn log_text(&self) -> String {
        std::fs::read(self.maillog())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// qmqpd arguments: -c <dir/etc>, -o queue_directory=.., -o maillog_file=..,
    /// -o mail_owner=<current user>, -o qmqpd_error_delay=0, -o qmqpd_peername_lookup=no.
    pub fn args(&self) -> Vec<String> {
        vec![
            "-c".into(),
            self.config_dir().display().to_string(),
            "-o".into(),
            format!("queue_directory={}", self.queue_dir().display()),
            "-o".into(),
            format!("maillog_file={}", self.maillog().display()),
            "-o".into(),
            format!("mail_owner={}", current_user()),
            "-o".into(),
            "qmqpd_error_delay=0".into(),
            // Client names come from DNS only in the tests about names.
            "-o".into(),
            "qmqpd_peername_lookup=no".into(),
        ]
    }

    /// `args()` without `-o maillog_file=...`: qmqpd then logs to syslog, or to stderr
    /// where that is allowed.
    pub fn args_without_maillog(&self) -> Vec<String> {
        let mut args = self.args();
        let at = args
            .iter()
            .position(|a| a.starts_with("maillog_file="))
            .expect("args() sets maillog_file");
        args.drain(at - 1..=at);
        args
    }

    /// Sorted entries of queue/<sub> ("new", "tmp", "cur"); empty if missing.
    pub fn files(&self, sub: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(self.queue_dir().join(sub)) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("cannot read a queue directory entry").path())
            .collect();
        files.sort();
        files
    }
}

/// Removes from `cmd`'s environment the variables that would change qmqpd's mode or
/// configuration behind a test's back: LISTEN_* (systemd sockets), MAIL_CONFIG, and a
/// launcher's client name.
pub fn clear_qmqpd_env(cmd: &mut Command) -> &mut Command {
    cmd.env_remove("LISTEN_FDS")
        .env_remove("LISTEN_PID")
        .env_remove("MAIL_CONFIG")
        .env_remove("TCPREMOTEHOST")
        .env_remove("TCP6REMOTEHOST")
}

/// qmqpd in stdin mode with the queue's arguments and `extra`, and none of the variables
/// `clear_qmqpd_env` removes; the caller says who the client is (or leaves it unknown).
pub fn bare_stdin_qmqpd(q: &TestQueue, extra: &[&str]) -> Command {
    let mut cmd = Command::new(qmqpd_bin());
    cmd.args(q.args()).args(extra);
    clear_qmqpd_env(&mut cmd);
    cmd
}

/// qmqpd in stdin mode as tcpserver starts it for a client at 127.0.0.1:40000: the queue's
/// arguments, `extra`, the UCSPI variables, and none of the variables that would change the
/// mode or the configuration (LISTEN_*, MAIL_CONFIG, a client name).
pub fn stdin_qmqpd(q: &TestQueue, extra: &[&str]) -> Command {
    let mut cmd = bare_stdin_qmqpd(q, extra);
    cmd.env("PROTO", "TCP")
        .env("TCPREMOTEIP", "127.0.0.1")
        .env("TCPREMOTEPORT", "40000");
    cmd
}

/// The QMQP request bytes (wraps client::encode_request).
pub fn request(message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> Vec<u8> {
    qmqpd::client::encode_request(message, sender, recipients)
}

/// Splits a sequence of netstrings (a queue file, a request body) into their payloads;
/// panics on anything else.
pub fn split_netstrings(mut bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = Vec::new();
    while !bytes.is_empty() {
        let colon = bytes
            .iter()
            .position(|&b| b == b':')
            .expect("netstring without ':'");
        let len: usize = std::str::from_utf8(&bytes[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .expect("netstring with a bad length");
        let end = colon + 1 + len;
        assert_eq!(bytes.get(end), Some(&b','), "netstring without ','");
        parts.push(bytes[colon + 1..end].to_vec());
        bytes = &bytes[end + 1..];
    }
    parts
}

/// A queue file split into its parts (docs/queue-format.md).
#[derive(Debug)]
pub struct QueueFile {
    /// The attributes netstring, "qmqpd-queue 1\n" then name=value lines.
    pub attributes: String,
    pub message: Vec<u8>,
    pub sender: Vec<u8>,
    pub recipients: Vec<Vec<u8>>,
}

impl QueueFile {
    /// Reads and splits a queue file; panics when it is not attributes, message, sender and
    /// at least one recipient.
    pub fn read(path: &Path) -> QueueFile {
        let bytes = std::fs::read(path)
            .unwrap_or_else(|e| panic!("cannot read queue file {}: {e}", path.display()));
        let mut parts = split_netstrings(&bytes).into_iter();
        let (Some(attributes), Some(message), Some(sender)) =
            (parts.next(), parts.next(), parts.next())
        else {
            panic!("queue file {} has fewer than 3 netstrings", path.display());
        };
        let recipients: Vec<Vec<u8>> = parts.collect();
        assert!(
            !recipients.is_empty(),
            "queue file {} has no recipient",
            path.display()
        );
        QueueFile {
            attributes: String::from_utf8(attributes).expect("attributes are not UTF-8"),
            message,
            sender,
            recipients,
        }
    }

    /// The value of attribute `name`, if present.
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    }
}

/// A free TCP port on 127.0.0.1 (bound, read and released: another process may take it,
/// which `Server::start` survives by retrying).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("cannot bind 127.0.0.1:0")
        .port()
}

/// A qmqpd in --listen mode on a free loopback port; Drop kills and reaps it.
pub struct Server {
    pub addr: SocketAddr,
    child: Child,
}

impl Server {
    /// Start `qmqpd --listen 127.0.0.1:PORT <q.args()> <extra>`: see `start_at`.
    pub fn start(q: &TestQueue, extra: &[&str]) -> Server {
        Server::start_at(q, IpAddr::from([127, 0, 0, 1]), extra).expect("127.0.0.1 is always there")
    }

    /// Start `qmqpd --listen [IP]:PORT <q.args()> <extra>` on a free port of `ip` (a loopback
    /// address) and wait (at most 10 s, polling every 20 ms) until its log says it listens.
    /// Retries with a new port up to 5 times if the child exits early (another process may
    /// have taken the port). None, with the reason on stderr, when this machine cannot bind
    /// `ip` at all (no IPv6 loopback).
    pub fn start_at(q: &TestQueue, ip: IpAddr, extra: &[&str]) -> Option<Server> {
        Server::start_with_env(q, ip, extra, &[])
    }

    /// `start_at`, with these variables added to qmqpd's environment.
    pub fn start_with_env(
        q: &TestQueue,
        ip: IpAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Option<Server> {
        let mut last_exit = None;
        for _attempt in 0..5 {
            let addr = match TcpListener::bind(SocketAddr::new(ip, 0)).and_then(|l| l.local_addr())
            {
                Ok(addr) => addr,
                Err(e) => {
                    eprintln!("skipped: cannot bind {ip}: {e}");
                    return None;
                }
            };
            match Server::try_start_on(q, addr, extra, env) {
                Ok(server) => return Some(server),
                Err(status) => last_exit = Some(status),
            }
        }
        panic!(
            "qmqpd exited before listening, 5 times (last: {last_exit:?}); log:\n{}",
            q.log_text()
        );
    }

    /// Start `qmqpd --listen ADDR <q.args()> <extra>` on exactly `addr` (a port a peer
    /// forces, such as QMQP's 628) and wait until it listens; panics when it exits first.
    pub fn start_on(q: &TestQueue, addr: SocketAddr, extra: &[&str]) -> Server {
        Server::try_start_on(q, addr, extra, &[]).unwrap_or_else(|status| {
            panic!(
                "qmqpd exited ({status}) before listening on {addr}; log:\n{}",
                q.log_text()
            )
        })
    }

    /// Starts the server on `addr` and waits (at most 10 s, polling every 20 ms) until its
    /// log says it listens; its exit status when it exits first.
    fn try_start_on(
        q: &TestQueue,
        addr: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, ExitStatus> {
        let mut child = Command::new(qmqpd_bin())
            .arg("--listen")
            .arg(addr.to_string())
            .args(q.args())
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start qmqpd");
        let ready = format!("listening on {addr}");
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = child.try_wait().expect("cannot wait for qmqpd") {
                return Err(status);
            }
            // The log line, not a probe connection, so the server's log stays clean.
            if q.log_text().contains(&ready) {
                return Ok(Server { addr, child });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "qmqpd did not listen on {addr} within {START_LIMIT:?}; log:\n{}",
                    q.log_text()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// The server's process ID (for /proc/PID/status and signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Entries of /proc/PID/<what> ("fd", "task"): the server's open files or threads.
    pub fn proc_count(&self, what: &str) -> usize {
        std::fs::read_dir(format!("/proc/{}/{what}", self.pid()))
            .expect("cannot read the server's /proc entry")
            .count()
    }

    /// A field of /proc/PID/status in KiB ("VmRSS:", "VmHWM:"), read while the server runs.
    pub fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("cannot read the server's /proc status");
        let line = status
            .lines()
            .find(|l| l.starts_with(field))
            .unwrap_or_else(|| panic!("no {field} in /proc status"));
        line.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("bad {field} line: {line}"))
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits at most `limit` for the server to exit by itself.
    pub fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        wait_bounded(&mut self.child, limit)
    }

    /// "127.0.0.1:PORT", for clients' command lines.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Sends one request with the library client and returns the reply; panics when there
    /// is no valid reply.
    pub fn send(
        &self,
        message: &[u8],
        sender: &[u8],
        recipients: &[&[u8]],
    ) -> qmqpd::client::Reply {
        let mut stream = self.connect();
        let len = u64::try_from(message.len()).expect("message length");
        qmqpd::client::send(
            &mut stream,
            &mut std::io::Cursor::new(message),
            len,
            sender,
            recipients,
        )
        .unwrap_or_else(|e| panic!("no valid reply from {}: {e}", self.addr))
    }

    /// Writes raw bytes, shuts down the write side and returns everything the server sent
    /// until it closed (for malformed requests).
    pub fn exchange(&self, bytes: &[u8]) -> Vec<u8> {
        let mut stream = self.connect();
        stream.write_all(bytes).expect("cannot write the request");
        let _ = stream.shutdown(std::net::Shutdown::Write);
        read_all(&mut stream)
    }

    /// A connection to the server with the tests' safety timeouts.
    pub fn connect(&self) -> TcpStream {
        connect(self.addr)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A connection to `addr` with the tests' safety timeouts (never expected to fire).
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("cannot connect to {addr}: {e}"));
    stream.set_read_timeout(Some(IO_LIMIT)).expect("timeout");
    stream.set_write_timeout(Some(IO_LIMIT)).expect("timeout");
    stream
}

/// A connection to the IPv4 `addr` from the loopback address `from`, with the tests'
/// safety timeouts.
pub fn connect_from(from: std::net::Ipv4Addr, addr: SocketAddr) -> TcpStream {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let SocketAddr::V4(to) = addr else {
        panic!("{addr} is not an IPv4 address");
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &SockaddrIn::from(std::net::SocketAddrV4::new(from, 0)),
    )
    .unwrap_or_else(|e| panic!("cannot bind {from}: {e}"));
    connect(fd.as_raw_fd(), &SockaddrIn::from(to))
        .unwrap_or_else(|e| panic!("cannot connect to {addr} from {from}: {e}"));
    let stream = TcpStream::from(fd);
    stream.set_read_timeout(Some(IO_LIMIT)).expect("timeout");
    stream.set_write_timeout(Some(IO_LIMIT)).expect("timeout");
    stream
}

/// Every byte the server sends until it closes (an error ends the reading too).
pub fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    reply
}

/// Sends `bytes` on `stream` (without half-closing) and returns the reply's payload, the
/// status letter and text ("" when the server closed without a reply).
pub fn send_on(mut stream: TcpStream, bytes: &[u8]) -> String {
    stream.write_all(bytes).expect("cannot write the request");
    reply_payload(&read_all(&mut stream))
}

/// The payload of the one reply netstring in `bytes`, "" when there is none.
pub fn reply_payload(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return String::new();
    }
    let parts = split_netstrings(bytes);
    assert_eq!(parts.len(), 1, "one reply: {}", text(bytes));
    text(&parts[0])
}

/// Connects to `addr`, sends `request`, half-closes and returns what arrived until the
/// server closed, together with the error that ended the reading, if any (a reset).
pub fn exchange_until_error(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, Option<std::io::Error>) {
    let mut stream = connect(addr);
    // The server may answer without reading (a configuration error): a failed write is
    // not the point here, what the client reads is.
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = Vec::new();
    let error = stream.read_to_end(&mut reply).err();
    (reply, error)
}

/// Runs `cmd` with `stdin` as its input and captures stdout and stderr; kills it and
/// panics if it has not exited after `limit` (a safety net: tests never rely on it).
pub fn run_bounded(cmd: &mut Command, stdin: &[u8], limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let input = stdin.to_vec();
    let mut child_in = child.stdin.take().expect("stdin");
    let writer = thread::spawn(move || {
        // The child may exit without reading everything: a broken pipe is fine.
        let _ = child_in.write_all(&input);
    });
    let output = collect_bounded(cmd, child, limit);
    let _ = writer.join();
    output
}

/// Like `run_bounded`, with stdin taken from `stdin` (a file, /dev/null…).
pub fn run_bounded_from(cmd: &mut Command, stdin: Stdio, limit: Duration) -> Output {
    let child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    collect_bounded(cmd, child, limit)
}

/// Reads the child's stdout and stderr while waiting for it at most `limit`.
fn collect_bounded(cmd: &Command, mut child: Child, limit: Duration) -> Output {
    let mut child_out = child.stdout.take().expect("stdout");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = child_out.read_to_end(&mut buf);
        buf
    });
    let mut child_err = child.stderr.take().expect("stderr");
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = child_err.read_to_end(&mut buf);
        buf
    });
    let status = wait_bounded(&mut child, limit)
        .unwrap_or_else(|| panic!("{cmd:?} still running after {limit:?}: killed"));
    Output {
        status,
        stdout: out_reader.join().expect("stdout reader"),
        stderr: err_reader.join().expect("stderr reader"),
    }
}

/// Waits for `child` at most `limit`; on timeout kills and reaps it and returns None.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("cannot wait for a child") {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(POLL);
    }
}

/// How long `wait_until` waits for a condition: generous, for a slow and busy machine.
pub const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Polls `done` (every 20 ms) until it holds; panics naming `why` after `WAIT_LIMIT`.
pub fn wait_until(why: &str, done: impl FnMut() -> bool) {
    wait_until_within(why, WAIT_LIMIT, done);
}

/// `wait_until` with its own limit.
pub fn wait_until_within(why: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "still waiting after {limit:?} for {why}"
        );
        thread::sleep(POLL);
    }
}

/// True when `.ci/run` asked for every interop tool to be present.
fn interop_required() -> bool {
    std::env::var_os("QMQPD_REQUIRE_INTEROP").is_some_and(|v| v == "1")
}

/// Skips (None, reason on stderr) or, under QMQPD_REQUIRE_INTEROP=1, fails the test.
pub fn skip_or_fail<T>(why: &str) -> Option<T> {
    if interop_required() {
        panic!("interop tool missing and QMQPD_REQUIRE_INTEROP=1: {why}");
    }
    eprintln!("skipped: {why}");
    None
}

/// A tool from an unpacked .deb (or installed normally).
pub struct InteropTool {
    /// The executable.
    pub path: PathBuf,
    /// The root the package was unpacked into ("/" when installed normally).
    pub root: PathBuf,
}

impl InteropTool {
    /// A command for the tool with LD_LIBRARY_PATH=<root>/usr/lib/postfix, where Postfix
    /// keeps its private shared libraries.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.path);
        cmd.env("LD_LIBRARY_PATH", self.root.join("usr/lib/postfix"));
        cmd
    }
}

/// Find an interop tool: `<$env_root>/<rel>` (an unpacked .deb root named by
/// QMQPD_POSTFIX_ROOT / QMQPD_NULLMAILER_ROOT), else `/<rel>`. When missing: panics if
/// QMQPD_REQUIRE_INTEROP=1, else prints "skipped: <why>" to stderr and returns None.
pub fn interop_tool(env_root: &str, rel: &str) -> Option<InteropTool> {
    let why_root = match std::env::var_os(env_root) {
        Some(root) => {
            let root = PathBuf::from(root);
            let path = root.join(rel);
            if is_executable(&path) {
                return Some(InteropTool { path, root });
            }
            format!("{env_root}={} holds no {rel}", root.display())
        }
        None => format!("{env_root} is not set"),
    };
    let path = Path::new("/").join(rel);
    if is_executable(&path) {
        return Some(InteropTool {
            path,
            root: PathBuf::from("/"),
        });
    }
    skip_or_fail(&format!(
        "{why_root} and /{rel} is not installed (.ci/run fetches it)"
    ))
}

/// A tool built by a `.ci/setup` script, named by the environment variable `var` (such as
/// QMQPD_QMAIL_QMQPC), with the same skip/fail rule as `interop_tool`.
pub fn built_tool(var: &str) -> Option<PathBuf> {
    match std::env::var_os(var).map(PathBuf::from) {
        Some(path) if is_executable(&path) => Some(path),
        Some(path) => skip_or_fail(&format!("{var}={} is not executable", path.display())),
        None => skip_or_fail(&format!("{var} is not set (.ci/setup builds it)")),
    }
}

/// A plain tool (tcpserver, xinetd, strace…) from PATH or the sbin directories, with the
/// same skip/fail rule as `interop_tool`.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    let found = std::env::split_paths(&path_var)
        .chain(sbin)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p));
    match found {
        Some(path) => Some(path),
        None => skip_or_fail(&format!("{name} is not installed (.ci/run installs it)")),
    }
}

/// True for a regular file with an execute bit.
fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Lossy text of process output, for assertion messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Formats an `Output` for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    )
}

/// How many unnamed (`O_TMPFILE`) files in `tmp_dir` process `pid` has open: their
/// /proc/PID/fd links read `TMP_DIR/#INODE (deleted)`.
pub fn unnamed_files(pid: u32, tmp_dir: &Path) -> usize {
    let prefix = format!("{}/#", tmp_dir.display());
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| {
                    let target = target.to_string_lossy();
                    target.starts_with(&prefix) && target.ends_with(" (deleted)")
                })
                .count()
        })
        .unwrap_or(0)
}

/// Queue files being written for process `pid`: named ones in `tmp/` (any process's) plus
/// its unnamed ones (`queue_commit_method = linkat`).
pub fn files_being_written(q: &TestQueue, pid: u32) -> usize {
    q.files("tmp").len() + unnamed_files(pid, &q.queue_dir().join("tmp"))
}
