//! HAProxy (Debian's /usr/sbin/haproxy) for the tests: started in the foreground (`-db`) on
//! a configuration the test writes, optionally inside a network namespace, with an admin
//! socket the test asks for the servers' states; Drop kills and reaps it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::require_tool;

/// How long HAProxy may take to open its admin socket.
const START_LIMIT: Duration = Duration::from_secs(20);

/// A running HAProxy.
pub struct Haproxy {
    child: Child,
    /// haproxy.cfg, admin.sock and haproxy.log.
    pub dir: tempfile::TempDir,
}

impl Haproxy {
    /// Starts HAProxy on `proxies` (its `defaults`, `frontend`, `backend` sections) behind a
    /// `global` section of our own (admin socket, logs to haproxy.log), in network namespace
    /// `netns` when given. None (skipped) or a panic under QMQPD_REQUIRE_INTEROP=1 when
    /// HAProxy is not installed.
    pub fn start(proxies: &str, netns: Option<&str>) -> Option<Haproxy> {
        let bin = require_tool("haproxy")?;
        let dir = tempfile::Builder::new()
            .prefix("qmqpd-haproxy.")
            .tempdir()
            .expect("cannot create a temporary directory");
        let sock = dir.path().join("admin.sock");
        let config = format!(
            "global\n    stats socket {} level admin\n    log stdout format raw local0 info\n\n{proxies}",
            sock.display()
        );
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, config).expect("cannot write haproxy.cfg");
        let log = std::fs::File::create(dir.path().join("haproxy.log")).expect("haproxy.log");
        let mut cmd = match netns {
            Some(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", ns]).arg(&bin);
                cmd
            }
            None => Command::new(&bin),
        };
        let child = cmd
            .arg("-f")
            .arg(&cfg)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("cannot start haproxy");
        let mut haproxy = Haproxy { child, dir };
        let deadline = Instant::now() + START_LIMIT;
        while UnixStream::connect(&sock).is_err() {
            if let Some(status) = haproxy.child.try_wait().expect("wait for haproxy") {
                panic!("haproxy exited with {status}:\n{}", haproxy.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "haproxy did not open its admin socket within {START_LIMIT:?}:\n{}",
                haproxy.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
        Some(haproxy)
    }

    /// What HAProxy logged (its own messages and one line per connection).
    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.path().join("haproxy.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("admin.sock")
    }

    /// Runs one command on the admin socket and returns its answer.
    pub fn admin(&self, command: &str) -> String {
        let mut s = UnixStream::connect(self.socket()).expect("connect to haproxy's admin socket");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.write_all(format!("{command}\n").as_bytes())
            .expect("write to haproxy's admin socket");
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    /// The status column of `show stat` for each server of `backend`: ("h1", "UP"), ...
    /// ("DRAIN", "DOWN", "MAINT", "UP 1/2" while a check is in transition).
    pub fn server_status(&self, backend: &str) -> Vec<(String, String)> {
        let stat = self.admin("show stat");
        let mut lines = stat.lines();
        let header: Vec<&str> = lines
            .next()
            .unwrap_or_default()
            .trim_start_matches("# ")
            .split(',')
            .collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
            panic!("unexpected show stat output:\n{stat}");
        };
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .filter(|f| f.len() > st && f[px] == backend && f[sv] != "BACKEND")
            .map(|f| (f[sv].to_owned(), f[st].to_owned()))
            .collect()
    }

    /// Waits (at most `limit`) until `server` of `backend` has `status` (exactly, or with a
    /// cause after it: `DOWN (agent)`); panics with every server's status and HAProxy's log
    /// otherwise.
    pub fn wait_status(&self, backend: &str, server: &str, status: &str, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let all = self.server_status(backend);
            let matches = |st: &str| {
                st == status
                    || st
                        .strip_prefix(status)
                        .is_some_and(|rest| rest.starts_with(" ("))
            };
            if all.iter().any(|(s, st)| s == server && matches(st)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{backend}/{server} not {status} within {limit:?}: {all:?}\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
