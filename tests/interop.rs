//! Real QMQP clients written elsewhere against qmqpd: Postfix's qmqp-source,
//! nullmailer's qmqp module, and our own qmqpc's exit codes. A test whose tool is missing is
//! skipped with the reason, or fails under QMQPD_REQUIRE_INTEROP=1.

mod common;

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    QueueFile, Server, TestQueue, describe, interop_tool, qmqpc_bin, run_bounded, run_bounded_from,
};

/// Safety net for a client run: far longer than any of these runs takes.
const RUN_LIMIT: Duration = Duration::from_secs(300);

/// Runs nullmailer's qmqp module against `server` with the queue file `mail` on fd 3 and
/// its options on stdin (nullmailer 2.x). fd 3 is set up by /bin/sh, since std cannot pass
/// an extra descriptor without unsafe code.
fn run_nullmailer(tool: &Path, server: &Server, mail: &Path) -> std::process::Output {
    let options = format!("host=127.0.0.1\nport={}\n\n", server.addr.port());
    run_bounded(
        Command::new("/bin/sh")
            .arg("-c")
            .arg("exec \"$0\" 3<\"$1\"")
            .arg(tool)
            .arg(mail),
        options.as_bytes(),
        RUN_LIMIT,
    )
}

/// Writes a nullmailer queue file: sender line, recipient lines, empty line, message.
fn write_nullmailer_mail(path: &Path, sender: &str, recipients: &[&str], message: &[u8]) {
    let mut bytes = format!("{sender}\n").into_bytes();
    for rcpt in recipients {
        bytes.extend_from_slice(format!("{rcpt}\n").as_bytes());
    }
    bytes.push(b'\n');
    bytes.extend_from_slice(message);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn qmqp_source_200_messages_4_sessions_3_recipients_all_land() {
    let Some(tool) = interop_tool("QMQPD_POSTFIX_ROOT", "usr/sbin/qmqp-source") else {
        return;
    };
    let q = TestQueue::new();
    let server = Server::start(&q, &[]);
    let output = run_bounded(
        tool.command().args([
            "-s",
            "4",
            "-m",
            "200",
            "-r",
            "3",
            "-l",
            "1024",
            "-f",
            "sender@example.org",
            "-t",
            "rcpt@example.net",
            &server.address(),
        ]),
        b"",
        RUN_LIMIT,
    );
    assert!(
        output.status.success(),
        "qmqp-source failed: {}\nlog:\n{}",
        describe(&output),
        q.log_text()
    );
    let files = q.files("new");
    assert_eq!(files.len(), 200, "log:\n{}", q.log_text());
    for path in &files {
        let file = QueueFile::read(path);
        assert!(file.attributes.starts_with("qmqpd-queue 1\n"), "{file:?}");
        assert_eq!(file.sender, b"sender@example.org");
        assert_eq!(file.recipients.len(), 3, "{}", path.display());
        for rcpt in &file.recipients {
            assert!(rcpt.ends_with(b"rcpt@example.net"), "{file:?}");
        }
        assert!(file.message.starts_with(b"Received: from "), "{file:?}");
        assert!(file.message.len() >= 1024, "{}", path.display());
    }
    assert!(q.files("tmp").is_empty());
}

#[test]
fn nullmailer_qmqp_exits_0_on_accept() {
    let Some(tool) = interop_tool("QMQPD_NULLMAILER_ROOT", "usr/lib/nullmailer/qmqp") else {
        return;
    };
    let q = TestQueue::new();
    let server = Server::start(&q, &[]);
    let mail = q.dir.path().join("mail");
    let message = b"From: a@example.org\nSubject: nullmailer test\n\nbody\n";
    write_nullmailer_mail(
        &mail,
        "sender@example.org",
        &["rcpt1@example.net", "rcpt2@example.net"],
        message,
    );
    let output = run_nullmailer(&tool.path, &server, &mail);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        describe(&output),
        q.log_text()
    );
    let files = q.files("new");
    assert_eq!(files.len(), 1, "log:\n{}", q.log_text());
    let file = QueueFile::read(&files[0]);
    assert_eq!(file.sender, b"sender@example.org");
    assert_eq!(
        file.recipients,
        vec![b"rcpt1@example.net".to_vec(), b"rcpt2@example.net".to_vec()]
    );
    assert!(file.message.ends_with(message), "{file:?}");
}

#[test]
fn nullmailer_qmqp_exits_35_not_14_when_3mb_request_denied() {
    let Some(tool) = interop_tool("QMQPD_NULLMAILER_ROOT", "usr/lib/nullmailer/qmqp") else {
        return;
    };
    let q = TestQueue::new();
    // 192.0.2.1 (TEST-NET-1) is only a pattern here: 127.0.0.1 is not authorized.
    let server = Server::start(&q, &["-o", "qmqpd_authorized_clients=192.0.2.1"]);
    let mail = q.dir.path().join("mail");
    let mut message = b"From: a@example.org\nSubject: big\n\n".to_vec();
    let line = [b'x'; 99];
    while message.len() < 3 * 1024 * 1024 {
        message.extend_from_slice(&line);
        message.push(b'\n');
    }
    write_nullmailer_mail(&mail, "sender@example.org", &["rcpt@example.net"], &message);
    let output = run_nullmailer(&tool.path, &server, &mail);
    assert_eq!(
        output.status.code(),
        Some(35),
        "nullmailer must see the permanent D (35), not a write error (14): {}\nlog:\n{}",
        describe(&output),
        q.log_text()
    );
    assert!(q.files("new").is_empty());
    assert!(q.files("tmp").is_empty());
    assert!(
        q.log_text().contains("is not authorized"),
        "log:\n{}",
        q.log_text()
    );
}

#[test]
fn qmqpc_exit_codes() {
    let q = TestQueue::new();
    let message = b"From: a@example.org\nSubject: qmqpc\n\nbody\n";
    let qmqpc = |server: &str, stdin: &[u8], args: &[&str]| {
        run_bounded(
            Command::new(qmqpc_bin())
                .args(["-s", server, "-t", "60"])
                .args(args),
            stdin,
            RUN_LIMIT,
        )
    };

    // K -> 0, message from a pipe.
    let server = Server::start(&q, &[]);
    let out = qmqpc(
        &server.address(),
        message,
        &["-f", "s@example.org", "r@example.net"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        out.stdout.starts_with(b"KOk: queued as "),
        "{}",
        describe(&out)
    );

    // K -> 0, message streamed from a regular file, null sender.
    let path = q.dir.path().join("message");
    std::fs::write(&path, message).unwrap();
    let out = run_bounded_from(
        Command::new(qmqpc_bin()).args(["-s", &server.address(), "-f", "", "--", "r2@example.net"]),
        Stdio::from(File::open(&path).unwrap()),
        RUN_LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let files = q.files("new");
    assert_eq!(files.len(), 2, "log:\n{}", q.log_text());
    let senders: Vec<Vec<u8>> = files.iter().map(|f| QueueFile::read(f).sender).collect();
    assert!(senders.contains(&b"".to_vec()), "{senders:?}");
    for f in &files {
        assert!(QueueFile::read(f).message.ends_with(message));
    }
    drop(server);

    // D -> 65: the client is not authorized.
    let denied = TestQueue::new();
    let server = Server::start(&denied, &["-o", "qmqpd_authorized_clients=192.0.2.1"]);
    let out = qmqpc(
        &server.address(),
        message,
        &["-f", "s@example.org", "r@example.net"],
    );
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(out.stdout.starts_with(b"D"), "{}", describe(&out));
    drop(server);

    // No server listening -> 75.
    let port = common::free_port();
    let out = qmqpc(&format!("127.0.0.1:{port}"), message, &["-f", "s", "r"]);
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot connect"),
        "{}",
        describe(&out)
    );

    // Usage errors -> 64.
    for args in [
        &["r@example.net"][..],
        &["-f", "s"],
        &["-x", "-f", "s", "r"],
    ] {
        let out = run_bounded(Command::new(qmqpc_bin()).args(args), b"", RUN_LIMIT);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", describe(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage: qmqpc"),
            "{}",
            describe(&out)
        );
    }
}
