//! Client names and addresses end to end: DNS through the real resolver (localhost only),
//! the launcher's name, host-name patterns, debug peers, port logging and IPv6 clients
//! (plain and IPv4-mapped) through `--listen`.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::process::Output;
use std::time::Duration;

use common::{QueueFile, Server, TestQueue, describe, request, run_bounded};
use qmqpd::client::{self, Status};

const LIMIT: Duration = Duration::from_secs(60);

fn serve(q: &TestQueue, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = common::stdin_qmqpd(q, extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    run_bounded(
        &mut cmd,
        &request(b"Subject: x\n\nhi\n", b"s@x", &[b"r@x"]),
        LIMIT,
    )
}

fn status_letter(out: &Output) -> char {
    let parts = common::split_netstrings(&out.stdout);
    assert_eq!(parts.len(), 1, "{}", describe(out));
    char::from(parts[0][0])
}

#[test]
fn peername_lookup_names_localhost_through_the_real_resolver() {
    let q = TestQueue::new();
    let out = serve(&q, &["-o", "qmqpd_peername_lookup=yes"], &[]);
    assert_eq!(status_letter(&out), 'K', "{}", describe(&out));
    let log = q.log_text();
    assert!(log.contains("connect from localhost[127.0.0.1]"), "{log}");
    let file = QueueFile::read(&q.files("new")[0]);
    assert!(
        String::from_utf8_lossy(&file.message)
            .starts_with("Received: from localhost (localhost [127.0.0.1])")
    );
    assert_eq!(file.attribute("client_name"), Some("localhost"));
}

#[test]
fn peername_lookup_no_leaves_name_unknown() {
    let q = TestQueue::new();
    let out = serve(&q, &["-o", "qmqpd_peername_lookup=no"], &[]);
    assert_eq!(status_letter(&out), 'K');
    assert!(
        q.log_text().contains("connect from unknown[127.0.0.1]"),
        "{}",
        q.log_text()
    );
}

#[test]
fn launcher_name_is_used_as_given() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &["-o", "qmqpd_peername_lookup=yes"],
        &[("TCPREMOTEHOST", "Relay.Example.NET")],
    );
    assert_eq!(status_letter(&out), 'K');
    assert!(
        q.log_text()
            .contains("connect from relay.example.net[127.0.0.1]"),
        "{}",
        q.log_text()
    );
}

#[test]
fn host_name_patterns_match_only_verified_names() {
    let q = TestQueue::new();
    let cases: &[(&str, &str, char)] = &[
        ("yes", "localhost", 'K'),
        ("yes", "LOCALHOST", 'K'),
        ("yes", "!localhost, 127.0.0.1", 'D'),
        ("yes", ".localhost", 'D'),
        ("no", "localhost", 'D'),
        ("no", "!localhost, 127.0.0.1", 'K'),
    ];
    for (lookup, list, want) in cases {
        let lookup = format!("qmqpd_peername_lookup={lookup}");
        let list = format!("qmqpd_authorized_clients={list}");
        let out = serve(&q, &["-o", &lookup, "-o", &list], &[]);
        assert_eq!(
            status_letter(&out),
            *want,
            "{lookup} {list}: {}",
            describe(&out)
        );
    }
}

#[test]
fn client_port_logging_shows_port_in_every_line_naming_the_client() {
    let q = TestQueue::new();
    let out = serve(&q, &["-o", "qmqpd_client_port_logging=yes"], &[]);
    assert_eq!(status_letter(&out), 'K');
    let out = serve(
        &q,
        &[
            "-o",
            "qmqpd_client_port_logging=yes",
            "-o",
            "hopcount_limit=1",
        ],
        &[],
    );
    assert_eq!(status_letter(&out), 'D');
    let log = q.log_text();
    let naming: Vec<&str> = log.lines().filter(|l| l.contains("[127.0.0.1]")).collect();
    assert!(naming.len() >= 6, "{log}");
    for line in naming {
        assert!(line.contains("unknown[127.0.0.1]:40000"), "{line}");
    }
}

#[test]
fn debug_peer_list_raises_log_level_for_matching_clients_only() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &[
            "-o",
            "debug_peer_list=127.0.0.2",
            "-o",
            "debug_peer_level=1",
        ],
        &[("TCPREMOTEIP", "127.0.0.2")],
    );
    assert_eq!(status_letter(&out), 'K');
    let log = q.log_text();
    assert!(
        log.contains(": request of "),
        "debug lines for the debug peer:\n{log}"
    );
    assert!(
        !log.contains(": recipient <r@x>"),
        "level 1 is debug, not trace:\n{log}"
    );
    let q = TestQueue::new();
    let out = serve(
        &q,
        &["-o", "debug_peer_list=127.0.0.2"],
        &[("TCPREMOTEIP", "127.0.0.2")],
    );
    assert_eq!(status_letter(&out), 'K');
    assert!(
        q.log_text().contains(": recipient <r@x>"),
        "level 2 reaches trace:\n{}",
        q.log_text()
    );
    let q = TestQueue::new();
    let out = serve(
        &q,
        &["-o", "debug_peer_list=127.0.0.2"],
        &[("TCPREMOTEIP", "127.0.0.3")],
    );
    assert_eq!(status_letter(&out), 'K');
    assert!(
        !q.log_text().contains(": request of "),
        "no debug lines for others:\n{}",
        q.log_text()
    );
}

/// Starts `qmqpd --listen ADDR` on a free port of `ip`; None (with the reason) when this
/// machine has no such loopback address.
fn send_to(addr: SocketAddr) -> client::Reply {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    client::send(&mut s, &mut &b"x\n"[..], 2, b"s@x", &[b"r@x"]).unwrap()
}

#[test]
fn ipv6_client_through_listen_is_logged_and_stamped_as_ipv6() {
    let q = TestQueue::new();
    let Some(server) = Server::start_at(&q, Ipv6Addr::LOCALHOST.into(), &[]) else {
        return;
    };
    let reply = send_to(server.addr);
    drop(server);
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert!(
        q.log_text().contains("connect from unknown[::1]"),
        "{}",
        q.log_text()
    );
    let file = QueueFile::read(&q.files("new")[0]);
    assert!(
        String::from_utf8_lossy(&file.message)
            .starts_with("Received: from unknown (unknown [IPv6:::1])")
    );
    assert_eq!(file.attribute("client_address"), Some("::1"));
}

#[test]
fn ipv4_client_of_a_dual_stack_socket_is_logged_as_ipv4() {
    let q = TestQueue::new();
    // An IPv6 socket bound to the IPv4-mapped loopback address: IPv4 clients arrive as
    // ::ffff:127.0.0.1, as on a dual-stack listener, without listening beyond loopback.
    let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
    let Some(server) = Server::start_at(&q, mapped.into(), &[]) else {
        return;
    };
    let reply = send_to(SocketAddr::from(([127, 0, 0, 1], server.addr.port())));
    drop(server);
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    let log = q.log_text();
    assert!(log.contains("connect from unknown[127.0.0.1]"), "{log}");
    assert!(!log.contains("unknown[::ffff:"), "{log}");
    let file = QueueFile::read(&q.files("new")[0]);
    assert_eq!(file.attribute("client_address"), Some("127.0.0.1"));
}

#[test]
fn listener_ignores_launcher_variables() {
    // A listener started from a shell that tcpserver spawned must not take every client for
    // the one that shell was started for.
    let q = TestQueue::new();
    let server = Server::start_with_env(
        &q,
        [127, 0, 0, 1].into(),
        &["-o", "qmqpd_authorized_clients=192.0.2.9"],
        &[("PROTO", "TCP"), ("TCPREMOTEIP", "192.0.2.9")],
    )
    .expect("127.0.0.1 is always there");
    let reply = send_to(server.addr);
    drop(server);
    assert_eq!(reply.status, Status::PermFail, "{reply:?}");
    assert!(
        q.log_text().contains("connect from unknown[127.0.0.1]"),
        "{}",
        q.log_text()
    );
}

#[test]
fn a_listener_thread_drops_a_debug_peers_verbosity_before_its_next_connection() {
    let q = TestQueue::new();
    // One connection at a time: the thread that served the first waits for the next.
    let server = Server::start(
        &q,
        &[
            "-o",
            "debug_peer_list=127.0.0.2",
            "-o",
            "default_process_limit=1",
        ],
    );
    for from in [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::LOCALHOST] {
        let mut s = common::connect_from(from, server.addr);
        let reply = client::send(&mut s, &mut &b"x\n"[..], 2, b"s@x", &[b"r@x"]).unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        // Long enough for the thread to be waiting for the next connection.
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(server);
    let log = q.log_text();
    assert!(log.contains("connect from unknown[127.0.0.2]"), "{log}");
    assert!(log.contains("connect from unknown[127.0.0.1]"), "{log}");
    assert_eq!(
        log.matches(": request of ").count(),
        1,
        "debug lines for the debug peer only:\n{log}"
    );
}
