//! qmqp-queue draining its queue into a real Postfix (issue 5), the two ways an administrator
//! would: `deliver --relay` into Postfix's qmqpd(8), and `deliver --exec` through Postfix's
//! sendmail(1), which hands the message to postdrop(1) and so into maildrop/, from where
//! pickup(8) and cleanup(8) move it into incoming/.
//!
//! Each test runs a private Postfix instance from the unpacked package
//! (`$QMQPD_POSTFIX_ROOT`, as `.ci/run` and `benches/run` use it) under its own master(8)
//! in a temporary directory. No qmgr runs, so accepted mail stays in incoming/, where
//! postcat(1) shows its envelope and content. Postfix's daemons need root (they drop to the
//! `postfix` user, which the test creates with the `postdrop` group when missing, and
//! leaves, as `benches/run` does). Not root, or no Postfix: the test is skipped with the
//! reason, or fails under `QMQPD_REQUIRE_INTEROP=1`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use common::postfix::{Entry, Postcat, Postfix, postfix_package};
use common::{QueueFile, TestQueue, describe, request, run_bounded, text};

/// A safety net for every child and every wait: never expected to be reached.
const LIMIT: Duration = Duration::from_secs(120);
/// How often the tests look at files and processes.
const POLL: Duration = Duration::from_millis(20);

/// A message whose lone "." line only survives sendmail with `-i`.
const MESSAGE: &[u8] = b"From: alice@example.org\nTo: list@example.net\nSubject: hello\n\n\
first line\n.\nlast line\n";

/// The built qmqp-queue with the test queue's configuration.
fn queue_tool(q: &TestQueue) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmqp-queue"));
    cmd.args(q.args()).env_remove("MAIL_CONFIG");
    cmd
}

/// Runs `qmqp-queue deliver --once ARGS` to its end and asserts that it exited 0.
fn deliver_once(q: &TestQueue, postfix: &Postfix, args: &[&str]) -> Output {
    let out = run_bounded(
        queue_tool(q).args(["deliver", "--once"]).args(args),
        b"",
        LIMIT,
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nlog:\n{}\n{}",
        describe(&out),
        q.log_text(),
        postfix.logs()
    );
    out
}

/// Queues one message through our qmqpd in stdin mode; returns its queue ID.
fn submit(q: &TestQueue, sender: &[u8], recipients: &[&[u8]]) -> String {
    let before: BTreeSet<PathBuf> = q.files("new").into_iter().collect();
    let out = run_bounded(
        &mut common::stdin_qmqpd(q, &[]),
        &request(MESSAGE, sender, recipients),
        LIMIT,
    );
    assert!(
        text(&out.stdout).contains(":KOk"),
        "qmqpd did not queue: {}",
        describe(&out)
    );
    let added: Vec<PathBuf> = q
        .files("new")
        .into_iter()
        .filter(|p| !before.contains(p))
        .collect();
    assert_eq!(added.len(), 1, "one new queue file");
    let file = QueueFile::read(&added[0]);
    file.attribute("queue_id").expect("queue_id").to_string()
}

/// Asserts that qmqpd's queue holds nothing any more: every message delivered.
fn assert_queue_empty(q: &TestQueue) {
    for sub in ["new", "cur", "failed"] {
        assert!(
            q.files(sub).is_empty(),
            "{sub}/ is not empty; log:\n{}",
            q.log_text()
        );
    }
}

/// The Postfix queue IDs that qmqp-queue logged for message `id` (`... status=sent (Ok:
/// queued as PFID)`), one per recipient, after checking the message was removed.
fn relayed_ids(log: &str, id: &str) -> Vec<String> {
    assert!(
        log.contains(&format!("{id}: removed")),
        "{id} not removed:\n{log}"
    );
    log.lines()
        .filter(|line| line.contains(&format!("{id}: to=<")))
        .map(|line| {
            let (_, after) = line
                .split_once("status=sent (Ok: queued as ")
                .unwrap_or_else(|| panic!("not sent: {line}"));
            after.trim_end_matches(')').to_string()
        })
        .collect()
}

/// The checks common to every message Postfix took: qmqpd's Received: header with our
/// queue ID, above the message, whose lone "." line survived.
fn assert_content(postcat: &Postcat, id: &str) {
    let content = postcat.content();
    assert!(
        content.contains(&format!("(qmqpd) with QMQP id {id};")),
        "our Received: header:\n{content}"
    );
    assert!(
        content.contains("Subject: hello\n") && content.ends_with("\nfirst line\n.\nlast line\n"),
        "the message unchanged:\n{content}"
    );
}

#[test]
fn relay_into_postfix_qmqpd_lands_in_incoming() {
    let Some(package) = postfix_package() else {
        return;
    };
    let q = TestQueue::new();
    let plain = submit(
        &q,
        b"sender@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let verp = submit(
        &q,
        b"list-@lists.example.org-@[]",
        &[b"a@x.org", b"b@y.org"],
    );
    let postfix = Postfix::start(&package, Entry::Qmqpd);
    let port = postfix.port.expect("qmqpd's port");

    // The documented one-liner: qmqp-queue deliver --once --relay 127.0.0.1:PORT
    deliver_once(&q, &postfix, &["--relay", &format!("127.0.0.1:{port}")]);

    assert_queue_empty(&q);
    let log = q.log_text();
    let plain_ids = relayed_ids(&log, &plain);
    let verp_ids = relayed_ids(&log, &verp);
    assert_eq!(plain_ids.len(), 2, "one status=sent per recipient:\n{log}");
    assert_eq!(verp_ids.len(), 2, "one status=sent per recipient:\n{log}");
    assert!(
        plain_ids[0] == plain_ids[1] && verp_ids[0] == verp_ids[1] && plain_ids[0] != verp_ids[0],
        "one Postfix queue file per message:\n{log}"
    );
    assert!(
        log.contains(&format!("relay=127.0.0.1[127.0.0.1]:{port}")),
        "{log}"
    );
    let expected: BTreeSet<String> = [plain_ids[0].clone(), verp_ids[0].clone()].into();
    let incoming: BTreeSet<String> = postfix.files("incoming").into_iter().collect();
    assert_eq!(incoming, expected, "{}", postfix.logs());

    let got = postfix.postcat(&plain_ids[0]);
    assert_eq!(got.sender(), "sender@example.org", "{}", got.text);
    assert_eq!(
        got.records("recipient"),
        ["r1@example.net", "r2@example.net"],
        "{}",
        got.text
    );
    assert!(
        got.records("named_attribute")
            .contains(&"protocol_name=QMQP"),
        "{}",
        got.text
    );
    assert_content(&got, &plain);
    assert!(
        got.content().starts_with("Received: from ")
            && got.content().contains("(Postfix) with QMQP"),
        "Postfix's Received: header above ours:\n{}",
        got.content()
    );

    // A VERP sender is relayed as it is, and Postfix's qmqpd turns it into its own VERP
    // request, as it does for ezmlm.
    let got = postfix.postcat(&verp_ids[0]);
    assert_eq!(got.sender(), "list@lists.example.org", "{}", got.text);
    assert_eq!(got.records("verp_delimiters"), ["-="], "{}", got.text);
    assert_eq!(
        got.records("recipient"),
        ["a@x.org", "b@y.org"],
        "{}",
        got.text
    );
    assert_content(&got, &verp);
}

#[test]
fn exec_postfix_sendmail_drops_into_maildrop_and_pickup_takes_it() {
    let Some(package) = postfix_package() else {
        return;
    };
    let q = TestQueue::new();
    let plain = submit(
        &q,
        b"sender@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let verp = submit(
        &q,
        b"list-@lists.example.org-@[]",
        &[b"a@x.org", b"b@y.org"],
    );
    let postfix = Postfix::start(&package, Entry::Pickup);

    // The documented one-liner, with MAIL_CONFIG naming the instance (qmqp-queue removes
    // its own) and LD_LIBRARY_PATH because the package is unpacked, not installed.
    let command = format!(
        "MAIL_CONFIG='{conf}' LD_LIBRARY_PATH='{lib}' '{sendmail}' -i -f \"$SENDER\" -- \"$@\"",
        conf = postfix.conf_dir().display(),
        lib = postfix.lib_dir().display(),
        sendmail = postfix.root.join("usr/sbin/sendmail").display(),
    );
    deliver_once(&q, &postfix, &["--exec", &command]);

    assert_queue_empty(&q);
    let log = q.log_text();
    for (id, rcpt) in [
        (&plain, "r1@example.net"),
        (&plain, "r2@example.net"),
        (&verp, "a@x.org"),
        (&verp, "b@y.org"),
    ] {
        let prefix = format!("{id}: to=<{rcpt}>, relay=exec, delay=");
        assert!(
            log.lines().any(|line| line.contains(&prefix)
                && line.ends_with("status=sent (delivered via command)")),
            "{rcpt} sent:\n{log}"
        );
        assert!(log.contains(&format!("{id}: removed")), "{log}");
    }

    // postdrop wrote one file per sendmail run into maildrop/ (one for the plain message,
    // one per recipient of the VERP one); pickup and cleanup move each into incoming/,
    // removing the maildrop file last, and mark the incoming file complete (mode 0700).
    let deadline = Instant::now() + LIMIT;
    loop {
        let complete = postfix
            .files("incoming")
            .iter()
            .filter(|name| {
                fs::metadata(postfix.queue_dir().join("incoming").join(name))
                    .is_ok_and(|m| m.permissions().mode() & 0o100 != 0)
            })
            .count();
        if complete == 3 && postfix.files("maildrop").is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pickup did not move 3 messages into incoming/ within {LIMIT:?}: maildrop {:?}, \
             incoming {:?}\n{}",
            postfix.files("maildrop"),
            postfix.files("incoming"),
            postfix.logs()
        );
        thread::sleep(POLL);
    }

    let mut envelopes = BTreeSet::new();
    for pf_id in postfix.files("incoming") {
        let got = postfix.postcat(&pf_id);
        let sender = got.sender().to_string();
        let recipients = got.records("recipient").join(" ");
        let id = if sender == "sender@example.org" {
            &plain
        } else {
            &verp
        };
        assert_content(&got, id);
        // Local submission (sendmail, postdrop, pickup) by root.
        assert!(
            got.content()
                .starts_with("Received: by postfix.invalid (Postfix, from userid 0)\n"),
            "{}",
            got.text
        );
        envelopes.insert((sender, recipients));
    }
    let expected: BTreeSet<(String, String)> = [
        ("sender@example.org", "r1@example.net r2@example.net"),
        ("list-a=x.org@lists.example.org", "a@x.org"),
        ("list-b=y.org@lists.example.org", "b@y.org"),
    ]
    .into_iter()
    .map(|(s, r)| (s.to_string(), r.to_string()))
    .collect();
    assert_eq!(envelopes, expected, "{}", postfix.logs());
}
