//! The program shell of qmqpd: which descriptors are a client in each mode, and what a
//! stop signal does. Regression tests for three start-up and shutdown faults: a
//! configuration error in inetd `wait` mode lingered on the listening socket; `--listen`
//! with stdout and stderr on one file logged nothing; a per-connection qmqpd stopped by
//! SIGTERM left its file in `tmp/` and logged nothing.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{TestQueue, describe, qmqpd_bin, stdin_qmqpd, text};
use qmqpd::program::EX_CONFIG;
use qmqpd::reply::Status;

/// A safety net for every child: never expected to fire.
const LIMIT: Duration = Duration::from_secs(60);

/// The paths where qmqpd looks for a syslog socket.
const SYSLOG_SOCKETS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

#[test]
fn inetd_wait_mode_configuration_error_exits_without_touching_the_listening_socket() {
    let Some(strace) = common::require_tool("strace") else {
        return;
    };
    let q = TestQueue::new();
    let trace = q.dir.path().join("trace");
    // inetd's `wait` mode: the listening socket itself on stdin and stdout.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut cmd = Command::new(strace);
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=poll,ppoll,shutdown,write,sendto",
        "-o",
    ])
    .arg(&trace)
    .arg(qmqpd_bin())
    .args(q.args())
    .args(["-o", "hopcount_limit=many"])
    .env_remove("LISTEN_FDS")
    .env_remove("LISTEN_PID")
    .env_remove("MAIL_CONFIG")
    .stdout(Stdio::from(std::os::fd::OwnedFd::from(
        listener.try_clone().unwrap(),
    )));
    let out = common::run_bounded_from(
        &mut cmd,
        Stdio::from(std::os::fd::OwnedFd::from(listener.try_clone().unwrap())),
        LIMIT,
    );
    // run_bounded_from captures stdout: the child's stdout is a pipe, stdin the socket.
    assert_eq!(
        out.status.code(),
        Some(i32::from(EX_CONFIG)),
        "{}",
        describe(&out)
    );
    assert!(
        text(&out.stderr).contains("bad hopcount_limit value"),
        "{}",
        describe(&out)
    );
    // Nothing waited for the listening socket to become writable or readable, nothing was
    // shut down: a listening socket has no client to answer.
    let trace = std::fs::read_to_string(&trace).unwrap();
    let lingered: Vec<&str> = trace
        .lines()
        .filter(|l| l.contains("POLLOUT") || l.contains("POLLIN") || l.contains("shutdown("))
        .collect();
    assert!(
        lingered.is_empty(),
        "qmqpd used the listening socket:\n{trace}"
    );
}

#[test]
fn listen_mode_logs_to_stderr_shared_with_stdout() {
    if let Some(path) = SYSLOG_SOCKETS
        .iter()
        .find(|p| std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket()))
    {
        eprintln!("skipped: {path} is a socket, so qmqpd logs to syslog, not to stderr");
        return;
    }
    let q = TestQueue::new();
    let out_path = q.dir.path().join("out");
    let out = std::fs::File::create(&out_path).unwrap();
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // `qmqpd --listen ADDR >FILE 2>&1`, without maillog_file and without syslog.
    let args = q.args_without_maillog();
    let mut child = Command::new(qmqpd_bin())
        .arg("--listen")
        .arg(addr.to_string())
        .args(&args)
        .env_remove("MAIL_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out))
        .spawn()
        .unwrap();
    let guard = ChildGuard(&mut child);
    let want = format!("listening on {addr}");
    let output = || std::fs::read_to_string(&out_path).unwrap_or_default();
    common::wait_until(&format!("\"{want}\" in {}", out_path.display()), || {
        if let Ok(Some(status)) = guard.0.try_wait() {
            panic!("qmqpd exited ({status}); output:\n{}", output());
        }
        output().contains(&want)
    });
    drop(guard);
}

/// Both ways a queue file is written: unnamed, or named in tmp/.
const COMMIT_METHODS: [&str; 2] = ["queue_commit_method=linkat", "queue_commit_method=rename"];

#[test]
fn sigterm_cuts_off_a_per_connection_transaction_removing_its_queue_file() {
    for method in COMMIT_METHODS {
        sigterm_cuts_off_a_per_connection_transaction(method);
    }
}

fn sigterm_cuts_off_a_per_connection_transaction(method: &str) {
    let q = TestQueue::new();
    let mut child = stdin_qmqpd(&q, &["-o", method])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let child = ChildGuard(&mut child);
    // The packet header and the start of a message, then nothing: qmqpd waits for more.
    stdin
        .write_all(b"1000:500:Subject: cut off\n\nfirst")
        .unwrap();
    stdin.flush().unwrap();
    let pid = child.0.id();
    common::wait_until("the queue file", || {
        common::files_being_written(&q, pid) == 1
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = common::wait_bounded(child.0, LIMIT).expect("qmqpd did not stop");
    drop(stdin);
    assert_eq!(
        status.signal(),
        Some(15),
        "ended by SIGTERM, as before: {status}"
    );
    assert!(q.files("tmp").is_empty(), "tmp/: {:?}", q.files("tmp"));
    assert!(q.files("new").is_empty(), "new/: {:?}", q.files("new"));
    let log = q.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("stopped by SIGTERM"))
        .unwrap_or_else(|| panic!("no cut-off line in the log:\n{log}"));
    // Postfix's form: QUEUEID: NAME[ADDR]: what happened while WHERE.
    let id_line = log
        .lines()
        .find(|l| l.contains(": client=unknown[127.0.0.1]"))
        .unwrap_or_else(|| panic!("no client= line:\n{log}"));
    let id = id_line
        .split(": client=")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .unwrap();
    assert!(
        line.ends_with(&format!(
            "{id}: unknown[127.0.0.1]: stopped by SIGTERM while receiving message content"
        )),
        "{line}"
    );
}

#[test]
fn sigterm_cuts_off_a_listener_transaction_after_the_grace_period() {
    for method in COMMIT_METHODS {
        sigterm_cuts_off_a_listener_transaction(method);
    }
}

fn sigterm_cuts_off_a_listener_transaction(method: &str) {
    let q = TestQueue::new();
    // The grace period is qmqpd_timeout here (shorter than 30 s); a client that keeps
    // sending is never cut by the timeout itself.
    let mut server = common::Server::start(&q, &["-o", "qmqpd_timeout=2s", "-o", method]);
    let mut stream = server.connect();
    stream.write_all(b"100000:99000:Subject: slow\n\n").unwrap();
    common::wait_until("the queue file", || {
        common::files_being_written(&q, server.pid()) == 1
    });
    let pid = nix::unistd::Pid::from_raw(i32::try_from(server.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let dribbler = std::thread::spawn(move || {
        // One byte every 100 ms until qmqpd closes the connection (at most 600 bytes).
        for _ in 0..600 {
            if stream.write_all(b"x").is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let status = server.wait(LIMIT).expect("qmqpd did not stop");
    dribbler.join().unwrap();
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(q.files("tmp").is_empty(), "tmp/: {:?}", q.files("tmp"));
    assert!(q.files("new").is_empty(), "new/: {:?}", q.files("new"));
    let log = q.log_text();
    assert!(
        log.lines().any(|l| l
            .contains(": unknown[127.0.0.1]: stopped by SIGTERM while receiving message content")),
        "no cut-off line in the log:\n{log}"
    );
}

/// Kills and reaps a child when dropped, also when the test fails.
struct ChildGuard<'a>(&'a mut std::process::Child);

impl Drop for ChildGuard<'_> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Started as root with an unprivileged `mail_owner`, `--listen` binds QMQP's privileged
/// port before giving up root (binding after the switch fails with EACCES).
#[test]
fn listen_binds_a_privileged_port_before_switching_to_mail_owner() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: binding a port below 1024 as root needs root");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").unwrap() else {
        eprintln!("skipped: no user nobody to switch to");
        return;
    };
    // A free port below 1024 on loopback (QMQP's own 628 may be in use by another test).
    let Some(port) = (600..1024).find(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok()) else {
        eprintln!("skipped: no free port below 1024 on 127.0.0.1");
        return;
    };
    let q = TestQueue::new();
    // nobody must reach and write the queue; the log is opened while still root.
    std::fs::set_permissions(q.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    nix::unistd::chown(&q.queue_dir(), Some(nobody.uid), Some(nobody.gid)).unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let server = common::Server::start_on(&q, addr, &["-o", "mail_owner=nobody"]);
    let reply = server.send(b"Subject: x\n\nx\n", b"a@example.org", &[b"b@example.org"]);
    assert_eq!(
        reply.status,
        Status::Ok,
        "reply {reply:?}; log:\n{}",
        q.log_text()
    );
}
