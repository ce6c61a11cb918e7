//! The same power cuts with the queue on a real ext4 (journal and all) whose disk loses
//! its volatile write cache: a disk image on LazyFS, on a loop device (`lazydisk`). There
//! `O_TMPFILE` works, so qmqpd's default commit path (an unnamed file in `tmp/`,
//! `fdatasync`, `linkat` into `new/`, fsync of `new/`) runs under the cuts, and every
//! directory operation goes through ext4's journal, which a queue directly on LazyFS
//! passes straight through. A power cut at a random moment of the load: every process of
//! the "machine" stops, and at once LazyFS dies (its crash fault), so nothing ext4 writes
//! from then on arrives, also what the kernel had under way; then the processes die; ext4
//! replays its journal when the power comes back.
//!
//! Runs `queue_commit_method = linkat` and `auto` (which must choose linkat here: no name
//! ever appears in `tmp/`, seen through inotify) in each server mode; after the last cut
//! the image is checked on a plain loop device, and `e2fsck -fn` must find it consistent.
//! The negative control on the same stack (a writer that links before its `fdatasync`)
//! must fail the check, and a write that reached the disk but was never flushed must be
//! gone after the cut.
//!
//! `qmqp-queue deliver` runs under the same cuts (`deliver_under_power_cuts`): here its
//! claims and removals, which it does not fsync, go through the journal, so a cut undoes
//! the latest of them and delivered messages come back into the queue (each cut says how
//! many); they must be delivered again, and no message may be lost.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::common::lazydisk::{Crash, LazyDisk};
use super::common::lazyfs::Crashed;
use super::{
    Disk, Machine, Mode, Tools, assert_check_catches_unsynced, check_queue, control_file,
    deliver_under_power_cuts, o_tmpfile_support, on_fresh, power_cuts_once,
};

/// Power cuts at random moments during the load of one run (one more follows it): two
/// runs per server mode, so fewer than directly on LazyFS, to keep the time in bounds.
const CUTS: usize = 2;
/// Size of the disk image (the ext4): a run here used 130 to 190 MiB, journal included, so
/// a faster machine has room for several times the load. (LazyFS holds a cache of this
/// size, in memory.)
const IMAGE_MB: u32 = 768;
/// Size of the disk of the run of `qmqp-queue deliver`: delivered messages are removed,
/// so the queue stays small (the deliverer's backlog took up to 70 MiB in a run here).
const DELIVER_IMAGE_MB: u32 = 256;
/// Size of the negative control's disk.
const CONTROL_IMAGE_MB: u32 = 64;
/// The name of the probe file created in `tmp/` after each power-on, so the watch is
/// shown to see names there.
const PROBE: &str = "inotify-probe";

/// Names created in, moved into or out of `tmp/`, across the power cycles of a run.
struct TmpWatch {
    inotify: Inotify,
    /// Names other than the probe.
    names: BTreeSet<OsString>,
    /// Probes created, and probes seen.
    probes: (usize, usize),
}

impl TmpWatch {
    fn new() -> TmpWatch {
        TmpWatch {
            inotify: Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                .expect("cannot create an inotify instance"),
            names: BTreeSet::new(),
            probes: (0, 0),
        }
    }

    /// Watches `tmp`, a directory of a fresh mount, and creates and removes the probe
    /// there.
    fn arm(&mut self, tmp: &Path) {
        self.inotify
            .add_watch(
                tmp,
                AddWatchFlags::IN_CREATE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_MOVED_FROM,
            )
            .expect("cannot watch tmp/");
        let probe = tmp.join(PROBE);
        std::fs::write(&probe, b"").expect("cannot create the probe");
        std::fs::remove_file(&probe).expect("cannot remove the probe");
        self.probes.0 += 1;
    }

    /// Takes in the events so far.
    fn collect(&mut self) {
        while let Ok(events) = self.inotify.read_events() {
            if events.is_empty() {
                break;
            }
            for name in events.into_iter().filter_map(|e| e.name) {
                if name == PROBE {
                    self.probes.1 += 1;
                } else {
                    self.names.insert(name);
                }
            }
        }
    }
}

/// The queue on an ext4 on a LazyFS disk, and what happens in its `tmp/`.
struct Ext4Disk {
    disk: LazyDisk,
    watch: TmpWatch,
}

impl Ext4Disk {
    fn create(size_mb: u32) -> Option<Ext4Disk> {
        let disk = LazyDisk::create(size_mb)?;
        let mut ext4 = Ext4Disk {
            disk,
            watch: TmpWatch::new(),
        };
        // The queue as installed, and durable (qmqpd makes the three directories only
        // when tmp/ is missing, and the watch needs tmp/). An fsync on ext4 commits the
        // whole journal transaction: the four directories are on the disk.
        let queue = ext4.disk.ext4().join("queue");
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(queue.join(sub)).expect("cannot create the queue");
        }
        File::open(&queue)
            .and_then(|d| d.sync_all())
            .expect("cannot fsync the queue");
        ext4.watch.arm(&ext4.disk.ext4().join("queue/tmp"));
        Some(ext4)
    }
}

impl Disk for Ext4Disk {
    fn mounted(&self) -> PathBuf {
        self.disk.ext4()
    }

    fn scratch(&self) -> PathBuf {
        self.disk.scratch().to_path_buf()
    }

    /// Every process of the machine is stopped first (SIGSTOP: nothing more happens in
    /// user space, so no client hears `K` for anything after this moment), then at once,
    /// without waiting for a system call under way to return, the disk dies, while the
    /// kernel is still carrying out what the processes asked for (an fdatasync, a journal
    /// commit, a writeback): the cut falls wherever those are. Then the processes die,
    /// and the dead stack is taken down.
    ///
    /// The other order (the disk first) would let a process act after the cut: ext4 does
    /// not always report the dead disk then (an fsync of a directory returns 0 when the
    /// journal transaction it would wait for has already failed), so a server could
    /// acknowledge a message that is not on the disk, which no real power cut allows.
    fn power_cut(&mut self, machines: &mut [&mut Machine], back_on: bool) -> Result<(), Crashed> {
        for m in machines.iter_mut() {
            m.stop_now();
        }
        self.watch.collect();
        let cut = self.disk.cut();
        let stuck: Vec<String> = machines
            .iter_mut()
            .filter_map(|m| (!m.power_off()).then(|| m.what.clone()))
            .collect();
        self.disk.power_off();
        // With LazyFS gone, every request to it fails at once: nothing can hang there.
        assert!(
            stuck.is_empty(),
            "processes survived SIGKILL after the cut: {stuck:?}"
        );
        cut?;
        if back_on {
            self.disk
                .power_on()
                .expect("LazyFS could be mounted a moment ago");
            self.watch.arm(&self.disk.ext4().join("queue/tmp"));
        }
        Ok(())
    }

    /// The ext4 mounted anew at power-on, its journal replayed.
    fn recovered(&self) -> PathBuf {
        self.disk.ext4()
    }

    fn durable(&mut self) -> PathBuf {
        self.disk.inspect()
    }

    fn cuts(&self) -> usize {
        self.disk.cuts().len()
    }
}

/// What the cuts of a run dropped, for its summary line.
fn describe_cuts(cuts: &[Crash]) -> String {
    cuts.iter()
        .map(|c| match (c.by_fault, c.unsynced) {
            (true, Some(n)) => format!("{n} B"),
            (true, None) => "? B".to_owned(),
            (false, _) => "killed by the test (no write for 5 s)".to_owned(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The power-loss runs of one server mode on ext4: `linkat`, then `auto`.
fn linkat_power_cuts_in_mode(mode: Mode) {
    let Some(tools) = Tools::find(mode) else {
        return;
    };
    for method in ["linkat", "auto"] {
        let label = format!("{mode:?} on ext4, commit {method}");
        let done = on_fresh(
            &label,
            || Ext4Disk::create(IMAGE_MB),
            |disk| {
                if let Err(e) = o_tmpfile_support(&disk.mounted()) {
                    panic!("{label}: ext4 must have O_TMPFILE: {e}");
                }
                let q = power_cuts_once(disk, &tools, (mode, Some(method)), CUTS, &label)?;
                disk.watch.collect();
                let log = q.log_text();
                drop(q);
                let fs = nix::sys::statvfs::statvfs(&disk.mounted()).expect("cannot statvfs");
                let used = ((fs.blocks() - fs.blocks_free()) * fs.fragment_size()) >> 20;
                eprintln!(
                    "{label}: unsynced data each cut dropped: {}; {used} of {IMAGE_MB} MiB used",
                    describe_cuts(disk.disk.cuts())
                );
                // The listener of the tmp/ clean-up wrote to the image too; then the image
                // must be a consistent ext4, as any power cut leaves it.
                if let Err(e) = disk.disk.check_consistent() {
                    panic!("{label}: e2fsck after the cuts: {e}");
                }
                assert_eq!(
                    disk.watch.probes.1, disk.watch.probes.0,
                    "{label}: the inotify watch missed its probes in tmp/"
                );
                // Committing by rename names every message in tmp/ first; linkat never.
                assert!(
                    disk.watch.names.is_empty() && !log.contains("no O_TMPFILE"),
                    "{label}: qmqpd named files in tmp/, so it did not commit by linkat: \
                     {:?}\nlog:\n{log}",
                    disk.watch.names
                );
                Ok(())
            },
        );
        if done.is_none() {
            return;
        }
    }
}

#[test]
fn linkat_power_cuts_on_ext4_under_tcpserver_lose_no_acknowledged_message() {
    linkat_power_cuts_in_mode(Mode::Tcpserver);
}

#[test]
fn linkat_power_cuts_on_ext4_under_socket_activated_listener_lose_no_acknowledged_message() {
    linkat_power_cuts_in_mode(Mode::Listener);
}

#[test]
fn linkat_power_cuts_on_ext4_under_listen_lose_no_acknowledged_message() {
    linkat_power_cuts_in_mode(Mode::Listen);
}

/// `qmqp-queue deliver --exec` under power cuts with the queue on ext4, where its claims
/// (renames from new/ into cur/) and removals go through the journal without an fsync of
/// their own: a cut can undo the latest of them, so a delivered message can come back
/// into new/ or cur/ and be delivered again. Allowed, as documented (at least once); lost
/// is none, after any cut. The last cut falls when the load is over and the deliverer has
/// caught up, so no fsync of the server's commits the deliverer's latest work with it:
/// that cut undoes what the deliverer did since ext4's last journal commit.
#[test]
fn power_cuts_on_ext4_during_deliver_lose_no_message_and_deliver_again_what_comes_back() {
    let Some(tools) = Tools::find(Mode::Listen) else {
        return;
    };
    let label = "deliver on ext4";
    on_fresh(
        label,
        || Ext4Disk::create(DELIVER_IMAGE_MB),
        |disk| {
            deliver_under_power_cuts(disk, &tools, CUTS, label)?;
            eprintln!(
                "{label}: unsynced data each cut dropped: {}",
                describe_cuts(disk.disk.cuts())
            );
            if let Err(e) = disk.disk.check_consistent() {
                panic!("{label}: e2fsck after the cuts: {e}");
            }
            Ok(())
        },
    );
}

/// A block-aligned buffer of `len` bytes of `byte` inside `storage` (O_DIRECT needs one).
fn aligned(storage: &mut Vec<u8>, len: usize, byte: u8) -> &[u8] {
    const ALIGN: usize = 4096;
    storage.clear();
    storage.resize(len + ALIGN, byte);
    let at = storage.as_ptr().align_offset(ALIGN);
    &storage[at..at + len]
}

/// The negative control on ext4: a writer that gives its unnamed file a name by `linkat`
/// and fsyncs `new/` but never `fdatasync`s the file first loses what it "acknowledged",
/// and the check says so for each such file; the same writer with the `fdatasync` loses
/// none. And the cut really cuts: a block overwritten in place that reached the disk
/// (O_DIRECT) but was never flushed reads back as it was before.
#[test]
fn linkat_before_fdatasync_on_ext4_loses_data_and_the_check_catches_it() {
    let label = "negative control (linkat, ext4)";
    on_fresh(
        label,
        || LazyDisk::create(CONTROL_IMAGE_MB),
        |disk| {
            let queue = disk.ext4().join("queue");
            for sub in ["tmp", "new", "cur"] {
                std::fs::create_dir_all(queue.join(sub)).expect("cannot create the queue");
            }
            let new_dir = File::open(queue.join("new")).expect("cannot open new/");
            // A block on the disk, durable, to be overwritten after the cut is armed.
            let block = disk.ext4().join("block");
            let mut storage = Vec::new();
            {
                let mut f = File::create(&block).expect("cannot create the block file");
                f.write_all(aligned(&mut storage, 4096, b'o'))
                    .and_then(|()| f.sync_all())
                    .expect("cannot write the block file");
                File::open(disk.ext4())
                    .and_then(|d| d.sync_all())
                    .expect("cannot fsync the mount's root");
            }
            let mut sent = Vec::new();
            for i in 0..20 {
                let (s, bytes) = control_file(i);
                let id = s.queue_id.clone().expect("set by control_file");
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_TMPFILE)
                    .open(queue.join("tmp"))
                    .expect("cannot open an unnamed file");
                f.write_all(&bytes).expect("cannot write a control file");
                if s.token.ends_with("-synced") {
                    f.sync_data().expect("cannot fdatasync a control file");
                }
                let fd = format!("/proc/self/fd/{}", f.as_raw_fd());
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    fd.as_str(),
                    nix::fcntl::AT_FDCWD,
                    &queue.join("new").join(&id),
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                )
                .expect("cannot link a control file");
                new_dir.sync_all().expect("cannot fsync new/");
                sent.push(s);
            }
            drop(new_dir);
            // Before the power cut, everything reads back fine: only the cut tells them
            // apart.
            let before = check_queue(&queue, &sent, &[]);
            assert!(
                before.problems.is_empty(),
                "{label}: before the cut: {:?}",
                before.problems
            );
            // Nothing left for a periodic journal commit (the reads above changed access
            // times): an fsync on ext4 commits the whole running transaction. Then the
            // cut, armed at the next flush only: the overwrite goes to the disk (its
            // cache), and the fsync that would flush it is where the power goes.
            File::open(disk.ext4())
                .and_then(|d| d.sync_all())
                .expect("cannot fsync the mount's root");
            let crash = disk.cut_at(&["fsync"], || {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::libc::O_DIRECT)
                    .open(&block)
                    .expect("cannot open the block file for O_DIRECT");
                f.write_all_at(aligned(&mut storage, 4096, b'n'), 0)
                    .expect("cannot overwrite the block");
                let _ = f.sync_all();
            })?;
            disk.power_off();
            let durable = disk.inspect();
            eprintln!(
                "{label}: the cut dropped {:?} unsynced bytes (by the crash fault: {})",
                crash.unsynced, crash.by_fault
            );
            let after = std::fs::read(durable.join("block")).expect("cannot read the block file");
            assert!(
                after.len() == 4096 && after.iter().all(|&b| b == b'o'),
                "{label}: a block written but never flushed survived the cut: the cut does \
                 not cut ({} bytes, starting {:?})",
                after.len(),
                &after[..after.len().min(16)]
            );
            assert_check_catches_unsynced(label, &durable.join("queue"), &sent);
            if let Err(e) = disk.check_consistent() {
                panic!("{label}: e2fsck after the cut: {e}");
            }
            Ok(())
        },
    );
}
