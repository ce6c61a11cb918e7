//! The PROXY protocol in every mode: `--listen`, one connection on stdin (as tcpserver runs
//! qmqpd), a systemd listener and systemd's one connection on fd 3
//! (systemd-socket-activate), and behind a real HAProxy on
//! loopback with `send-proxy` and `send-proxy-v2`. The header's address is the client for
//! the access list, the logs and the queue file; a missing or malformed header, or a peer
//! that may not send one, gets `Z` and a warning naming the real peer.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::haproxy::Haproxy;
use common::{
    QueueFile, Server, TestQueue, bare_stdin_qmqpd, describe, free_port, qmqpc_bin, qmqpd_bin,
    request, require_tool, run_bounded, stdin_qmqpd, text, wait_bounded,
};

/// A safety net for the child processes; never expected to fire.
const RUN_LIMIT: Duration = Duration::from_secs(120);

const PROXY_ON: [&str; 2] = ["-o", "qmqpd_upstream_proxy_protocol=haproxy"];

fn v1(src: &str, sport: u16) -> Vec<u8> {
    let family = if src.contains(':') { "TCP6" } else { "TCP4" };
    let dst = if src.contains(':') {
        "2001:db8::1"
    } else {
        "203.0.113.1"
    };
    format!("PROXY {family} {src} {dst} {sport} 628\r\n").into_bytes()
}

fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[ver_cmd, family]);
    h.extend_from_slice(&u16::try_from(block.len()).unwrap().to_be_bytes());
    h.extend_from_slice(block);
    h
}

/// A v2 PROXY header for a TCP/IPv6 client `src`, with a TLV the server ignores.
fn v2_inet6(src: &str, sport: u16) -> Vec<u8> {
    let mut block = Vec::new();
    block.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    block.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    block.extend_from_slice(&sport.to_be_bytes());
    block.extend_from_slice(&628u16.to_be_bytes());
    block.extend_from_slice(&[0x05, 0x00, 0x02, b'i', b'd']);
    v2(0x21, 0x21, &block)
}

fn req() -> Vec<u8> {
    request(
        b"Subject: proxied\n\nhello\n",
        b"s@example.com",
        &[b"r@example.net"],
    )
}

fn with_request(header: Vec<u8>) -> Vec<u8> {
    let mut bytes = header;
    bytes.extend_from_slice(&req());
    bytes
}

/// `qmqpd --listen` on loopback with the PROXY protocol on, and `extra` arguments.
fn proxy_server(q: &TestQueue, extra: &[&str]) -> Server {
    let mut args = PROXY_ON.to_vec();
    args.extend_from_slice(extra);
    Server::start(q, &args)
}

/// True for a `K` reply netstring.
fn is_k(reply: &[u8]) -> bool {
    reply
        .iter()
        .position(|&b| b == b':')
        .is_some_and(|colon| reply.get(colon + 1) == Some(&b'K'))
}

fn only_queue_file(q: &TestQueue) -> QueueFile {
    let files = q.files("new");
    assert_eq!(files.len(), 1, "new/: {files:?}\nlog:\n{}", q.log_text());
    QueueFile::read(&files[0])
}

#[test]
fn listen_v1_header_names_the_client_for_access_logs_and_queue_file() {
    let q = TestQueue::new();
    let s = proxy_server(&q, &["-o", "qmqpd_authorized_clients=192.0.2.0/24"]);
    let reply = s.exchange(&with_request(v1("192.0.2.7", 56324)));
    assert!(is_k(&reply), "{}\n{}", text(&reply), q.log_text());
    let file = only_queue_file(&q);
    assert_eq!(file.attribute("client_address"), Some("192.0.2.7"));
    assert!(
        text(&file.message).contains("(unknown [192.0.2.7])"),
        "{}",
        text(&file.message)
    );
    // A client outside the list is denied under its own address, not the balancer's.
    let reply = s.exchange(&with_request(v1("198.51.100.9", 1)));
    assert_eq!(
        text(&reply),
        "67:DError: unknown[198.51.100.9] is not authorized to use this service,"
    );
    let log = q.log_text();
    assert!(log.contains("connect from unknown[192.0.2.7]"), "{log}");
    assert!(log.contains("connect from unknown[198.51.100.9]"), "{log}");
    assert!(!log.contains("connect from unknown[127.0.0.1]"), "{log}");
}

#[test]
fn listen_v2_header_ipv6_client_and_local_command() {
    let q = TestQueue::new();
    let s = proxy_server(&q, &["-o", "qmqpd_authorized_clients=[2001:db8::]/32"]);
    let reply = s.exchange(&with_request(v2_inet6("2001:db8::7", 40000)));
    assert!(is_k(&reply), "{}\n{}", text(&reply), q.log_text());
    assert_eq!(
        only_queue_file(&q).attribute("client_address"),
        Some("2001:db8::7")
    );
    // LOCAL (the balancer's own health check) keeps the real peer, which is not authorized.
    let reply = s.exchange(&with_request(v2(0x20, 0x00, &[])));
    assert_eq!(
        text(&reply),
        "64:DError: unknown[127.0.0.1] is not authorized to use this service,"
    );
}

#[test]
fn listen_missing_or_malformed_header_gets_z_and_a_warning_naming_the_peer() {
    let q = TestQueue::new();
    let s = proxy_server(&q, &[]);
    let plain = s.exchange(&req());
    assert_eq!(text(&plain), "22:ZError: internal error,");
    let bad = s.exchange(&with_request(
        b"PROXY TCP4 192.0.2.7 nowhere 1 2\r\n".to_vec(),
    ));
    assert_eq!(text(&bad), "22:ZError: internal error,");
    let too_long = s.exchange(&with_request(v2(0x21, 0x11, &[0; 5000])));
    assert_eq!(text(&too_long), "22:ZError: internal error,");
    // A connection that ends without a byte (a plain TCP health check) is no warning.
    let nothing = s.exchange(b"");
    assert!(nothing.is_empty() || nothing == b"22:ZError: internal error,");
    assert!(q.files("new").is_empty());
    let log = q.log_text();
    assert!(
        log.lines().any(
            |l| l.contains("lost connection before the PROXY header") && !l.contains("warning")
        ),
        "{log}"
    );
    for want in [
        "warning: unknown[127.0.0.1]: no PROXY header: the connection starts with \"",
        "warning: unknown[127.0.0.1]: malformed PROXY header: v1 TCP4 address \"nowhere\"",
        "warning: unknown[127.0.0.1]: PROXY header longer than 4112 bytes",
    ] {
        assert!(log.contains(want), "no {want:?} in:\n{log}");
    }
}

#[test]
fn listen_peer_outside_upstream_proxy_clients_gets_z() {
    let q = TestQueue::new();
    let s = proxy_server(&q, &["-o", "qmqpd_upstream_proxy_clients=192.0.2.1"]);
    let reply = s.exchange(&with_request(v1("127.0.0.1", 1)));
    assert_eq!(text(&reply), "22:ZError: internal error,");
    assert!(q.files("new").is_empty());
    let log = q.log_text();
    assert!(
        log.contains("warning: unknown[127.0.0.1]: not in qmqpd_upstream_proxy_clients"),
        "{log}"
    );
}

#[test]
fn listen_header_not_sent_in_time_gets_z() {
    let q = TestQueue::new();
    let s = proxy_server(&q, &["-o", "qmqpd_upstream_proxy_timeout=1s"]);
    let mut stream = s.connect();
    // Half a header, then silence.
    stream.write_all(b"PROXY TCP4 192.0.2").unwrap();
    let mut reply = Vec::new();
    let _ = stream.read_to_end(&mut reply);
    assert_eq!(text(&reply), "22:ZError: internal error,");
    let log = q.log_text();
    assert!(
        log.contains("unknown[127.0.0.1]: timeout while reading the PROXY header"),
        "{log}"
    );
}

#[test]
fn stdin_mode_reads_the_header_from_the_connection() {
    let q = TestQueue::new();
    let out = run_bounded(
        stdin_qmqpd(&q, &PROXY_ON).args(["-o", "qmqpd_authorized_clients=192.0.2.7"]),
        &with_request(v1("192.0.2.7", 5000)),
        RUN_LIMIT,
    );
    assert!(is_k(&out.stdout), "{}", describe(&out));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(
        only_queue_file(&q).attribute("client_address"),
        Some("192.0.2.7")
    );
    // The launcher names a peer that may not speak PROXY: Z, and the exit status says so.
    let out = run_bounded(
        stdin_qmqpd(&q, &PROXY_ON).env("TCPREMOTEIP", "198.51.100.20"),
        &with_request(v1("192.0.2.7", 5000)),
        RUN_LIMIT,
    );
    assert_eq!(text(&out.stdout), "22:ZError: internal error,");
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert!(
        q.log_text()
            .contains("unknown[198.51.100.20]: not in qmqpd_upstream_proxy_clients"),
        "{}",
        q.log_text()
    );
}

/// A balancer's plain TCP health check against a one-shot qmqpd (the connection on
/// stdin/stdout, as inetd or tcpserver pass it): the peer connects and sends nothing. That
/// is a client that went away, not a local failure: no `Z`, nothing queued, exit 0.
#[test]
fn one_shot_health_check_without_a_byte_exits_0_without_z() {
    let q = TestQueue::new();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(RUN_LIMIT)).unwrap();
    let (server_side, _) = listener.accept().unwrap();
    // Nothing is sent: the check's end of the connection is closed for writing at once
    // (kept open for reading, to see that no reply comes).
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let mut child = bare_stdin_qmqpd(&q, &PROXY_ON)
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            server_side.try_clone().unwrap(),
        )))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(server_side)))
        .stderr(Stdio::null())
        .spawn()
        .expect("start qmqpd");
    let status = wait_bounded(&mut child, RUN_LIMIT);
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).unwrap();
    assert_eq!(text(&reply), "", "{}", q.log_text());
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", q.log_text());
    assert!(q.files("new").is_empty());
    let log = q.log_text();
    assert!(
        log.lines().any(|l| l
            .contains("unknown[127.0.0.1]: lost connection before the PROXY header")
            && !l.contains("warning")),
        "{log}"
    );
}

/// systemd-socket-activate (listener mode) with qmqpd; Drop kills and reaps it.
struct Activated(Child);

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects, retrying while the launcher has not bound the port yet.
fn connect_retrying(addr: SocketAddr) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => {
                s.set_read_timeout(Some(RUN_LIMIT)).unwrap();
                return s;
            }
            Err(e) => assert!(Instant::now() < deadline, "cannot connect to {addr}: {e}"),
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// systemd-socket-activate with `tool_args` in front of qmqpd: serves a v1 and a v2 header.
fn socket_activated_reads_v1_and_v2_headers(tool_args: &[&str]) {
    let Some(tool) = require_tool("systemd-socket-activate") else {
        return;
    };
    let q = TestQueue::new();
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let _sa = Activated(
        Command::new(tool)
            .arg("-l")
            .arg(addr.to_string())
            .args(tool_args)
            .arg(qmqpd_bin())
            .args(q.args())
            .args(PROXY_ON)
            .args([
                "-o",
                "qmqpd_authorized_clients=192.0.2.0/24, [2001:db8::]/32",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start systemd-socket-activate"),
    );
    for (header, client) in [
        (v1("192.0.2.8", 1234), "192.0.2.8"),
        (v2_inet6("2001:db8::8", 1234), "2001:db8::8"),
    ] {
        let mut stream = connect_retrying(addr);
        stream.write_all(&with_request(header)).unwrap();
        let mut reply = Vec::new();
        stream.read_to_end(&mut reply).unwrap();
        assert!(is_k(&reply), "{}\n{}", text(&reply), q.log_text());
        assert!(
            q.log_text()
                .contains(&format!("connect from unknown[{client}]")),
            "{}",
            q.log_text()
        );
    }
    assert_eq!(q.files("new").len(), 2);
}

#[test]
fn systemd_listener_reads_v1_and_v2_headers() {
    // Accept=no: qmqpd gets the listening socket.
    socket_activated_reads_v1_and_v2_headers(&[]);
}

#[test]
fn systemd_accept_yes_reads_v1_and_v2_headers() {
    // Accept=yes: one qmqpd per connection, the connected socket on fd 3.
    socket_activated_reads_v1_and_v2_headers(&["-a", "--fdname=connection"]);
}

/// HAProxy on loopback in front of qmqpd, connecting to it from 127.0.0.9: qmqpd trusts
/// only that address for PROXY and authorizes only 127.0.0.1, the real client.
fn haproxy_in_front(send_proxy: &str) {
    let q = TestQueue::new();
    let s = proxy_server(
        &q,
        &[
            "-o",
            "qmqpd_upstream_proxy_clients=127.0.0.9",
            "-o",
            "qmqpd_authorized_clients=127.0.0.1",
        ],
    );
    let front: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = format!(
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    \
         timeout server 60s\n\nfrontend qmqp\n    bind {front}\n    default_backend hosts\n\n\
         backend hosts\n    source 127.0.0.9\n    server h1 {} {send_proxy} check check-send-proxy inter 500ms\n",
        s.addr
    );
    let Some(haproxy) = Haproxy::start(&config, None) else {
        return;
    };
    haproxy.wait_status("hosts", "h1", "UP", Duration::from_secs(30));
    let out = run_bounded(
        Command::new(qmqpc_bin()).args([
            "-f",
            "s@example.com",
            "-s",
            &front.to_string(),
            "r@example.net",
        ]),
        b"Subject: through haproxy\n\nhello\n",
        RUN_LIMIT,
    );
    assert!(
        out.status.success(),
        "{}\nqmqpd log:\n{}\nhaproxy log:\n{}",
        describe(&out),
        q.log_text(),
        haproxy.log_text()
    );
    assert_eq!(
        only_queue_file(&q).attribute("client_address"),
        Some("127.0.0.1")
    );
    // HAProxy's health checks carry a header too (`check-send-proxy`), so no connection was
    // refused with a warning.
    let log = q.log_text();
    assert!(log.contains("client=unknown[127.0.0.1]"), "{log}");
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("warning:") && !l.contains("mail_owner"))
        .collect();
    assert!(warnings.is_empty(), "{log}");
}

#[test]
fn haproxy_send_proxy_v1_passes_the_client() {
    haproxy_in_front("send-proxy");
}

#[test]
fn haproxy_send_proxy_v2_passes_the_client() {
    haproxy_in_front("send-proxy-v2");
}
