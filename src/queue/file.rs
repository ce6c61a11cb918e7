//! Durable creation of every file qmqpd and qmqp-queue put into the queue, and the one mode
//! rule they all follow (see ARCHITECTURE.md, "The queue's invariants").
//!
//! A file is written either without a name (`O_TMPFILE` in `tmp/`) or under a name in
//! `tmp/`; `commit` makes it durable in its final directory: flush, `fdatasync`, `linkat`
//! (the unnamed file) or rename (the named one), `fsync` of the directory (shared by
//! concurrent callers). Only then may a client hear `K`. A file dropped before its commit
//! leaves nothing behind: an unnamed file vanishes with its descriptor, a named one removes
//! itself. This module does not know names, states or the file's contents.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::SystemTime;

/// Mode of the queue's directories.
const DIR_MODE: u32 = 0o750;
/// Write buffer of a file being created: large enough that a big message costs few writes.
const WRITE_BUFFER: usize = 64 * 1024;

/// The one mode rule for files in the queue: 0600, or 0640 when `tmp/` (where every file is
/// created) has the set-group-ID bit, so its files belong to the directory's group (a
/// consumer's), which may read them. Never world-readable.
pub(crate) fn mode_for(tmp_dir_mode: u32) -> u32 {
    if tmp_dir_mode & 0o2000 != 0 {
        0o640
    } else {
        0o600
    }
}

/// The mode for new files in the queue whose `tmp/` is `tmp_dir`, and the group they must
/// belong to when `tmp/` has the set-group-ID bit. `None` when `tmp/` cannot be examined (so
/// the caller may ask again later).
pub(crate) fn file_mode_of(tmp_dir: &Path) -> Option<(u32, Option<u32>)> {
    fs::metadata(tmp_dir).ok().map(|meta| {
        let dir_mode = meta.permissions().mode();
        let group = (dir_mode & 0o2000 != 0).then(|| meta.gid());
        (mode_for(dir_mode), group)
    })
}

/// Creates `path` (mode 0750) and its parents when missing.
pub(crate) fn make_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
}

/// Opens a new file for writing with `mode`, never an existing one.
pub(crate) fn open_new(path: &Path, mode: u32) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
}

/// Opens a new file without a name (`O_TMPFILE`) on the file system of directory `dir`,
/// with `mode`; `commit` links it into its destination. When `group` is given (a set-group-ID
/// queue), the file is made to belong to it, should the file system not have done so.
pub(crate) fn open_unnamed(dir: &Path, mode: u32, group: Option<u32>) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .mode(mode)
        .custom_flags(nix::libc::O_TMPFILE)
        .open(dir)?;
    if let Some(gid) = group
        && file.metadata()?.gid() != gid
    {
        std::os::unix::fs::fchown(&file, None, Some(gid))?;
    }
    Ok(file)
}

/// Whether `e`, from `open_unnamed`, says the file system (or kernel) has no `O_TMPFILE`:
/// `EOPNOTSUPP` (NFS, FUSE, vfat), `EISDIR` (kernels before 3.11 see `O_DIRECTORY`),
/// `EINVAL`.
pub(crate) fn unnamed_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EOPNOTSUPP | nix::libc::EISDIR | nix::libc::EINVAL)
    )
}

/// Where the path of an open file is that `linkat` follows to give an unnamed file its name.
const PROC_FD: &str = "/proc/self/fd";

/// Whether unnamed files can be given a name here: `linkat` of `/proc/self/fd/N` needs
/// `/proc`. (`AT_EMPTY_PATH` would not, but needs `CAP_DAC_READ_SEARCH`.)
pub(crate) fn can_link_unnamed() -> bool {
    Path::new(PROC_FD).is_dir()
}

/// How a file being written gets its name at commit.
enum Pending {
    /// Named in `tmp/`: renamed into place.
    Named(PathBuf),
    /// Unnamed (`O_TMPFILE`): linked into place.
    Unnamed,
}

/// A file being written. Dropping it without `commit` leaves nothing behind.
pub(crate) struct QueueFile {
    wtr: BufWriter<File>,
    pending: Pending,
    dest: PathBuf,
    dest_sync: Arc<DirSync>,
    committed: bool,
}

impl Write for QueueFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.wtr.write(buf)
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.wtr.write_all(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.wtr.flush()
    }
}

impl QueueFile {
    /// Wraps `file`, just created at `tmp`; `commit` renames it to `dest`, in the directory
    /// that `dest_sync` syncs.
    pub(crate) fn new(
        file: File,
        tmp: PathBuf,
        dest: PathBuf,
        dest_sync: Arc<DirSync>,
    ) -> QueueFile {
        QueueFile {
            wtr: BufWriter::with_capacity(WRITE_BUFFER, file),
            pending: Pending::Named(tmp),
            dest,
            dest_sync,
            committed: false,
        }
    }

    /// Wraps `file`, just opened by `open_unnamed`; `commit` links it as `dest`, in the
    /// directory that `dest_sync` syncs.
    pub(crate) fn unnamed(file: File, dest: PathBuf, dest_sync: Arc<DirSync>) -> QueueFile {
        QueueFile {
            wtr: BufWriter::with_capacity(WRITE_BUFFER, file),
            pending: Pending::Unnamed,
            dest,
            dest_sync,
            committed: false,
        }
    }

    /// Makes the file durable at its destination: flush, fdatasync, link or rename, fsync of
    /// the destination directory.
    pub(crate) fn commit(self) -> io::Result<()> {
        self.commit_at(None)
    }

    /// `commit`, giving the file `mtime` (a deferred message's next attempt time) first.
    pub(crate) fn commit_at(mut self, mtime: Option<SystemTime>) -> io::Result<()> {
        self.wtr.flush()?;
        self.wtr.get_ref().sync_data()?;
        if let Some(t) = mtime {
            self.wtr.get_ref().set_modified(t)?;
        }
        match self.name() {
            // The destination directory was removed (by hand, say): made again, durably,
            // rather than failing every message. (Another commit may have made it again
            // meanwhile; then this only syncs and retries.)
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.make_dest_dir()?;
                self.name()?;
            }
            other => other?,
        }
        self.committed = true;
        self.dest_sync.sync()
    }

    /// Gives the file its name at `dest`: rename or link.
    fn name(&self) -> io::Result<()> {
        match &self.pending {
            Pending::Named(tmp) => fs::rename(tmp, &self.dest),
            Pending::Unnamed => {
                let fd = format!("{PROC_FD}/{}", self.wtr.get_ref().as_raw_fd());
                nix::unistd::linkat(
                    nix::fcntl::AT_FDCWD,
                    fd.as_str(),
                    nix::fcntl::AT_FDCWD,
                    self.dest.as_path(),
                    nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
                )
                .map_err(|e| {
                    io::Error::new(
                        io::Error::from(e).kind(),
                        format!("cannot link {}: {e}", self.dest.display()),
                    )
                })
            }
        }
    }

    /// Creates the destination directory when it is missing and makes its name durable in
    /// the queue directory.
    fn make_dest_dir(&self) -> io::Result<()> {
        let Some(dir) = self.dest.parent() else {
            return Ok(());
        };
        if !dir.exists() {
            make_dir(dir)?;
            log::warn!("{} was missing: created it", dir.display());
        }
        match dir.parent() {
            Some(queue) => File::open(queue)?.sync_all(),
            None => Ok(()),
        }
    }

    /// The file's path in `tmp/`; `None` for an unnamed file.
    #[cfg(test)]
    pub(crate) fn tmp_path(&self) -> Option<&Path> {
        match &self.pending {
            Pending::Named(tmp) => Some(tmp),
            Pending::Unnamed => None,
        }
    }

    /// The file being written (tests look at its mode and group).
    #[cfg(test)]
    pub(crate) fn file(&self) -> &File {
        self.wtr.get_ref()
    }
}

impl Drop for QueueFile {
    fn drop(&mut self) {
        if let (false, Pending::Named(tmp)) = (self.committed, &self.pending) {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Group commit for `fsync` of a directory: every caller returns only after an `fsync` that
/// began after its call has succeeded. A caller for whom such an `fsync` is already under way
/// waits for it; else it starts one, which covers everyone who asked so far, even while an
/// earlier one is still running (at most `IN_FLIGHT` at once). So a busy listener pays one
/// directory sync per batch of messages, and a message waits about one sync, not the end of
/// an earlier one and then its own.
#[derive(Debug)]
pub(crate) struct DirSync {
    path: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
}

/// How many `fsync`s of one directory may run at once.
const IN_FLIGHT: usize = 2;

#[derive(Debug, Default)]
pub(crate) struct SyncState {
    /// Callers so far, numbered from 1.
    pub(crate) requested: u64,
    /// Every caller up to this number is covered by a completed fsync.
    pub(crate) synced: u64,
    /// Every caller up to this number is covered by an fsync started (running or done).
    started: u64,
    /// fsyncs running now.
    pub(crate) running: usize,
    /// Callers waiting for a running fsync to end.
    waiting: usize,
}

impl DirSync {
    pub(crate) fn new(path: PathBuf) -> DirSync {
        DirSync {
            path,
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once an fsync of the directory that started after this call has succeeded.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        st.requested += 1;
        let me = st.requested;
        loop {
            if st.synced >= me {
                return Ok(());
            }
            if st.started >= me || st.running >= IN_FLIGHT {
                st.waiting += 1;
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                st.waiting -= 1;
                continue;
            }
            // Everyone who asked so far is covered by the fsync that starts now.
            let upto = st.requested;
            st.started = upto;
            st.running += 1;
            drop(st);
            // Opened for each fsync, never kept: a directory removed and made again (see
            // `commit_at`) must be the one synced.
            let result = File::open(&self.path).and_then(|dir| dir.sync_all());
            st = self.lock();
            st.running -= 1;
            let result = match result {
                Ok(()) => {
                    st.synced = st.synced.max(upto);
                    Ok(())
                }
                // Those who counted on this fsync start their own (or wait for another
                // that covers them).
                Err(e) => {
                    st.started = st.synced;
                    Err(e)
                }
            };
            // A wake-up is a system call: none when nobody waits (a one-shot never does).
            if st.waiting > 0 {
                self.done.notify_all();
            }
            return result;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_for_follows_the_setgid_bit() {
        assert_eq!(mode_for(0o750), 0o600);
        assert_eq!(mode_for(0o2750), 0o640);
        assert_eq!(mode_for(0o40_2770), 0o640);
    }

    #[test]
    fn commit_at_sets_mtime_and_drop_removes_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let sync = Arc::new(DirSync::new(dir.path().to_path_buf()));
        let tmp = dir.path().join("a.tmp");
        let dest = dir.path().join("a");
        let mut f = QueueFile::new(
            open_new(&tmp, 0o600).unwrap(),
            tmp.clone(),
            dest.clone(),
            Arc::clone(&sync),
        );
        f.write_all(b"x").unwrap();
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2_000_000_000);
        f.commit_at(Some(t)).unwrap();
        assert_eq!(fs::metadata(&dest).unwrap().modified().unwrap(), t);
        assert!(!tmp.exists());
        let unnamed_dest = dir.path().join("b");
        let mut f = QueueFile::unnamed(
            open_unnamed(dir.path(), 0o600, None).unwrap(),
            unnamed_dest.clone(),
            Arc::clone(&sync),
        );
        f.write_all(b"y").unwrap();
        f.commit_at(Some(t)).unwrap();
        assert_eq!(fs::read(&unnamed_dest).unwrap(), b"y");
        assert_eq!(fs::metadata(&unnamed_dest).unwrap().modified().unwrap(), t);
        let f = QueueFile::new(open_new(&tmp, 0o600).unwrap(), tmp.clone(), dest, sync);
        drop(f);
        assert!(!tmp.exists());
        assert!(
            open_new(&dir.path().join("a"), 0o600).is_err(),
            "never an existing file"
        );
    }
}
