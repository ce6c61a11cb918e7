//! Hostile clients: slow, silent and never-finishing senders cut by the timeouts; idle and
//! denied clients that try to hold every `default_process_limit` slot of a listener while an
//! authorized client waits; oversized lengths; thousands of repeated recipients; header and
//! attribute injection through addresses and `TCPREMOTEHOST`; IPv4-mapped and scoped IPv6
//! addresses. Loopback only; every process and connection ends with its test.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{QueueFile, Server, TestQueue, describe, request, run_bounded, wait_until};

/// A safety net for every child and every wait: never expected to fire.
const LIMIT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

const MESSAGE: &[u8] = b"From: a@example.org\nSubject: hostile test\n\nbody\n";

/// A qmqpd --listen we start ourselves, to read /proc or listen on any address.
struct Listener {
    server: Server,
    addr: SocketAddr,
}

impl Listener {
    /// `qmqpd --listen IP:PORT` on a free port of `ip` (a loopback address).
    fn start_on(q: &TestQueue, ip: IpAddr, extra: &[&str]) -> Listener {
        let server = Server::start_at(q, ip, extra).expect("the loopback address is there");
        Listener {
            addr: server.addr,
            server,
        }
    }

    fn start(q: &TestQueue, extra: &[&str]) -> Listener {
        Listener::start_on(q, IpAddr::from([127, 0, 0, 1]), extra)
    }

    /// A connection from `from` (a loopback address), with the tests' safety timeouts.
    fn connect_from(&self, from: Ipv4Addr) -> TcpStream {
        common::connect_from(from, self.addr)
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        stream.set_write_timeout(Some(LIMIT)).unwrap();
        stream
    }

    /// Sends raw bytes on `stream` and reads the reply payload until the server closes.
    fn exchange_on(stream: TcpStream, bytes: &[u8]) -> String {
        common::send_on(stream, bytes)
    }

    fn exchange(&self, bytes: &[u8]) -> String {
        Listener::exchange_on(self.connect(), bytes)
    }
}

/// Sends `head`, then one byte every `gap` (at most `bytes` of them) until the server closes
/// the connection; returns how long the connection lasted and what the server sent.
fn dribble(mut stream: TcpStream, head: &[u8], gap: Duration, bytes: usize) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    stream.write_all(head).unwrap();
    let reader = stream.try_clone().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let watcher = {
        let closed = Arc::clone(&closed);
        std::thread::spawn(move || {
            let mut reader = reader;
            let mut got = Vec::new();
            let _ = reader.read_to_end(&mut got);
            closed.store(true, Ordering::SeqCst);
            got
        })
    };
    for _ in 0..bytes {
        // Sleep in small steps so the end of the connection is noticed at once.
        let until = Instant::now() + gap;
        while Instant::now() < until && !closed.load(Ordering::SeqCst) {
            std::thread::sleep(POLL);
        }
        if closed.load(Ordering::SeqCst) || stream.write_all(b"x").is_err() {
            break;
        }
    }
    let got = watcher.join().unwrap();
    (started.elapsed(), got)
}

#[test]
fn silent_client_is_cut_by_qmqpd_timeout() {
    let q = TestQueue::new();
    let server = Listener::start(&q, &["-o", "qmqpd_timeout=1s"]);
    let (lasted, got) = dribble(server.connect(), b"", LIMIT, 1);
    assert!(got.is_empty(), "no reply to a client that sent nothing");
    assert!(lasted < LIMIT);
    wait_until("the timeout is logged", || {
        q.log_text()
            .contains("read timeout while receiving QMQP packet header")
    });
    eprintln!("silent client cut after {lasted:?} (qmqpd_timeout=1s)");
}

#[test]
fn slow_sender_is_cut_by_qmqpd_timeout() {
    let q = TestQueue::new();
    let server = Listener::start(&q, &["-o", "qmqpd_timeout=1s"]);
    // Each pause is longer than qmqpd_timeout: the first one ends the connection.
    let (lasted, got) = dribble(server.connect(), b"1000:990:", Duration::from_secs(3), 20);
    assert!(got.is_empty());
    assert!(
        lasted < Duration::from_secs(3 * 20),
        "cut before it finished: {lasted:?}"
    );
    wait_until("the timeout is logged", || {
        q.log_text()
            .contains("read timeout while receiving message content")
    });
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    eprintln!("slow sender cut after {lasted:?} (qmqpd_timeout=1s, one byte per 3 s)");
}

#[test]
fn never_finishing_sender_is_cut_by_daemon_timeout() {
    let q = TestQueue::new();
    let server = Listener::start(&q, &["-o", "qmqpd_timeout=30s", "-o", "daemon_timeout=3s"]);
    // One byte per second: every read succeeds well within qmqpd_timeout, forever.
    let (lasted, got) = dribble(
        server.connect(),
        b"100000:99990:",
        Duration::from_secs(1),
        60,
    );
    assert!(got.is_empty());
    assert!(
        lasted < Duration::from_secs(60),
        "daemon_timeout cut it: {lasted:?}"
    );
    wait_until("the timeout is logged", || {
        q.log_text()
            .contains("read timeout while receiving message content")
    });
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    eprintln!("one-byte-per-second sender cut after {lasted:?} (daemon_timeout=3s)");
}

/// Connections that hold slots: each is written to by one shared thread (one byte per
/// `gap`, after `head`; never when the gap is None) until the server closes it or `stop`.
struct Holders {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Holders {
    /// `streams`: (connection, head bytes, gap; None = silent).
    fn start(streams: Vec<(TcpStream, &'static [u8], Option<Duration>)>) -> Holders {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_thread = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut live: Vec<(TcpStream, Option<Duration>, Instant)> = Vec::new();
            for (mut stream, head, gap) in streams {
                stream.write_all(head).unwrap();
                stream.set_nonblocking(true).unwrap();
                live.push((stream, gap, Instant::now()));
            }
            let deadline = Instant::now() + 3 * LIMIT;
            let mut closed = 0;
            while !live.is_empty()
                && Instant::now() < deadline
                && !stop_thread.load(Ordering::SeqCst)
            {
                live.retain_mut(|(stream, gap, last)| {
                    let mut buf = [0u8; 256];
                    match stream.read(&mut buf) {
                        Ok(0) => {
                            closed += 1;
                            return false;
                        }
                        Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                            closed += 1;
                            return false;
                        }
                        _ => {}
                    }
                    if let Some(gap) = gap
                        && last.elapsed() >= *gap
                    {
                        *last = Instant::now();
                        if stream.write(b"x").is_err() {
                            closed += 1;
                            return false;
                        }
                    }
                    true
                });
                std::thread::sleep(Duration::from_millis(50));
            }
            // The rest are closed here, by the client side.
            closed
        });
        Holders {
            stop,
            thread: Some(thread),
        }
    }

    /// Waits until the server has closed every connection (at most 3 minutes); returns how
    /// many it closed.
    fn wait_closed(mut self) -> usize {
        self.thread.take().unwrap().join().unwrap()
    }

    /// Closes the connections the server has not closed; returns how many it had closed.
    fn close(mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Holders {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The slot holders of a test: (connection, head bytes, gap; None = silent).
type Holder = (TcpStream, &'static [u8], Option<Duration>);

/// Opens 100 slot-holding connections (`make` builds each) to a listener with
/// default_process_limit=100 that authorizes only 127.0.0.2, waits until it has accepted
/// all of them, then measures how long an authorized client from 127.0.0.2 takes to get its
/// K. Then `wait_closed` waits for the server to close every holder (else the test closes
/// them), and the server's threads and fds must come back to where they were. Returns the
/// wait and how many holders the server closed.
fn authorized_client_gets_k_through(
    wait_closed: bool,
    make: impl Fn(&Listener, usize) -> Holder,
) -> (Duration, usize) {
    const HOLDERS: usize = 100;
    let q = TestQueue::new();
    let args = [
        "-o",
        "default_process_limit=100",
        "-o",
        "qmqpd_authorized_clients=127.0.0.2",
    ];
    let server = Listener::start(&q, &args);
    let threads = server.server.proc_count("task");
    // One message first: the listener keeps new/ open for its directory fsyncs from then on.
    let first = server.connect_from(Ipv4Addr::new(127, 0, 0, 2));
    let reply = Listener::exchange_on(first, &request(MESSAGE, b"s@x", &[b"r@x"]));
    assert!(reply.starts_with("KOk"), "{reply}");
    wait_until("the first connection's thread ends", || {
        server.server.proc_count("task") == threads
    });
    let fds = server.server.proc_count("fd");
    let streams: Vec<_> = (0..HOLDERS).map(|i| make(&server, i)).collect();
    let holders = Holders::start(streams);
    wait_until("every holder was accepted", || {
        q.log_text().matches(": connect from").count() > HOLDERS
    });
    eprintln!(
        "{} threads with every slot held ({threads} when idle)",
        server.server.proc_count("task")
    );

    let started = Instant::now();
    let stream = server.connect_from(Ipv4Addr::new(127, 0, 0, 2));
    let reply = Listener::exchange_on(stream, &request(MESSAGE, b"s@x", &[b"r@x"]));
    let waited = started.elapsed();
    assert!(reply.starts_with("KOk"), "{reply}");
    assert!(waited < LIMIT, "the authorized client waited {waited:?}");
    assert_eq!(q.files("new").len(), 2);

    // The slot was freed by the server cutting a holder, not by a holder giving up.
    assert!(
        q.log_text().contains("read timeout while"),
        "{}",
        q.log_text()
    );
    let closed = if wait_closed {
        holders.wait_closed()
    } else {
        holders.close()
    };
    wait_until("connection threads end", || {
        server.server.proc_count("task") == threads
    });
    wait_until("connection fds closed", || {
        server.server.proc_count("fd") == fds
    });
    assert!(q.files("tmp").is_empty());
    (waited, closed)
}

#[test]
fn authorized_client_gets_k_while_100_silent_or_slow_clients_hold_every_slot() {
    // Authorized clients (127.0.0.2) with the default qmqpd_timeout of 300 s: half silent,
    // half sending a byte every 12 s. Only the stress timeout (10 s per read while every
    // slot is busy) frees a slot before 300 s; once one is free the stress ends, so the
    // others keep theirs and the test closes them.
    let (waited, closed) = authorized_client_gets_k_through(false, |server, i| {
        let stream = server.connect_from(Ipv4Addr::new(127, 0, 0, 2));
        if i % 2 == 0 {
            (stream, &b""[..], None)
        } else {
            (stream, &b"100000:99990:"[..], Some(Duration::from_secs(12)))
        }
    });
    let _ = closed;
    eprintln!("K after {waited:?} behind 100 silent or slow authorized clients");
}

#[test]
fn authorized_client_gets_k_while_100_denied_dribblers_hold_every_slot() {
    // Denied clients (127.0.0.1) sending one byte per second: no read ever times out, so
    // only the denied clients' drain budget (10 s) frees their slots, all of them.
    let (waited, closed) = authorized_client_gets_k_through(true, |server, _| {
        let stream = server.connect_from(Ipv4Addr::new(127, 0, 0, 1));
        (stream, &b"100000:99990:"[..], Some(Duration::from_secs(1)))
    });
    assert_eq!(closed, 100, "the drain budget ends every denied client");
    eprintln!("K after {waited:?} behind 100 denied one-byte-per-second clients");
}

#[test]
fn oversized_lengths_get_their_d_and_queue_nothing() {
    let q = TestQueue::new();
    let server = Listener::start(&q, &[]);
    let cases: [(&[u8], &str); 6] = [
        (
            b"99999999999999999999999999999:",
            "DError: message too large",
        ),
        (b"18446744073709551616:", "DError: message too large"),
        (b"18446744073709551615:", "DError: message too large"),
        (b"1000000000000:5:hello,", "DError: message too large"),
        // Inner lengths past the request and the field's limit: Postfix's storage-limit text.
        (
            b"20:99999999999999999999:x",
            "Dnetstring length exceeds storage limit while receiving message content",
        ),
        (
            b"20:5:hello,9999999999:",
            "Dnetstring length exceeds storage limit while receiving sender address",
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(server.exchange(bytes), want, "{}", common::text(bytes));
    }
    // A huge declared length, then a flood: the reply still arrives (no reset first).
    let mut stream = server.connect();
    stream.write_all(b"4294967296:").unwrap();
    let _ = stream.write_all(&vec![b'x'; 1024 * 1024]);
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert_eq!(common::text(&reply), "25:DError: message too large,");
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    assert!(
        server
            .exchange(&request(MESSAGE, b"s@x", &[b"r@x"]))
            .starts_with("KOk")
    );
}

#[test]
fn repeated_recipients_are_stored_in_constant_memory() {
    const COPIES: usize = 200_000;
    let q = TestQueue::new();
    let server = Listener::start(&q, &[]);
    let rcpts: Vec<&[u8]> = vec![b"same@example.net"; COPIES];
    let mut stream = server.connect();
    let reply = qmqpd::client::send(
        &mut stream,
        &mut &MESSAGE[..],
        MESSAGE.len() as u64,
        b"s@example.org",
        &rcpts,
    )
    .unwrap();
    assert_eq!(reply.status, qmqpd::client::Status::Ok, "{reply}");
    let peak = server.server.status_kib("VmHWM:");
    let file = QueueFile::read(&q.files("new")[0]);
    assert_eq!(
        file.recipients.len(),
        COPIES,
        "every copy is kept, as received"
    );
    assert!(file.recipients.iter().all(|r| r == b"same@example.net"));
    assert!(
        peak < 8 * 1024,
        "peak RSS {peak} KiB for {COPIES} recipients"
    );
    eprintln!(
        "{COPIES} recipients ({} bytes): peak RSS {peak} KiB",
        19 * COPIES
    );
}

/// qmqpd in stdin mode with the given UCSPI variables.
fn stdin_run(q: &TestQueue, extra: &[&str], env: &[(&str, &str)], input: &[u8]) -> Output {
    let mut cmd = common::bare_stdin_qmqpd(q, extra);
    cmd.envs(env.iter().copied());
    run_bounded(&mut cmd, input, LIMIT)
}

fn reply_of(out: &Output) -> String {
    let parts = common::split_netstrings(&out.stdout);
    assert_eq!(parts.len(), 1, "one reply: {}", describe(out));
    common::text(&parts[0])
}

#[test]
fn header_injection_through_addresses_is_refused() {
    let q = TestQueue::new();
    let tcp = [("PROTO", "TCP"), ("TCPREMOTEIP", "127.0.0.1")];
    let cases: [(&[u8], &[u8], &str); 6] = [
        (
            b"a@x\nBcc: victim@y",
            b"r@x",
            "DError: bad sender address syntax",
        ),
        (
            b"a@x\r\nBcc: victim@y",
            b"r@x",
            "DError: bad sender address syntax",
        ),
        (b"a@x\0b", b"r@x", "DError: bad sender address syntax"),
        (
            b"a@x",
            b"r@x\nBcc: victim@y",
            "DError: bad recipient address syntax",
        ),
        (b"a@x", b"r@x\rX: y", "DError: bad recipient address syntax"),
        (b"a@x", b"r@x\0", "DError: bad recipient address syntax"),
    ];
    for (sender, rcpt, want) in cases {
        let out = stdin_run(&q, &[], &tcp, &request(MESSAGE, sender, &[rcpt]));
        assert_eq!(reply_of(&out), want, "{}", describe(&out));
    }
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    // The escaped address is logged on one line.
    let log = q.log_text();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("Bcc:") || l.starts_with("X: y")),
        "{log}"
    );
}

#[test]
fn tcpremotehost_with_control_characters_is_escaped_everywhere() {
    let q = TestQueue::new();
    let host = "evil.example\r\nclient_address=192.0.2.66\nX-Injected: yes\x1b[31m";
    let env = [
        ("PROTO", "TCP"),
        ("TCPREMOTEIP", "127.0.0.1"),
        ("TCPREMOTEHOST", host),
    ];
    let out = stdin_run(&q, &[], &env, &request(MESSAGE, b"s@x", &[b"r@x"]));
    assert!(reply_of(&out).starts_with("KOk"), "{}", describe(&out));
    let file = QueueFile::read(&q.files("new")[0]);
    // Attributes: one line per attribute, the address the launcher gave, the name escaped.
    let lines: Vec<&str> = file.attributes.lines().collect();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("client_address="))
            .count(),
        1,
        "{:?}",
        file.attributes
    );
    assert_eq!(file.attribute("client_address"), Some("127.0.0.1"));
    assert!(!file.attributes.contains('\r') && !file.attributes.contains('\x1b'));
    // The Received: header: the name cannot start a header line of its own.
    let header_end = file.message.windows(2).position(|w| w == b"\n\n").unwrap();
    let headers = common::text(&file.message[..header_end]);
    assert!(
        !headers.lines().any(|l| l.starts_with("X-Injected")),
        "{headers}"
    );
    assert!(
        !headers.contains('\r') && !headers.contains('\x1b'),
        "{headers:?}"
    );
    // The log: escaped, and no line of its own.
    let log = q.log_text();
    assert!(log.contains("\\r\\n"), "{log}");
    assert!(!log.contains('\r') && !log.contains('\x1b'), "{log:?}");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("client_address") || l.starts_with("X-Injected")),
        "{log}"
    );
}

#[test]
fn ipv4_mapped_clients_neither_bypass_nor_miss_ipv4_rules() {
    // A real IPv6 socket bound to ::ffff:127.0.0.1: the kernel reports IPv4 clients as
    // IPv4-mapped IPv6 addresses.
    let cases: [(&str, &str); 4] = [
        ("127.0.0.1", "K"),
        ("[::ffff:127.0.0.1]", "K"),
        ("!127.0.0.0/8, [::]/0", "D"),
        ("[::]/0", "D"),
    ];
    for (list, want) in cases {
        let q = TestQueue::new();
        let arg = format!("qmqpd_authorized_clients={list}");
        let server = Listener::start_on(
            &q,
            Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(),
            &["-o", &arg],
        );
        let stream = TcpStream::connect((Ipv4Addr::LOCALHOST, server.addr.port())).unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        let reply = Listener::exchange_on(stream, &request(MESSAGE, b"s@x", &[b"r@x"]));
        assert!(reply.starts_with(want), "{list}: {reply}");
        let log = q.log_text();
        assert!(
            log.contains("connect from unknown[127.0.0.1]"),
            "{list}: {log}"
        );
        assert!(
            !log.lines()
                .any(|l| l.contains("::ffff:") && !l.contains("listening on")),
            "{list}: mapped form logged: {log}"
        );
        if want == "K" {
            let file = QueueFile::read(&q.files("new")[0]);
            assert_eq!(file.attribute("client_address"), Some("127.0.0.1"));
        } else {
            assert_eq!(
                reply,
                "DError: unknown[127.0.0.1] is not authorized to use this service"
            );
        }
    }
    // The same through the launcher's variables (tcpserver -6 style).
    let q = TestQueue::new();
    let env = [("PROTO", "TCP6"), ("TCP6REMOTEIP", "::ffff:192.0.2.7")];
    let input = request(MESSAGE, b"s@x", &[b"r@x"]);
    let allow = ["-o", "qmqpd_authorized_clients=192.0.2.0/24"];
    assert!(reply_of(&stdin_run(&q, &allow, &env, &input)).starts_with("KOk"));
    let deny = ["-o", "qmqpd_authorized_clients=!192.0.2.7 ::/0"];
    assert!(
        reply_of(&stdin_run(&q, &deny, &env, &input)).starts_with("DError: unknown[192.0.2.7]")
    );
}

#[test]
fn scoped_ipv6_clients_match_without_their_zone() {
    let q = TestQueue::new();
    let env = [("PROTO", "TCP6"), ("TCP6REMOTEIP", "fe80::1%eth0")];
    let input = request(MESSAGE, b"s@x", &[b"r@x"]);
    let allow = ["-o", "qmqpd_authorized_clients=[fe80::]/10"];
    let out = stdin_run(&q, &allow, &env, &input);
    assert!(reply_of(&out).starts_with("KOk"), "{}", describe(&out));
    let file = QueueFile::read(&q.files("new")[0]);
    assert_eq!(file.attribute("client_address"), Some("fe80::1"));
    // Not matched by an IPv4 rule, nor by a narrower IPv6 one.
    let deny = ["-o", "qmqpd_authorized_clients=0.0.0.0/0 [fe80::2]"];
    let out = stdin_run(&q, &deny, &env, &input);
    assert_eq!(
        reply_of(&out),
        "DError: unknown[fe80::1] is not authorized to use this service"
    );
    // A zone in a pattern is a configuration error, never a silent match-all.
    let zoned = ["-o", "qmqpd_authorized_clients=[fe80::1%eth0]"];
    let out = stdin_run(&q, &zoned, &env, &input);
    assert_eq!(reply_of(&out), "ZError: internal error");
    assert_eq!(out.status.code(), Some(78));
    assert_eq!(q.files("new").len(), 1);
}
