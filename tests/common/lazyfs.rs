//! A LazyFS mount for the power-loss tests: a FUSE file system with its own page cache that
//! throws away every write not yet fsynced when `lazyfs::clear-cache` is written to its
//! fault FIFO — what a power cut does to a disk's volatile state. Directory operations
//! (create, rename, unlink) pass straight through to the backing directory.
//!
//! The binary comes from `QMQPD_LAZYFS` (`.ci/setup/40-lazyfs.sh` builds it). Without it,
//! without `/dev/fuse` or without `fusermount3` the test is skipped with the reason, or
//! fails under `QMQPD_REQUIRE_INTEROP=1`. Drop unmounts (lazily when busy) and kills and
//! reaps the lazyfs process, also when the test fails.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{built_tool, require_tool, skip_or_fail, wait_bounded};

/// How long lazyfs may take to pre-allocate its cache and mount.
const MOUNT_LIMIT: Duration = Duration::from_secs(60);
/// How long one `clear-cache` may take to be carried out.
const CLEAR_LIMIT: Duration = Duration::from_secs(60);
/// How long lazyfs may take to exit once unmounted.
const EXIT_LIMIT: Duration = Duration::from_secs(10);
/// How often the mount table and lazyfs's log are polled.
const POLL: Duration = Duration::from_millis(20);
/// The line lazyfs logs when a `clear-cache` is done.
const CLEARED: &str = "cache is cleared.";

/// LazyFS itself failed during a run. LazyFS a47a5ba sometimes aborts under many
/// concurrent writers ("terminate called after throwing an instance of 'std::system_error'
/// what(): Resource deadlock avoided": a lock it already holds, taken again), and sometimes
/// deadlocks (its threads wait on its own locks, the processes using the mount hang in
/// their requests). Such a run has no verdict: the caller repeats it on a fresh mount.
#[derive(Debug)]
pub struct Crashed(pub String);

/// One LazyFS mount in a fresh temporary directory: `root/` (the "disk"), `mnt/` (the
/// file system the programs under test use), the fault FIFO, the config and lazyfs's log.
pub struct LazyFs {
    dir: tempfile::TempDir,
    child: Child,
    fusermount: PathBuf,
    /// `clear-cache` commands carried out so far.
    cuts: usize,
}

impl LazyFs {
    /// Mounts a fresh LazyFS with a cache of `cache_mb` MiB (pre-allocated by lazyfs, and
    /// never evicted: evicting would write unsynced data back, hiding a missing fsync).
    /// None (skipped) when LazyFS or FUSE is missing, unless QMQPD_REQUIRE_INTEROP=1.
    pub fn mount(cache_mb: u32) -> Option<LazyFs> {
        let lazyfs = built_tool("QMQPD_LAZYFS")?;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            return skip_or_fail(&format!("FUSE is not usable here: /dev/fuse: {e}"));
        }
        let fusermount = require_tool("fusermount3")?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("qmqpd-powerloss.{}.", std::process::id()))
            .tempdir()
            .expect("cannot create a temporary directory");
        for sub in ["root", "mnt"] {
            std::fs::create_dir(dir.path().join(sub)).expect("cannot create a LazyFS directory");
        }
        let config = format!(
            "[faults]\nfifo_path=\"{}\"\n[cache]\napply_eviction=false\n\
             [cache.simple]\ncustom_size=\"{cache_mb}mb\"\nblocks_per_page=1\n\
             [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
            dir.path().join("faults.fifo").display()
        );
        std::fs::write(dir.path().join("lazyfs.toml"), config).expect("cannot write the config");
        let log = File::create(dir.path().join("lazyfs.log")).expect("cannot create the log");
        let child = Command::new(&lazyfs)
            .arg(dir.path().join("mnt"))
            .arg("--config-path")
            .arg(dir.path().join("lazyfs.toml"))
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", dir.path().join("root").display()))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", lazyfs.display()));
        let mut fs = LazyFs {
            dir,
            child,
            fusermount,
            cuts: 0,
        };
        let deadline = Instant::now() + MOUNT_LIMIT;
        while !fs.is_mounted() {
            if let Ok(Some(status)) = fs.child.try_wait() {
                panic!(
                    "lazyfs exited ({status}) before mounting:\n{}",
                    fs.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "lazyfs did not mount within {MOUNT_LIMIT:?}:\n{}",
                fs.log_text()
            );
            thread::sleep(POLL);
        }
        Some(fs)
    }

    /// The mounted file system: where the programs under test write.
    pub fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    /// The backing directory: what is on the "disk" (after a `clear_cache`, exactly what
    /// survived the power cut).
    pub fn disk(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// A scratch directory beside the mount, not under LazyFS (logs, configuration, the
    /// clients' records).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// What lazyfs logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.path().join("lazyfs.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The power cut: drops every write not yet fsynced, and returns once lazyfs has done
    /// so. The caller stops every process using the mount first, as a power cut does.
    /// Err (with lazyfs's last words) when lazyfs is no longer running or does not clear
    /// its cache in time (then it is killed): see `Crashed`; the run is void.
    pub fn clear_cache(&mut self) -> Result<(), Crashed> {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = self.dir.path().join("faults.fifo");
        let deadline = Instant::now() + CLEAR_LIMIT;
        // Non-blocking, so that a lazyfs that died (no reader: ENXIO) cannot hang the test.
        let mut f = loop {
            self.check_running()?;
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::libc::O_NONBLOCK)
                .open(&fifo)
            {
                Ok(f) => break f,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
                    if Instant::now() > deadline {
                        let why = self.kill();
                        return Err(Crashed(format!(
                            "lazyfs did not read its fault FIFO within {CLEAR_LIMIT:?}; {why}"
                        )));
                    }
                    thread::sleep(POLL);
                }
                Err(e) => panic!("cannot open {}: {e}", fifo.display()),
            }
        };
        f.write_all(b"lazyfs::clear-cache\n")
            .expect("cannot write to the fault FIFO");
        drop(f);
        self.cuts += 1;
        while self.log_text().matches(CLEARED).count() < self.cuts {
            self.check_running()?;
            if Instant::now() > deadline {
                let why = self.kill();
                return Err(Crashed(format!(
                    "lazyfs did not clear its cache within {CLEAR_LIMIT:?}; {why}"
                )));
            }
            thread::sleep(POLL);
        }
        Ok(())
    }

    /// Err when the lazyfs process has exited.
    fn check_running(&mut self) -> Result<(), Crashed> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                let log = self.log_text();
                let start = log.len().saturating_sub(600);
                let tail = log.get(start..).unwrap_or(&log).to_owned();
                Err(Crashed(format!(
                    "lazyfs exited ({status}); its log ends:\n{tail}"
                )))
            }
            Err(e) => panic!("cannot wait for lazyfs: {e}"),
        }
    }

    /// Kills lazyfs (when it stopped answering: the requests waiting on it then fail, so
    /// the processes stuck in them can die); returns the end of its log.
    pub fn kill(&mut self) -> String {
        let _ = self.child.kill();
        let _ = wait_bounded(&mut self.child, EXIT_LIMIT);
        format!("lazyfs killed; its log ends:\n{}", self.log_tail())
    }

    /// The last lines of lazyfs's log.
    fn log_tail(&self) -> String {
        let log = self.log_text();
        let start = log.len().saturating_sub(600);
        log.get(start..).unwrap_or(&log).to_owned()
    }

    /// How many power cuts this mount has had.
    pub fn cuts(&self) -> usize {
        self.cuts
    }

    /// True while `mnt/` is a mount point in this process's mount table.
    fn is_mounted(&self) -> bool {
        let mnt = self.mnt();
        let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else {
            return false;
        };
        table
            .lines()
            .filter_map(|line| line.split(' ').nth(1))
            .any(|point| Path::new(point) == mnt)
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        let (fusermount, mnt) = (self.fusermount.clone(), self.mnt());
        let unmount = |lazy: bool| {
            let mut cmd = Command::new(&fusermount);
            cmd.arg(if lazy { "-uz" } else { "-u" })
                .arg(&mnt)
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            cmd.status().is_ok_and(|s| s.success())
        };
        if self.is_mounted() && !unmount(false) {
            // Busy (a process of a failed test still has a file open): detach it now.
            let _ = unmount(true);
        }
        // lazyfs exits by itself once unmounted; kills and reaps it when it does not.
        if wait_bounded(&mut self.child, EXIT_LIMIT).is_none() && self.is_mounted() {
            let _ = unmount(true);
        }
    }
}
