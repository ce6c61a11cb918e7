//! Faults under the queue and the process: a full disk, a queue qmqpd may not write, `tmp/`
//! and `new/` on different filesystems, SIGKILL in the middle of transfers and between the
//! rename into `new/` and the reply, and clients that vanish at every byte of a request over
//! TCP. Each durability promise is checked from the outside: `K` only for a message
//! durably in `new/`, `Z` (exit 75) for a local failure, never a partial file in `new/`, and
//! `tmp/` leftovers of a crash removed by a later run. docs/reliability.md has the table.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::rng::Rng;
use common::{QueueFile, Server, TestQueue, describe, request, run_bounded, wait_until};

/// A safety net for every child and every wait: never expected to fire.
const LIMIT: Duration = Duration::from_secs(60);

const MESSAGE: &[u8] = b"From: a@example.org\nSubject: fault test\n\nbody\n";

/// The reply payload of a run, or "" when qmqpd wrote nothing.
fn reply_of(out: &Output) -> String {
    if out.stdout.is_empty() {
        return String::new();
    }
    let parts = common::split_netstrings(&out.stdout);
    assert_eq!(parts.len(), 1, "one reply netstring: {}", describe(out));
    common::text(&parts[0])
}

/// Runs one stdin-mode transaction and returns (reply payload, exit code).
fn transact(q: &TestQueue, extra: &[&str], input: &[u8]) -> (String, Option<i32>) {
    let out = run_bounded(&mut common::stdin_qmqpd(q, extra), input, LIMIT);
    (reply_of(&out), out.status.code())
}

/// The queue ID of a `K` reply.
fn queue_id(reply: &str) -> String {
    reply
        .strip_prefix("KOk: queued as ")
        .unwrap_or_else(|| panic!("not a K reply: {reply:?}"))
        .to_owned()
}

/// The queue IDs of the files in `new/` (file names up to the first `.`), sorted.
fn ids_in_new(q: &TestQueue) -> Vec<String> {
    let mut ids: Vec<String> = q
        .files("new")
        .iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.split('.').next().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids
}

/// Sets every file in `dir` back by 37 hours, past maildir's 36-hour rule.
fn backdate_files(dir: &Path) -> usize {
    let old = SystemTime::now() - Duration::from_secs(37 * 3600);
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        n += 1;
    }
    n
}

/// A qmqpd --listen we start ourselves, to kill it or read /proc; killed on drop.
struct Listener {
    server: Server,
    addr: SocketAddr,
}

impl Listener {
    fn start(q: &TestQueue, extra: &[&str]) -> Listener {
        let server = Server::start(q, extra);
        Listener {
            addr: server.addr,
            server,
        }
    }

    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).unwrap();
        stream.set_read_timeout(Some(LIMIT)).unwrap();
        stream.set_write_timeout(Some(LIMIT)).unwrap();
        stream
    }

    /// Sends a whole request and returns the reply payload ("" when there is none).
    fn send(&self, bytes: &[u8]) -> String {
        common::send_on(self.connect(), bytes)
    }

    /// SIGKILL, then reap.
    fn kill(mut self) {
        self.server.kill();
    }
}

/// A small tmpfs mounted over a directory; unmounted on drop.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount(8) syntax) on `path`; None where that is not
    /// allowed (not root, no CAP_SYS_ADMIN, no mount binary).
    fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        if !nix::unistd::Uid::effective().is_root() {
            return None;
        }
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0755"))
            .arg("tmpfs")
            .arg(path)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!("cannot mount a tmpfs: {}", common::text(&out.stderr));
            return None;
        }
        Some(Tmpfs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .stdin(Stdio::null())
            .output();
    }
}

/// Fills the filesystem holding `dir` with one file until the disk is full; returns it.
fn fill_disk(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = [b'f'; 4096];
    // A 64 KiB tmpfs fills after at most 16 blocks; the bound is a safety net.
    for _ in 0..100_000 {
        if file.write_all(&block).is_err() {
            break;
        }
    }
    // Partial blocks too, so not even a byte is left.
    for _ in 0..4096 {
        if file.write_all(b"f").and_then(|()| file.flush()).is_err() {
            break;
        }
    }
    path
}

#[test]
fn disk_full_answers_z_keeps_nothing_and_recovers() {
    let q = TestQueue::new();
    let big = request(
        &vec![b'x'; 100 * 1024],
        b"s@example.org",
        &[b"r@example.net"],
    );
    let small = request(MESSAGE, b"s@example.org", &[b"r@example.net"]);
    let Some(_tmpfs) = Tmpfs::mount(&q.queue_dir(), "64k") else {
        // Fallback where mounting is not allowed: RLIMIT_FSIZE makes writes fail (EFBIG).
        eprintln!("no tmpfs: testing the full disk with RLIMIT_FSIZE instead");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("trap '' XFSZ; ulimit -f 16; exec \"$0\" \"$@\"")
            .arg(common::qmqpd_bin())
            .args(q.args())
            .env("PROTO", "TCP")
            .env("TCPREMOTEIP", "127.0.0.1");
        common::clear_qmqpd_env(&mut cmd);
        let out = run_bounded(&mut cmd, &big, LIMIT);
        assert_eq!(reply_of(&out), "ZError: queue file write error");
        assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
        assert!(q.files("new").is_empty() && q.files("tmp").is_empty());
        let out = run_bounded(&mut cmd, &small, LIMIT);
        assert!(reply_of(&out).starts_with("KOk"), "{}", describe(&out));
        return;
    };

    // A message larger than the whole filesystem.
    let (reply, code) = transact(&q, &[], &big);
    assert_eq!(reply, "ZError: queue file write error");
    assert_eq!(code, Some(75));
    assert!(q.files("new").is_empty(), "nothing queued");
    assert!(q.files("tmp").is_empty(), "the partial file is removed");
    assert!(
        q.log_text().contains("cannot write queue file"),
        "{}",
        q.log_text()
    );

    // The partial file's space came back: a small message fits.
    let (reply, code) = transact(&q, &[], &small);
    let first = queue_id(&reply);
    assert_eq!(code, Some(0));

    // Disk full before the message starts.
    let filler = fill_disk(&q.queue_dir());
    let (reply, code) = transact(&q, &[], &small);
    assert_eq!(reply, "ZError: queue file write error");
    assert_eq!(code, Some(75));
    assert_eq!(
        ids_in_new(&q),
        std::slice::from_ref(&first),
        "only the earlier message"
    );
    assert!(q.files("tmp").is_empty());

    // A listener keeps serving through the full disk, and recovers when space comes back.
    let server = Listener::start(&q, &[]);
    for _ in 0..3 {
        assert_eq!(server.send(&small), "ZError: queue file write error");
    }
    std::fs::remove_file(&filler).unwrap();
    let second = queue_id(&server.send(&small));
    drop(server);
    let mut want = vec![first, second];
    want.sort();
    assert_eq!(ids_in_new(&q), want);
    assert!(q.files("tmp").is_empty());
    for file in q.files("new") {
        let parsed = QueueFile::read(&file);
        assert!(
            parsed.message.ends_with(MESSAGE),
            "complete message in {file:?}"
        );
    }
}

/// A system user for running qmqpd unprivileged as root; removed on drop.
struct TestUser {
    name: String,
}

impl TestUser {
    fn create() -> TestUser {
        let name = format!("qmqpdflt{}", std::process::id());
        // useradd may find /etc/passwd locked by another test's useradd: retry a little.
        for _attempt in 0..20 {
            let out = run_bounded(
                Command::new("useradd")
                    .args(["--system", "--no-create-home", "--user-group"])
                    .args(["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"])
                    .arg(&name),
                b"",
                LIMIT,
            );
            if out.status.success() {
                return TestUser { name };
            }
            eprintln!("useradd: {}", describe(&out));
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("cannot create user {name}");
    }

    fn entry(&self) -> nix::unistd::User {
        nix::unistd::User::from_name(&self.name).unwrap().unwrap()
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let _ = run_bounded(Command::new("userdel").arg(&self.name), b"", LIMIT);
    }
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn unwritable_queue_answers_z_and_keeps_nothing() {
    let q = TestQueue::new();
    let small = request(MESSAGE, b"s@example.org", &[b"r@example.net"]);
    let as_root = nix::unistd::Uid::effective().is_root();
    // Root ignores permission bits: as root, run qmqpd as a real unprivileged mail_owner.
    let user = as_root
        .then(|| common::require_tool("useradd").map(|_| TestUser::create()))
        .flatten();
    if as_root && user.is_none() {
        return;
    }
    let owner_arg = user.as_ref().map(|u| format!("mail_owner={}", u.name));
    let extra: Vec<&str> = match &owner_arg {
        Some(arg) => vec!["-o", arg.as_str()],
        None => Vec::new(),
    };
    let give_to_user = |path: &Path| {
        if let Some(user) = &user {
            let entry = user.entry();
            nix::unistd::chown(path, Some(entry.uid), Some(entry.gid)).unwrap();
        } else {
            set_mode(path, 0o755);
        }
    };
    let take_from_user = |path: &Path| {
        if user.is_some() {
            nix::unistd::chown(path, Some(0.into()), Some(0.into())).unwrap();
            set_mode(path, 0o755);
        } else {
            set_mode(path, 0o555);
        }
    };
    set_mode(q.dir.path(), 0o755);
    let queue = q.queue_dir();

    // 1. The queue directory itself is not writable: tmp/ cannot even be created.
    take_from_user(&queue);
    let (reply, code) = transact(&q, &extra, &small);
    assert_eq!(reply, "ZError: queue file write error", "{}", q.log_text());
    assert_eq!(code, Some(75));
    assert!(!queue.join("tmp").exists() && q.files("new").is_empty());

    // 2. The queue directory is the user's, but tmp/ exists and is not writable.
    give_to_user(&queue);
    for sub in ["tmp", "new", "cur"] {
        std::fs::create_dir(queue.join(sub)).unwrap();
        take_from_user(&queue.join(sub));
    }
    let (reply, code) = transact(&q, &extra, &small);
    assert_eq!(reply, "ZError: queue file write error");
    assert_eq!(code, Some(75));
    assert!(q.files("tmp").is_empty() && q.files("new").is_empty());

    // 3. tmp/ is writable, new/ is not: the rename fails, the tmp/ file goes.
    give_to_user(&queue.join("tmp"));
    let (reply, code) = transact(&q, &extra, &small);
    assert_eq!(reply, "ZError: queue file write error");
    assert_eq!(code, Some(75));
    assert!(
        q.files("tmp").is_empty(),
        "no tmp/ file left: {:?}",
        q.files("tmp")
    );
    assert!(q.files("new").is_empty());
    let log = q.log_text();
    assert!(log.contains("cannot write queue file"), "{log}");
    assert!(log.contains("ermission denied"), "{log}");

    // Control: the same user can queue once the directories are its own.
    give_to_user(&queue.join("new"));
    let (reply, code) = transact(&q, &extra, &small);
    assert!(reply.starts_with("KOk"), "{reply}: {}", q.log_text());
    assert_eq!(code, Some(0));
    let file = &q.files("new")[0];
    if let Some(user) = &user {
        assert_eq!(
            std::fs::metadata(file).unwrap().uid(),
            user.entry().uid.as_raw(),
            "qmqpd ran as mail_owner"
        );
    }
    // Leave the temporary directory removable by its owner.
    set_mode(&queue, 0o755);
}

#[test]
fn rename_across_filesystems_answers_z_and_keeps_nothing() {
    let shm = Path::new("/dev/shm");
    let q = TestQueue::new();
    if !shm.is_dir()
        || std::fs::metadata(shm).unwrap().dev() == std::fs::metadata(q.dir.path()).unwrap().dev()
    {
        eprintln!("skipped: no /dev/shm on a filesystem other than the temporary directory");
        return;
    }
    let other = tempfile::Builder::new()
        .prefix("qmqpd-exdev.")
        .tempdir_in(shm)
        .unwrap();
    let queue = q.queue_dir();
    std::fs::create_dir(queue.join("tmp")).unwrap();
    std::fs::create_dir(queue.join("cur")).unwrap();
    std::os::unix::fs::symlink(other.path(), queue.join("new")).unwrap();
    let small = request(MESSAGE, b"s@example.org", &[b"r@example.net"]);

    for mode in ["stdin", "listener"] {
        let reply = if mode == "stdin" {
            let (reply, code) = transact(&q, &[], &small);
            assert_eq!(code, Some(75));
            reply
        } else {
            Listener::start(&q, &[]).send(&small)
        };
        assert_eq!(reply, "ZError: queue file write error", "{mode}");
        assert!(
            q.files("tmp").is_empty(),
            "{mode}: the tmp/ file is removed"
        );
        assert_eq!(
            std::fs::read_dir(other.path()).unwrap().count(),
            0,
            "{mode}: nothing reached new/"
        );
    }
    let log = q.log_text();
    assert!(log.contains("cannot write queue file"), "{log}");

    // Control: with new/ back on the same filesystem the message is queued.
    std::fs::remove_file(queue.join("new")).unwrap();
    std::fs::create_dir(queue.join("new")).unwrap();
    let (reply, _) = transact(&q, &[], &small);
    assert!(reply.starts_with("KOk"), "{reply}");
}

/// Makes qmqpd write messages under a name in `tmp/` and rename them into `new/`.
const RENAME: &[&str] = &["-o", "queue_commit_method=rename"];

/// A one-shot qmqpd fed part of a request on stdin by a thread that keeps the pipe open until
/// `kill`, so qmqpd is still reading when it dies.
struct Feeding {
    child: std::process::Child,
    done: std::sync::mpsc::Sender<()>,
    writer: std::thread::JoinHandle<()>,
}

impl Feeding {
    fn start(q: &TestQueue, extra: &[&str], part: Vec<u8>) -> Feeding {
        let mut child = common::stdin_qmqpd(q, extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(&part);
            let _ = done_rx.recv_timeout(LIMIT);
        });
        Feeding {
            child,
            done,
            writer,
        }
    }

    /// SIGKILL; the exit status and whatever qmqpd replied.
    fn kill(mut self) -> (std::process::ExitStatus, Vec<u8>) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        let _ = self.done.send(());
        self.writer.join().unwrap();
        let mut reply = Vec::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            stdout.read_to_end(&mut reply).unwrap();
        }
        (status, reply)
    }
}

#[test]
fn sigkill_during_transfer_leaves_nothing_in_new_and_tmp_is_cleaned_later() {
    const RUNS: usize = 20;
    let q = TestQueue::new();
    let mut rng = Rng::new();
    let req = request(
        &vec![b'x'; 512 * 1024],
        b"s@example.org",
        &[b"r@example.net"],
    );
    for run in 0..RUNS {
        // Past the outer length (so the queue file exists), before the last byte.
        let cut = usize::try_from(rng.range(20, req.len() as u64)).unwrap();
        let linger = Duration::from_micros(rng.range(0, 20_000));
        // Counted before qmqpd starts: it may create its file before the count otherwise.
        let tmp_before = q.files("tmp").len();
        let feeding = Feeding::start(&q, RENAME, req[..cut].to_vec());
        wait_until("qmqpd creates its tmp/ file", || {
            q.files("tmp").len() > tmp_before
        });
        std::thread::sleep(linger);
        let (status, reply) = feeding.kill();
        assert!(
            reply.is_empty(),
            "run {run}: a reply before the end: {reply:?}"
        );
        assert_eq!(status.code(), None, "run {run}: killed by a signal");
        assert!(
            q.files("new").is_empty(),
            "run {run} (cut {cut}): something in new/"
        );
    }
    let leftovers = q.files("tmp");
    assert_eq!(leftovers.len(), RUNS, "each killed run left its tmp/ file");

    // Fresh leftovers stay (they may belong to running transactions) ...
    let (reply, _) = transact(&q, RENAME, &request(MESSAGE, b"s@x", &[b"r@x"]));
    let kept = queue_id(&reply);
    assert_eq!(q.files("tmp").len(), RUNS, "fresh tmp/ files are kept");
    // ... and a listener removes them at its start once older than 36 hours (a one-shot
    // leaves the scan to it and to qmqp-queue deliver).
    assert_eq!(backdate_files(&q.queue_dir().join("tmp")), RUNS);
    let (reply, _) = transact(&q, RENAME, &request(MESSAGE, b"s@x", &[b"r@x"]));
    assert_eq!(q.files("tmp").len(), RUNS, "no tmp/ scan per message");
    let mut want = vec![kept, queue_id(&reply)];
    want.sort();
    let server = Listener::start(&q, RENAME);
    wait_until("stale tmp/ files removed", || q.files("tmp").is_empty());
    drop(server);
    assert_eq!(ids_in_new(&q), want);
    assert!(
        q.log_text()
            .contains(&format!("removed {RUNS} stale files"))
    );
}

#[test]
fn sigkill_during_transfer_with_linkat_leaves_nothing_anywhere() {
    const RUNS: usize = 5;
    let q = TestQueue::new();
    let linkat = ["-o", "queue_commit_method=linkat"];
    let req = request(&vec![b'x'; 512 * 1024], b"s@x", &[b"r@x"]);
    let mut rng = Rng::new();
    for run in 0..RUNS {
        let cut = usize::try_from(rng.range(20, req.len() as u64)).unwrap();
        let feeding = Feeding::start(&q, &linkat, req[..cut].to_vec());
        let tmp = q.queue_dir().join("tmp");
        wait_until("qmqpd opens its unnamed file", || {
            common::unnamed_files(feeding.child.id(), &tmp) == 1
        });
        let (_, reply) = feeding.kill();
        assert!(reply.is_empty(), "run {run}: a reply before the end");
        assert!(q.files("new").is_empty(), "run {run}: something in new/");
        assert!(q.files("tmp").is_empty(), "run {run}: something in tmp/");
    }
}

/// Sends `count` small numbered messages through `server`; their queue IDs.
fn send_numbered(server: &Listener, count: usize) -> Vec<String> {
    (0..count)
        .map(|i| {
            let msg = format!("Subject: {i}\n\nbody {i}\n");
            queue_id(&server.send(&request(msg.as_bytes(), b"s@x", &[b"r@x"])))
        })
        .collect()
}

#[test]
fn sigkill_of_linkat_listener_keeps_every_k_and_leaves_nothing_else() {
    const DONE: usize = 4;
    const OPEN: usize = 5;
    let q = TestQueue::new();
    let server = Listener::start(&q, &["-o", "queue_commit_method=linkat"]);
    let mut accepted = send_numbered(&server, DONE);
    let req = request(&vec![b'y'; 256 * 1024], b"s@x", &[b"r@x"]);
    let mut open = Vec::new();
    for _ in 0..OPEN {
        let mut stream = server.connect();
        stream.write_all(&req[..req.len() / 2]).unwrap();
        open.push(stream);
    }
    let tmp = q.queue_dir().join("tmp");
    let pid = server.server.pid();
    wait_until("every open transfer has its unnamed file", || {
        common::unnamed_files(pid, &tmp) == OPEN
    });
    server.kill();
    drop(open);
    accepted.sort();
    assert_eq!(
        ids_in_new(&q),
        accepted,
        "exactly the K'd messages are in new/"
    );
    assert!(
        q.files("tmp").is_empty(),
        "nothing in tmp/: {:?}",
        q.files("tmp")
    );
}

#[test]
fn sigkill_of_listener_keeps_every_k_and_nothing_partial() {
    const DONE: usize = 8;
    const OPEN: usize = 10;
    let q = TestQueue::new();
    let server = Listener::start(&q, RENAME);
    let mut accepted = send_numbered(&server, DONE);
    // Transfers in flight: each connection has sent part of a 256 KiB request.
    let req = request(&vec![b'y'; 256 * 1024], b"s@x", &[b"r@x"]);
    let mut rng = Rng::new();
    let mut open = Vec::new();
    for _ in 0..OPEN {
        let cut = usize::try_from(rng.range(20, req.len() as u64)).unwrap();
        let mut stream = server.connect();
        stream.write_all(&req[..cut]).unwrap();
        open.push(stream);
    }
    wait_until("every open transfer has its tmp/ file", || {
        q.files("tmp").len() == OPEN
    });
    server.kill();
    for mut stream in open {
        let mut reply = Vec::new();
        let _ = stream.read_to_end(&mut reply);
        assert!(reply.is_empty(), "an unfinished transfer got a reply");
    }
    accepted.sort();
    assert_eq!(
        ids_in_new(&q),
        accepted,
        "exactly the K'd messages are in new/"
    );
    for file in q.files("new") {
        let parsed = QueueFile::read(&file);
        assert!(parsed.message.starts_with(b"Received: from "));
        assert_eq!(parsed.recipients, [b"r@x".to_vec()]);
    }
    assert_eq!(q.files("tmp").len(), OPEN);

    // A restarted listener removes the stale leftovers before serving.
    backdate_files(&q.queue_dir().join("tmp"));
    let server = Listener::start(&q, RENAME);
    wait_until("stale tmp/ files removed", || q.files("tmp").is_empty());
    let reply = server.send(&request(MESSAGE, b"s@x", &[b"r@x"]));
    accepted.push(queue_id(&reply));
    accepted.sort();
    assert_eq!(ids_in_new(&q), accepted);
}

#[test]
fn sigkill_between_naming_and_reply_keeps_the_message_at_least_once() {
    let Some(strace) = common::require_tool("strace") else {
        return;
    };
    for (method, naming) in [("linkat", "linkat("), ("rename", "rename")] {
        sigkill_between_naming_and_reply(&strace, method, naming);
    }
}

/// With `queue_commit_method = method`, whose system call naming the file in new/ contains
/// `naming`: SIGKILL after that call, before the reply.
fn sigkill_between_naming_and_reply(strace: &Path, method: &str, naming: &str) {
    let q = TestQueue::new();
    let trace = q.dir.path().join("trace");
    // The only fsync (not fdatasync) of a transaction is the one of new/ after the file got
    // its name there (tests/listen.rs checks the order): SIGKILL on entering it.
    let mut cmd = Command::new(strace);
    cmd.args([
        "-f",
        "-qq",
        "-e",
        "trace=fsync,fdatasync,rename,renameat,renameat2,linkat",
    ])
    .args(["-e", "inject=fsync:signal=KILL:when=1", "-o"])
    .arg(&trace)
    .arg(common::qmqpd_bin())
    .args(q.args())
    .args(["-o", &format!("queue_commit_method={method}")])
    .env("PROTO", "TCP")
    .env("TCPREMOTEIP", "127.0.0.1");
    common::clear_qmqpd_env(&mut cmd);
    let req = request(MESSAGE, b"s@example.org", &[b"r@example.net"]);
    let out = run_bounded(&mut cmd, &req, LIMIT);
    let trace = std::fs::read_to_string(&trace).unwrap();
    let line = |what: &dyn Fn(&str) -> bool| trace.lines().position(what);
    let renamed = line(&|l| l.contains(naming) && l.contains("/new/"));
    let killed = line(&|l| l.contains("killed by SIGKILL"));
    assert!(
        matches!((renamed, killed), (Some(r), Some(k)) if r < k),
        "{method}: killed after naming the file in new/:\n{trace}"
    );
    assert!(
        out.stdout.is_empty(),
        "no reply reached the client: {}",
        describe(&out)
    );
    assert!(
        q.files("tmp").is_empty(),
        "{method}: nothing in tmp/ after the kill"
    );
    let first = q.files("new");
    assert_eq!(
        first.len(),
        1,
        "the message is in new/ without a reply:\n{trace}"
    );
    let stored = QueueFile::read(&first[0]);
    assert!(stored.message.ends_with(MESSAGE));

    // The client saw no K and sends again: the message is queued twice (at-least-once).
    let (reply, _) = transact(&q, &[], &req);
    assert!(reply.starts_with("KOk"), "{reply}");
    let files = q.files("new");
    assert_eq!(files.len(), 2, "delivered twice, never zero times");
    let again = QueueFile::read(files.iter().find(|f| **f != first[0]).unwrap());
    assert!(again.message.ends_with(MESSAGE));
    assert_eq!(
        (again.sender, again.recipients),
        (stored.sender, stored.recipients)
    );
}

/// Ends a connection with a reset (SO_LINGER 0) instead of a FIN.
fn reset(stream: TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::Linger, &linger).unwrap();
    drop(stream);
}

#[test]
fn tcp_client_disconnect_at_every_offset_queues_nothing() {
    let q = TestQueue::new();
    let server = Listener::start(&q, &[]);
    let req = request(
        b"Subject: x\n\nbody\n",
        b"s@example.org",
        &[b"r1@example.net", b"r2@example.net"],
    );
    let mut resets = 0;
    for cut in 0..req.len() {
        let mut stream = server.connect();
        stream.write_all(&req[..cut]).unwrap();
        if cut % 2 == 0 {
            // A clean close of the client's side: qmqpd sees the end and answers as Postfix
            // does, a truncated request with a format error; nothing sent, nothing answered.
            stream.shutdown(Shutdown::Write).unwrap();
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply);
            let reply = String::from_utf8_lossy(&reply);
            if cut == 0 {
                assert!(reply.is_empty(), "a reply to an empty request: {reply:?}");
            } else {
                assert!(
                    reply.contains(":Dnetstring format error while receiving "),
                    "request cut at {cut}: {reply:?}"
                );
            }
        } else {
            reset(stream);
            resets += 1;
        }
    }
    let lost = "lost connection while";
    let truncated = "netstring format error while";
    wait_until("every cut connection is logged", || {
        let log = q.log_text();
        log.matches(lost).count() + log.matches(truncated).count() >= req.len()
    });
    wait_until("tmp/ is empty", || q.files("tmp").is_empty());
    assert!(q.files("new").is_empty(), "nothing queued");
    let log = q.log_text();
    for at in [
        "receiving QMQP packet header",
        "receiving message content",
        "receiving sender address",
        "receiving recipient address",
    ] {
        assert!(log.contains(&format!("{lost} {at}")), "{at}:\n{log}");
    }
    assert!(resets > 0);
    assert!(server.send(&req).starts_with("KOk"));
    assert_eq!(q.files("new").len(), 1);
}

/// A FUSE file system without `O_TMPFILE`: bindfs(1) mirroring a directory onto another, in
/// the foreground as our child; unmounted and reaped on drop.
struct Bindfs {
    path: PathBuf,
    child: std::process::Child,
}

impl Bindfs {
    /// Mirrors `backing` onto `path`. None (after saying why) where that cannot be done:
    /// bindfs missing (fails under QMQPD_REQUIRE_INTEROP=1, as .ci/setup installs it), no
    /// /dev/fuse, a mount refused.
    fn mount(backing: &Path, path: &Path) -> Option<Bindfs> {
        let bindfs = common::require_tool("bindfs")?;
        if !Path::new("/dev/fuse").exists() {
            return common::skip_or_fail("no /dev/fuse");
        }
        std::fs::create_dir_all(backing).unwrap();
        let child = Command::new(bindfs)
            .arg("-f")
            .arg(backing)
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut mount = Bindfs {
            path: path.to_path_buf(),
            child,
        };
        let mounted = format!(" {} ", path.display());
        let deadline = Instant::now() + LIMIT;
        loop {
            let table = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            if table
                .lines()
                .any(|l| l.contains(&mounted) && l.contains("fuse"))
            {
                return Some(mount);
            }
            if let Ok(Some(status)) = mount.child.try_wait() {
                return common::skip_or_fail(&format!("bindfs exited: {status}"));
            }
            assert!(
                Instant::now() < deadline,
                "bindfs did not mount {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Bindfs {
    fn drop(&mut self) {
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.path)
            .stdin(Stdio::null())
            .output();
        let deadline = Instant::now() + LIMIT;
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_queue_without_o_tmpfile_falls_back_to_rename_once_and_forced_linkat_fails_clearly() {
    let q = TestQueue::new();
    let Some(_fuse) = Bindfs::mount(&q.dir.path().join("backing"), &q.queue_dir()) else {
        return;
    };
    let req = request(MESSAGE, b"s@x", &[b"r@x"]);
    const FALLBACK: &str = "has no O_TMPFILE";

    // auto: the one-shot commits by rename.
    let (reply, status) = transact(&q, &[], &req);
    assert!(reply.starts_with("KOk"), "{reply}\n{}", q.log_text());
    assert_eq!(status, Some(0));
    assert_eq!(q.files("new").len(), 1);
    assert!(q.files("tmp").is_empty());
    assert_eq!(
        q.log_text().matches(FALLBACK).count(),
        1,
        "{}",
        q.log_text()
    );

    // auto: a listener decides once, at its first message, for the whole process.
    let server = Listener::start(&q, &[]);
    for _ in 0..3 {
        let reply = server.send(&req);
        assert!(reply.starts_with("KOk"), "{reply}\n{}", q.log_text());
    }
    server.kill();
    assert_eq!(q.files("new").len(), 4);
    assert!(q.files("tmp").is_empty());
    assert_eq!(
        q.log_text().matches(FALLBACK).count(),
        2,
        "{}",
        q.log_text()
    );

    // linkat forced: the message fails with a write error, and the log says why.
    let (reply, status) = transact(&q, &["-o", "queue_commit_method=linkat"], &req);
    assert_eq!(reply, "ZError: queue file write error", "{}", q.log_text());
    assert_eq!(status, Some(75), "a local failure");
    let log = q.log_text();
    let why = log
        .lines()
        .find(|l| l.contains("cannot write queue file"))
        .unwrap_or_else(|| panic!("no write error logged:\n{log}"));
    assert!(
        why.contains("O_TMPFILE") && why.contains("queue_commit_method = linkat"),
        "{why}"
    );
    assert_eq!(q.files("new").len(), 4);
    assert!(q.files("tmp").is_empty());
}
