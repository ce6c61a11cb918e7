//! A private Postfix instance for the tests (tests/postfix.rs, tests/cluster.rs): from the
//! unpacked package (`$QMQPD_POSTFIX_ROOT`) or an installed one, under its own master(8) in a
//! temporary directory, offering qmqpd(8) on a free port of 127.0.0.1 or pickup(8). No qmgr
//! runs, so accepted mail stays in incoming/, where postcat(1) shows it. Needs root (the
//! daemons drop to the `postfix` user, created with the `postdrop` group when missing).

use std::fs::{self, File};
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::sys::stat::Mode;
use nix::unistd::{Group, Pid, User};

use super::{InteropTool, describe, run_bounded, text};

/// A safety net for every child and every wait: never expected to be reached.
const LIMIT: Duration = Duration::from_secs(120);
/// How often the files and processes are looked at.
const POLL: Duration = Duration::from_millis(20);

/// Serialises the creation of the `postfix` user and `postdrop` group between the tests of
/// this binary (useradd locks /etc/passwd and fails when another one holds the lock).
static ACCOUNTS: Mutex<()> = Mutex::new(());

/// True when `.ci/run` asked for every interop tool to be present.
fn interop_required() -> bool {
    std::env::var_os("QMQPD_REQUIRE_INTEROP").is_some_and(|v| v == "1")
}

/// Skips (None, reason on stderr) or, under QMQPD_REQUIRE_INTEROP=1, fails the test.
fn skip_or_fail<T>(why: &str) -> Option<T> {
    assert!(
        !interop_required(),
        "cannot run a Postfix instance and QMQPD_REQUIRE_INTEROP=1: {why}"
    );
    eprintln!("skipped: {why}");
    None
}

/// The Postfix package's root, when this test can run one of its instances: as root, with
/// master(8) found under `$QMQPD_POSTFIX_ROOT` (or installed), and the `postfix` user and
/// `postdrop` group present (created when missing).
pub fn postfix_package() -> Option<InteropTool> {
    if !nix::unistd::geteuid().is_root() {
        return skip_or_fail("not root: Postfix's master(8) and daemons must start as root");
    }
    let master = super::interop_tool("QMQPD_POSTFIX_ROOT", "usr/lib/postfix/sbin/master")?;
    ensure_accounts();
    Some(master)
}

/// Creates the `postdrop` group and the `postfix` user (system accounts, no home, no shell)
/// when they are missing, as `benches/run` does; they are left in place afterwards.
pub fn ensure_accounts() {
    let _guard = ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner());
    if Group::from_name("postdrop").unwrap().is_none() {
        let groupadd = super::require_tool("groupadd").expect("groupadd");
        run_account_tool(
            Command::new(groupadd).args(["--system", "postdrop"]),
            || Group::from_name("postdrop").is_ok_and(|g| g.is_some()),
        );
    }
    if User::from_name("postfix").unwrap().is_none() {
        let useradd = super::require_tool("useradd").expect("useradd");
        let mut cmd = Command::new(useradd);
        cmd.args(["--system", "--home-dir", "/nonexistent", "--no-create-home"])
            .args(["--shell", "/usr/sbin/nologin"]);
        // --user-group fails when a group named postfix is already there: join it instead.
        if Group::from_name("postfix").unwrap().is_some() {
            cmd.args(["-g", "postfix"]);
        } else {
            cmd.arg("--user-group");
        }
        run_account_tool(cmd.arg("postfix"), || {
            User::from_name("postfix").is_ok_and(|u| u.is_some())
        });
    }
}

/// Runs groupadd or useradd; panics when it fails and the account is still missing (another
/// program may have created it meanwhile).
pub fn run_account_tool(cmd: &mut Command, exists: impl Fn() -> bool) {
    let out = run_bounded(cmd, b"", LIMIT);
    assert!(
        out.status.success() || exists(),
        "{cmd:?}: {}",
        describe(&out)
    );
}

/// Which service a test's Postfix instance offers on top of cleanup and trivial-rewrite.
#[derive(Clone, Copy, PartialEq)]
pub enum Entry {
    /// qmqpd(8) on a free port of 127.0.0.1.
    Qmqpd,
    /// pickup(8), which takes what postdrop(1) leaves in maildrop/ (for sendmail).
    Pickup,
}

/// A private Postfix instance: configuration and queue in a temporary directory, its
/// master(8) leading a process group of its own. Drop kills the whole group with SIGKILL
/// and reaps the master (everything the daemons acknowledged is on disk already).
pub struct Postfix {
    /// The package root (`/` for an installed Postfix).
    pub root: PathBuf,
    /// dir/conf: main.cf and master.cf; dir/queue: queue_directory; dir/postfix.log.
    pub dir: tempfile::TempDir,
    /// 127.0.0.1:port of qmqpd(8), for `Entry::Qmqpd`.
    pub port: Option<u16>,
    pub master: Child,
}

impl Postfix {
    /// Starts an instance offering `entry` and waits until it is ready: qmqpd's port
    /// listening, or pickup's socket there. Tries again with a new port (at most 5 times)
    /// when master exits first, as it does when another process took the port.
    pub fn start(package: &InteropTool, entry: Entry) -> Postfix {
        let mut failures = Vec::new();
        for _attempt in 0..5 {
            let port = (entry == Entry::Qmqpd).then(super::free_port);
            let mut postfix = Postfix::spawn(&package.root, port);
            let deadline = Instant::now() + LIMIT;
            loop {
                if let Some(status) = postfix.master.try_wait().unwrap() {
                    failures.push(format!("master exited with {status}:\n{}", postfix.logs()));
                    break;
                }
                if postfix.is_ready() {
                    return postfix;
                }
                assert!(
                    Instant::now() < deadline,
                    "Postfix not ready within {LIMIT:?}:\n{}",
                    postfix.logs()
                );
                thread::sleep(POLL);
            }
        }
        panic!(
            "Postfix's master did not start, 5 times:\n{}",
            failures.join("\n")
        );
    }

    /// Writes the instance's directories and configuration and starts `master -d`.
    pub fn spawn(root: &Path, port: Option<u16>) -> Postfix {
        let dir = tempfile::Builder::new()
            .prefix("qmqpd-postfix.")
            .tempdir()
            .unwrap();
        // The daemons run as postfix and open the log file by its absolute path.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path();
        let q = d.join("queue");
        let postfix = User::from_name("postfix").unwrap().expect("postfix user");
        let postdrop = Group::from_name("postdrop")
            .unwrap()
            .expect("postdrop group");
        let (uid, gid) = (Some(postfix.uid.as_raw()), Some(postdrop.gid.as_raw()));
        for sub in ["conf", "data", "queue"] {
            fs::create_dir(d.join(sub)).unwrap();
        }
        // (directory, owned by postfix, group postdrop, mode), as postfix-files has them.
        let layout = [
            ("incoming", false, 0o700),
            ("private", false, 0o700),
            ("public", true, 0o710),
            ("maildrop", true, 0o1730),
            ("pid", false, 0o755),
        ];
        for (sub, postdrop_group, mode) in layout {
            let path = q.join(sub);
            fs::create_dir(&path).unwrap();
            if sub != "pid" {
                chown(&path, uid, if postdrop_group { gid } else { None }).unwrap();
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        }
        chown(d.join("data"), uid, None).unwrap();
        // No qmgr: an unread FIFO in its place takes cleanup's "new mail" triggers quietly,
        // and the mail stays in incoming/.
        let qmgr = q.join("public/qmgr");
        nix::unistd::mkfifo(&qmgr, Mode::from_bits_truncate(0o622)).unwrap();
        fs::set_permissions(&qmgr, fs::Permissions::from_mode(0o622)).unwrap();
        chown(&qmgr, uid, gid).unwrap();
        File::create(d.join("postfix.log")).unwrap();
        chown(d.join("postfix.log"), uid, None).unwrap();

        let lib = root.join("usr/lib/postfix");
        let main_cf = format!(
            "compatibility_level = 3.6
queue_directory = {q}
data_directory = {d}/data
daemon_directory = {lib}/sbin
command_directory = {root}/usr/sbin
meta_directory = {root}/etc/postfix
shlib_directory = {lib}
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.invalid
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
in_flow_delay = 0
qmqpd_error_delay = 0
qmqpd_authorized_clients = 127.0.0.1
# The programs of an unpacked Postfix find their libraries only through LD_LIBRARY_PATH:
# the daemons import it from master, postdrop gets it from sendmail.
import_environment = MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH
export_environment = TZ MAIL_CONFIG LANG LD_LIBRARY_PATH
maillog_file = {d}/postfix.log
maillog_file_prefixes = {d}
",
            q = q.display(),
            d = d.display(),
            lib = lib.display(),
            root = root.display().to_string().trim_end_matches('/'),
        );
        let entry_line = match port {
            Some(port) => format!("127.0.0.1:{port} inet n - n - - qmqpd"),
            None => "pickup unix n - n 60 1 pickup".to_string(),
        };
        let master_cf = format!(
            "{entry_line}
cleanup unix n - n - 0 cleanup
rewrite unix - - n - - trivial-rewrite
postlog unix-dgram n - n - 1 postlogd
"
        );
        let conf = d.join("conf");
        for (name, text) in [("main.cf", main_cf), ("master.cf", master_cf)] {
            let path = conf.join(name);
            fs::write(&path, text).unwrap();
            // Postfix waits while a configuration file is under a second old ("being
            // edited"): date them back so that master starts at once.
            let old = std::time::SystemTime::now() - Duration::from_secs(60);
            File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(old)
                .unwrap();
        }

        let out = File::create(d.join("master.out")).unwrap();
        let master = Command::new(lib.join("sbin/master"))
            .arg("-c")
            .arg(&conf)
            .arg("-d")
            .env("LD_LIBRARY_PATH", &lib)
            .env_remove("MAIL_CONFIG")
            // `master -d` does not leave our process group by itself; in a group of its
            // own, it and its daemons can be killed together.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", lib.join("sbin/master").display()));
        Postfix {
            root: root.to_path_buf(),
            dir,
            port,
            master,
        }
    }

    /// qmqpd's port is listening, or pickup's socket exists (master creates its sockets
    /// before it starts any daemon, and postdrop's trigger needs pickup's).
    pub fn is_ready(&self) -> bool {
        match self.port {
            Some(port) => tcp_listening(port),
            None => self.queue_dir().join("public/pickup").exists(),
        }
    }

    /// The configuration directory, for `-c` and `MAIL_CONFIG`.
    pub fn conf_dir(&self) -> PathBuf {
        self.dir.path().join("conf")
    }

    /// The queue_directory.
    pub fn queue_dir(&self) -> PathBuf {
        self.dir.path().join("queue")
    }

    /// Postfix's private libraries.
    pub fn lib_dir(&self) -> PathBuf {
        self.root.join("usr/lib/postfix")
    }

    /// A Postfix command-line program, run with its libraries.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.root.join("usr/sbin").join(program));
        cmd.env("LD_LIBRARY_PATH", self.lib_dir())
            .env_remove("MAIL_CONFIG");
        cmd
    }

    /// Names of the files in queue/<sub> (incoming, maildrop…), sorted.
    pub fn files(&self, sub: &str) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.queue_dir().join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// master's output and Postfix's log, for failure messages.
    pub fn logs(&self) -> String {
        let read = |name: &str| {
            fs::read(self.dir.path().join(name))
                .map(|b| text(&b))
                .unwrap_or_default()
        };
        format!(
            "master output:\n{}\npostfix.log:\n{}",
            read("master.out"),
            read("postfix.log")
        )
    }

    /// The queue file `id` as `postcat -c CONFDIR -q ID` prints it: envelope records,
    /// then the message.
    pub fn postcat(&self, id: &str) -> Postcat {
        let out = run_bounded(
            self.command("postcat")
                .arg("-c")
                .arg(self.conf_dir())
                .args(["-q", id]),
            b"",
            LIMIT,
        );
        assert!(out.status.success(), "postcat -q {id}: {}", describe(&out));
        Postcat {
            text: text(&out.stdout),
        }
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let Ok(pgid) = i32::try_from(self.master.id()) else {
            return;
        };
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        let _ = self.master.wait();
        // The daemons were master's children: init reaps them. Wait (bounded) until none
        // runs any more, so none writes into the directory being removed.
        let deadline = Instant::now() + LIMIT;
        while group_alive(pgid) && Instant::now() < deadline {
            thread::sleep(POLL);
        }
    }
}

/// True while a process of group `pgid` is alive (not a zombie), by /proc.
pub fn group_alive(pgid: i32) -> bool {
    let Ok(entries) = fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            return false;
        };
        // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            return false;
        };
        let fields: Vec<&str> = rest.split(' ').collect();
        fields.first() != Some(&"Z") && fields.get(2) == Some(&pgid.to_string().as_str())
    })
}

/// True when a socket listens on 127.0.0.1:`port`, by /proc/net/tcp (no probe connection
/// that Postfix would log).
pub fn tcp_listening(port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    fs::read_to_string("/proc/net/tcp").is_ok_and(|table| {
        table.lines().skip(1).any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A")
        })
    })
}

/// postcat's output for one queue file.
pub struct Postcat {
    pub text: String,
}

impl Postcat {
    /// The envelope sender (the `sender:` record).
    pub fn sender(&self) -> &str {
        self.records("sender").first().copied().unwrap_or_else(|| {
            panic!("no sender record:\n{}", self.text);
        })
    }

    /// The values of every envelope record `name`, in order.
    pub fn records(&self, name: &str) -> Vec<&str> {
        let prefix = format!("{name}: ");
        self.envelope()
            .lines()
            .filter_map(|line| line.strip_prefix(&prefix))
            .collect()
    }

    /// The envelope part of the output.
    pub fn envelope(&self) -> &str {
        self.text
            .split("*** MESSAGE CONTENTS ")
            .next()
            .unwrap_or_default()
    }

    /// The message content part of the output (headers and body).
    pub fn content(&self) -> &str {
        let (_, rest) = self
            .text
            .split_once("*** MESSAGE CONTENTS ")
            .unwrap_or_else(|| panic!("no message contents:\n{}", self.text));
        let (_, content) = rest.split_once('\n').unwrap();
        content
            .split("*** HEADER EXTRACTED ")
            .next()
            .unwrap_or_default()
    }
}
