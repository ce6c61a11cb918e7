//! A real ext4, journal and all, on a disk whose volatile write cache a power cut loses:
//! a disk image on a LazyFS mount, attached to a loop device, made an ext4 and mounted.
//!
//! ```text
//! root/disk.img (the platters) <- LazyFS (the disk's cache) <- /dev/loopN <- ext4 <- queue
//! ```
//!
//! ext4 writes its blocks through the loop device into `disk.img`, where LazyFS keeps them
//! in its own memory; a cache flush (ext4's journal commits, every `fsync`) becomes an
//! `fsync` of `disk.img`, which LazyFS writes through to `root/disk.img`. A power cut is
//! LazyFS's crash fault (not `clear-cache`, after which ext4 would go on writing, and a
//! later flush could make a journal commit block durable whose journal blocks had been
//! dropped): lazyfs kills itself, so what ext4 flushed before is durable and nothing
//! written from that moment on ever arrives. Then the stack is taken down and `root/disk.img` is what the disk holds: a
//! fresh stack on it (or a plain loop device, `inspect`) mounts it, and ext4 replays its
//! journal as after a real power failure. Unlike a queue directly on LazyFS, every
//! directory operation (the `linkat` of an unnamed file, a rename, the fsync of `new/`)
//! goes through ext4's journal here, and `O_TMPFILE` works.
//!
//! Needs root (losetup, mount) and FUSE: without them the test is skipped with the
//! reason, or fails under `QMQPD_REQUIRE_INTEROP=1`. Every mount and loop device made
//! here is removed on Drop (unmounted lazily and detached when busy), also when the test
//! fails; no other loop device or mount is ever touched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub use super::lazyfs::Crash;
use super::lazyfs::{Crashed, LazyFs};
use super::{describe, require_tool, run_bounded, skip_or_fail, text};

/// mkfs.ext4's options: the inode tables and the journal are written out by mkfs itself
/// (not zeroed later by a kernel thread whose writes would race the power cuts), and the
/// file system is made on the backing file directly, so a fresh disk starts durable.
const MKFS_OPTIONS: &str = "lazy_itable_init=0,lazy_journal_init=0";
/// Safety net for one losetup, mount, umount, mkfs or e2fsck.
const TOOL_LIMIT: Duration = Duration::from_secs(120);
/// How long a cut may take (then the test kills lazyfs itself: the same cut).
const CUT_LIMIT: Duration = Duration::from_secs(5);
/// The file on the LazyFS mount (beside the image) whose first write is the power cut.
const POWER_CUT: &str = "power-cut";
/// Cache of each LazyFS beyond the image's size: the whole image fits, so nothing is ever
/// written through behind the test's back (LazyFS writes through when its cache is full).
const CACHE_MARGIN_MB: u32 = 32;

/// The programs the stack runs, found once.
struct DiskTools {
    losetup: PathBuf,
    mount: PathBuf,
    umount: PathBuf,
    mkfs: PathBuf,
    e2fsck: PathBuf,
}

/// A file attached to a loop device; Drop detaches it.
struct LoopDevice {
    losetup: PathBuf,
    device: String,
}

impl LoopDevice {
    /// Attaches `file` to a free loop device (buffered I/O: a flush of the device is an
    /// fsync of the file).
    fn attach(losetup: &Path, file: &Path) -> LoopDevice {
        let out = run_bounded(
            Command::new(losetup).args(["--find", "--show"]).arg(file),
            b"",
            TOOL_LIMIT,
        );
        assert!(
            out.status.success(),
            "losetup {}: {}",
            file.display(),
            describe(&out)
        );
        let device = text(&out.stdout).trim().to_owned();
        assert!(device.starts_with("/dev/loop"), "losetup said {device:?}");
        LoopDevice {
            losetup: losetup.to_path_buf(),
            device,
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let out = run_bounded(
            Command::new(&self.losetup).arg("-d").arg(&self.device),
            b"",
            TOOL_LIMIT,
        );
        if !out.status.success() {
            eprintln!("losetup -d {}: {}", self.device, describe(&out));
        }
    }
}

/// A file system mounted by the test; Drop unmounts it (lazily when busy).
struct Mounted {
    umount: PathBuf,
    point: PathBuf,
}

impl Mounted {
    /// Mounts the ext4 on `device` at `point`; ext4 replays its journal if it must.
    fn mount(mount: &Path, umount: &Path, device: &str, point: &Path) -> Mounted {
        let out = run_bounded(
            Command::new(mount).args(["-t", "ext4", device]).arg(point),
            b"",
            TOOL_LIMIT,
        );
        assert!(
            out.status.success(),
            "mount {device} {}: {}",
            point.display(),
            describe(&out)
        );
        Mounted {
            umount: umount.to_path_buf(),
            point: point.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut cmd = Command::new(&self.umount);
            if lazy {
                cmd.arg("-l");
            }
            run_bounded(cmd.arg(&self.point), b"", TOOL_LIMIT)
        };
        let out = umount(false);
        if !out.status.success() {
            // Busy (a process of a failed test still has a file open): detach it now.
            eprintln!(
                "umount {}: {}; unmounting lazily",
                self.point.display(),
                describe(&out)
            );
            let _ = umount(true);
        }
    }
}

/// The ext4 mounted from a loop device. Fields drop in order: unmount, then detach.
struct Attached {
    _mount: Mounted,
    _device: LoopDevice,
}

/// The stack while the power is on. Fields drop in order: ext4 and its loop device
/// first, then LazyFS.
struct Powered {
    _attached: Attached,
    fs: LazyFs,
}

/// The disk: its image, and the stack on it while the power is on.
pub struct LazyDisk {
    dir: tempfile::TempDir,
    tools: DiskTools,
    cache_mb: u32,
    /// LazyFS mounts so far (each in a directory of its own).
    mounts: usize,
    powered: Option<Powered>,
    /// The image on a plain loop device, for the check after the last cut.
    inspected: Option<Attached>,
    /// Every power cut so far.
    cuts: Vec<Crash>,
}

impl LazyDisk {
    /// Makes a fresh ext4 of `size_mb` MiB on `root/disk.img` and powers the stack on.
    /// None (skipped) without root, FUSE, LazyFS or the tools, unless
    /// QMQPD_REQUIRE_INTEROP=1.
    pub fn create(size_mb: u32) -> Option<LazyDisk> {
        if !nix::unistd::geteuid().is_root() {
            return skip_or_fail("an ext4 on a loop device needs root (losetup, mount)");
        }
        if !Path::new("/dev/loop-control").exists() {
            return skip_or_fail("no loop devices here (/dev/loop-control is missing)");
        }
        LazyFs::check_usable()?;
        let tools = DiskTools {
            losetup: require_tool("losetup")?,
            mount: require_tool("mount")?,
            umount: require_tool("umount")?,
            mkfs: require_tool("mkfs.ext4")?,
            e2fsck: require_tool("e2fsck")?,
        };
        let dir = tempfile::Builder::new()
            .prefix(&format!("qmqpd-lazydisk.{}.", std::process::id()))
            .tempdir()
            .expect("cannot create a temporary directory");
        for sub in ["root", "ext"] {
            std::fs::create_dir(dir.path().join(sub)).expect("cannot create a disk directory");
        }
        let image = dir.path().join("root/disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(u64::from(size_mb) << 20))
            .expect("cannot create the disk image");
        let out = run_bounded(
            Command::new(&tools.mkfs)
                .args(["-q", "-F", "-E", MKFS_OPTIONS])
                .arg(&image),
            b"",
            TOOL_LIMIT,
        );
        assert!(out.status.success(), "mkfs.ext4: {}", describe(&out));
        let mut disk = LazyDisk {
            dir,
            tools,
            cache_mb: size_mb + CACHE_MARGIN_MB,
            mounts: 0,
            powered: None,
            inspected: None,
            cuts: Vec::new(),
        };
        disk.power_on()?;
        Some(disk)
    }

    /// Where the ext4 is mounted, with the power on (and during `inspect`).
    pub fn ext4(&self) -> PathBuf {
        self.dir.path().join("ext")
    }

    /// A scratch directory beside the disk, not on it (logs, configuration).
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// The power cuts so far.
    pub fn cuts(&self) -> &[Crash] {
        &self.cuts
    }

    /// Powers the stack on over what the disk holds: a new LazyFS (empty cache), a loop
    /// device on its `disk.img`, the ext4 mounted (replaying its journal after a cut).
    /// None when LazyFS can no longer be mounted (skipped).
    pub fn power_on(&mut self) -> Option<()> {
        assert!(
            self.powered.is_none() && self.inspected.is_none(),
            "the disk is in use"
        );
        self.mounts += 1;
        let fs = LazyFs::mount_on(
            &self.dir.path().join(format!("lazyfs.{}", self.mounts)),
            &self.dir.path().join("root"),
            self.cache_mb,
        )?;
        let mut fs = fs;
        if let Err(Crashed(why)) = fs.arm_crash(&["write"], POWER_CUT) {
            panic!("LazyFS did not take the power-cut fault: {why}");
        }
        let attached = self.attach(&fs.mnt().join("disk.img"));
        self.powered = Some(Powered {
            _attached: attached,
            fs,
        });
        Some(())
    }

    /// Attaches `image` to a loop device and mounts its ext4 at `ext4()`.
    fn attach(&self, image: &Path) -> Attached {
        let device = LoopDevice::attach(&self.tools.losetup, image);
        let mount = Mounted::mount(
            &self.tools.mount,
            &self.tools.umount,
            &device.device,
            &self.ext4(),
        );
        Attached {
            _mount: mount,
            _device: device,
        }
    }

    /// The power cut, for the disk, now: lazyfs kills itself (its crash fault, armed at
    /// power-on for a write to `POWER_CUT`, which the test does now), and what it held
    /// unflushed is gone; whatever ext4 has under way (a journal commit, a writeback) is
    /// cut where it is. The programs using the ext4 are stopped first by the caller, then
    /// killed, then it calls `power_off`. Err when LazyFS had failed by itself (the run
    /// is void).
    pub fn cut(&mut self) -> Result<Crash, Crashed> {
        let powered = self.powered.as_mut().expect("the power is off");
        // The write itself fails: lazyfs dies before it, and its mount with it.
        let _ = std::fs::write(powered.fs.mnt().join(POWER_CUT), b"cut");
        let crash = powered.fs.await_crash(CUT_LIMIT)?;
        self.cuts.push(crash);
        Ok(crash)
    }

    /// The power cut at ext4's next operation in `ops` on the image: armed, then `meanwhile`
    /// runs (and may cause that operation), then the cut is awaited.
    pub fn cut_at(&mut self, ops: &[&str], meanwhile: impl FnOnce()) -> Result<Crash, Crashed> {
        let powered = self.powered.as_mut().expect("the power is off");
        powered.fs.arm_crash(ops, "disk\\.img")?;
        meanwhile();
        let crash = powered.fs.await_crash(CUT_LIMIT)?;
        self.cuts.push(crash);
        Ok(crash)
    }

    /// Takes the dead stack down once nothing uses the ext4 any more: unmount, detach,
    /// unmount LazyFS. What is left is what the disk holds.
    pub fn power_off(&mut self) {
        self.powered = None;
    }

    /// Mounts the disk as the last cut left it, on a plain loop device (no LazyFS: the
    /// image itself; ext4 replays its journal), at `ext4()`; `check_consistent` unmounts.
    pub fn inspect(&mut self) -> PathBuf {
        assert!(self.powered.is_none(), "the power is still on");
        let image = self.dir.path().join("root/disk.img");
        self.inspected = Some(self.attach(&image));
        self.ext4()
    }

    /// Unmounts what `inspect` mounted and runs `e2fsck -fn` on the image: Err with its
    /// output when the file system is not consistent (a state no power cut may leave).
    pub fn check_consistent(&mut self) -> Result<(), String> {
        self.inspected = None;
        let out = run_bounded(
            Command::new(&self.tools.e2fsck)
                .arg("-fn")
                .arg(self.dir.path().join("root/disk.img")),
            b"",
            TOOL_LIMIT,
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(describe(&out))
        }
    }
}

impl Drop for LazyDisk {
    fn drop(&mut self) {
        self.inspected = None;
        self.powered = None;
    }
}
