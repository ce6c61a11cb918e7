//! A LazyFS mount for the power-loss tests: a FUSE file system with its own page cache that
//! throws away every write not yet fsynced when `lazyfs::clear-cache` is written to its
//! fault FIFO — what a power cut does to a disk's volatile state. Directory operations
//! (create, rename, unlink) pass straight through to the backing directory.
//!
//! The binary comes from `QMQPD_LAZYFS` (`.ci/setup/40-lazyfs.sh` builds it). Without it,
//! without `/dev/fuse` or without `fusermount3` the test is skipped with the reason, or
//! fails under `QMQPD_REQUIRE_INTEROP=1`. Drop unmounts (lazily when busy) and kills and
//! reaps the lazyfs process, also when the test fails.
//!
//! `LazyFs::mount_on` puts a LazyFS over a backing directory of the caller's (so that a
//! disk image on it outlives one mount: see `lazydisk`), and `arm_crash` / `await_crash`
//! cut the power the other way, with LazyFS's crash fault: lazyfs kills itself (SIGKILL)
//! just before a chosen operation on a matching file, so nothing written from then on
//! reaches the backing directory.

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
/// The line lazyfs logs for each crash fault it takes in.
const CRASH_ARMED: &str = "=> crash: from regex path";
/// The line lazyfs logs when a crash fault fires.
const TRIGGERED: &str = "Triggered fault condition";
/// Time for lazyfs to add a crash fault after logging it (a few instructions).
const ARM_PAUSE: Duration = Duration::from_millis(50);

/// LazyFS itself failed during a run. LazyFS a47a5ba sometimes aborts under many
/// concurrent writers ("terminate called after throwing an instance of 'std::system_error'
/// what(): Resource deadlock avoided": a lock it already holds, taken again), and sometimes
/// deadlocks (its threads wait on its own locks, the processes using the mount hang in
/// their requests). Such a run has no verdict: the caller repeats it on a fresh mount.
#[derive(Debug)]
pub struct Crashed(pub String);

/// How a crash fault (`LazyFs::await_crash`) cut the power.
#[derive(Debug, Clone, Copy)]
pub struct Crash {
    /// lazyfs killed itself at a matching operation (false: the test killed it).
    pub by_fault: bool,
    /// The unsynced bytes lazyfs reported at that moment (lost with it), when it did.
    pub unsynced: Option<u64>,
}

/// One LazyFS mount: a backing directory (the "disk": `root/` of a fresh temporary
/// directory, or the caller's with `mount_on`), `mnt/` (the file system the programs under
/// test use), the fault FIFO, the config and lazyfs's log.
pub struct LazyFs {
    /// Where `mnt/`, the FIFO, the config and the log are.
    dir: PathBuf,
    /// The backing directory.
    root: PathBuf,
    /// `dir` when this mount made it (removed on Drop, after the unmount).
    _own: Option<tempfile::TempDir>,
    child: Child,
    fusermount: PathBuf,
    /// `clear-cache` commands carried out and crashes awaited so far.
    cuts: usize,
    /// Crash faults lazyfs has taken in.
    cuts_armed: usize,
}

impl LazyFs {
    /// Mounts a fresh LazyFS with a cache of `cache_mb` MiB (pre-allocated by lazyfs, and
    /// never evicted: evicting would write unsynced data back, hiding a missing fsync).
    /// None (skipped) when LazyFS or FUSE is missing, unless QMQPD_REQUIRE_INTEROP=1.
    pub fn mount(cache_mb: u32) -> Option<LazyFs> {
        LazyFs::check_usable()?;
        let own = tempfile::Builder::new()
            .prefix(&format!("qmqpd-powerloss.{}.", std::process::id()))
            .tempdir()
            .expect("cannot create a temporary directory");
        let (dir, root) = (own.path().to_path_buf(), own.path().join("root"));
        std::fs::create_dir(&root).expect("cannot create a LazyFS directory");
        LazyFs::start(dir, root, Some(own), cache_mb)
    }

    /// Mounts a fresh LazyFS over the existing backing directory `root`, its mount point,
    /// FIFO, config and log in `dir` (created; a fresh one for each mount). The caller
    /// removes both. None (skipped) as for `mount`.
    pub fn mount_on(dir: &Path, root: &Path, cache_mb: u32) -> Option<LazyFs> {
        LazyFs::check_usable()?;
        std::fs::create_dir(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        LazyFs::start(dir.to_path_buf(), root.to_path_buf(), None, cache_mb)
    }

    /// None (skipped, or a failure under QMQPD_REQUIRE_INTEROP=1) when LazyFS or FUSE is
    /// missing.
    pub fn check_usable() -> Option<()> {
        built_tool("QMQPD_LAZYFS")?;
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        {
            return skip_or_fail(&format!("FUSE is not usable here: /dev/fuse: {e}"));
        }
        require_tool("fusermount3").map(|_| ())
    }

    /// Starts lazyfs on `dir/mnt` over `root` and waits until it is mounted.
    fn start(
        dir: PathBuf,
        root: PathBuf,
        own: Option<tempfile::TempDir>,
        cache_mb: u32,
    ) -> Option<LazyFs> {
        let lazyfs = built_tool("QMQPD_LAZYFS")?;
        let fusermount = require_tool("fusermount3")?;
        std::fs::create_dir(dir.join("mnt")).expect("cannot create a LazyFS directory");
        let config = format!(
            "[faults]\nfifo_path=\"{}\"\n[cache]\napply_eviction=false\n\
             [cache.simple]\ncustom_size=\"{cache_mb}mb\"\nblocks_per_page=1\n\
             [filesystem]\nlog_all_operations=false\nlogfile=\"\"\n",
            dir.join("faults.fifo").display()
        );
        std::fs::write(dir.join("lazyfs.toml"), config).expect("cannot write the config");
        let log = File::create(dir.join("lazyfs.log")).expect("cannot create the log");
        let child = Command::new(&lazyfs)
            .arg(dir.join("mnt"))
            .arg("--config-path")
            .arg(dir.join("lazyfs.toml"))
            .args(["-o", "allow_other", "-o", "modules=subdir", "-o"])
            .arg(format!("subdir={}", root.display()))
            .arg("-f")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("cannot share the log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", lazyfs.display()));
        let mut fs = LazyFs {
            dir,
            root,
            _own: own,
            child,
            fusermount,
            cuts: 0,
            cuts_armed: 0,
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
        self.dir.join("mnt")
    }

    /// The backing directory: what is on the "disk" (after a `clear_cache`, exactly what
    /// survived the power cut).
    pub fn disk(&self) -> PathBuf {
        self.root.clone()
    }

    /// A scratch directory beside the mount, not under LazyFS (logs, configuration, the
    /// clients' records).
    pub fn scratch(&self) -> &Path {
        &self.dir
    }

    /// What lazyfs logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read(self.dir.join("lazyfs.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The power cut: drops every write not yet fsynced, and returns once lazyfs has done
    /// so. The caller stops every process using the mount first, as a power cut does.
    /// Err (with lazyfs's last words) when lazyfs is no longer running or does not clear
    /// its cache in time (then it is killed): see `Crashed`; the run is void.
    pub fn clear_cache(&mut self) -> Result<(), Crashed> {
        let deadline = Instant::now() + CLEAR_LIMIT;
        self.send_fault(b"lazyfs::clear-cache\n", deadline)?;
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

    /// Writes `command` (one line) to the fault FIFO once lazyfs reads it. Err (lazyfs killed)
    /// when lazyfs is no longer running or does not open its FIFO before `deadline`.
    fn send_fault(&mut self, command: &[u8], deadline: Instant) -> Result<(), Crashed> {
        use std::os::unix::fs::OpenOptionsExt;
        let fifo = self.dir.join("faults.fifo");
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
        f.write_all(command)
            .expect("cannot write to the fault FIFO");
        Ok(())
    }

    /// Arms the power cut of a disk with a volatile write cache: lazyfs will kill itself
    /// (SIGKILL, its crash fault) just before the next operation in `ops` (such as `write`,
    /// `fsync`) on a file matching the regular expression `file`, so that no write from
    /// that moment on reaches the backing directory, and what it held unsynced is gone with
    /// it. `await_crash` waits for it. Err when lazyfs had already died or does not read
    /// its FIFO.
    pub fn arm_crash(&mut self, ops: &[&str], file: &str) -> Result<(), Crashed> {
        // One command per read of the FIFO: each is sent once the one before was taken in.
        for op in ops {
            self.check_running()?;
            let command = format!("lazyfs::crash::timing=before::op={op}::from_rgx={file}\n");
            self.send_fault(command.as_bytes(), Instant::now() + CLEAR_LIMIT)?;
            let deadline = Instant::now() + CLEAR_LIMIT;
            while self.log_text().matches(CRASH_ARMED).count() <= self.cuts_armed {
                if self.log_text().contains(TRIGGERED) {
                    // Cut already, by a fault taken in before: `await_crash` sees it.
                    return Ok(());
                }
                self.check_running()?;
                if Instant::now() > deadline {
                    let why = self.kill();
                    return Err(Crashed(format!(
                        "lazyfs did not take its crash fault within {CLEAR_LIMIT:?}; {why}"
                    )));
                }
                thread::sleep(Duration::from_millis(2));
            }
            self.cuts_armed += 1;
        }
        // lazyfs logs a crash fault just before it adds it.
        thread::sleep(ARM_PAUSE);
        Ok(())
    }

    /// Waits for the crash `arm_crash` armed. When no matching operation comes within
    /// `limit`, the test kills lazyfs itself (the same cut, at that moment). Returns how
    /// many unsynced bytes lazyfs reported dropping. Err when lazyfs died otherwise.
    pub fn await_crash(&mut self, limit: Duration) -> Result<Crash, Crashed> {
        self.cuts += 1;
        let deadline = Instant::now() + limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.kill();
                    return Ok(Crash {
                        by_fault: false,
                        unsynced: None,
                    });
                }
                Ok(None) => thread::sleep(Duration::from_millis(2)),
                Err(e) => panic!("cannot wait for lazyfs: {e}"),
            }
        }
        let log = self.log_text();
        if !log.contains(TRIGGERED) {
            return Err(Crashed(format!(
                "lazyfs died without its crash fault; its log ends:\n{}",
                self.log_tail()
            )));
        }
        // The report lazyfs writes just before it kills itself.
        let tail = &log[log.rfind(TRIGGERED).unwrap_or(0)..];
        let unsynced = if tail.contains("all data blocks are synced") {
            Some(0)
        } else {
            tail.split("total number of bytes un-fsynced: ")
                .nth(1)
                .and_then(|rest| rest.split(' ').next())
                .and_then(|n| n.parse().ok())
        };
        Ok(Crash {
            by_fault: true,
            unsynced,
        })
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
