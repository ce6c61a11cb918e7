//! The units and the Debian package under a real systemd (issue 15): systemd 252 booted as
//! PID 1 by `systemd-nspawn` over a minimal Debian 12 tree, the freshly built package
//! installed with dpkg, and each unit pair driven the way an administrator drives it, with
//! qmqpc inside the container as the client.
//!
//! The tree is made once by `.ci/setup/30-systemd.sh` (debootstrap) and named by
//! `QMQPD_SYSTEMD_ROOT`. Every test boots its own overlay of it (the tree itself is never
//! written), with a private network, so that port 628 inside cannot collide with anything on
//! the host, and reaches the container with `nsenter` into its PID 1's namespaces (there is
//! no machined or D-Bus on a CI host). A guard powers the container off, kills it if it does
//! not stop, and removes the overlay, also when the test fails.
//!
//! Needs root, systemd-nspawn, nsenter, unshare, setpriv and the tree: missing any, a test
//! is skipped with the reason, or fails under QMQPD_REQUIRE_INTEROP=1.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use common::{describe, request, require_tool, run_bounded, skip_or_fail, text, wait_bounded};

/// The tree `.ci/setup/30-systemd.sh` makes.
const ROOT_VAR: &str = "QMQPD_SYSTEMD_ROOT";
/// Safety net for one command in the container; none is expected to come close.
const COMMAND_LIMIT: Duration = Duration::from_secs(180);
/// How long a boot may take until `systemctl is-system-running --wait` answers.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
/// How long the container may take to power off before it is killed.
const POWEROFF_LIMIT: Duration = Duration::from_secs(60);
/// How long a state the test waits for (a unit state, a journal line) may take to appear.
const STATE_LIMIT: Duration = Duration::from_secs(60);
/// How often such a state is polled.
const POLL: Duration = Duration::from_millis(200);
/// The test's configuration: no DNS in a private network, no tarpit, a small size limit.
const MAIN_CF: &str = "qmqpd_peername_lookup = no\n\
qmqpd_error_delay = 0\n\
message_size_limit = 20000\n\
myhostname = qmqpd-test.example.org\n";
/// A line that makes main.cf a configuration error (an unsupported lookup table).
const BAD_LINE: &str = "qmqpd_authorized_clients = hash:/etc/qmqpd/clients";
/// Where a running qmqpd may create files, and nowhere else: the queue, and the private
/// /tmp and /var/tmp of PrivateTmp=.
const WRITABLE: [&str; 3] = ["/tmp", "/var/spool/qmqpd", "/var/tmp"];

/// The message every test sends.
const MESSAGE: &[u8] = b"From: sender@example.org\nSubject: systemd test\n\nhello\n";

// ---- the package ---------------------------------------------------------------------

/// Builds the package once per test run with packaging/build-deb (cargo-deb reuses the
/// release build when nothing changed) and returns its path.
fn package() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/build-deb");
        let output = run_bounded(
            Command::new(&script).stdin(Stdio::null()),
            b"",
            Duration::from_secs(1800),
        );
        assert!(
            output.status.success(),
            "packaging/build-deb failed: {}",
            describe(&output)
        );
        let stdout = text(&output.stdout);
        let deb = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
        assert!(deb.is_file(), "build-deb printed no package: {stdout}");
        deb
    })
    .clone()
}

// ---- the container -------------------------------------------------------------------

/// What booting needs: the tree and the tools, or the reason the test is skipped.
struct Host {
    root: PathBuf,
    nspawn: PathBuf,
    nsenter: PathBuf,
    unshare: PathBuf,
}

fn host() -> Option<Host> {
    if !nix::unistd::Uid::effective().is_root() {
        return skip_or_fail("tests/systemd.rs boots containers and must run as root");
    }
    let nspawn = require_tool("systemd-nspawn")?;
    let nsenter = require_tool("nsenter")?;
    let unshare = require_tool("unshare")?;
    require_tool("setpriv")?;
    let Some(root) = std::env::var_os(ROOT_VAR).map(PathBuf::from) else {
        return skip_or_fail(&format!(
            "{ROOT_VAR} is not set (.ci/setup/30-systemd.sh makes the Debian 12 tree)"
        ));
    };
    if !root.join("usr/lib/systemd/systemd").is_file() {
        return skip_or_fail(&format!(
            "{ROOT_VAR}={} holds no systemd (.ci/setup/30-systemd.sh makes it)",
            root.display()
        ));
    }
    Some(Host {
        root,
        nspawn,
        nsenter,
        unshare,
    })
}

/// A writable copy-on-write layer over the cached tree, in a temporary directory: upper/
/// holds everything the containers booted on it change, so a second boot sees the first
/// one's changes. Removed when dropped.
struct Overlay {
    dir: tempfile::TempDir,
}

impl Overlay {
    fn new() -> Overlay {
        let dir = tempfile::Builder::new()
            .prefix("qmqpd-systemd.")
            .tempdir_in("/var/tmp")
            .expect("cannot create the overlay directory");
        for sub in ["upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(sub)).expect("cannot create an overlay dir");
        }
        Overlay { dir }
    }
}

/// A booted container. Dropping it powers it off (SIGTERM to systemd-nspawn, which asks
/// PID 1 to power off), kills it when that takes too long, and waits for it.
struct Container<'a> {
    host: &'a Host,
    nspawn: Child,
    /// The container's PID 1, as the host sees it.
    leader: u32,
    console: PathBuf,
    name: String,
}

impl<'a> Container<'a> {
    /// Boots `overlay` as machine `qmqpd-LABEL-PID-N` and waits until its boot is done.
    fn boot(host: &'a Host, overlay: &Overlay, label: &str) -> Container<'a> {
        static BOOTS: Mutex<u32> = Mutex::new(0);
        let n = {
            let mut boots = BOOTS.lock().unwrap_or_else(|e| e.into_inner());
            *boots += 1;
            *boots
        };
        let name = format!("qmqpd-{label}-{}-{n}", std::process::id());
        let dir = overlay.dir.path();
        let console = dir.join(format!("console.{n}"));
        let log = std::fs::File::create(&console).expect("cannot create the console log");
        let log2 = log.try_clone().expect("cannot duplicate the console log");
        // The overlay is mounted in a mount namespace of its own, which ends with
        // systemd-nspawn: nothing stays mounted on the host, whatever happens. Should the
        // test process die without its guards, the parent-death signal (SIGTERM) still
        // powers the container off.
        let script = "mount -t overlay overlay -o \"lowerdir=$1,upperdir=$2,workdir=$3\" \"$4\" \
                      && exec setpriv --pdeathsig SIGTERM \"$5\" -D \"$4\" -b --register=no \
                      --keep-unit --private-network --console=read-only --machine=\"$6\"";
        let nspawn = Command::new(&host.unshare)
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&host.root)
            .arg(dir.join("upper"))
            .arg(dir.join("work"))
            .arg(dir.join("merged"))
            .arg(&host.nspawn)
            .arg(&name)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .expect("cannot start systemd-nspawn");
        let mut container = Container {
            host,
            nspawn,
            leader: 0,
            console,
            name,
        };
        container.leader = container.find_leader();
        // systemctl talks to PID 1 over this socket, which exists once the manager runs.
        container.wait_for("systemd's private socket", "test -S /run/systemd/private");
        let booted = container.sh("systemctl is-system-running --wait");
        // "degraded" names failed units; the test looks at its own units only.
        let state = text(&booted.stdout);
        assert!(
            matches!(state.trim(), "running" | "degraded"),
            "{}: boot did not finish: {}\n{}",
            container.name,
            describe(&booted),
            container.diagnostics()
        );
        container
    }

    /// The container's PID 1: the child of systemd-nspawn that is PID 1 in its own PID
    /// namespace, once it runs systemd.
    fn find_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let deadline = Instant::now() + BOOT_LIMIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "{}: systemd-nspawn exited {status}\n{}",
                    self.name,
                    self.console_tail()
                );
            }
            for child in children(nspawn) {
                let status = std::fs::read_to_string(format!("/proc/{child}/status"));
                let comm = std::fs::read_to_string(format!("/proc/{child}/comm"));
                let is_init = status.is_ok_and(|s| {
                    s.lines()
                        .any(|l| l.starts_with("NSpid:") && l.ends_with("\t1"))
                });
                if is_init && comm.is_ok_and(|c| c.trim() == "systemd") {
                    return child;
                }
            }
            thread::sleep(POLL);
        }
        panic!(
            "{}: no systemd in the container\n{}",
            self.name,
            self.console_tail()
        );
    }

    /// A command run inside the container, in all its PID 1's namespaces, with a clean
    /// environment.
    fn command(&self, script: &str) -> Command {
        let mut cmd = Command::new(&self.host.nsenter);
        cmd.args(["-t", &self.leader.to_string(), "-a", "--"])
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args([
                "SYSTEMD_PAGER=",
                "SYSTEMD_COLORS=0",
                "/bin/bash",
                "-c",
                script,
            ]);
        cmd
    }

    /// Runs `script` with bash inside the container.
    fn sh(&self, script: &str) -> Output {
        run_bounded(&mut self.command(script), b"", COMMAND_LIMIT)
    }

    /// Runs `script` with `input` on its stdin.
    fn sh_in(&self, script: &str, input: &[u8]) -> Output {
        run_bounded(&mut self.command(script), input, COMMAND_LIMIT)
    }

    /// Runs `script`, which must succeed, and returns its stdout.
    fn ok(&self, script: &str) -> String {
        let output = self.sh(script);
        if !output.status.success() {
            panic!(
                "{}: `{script}` failed: {}\n{}",
                self.name,
                describe(&output),
                self.diagnostics()
            );
        }
        text(&output.stdout)
    }

    /// Writes `bytes` to `path` inside the container.
    fn write(&self, path: &str, bytes: &[u8]) {
        let output = self.sh_in(&format!("cat > '{path}'"), bytes);
        assert!(
            output.status.success(),
            "cannot write {path}: {}",
            describe(&output)
        );
    }

    /// Polls `script` until it succeeds; panics with `what` after STATE_LIMIT.
    fn wait_for(&self, what: &str, script: &str) {
        let deadline = Instant::now() + STATE_LIMIT;
        loop {
            let output = self.sh(script);
            if output.status.success() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{}: {what} did not happen within {STATE_LIMIT:?} (`{script}`: {})\n{}",
                    self.name,
                    describe(&output),
                    self.diagnostics()
                );
            }
            thread::sleep(POLL);
        }
    }

    /// Sends the test message with qmqpc to `server` and returns qmqpc's exit status and
    /// output.
    fn qmqpc(&self, server: &str, message: &[u8]) -> (i32, String) {
        let output = self.sh_in(
            &format!("qmqpc -t 60 -s '{server}' -f sender@example.org rcpt@example.net 2>&1"),
            message,
        );
        (output.status.code().unwrap_or(-1), text(&output.stdout))
    }

    /// Sends the test message and returns the queue id of its `K` reply.
    fn queue_message(&self, server: &str) -> String {
        let (status, reply) = self.qmqpc(server, MESSAGE);
        let id = reply
            .trim()
            .strip_prefix("KOk: queued as ")
            .map(str::to_owned);
        match id {
            Some(id) if status == 0 => id,
            _ => panic!(
                "{}: qmqpc -s {server} exited {status}: {reply}\n{}",
                self.name,
                self.diagnostics()
            ),
        }
    }

    /// The `Key=` property of `unit`, from `systemctl show`.
    fn property(&self, unit: &str, key: &str) -> String {
        self.ok(&format!("systemctl show -p {key} --value '{unit}'"))
            .trim()
            .to_owned()
    }

    /// How many lines `journalctl -t qmqpd` shows so far, for `wait_for_log`.
    fn log_mark(&self) -> usize {
        let count = self.ok("journalctl -t qmqpd -o cat --no-pager | wc -l");
        count.trim().parse().expect("wc -l printed no number")
    }

    /// Waits until `journalctl -t qmqpd` holds a line past `mark` containing `needle`:
    /// journald reads syslog datagrams in its own time. (`-t qmqpd`, not `-u`: journald
    /// cannot always tell the unit of a process that has already exited.)
    fn wait_for_log(&self, mark: usize, needle: &str) {
        self.wait_for(
            &format!("a qmqpd log line with {needle:?}"),
            &format!(
                "journalctl -t qmqpd -o cat --no-pager | tail -n +{} | grep -qF -- '{needle}'",
                mark + 1
            ),
        );
    }

    /// The end of the journal and of the console, for failure messages.
    fn diagnostics(&self) -> String {
        let journal = self.sh("journalctl --no-pager -n 60 -o short-precise");
        format!(
            "--- journal of {} ---\n{}{}",
            self.name,
            text(&journal.stdout),
            text(&journal.stderr)
        )
    }

    fn console_tail(&self) -> String {
        let console = std::fs::read(&self.console).unwrap_or_default();
        let console = text(&console);
        let lines: Vec<&str> = console.lines().collect();
        let start = lines.len().saturating_sub(40);
        format!("--- console ---\n{}", lines[start..].join("\n"))
    }

    /// Installs the package with dpkg, as an administrator would.
    fn install(&self, deb: &Path) {
        let bytes = std::fs::read(deb).expect("cannot read the package");
        self.write("/root/qmqpd.deb", &bytes);
        self.ok("dpkg -i /root/qmqpd.deb");
        self.write("/etc/qmqpd/main.cf", MAIN_CF.as_bytes());
    }

    /// Powers the container off and waits for systemd-nspawn; kills both when that takes
    /// longer than POWEROFF_LIMIT.
    fn power_off(&mut self) {
        if let Ok(Some(_)) = self.nspawn.try_wait() {
            return;
        }
        // systemd-nspawn turns SIGTERM into an orderly poweroff of the container.
        let pid = nix::unistd::Pid::from_raw(self.nspawn.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if wait_bounded(&mut self.nspawn, POWEROFF_LIMIT).is_none() {
            // wait_bounded killed systemd-nspawn; PID 1 of the container takes every
            // process in it along.
            if self.leader != 0 {
                let leader = nix::unistd::Pid::from_raw(self.leader as i32);
                let _ = nix::sys::signal::kill(leader, nix::sys::signal::Signal::SIGKILL);
            }
            eprintln!("{}: did not power off in time: killed", self.name);
        }
    }
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The children of `pid` (all its threads').
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Boots a fresh container with the package installed and the test's main.cf.
fn installed<'a>(host: &'a Host, overlay: &Overlay, label: &str) -> Container<'a> {
    let deb = package();
    let c = Container::boot(host, overlay, label);
    c.install(&deb);
    c
}

// ---- checks shared by both pairs -----------------------------------------------------

/// The package made the user and the queue; running sysusers and tmpfiles again, as
/// docs/systemd.md says for an install by hand, changes nothing and succeeds.
fn check_user_and_queue(c: &Container) {
    c.ok("systemd-sysusers qmqpd.conf && systemd-tmpfiles --create qmqpd.conf");
    let passwd = c.ok("getent passwd qmqpd");
    assert!(
        passwd
            .trim()
            .ends_with(":/var/spool/qmqpd:/usr/sbin/nologin"),
        "user qmqpd: {passwd}"
    );
    let dirs = c.ok("stat -c '%U:%G %a %n' /var/spool/qmqpd /var/spool/qmqpd/{tmp,new,cur}");
    for line in dirs.lines() {
        assert!(
            line.starts_with("qmqpd:qmqpd 750 "),
            "queue directory: {line}"
        );
    }
}

/// Messages over IPv4 and IPv6 get K, land in new/ owned by qmqpd with mode 600, and are
/// logged; a message over the size limit gets D and leaves nothing.
fn check_messages(c: &Container) {
    let mark = c.log_mark();
    let v4 = c.queue_message("127.0.0.1");
    let v6 = c.queue_message("[::1]");
    for (id, client) in [(&v4, "unknown[127.0.0.1]"), (&v6, "unknown[::1]")] {
        let file = c.ok(&format!("stat -c '%U %a' /var/spool/qmqpd/new/{id}.*"));
        assert_eq!(file.trim(), "qmqpd 600", "queue file of {id}");
        c.wait_for_log(mark, &format!("{id}: client={client}"));
        c.wait_for_log(mark, &format!("{id}: from=<sender@example.org>"));
    }
    let shown = c.ok(&format!("qmqp-queue show {v6}"));
    assert!(
        shown.contains("Subject: systemd test"),
        "qmqp-queue show: {shown}"
    );

    let before = c.ok("ls /var/spool/qmqpd/new | wc -l");
    let big = vec![b'x'; 30_000];
    let (status, reply) = c.qmqpc("127.0.0.1", &big);
    assert_eq!(status, 65, "over the size limit: {reply}");
    assert_eq!(reply.trim(), "DError: message too large");
    c.wait_for_log(mark, "Error: message too large");
    assert_eq!(c.ok("ls /var/spool/qmqpd/new | wc -l"), before);
    assert_eq!(c.ok("ls -A /var/spool/qmqpd/tmp | wc -l").trim(), "0");
}

/// The running qmqpd `pid` has no capabilities, no new privileges, a seccomp filter, a
/// read-only /usr and /etc, and can write nowhere but the queue and its private /tmp and
/// /var/tmp (tried as its user on every mount its mount namespace shows writable).
fn check_sandbox(c: &Container, pid: &str) {
    let status = c.ok(&format!("cat /proc/{pid}/status"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
            .to_owned()
    };
    assert_eq!(field("Name"), "qmqpd", "pid {pid} is not qmqpd");
    assert_eq!(field("CapEff"), "0000000000000000");
    assert_eq!(field("CapPrm"), "0000000000000000");
    assert_eq!(field("CapBnd"), "0000000000000000");
    assert_eq!(field("NoNewPrivs"), "1");
    assert_eq!(field("Seccomp"), "2");
    let uid = c.ok("id -u qmqpd").trim().to_owned();
    assert!(
        field("Uid").split_whitespace().all(|u| u == uid),
        "uid: {}",
        field("Uid")
    );

    let mountinfo = c.ok(&format!("cat /proc/{pid}/mountinfo"));
    let mounts: Vec<(String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            Some((fields.get(4)?.to_string(), fields.get(5)?.to_string()))
        })
        .collect();
    for path in ["/usr", "/etc", "/"] {
        // The last mount listed on the deepest mount point holding `path` is what it sees.
        let (point, options) = mounts
            .iter()
            .filter(|(point, _)| Path::new(path).starts_with(point))
            .max_by_key(|(point, _)| point.len())
            .unwrap_or_else(|| panic!("no mount holds {path}:\n{mountinfo}"));
        let top = mounts
            .iter()
            .rev()
            .find(|(p, _)| p == point)
            .map_or(options, |(_, o)| o);
        assert!(
            top.split(',').any(|o| o == "ro"),
            "{path} is on {point} mounted {top}:\n{mountinfo}"
        );
    }
    let rw: BTreeSet<&str> = mounts
        .iter()
        .filter(|(_, options)| options.split(',').any(|o| o == "rw"))
        .map(|(point, _)| point.as_str())
        .collect();
    let probes: String = rw
        .iter()
        .map(|point| {
            format!(
                "nsenter -t {pid} -m -S {uid} -G {uid} sh -c 'touch \"$0/.qmqpd-probe\" && \
                 rm \"$0/.qmqpd-probe\"' '{point}' 2>/dev/null && echo '{point}'\n"
            )
        })
        .collect();
    let writable = c.ok(&format!("{probes}true"));
    let writable: Vec<&str> = writable.lines().collect();
    assert_eq!(
        writable, WRITABLE,
        "qmqpd {pid} can write elsewhere; writable mounts:\n{rw:?}"
    );
}

/// A client (bash, `server` an address without brackets) that sends the first `split` bytes
/// of `req`, waits until the test creates
/// /root/go, sends the rest and prints the reply. Returns once the first part is sent.
fn start_paused_client(c: &Container, server: &str, req: &[u8], split: usize) -> Child {
    c.write("/root/request", req);
    c.ok("rm -f /root/go /root/sent");
    let script = format!(
        "exec 3<>/dev/tcp/{server}/628 || exit 9\n\
         head -c {split} /root/request >&3\n\
         touch /root/sent\n\
         for i in $(seq 600); do [ -e /root/go ] && break; sleep 0.1; done\n\
         tail -c +{} /root/request >&3\n\
         cat <&3\n",
        split + 1
    );
    let child = c
        .command(&script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start the paused client");
    c.wait_for("the paused client's first bytes", "test -e /root/sent");
    child
}

/// Lets the paused client finish and returns what it printed (the server's reply).
fn finish_paused_client(c: &Container, mut client: Child) -> String {
    c.ok("touch /root/go");
    let status = wait_bounded(&mut client, COMMAND_LIMIT).expect("the paused client hung");
    let mut out = String::new();
    if let Some(mut stdout) = client.stdout.take() {
        let _ = stdout.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(mut stderr) = client.stderr.take() {
        let _ = stderr.read_to_string(&mut err);
    }
    assert!(status.success(), "paused client: {status}: {out} {err}");
    out
}

/// Asserts the ActiveState of each unit.
fn assert_states(c: &Container, expected: &[(&str, &str)]) {
    for (unit, state) in expected {
        let actual = c.property(unit, "ActiveState");
        assert_eq!(&actual, state, "{unit} is {actual}\n{}", c.diagnostics());
    }
}

/// Nothing listens on port 628 in the container.
fn port_closed(c: &Container) -> bool {
    c.sh("exec 3<>/dev/tcp/127.0.0.1/628").status.code() != Some(0)
}

// ---- per connection ------------------------------------------------------------------

#[test]
fn per_connection_pair_serves_stops_and_recovers_under_systemd() {
    let Some(host) = host() else { return };
    let overlay = Overlay::new();
    let c = installed(&host, &overlay, "perconn");
    check_user_and_queue(&c);
    c.ok("systemctl enable --now qmqpd.socket");
    check_messages(&c);

    // A transaction in progress: its instance runs sandboxed, and stopping the socket
    // closes the port but lets the instance finish, so the client gets its K.
    let req = request(MESSAGE, b"sender@example.org", &[b"rcpt@example.net"]);
    let client = start_paused_client(&c, "127.0.0.1", &req, 20);
    // systemd accepts the connection before the instance runs: wait for it (Type=exec is
    // running once qmqpd is executed).
    let running = "systemctl list-units --plain --no-legend --state=running 'qmqpd@*' \
                   | cut -d' ' -f1 | grep .";
    c.wait_for("the connection's instance", running);
    let unit = c.ok(running);
    let unit = unit.trim();
    assert!(unit.starts_with("qmqpd@"), "no running instance: {unit:?}");
    let pid = c.property(unit, "MainPID");
    check_sandbox(&c, &pid);
    c.ok("systemctl stop qmqpd.socket");
    assert!(
        port_closed(&c),
        "port 628 still open after stopping qmqpd.socket"
    );
    assert_eq!(c.property(unit, "ActiveState"), "active");
    let reply = finish_paused_client(&c, client);
    assert!(
        reply.contains(":KOk: queued as "),
        "reply after the stop: {reply:?}"
    );
    c.ok("systemctl start qmqpd.socket");

    // A configuration error: every client gets Z and the error is logged; the next
    // connection after the fix is served, with nothing to restart.
    let mark = c.log_mark();
    c.ok(&format!("echo '{}' >> /etc/qmqpd/main.cf", BAD_LINE));
    let (status, reply) = c.qmqpc("127.0.0.1", MESSAGE);
    assert_eq!((status, reply.trim()), (75, "ZError: internal error"));
    c.wait_for_log(
        mark,
        "fatal: qmqpd_authorized_clients: unsupported lookup table",
    );
    c.wait_for(
        "the failed instance",
        "journalctl -u 'qmqpd@*' -o cat --no-pager | grep -q 'status=78/CONFIG'",
    );
    assert_states(&c, &[("qmqpd.socket", "active")]);
    c.write("/etc/qmqpd/main.cf", MAIN_CF.as_bytes());
    c.queue_message("127.0.0.1");
}

// ---- listener ------------------------------------------------------------------------

/// Replaces the listener's options with a drop-in, as docs/systemd.md says, and restarts
/// the socket.
fn set_listener_options(c: &Container, options: &str, extra: &str) {
    c.ok("mkdir -p /etc/systemd/system/qmqpd-listener.service.d");
    let dropin = format!("[Service]\nExecStart=\nExecStart=/usr/sbin/qmqpd {options}\n{extra}");
    c.write(
        "/etc/systemd/system/qmqpd-listener.service.d/test.conf",
        dropin.as_bytes(),
    );
    c.ok("systemctl daemon-reload && systemctl restart qmqpd-listener.socket");
}

/// How often the listener service has been started so far.
fn listener_starts(c: &Container) -> usize {
    let count = c.ok("journalctl -u qmqpd-listener.service -o cat --no-pager \
         | grep -c '^Started qmqpd-listener' || true");
    count.trim().parse().unwrap_or(0)
}

/// How often the listener service has failed so far.
fn listener_failures(c: &Container) -> usize {
    let count = c.ok("journalctl -u qmqpd-listener.service -o cat --no-pager \\
         | grep -c \"Failed with result 'exit-code'\" || true");
    count.trim().parse().unwrap_or(0)
}

#[test]
fn listener_pair_serves_restarts_and_recovers_under_systemd() {
    let Some(host) = host() else { return };
    let overlay = Overlay::new();
    let c = installed(&host, &overlay, "listener");
    check_user_and_queue(&c);
    c.ok("systemctl enable --now qmqpd-listener.socket");
    check_messages(&c);
    assert_states(&c, &[("qmqpd-listener.service", "active")]);
    let status = c.property("qmqpd-listener.service", "StatusText");
    assert!(status.starts_with("served "), "STATUS=: {status:?}");
    // The start limit is off: each max_use or max_idle exit is a start (issue 15).
    assert_eq!(
        c.property("qmqpd-listener.service", "StartLimitIntervalUSec"),
        "0"
    );

    // A transaction in progress: the listener runs sandboxed, and stopping the socket stops
    // the service, which finishes the transaction first.
    let req = request(MESSAGE, b"sender@example.org", &[b"rcpt@example.net"]);
    let client = start_paused_client(&c, "::1", &req, 20);
    let pid = c.property("qmqpd-listener.service", "MainPID");
    check_sandbox(&c, &pid);
    c.ok("systemctl stop --no-block qmqpd-listener.socket");
    // The socket's stop waits for the service's, which waits for the transaction.
    c.wait_for(
        "SIGTERM to the listener",
        "test \"$(systemctl show -p ActiveState --value qmqpd-listener.service)\" = deactivating",
    );
    let reply = finish_paused_client(&c, client);
    assert!(
        reply.contains(":KOk: queued as "),
        "reply after the stop: {reply:?}"
    );
    c.wait_for(
        "the listener's exit",
        "! systemctl is-active -q qmqpd-listener.service",
    );
    assert_eq!(c.property("qmqpd-listener.service", "Result"), "success");
    assert!(port_closed(&c), "port 628 still open after the stop");
    c.ok("systemctl start qmqpd-listener.socket");

    // max_use and max_idle exits, each followed by a new activation; the watchdog (4 s
    // here, pinged every 2 s) keeps a waiting listener alive.
    set_listener_options(&c, "-o max_use=3 -o max_idle=9s", "WatchdogSec=4s\n");
    let mark = c.log_mark();
    for _ in 0..3 {
        c.queue_message("127.0.0.1");
    }
    c.wait_for_log(mark, "served 3 connections: exiting");
    c.wait_for(
        "the max_use exit",
        "! systemctl is-active -q qmqpd-listener.service",
    );
    assert_states(&c, &[("qmqpd-listener.socket", "active")]);
    let mark = c.log_mark();
    c.queue_message("[::1]");
    let first = c.property("qmqpd-listener.service", "MainPID");
    assert_ne!(first, "0", "no listener after the max_use exit");
    thread::sleep(Duration::from_secs(6));
    assert_eq!(c.property("qmqpd-listener.service", "MainPID"), first);
    c.wait_for_log(mark, "served 1 connections: exiting");
    c.wait_for(
        "the max_idle exit",
        "! systemctl is-active -q qmqpd-listener.service",
    );
    assert_eq!(c.property("qmqpd-listener.service", "Result"), "success");
    c.queue_message("127.0.0.1");

    // A burst well past 5 starts in 10 s: 350 messages from 5 clients with max_use=25 is 14
    // starts (under the socket's trigger limit of 20 in 2 s however fast they come), and
    // every message gets K.
    set_listener_options(&c, "-o max_use=25 -o max_idle=300s", "");
    let before = listener_starts(&c);
    c.write("/root/message", MESSAGE);
    let started = Instant::now();
    let burst = c.ok(
        "for p in 1 2 3 4 5; do \
           (for i in $(seq 70); do \
              qmqpc -t 60 -s 127.0.0.1 -f sender@example.org rcpt@example.net < /root/message 2>&1; \
            done > /root/burst.$p) & \
         done; wait; cat /root/burst.*",
    );
    let elapsed = started.elapsed();
    let replies: Vec<&str> = burst.lines().collect();
    let queued = replies
        .iter()
        .filter(|r| r.starts_with("KOk: queued as "))
        .count();
    eprintln!("burst: {queued} of 350 queued in {elapsed:?}");
    assert_eq!(
        queued,
        350,
        "burst replies: {:?}",
        &replies[..replies.len().min(20)]
    );
    c.wait_for(
        "14 listener starts in the burst",
        &format!(
            "test $(journalctl -u qmqpd-listener.service -o cat --no-pager \
             | grep -c '^Started qmqpd-listener') -ge {}",
            before + 14
        ),
    );
    assert_states(&c, &[("qmqpd-listener.socket", "active")]);

    // A configuration error with the shipped units: qmqpd exits 78 without accepting, and
    // systemd starts it again every 5 s (Restart=on-failure) while the client waits in the
    // socket's backlog; the socket stays up. Once main.cf is fixed, the next start serves
    // the waiting client: nothing to restart.
    c.ok("rm -r /etc/systemd/system/qmqpd-listener.service.d && systemctl daemon-reload");
    c.ok("systemctl restart qmqpd-listener.socket");
    assert_eq!(c.property("qmqpd-listener.service", "RestartUSec"), "5s");
    let mark = c.log_mark();
    c.ok(&format!("echo '{}' >> /etc/qmqpd/main.cf", BAD_LINE));
    let mut waiting = c
        .command(
            "qmqpc -t 120 -s 127.0.0.1 -f sender@example.org rcpt@example.net \
             < /root/message 2>&1",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start qmqpc");
    c.wait_for_log(
        mark,
        "fatal: qmqpd_authorized_clients: unsupported lookup table",
    );
    c.wait_for(
        "a second start of the failing listener",
        "test \"$(systemctl show -p NRestarts --value qmqpd-listener.service)\" -ge 1",
    );
    c.ok("journalctl -u qmqpd-listener.service -o cat --no-pager \\
         | grep -q 'status=78/CONFIG' && journalctl -u qmqpd-listener.service -o cat \\
         --no-pager | grep -q 'Scheduled restart job'");
    assert_states(&c, &[("qmqpd-listener.socket", "active")]);
    let failures = listener_failures(&c);
    c.write("/etc/qmqpd/main.cf", MAIN_CF.as_bytes());
    let status = wait_bounded(&mut waiting, COMMAND_LIMIT).expect("qmqpc hung");
    let mut reply = String::new();
    if let Some(mut stdout) = waiting.stdout.take() {
        let _ = stdout.read_to_string(&mut reply);
    }
    assert!(
        status.success() && reply.starts_with("KOk: queued as "),
        "the client waiting through the configuration error: {status}: {reply}\n{}",
        c.diagnostics()
    );
    // Throttled: a few failed starts, not a loop.
    let restarts: u32 = c
        .property("qmqpd-listener.service", "NRestarts")
        .parse()
        .unwrap();
    eprintln!("configuration error: {failures} failed starts, {restarts} restarts");
    assert_states(
        &c,
        &[
            ("qmqpd-listener.socket", "active"),
            ("qmqpd-listener.service", "active"),
        ],
    );
    c.queue_message("[::1]");
}

// ---- both pairs ----------------------------------------------------------------------

#[test]
fn pairs_switch_both_ways_and_purge_leaves_only_the_user() {
    let Some(host) = host() else { return };
    let overlay = Overlay::new();
    {
        let c = installed(&host, &overlay, "switch");
        c.ok("systemctl enable --now qmqpd.socket");
        c.queue_message("127.0.0.1");

        // Per connection -> listener: one command, and the listener serves right away.
        c.ok("systemctl disable qmqpd.socket && systemctl enable --now qmqpd-listener.socket");
        assert_states(
            &c,
            &[
                ("qmqpd.socket", "inactive"),
                ("qmqpd-listener.socket", "active"),
            ],
        );
        c.queue_message("[::1]");
        assert_states(&c, &[("qmqpd-listener.service", "active")]);

        // Listener -> per connection: the running listener is stopped too.
        c.ok("systemctl disable qmqpd-listener.socket && systemctl enable --now qmqpd.socket");
        assert_states(
            &c,
            &[
                ("qmqpd-listener.socket", "inactive"),
                ("qmqpd-listener.service", "inactive"),
                ("qmqpd.socket", "active"),
            ],
        );
        let accepted: u64 = c.property("qmqpd.socket", "NAccepted").parse().unwrap();
        c.queue_message("127.0.0.1");
        let now: u64 = c.property("qmqpd.socket", "NAccepted").parse().unwrap();
        assert_eq!(
            now,
            accepted + 1,
            "the message did not go through qmqpd.socket"
        );

        // Both enabled: at the next boot the listener socket wins.
        c.ok("systemctl enable qmqpd-listener.socket");
    }
    let c = Container::boot(&host, &overlay, "switch");
    assert_states(
        &c,
        &[
            ("qmqpd-listener.socket", "active"),
            ("qmqpd.socket", "inactive"),
        ],
    );
    assert_eq!(c.property("qmqpd.socket", "UnitFileState"), "enabled");
    c.queue_message("127.0.0.1");
    assert_states(&c, &[("qmqpd-listener.service", "active")]);

    // Purge: the sockets are stopped and their enable links, the queue, the configuration
    // and every file of the package are gone; the user qmqpd stays.
    c.ok("dpkg --purge qmqpd");
    assert!(port_closed(&c), "port 628 open after the purge");
    let left = c.ok(
        "find /etc /usr /var/lib/systemd /var/spool /var/lib/dpkg/info -name '*qmqp*' \
         2>/dev/null; dpkg-query -W qmqpd 2>/dev/null || true",
    );
    assert_eq!(left.trim(), "", "left after the purge");
    c.ok("getent passwd qmqpd && getent group qmqpd");
    let failed = c.ok("systemctl list-units --failed --plain --no-legend 'qmqpd*'");
    assert_eq!(failed.trim(), "", "failed units after the purge");
}
