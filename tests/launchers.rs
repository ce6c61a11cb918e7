//! qmqpd under the real launchers its users run (issue 3):
//! `systemd-socket-activate` (`-a --inetd`, `-a --fdname=connection`, and listener mode with
//! `max_use`, `max_idle`, two sockets, sd_notify and SIGTERM), ucspi-tcp's `tcpserver` (with
//! `tcprules`), `xinetd` with a generated copy of `xinetd/qmqpd`, `--listen`, and the switch
//! to `mail_owner` when started as root. Every test sends real messages with `qmqpc` and,
//! where it is installed, Postfix's `qmqp-source`, and checks the queue files in `new/`.
//!
//! Launchers listen on free loopback ports only; every process a test starts is stopped and
//! reaped by a guard. A missing launcher skips its test with the reason, or fails it under
//! QMQPD_REQUIRE_INTEROP=1.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use common::{
    InteropTool, QueueFile, Server, TestQueue, current_user, describe, interop_tool, qmqpc_bin,
    qmqpd_bin, require_tool, run_bounded, split_netstrings, text, wait_bounded,
};

/// Safety net for one client run or one launcher's exit: far longer than any of them takes.
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// How long a launcher may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);
/// How long a stopped launcher may take to exit before it is killed.
const STOP_LIMIT: Duration = Duration::from_secs(10);
/// How often readiness, logs and exits are polled.
const POLL: Duration = Duration::from_millis(20);
/// Read/write timeout of raw test connections: a safety net, never expected to fire.
const IO_LIMIT: Duration = Duration::from_secs(120);
/// Attempts with fresh ports when a launcher exits before listening (its port was taken).
const START_ATTEMPTS: usize = 5;

const SENDER: &str = "sender@example.org";
const RECIPIENT: &str = "rcpt@example.net";
const MESSAGE: &[u8] = b"From: sender@example.org\nSubject: launcher test\n\nbody\n";

/// A launcher (or the qmqpd it became) running in the background, its stdout and stderr in
/// a file. Drop stops it with SIGTERM, then SIGKILL, and reaps it.
struct Launcher {
    child: Child,
    what: String,
    output: PathBuf,
}

impl Launcher {
    /// Starts the command that `make` builds for the given fresh TCP addresses (one per
    /// entry of `v6`: false for 127.0.0.1, true for ::1) and waits until all of them listen.
    /// When the launcher exits first (another process took a port), retries with new ones.
    fn start(
        dir: &Path,
        what: &str,
        v6: &[bool],
        make: impl FnMut(&[SocketAddr]) -> Command,
    ) -> (Launcher, Vec<SocketAddr>) {
        Launcher::start_on(dir, what, Transport::Tcp, v6, make)
    }

    /// Like `start`, for TCP or UDP addresses.
    fn start_on(
        dir: &Path,
        what: &str,
        transport: Transport,
        v6: &[bool],
        mut make: impl FnMut(&[SocketAddr]) -> Command,
    ) -> (Launcher, Vec<SocketAddr>) {
        let mut last = String::new();
        for attempt in 0..START_ATTEMPTS {
            let addrs: Vec<SocketAddr> = v6.iter().map(|&v6| free_addr(transport, v6)).collect();
            let output = dir.join(format!("{what}.{attempt}.out"));
            let file = File::create(&output).unwrap();
            let mut cmd = make(&addrs);
            let child = cmd
                .stdin(Stdio::null())
                .stdout(file.try_clone().unwrap())
                .stderr(file)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
            let mut launcher = Launcher {
                child,
                what: what.to_owned(),
                output,
            };
            let deadline = Instant::now() + START_LIMIT;
            loop {
                if let Some(status) = launcher.child.try_wait().unwrap() {
                    last = format!("{status}: {}", launcher.output_text());
                    break;
                }
                if addrs.iter().all(|&a| is_listening(transport, a)) {
                    return (launcher, addrs);
                }
                assert!(
                    Instant::now() < deadline,
                    "{what} did not listen on {addrs:?} within {START_LIMIT:?}:\n{}",
                    launcher.output_text()
                );
                thread::sleep(POLL);
            }
        }
        panic!("{what} exited before listening, {START_ATTEMPTS} times; last: {last}");
    }

    /// What the launcher printed so far.
    fn output_text(&self) -> String {
        std::fs::read(&self.output)
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap())
    }

    /// Waits for the launcher to exit by itself (at most RUN_LIMIT).
    fn wait_exit(&mut self) -> ExitStatus {
        match wait_bounded(&mut self.child, RUN_LIMIT) {
            Some(status) => status,
            None => panic!(
                "{} still running after {RUN_LIMIT:?}: killed\n{}",
                self.what,
                self.output_text()
            ),
        }
    }
}

impl Drop for Launcher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = kill(self.pid(), Signal::SIGTERM);
            // Kills and reaps it if SIGTERM was not enough.
            let _ = wait_bounded(&mut self.child, STOP_LIMIT);
        }
    }
}

/// Which kind of socket a launcher listens on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

/// A free port on 127.0.0.1 or ::1 (bound and released: `Launcher::start` retries when
/// another process takes it meanwhile).
fn free_addr(transport: Transport, v6: bool) -> SocketAddr {
    let any: SocketAddr = if v6 {
        (Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::LOCALHOST, 0).into()
    };
    let bound = match transport {
        Transport::Tcp => TcpListener::bind(any).and_then(|l| l.local_addr()),
        Transport::Udp => UdpSocket::bind(any).and_then(|s| s.local_addr()),
    };
    bound.unwrap_or_else(|e| panic!("cannot bind {any}: {e}"))
}

/// True when a socket listens on `addr` (TCP) or is bound to it (UDP), read from
/// /proc/net/{tcp,udp}{,6} so that no probe reaches the launcher (a listener-mode launcher
/// would start qmqpd for it).
fn is_listening(transport: Transport, addr: SocketAddr) -> bool {
    const TCP_LISTEN: &str = "0A";
    let (tcp, udp, words): (&str, &str, Vec<[u8; 4]>) = match addr {
        SocketAddr::V4(a) => ("/proc/net/tcp", "/proc/net/udp", vec![a.ip().octets()]),
        SocketAddr::V6(a) => (
            "/proc/net/tcp6",
            "/proc/net/udp6",
            a.ip()
                .octets()
                .chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect(),
        ),
    };
    let table = match transport {
        Transport::Tcp => tcp,
        Transport::Udp => udp,
    };
    // The kernel prints the address as the in-memory (network order) 32-bit words, in hex.
    let hex: String = words
        .iter()
        .map(|w| format!("{:08X}", u32::from_ne_bytes(*w)))
        .collect();
    let want = format!("{hex}:{:04X}", addr.port());
    let entries = std::fs::read_to_string(table)
        .unwrap_or_else(|e| panic!("cannot read {table} to see who listens: {e}"));
    entries.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let local = fields.nth(1);
        let state = fields.nth(1);
        local == Some(want.as_str()) && (transport == Transport::Udp || state == Some(TCP_LISTEN))
    })
}

/// Sends MESSAGE with qmqpc to `addr`; asserts a K reply.
fn send_qmqpc(addr: SocketAddr, q: &TestQueue) {
    let output = qmqpc(addr, MESSAGE);
    assert!(
        output.status.success() && text(&output.stdout).starts_with("KOk: queued as "),
        "qmqpc to {addr}: {}\nlog:\n{}",
        describe(&output),
        q.log_text()
    );
}

/// Runs qmqpc with `message` on stdin against `addr`.
fn qmqpc(addr: SocketAddr, message: &[u8]) -> Output {
    run_bounded(
        Command::new(qmqpc_bin())
            .arg("-s")
            .arg(addr.to_string())
            .arg("-f")
            .arg(SENDER)
            .arg("--")
            .arg(RECIPIENT),
        message,
        RUN_LIMIT,
    )
}

/// Postfix's qmqp-source, when installed (None: skipped, or a failure under
/// QMQPD_REQUIRE_INTEROP=1).
fn qmqp_source() -> Option<InteropTool> {
    interop_tool("QMQPD_POSTFIX_ROOT", "usr/sbin/qmqp-source")
}

/// Sends `count` messages, one connection each, with qmqp-source; asserts success.
fn send_qmqp_source(tool: &InteropTool, addr: SocketAddr, count: usize, sessions: usize) {
    let output = run_bounded(
        tool.command()
            .arg("-s")
            .arg(sessions.to_string())
            .arg("-m")
            .arg(count.to_string())
            .arg("-l")
            .arg("1024")
            .arg("-f")
            .arg(SENDER)
            .arg("-t")
            .arg(RECIPIENT)
            .arg(addr.to_string()),
        b"",
        RUN_LIMIT,
    );
    assert!(
        output.status.success(),
        "qmqp-source to {addr}: {}",
        describe(&output)
    );
}

/// Asserts that exactly `want` messages are in new/, nothing in tmp/, each from SENDER to
/// RECIPIENT with the client address `client_address`; returns them.
fn assert_landed(q: &TestQueue, want: usize, client_address: &str) -> Vec<QueueFile> {
    let files = q.files("new");
    assert_eq!(
        files.len(),
        want,
        "messages in new/: {files:?}\nlog:\n{}",
        q.log_text()
    );
    assert!(q.files("tmp").is_empty(), "tmp/: {:?}", q.files("tmp"));
    files
        .iter()
        .map(|path| {
            let file = QueueFile::read(path);
            assert_eq!(file.sender, SENDER.as_bytes(), "{}", path.display());
            assert_eq!(file.recipients.len(), 1, "{}", path.display());
            // qmqp-source numbers its recipients: "0rcpt@example.net".
            assert!(
                file.recipients[0].ends_with(RECIPIENT.as_bytes()),
                "{file:?}"
            );
            assert_eq!(
                file.attribute("client_address"),
                Some(client_address),
                "{file:?}"
            );
            assert_eq!(file.attribute("protocol_name"), Some("QMQP"), "{file:?}");
            assert!(file.message.starts_with(b"Received: from "), "{file:?}");
            file
        })
        .collect()
}

/// The qmqpd command line for launchers: the built binary and the test queue's arguments.
fn qmqpd_argv(q: &TestQueue, extra: &[&str]) -> Vec<String> {
    let mut argv = vec![qmqpd_bin().display().to_string()];
    argv.extend(q.args());
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

/// `systemd-socket-activate -l ADDR... <tool_args> qmqpd <q.args()> <extra>`. The tool
/// passes qmqpd no environment but LISTEN_* and `-E` variables: configuration goes by argv.
fn socket_activate(
    q: &TestQueue,
    v6: &[bool],
    tool_args: &[&str],
    extra: &[&str],
) -> Option<(Launcher, Vec<SocketAddr>)> {
    let tool = require_tool("systemd-socket-activate")?;
    Some(Launcher::start(
        q.dir.path(),
        "systemd-socket-activate",
        v6,
        |addrs| {
            let mut cmd = Command::new(&tool);
            for addr in addrs {
                cmd.arg("-l").arg(addr.to_string());
            }
            cmd.args(tool_args).args(qmqpd_argv(q, extra));
            cmd
        },
    ))
}

/// Waits until systemd-socket-activate (with -a) reported `want` children's exits; asserts
/// that each exited 0.
fn assert_children_exited_0(sa: &Launcher, want: usize) {
    let exits = || -> Vec<String> {
        sa.output_text()
            .lines()
            .filter(|l| l.starts_with("Child ") && l.contains(" died with "))
            .map(str::to_owned)
            .collect()
    };
    common::wait_until_within("every qmqpd to exit", RUN_LIMIT, || exits().len() >= want);
    let exits = exits();
    assert!(
        exits.len() == want && exits.iter().all(|l| l.ends_with(" died with code 0")),
        "a qmqpd did not exit 0: {exits:?}"
    );
}

/// qmqpd started per connection by systemd-socket-activate with `tool_args`: two qmqpc
/// messages and three from qmqp-source (when installed) land, and every qmqpd exits 0.
fn socket_activate_per_connection_serves_qmqpc_and_qmqp_source(tool_args: &[&str]) {
    let q = TestQueue::new();
    let Some((sa, addrs)) = socket_activate(&q, &[false], tool_args, &[]) else {
        return;
    };
    send_qmqpc(addrs[0], &q);
    send_qmqpc(addrs[0], &q);
    let mut want = 2;
    if let Some(tool) = qmqp_source() {
        send_qmqp_source(&tool, addrs[0], 3, 1);
        want += 3;
    }
    // No environment names the client here: the peer is the socket's.
    assert_landed(&q, want, "127.0.0.1");
    assert_children_exited_0(&sa, want);
}

#[test]
fn socket_activate_inetd_serves_qmqpc_and_qmqp_source() {
    // Connections come on fds 0 and 1.
    socket_activate_per_connection_serves_qmqpc_and_qmqp_source(&["-a", "--inetd"]);
}

#[test]
fn socket_activate_connection_on_fd_3_serves_qmqpc_and_qmqp_source() {
    // Like systemd's Accept=yes without StandardInput=socket: LISTEN_FDS=1, fd 3 connected.
    socket_activate_per_connection_serves_qmqpc_and_qmqp_source(&["-a", "--fdname=connection"]);
}

#[test]
fn socket_activate_connection_on_fd_3_and_2_gets_only_the_reply() {
    // Accept=yes with StandardError=socket: the connection systemd passes on fd 3 is stderr
    // too (a shell wrapper does `exec 2>&3`; exec keeps LISTEN_PID right), stdin and stdout
    // are not the socket. Without a log file, and with no syslog socket here, log lines
    // would go to stderr: they must stay off the connection.
    let q = TestQueue::new();
    let Some(tool) = require_tool("systemd-socket-activate") else {
        return;
    };
    let mut args = q.args_without_maillog();
    args.extend(["-o", "no_such_parameter=1", "-v", "-v"].map(String::from));
    let (sa, addrs) = Launcher::start(q.dir.path(), "systemd-socket-activate", &[false], |a| {
        let mut cmd = Command::new(&tool);
        cmd.arg("-l")
            .arg(a[0].to_string())
            .args(["-a", "--fdname=connection", "sh", "-c"])
            .arg("exec 2>&3; exec \"$0\" \"$@\"")
            .arg(qmqpd_bin())
            .args(&args);
        cmd
    });
    let ok = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    assert_only_reply(
        &exchange(addrs[0], &ok),
        "KOk: queued as ",
        &sa.output_text(),
    );
    assert_eq!(q.files("new").len(), 1);
    assert_children_exited_0(&sa, 1);
}

#[test]
fn socket_activate_listener_serves_several_then_exits_0_after_max_use() {
    let q = TestQueue::new();
    let from_source = 4;
    let source = qmqp_source();
    let max_use = 3 + if source.is_some() { from_source } else { 0 };
    let max_use_arg = format!("max_use={max_use}");
    // No -a: the first connection makes the tool exec qmqpd with the listening socket.
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &[], &["-o", &max_use_arg]) else {
        return;
    };
    for _ in 0..3 {
        send_qmqpc(addrs[0], &q);
    }
    if let Some(tool) = &source {
        send_qmqp_source(tool, addrs[0], from_source, 2);
    }
    let status = sa.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "{}\nlog:\n{}",
        sa.output_text(),
        q.log_text()
    );
    assert_landed(&q, max_use, "127.0.0.1");
    // One activation served them all: one process.
    let log = q.log_text();
    let processes: std::collections::BTreeSet<&str> = log
        .lines()
        .filter(|l| l.contains(": connect from "))
        .filter_map(|l| l.split_once("qmqpd[").and_then(|(_, r)| r.split_once(']')))
        .map(|(pid, _)| pid)
        .collect();
    assert_eq!(processes.len(), 1, "more than one qmqpd:\n{log}");
}

#[test]
fn socket_activate_listener_serves_ipv4_and_ipv6_sockets() {
    let q = TestQueue::new();
    let Some((mut sa, addrs)) = socket_activate(&q, &[false, true], &[], &["-o", "max_use=4"])
    else {
        return;
    };
    for addr in [addrs[0], addrs[1], addrs[1], addrs[0]] {
        send_qmqpc(addr, &q);
    }
    let status = sa.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", sa.output_text());
    let files = q.files("new");
    assert_eq!(files.len(), 4, "log:\n{}", q.log_text());
    let mut clients: Vec<String> = files
        .iter()
        .map(|p| {
            QueueFile::read(p)
                .attribute("client_address")
                .unwrap()
                .to_owned()
        })
        .collect();
    clients.sort();
    assert_eq!(clients, ["127.0.0.1", "127.0.0.1", "::1", "::1"]);
}

#[test]
fn socket_activate_listener_twenty_concurrent_clients_land() {
    const CLIENTS: usize = 20;
    let q = TestQueue::new();
    let max_use = format!("max_use={CLIENTS}");
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &[], &["-o", &max_use]) else {
        return;
    };
    let addr = addrs[0];
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| thread::spawn(move || qmqpc(addr, MESSAGE)))
        .collect();
    for client in clients {
        let output = client.join().unwrap();
        assert!(output.status.success(), "{}", describe(&output));
    }
    assert_eq!(sa.wait_exit().code(), Some(0), "{}", sa.output_text());
    assert_landed(&q, CLIENTS, "127.0.0.1");
}

#[test]
fn socket_activate_listener_exits_0_after_max_idle() {
    let q = TestQueue::new();
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &[], &["-o", "max_idle=1s"]) else {
        return;
    };
    send_qmqpc(addrs[0], &q);
    // Nothing else comes: qmqpd gives up after max_idle (the test waits as long as it takes).
    assert_eq!(sa.wait_exit().code(), Some(0), "log:\n{}", q.log_text());
    assert_landed(&q, 1, "127.0.0.1");
    assert!(q.log_text().contains("idle"), "log:\n{}", q.log_text());
}

/// Reads the datagrams qmqpd sent to a NOTIFY_SOCKET so far.
fn read_notifications(sock: &UnixDatagram, seen: &mut Vec<String>) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        seen.push(text(&buf[..n]));
    }
}

#[test]
fn socket_activate_listener_notifies_ready_watchdog_status_stopping() {
    let q = TestQueue::new();
    let notify_path = q.dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let notify_env = format!("NOTIFY_SOCKET={}", notify_path.display());
    // A watchdog of 200 ms: qmqpd pings it at least every 100 ms while it waits.
    let tool_args = ["-E", &notify_env, "-E", "WATCHDOG_USEC=200000"];
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &tool_args, &["-o", "max_use=2"])
    else {
        return;
    };
    send_qmqpc(addrs[0], &q);
    let mut seen = Vec::new();
    // qmqpd now waits for its second connection: the watchdog pings must come meanwhile.
    common::wait_until_within("READY=1 and WATCHDOG=1", RUN_LIMIT, || {
        read_notifications(&notify, &mut seen);
        let all = seen.join("\n");
        all.contains("READY=1") && all.contains("WATCHDOG=1")
    });
    send_qmqpc(addrs[0], &q);
    assert_eq!(sa.wait_exit().code(), Some(0), "log:\n{}", q.log_text());
    read_notifications(&notify, &mut seen);
    let lines: Vec<&str> = seen.iter().flat_map(|d| d.lines()).collect();
    let position = |what: &str| {
        lines
            .iter()
            .position(|l| *l == what)
            .unwrap_or_else(|| panic!("no {what} in {lines:?}"))
    };
    assert!(position("READY=1") < position("STOPPING=1"), "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("STATUS=") && l.contains('2')),
        "no STATUS= with the count of connections served: {lines:?}"
    );
    assert_landed(&q, 2, "127.0.0.1");
}

#[test]
fn socket_activate_listener_sigterm_lets_a_running_transaction_finish() {
    let q = TestQueue::new();
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &[], &[]) else {
        return;
    };
    let request = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    let (head, tail) = request.split_at(request.len() / 2);
    let mut stream = TcpStream::connect(addrs[0]).unwrap();
    stream.set_read_timeout(Some(IO_LIMIT)).unwrap();
    stream.set_write_timeout(Some(IO_LIMIT)).unwrap();
    stream.write_all(head).unwrap();
    common::wait_until_within("qmqpd to take the connection", RUN_LIMIT, || {
        q.log_text().contains("connect from")
    });
    kill(sa.pid(), Signal::SIGTERM).unwrap();
    common::wait_until_within("qmqpd to stop accepting", RUN_LIMIT, || {
        q.log_text().contains("stopping")
    });
    // The transaction that was running when SIGTERM came still completes.
    stream.write_all(tail).unwrap();
    let reply = qmqpd::client::read_reply(&mut stream)
        .unwrap_or_else(|e| panic!("no reply after SIGTERM: {e}\nlog:\n{}", q.log_text()));
    assert_eq!(reply.status, qmqpd::client::Status::Ok, "{reply:?}");
    assert_eq!(sa.wait_exit().code(), Some(0), "log:\n{}", q.log_text());
    assert_landed(&q, 1, "127.0.0.1");
}

/// `tcpserver -v -R -H -l0 [-x rules.cdb] 127.0.0.1 PORT qmqpd <q.args()> <extra>`.
fn tcpserver(
    q: &TestQueue,
    rules: Option<&Path>,
    extra: &[&str],
) -> Option<(Launcher, SocketAddr)> {
    let tool = require_tool("tcpserver")?;
    let (launcher, addrs) = Launcher::start(q.dir.path(), "tcpserver", &[false], |addrs| {
        let mut cmd = Command::new(&tool);
        cmd.args(["-v", "-R", "-H", "-l0"]);
        if let Some(rules) = rules {
            cmd.arg("-x").arg(rules);
        }
        cmd.arg(addrs[0].ip().to_string())
            .arg(addrs[0].port().to_string())
            .args(qmqpd_argv(q, extra));
        cmd
    });
    Some((launcher, addrs[0]))
}

/// Counts tcpserver's "end PID status N" lines: (all, those with status 0).
fn tcpserver_ends(output: &str) -> (usize, usize) {
    let ends: Vec<&str> = output
        .lines()
        .filter(|l| l.starts_with("tcpserver: end "))
        .collect();
    let ok = ends.iter().filter(|l| l.ends_with(" status 0")).count();
    (ends.len(), ok)
}

#[test]
fn tcpserver_serves_qmqpc_and_qmqp_source() {
    let q = TestQueue::new();
    let Some((launcher, addr)) = tcpserver(&q, None, &[]) else {
        return;
    };
    send_qmqpc(addr, &q);
    send_qmqpc(addr, &q);
    let mut want = 2;
    if let Some(tool) = qmqp_source() {
        send_qmqp_source(&tool, addr, 3, 1);
        want += 3;
    }
    let files = assert_landed(&q, want, "127.0.0.1");
    // The port comes from TCPREMOTEPORT: a client port, not tcpserver's.
    for file in &files {
        let port: u16 = file.attribute("client_port").unwrap().parse().unwrap();
        assert_ne!(port, addr.port(), "{file:?}");
    }
    common::wait_until_within("tcpserver to see every qmqpd exit", RUN_LIMIT, || {
        tcpserver_ends(&launcher.output_text()).0 == want
    });
    assert_eq!(
        tcpserver_ends(&launcher.output_text()),
        (want, want),
        "a qmqpd did not exit 0:\n{}",
        launcher.output_text()
    );
}

#[test]
fn tcpserver_client_identity_comes_from_the_ucspi_environment() {
    let Some(tcprules) = require_tool("tcprules") else {
        return;
    };
    let q = TestQueue::new();
    // tcprules sets variables after tcpserver's own: qmqpd must believe TCPREMOTEIP and
    // TCPREMOTEHOST over the socket's 127.0.0.1.
    let rules = q.dir.path().join("rules");
    std::fs::write(
        &rules,
        "127.0.0.1:allow,TCPREMOTEIP=\"192.0.2.7\",TCPREMOTEHOST=\"relay.example.org\"\n:deny\n",
    )
    .unwrap();
    let cdb = q.dir.path().join("rules.cdb");
    let output = run_bounded(
        Command::new(&tcprules)
            .arg(&cdb)
            .arg(q.dir.path().join("rules.tmp")),
        &std::fs::read(&rules).unwrap(),
        RUN_LIMIT,
    );
    assert!(output.status.success(), "tcprules: {}", describe(&output));
    let Some((_launcher, addr)) = tcpserver(
        &q,
        Some(&cdb),
        &["-o", "qmqpd_authorized_clients=192.0.2.0/24"],
    ) else {
        return;
    };
    send_qmqpc(addr, &q);
    let files = assert_landed(&q, 1, "192.0.2.7");
    assert_eq!(files[0].attribute("client_name"), Some("relay.example.org"));
    assert!(
        q.log_text()
            .contains("connect from relay.example.org[192.0.2.7]"),
        "log:\n{}",
        q.log_text()
    );
}

/// The shipped `xinetd/qmqpd` with the values in `set` replaced (each must be there) and
/// the lines in `add` added to the service, under a `defaults` section that logs to `log`.
fn xinetd_config(set: &[(&str, String)], add: &[String], log: &Path) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("xinetd/qmqpd");
    let shipped = std::fs::read_to_string(&path).unwrap();
    let mut found = Vec::new();
    let mut service = String::new();
    for line in shipped.lines() {
        let trimmed = line.trim();
        let key = trimmed
            .split_once('=')
            .map(|(k, _)| k.trim())
            .filter(|_| !trimmed.starts_with('#'));
        match set.iter().find(|(k, _)| Some(*k) == key) {
            Some((k, v)) => {
                found.push(*k);
                service.push_str(&format!("\t{k} = {v}\n"));
            }
            None if trimmed == "}" => {
                for line in add {
                    service.push_str(&format!("\t{line}\n"));
                }
                service.push_str("}\n");
            }
            None => {
                service.push_str(line);
                service.push('\n');
            }
        }
    }
    for (k, _) in set {
        assert!(found.contains(k), "xinetd/qmqpd sets no {k}");
    }
    format!(
        "defaults\n{{\n\tlog_type = FILE {}\n}}\n\n{service}",
        log.display()
    )
}

/// xinetd in the foreground (`-dontfork`) with a generated copy of `xinetd/qmqpd`: on
/// `addr` of a free loopback port, as the test's user, running the built qmqpd with
/// `server_args`.
struct Xinetd {
    /// Held for its Drop, which stops xinetd.
    _launcher: Launcher,
    addr: SocketAddr,
    log: PathBuf,
}

impl Xinetd {
    fn start(q: &TestQueue, v6: bool, server_args: &[String]) -> Option<Xinetd> {
        let tool = require_tool("xinetd")?;
        let log = q.dir.path().join("xinetd.log");
        let conf = q.dir.path().join("xinetd.conf");
        let group = nix::unistd::Group::from_gid(nix::unistd::getgid())
            .unwrap()
            .unwrap()
            .name;
        let (launcher, addrs) = Launcher::start(q.dir.path(), "xinetd", &[v6], |addrs| {
            let set = [
                ("port", addrs[0].port().to_string()),
                ("user", current_user()),
                ("group", group.clone()),
                ("server", qmqpd_bin().display().to_string()),
                ("server_args", server_args.join(" ")),
            ];
            let mut add = vec![format!("bind = {}", addrs[0].ip())];
            if v6 {
                add.push("flags = IPv6".to_owned());
            }
            std::fs::write(&conf, xinetd_config(&set, &add, &log)).unwrap();
            let mut cmd = Command::new(&tool);
            cmd.arg("-dontfork").arg("-f").arg(&conf);
            cmd
        });
        Some(Xinetd {
            _launcher: launcher,
            addr: addrs[0],
            log,
        })
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| text(&b))
            .unwrap_or_default()
    }

    /// Waits until xinetd logged `count` EXIT lines; returns them.
    fn exits(&self, count: usize) -> Vec<String> {
        let exits = || -> Vec<String> {
            self.log_text()
                .lines()
                .filter(|l| l.contains("EXIT: "))
                .map(str::to_owned)
                .collect()
        };
        common::wait_until_within("xinetd to see every qmqpd exit", RUN_LIMIT, || {
            exits().len() >= count
        });
        exits()
    }
}

/// Connects to `addr`, sends `request`, half-closes and returns every byte the server sent
/// until it closed; panics when the connection ends with an error (a reset).
fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    match common::exchange_until_error(addr, request) {
        (reply, None) => reply,
        (reply, Some(e)) => panic!(
            "reading the reply from {addr}: {e}, after {:?}",
            text(&reply)
        ),
    }
}

/// Asserts that `bytes` are exactly one netstring starting with `prefix`.
fn assert_only_reply(bytes: &[u8], prefix: &str, log: &str) {
    let shown = text(bytes);
    // split_netstrings panics on anything that is not netstrings.
    let parts = std::panic::catch_unwind(|| split_netstrings(bytes))
        .unwrap_or_else(|_| panic!("the client got more than netstrings: {shown:?}\n{log}"));
    assert_eq!(parts.len(), 1, "the client got {shown:?}\n{log}");
    assert!(
        parts[0].starts_with(prefix.as_bytes()),
        "the client got {shown:?}, not {prefix:?}...\n{log}"
    );
}

#[test]
fn xinetd_serves_qmqpc_and_qmqp_source() {
    let q = TestQueue::new();
    let Some(x) = Xinetd::start(&q, false, &q.args()) else {
        return;
    };
    send_qmqpc(x.addr, &q);
    send_qmqpc(x.addr, &q);
    let mut want = 2;
    if let Some(tool) = qmqp_source() {
        send_qmqp_source(&tool, x.addr, 3, 1);
        want += 3;
    }
    assert_landed(&q, want, "127.0.0.1");
    let exits = x.exits(want);
    assert!(
        exits.iter().all(|l| l.contains("status=0")),
        "a qmqpd did not exit 0:\n{}",
        x.log_text()
    );
}

#[test]
fn xinetd_ipv6_flag_serves_ipv6_clients() {
    let q = TestQueue::new();
    let Some(x) = Xinetd::start(&q, true, &q.args()) else {
        return;
    };
    send_qmqpc(x.addr, &q);
    assert_landed(&q, 1, "::1");
    assert!(x.exits(1)[0].contains("status=0"), "{}", x.log_text());
}

#[test]
fn xinetd_client_gets_only_the_reply_while_qmqpd_warns_without_a_log_file() {
    let q = TestQueue::new();
    let mut args = q.args_without_maillog();
    // An unknown parameter is a warning; -v -v adds debug lines: all of it must stay off
    // fds 1 and 2, which xinetd made the connection too.
    args.extend(["-o", "no_such_parameter=1", "-v", "-v"].map(String::from));
    let Some(x) = Xinetd::start(&q, false, &args) else {
        return;
    };
    let ok = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    assert_only_reply(&exchange(x.addr, &ok), "KOk: queued as ", &x.log_text());
    // A rejection logs a warning as well.
    let no_recipient = common::request(MESSAGE, SENDER.as_bytes(), &[]);
    assert_only_reply(
        &exchange(x.addr, &no_recipient),
        "DError: no recipients specified",
        &x.log_text(),
    );
    assert_eq!(q.files("new").len(), 1);
    let exits = x.exits(2);
    assert!(
        exits.iter().all(|l| l.contains("status=0")),
        "{}",
        x.log_text()
    );
}

#[test]
fn xinetd_client_gets_only_a_z_reply_on_a_configuration_error() {
    let q = TestQueue::new();
    let missing = q.dir.path().join("no-such-config-dir");
    let mut args = q.args_without_maillog();
    // The first -c is the test queue's; a later one wins.
    args.extend(["-c".to_owned(), missing.display().to_string()]);
    let Some(x) = Xinetd::start(&q, false, &args) else {
        return;
    };
    let ok = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    // qmqpd answers without reading the request; whether the close then resets the
    // connection is checked by configuration_error_z_reply_ends_without_a_reset.
    let (reply, _reset) = common::exchange_until_error(x.addr, &ok);
    assert_only_reply(&reply, "ZError: ", &x.log_text());
    assert!(q.files("new").is_empty());
    let exits = x.exits(1);
    assert!(exits[0].contains("status=78"), "{}", x.log_text());
}

#[test]
fn listen_twenty_concurrent_clients_all_land() {
    const CLIENTS: usize = 20;
    let q = TestQueue::new();
    let server = Server::start(&q, &[]);
    let addr = server.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| thread::spawn(move || qmqpc(addr, MESSAGE)))
        .collect();
    for client in clients {
        let output = client.join().unwrap();
        assert!(output.status.success(), "{}", describe(&output));
    }
    let mut want = CLIENTS;
    if let Some(tool) = qmqp_source() {
        send_qmqp_source(&tool, addr, 2 * CLIENTS, CLIENTS);
        want += 2 * CLIENTS;
    }
    assert_landed(&q, want, "127.0.0.1");
}

/// A system user (and a supplementary group it is in) for the privilege tests; Drop removes
/// both.
struct TestUser {
    name: String,
    group: String,
}

impl TestUser {
    fn create() -> TestUser {
        let id = std::process::id();
        let user = TestUser {
            name: format!("qmqpdt{id}"),
            group: format!("qmqpdg{id}"),
        };
        let run = |cmd: &mut Command| {
            let output = run_bounded(cmd, b"", RUN_LIMIT);
            assert!(output.status.success(), "{cmd:?}: {}", describe(&output));
        };
        run(Command::new("groupadd").arg("--system").arg(&user.group));
        run(Command::new("useradd")
            .args(["--system", "--no-create-home", "--user-group"])
            .args(["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"])
            .arg("--groups")
            .arg(&user.group)
            .arg(&user.name));
        user
    }

    fn entry(&self) -> nix::unistd::User {
        nix::unistd::User::from_name(&self.name).unwrap().unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run_bounded(Command::new("userdel").arg(&self.name), b"", RUN_LIMIT);
        let _ = run_bounded(Command::new("groupdel").arg(&self.group), b"", RUN_LIMIT);
    }
}

#[test]
fn root_switches_to_mail_owner_and_its_groups_under_launchers() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: the switch to mail_owner needs the tests to run as root");
        return;
    }
    let (Some(_), Some(_), Some(_)) = (
        require_tool("useradd"),
        require_tool("groupadd"),
        require_tool("systemd-socket-activate"),
    ) else {
        return;
    };
    let user = TestUser::create();
    let entry = user.entry();
    let group = nix::unistd::Group::from_name(&user.group).unwrap().unwrap();
    let owner = format!("mail_owner={}", user.name);
    // Only the supplementary group may write the queue: initgroups must have run.
    let q = TestQueue::new();
    std::fs::set_permissions(q.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(
        &q.queue_dir(),
        Some(nix::unistd::Uid::from_raw(0)),
        Some(group.gid),
    )
    .unwrap();
    std::fs::set_permissions(q.queue_dir(), std::fs::Permissions::from_mode(0o770)).unwrap();

    // One process per connection (-a --inetd), then listener mode: both switch.
    let modes: [&[&str]; 2] = [&["-a", "--inetd"], &[]];
    for (i, tool_args) in modes.into_iter().enumerate() {
        let Some((mut sa, addrs)) =
            socket_activate(&q, &[false], tool_args, &["-o", &owner, "-o", "max_use=1"])
        else {
            return;
        };
        send_qmqpc(addrs[0], &q);
        if tool_args.is_empty() {
            assert_eq!(sa.wait_exit().code(), Some(0), "log:\n{}", q.log_text());
        }
        let files = q.files("new");
        assert_eq!(files.len(), i + 1, "log:\n{}", q.log_text());
        for path in &files {
            let meta = std::fs::metadata(path).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid()),
                (entry.uid.as_raw(), entry.gid.as_raw()),
                "{} is not owned by {}",
                path.display(),
                user.name
            );
            assert_eq!(meta.permissions().mode() & 0o077, 0, "{}", path.display());
        }
    }
    assert!(
        !q.log_text().contains("is root"),
        "qmqpd kept root:\n{}",
        q.log_text()
    );
}

#[test]
fn missing_mail_owner_gets_z_and_exit_78_under_a_launcher() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: qmqpd looks mail_owner up only when started as root");
        return;
    }
    let q = TestQueue::new();
    let owner = "mail_owner=qmqpd-no-such-user";
    let Some((sa, addrs)) = socket_activate(&q, &[false], &["-a", "--inetd"], &["-o", owner])
    else {
        return;
    };
    let output = qmqpc(addrs[0], MESSAGE);
    assert_eq!(output.status.code(), Some(75), "{}", describe(&output));
    assert!(
        text(&output.stdout).starts_with("ZError: "),
        "{}",
        describe(&output)
    );
    assert!(q.files("new").is_empty());
    common::wait_until_within("qmqpd to exit", RUN_LIMIT, || {
        sa.output_text().contains("died with code")
    });
    assert!(
        sa.output_text().contains("died with code 78"),
        "{}",
        sa.output_text()
    );
    assert!(
        q.log_text().contains("no such user"),
        "log:\n{}",
        q.log_text()
    );
}

#[test]
fn configuration_error_z_reply_ends_without_a_reset() {
    // After replying, qmqpd closes without leaving unread input that makes the
    // kernel reset the connection (a reset can destroy a reply still in flight).
    let q = TestQueue::new();
    let missing = q.dir.path().join("no-such-config-dir");
    let missing = missing.display().to_string();
    let Some((sa, addrs)) = socket_activate(&q, &[false], &["-a", "--inetd"], &["-c", &missing])
    else {
        return;
    };
    let ok = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    let (reply, error) = common::exchange_until_error(addrs[0], &ok);
    assert_only_reply(&reply, "ZError: ", &sa.output_text());
    assert!(
        error.is_none(),
        "the Z reply was followed by {error:?}: qmqpd closed with the request unread"
    );
}

#[test]
fn socket_activate_datagram_socket_is_refused_as_a_configuration_error() {
    // A unit with ListenDatagram= by mistake: qmqpd must say so and exit 78, not ignore the
    // socket and serve stdin (which would make systemd start it again and again).
    let q = TestQueue::new();
    let Some(tool) = require_tool("systemd-socket-activate") else {
        return;
    };
    let (mut sa, addrs) = Launcher::start_on(
        q.dir.path(),
        "systemd-socket-activate",
        Transport::Udp,
        &[false],
        |addrs| {
            let mut cmd = Command::new(&tool);
            cmd.arg("--datagram")
                .arg("-l")
                .arg(addrs[0].to_string())
                .args(qmqpd_argv(&q, &[]));
            cmd
        },
    );
    // The first datagram makes the tool exec qmqpd with the UDP socket as fd 3.
    let udp = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    udp.send_to(b"x", addrs[0]).unwrap();
    let status = sa.wait_exit();
    assert_eq!(
        status.code(),
        Some(78),
        "qmqpd did not refuse the datagram socket; log:\n{}",
        q.log_text()
    );
    assert!(q.log_text().contains("fatal:"), "log:\n{}", q.log_text());
}

#[test]
fn socket_activate_unix_listener_serves_local_clients_as_localhost() {
    // ListenStream=/run/qmqpd/qmqp.sock with Accept=no: a UNIX-domain listening socket; its
    // clients are this host, logged as localhost[127.0.0.1].
    let q = TestQueue::new();
    let Some(tool) = require_tool("systemd-socket-activate") else {
        return;
    };
    let path = q.dir.path().join("qmqp.sock");
    let output = q.dir.path().join("unix.out");
    let file = File::create(&output).unwrap();
    let child = Command::new(&tool)
        .arg("-l")
        .arg(&path)
        .args(qmqpd_argv(&q, &["-o", "max_use=1"]))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut sa = Launcher {
        child,
        what: "systemd-socket-activate (unix)".to_owned(),
        output,
    };
    common::wait_until_within("the UNIX socket", RUN_LIMIT, || path.exists());
    let mut stream = std::os::unix::net::UnixStream::connect(&path).unwrap();
    stream.set_read_timeout(Some(IO_LIMIT)).unwrap();
    let reply = qmqpd::client::send(
        &mut stream,
        &mut &MESSAGE[..],
        MESSAGE.len() as u64,
        SENDER.as_bytes(),
        &[RECIPIENT.as_bytes()],
    )
    .unwrap();
    assert_eq!(reply.status, qmqpd::client::Status::Ok, "{reply:?}");
    let status = sa.wait_exit();
    assert!(status.success(), "{status}: {}", sa.output_text());
    assert!(
        q.log_text().contains("connect from localhost[127.0.0.1]"),
        "{}",
        q.log_text()
    );
    assert_landed(&q, 1, "127.0.0.1");
}

#[test]
fn socket_activate_listener_at_max_use_lets_a_slow_transaction_finish() {
    // After its last connection (max_use) the listener waits for the running transaction,
    // however long it takes within daemon_timeout, instead of cutting it off.
    let q = TestQueue::new();
    let args = ["-o", "max_use=1", "-o", "qmqpd_timeout=2s"];
    let Some((mut sa, addrs)) = socket_activate(&q, &[false], &[], &args) else {
        return;
    };
    let request = common::request(MESSAGE, SENDER.as_bytes(), &[RECIPIENT.as_bytes()]);
    let mut stream = TcpStream::connect(addrs[0]).unwrap();
    stream.set_read_timeout(Some(IO_LIMIT)).unwrap();
    // Six pieces one second apart: each gap is within qmqpd_timeout, the whole well beyond.
    let pieces: Vec<&[u8]> = request.chunks(request.len().div_ceil(6)).collect();
    for piece in &pieces {
        stream.write_all(piece).unwrap();
        thread::sleep(Duration::from_secs(1));
    }
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert!(
        text(&reply).contains(":KOk: queued as "),
        "{}",
        q.log_text()
    );
    let status = sa.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", sa.output_text());
    assert_landed(&q, 1, "127.0.0.1");
}
