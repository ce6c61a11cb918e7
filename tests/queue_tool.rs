//! The built qmqp-queue over real queues: `list` and `show` on files written by a real qmqpd,
//! `deliver --exec` (arguments, environment, message, temporary and permanent failures, VERP,
//! timeouts), two deliverers racing over 1000 messages, `--relay` into a second qmqpd on
//! loopback, a deliverer killed mid-way, and stopping on SIGTERM.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use common::{QueueFile, TestQueue, describe, request, run_bounded, text, wait_bounded};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// A safety net for every child: never expected to fire.
const LIMIT: Duration = Duration::from_secs(120);
/// How often the tests look at files written by children.
const POLL: Duration = Duration::from_millis(20);

const MESSAGE: &[u8] =
    b"From: a@example.org\nTo: b@example.net\nSubject: hi\n\nbody\nlast line without newline";

fn queue_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qmqp-queue"))
}

/// qmqp-queue with the test queue's configuration.
fn queue_tool(q: &TestQueue) -> Command {
    let mut cmd = Command::new(queue_bin());
    cmd.args(q.args()).env_remove("MAIL_CONFIG");
    cmd
}

/// Runs qmqp-queue with `args` to its end.
fn run_tool(q: &TestQueue, args: &[&str]) -> Output {
    run_bounded(queue_tool(q).args(args), b"", LIMIT)
}

/// Runs `deliver --once` with `args` and asserts that it succeeded.
fn deliver_once(q: &TestQueue, args: &[&str]) -> Output {
    let out = run_tool(q, &[&["deliver", "--once"][..], args].concat());
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\nlog:\n{}",
        describe(&out),
        q.log_text()
    );
    out
}

/// Queues one message through a real qmqpd in stdin mode; returns its queue ID, read from
/// the `K` reply (a deliverer that is watching may already have taken the file from new/).
fn submit_id(q: &TestQueue, message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> String {
    let mut cmd = common::stdin_qmqpd(q, &[]);
    let out = run_bounded(&mut cmd, &request(message, sender, recipients), LIMIT);
    let reply = text(&out.stdout);
    let id = reply
        .split_once(":KOk: queued as ")
        .map(|(_, rest)| rest.trim_end_matches(','));
    match id {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => panic!("qmqpd did not queue: {}", describe(&out)),
    }
}

/// Queues one message through a real qmqpd in stdin mode; returns the new queue file.
fn submit(q: &TestQueue, message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> PathBuf {
    let id = submit_id(q, message, sender, recipients);
    let mut added: Vec<PathBuf> = q
        .files("new")
        .into_iter()
        .filter(|p| id_of(p) == id)
        .collect();
    assert_eq!(added.len(), 1, "one new queue file for {id}");
    added.remove(0)
}

/// Writes a queue file straight into new/ (for tests that need many, fast).
fn write_queue_file(q: &TestQueue, message: &[u8], sender: &[u8], recipients: &[&[u8]]) -> String {
    let id = qmqpd::queue::new_queue_id(SystemTime::now());
    let mut attributes = qmqpd::queue::Attributes::default();
    attributes.push("queue_id", &id);
    attributes.push("arrival_time", "1795871062.270043");
    let mut bytes = qmqpd::netstring::encode(&attributes.encode());
    bytes.extend(qmqpd::netstring::encode(message));
    bytes.extend(qmqpd::netstring::encode(sender));
    for rcpt in recipients {
        bytes.extend(qmqpd::netstring::encode(rcpt));
    }
    let name = format!("{id}.test");
    fs::create_dir_all(q.queue_dir().join("tmp")).unwrap();
    fs::create_dir_all(q.queue_dir().join("new")).unwrap();
    let tmp = q.queue_dir().join("tmp").join(&name);
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, q.queue_dir().join("new").join(&name)).unwrap();
    id
}

/// The file name of a path.
fn name_of(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

/// The queue ID of a queue file path.
fn id_of(path: &Path) -> String {
    name_of(path).split('.').next().unwrap().to_string()
}

/// Waits (bounded) until `cond` holds.
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(POLL);
    }
}

/// A script that records each run of an --exec command (sourced by it, so `$0` and `$@` are
/// the command's): `run.N.env` with SENDER, QUEUE_ID, RECIPIENT, $0 and each argument, and
/// `run.N.msg` with stdin. Exits 75 for a recipient holding "temp", 67 (with output) for one
/// holding "perm", else 0.
struct Recorder {
    dir: tempfile::TempDir,
}

impl Recorder {
    fn new() -> Recorder {
        let dir = tempfile::tempdir().unwrap();
        let script = format!(
            r#"f=$(mktemp "{dir}/run.XXXXXX") || exit 75
{{
  printf 'SENDER=%s\n' "$SENDER"
  printf 'QUEUE_ID=%s\n' "$QUEUE_ID"
  printf 'RECIPIENT=%s\n' "${{RECIPIENT-(unset)}}"
  printf 'ZERO=%s\n' "$0"
  printf 'MAIL_CONFIG=%s\n' "${{MAIL_CONFIG-(unset)}}"
  for a in "$@"; do printf 'ARG=%s\n' "$a"; done
}} > "$f.env"
cat > "$f.msg"
rm -f "$f"
case "$*" in
  *temp*) exit 75 ;;
  *perm*) echo "no such user here"; exit 67 ;;
esac
exit 0
"#,
            dir = dir.path().display()
        );
        fs::write(dir.path().join("record.sh"), script).unwrap();
        Recorder { dir }
    }

    /// The --exec command.
    fn command(&self) -> String {
        format!(". '{}'", self.dir.path().join("record.sh").display())
    }

    /// Every run: its environment lines (in order) and its stdin.
    fn runs(&self) -> Vec<(Vec<String>, Vec<u8>)> {
        let mut runs = Vec::new();
        for entry in fs::read_dir(self.dir.path()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "env") {
                let env = fs::read_to_string(&path).unwrap();
                let msg = fs::read(path.with_extension("msg")).unwrap();
                runs.push((env.lines().map(str::to_string).collect(), msg));
            }
        }
        runs.sort();
        runs
    }
}

/// The value of `NAME=` in a recorded environment.
fn env_value<'a>(lines: &'a [String], name: &str) -> &'a str {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{name} not recorded in {lines:?}"))
}

/// The recorded arguments.
fn args_of(lines: &[String]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("ARG="))
        .collect()
}

#[test]
fn list_shows_messages_written_by_qmqpd_and_a_total() {
    let q = TestQueue::new();
    let empty = run_tool(&q, &["list"]);
    assert_eq!(empty.status.code(), Some(0), "{}", describe(&empty));
    assert_eq!(text(&empty.stdout), "Mail queue is empty\n");

    let first = submit(&q, MESSAGE, b"sender@example.org", &[b"r1@example.net"]);
    let second = submit(&q, b"x\n", b"", &[b"r1@example.net", b"r2@example.net"]);
    // A claimed message is listed too, as "cur".
    fs::create_dir_all(q.queue_dir().join("cur")).unwrap();
    let claimed = q.queue_dir().join("cur").join(name_of(&second));
    fs::rename(&second, &claimed).unwrap();

    let out = run_tool(&q, &["list"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let listing = text(&out.stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 4, "header, two messages, total: {listing}");
    assert!(lines[0].starts_with("QUEUE_ID"), "{listing}");
    let size1 = QueueFile::read(&first).message.len();
    let size2 = QueueFile::read(&claimed).message.len();
    let row1: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row1[0], id_of(&first));
    assert_eq!(row1[1], "new");
    assert_eq!(row1[2], size1.to_string());
    assert!(row1[3].ends_with('Z') && row1[3].contains('T'), "{listing}");
    assert_eq!(row1[4], "1");
    assert_eq!(row1[5], "<sender@example.org>");
    let row2: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        (row2[0], row2[1], row2[4], row2[5]),
        (id_of(&claimed).as_str(), "cur", "2", "<>")
    );
    let kbytes = (size1 + size2).div_ceil(1024);
    assert_eq!(lines[3], format!("-- {kbytes} Kbytes in 2 Requests."));
}

#[test]
fn list_json_writes_one_object_per_message() {
    let q = TestQueue::new();
    let path = submit(
        &q,
        MESSAGE,
        b"s\"q@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let out = run_tool(&q, &["list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let listing = text(&out.stdout);
    let lines: Vec<&str> = listing.lines().collect();
    assert_eq!(lines.len(), 1, "no header or total in JSON: {listing}");
    let line = lines[0];
    let file = QueueFile::read(&path);
    let arrival = file.attribute("arrival_time").unwrap();
    for want in [
        format!("{{\"queue_id\":\"{}\"", id_of(&path)),
        format!("\"file\":\"{}\"", name_of(&path)),
        "\"state\":\"new\"".to_string(),
        format!("\"arrival_time\":{arrival},"),
        format!("\"size\":{},", file.message.len()),
        "\"sender\":\"s\\\"q@example.org\"".to_string(),
        "\"nrcpt\":2".to_string(),
        "\"recipients\":[\"r1@example.net\",\"r2@example.net\"]}".to_string(),
    ] {
        assert!(line.contains(&want), "{want} not in {line}");
    }
}

#[test]
fn show_prints_attributes_envelope_and_the_message_as_stored() {
    let q = TestQueue::new();
    let path = submit(
        &q,
        MESSAGE,
        b"sender@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let stored = QueueFile::read(&path);
    let id = id_of(&path);
    let out = run_tool(&q, &["show", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let marker = b"*** MESSAGE ***\n";
    let at = out
        .stdout
        .windows(marker.len())
        .position(|w| w == marker)
        .expect("message marker");
    assert_eq!(
        &out.stdout[at + marker.len()..],
        &stored.message[..],
        "message byte for byte"
    );
    let head = text(&out.stdout[..at]);
    assert!(head.starts_with("*** ATTRIBUTES ***\n"), "{head}");
    assert!(head.contains(&format!("queue_id={id}\n")), "{head}");
    assert!(head.contains("client_address=127.0.0.1\n"), "{head}");
    assert!(head.contains("*** ENVELOPE ***\n"), "{head}");
    assert!(
        head.contains(&format!("file: new/{}\n", name_of(&path))),
        "{head}"
    );
    assert!(head.contains("state: new\n"), "{head}");
    assert!(head.contains("sender: <sender@example.org>\n"), "{head}");
    assert!(
        head.contains("recipient: <r1@example.net>\nrecipient: <r2@example.net>\n"),
        "{head}"
    );
    // The full file name works as well as the ID.
    let by_name = run_tool(&q, &["show", &name_of(&path)]);
    assert_eq!(by_name.stdout, out.stdout);
}

#[test]
fn show_unknown_id_exits_66() {
    let q = TestQueue::new();
    submit(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    for id in ["NOSUCHID", "../new", ".", ""] {
        let out = run_tool(&q, &["show", id]);
        assert_eq!(out.status.code(), Some(66), "{id}: {}", describe(&out));
        assert!(out.stdout.is_empty());
    }
}

#[test]
fn deliver_exec_passes_recipients_environment_and_message() {
    let q = TestQueue::new();
    let rec = Recorder::new();
    let many = submit(
        &q,
        MESSAGE,
        b"sender@example.org",
        &[b"r1@example.net", b"-r2@example.net"],
    );
    let one = submit(&q, b"short\n", b"", &[b"only@example.net"]);
    let stored_many = QueueFile::read(&many).message;
    let stored_one = QueueFile::read(&one).message;
    // MAIL_CONFIG names qmqpd's configuration: a command (Postfix's sendmail) must not see it.
    let out = run_bounded(
        queue_tool(&q).env("MAIL_CONFIG", q.config_dir()).args([
            "deliver",
            "--once",
            "--exec",
            &rec.command(),
        ]),
        b"",
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    let runs = rec.runs();
    assert_eq!(runs.len(), 2, "one run per message: {runs:?}");
    let by_id: BTreeMap<String, &(Vec<String>, Vec<u8>)> = runs
        .iter()
        .map(|r| (env_value(&r.0, "QUEUE_ID").to_string(), r))
        .collect();
    let (env, msg) = by_id[&id_of(&many)];
    assert_eq!(env_value(env, "SENDER"), "sender@example.org");
    assert_eq!(
        env_value(env, "RECIPIENT"),
        "(unset)",
        "several recipients: no RECIPIENT"
    );
    assert_eq!(env_value(env, "ZERO"), "qmqp-queue");
    assert_eq!(env_value(env, "MAIL_CONFIG"), "(unset)");
    assert_eq!(args_of(env), ["r1@example.net", "-r2@example.net"]);
    assert_eq!(msg, &stored_many, "the message as stored, on stdin");
    let (env, msg) = by_id[&id_of(&one)];
    assert_eq!(env_value(env, "SENDER"), "");
    assert_eq!(env_value(env, "RECIPIENT"), "only@example.net");
    assert_eq!(args_of(env), ["only@example.net"]);
    assert_eq!(msg, &stored_one);

    for sub in ["new", "cur", "failed"] {
        assert!(q.files(sub).is_empty(), "{sub}/ is empty after delivery");
    }
    let log = q.log_text();
    for want in [
        format!(
            "{}: from=<sender@example.org>, size={}, nrcpt=2 (queue active)",
            id_of(&many),
            stored_many.len()
        ),
        format!("{}: to=<r1@example.net>, relay=exec, delay=", id_of(&many)),
        format!("{}: to=<-r2@example.net>, relay=exec, delay=", id_of(&many)),
        "status=sent (delivered via command)".to_string(),
        format!("{}: removed", id_of(&one)),
    ] {
        assert!(log.contains(&want), "{want} not logged:\n{log}");
    }
}

#[test]
fn deliver_exec_temporary_failure_returns_message_to_new() {
    let q = TestQueue::new();
    let rec = Recorder::new();
    let path = submit(&q, MESSAGE, b"s@example.org", &[b"temp@example.net"]);
    let before = SystemTime::now();
    deliver_once(&q, &["--exec", &rec.command()]);
    assert_eq!(rec.runs().len(), 1);
    assert_eq!(
        q.files("new"),
        std::slice::from_ref(&path),
        "back in new/ under its name"
    );
    assert!(q.files("cur").is_empty() && q.files("failed").is_empty());
    let retry_at = fs::metadata(&path).unwrap().modified().unwrap();
    assert!(
        retry_at >= before + Duration::from_secs(299),
        "next attempt at least the minimal backoff ahead"
    );
    let log = q.log_text();
    assert!(
        log.contains("to=<temp@example.net>, relay=exec, delay=")
            && log.contains("status=deferred (command exited with status 75 (temporary failure))"),
        "{log}"
    );

    // Not due yet: a second run leaves it alone; --flush tries it anyway.
    deliver_once(&q, &["--exec", &rec.command()]);
    assert_eq!(
        rec.runs().len(),
        1,
        "a deferred message waits for its retry time"
    );
    deliver_once(&q, &["--flush", "--exec", "cat >/dev/null"]);
    assert!(q.files("new").is_empty(), "delivered on the flush");
}

#[test]
fn deliver_exec_permanent_failure_moves_message_to_failed_with_reason() {
    let q = TestQueue::new();
    let rec = Recorder::new();
    let path = submit(
        &q,
        MESSAGE,
        b"s@example.org",
        &[b"perm@example.net", b"other@example.net"],
    );
    let stored = fs::read(&path).unwrap();
    deliver_once(&q, &["--exec", &rec.command()]);
    let failed = q.queue_dir().join("failed").join(name_of(&path));
    assert_eq!(fs::read(&failed).unwrap(), stored, "moved unchanged");
    let reason = fs::read_to_string(format!("{}.reason", failed.display())).unwrap();
    assert!(
        reason.contains("to=<perm@example.net>, relay=exec")
            && reason.contains(
                "status=bounced (command exited with status 67 (user unknown): no such user here)"
            ),
        "{reason}"
    );
    assert!(reason.contains("to=<other@example.net>"), "{reason}");
    assert!(q.files("new").is_empty() && q.files("cur").is_empty());
    // list skips failed/, show finds it with its reason.
    assert_eq!(
        text(&run_tool(&q, &["list"]).stdout),
        "Mail queue is empty\n"
    );
    let shown = text(&run_tool(&q, &["show", &id_of(&path)]).stdout);
    assert!(shown.contains("state: failed\n"), "{shown}");
    assert!(shown.contains("reason: to=<perm@example.net>"), "{shown}");
    assert!(
        q.log_text()
            .contains(&format!("{}: moved to failed/", id_of(&path)))
    );
}

#[test]
fn deliver_exec_expands_verp_senders_per_recipient() {
    let q = TestQueue::new();
    let rec = Recorder::new();
    let path = submit(
        &q,
        MESSAGE,
        b"list-@lists.example.org-@[]",
        &[
            b"a@x.example",
            b"temp@y.example",
            b"perm@z.example",
            b"local",
        ],
    );
    let stored = QueueFile::read(&path);
    deliver_once(&q, &["--exec", &rec.command()]);

    let runs = rec.runs();
    assert_eq!(runs.len(), 4, "one run per recipient");
    let mut seen: Vec<(String, String, Vec<String>)> = runs
        .iter()
        .map(|(env, msg)| {
            assert_eq!(msg, &stored.message);
            (
                env_value(env, "SENDER").to_string(),
                env_value(env, "RECIPIENT").to_string(),
                args_of(env).iter().map(|s| s.to_string()).collect(),
            )
        })
        .collect();
    seen.sort();
    let want = |s: &str, r: &str| (s.to_string(), r.to_string(), vec![r.to_string()]);
    assert_eq!(
        seen,
        [
            want("list-a=x.example@lists.example.org", "a@x.example"),
            want("list-local@lists.example.org", "local"),
            want("list-perm=z.example@lists.example.org", "perm@z.example"),
            want("list-temp=y.example@lists.example.org", "temp@y.example"),
        ]
    );

    // Mixed outcomes: the deferred recipient stays in new/, the bounced one is in failed/,
    // each in a copy holding only its recipients; the delivered ones are gone.
    let name = name_of(&path);
    let deferred = QueueFile::read(&q.queue_dir().join("new").join(&name));
    assert_eq!(deferred.recipients, [b"temp@y.example".to_vec()]);
    assert_eq!(deferred.message, stored.message);
    assert_eq!(
        deferred.sender, stored.sender,
        "the VERP sender kept as received"
    );
    assert_eq!(deferred.attributes, stored.attributes);
    let failed = QueueFile::read(&q.queue_dir().join("failed").join(&name));
    assert_eq!(failed.recipients, [b"perm@z.example".to_vec()]);
    let reason =
        fs::read_to_string(q.queue_dir().join("failed").join(format!("{name}.reason"))).unwrap();
    assert_eq!(reason.lines().count(), 1, "{reason}");
    assert!(reason.contains("to=<perm@z.example>"), "{reason}");
    assert!(q.files("cur").is_empty() && q.files("tmp").is_empty());

    // The next attempt delivers the rest only.
    deliver_once(&q, &["--flush", "--exec", &rec.command()]);
    assert_eq!(rec.runs().len(), 5);
    assert_eq!(q.files("new").len(), 1, "still deferred");
}

#[test]
fn deliver_exec_timeout_kills_the_command_and_defers() {
    let q = TestQueue::new();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let path = submit(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    // A command that starts a long sleep in the background too: the whole group must go.
    let command = format!("sleep 300 & echo $! > '{}'; wait", pid_file.display());
    deliver_once(&q, &["--timeout", "1", "--exec", &command]);
    assert_eq!(q.files("new"), [path], "deferred");
    let log = q.log_text();
    assert!(
        log.contains("status=deferred (command timed out after 1s)"),
        "{log}"
    );
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_for("the background sleep to be killed", || {
        kill(Pid::from_raw(pid), None).is_err()
            || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
    });
}

#[test]
fn two_deliverers_deliver_each_of_1000_messages_exactly_once() {
    let q = TestQueue::new();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("delivered");
    let mut ids = BTreeSet::new();
    for i in 0..1000 {
        let rcpt = format!("r{i}@example.net");
        ids.insert(write_queue_file(
            &q,
            b"m\n",
            b"s@example.org",
            &[rcpt.as_bytes()],
        ));
    }
    assert_eq!(ids.len(), 1000);
    // `>>` opens with O_APPEND: each line is one write, whole.
    let command = format!("echo \"$QUEUE_ID $PPID\" >> '{}'", log.display());
    let start = || -> Child {
        queue_tool(&q)
            .args(["deliver", "--once", "--exec", &command])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut a = start();
    let mut b = start();
    let status_a = wait_bounded(&mut a, Duration::from_secs(600)).expect("deliverer a hung");
    let status_b = wait_bounded(&mut b, Duration::from_secs(600)).expect("deliverer b hung");
    assert!(
        status_a.success() && status_b.success(),
        "{status_a} {status_b}"
    );

    let lines = fs::read_to_string(&log).unwrap();
    let delivered: Vec<&str> = lines
        .lines()
        .map(|l| l.split(' ').next().unwrap())
        .collect();
    assert_eq!(
        delivered.len(),
        1000,
        "each message delivered once, none twice"
    );
    let unique: BTreeSet<String> = delivered.iter().map(|s| s.to_string()).collect();
    assert_eq!(unique, ids, "every message delivered");
    for sub in ["new", "cur", "failed"] {
        assert!(q.files(sub).is_empty(), "{sub}/ is empty");
    }
    let by_deliverer: BTreeSet<&str> = lines.lines().filter_map(|l| l.split(' ').nth(1)).collect();
    eprintln!("deliverers that delivered: {}", by_deliverer.len());
}

#[test]
fn deliver_relay_sends_into_a_second_qmqpd() {
    let q = TestQueue::new();
    let remote_q = TestQueue::new();
    let remote = common::Server::start(&remote_q, &[]);
    let path = submit(
        &q,
        MESSAGE,
        b"list-@lists.example.org-@[]",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let stored = QueueFile::read(&path);
    deliver_once(&q, &["--relay", &remote.address()]);

    assert!(q.files("new").is_empty() && q.files("cur").is_empty());
    let relayed = remote_q.files("new");
    assert_eq!(relayed.len(), 1, "queued by the second qmqpd");
    let got = QueueFile::read(&relayed[0]);
    assert!(
        got.message.starts_with(b"Received: from "),
        "its own Received: first"
    );
    assert!(
        got.message.ends_with(&stored.message),
        "then the message as stored"
    );
    assert_eq!(got.sender, stored.sender, "VERP sender relayed as is");
    assert_eq!(got.recipients, stored.recipients);
    let log = q.log_text();
    let remote_id = id_of(&relayed[0]);
    assert!(
        log.contains(&format!(
            "to=<r1@example.net>, relay=127.0.0.1[127.0.0.1]:{}",
            remote.addr.port()
        )) && log.contains(&format!("status=sent (Ok: queued as {remote_id})")),
        "{log}"
    );
}

#[test]
fn deliver_relay_maps_d_to_failed_and_no_answer_to_deferred() {
    let q = TestQueue::new();
    let remote_q = TestQueue::new();
    let remote = common::Server::start(&remote_q, &["-o", "message_size_limit=100"]);
    let big = vec![b'x'; 500];
    let path = submit(&q, &big, b"s@example.org", &[b"r@example.net"]);
    deliver_once(&q, &["--relay", &remote.address()]);
    let failed = q.queue_dir().join("failed").join(name_of(&path));
    assert!(failed.exists(), "D: permanent");
    let reason = fs::read_to_string(format!("{}.reason", failed.display())).unwrap();
    assert!(
        reason.contains("said: Error: message too large"),
        "{reason}"
    );
    assert!(remote_q.files("new").is_empty());

    // Nobody listening: temporary.
    let closed = common::free_port();
    let path = submit(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    deliver_once(&q, &["--relay", &format!("127.0.0.1:{closed}")]);
    assert_eq!(q.files("new"), [path]);
    let log = q.log_text();
    assert!(
        log.contains("relay=none")
            && log.contains(&format!("status=deferred (connect to 127.0.0.1:{closed}")),
        "{log}"
    );
}

#[test]
fn killed_deliverer_loses_nothing() {
    let q = TestQueue::new();
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("pid");
    let delivered = dir.path().join("delivered");
    let path = submit(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    let stored = QueueFile::read(&path).message;
    // The command tells its pid, then sleeps until killed.
    let command = format!(
        "echo $$ > '{p}.tmp' && mv '{p}.tmp' '{p}' && exec sleep 300",
        p = pid_file.display()
    );
    let mut deliverer = queue_tool(&q)
        .args(["deliver", "--once", "--exec", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the command to start", || pid_file.exists());
    deliverer.kill().unwrap();
    deliverer.wait().unwrap();
    let pid: i32 = fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The command runs in a process group of its own, led by its shell.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);

    assert!(q.files("new").is_empty());
    assert_eq!(q.files("cur").len(), 1, "the claim stays in cur/");

    // A fresh claim is not stale: a default run leaves it alone.
    let record = format!("cat > '{}'", delivered.display());
    deliver_once(&q, &["--exec", &record]);
    assert_eq!(q.files("cur").len(), 1);
    assert!(!delivered.exists());

    // With a stale time of 0 it is taken back and delivered.
    deliver_once(&q, &["--stale-time", "0", "--exec", &record]);
    assert_eq!(fs::read(&delivered).unwrap(), stored);
    for sub in ["new", "cur", "failed"] {
        assert!(q.files(sub).is_empty(), "{sub}/ is empty");
    }
    let log = q.log_text();
    assert!(
        log.contains(&format!("{}: stale claim in cur/", id_of(&path))),
        "{log}"
    );
}

#[test]
fn deliver_watches_new_and_stops_on_sigterm() {
    let q = TestQueue::new();
    let dir = tempfile::tempdir().unwrap();
    let delivered = dir.path().join("delivered");
    let command = format!("echo \"$QUEUE_ID\" >> '{}'", delivered.display());
    let mut deliverer = queue_tool(&q)
        .args(["deliver", "--interval", "1", "--exec", &command])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Messages that arrive while it watches are delivered.
    let first = submit_id(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    let count = || {
        fs::read_to_string(&delivered)
            .map(|s| s.lines().count())
            .unwrap_or(0)
    };
    wait_for("the first delivery", || count() == 1);
    let second = submit_id(&q, MESSAGE, b"s@example.org", &[b"r@example.net"]);
    wait_for("the second delivery", || count() == 2);
    let pid = i32::try_from(deliverer.id()).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let status = wait_bounded(&mut deliverer, LIMIT).expect("deliverer did not stop");
    assert_eq!(status.code(), Some(0));
    let lines = fs::read_to_string(&delivered).unwrap();
    assert_eq!(lines, format!("{first}\n{second}\n"));
    let log = q.log_text();
    assert!(log.contains("stopping after the current message"), "{log}");
    assert!(log.contains("stopped"), "{log}");
}

#[test]
fn deliver_rejects_usage_errors_with_64() {
    let q = TestQueue::new();
    for args in [
        &["deliver"][..],
        &["deliver", "--exec", "true", "--relay", "127.0.0.1:1"],
        &["deliver", "--exec", "true", "--interval", "0"],
        &["nonsense"],
    ] {
        let out = run_tool(&q, args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", describe(&out));
        assert!(text(&out.stderr).contains("usage:"), "{}", describe(&out));
    }
}

#[test]
fn deliver_exec_splits_a_huge_recipient_list_into_several_runs() {
    // 40 000 recipients are about 1.5 MB of arguments: one run would fail with E2BIG.
    let q = TestQueue::new();
    let rcpts: Vec<String> = (0..40_000)
        .map(|i| format!("subscriber-{i:05}@lists.example.net"))
        .collect();
    let refs: Vec<&[u8]> = rcpts.iter().map(|r| r.as_bytes()).collect();
    let id = write_queue_file(&q, MESSAGE, b"list@example.org", &refs);
    let out_file = q.dir.path().join("delivered");
    let command = format!(
        "printf '%s\\n' \"$@\" >> '{}' && echo run >> '{}.runs'",
        out_file.display(),
        out_file.display()
    );
    deliver_once(&q, &["--exec", &command]);
    let delivered = fs::read_to_string(&out_file).unwrap();
    let got: Vec<&str> = delivered.lines().collect();
    assert_eq!(got.len(), rcpts.len(), "every recipient once, in order");
    assert!(got.iter().zip(&rcpts).all(|(a, b)| a == b));
    let runs = fs::read_to_string(format!("{}.runs", out_file.display())).unwrap();
    assert!(runs.lines().count() > 1, "split into several runs");
    assert!(
        q.files("new").is_empty() && q.files("failed").is_empty(),
        "{id} delivered"
    );
}

/// Issue 11, item 8: in a set-group-ID queue every file qmqpd and qmqp-queue create follows
/// one mode rule (0640, the directory's group), split copies and `.reason` files included,
/// so after a mixed outcome a member of the queue's group can still `list` and `show` all.
#[test]
fn deliver_mixed_outcome_keeps_every_file_group_readable_in_a_setgid_queue() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    let q = TestQueue::new();
    for sub in ["", "tmp", "new", "cur", "failed"] {
        let dir = q.queue_dir().join(sub);
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o2750)).unwrap();
    }
    let rec = Recorder::new();
    let path = submit(
        &q,
        MESSAGE,
        b"list-@lists.example.org-@[]",
        &[b"a@x.example", b"temp@y.example", b"perm@z.example"],
    );
    deliver_once(&q, &["--exec", &rec.command()]);
    let name = name_of(&path);
    let files = [
        q.queue_dir().join("new").join(&name),
        q.queue_dir().join("failed").join(&name),
        q.queue_dir().join("failed").join(format!("{name}.reason")),
    ];
    for file in &files {
        let mode = fs::metadata(file).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o640, "{} has mode {mode:o}", file.display());
    }
    assert_eq!(q.files("new").len(), 1);
    assert_eq!(q.files("failed").len(), 2);

    // A member of the queue's group who does not own the files (needs root to set up).
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped the non-owner part: not running as root");
        return;
    }
    const NOBODY: u32 = 65534;
    let group = 65533;
    let chown = |p: &Path| nix::unistd::chown(p, None, Some(nix::unistd::Gid::from_raw(group)));
    chown(&q.queue_dir()).unwrap();
    for sub in ["tmp", "new", "cur", "failed"] {
        chown(&q.queue_dir().join(sub)).unwrap();
        for file in q.files(sub) {
            chown(&file).unwrap();
        }
    }
    fs::set_permissions(q.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    for file in &files {
        assert_eq!(fs::metadata(file).unwrap().gid(), group);
    }
    let as_member = |args: &[&str]| {
        let mut cmd = queue_tool(&q);
        cmd.args(args).uid(NOBODY).gid(group);
        run_bounded(&mut cmd, b"", LIMIT)
    };
    let listed = as_member(&["list"]);
    assert_eq!(listed.status.code(), Some(0), "{}", describe(&listed));
    assert!(
        text(&listed.stdout).contains(&id_of(&path)),
        "{}",
        describe(&listed)
    );
    // `show` finds the deferred copy in new/ first; once it is gone, the failed one.
    let shown = as_member(&["show", &id_of(&path)]);
    assert_eq!(shown.status.code(), Some(0), "{}", describe(&shown));
    assert!(
        text(&shown.stdout).contains("state: new\n"),
        "{}",
        describe(&shown)
    );
    fs::remove_file(&files[0]).unwrap();
    let shown = as_member(&["show", &id_of(&path)]);
    assert_eq!(shown.status.code(), Some(0), "{}", describe(&shown));
    let out = text(&shown.stdout);
    assert!(out.contains("state: failed\n"), "{out}");
    assert!(out.contains("reason: to=<perm@z.example>"), "{out}");
}
