//! qmqpd over real TCP connections: `--listen`, draining rejected requests so the client
//! reads its reply, constant memory for huge requests, stderr being the client socket, the
//! durability order seen by strace, and a clean stop on SIGTERM.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{QueueFile, Server, TestQueue, describe, request};
use qmqpd::client::{self, Status};

const LIMIT: Duration = Duration::from_secs(60);

/// A message body generated on the fly, so the test does not hold it either.
struct Generated {
    left: u64,
}

impl Read for Generated {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = if i % 77 == 76 { b'\n' } else { b'x' };
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[test]
fn listen_peak_memory_stays_small_for_10mb_message_and_10000_recipients() {
    let q = TestQueue::new();
    let srv = Server::start(&q, &[]);
    let size: u64 = 10 * 1000 * 1000;
    let mut stream = srv.connect();
    let reply = client::send(
        &mut stream,
        &mut Generated { left: size },
        size,
        b"s@example.org",
        &[b"r@example.net"],
    )
    .unwrap();
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    let rcpts: Vec<String> = (0..10_000)
        .map(|i| format!("user{i}@example.net"))
        .collect();
    let refs: Vec<&[u8]> = rcpts.iter().map(|r| r.as_bytes()).collect();
    let mut stream = srv.connect();
    let reply = client::send(
        &mut stream,
        &mut &b"Subject: list\n\nhi\n"[..],
        18,
        b"s@example.org",
        &refs,
    )
    .unwrap();
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    let peak = srv.status_kib("VmHWM:");
    assert!(peak < 8 * 1024, "peak RSS {peak} KiB is not under 8 MiB");
    let files = q.files("new");
    assert_eq!(files.len(), 2);
    let sizes: Vec<u64> = files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .collect();
    assert!(sizes.iter().any(|&s| s > size), "{sizes:?}");
    assert!(
        files
            .iter()
            .any(|f| QueueFile::read(f).recipients.len() == 10_000)
    );
}

#[test]
fn listen_denied_client_reads_d_after_3mb_request() {
    let q = TestQueue::new();
    let srv = Server::start(&q, &["-o", "qmqpd_authorized_clients=192.0.2.1"]);
    let size = 3 * 1024 * 1024;
    let mut stream = srv.connect();
    let reply = client::send(
        &mut stream,
        &mut Generated { left: size },
        size,
        b"s@x",
        &[b"r@x"],
    )
    .unwrap();
    assert_eq!(reply.status, Status::PermFail);
    assert_eq!(
        reply.text,
        "Error: unknown[127.0.0.1] is not authorized to use this service"
    );
    assert!(q.files("new").is_empty());
}

#[test]
fn listen_undrainable_request_still_gets_its_reply() {
    let q = TestQueue::new();
    let srv = Server::start(&q, &["-o", "message_size_limit=1000"]);
    let mut stream = srv.connect();
    // Declares 100 kB (more than 4 x the limit) and sends some of it: qmqpd answers at once.
    stream.write_all(b"100000:99990:").unwrap();
    stream.write_all(&[b'x'; 4096]).unwrap();
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"25:DError: message too large,");
}

#[test]
fn listen_stops_on_sigterm_and_exits_0() {
    let q = TestQueue::new();
    let mut srv = Server::start(&q, &[]);
    let reply = client::send(&mut srv.connect(), &mut &b"x"[..], 1, b"s@x", &[b"r@x"]).unwrap();
    assert_eq!(reply.status, Status::Ok);
    sigterm(srv.pid());
    let status = srv.wait(LIMIT).expect("qmqpd exits after SIGTERM");
    assert_eq!(status.code(), Some(0));
    assert!(
        q.log_text().contains("served 1 connections: exiting"),
        "{}",
        q.log_text()
    );
}

/// Sends SIGTERM to the process `pid`.
fn sigterm(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// A client that sent part of its request and waits, holding a transaction open.
struct SlowClient {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl SlowClient {
    /// Connects to `addr`, sends the first bytes of a request and waits until qmqpd
    /// serves the connection.
    fn start(q: &TestQueue, addr: std::net::SocketAddr) -> SlowClient {
        let mut full = request(b"Subject: slow\n\nbody\n", b"s@x", &[b"r@x"]);
        let rest = full.split_off(10);
        let mut stream = common::connect(addr);
        stream.write_all(&full).unwrap();
        common::wait_until("the slow client to be served", || {
            q.log_text().contains("connect from")
        });
        SlowClient { stream, rest }
    }

    /// Sends the rest of the request; asserts that it was queued.
    fn finish(mut self, q: &TestQueue) {
        self.stream.write_all(&self.rest).unwrap();
        let reply = common::read_all(&mut self.stream);
        assert!(
            common::text(&reply).contains("KOk: queued as"),
            "{}\n{}",
            common::text(&reply),
            q.log_text()
        );
    }
}

#[test]
fn listen_on_sigterm_refuses_new_connections_and_drains_the_agent_while_finishing() {
    let q = TestQueue::new();
    let agent_port = common::free_port();
    let agent_arg = format!("qmqpd_agent_check_listen=127.0.0.1:{agent_port}");
    // The grace period for running transactions is qmqpd_timeout, at most 30 s.
    let mut srv = Server::start(&q, &["-o", &agent_arg, "-o", "qmqpd_timeout=300s"]);
    let agent = std::net::SocketAddr::from(([127, 0, 0, 1], agent_port));
    let agent_answer = || common::read_all(&mut common::connect(agent));
    common::wait_until("the agent check to listen", || {
        TcpStream::connect(agent).is_ok()
    });
    assert_eq!(common::text(&agent_answer()), "up ready\n");
    // A slow client: accepted, half its request sent.
    let slow = SlowClient::start(&q, srv.addr);
    sigterm(srv.pid());
    common::wait_until("qmqpd to stop listening", || {
        q.log_text()
            .contains("stopped listening: 1 connections running")
    });
    // During the grace period: new connections are refused at once (a balancer tries
    // another host), and the agent check takes the host out of rotation.
    let refused = TcpStream::connect(srv.addr);
    assert_eq!(
        refused.as_ref().map_err(std::io::Error::kind).err(),
        Some(std::io::ErrorKind::ConnectionRefused),
        "{refused:?}"
    );
    assert_eq!(common::text(&agent_answer()), "drain\n");
    // The running transaction still finishes.
    slow.finish(&q);
    let status = srv.wait(LIMIT).expect("qmqpd exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", q.log_text());
    assert_eq!(q.files("new").len(), 1);
    assert!(
        q.log_text().contains("agent check: drain: stopping"),
        "{}",
        q.log_text()
    );
}

/// A stopping listener whose socket systemd passed closes only its own copy: the launcher's
/// copy (here the test's, as systemd keeps one) still takes connections for the next start.
#[test]
fn systemd_listener_on_sigterm_leaves_the_launchers_socket_listening() {
    let q = TestQueue::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // fd 3 and LISTEN_FDS/LISTEN_PID as systemd sets them; exec keeps the pid.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 3<&0 </dev/null; LISTEN_FDS=1 LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(common::qmqpd_bin())
        .args(q.args())
        .args(["-o", "qmqpd_timeout=300s"])
        .stdin(Stdio::from(OwnedFd::from(listener.try_clone().unwrap())))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Reap<'a>(&'a mut std::process::Child);
    impl Drop for Reap<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let pid = child.id();
    let child = Reap(&mut child);
    let slow = SlowClient::start(&q, addr);
    sigterm(pid);
    common::wait_until("qmqpd to stop listening", || {
        q.log_text()
            .contains("stopped listening: 1 connections running")
    });
    let waiting = TcpStream::connect(addr).expect("the launcher's socket still listens");
    slow.finish(&q);
    let status = common::wait_bounded(child.0, LIMIT).expect("qmqpd exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", q.log_text());
    // The connection that came meanwhile waits in the launcher's socket, not lost.
    listener.set_nonblocking(true).unwrap();
    let (accepted, _) = listener.accept().expect("the waiting connection is there");
    assert_eq!(accepted.peer_addr().unwrap(), waiting.local_addr().unwrap());
}

#[test]
fn stdin_socket_on_fds_0_1_2_gets_only_the_reply() {
    // As under xinetd and inetd: fds 0, 1 and 2 are the client socket, there is no
    // maillog_file and no /dev/log socket in the test's view is guaranteed, and qmqpd has
    // warnings to log (an unknown parameter, a rejected request).
    let q = TestQueue::new();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(LIMIT)).unwrap();
    let (server_side, _) = listener.accept().unwrap();
    let fd = OwnedFd::from(server_side);
    let args = [
        "-c".to_owned(),
        q.config_dir().display().to_string(),
        "-o".to_owned(),
        format!("queue_directory={}", q.queue_dir().display()),
        "-o".to_owned(),
        format!("mail_owner={}", common::current_user()),
        "-o".to_owned(),
        "qmqpd_error_delay=0".to_owned(),
    ];
    let mut child = Command::new(common::qmqpd_bin())
        .args(&args)
        .args(["-o", "no_such_parameter=1"])
        .env_remove("PROTO")
        .env_remove("LISTEN_FDS")
        .stdin(Stdio::from(fd.try_clone().unwrap()))
        .stdout(Stdio::from(fd.try_clone().unwrap()))
        .stderr(Stdio::from(fd))
        .spawn()
        .unwrap();
    client.write_all(&request(b"x", b"s@x", &[])).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).unwrap();
    let status = common::wait_bounded(&mut child, LIMIT).unwrap();
    assert_eq!(
        common::text(&got),
        "31:DError: no recipients specified,",
        "exit {status}"
    );
    assert_eq!(status.code(), Some(0));
}

/// The commit paths the durability order is checked for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Commit {
    /// `open(O_TMPFILE)` → write → fdatasync → linkat → fsync(new/) → reply.
    Linkat,
    /// `open(tmp/…)` → write → fdatasync → rename → fsync(new/) → reply.
    Rename,
}

/// The system calls strace records for the durability order.
const TRACED: &str =
    "trace=openat,fsync,fdatasync,rename,renameat,renameat2,link,linkat,write,sendto";

/// Checks in `trace` that the queue file was created by `commit`'s way, its data synced,
/// then named in new/, then new/ synced, and only then `K` written.
fn assert_durability_order(commit: Commit, trace: &str) {
    let find_after = |from: usize, what: &dyn Fn(&str) -> bool, name: &str| {
        trace
            .lines()
            .enumerate()
            .skip(from)
            .find(|(_, l)| what(l))
            .map(|(i, _)| i)
            .unwrap_or_else(|| panic!("{commit:?}: no {name} after line {from}:\n{trace}"))
    };
    let create = find_after(
        0,
        &|l| match commit {
            Commit::Linkat => {
                l.contains("openat(") && l.contains("/tmp\"") && l.contains("O_TMPFILE")
            }
            Commit::Rename => l.contains("openat(") && l.contains("/tmp/") && l.contains("O_CREAT"),
        },
        "creation",
    );
    let data = find_after(
        create + 1,
        &|l| l.contains(" write(") && l.contains("queue_id"),
        "write",
    );
    let sync_file = find_after(data + 1, &|l| l.contains("fdatasync("), "fdatasync");
    let name = find_after(
        sync_file + 1,
        &|l| match commit {
            Commit::Linkat => {
                l.contains("linkat(") && l.contains("/proc/self/fd/") && l.contains("/new/")
            }
            Commit::Rename => l.contains("rename") && l.contains("/tmp/") && l.contains("/new/"),
        },
        "naming in new/",
    );
    let sync_dir = find_after(
        name + 1,
        &|l| l.contains("fsync(") && !l.contains("fdatasync"),
        "directory fsync",
    );
    let reply = find_after(
        sync_dir + 1,
        // A socket is written with send(2) (sendto), a pipe with write(2).
        &|l| (l.contains(" write(") || l.contains(" sendto(")) && l.contains(":KOk: queued as"),
        "K reply",
    );
    assert!(reply > sync_dir, "{commit:?}: order wrong:\n{trace}");
    let other = match commit {
        Commit::Linkat => "rename",
        Commit::Rename => "linkat(",
    };
    assert!(
        !trace
            .lines()
            .any(|l| l.contains(other) && l.contains("/new/")),
        "{commit:?}: the other commit path was taken too:\n{trace}"
    );
}

fn commit_args(commit: Commit) -> [&'static str; 2] {
    match commit {
        Commit::Linkat => ["-o", "queue_commit_method=linkat"],
        Commit::Rename => ["-o", "queue_commit_method=rename"],
    }
}

#[test]
fn durability_order_is_sync_name_sync_dir_then_reply_in_one_shot_mode() {
    let Some(strace) = common::require_tool("strace") else {
        return;
    };
    for commit in [Commit::Linkat, Commit::Rename] {
        let q = TestQueue::new();
        let trace = q.dir.path().join("trace");
        let mut cmd = Command::new(&strace);
        cmd.args(["-f", "-qq", "-s", "256", "-e", TRACED, "-o"])
            .arg(&trace)
            .arg(common::qmqpd_bin())
            .args(q.args())
            .args(commit_args(commit))
            .env("PROTO", "TCP")
            .env("TCPREMOTEIP", "127.0.0.1");
        let out = common::run_bounded(
            &mut cmd,
            &request(b"Subject: x\n\nbody\n", b"s@x", &[b"r@x"]),
            LIMIT,
        );
        assert!(
            common::text(&out.stdout).contains("KOk"),
            "{commit:?}: {}",
            describe(&out)
        );
        assert_durability_order(commit, &std::fs::read_to_string(&trace).unwrap());
    }
}

/// strace attached to a running process; detached (SIGTERM, so the trace is complete) and
/// reaped on drop.
struct Tracer(std::process::Child);

impl Drop for Tracer {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + LIMIT;
        while matches!(self.0.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn durability_order_is_sync_name_sync_dir_then_reply_in_listener_mode() {
    let Some(strace) = common::require_tool("strace") else {
        return;
    };
    for commit in [Commit::Linkat, Commit::Rename] {
        let q = TestQueue::new();
        let server = Server::start(&q, &commit_args(commit));
        let trace = q.dir.path().join("trace");
        let tracer = Tracer(
            Command::new(&strace)
                .args(["-f", "-qq", "-s", "256", "-e", TRACED, "-o"])
                .arg(&trace)
                .arg("-p")
                .arg(server.pid().to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let status = format!("/proc/{}/status", server.pid());
        let deadline = std::time::Instant::now() + LIMIT;
        while !std::fs::read_to_string(&status)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.trim_end() != "TracerPid:\t0")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "strace did not attach"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let reply = common::send_on(
            TcpStream::connect(server.addr).unwrap(),
            &request(b"Subject: x\n\nbody\n", b"s@x", &[b"r@x"]),
        );
        assert!(reply.starts_with("KOk"), "{commit:?}: {reply}");
        drop(tracer);
        drop(server);
        assert_durability_order(commit, &std::fs::read_to_string(&trace).unwrap());
    }
}
