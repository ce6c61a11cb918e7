//! Durable creation of every file qmqpd and qmqp-queue put into the queue, and the one mode
//! rule they all follow (see ARCHITECTURE.md, "The queue's invariants").
//!
//! A file is written under `tmp/`, then `commit` makes it durable in its final directory:
//! flush, `fdatasync`, rename, `fsync` of the directory (shared by concurrent callers). Only
//! then may a client hear `K`. A file dropped before its commit removes itself. This module
//! does not know names, states or the file's contents.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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

/// The mode for new files in the queue whose `tmp/` is `tmp_dir`; 0600 when it cannot be
/// read. `None` when `tmp/` cannot be examined (so the caller may ask again later).
pub(crate) fn file_mode_of(tmp_dir: &Path) -> Option<u32> {
    fs::metadata(tmp_dir)
        .ok()
        .map(|meta| mode_for(meta.permissions().mode()))
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

/// A file being written in `tmp/`. Dropping it without `commit` removes it.
pub(crate) struct QueueFile {
    wtr: BufWriter<File>,
    tmp: PathBuf,
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
            tmp,
            dest,
            dest_sync,
            committed: false,
        }
    }

    /// Makes the file durable at its destination: flush, fdatasync, rename, fsync of the
    /// destination directory.
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
        fs::rename(&self.tmp, &self.dest)?;
        self.committed = true;
        self.dest_sync.sync()
    }

    /// The file's path in `tmp/`.
    #[cfg(test)]
    pub(crate) fn tmp_path(&self) -> &Path {
        &self.tmp
    }
}

impl Drop for QueueFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Group commit for `fsync` of a directory: every caller returns only after an `fsync` that
/// began after its call, but callers that arrive while one runs share the next one, so a busy
/// listener pays one directory sync per batch of messages instead of one per message.
#[derive(Debug)]
pub(crate) struct DirSync {
    path: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
pub(crate) struct SyncState {
    /// Callers so far, numbered from 1.
    pub(crate) requested: u64,
    /// Every caller up to this number is covered by a completed fsync.
    pub(crate) synced: u64,
    pub(crate) running: bool,
    /// The directory, opened once.
    dir: Option<File>,
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
            if st.running {
                st = self.done.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Everyone who asked so far is covered by the fsync that starts now.
            st.running = true;
            let upto = st.requested;
            let dir = match st.dir.take() {
                Some(dir) => Ok(dir),
                None => File::open(&self.path),
            };
            drop(st);
            let result = dir.and_then(|dir| dir.sync_all().map(|()| dir));
            st = self.lock();
            st.running = false;
            self.done.notify_all();
            match result {
                Ok(dir) => {
                    st.dir = Some(dir);
                    st.synced = st.synced.max(upto);
                }
                // The others retry with an fsync of their own.
                Err(e) => return Err(e),
            }
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
        let f = QueueFile::new(open_new(&tmp, 0o600).unwrap(), tmp.clone(), dest, sync);
        drop(f);
        assert!(!tmp.exists());
        assert!(
            open_new(&dir.path().join("a"), 0o600).is_err(),
            "never an existing file"
        );
    }
}
