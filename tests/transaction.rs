//! The built qmqpd, one transaction at a time, in stdin mode (as inetd, xinetd and tcpserver
//! run it): every reply of qmqpd(8)'s DIAGNOSTICS, the queue file it leaves, the log lines, the
//! timeouts and the exit status.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{QueueFile, TestQueue, describe, request, run_bounded};

/// A safety net for every child: never expected to fire.
const LIMIT: Duration = Duration::from_secs(60);

fn serve(q: &TestQueue, extra: &[&str], input: &[u8]) -> Output {
    run_bounded(&mut common::stdin_qmqpd(q, extra), input, LIMIT)
}

/// The reply payload (status letter and text) of a qmqpd run.
fn reply(out: &Output) -> String {
    let parts = common::split_netstrings(&out.stdout);
    assert_eq!(
        parts.len(),
        1,
        "exactly one reply netstring: {}",
        describe(out)
    );
    String::from_utf8(parts[0].clone()).expect("reply is UTF-8")
}

/// Asserts a non-K reply, an empty queue and the exit status.
fn assert_rejected(q: &TestQueue, out: &Output, want: &str, status: i32) {
    assert_eq!(reply(out), want, "{}", describe(out));
    assert_eq!(out.status.code(), Some(status), "{}", describe(out));
    assert!(q.files("new").is_empty(), "nothing queued");
    assert!(q.files("tmp").is_empty(), "nothing left in tmp/");
}

const MESSAGE: &[u8] =
    b"From: a@example.org\nTo: b@example.net\nMessage-ID: <m1@example.org>\nSubject: hi\n\nbody\n";

#[test]
fn stdin_queues_message_with_received_header_and_attributes() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &[],
        &request(
            MESSAGE,
            b"a@example.org",
            &[b"b@example.net", b"c@example.net"],
        ),
    );
    let text = reply(&out);
    let id = text
        .strip_prefix("KOk: queued as ")
        .unwrap_or_else(|| panic!("{}", describe(&out)));
    assert_eq!(out.status.code(), Some(0));
    let new = q.files("new");
    assert_eq!(new.len(), 1);
    assert!(q.files("tmp").is_empty());
    let name = new[0].file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with(&format!("{id}.")), "{name} names {id}");
    let mode = std::fs::metadata(&new[0]).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "queue files are not world-readable");
    let file = QueueFile::read(&new[0]);
    assert!(file.attributes.starts_with("qmqpd-queue 1\n"));
    assert_eq!(file.attribute("queue_id"), Some(id));
    assert_eq!(file.attribute("client_address"), Some("127.0.0.1"));
    assert_eq!(file.attribute("client_port"), Some("40000"));
    assert_eq!(file.attribute("protocol_name"), Some("QMQP"));
    assert!(
        file.attribute("arrival_time")
            .is_some_and(|t| t.contains('.'))
    );
    let message = String::from_utf8(file.message.clone()).unwrap();
    let (received, rest) = message.split_at(message.find("From: a@").unwrap());
    assert!(
        received.starts_with("Received: from unknown (unknown [127.0.0.1])\n\tby "),
        "{received}"
    );
    assert!(
        received.contains(&format!(" (qmqpd) with QMQP id {id}; ")),
        "{received}"
    );
    assert!(!received.contains(" for "), "no for clause: {received}");
    assert!(received.ends_with(" +0000\n"), "{received}");
    assert_eq!(rest.as_bytes(), MESSAGE);
    assert_eq!(file.sender, b"a@example.org");
    assert_eq!(
        file.recipients,
        vec![b"b@example.net".to_vec(), b"c@example.net".to_vec()]
    );
    let log = q.log_text();
    for line in [
        "connect from unknown[127.0.0.1]".to_owned(),
        format!("{id}: client=unknown[127.0.0.1]"),
        format!("{id}: message-id=<m1@example.org>"),
        format!(
            "{id}: from=<a@example.org>, size={}, nrcpt=2 (queued)",
            MESSAGE.len()
        ),
        "disconnect from unknown[127.0.0.1]".to_owned(),
    ] {
        assert!(log.contains(&line), "log has {line:?}:\n{log}");
    }
}

#[test]
fn stdin_accepts_empty_sender_and_verp_sender_as_is() {
    let q = TestQueue::new();
    let out = serve(&q, &[], &request(b"x\n", b"", &[b"r@example.net"]));
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    let out = serve(
        &q,
        &[],
        &request(b"x\n", b"list-owner-@example.org-@[]", &[b"r@example.net"]),
    );
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    let senders: Vec<Vec<u8>> = q
        .files("new")
        .iter()
        .map(|p| QueueFile::read(p).sender)
        .collect();
    assert!(senders.contains(&b"list-owner-@example.org-@[]".to_vec()));
    assert!(senders.contains(&Vec::new()));
}

#[test]
fn stdin_rejects_too_large_request_at_its_length() {
    let q = TestQueue::new();
    let req = request(&[b'x'; 300], b"s@x", &[b"r@x"]);
    let out = serve(&q, &["-o", "message_size_limit=100"], &req);
    assert_rejected(&q, &out, "DError: message too large", 0);
    assert!(
        q.log_text()
            .contains("warning: NOQUEUE: unknown[127.0.0.1]: Error: message too large"),
        "{}",
        q.log_text()
    );
    let out = serve(&q, &[], b"99999999999999999999999999:");
    assert_rejected(&q, &out, "DError: message too large", 0);
}

#[test]
fn stdin_rejects_bad_netstrings_saying_where() {
    let q = TestQueue::new();
    let cases: &[(&[u8], &str)] = &[
        (b"x:", "receiving QMQP packet header"),
        (b"01:", "receiving QMQP packet header"),
        (b"12:1x", "receiving message content"),
        (b"12:01:", "receiving message content"),
        (b"9:2:ab;", "receiving message content"),
        (b"10:30:", "receiving message content"),
        (b"12:1:a,x:", "receiving sender address"),
        (b"12:1:a,9:a", "receiving sender address"),
        (b"13:1:a,0:,1:r;", "receiving recipient address"),
        (b"13:1:a,0:,1:r,;", "receiving recipient address"),
        (b"10:1:a,0:,3:r", "receiving recipient address"),
    ];
    for (input, at) in cases {
        let out = serve(&q, &[], input);
        assert_rejected(&q, &out, &format!("Dnetstring format error while {at}"), 0);
    }
}

#[test]
fn stdin_rejects_long_sender_and_recipient_at_their_length() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &["-o", "line_length_limit=10"],
        &request(b"x", b"sender-longer-than-10@x", &[b"r@x"]),
    );
    assert_rejected(
        &q,
        &out,
        "Dnetstring length exceeds storage limit while receiving sender address",
        0,
    );
    let out = serve(
        &q,
        &["-o", "line_length_limit=10"],
        &request(b"x", b"s@x", &[b"r@x", b"recipient-longer@x"]),
    );
    assert_rejected(
        &q,
        &out,
        "Dnetstring length exceeds storage limit while receiving recipient address",
        0,
    );
}

#[test]
fn stdin_rejects_bad_addresses() {
    let q = TestQueue::new();
    for sender in [&b"a\0b"[..], b"a\nb", b"a\rb"] {
        let out = serve(&q, &[], &request(b"x", sender, &[b"r@x"]));
        assert_rejected(&q, &out, "DError: bad sender address syntax", 0);
    }
    for rcpt in [&b""[..], b"a\0b", b"a\nb", b"a\rb"] {
        let out = serve(&q, &[], &request(b"x", b"s@x", &[b"ok@x", rcpt]));
        assert_rejected(&q, &out, "DError: bad recipient address syntax", 0);
    }
}

#[test]
fn stdin_rejects_verp_delimiters_outside_filter() {
    let q = TestQueue::new();
    let out = serve(&q, &[], &request(b"x", b"list#@example.org-@[]", &[b"r@x"]));
    assert_rejected(
        &q,
        &out,
        "DError: Invalid VERP delimiters: \"#=\". Need two characters from \"-=+\"",
        0,
    );
    let out = serve(
        &q,
        &["-o", "verp_delimiter_filter=#="],
        &request(b"x", b"list#@example.org-@[]", &[b"r@x"]),
    );
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
}

#[test]
fn stdin_rejects_request_without_recipients() {
    let q = TestQueue::new();
    let out = serve(&q, &[], &request(b"x", b"s@x", &[]));
    assert_rejected(&q, &out, "DError: no recipients specified", 0);
}

#[test]
fn stdin_counts_hops_with_our_header() {
    let q = TestQueue::new();
    let headers = |n: usize| {
        let mut m = Vec::new();
        for i in 0..n {
            m.extend_from_slice(format!("Received: from hop{i}\n").as_bytes());
        }
        m.extend_from_slice(b"Subject: x\n\nReceived: in the body does not count\n");
        m
    };
    let out = serve(
        &q,
        &["-o", "hopcount_limit=5"],
        &request(&headers(4), b"s@x", &[b"r@x"]),
    );
    assert_rejected(&q, &out, "DError: too many hops", 0);
    let out = serve(
        &q,
        &["-o", "hopcount_limit=5"],
        &request(&headers(3), b"s@x", &[b"r@x"]),
    );
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    let out = serve(&q, &[], &request(&headers(49), b"s@x", &[b"r@x"]));
    assert_eq!(reply(&out), "DError: too many hops");
}

#[test]
fn stdin_rejects_greenarrow_streaming() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &[],
        &request(b"M", b"id-1", &[b"message", b"s@x", b"r@x"]),
    );
    assert_rejected(&q, &out, "DError: streaming QMQP is not supported", 0);
}

#[test]
fn stdin_soft_bounce_turns_d_into_z() {
    let q = TestQueue::new();
    let out = serve(&q, &["-o", "soft_bounce=yes"], &request(b"x", b"s@x", &[]));
    assert_rejected(&q, &out, "ZError: no recipients specified", 0);
}

#[test]
fn stdin_waits_error_delay_before_rejecting() {
    let q = TestQueue::new();
    let started = Instant::now();
    let out = serve(
        &q,
        &["-o", "qmqpd_error_delay=1s"],
        &request(b"x", b"s@x", &[]),
    );
    assert_eq!(reply(&out), "DError: no recipients specified");
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[test]
fn stdin_denies_unidentified_pipe_and_says_how_to_identify() {
    let q = TestQueue::new();
    let mut cmd = common::stdin_qmqpd(&q, &[]);
    cmd.env_remove("PROTO").env_remove("TCPREMOTEIP");
    let out = run_bounded(&mut cmd, &request(b"x", b"s@x", &[b"r@x"]), LIMIT);
    assert_rejected(
        &q,
        &out,
        "DError: unknown[unknown] is not authorized to use this service",
        0,
    );
    let log = q.log_text();
    assert!(
        log.contains(
            "warning: NOQUEUE: unknown[unknown]: Error: unknown[unknown] is not authorized"
        ),
        "{log}"
    );
    assert!(log.contains("PROTO=TCP TCPREMOTEIP="), "{log}");
}

#[test]
fn stdin_denies_client_outside_access_list() {
    let q = TestQueue::new();
    let mut cmd = common::stdin_qmqpd(&q, &[]);
    cmd.env("TCPREMOTEIP", "192.0.2.1");
    let out = run_bounded(&mut cmd, &request(b"x", b"s@x", &[b"r@x"]), LIMIT);
    assert_rejected(
        &q,
        &out,
        "DError: unknown[192.0.2.1] is not authorized to use this service",
        0,
    );
}

#[test]
fn stdin_access_list_forms_decide() {
    let q = TestQueue::new();
    let list_file = q.dir.path().join("clients");
    std::fs::write(
        &list_file,
        "# trusted senders\n192.0.2.0/24\n  [2001:db8::]/32\n!198.51.100.7 198.51.100.0/24\n",
    )
    .unwrap();
    let file_pattern = list_file.display().to_string();
    let cases: &[(&str, &str, Option<&str>, bool)] = &[
        ("192.0.2.1", "192.0.2.1", None, true),
        ("192.0.2.0/24", "192.0.2.77", None, true),
        ("192.0.2.0/24", "192.0.3.1", None, false),
        ("!192.0.2.7, 192.0.2.0/24", "192.0.2.7", None, false),
        ("!192.0.2.7, 192.0.2.0/24", "192.0.2.8", None, true),
        ("[2001:db8::1]", "2001:db8::1", None, true),
        ("[2001:db8::]/32", "2001:db8:1::5", None, true),
        ("2001:db8::/32", "2001:db8:1::5", None, true),
        ("127.0.0.0/8", "::ffff:127.0.0.9", None, true),
        ("!127.0.0.1 [::]/0", "::ffff:127.0.0.1", None, false),
        ("mx.example.com", "192.0.2.1", Some("MX.Example.com"), true),
        ("mx.example.com", "192.0.2.1", None, false),
        (".example.com", "192.0.2.1", Some("a.b.example.com"), true),
        (".example.com", "192.0.2.1", Some("example.com"), false),
        ("example.com", "192.0.2.1", Some("a.example.com"), true),
        ("example.com", "192.0.2.1", Some("badexample.com"), false),
        (&file_pattern, "192.0.2.9", None, true),
        (&file_pattern, "2001:db8::9", None, true),
        (&file_pattern, "198.51.100.7", None, false),
        (&file_pattern, "198.51.100.8", None, true),
        (&file_pattern, "203.0.113.1", None, false),
        ("", "127.0.0.1", None, false),
    ];
    for (list, ip, host, allowed) in cases {
        let mut cmd = common::stdin_qmqpd(&q, &["-o", &format!("qmqpd_authorized_clients={list}")]);
        cmd.env("TCPREMOTEIP", ip);
        if let Some(host) = host {
            cmd.env("TCPREMOTEHOST", host);
        }
        let out = run_bounded(&mut cmd, &request(b"x", b"s@x", &[b"r@x"]), LIMIT);
        let got = reply(&out);
        assert_eq!(
            got.starts_with('K'),
            *allowed,
            "list {list:?} client {ip} {host:?}: {got}"
        );
    }
}

#[test]
fn stdin_broken_access_list_answers_z_and_exits_78() {
    let q = TestQueue::new();
    for list in [
        "hash:/etc/qmqpd/clients",
        "192.168.0.1/24",
        "010.0.0.0/8",
        "/nonexistent/list",
    ] {
        let out = serve(
            &q,
            &["-o", &format!("qmqpd_authorized_clients={list}")],
            &request(b"x", b"s@x", &[b"r@x"]),
        );
        assert_rejected(&q, &out, "ZError: internal error", 78);
    }
    let log = q.log_text();
    assert!(log.contains("hash:/etc/qmqpd/clients"), "{log}");
}

#[test]
fn stdin_configuration_error_answers_z_and_exits_78() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &["-o", "qmqpd_timeout=soon"],
        &request(b"x", b"s@x", &[b"r@x"]),
    );
    assert_rejected(&q, &out, "ZError: internal error", 78);
    assert!(
        q.log_text().is_empty() || q.log_text().contains("qmqpd_timeout"),
        "{}",
        q.log_text()
    );
}

#[test]
fn stdin_reads_main_cf_syntax() {
    let q = TestQueue::new();
    std::fs::write(
        q.config_dir().join("main.cf"),
        "# comment\nmy_limit = 2\nhopcount_limit =\n  # between\n  $my_limit\nmail_name = ${name_of_mail}\nname_of_mail = qmq$(suffix)\nsuffix = pd-test\n",
    )
    .unwrap();
    let out = serve(&q, &[], &request(b"Received: a\n\nx", b"s@x", &[b"r@x"]));
    assert_rejected(&q, &out, "DError: too many hops", 0);
    let out = serve(
        &q,
        &["-o", "hopcount_limit=3"],
        &request(b"Received: a\n\nx", b"s@x", &[b"r@x"]),
    );
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    let file = QueueFile::read(&q.files("new")[0]);
    assert!(String::from_utf8_lossy(&file.message).contains("(qmqpd-test) with QMQP id"));
    let log = q.log_text();
    assert!(
        log.contains("unknown parameter") && log.contains("my_limit"),
        "{log}"
    );
}

#[test]
fn print_explicit_and_defaults_use_postconf_format() {
    let q = TestQueue::new();
    std::fs::write(
        q.config_dir().join("main.cf"),
        "soft_bounce = yes\nmail_name = $myhostname x\n",
    )
    .unwrap();
    let mut cmd = Command::new(common::qmqpd_bin());
    cmd.args([
        "-c",
        &q.config_dir().display().to_string(),
        "-o",
        "hopcount_limit=7",
        "-n",
    ]);
    let out = run_bounded(&mut cmd, b"", LIMIT);
    assert_eq!(
        common::text(&out.stdout),
        "hopcount_limit = 7\nmail_name = $myhostname x\nsoft_bounce = yes\n"
    );
    let out = run_bounded(Command::new(common::qmqpd_bin()).arg("-d"), b"", LIMIT);
    let text = common::text(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .map(|l| l.split(" = ").next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    for line in [
        "qmqpd_timeout = 300s",
        "message_size_limit = 10240000",
        "qmqpd_authorized_clients = 127.0.0.0/8, [::1]/128",
    ] {
        assert!(text.lines().any(|l| l == line), "{line}:\n{text}");
    }
}

#[test]
fn stdin_rewrites_from_line_and_leading_space() {
    let q = TestQueue::new();
    let out = serve(
        &q,
        &[],
        &request(
            b">From someone Sat Nov 28\nSubject: x\n\nb\n",
            b"s@x",
            &[b"r@x"],
        ),
    );
    assert!(reply(&out).starts_with("KOk"));
    let msg = String::from_utf8(QueueFile::read(&q.files("new")[0]).message).unwrap();
    assert!(
        msg.contains("\nX-Mailbox-Line: >From someone Sat Nov 28\nSubject: x\n"),
        "{msg}"
    );
    std::fs::remove_file(&q.files("new")[0]).unwrap();
    let out = serve(&q, &[], &request(b" indented\n", b"s@x", &[b"r@x"]));
    assert!(reply(&out).starts_with("KOk"));
    let msg = String::from_utf8(QueueFile::read(&q.files("new")[0]).message).unwrap();
    assert!(msg.ends_with(" +0000\n\n indented\n"), "{msg}");
}

#[test]
fn stdin_writes_ipv6_client_as_address_literal() {
    let q = TestQueue::new();
    let mut cmd = common::stdin_qmqpd(&q, &[]);
    cmd.env("PROTO", "TCP6")
        .env("TCP6REMOTEIP", "::1")
        .env_remove("TCPREMOTEIP");
    let out = run_bounded(&mut cmd, &request(b"x\n", b"s@x", &[b"r@x"]), LIMIT);
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    let file = QueueFile::read(&q.files("new")[0]);
    assert!(
        String::from_utf8_lossy(&file.message)
            .starts_with("Received: from unknown (unknown [IPv6:::1])")
    );
    assert_eq!(file.attribute("client_address"), Some("::1"));
}

#[test]
fn stdin_write_error_answers_z_and_leaves_no_tmp_file() {
    let q = TestQueue::new();
    // Ignore SIGXFSZ so that exceeding RLIMIT_FSIZE makes write() fail with EFBIG.
    let mut script = String::from("trap '' XFSZ; ulimit -f 4; exec \"$0\" \"$@\"");
    script.push('\n');
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(&script)
        .arg(common::qmqpd_bin())
        .args(q.args())
        .env("PROTO", "TCP")
        .env("TCPREMOTEIP", "127.0.0.1")
        .env_remove("LISTEN_FDS");
    let out = run_bounded(
        &mut cmd,
        &request(&vec![b'x'; 64 * 1024], b"s@x", &[b"r@x"]),
        LIMIT,
    );
    assert_rejected(&q, &out, "ZError: queue file write error", 75);
    assert!(
        q.log_text().contains("cannot write queue file"),
        "{}",
        q.log_text()
    );
}

#[test]
fn stdin_read_timeout_queues_nothing_and_logs_where() {
    let q = TestQueue::new();
    let mut child = common::stdin_qmqpd(&q, &["-o", "qmqpd_timeout=1s"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"100:20:partial").unwrap();
    let status = common::wait_bounded(&mut child, LIMIT).expect("qmqpd ends by its timeout");
    drop(stdin);
    assert_eq!(status.code(), Some(0));
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    let log = q.log_text();
    assert!(
        log.contains(": unknown[127.0.0.1]: read timeout while receiving message content"),
        "{log}"
    );
}

#[test]
fn stdin_daemon_timeout_ends_a_dribbling_client() {
    let q = TestQueue::new();
    let mut child =
        common::stdin_qmqpd(&q, &["-o", "qmqpd_timeout=30s", "-o", "daemon_timeout=2s"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let dribbler = std::thread::spawn(move || {
        stdin.write_all(b"100000:99990:").ok();
        // One byte every 200 ms, for at most 60 s: qmqpd_timeout never fires.
        for _ in 0..300 {
            if stdin.write_all(b"x").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let status = common::wait_bounded(&mut child, LIMIT).expect("daemon_timeout ends qmqpd");
    dribbler.join().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
    assert!(
        q.log_text()
            .contains("read timeout while receiving message content"),
        "{}",
        q.log_text()
    );
}

#[test]
fn stdin_truncated_request_at_every_offset_queues_nothing() {
    let q = TestQueue::new();
    let req = request(
        b"Subject: x\n\nbody\n",
        b"s@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let out = serve(&q, &[], b"");
    assert!(
        out.stdout.is_empty(),
        "no reply to nothing: {}",
        describe(&out)
    );
    assert!(
        q.log_text()
            .contains("lost connection while receiving QMQP packet header")
    );
    // Input that ends early is a request cut short by the client's shutdown of its sending
    // side: answered as Postfix answers it, with a format error where it ends.
    for cut in 1..req.len() {
        let out = serve(&q, &[], &req[..cut]);
        assert!(
            reply(&out).starts_with("Dnetstring format error while receiving "),
            "request cut at {cut}: {}",
            describe(&out)
        );
        assert_eq!(out.status.code(), Some(0), "cut at {cut}");
    }
    assert!(q.files("new").is_empty(), "nothing queued");
    assert!(q.files("tmp").is_empty(), "nothing left in tmp/");
    let log = q.log_text();
    for at in [
        "receiving QMQP packet header",
        "receiving message content",
        "receiving sender address",
        "receiving recipient address",
    ] {
        assert!(
            log.contains(&format!("netstring format error while {at}")),
            "{at}:\n{log}"
        );
    }
    let out = serve(&q, &[], &req);
    assert!(
        reply(&out).starts_with("KOk"),
        "the whole request is accepted: {}",
        describe(&out)
    );
}

#[test]
fn stale_tmp_files_stay_after_a_one_shot_and_go_with_the_deliverer() {
    let q = TestQueue::new();
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(q.queue_dir().join(sub)).unwrap();
    }
    let stale = q.queue_dir().join("tmp/stale.host");
    let fresh = q.queue_dir().join("tmp/fresh.host");
    std::fs::write(&stale, b"x").unwrap();
    std::fs::write(&fresh, b"x").unwrap();
    let old = std::time::SystemTime::now() - Duration::from_secs(37 * 3600);
    std::fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let out = serve(&q, &[], &request(b"x", b"s@x", &[b"r@x"]));
    assert!(reply(&out).starts_with("KOk"));
    assert!(
        stale.exists(),
        "a one-shot does not scan tmp/ for each message"
    );
    let mut deliver = Command::new(env!("CARGO_BIN_EXE_qmqp-queue"));
    deliver.args(q.args()).env_remove("MAIL_CONFIG").args([
        "deliver",
        "--once",
        "--exec",
        "/bin/true",
    ]);
    let out = run_bounded(&mut deliver, b"", LIMIT);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        !stale.exists(),
        "qmqp-queue deliver removes a tmp/ file older than 36 hours"
    );
    assert!(
        fresh.exists(),
        "a fresh tmp/ file may belong to a running transaction"
    );
    assert!(q.files("new").is_empty(), "the message was delivered");
}

#[test]
fn stdin_never_reads_past_the_outer_comma() {
    // In a ucspi pipeline the input may be shared: what follows the request stays unread.
    let q = TestQueue::new();
    let mut input = request(b"x\n", b"s@x", &[b"r@x"]);
    input.extend_from_slice(b"TRAILING BYTES");
    let file = q.dir.path().join("request");
    std::fs::write(&file, &input).unwrap();
    let rest = q.dir.path().join("rest");
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("\"$0\" \"$@\"; cat > \"$REST\"")
        .arg(common::qmqpd_bin())
        .args(q.args())
        .env("REST", &rest)
        .env("PROTO", "TCP")
        .env("TCPREMOTEIP", "127.0.0.1")
        .env_remove("LISTEN_FDS");
    let out = common::run_bounded_from(
        &mut cmd,
        Stdio::from(std::fs::File::open(&file).unwrap()),
        LIMIT,
    );
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    assert_eq!(std::fs::read(&rest).unwrap(), b"TRAILING BYTES");
}

#[test]
fn a_socket_on_stdin_with_a_pipe_on_stdout_gets_its_reply_on_the_pipe() {
    // A socket is written with send(2) first; stdout that is not one is written the plain way.
    let q = TestQueue::new();
    let (client, server_side) = std::os::unix::net::UnixStream::pair().unwrap();
    (&client)
        .write_all(&request(b"x\n", b"s@x", &[b"r@x"]))
        .unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    let stdin = Stdio::from(std::os::fd::OwnedFd::from(server_side));
    let out = common::run_bounded_from(&mut common::stdin_qmqpd(&q, &[]), stdin, LIMIT);
    assert!(reply(&out).starts_with("KOk"), "{}", describe(&out));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(q.files("new").len(), 1);
}

/// A qmqpd started by a test, killed should the test end before it exits.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Running {
    /// Writes one request on qmqpd's stdin, closes it, and waits for qmqpd to exit.
    fn send_and_wait(&mut self) -> std::process::ExitStatus {
        let mut input = self.0.stdin.take().expect("stdin is piped");
        input
            .write_all(&request(b"x\n", b"s@x", &[b"r@x"]))
            .expect("cannot write the request");
        drop(input);
        common::wait_bounded(&mut self.0, LIMIT).expect("qmqpd exits")
    }
}

#[test]
fn a_reply_to_a_client_gone_from_a_pipe_ends_the_process_normally_not_by_sigpipe() {
    // Started with SIGPIPE at its default (as Command leaves it), qmqpd ignores it itself:
    // writing the reply into a pipe nobody reads is a lost client, and the message it had
    // already committed stays queued.
    let q = TestQueue::new();
    // (close-on-exec, so no child that another test starts meanwhile keeps a read end)
    let (reply_rd, reply_wr) = std::io::pipe().unwrap();
    drop(reply_rd);
    let mut qmqpd = Running(
        common::stdin_qmqpd(&q, &[])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(reply_wr))
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let status = qmqpd.send_and_wait();
    assert_eq!(status.code(), Some(0), "ended by {status:?}");
    assert_eq!(q.files("new").len(), 1);
    let log = q.log_text();
    assert!(log.contains("lost connection"), "{log}");
}

#[test]
fn a_closed_stderr_is_opened_on_dev_null_before_anything_else_can_take_its_number() {
    // With descriptor 2 closed by the launcher, the first file qmqpd opened (its log file)
    // would become "standard error"; qmqpd opens /dev/null there first.
    let q = TestQueue::new();
    let mut sh = Command::new("sh");
    common::clear_qmqpd_env(&mut sh);
    let mut qmqpd = Running(
        sh.arg("-c")
            .arg(r#"exec "$0" "$@" 2>&-"#)
            .arg(common::qmqpd_bin())
            .args(q.args())
            .env("PROTO", "TCP")
            .env("TCPREMOTEIP", "127.0.0.1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let fd2 = format!("/proc/{}/fd/2", qmqpd.0.id());
    // qmqpd has started when it has written its first log line (it then waits for input).
    common::wait_until("the connect line", || q.log_text().contains("connect from"));
    let target = std::fs::read_link(&fd2);
    let status = qmqpd.send_and_wait();
    assert_eq!(
        target.ok(),
        Some(std::path::PathBuf::from("/dev/null")),
        "{fd2}"
    );
    assert_eq!(status.code(), Some(0));
    assert_eq!(q.files("new").len(), 1);
}
