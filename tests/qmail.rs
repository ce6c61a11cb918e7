//! qmail-qmqpc, the canonical QMQP client (mini-qmail, ezmlm-idx), against qmqpd.
//!
//! qmail-qmqpc is built from the vendored notqmail source by `.ci/setup/20-notqmail.sh`,
//! which exports `QMQPD_QMAIL_QMQPC`. It is used the mini-qmail way: the message on fd 0,
//! the envelope on fd 1 in qmail-queue's format (`F<sender>\0`, `T<rcpt>\0` each, `\0`),
//! and it tries the servers of `control/qmqpservers` under its compiled-in qmail home (the
//! `qmail` directory beside its `bin`), port 628 of each IPv4 address. Each test gives its
//! servers loopback addresses of their own (127.0.0.61–69) and holds a lock on that shared
//! control file while it runs. Missing tool: skipped with the reason, or a failure under
//! `QMQPD_REQUIRE_INTEROP=1`.

mod common;

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use common::{QueueFile, Server, TestQueue};
use nix::fcntl::{Flock, FlockArg};

/// A safety net for qmail-qmqpc (its own timeouts: 10 s to connect, 60 s a read).
const LIMIT: Duration = Duration::from_secs(180);
/// QMQP's port, the only one qmail-qmqpc knows.
const QMQP_PORT: u16 = 628;

const MESSAGE: &[u8] = b"From: list@lists.example.org\nTo: subscriber@example.net\n\
Subject: from mini-qmail\n\nbody line\n";

/// qmail-qmqpc and its qmail home.
struct QmailQmqpc {
    bin: PathBuf,
    home: PathBuf,
}

impl QmailQmqpc {
    /// The built qmail-qmqpc, or None (skipped) / a panic under QMQPD_REQUIRE_INTEROP=1.
    fn find() -> Option<QmailQmqpc> {
        let bin = common::built_tool("QMQPD_QMAIL_QMQPC")?;
        let home = bin
            .parent()
            .and_then(Path::parent)
            .map(|prefix| prefix.join("qmail"))
            .expect("qmail-qmqpc lives in PREFIX/bin");
        fs::create_dir_all(home.join("control")).expect("cannot create the qmail control dir");
        Some(QmailQmqpc { bin, home })
    }

    /// Takes the lock on control/qmqpservers (held until the guard drops) and writes `ips`
    /// into it, one a line.
    fn servers(&self, ips: &[&str]) -> Flock<File> {
        let lock = File::create(self.home.join("control/.qmqpservers.lock"))
            .expect("cannot create the lock file");
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .unwrap_or_else(|(_, e)| panic!("cannot lock control/qmqpservers: {e}"));
        let mut text = ips.join("\n");
        text.push('\n');
        fs::write(self.home.join("control/qmqpservers"), text)
            .expect("cannot write control/qmqpservers");
        lock
    }

    /// Runs qmail-qmqpc with `message` on fd 0 and the envelope on fd 1; its exit status
    /// (it prints nothing).
    fn send(&self, dir: &Path, message: &[u8], sender: &str, recipients: &[&str]) -> ExitStatus {
        let mut envelope = format!("F{sender}\0").into_bytes();
        for rcpt in recipients {
            envelope.extend_from_slice(format!("T{rcpt}\0").as_bytes());
        }
        envelope.push(0);
        let envelope_path = dir.join("envelope");
        fs::write(&envelope_path, envelope).expect("cannot write the envelope");
        let message_path = dir.join("message");
        fs::write(&message_path, message).expect("cannot write the message");
        let mut cmd = Command::new(&self.bin);
        cmd.stdin(File::open(&message_path).expect("message"))
            .stdout(File::open(&envelope_path).expect("envelope"))
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("cannot start qmail-qmqpc");
        common::wait_bounded(&mut child, LIMIT)
            .unwrap_or_else(|| panic!("qmail-qmqpc still running after {LIMIT:?}: killed"))
    }
}

/// A qmqpd listening on `ip`:628.
fn server_on(q: &TestQueue, ip: &str, extra: &[&str]) -> Server {
    let addr: SocketAddr = format!("{ip}:{QMQP_PORT}").parse().expect("address");
    Server::start_on(q, addr, extra)
}

#[test]
fn qmail_qmqpc_hands_message_to_qmqpd() {
    let Some(qmqpc) = QmailQmqpc::find() else {
        return;
    };
    let _lock = qmqpc.servers(&["127.0.0.61"]);
    let q = TestQueue::new();
    let _server = server_on(&q, "127.0.0.61", &[]);
    let status = qmqpc.send(
        q.dir.path(),
        MESSAGE,
        "list-owner@lists.example.org",
        &["a@example.net", "b@example.org"],
    );
    assert_eq!(status.code(), Some(0), "{status}\n{}", q.log_text());
    let files = q.files("new");
    assert_eq!(files.len(), 1, "one queue file:\n{}", q.log_text());
    let stored = QueueFile::read(&files[0]);
    assert_eq!(stored.sender, b"list-owner@lists.example.org");
    assert_eq!(
        stored.recipients,
        [b"a@example.net".to_vec(), b"b@example.org".to_vec()]
    );
    assert!(stored.message.starts_with(b"Received: from "));
    assert!(stored.message.ends_with(MESSAGE), "the message as sent");
}

#[test]
fn qmail_qmqpc_exits_permanent_failure_on_d() {
    let Some(qmqpc) = QmailQmqpc::find() else {
        return;
    };
    let _lock = qmqpc.servers(&["127.0.0.64"]);
    let q = TestQueue::new();
    // qmail-qmqpc connects from 127.0.0.1, which this server does not authorize.
    let _server = server_on(
        &q,
        "127.0.0.64",
        &["-o", "qmqpd_authorized_clients=127.0.0.2"],
    );
    let status = qmqpc.send(q.dir.path(), MESSAGE, "s@example.org", &["r@example.net"]);
    assert_eq!(
        status.code(),
        Some(31),
        "qmail-qmqpc's permanent failure: {status}\n{}",
        q.log_text()
    );
    assert!(q.files("new").is_empty());
    assert!(
        q.log_text()
            .contains("is not authorized to use this service"),
        "{}",
        q.log_text()
    );
}

#[test]
fn qmail_qmqpc_falls_back_to_second_server() {
    let Some(qmqpc) = QmailQmqpc::find() else {
        return;
    };
    // Nothing listens on 127.0.0.62:628: qmail-qmqpc's connection is refused and it tries
    // the next server.
    let _lock = qmqpc.servers(&["127.0.0.62", "127.0.0.63"]);
    let q = TestQueue::new();
    let _server = server_on(&q, "127.0.0.63", &[]);
    let status = qmqpc.send(q.dir.path(), MESSAGE, "s@example.org", &["r@example.net"]);
    assert_eq!(status.code(), Some(0), "{status}\n{}", q.log_text());
    let files = q.files("new");
    assert_eq!(
        files.len(),
        1,
        "the second server has it:\n{}",
        q.log_text()
    );
    assert_eq!(
        QueueFile::read(&files[0]).recipients,
        [b"r@example.net".to_vec()]
    );
}
