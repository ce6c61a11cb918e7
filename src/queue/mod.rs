//! The maildir-style queue under `queue_directory`: `tmp/` (files being written), `new/`
//! (waiting), `cur/` (claimed by a deliverer) and `failed/` (given up, each with a
//! `.reason` file). Used by the server (`session`) to commit messages and by the consumer
//! (`deliver`, `qmqp-queue`) to list, claim and dispose of them.
//!
//! Owns the layout and the message states, queue IDs and file names (`id`), the one mode
//! rule and the durable create (`file`), the queue file format (`envelope`), scanning and
//! claim by rename (`scan`), and what `list` and `show` print (`listing`). The invariants are in
//! ARCHITECTURE.md. It does not know the QMQP protocol, nor how a message is delivered.

mod envelope;
mod file;
mod id;
pub mod listing;
mod scan;

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use envelope::Attributes;
pub(crate) use envelope::{Envelope, escape, open_message, read_envelope, write_subset};
pub(crate) use file::QueueFile;
use file::{DirSync, make_dir, open_new};
pub(crate) use id::REASON_SUFFIX;
use id::file_name_host;
pub use id::new_queue_id;
pub(crate) use scan::{Claim, remove, rename};
pub(crate) use scan::{Message, failure_reason, find_message, list_messages};

/// Stray `tmp/` files older than this are removed (maildir's rule).
pub const STALE_TMP_AGE: Duration = Duration::from_secs(36 * 3600);

/// The directory every file in the queue is created in.
const TMP: &str = "tmp";

/// Where a message is in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum State {
    /// Waiting in `new/` (new, or deferred until its mtime).
    New,
    /// Claimed by a deliverer in `cur/`.
    Cur,
    /// Given up in `failed/`.
    Failed,
}

impl State {
    /// The subdirectory of `queue_directory` that holds messages in this state.
    pub(crate) fn dir_name(self) -> &'static str {
        match self {
            State::New => "new",
            State::Cur => "cur",
            State::Failed => "failed",
        }
    }
}

/// A queue-level failure: the queue cannot be read or a queue file cannot be moved or
/// written. (Problems of one message are outcomes, not errors.)
#[derive(Debug)]
pub enum QueueError {
    /// A queue directory cannot be read or created.
    Dir { path: PathBuf, source: io::Error },
    /// A queue file cannot be renamed or removed.
    Move {
        from: PathBuf,
        to: Option<PathBuf>,
        source: io::Error,
    },
    /// A queue file or reason file cannot be written.
    Write { path: PathBuf, source: io::Error },
}

impl fmt::Display for QueueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueueError::Dir { path, source } => {
                write!(f, "cannot use directory \"{}\": {source}", path.display())
            }
            QueueError::Move {
                from,
                to: Some(to),
                source,
            } => write!(
                f,
                "cannot rename \"{}\" to \"{}\": {source}",
                from.display(),
                to.display()
            ),
            QueueError::Move {
                from,
                to: None,
                source,
            } => write!(f, "cannot remove \"{}\": {source}", from.display()),
            QueueError::Write { path, source } => {
                write!(f, "cannot write \"{}\": {source}", path.display())
            }
        }
    }
}

impl std::error::Error for QueueError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            QueueError::Dir { source, .. }
            | QueueError::Move { source, .. }
            | QueueError::Write { source, .. } => Some(source),
        }
    }
}

/// A queue directory.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    host: String,
    new_sync: Arc<DirSync>,
    failed_sync: Arc<DirSync>,
    /// Mode of new files, decided on first use (see `file::mode_for`).
    file_mode: OnceLock<u32>,
}

impl Queue {
    /// A queue at `dir` whose new files are named for `hostname`; touches nothing until the
    /// first file is created (so start-up costs no system calls), then creates `tmp/`,
    /// `new/` and `cur/` (mode 0750) when missing.
    pub fn new(dir: &Path, hostname: &str) -> Queue {
        Queue {
            dir: dir.to_path_buf(),
            host: file_name_host(hostname),
            new_sync: Arc::new(DirSync::new(dir.join(State::New.dir_name()))),
            failed_sync: Arc::new(DirSync::new(dir.join(State::Failed.dir_name()))),
            file_mode: OnceLock::new(),
        }
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `name` in the directory of `state`.
    pub(crate) fn path(&self, state: State, name: &OsStr) -> PathBuf {
        self.dir.join(state.dir_name()).join(name)
    }

    /// Creates `tmp/`, `new/` and `cur/` when missing.
    pub(crate) fn create_dirs(&self) -> io::Result<()> {
        // tmp/ last: `create` takes an existing tmp/ to mean the whole layout is there, so a
        // concurrent transaction must never find tmp/ before new/ (its rename would fail).
        for sub in [State::New.dir_name(), State::Cur.dir_name(), TMP] {
            let path = self.dir.join(sub);
            make_dir(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    /// Creates `tmp/`, `new/`, `cur/` and `failed/` when missing (what a consumer needs).
    pub(crate) fn create_all_dirs(&self) -> Result<(), QueueError> {
        let states = [State::New, State::Cur, State::Failed].map(State::dir_name);
        // tmp/ last, as in `create_dirs`.
        for sub in states.into_iter().chain(std::iter::once(TMP)) {
            let path = self.dir.join(sub);
            make_dir(&path).map_err(|source| QueueError::Dir { path, source })?;
        }
        Ok(())
    }

    /// Opens a new queue file for `queue_id` in `tmp/`, never an existing file; `commit`
    /// moves it into `new/`.
    pub(crate) fn create(&self, queue_id: &str) -> io::Result<QueueFile> {
        let name = format!("{queue_id}.{}", self.host);
        let tmp = self.dir.join(TMP).join(&name);
        let file = match open_new(&tmp, self.file_mode()) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dirs()?;
                open_new(&tmp, self.file_mode())
            }
            other => other,
        }
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display())))?;
        let new = self.dir.join(State::New.dir_name()).join(&name);
        Ok(QueueFile::new(file, tmp, new, Arc::clone(&self.new_sync)))
    }

    /// Opens `tmp/TMP_NAME` for a file that `commit` moves to `STATE/NAME` (a split copy or
    /// a reason file). Names derived from a queue file's name may be left over from a crash:
    /// such a file is replaced.
    pub(crate) fn create_in(
        &self,
        tmp_name: &OsStr,
        state: State,
        name: &OsStr,
    ) -> io::Result<QueueFile> {
        let tmp = self.dir.join(TMP).join(tmp_name);
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let sync = match state {
            State::New => Arc::clone(&self.new_sync),
            State::Failed => Arc::clone(&self.failed_sync),
            State::Cur => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "files are claimed into cur/, never created there",
                ));
            }
        };
        let file = open_new(&tmp, self.file_mode())?;
        Ok(QueueFile::new(file, tmp, self.path(state, name), sync))
    }

    /// The mode of new files: the one rule of `file::mode_for`, decided once `tmp/` exists.
    fn file_mode(&self) -> u32 {
        if let Some(&mode) = self.file_mode.get() {
            return mode;
        }
        match file::file_mode_of(&self.dir.join(TMP)) {
            Some(mode) => *self.file_mode.get_or_init(|| mode),
            None => file::mode_for(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::io::Write;

    #[test]
    fn commit_moves_file_into_new_and_drop_cleans_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(&dir.path().join("q"), "host:1");
        let mut f = q.create("ID1").unwrap();
        f.write_all(b"hello").unwrap();
        f.commit().unwrap();
        let new: Vec<_> = fs::read_dir(dir.path().join("q/new")).unwrap().collect();
        assert_eq!(new.len(), 1);
        let f = q.create("ID2").unwrap();
        let tmp = f.tmp_path().to_path_buf();
        assert!(tmp.exists());
        drop(f);
        assert!(!tmp.exists());
        assert_eq!(fs::read_dir(dir.path().join("q/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn concurrent_commits_all_land_with_shared_directory_sync() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for j in 0..20 {
                        let mut f = q.create(&format!("T{i}-{j}")).unwrap();
                        f.write_all(b"x").unwrap();
                        f.commit().unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read_dir(dir.path().join("new")).unwrap().count(), 320);
        let st = q.new_sync.lock();
        assert_eq!(
            st.synced, 320,
            "every commit is covered by a directory sync"
        );
        assert!(!st.running);
    }

    /// The mode of a file made by `create` and by `create_in`, in a queue whose `tmp/` has
    /// the set-group-ID bit or not.
    fn modes(setgid: bool) -> [u32; 2] {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        q.create_all_dirs().unwrap();
        if setgid {
            fs::set_permissions(dir.path().join("tmp"), fs::Permissions::from_mode(0o2750))
                .unwrap();
        }
        let f = q.create("ID").unwrap();
        let copy = q
            .create_in(OsStr::new("X.split"), State::Failed, OsStr::new("X"))
            .unwrap();
        [f.tmp_path(), copy.tmp_path()]
            .map(|p| fs::metadata(p).unwrap().permissions().mode() & 0o7777)
    }

    #[test]
    fn every_file_is_group_readable_only_in_a_setgid_queue() {
        assert_eq!(modes(false), [0o600; 2]);
        assert_eq!(modes(true), [0o640; 2]);
    }

    #[test]
    fn create_in_replaces_a_leftover_and_commits_into_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        q.create_all_dirs().unwrap();
        fs::write(dir.path().join("tmp/A.h.reason-tmp"), b"old").unwrap();
        let mut f = q
            .create_in(
                OsStr::new("A.h.reason-tmp"),
                State::Failed,
                OsStr::new("A.h.reason"),
            )
            .unwrap();
        f.write_all(b"why\n").unwrap();
        f.commit().unwrap();
        assert_eq!(
            fs::read(dir.path().join("failed/A.h.reason")).unwrap(),
            b"why\n"
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }
}
