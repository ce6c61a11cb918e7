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

use file::{DirSync, make_dir, open_new, open_unnamed};
pub(crate) use id::REASON_SUFFIX;
use id::file_name_host;
pub use id::new_queue_id;
pub(crate) use scan::{Claim, remove, rename};
pub(crate) use scan::{Message, failure_reason, find_message, list_messages};

/// Stray `tmp/` files older than this are removed (maildir's rule).
pub const STALE_TMP_AGE: Duration = Duration::from_secs(36 * 3600);

/// The directory every file in the queue is created in.
const TMP: &str = "tmp";

/// How a new message gets its name in `new/` (`queue_commit_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommitMethod {
    /// `Linkat` where the queue's file system has `O_TMPFILE` and `/proc` is mounted,
    /// otherwise `Rename`; decided at the first message, once per process.
    #[default]
    Auto,
    /// An unnamed `O_TMPFILE` file in `tmp/`, linked into `new/`: one directory operation,
    /// nothing left behind by a crash. Where it is not supported, every message fails.
    Linkat,
    /// A named file in `tmp/`, renamed into `new/` (maildir's way).
    Rename,
}

impl CommitMethod {
    /// The parameter value naming this method.
    pub fn name(self) -> &'static str {
        match self {
            CommitMethod::Auto => "auto",
            CommitMethod::Linkat => "linkat",
            CommitMethod::Rename => "rename",
        }
    }
}

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
    /// Mode of new files and the group they must belong to in a set-group-ID queue,
    /// decided on first use (see `file::mode_for`).
    file_mode: OnceLock<(u32, Option<u32>)>,
    /// The configured commit method.
    method: CommitMethod,
    /// `Linkat` or `Rename`, decided at the first message and shared by every clone.
    decided: Arc<OnceLock<CommitMethod>>,
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
            method: CommitMethod::Auto,
            decided: Arc::new(OnceLock::new()),
        }
    }

    /// This queue, committing new messages by `method`.
    pub fn with_commit_method(mut self, method: CommitMethod) -> Queue {
        self.method = method;
        self.decided = Arc::new(OnceLock::new());
        self
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

    /// Opens a new queue file for `queue_id`, unnamed or named in `tmp/` (never an existing
    /// file); `commit` gives it its name in `new/`.
    pub(crate) fn create(&self, queue_id: &str) -> io::Result<QueueFile> {
        let name = format!("{queue_id}.{}", self.host);
        let new = self.dir.join(State::New.dir_name()).join(&name);
        if let Some(file) = self.create_unnamed()? {
            return Ok(QueueFile::unnamed(file, new, Arc::clone(&self.new_sync)));
        }
        let tmp = self.dir.join(TMP).join(&name);
        let file = match open_new(&tmp, self.file_mode().0) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dirs()?;
                open_new(&tmp, self.file_mode().0)
            }
            other => other,
        }
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display())))?;
        Ok(QueueFile::new(file, tmp, new, Arc::clone(&self.new_sync)))
    }

    /// An unnamed file in `tmp/` when messages are committed by `linkat`; `None` when they
    /// are renamed. `auto` decides at its first call whether `O_TMPFILE` and `/proc` work.
    fn create_unnamed(&self) -> io::Result<Option<std::fs::File>> {
        let tmp = self.dir.join(TMP);
        let method = match (self.decided.get(), self.method) {
            (Some(&decided), _) => decided,
            (None, CommitMethod::Auto) if !file::can_link_unnamed() => {
                *self.decided.get_or_init(|| CommitMethod::Rename)
            }
            (None, CommitMethod::Linkat) if !file::can_link_unnamed() => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!(
                        "cannot commit into {} by linkat: /proc/self/fd is not available \
                         (queue_commit_method = linkat)",
                        self.dir.display()
                    ),
                ));
            }
            (None, method) => method,
        };
        if method == CommitMethod::Rename {
            return Ok(None);
        }
        let open = || {
            let (mode, group) = self.file_mode();
            open_unnamed(&tmp, mode, group)
        };
        let opened = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dirs()?;
                open()
            }
            other => other,
        };
        match opened {
            Ok(file) => {
                self.decided.get_or_init(|| CommitMethod::Linkat);
                Ok(Some(file))
            }
            Err(e) if file::unnamed_unsupported(&e) && self.method == CommitMethod::Auto => {
                log::info!(
                    "the file system of {} has no O_TMPFILE ({e}): committing by rename",
                    tmp.display()
                );
                self.decided.get_or_init(|| CommitMethod::Rename);
                Ok(None)
            }
            Err(e) if file::unnamed_unsupported(&e) => Err(io::Error::new(
                e.kind(),
                format!(
                    "cannot create an unnamed file in {}: {e} (the file system has no \
                     O_TMPFILE; queue_commit_method = linkat)",
                    tmp.display()
                ),
            )),
            Err(e) => Err(io::Error::new(
                e.kind(),
                format!("cannot create an unnamed file in {}: {e}", tmp.display()),
            )),
        }
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
        let file = open_new(&tmp, self.file_mode().0)?;
        Ok(QueueFile::new(file, tmp, self.path(state, name), sync))
    }

    /// The mode of new files (the one rule of `file::mode_for`) and, in a set-group-ID
    /// queue, the group of `tmp/` that they must belong to; decided once `tmp/` exists.
    fn file_mode(&self) -> (u32, Option<u32>) {
        if let Some(&mode) = self.file_mode.get() {
            return mode;
        }
        match file::file_mode_of(&self.dir.join(TMP)) {
            Some(mode) => *self.file_mode.get_or_init(|| mode),
            None => (file::mode_for(0), None),
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
        let q =
            Queue::new(&dir.path().join("q"), "host:1").with_commit_method(CommitMethod::Rename);
        let mut f = q.create("ID1").unwrap();
        f.write_all(b"hello").unwrap();
        f.commit().unwrap();
        let new: Vec<_> = fs::read_dir(dir.path().join("q/new")).unwrap().collect();
        assert_eq!(new.len(), 1);
        let f = q.create("ID2").unwrap();
        let tmp = f.tmp_path().unwrap().to_path_buf();
        assert!(tmp.exists());
        drop(f);
        assert!(!tmp.exists());
        assert_eq!(fs::read_dir(dir.path().join("q/tmp")).unwrap().count(), 0);
    }

    #[test]
    fn linkat_commit_names_the_file_only_in_new_and_drop_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(&dir.path().join("q"), "h").with_commit_method(CommitMethod::Linkat);
        let mut f = q.create("ID1").unwrap();
        assert!(f.tmp_path().is_none(), "an unnamed file");
        f.write_all(b"hello").unwrap();
        assert_eq!(fs::read_dir(dir.path().join("q/tmp")).unwrap().count(), 0);
        f.commit().unwrap();
        assert_eq!(fs::read(dir.path().join("q/new/ID1.h")).unwrap(), b"hello");
        let mut f = q.create("ID2").unwrap();
        f.write_all(b"lost").unwrap();
        drop(f);
        for sub in ["tmp", "new"] {
            let names: Vec<_> = fs::read_dir(dir.path().join("q").join(sub))
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            let want: &[&str] = if sub == "new" { &["ID1.h"] } else { &[] };
            assert_eq!(names, want, "{sub}/");
        }
    }

    #[test]
    fn auto_decides_once_and_the_decision_is_shared_by_clones() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        let clone = q.clone();
        let f = q.create("ID").unwrap();
        // The test's file system (ext4, tmpfs, btrfs, xfs) has O_TMPFILE, and /proc is there.
        let want = if file::can_link_unnamed() {
            CommitMethod::Linkat
        } else {
            CommitMethod::Rename
        };
        assert_eq!(f.tmp_path().is_none(), want == CommitMethod::Linkat);
        assert_eq!(clone.decided.get(), Some(&want));
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
        assert_eq!(st.running, 0);
    }

    /// The mode and group of a file made by `create` (by `method`) and by `create_in`, in a
    /// queue whose `tmp/` has the set-group-ID bit or not, and the group of `tmp/`. As root,
    /// `tmp/` gets a group other than ours, so a file that does not follow it shows.
    fn modes(method: CommitMethod, setgid: bool) -> ([(u32, u32); 2], u32) {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h").with_commit_method(method);
        q.create_all_dirs().unwrap();
        let tmp = dir.path().join("tmp");
        if nix::unistd::geteuid().is_root() {
            let other = nix::unistd::Gid::from_raw(nix::unistd::getegid().as_raw() + 1);
            nix::unistd::chown(&tmp, None, Some(other)).unwrap();
        }
        if setgid {
            fs::set_permissions(&tmp, fs::Permissions::from_mode(0o2750)).unwrap();
        }
        let f = q.create("ID").unwrap();
        let copy = q
            .create_in(OsStr::new("X.split"), State::Failed, OsStr::new("X"))
            .unwrap();
        let files = [f.file(), copy.file()].map(|file| {
            let meta = file.metadata().unwrap();
            (meta.permissions().mode() & 0o7777, meta.gid())
        });
        (files, fs::metadata(&tmp).unwrap().gid())
    }

    #[test]
    fn every_file_is_group_readable_only_in_a_setgid_queue() {
        let own = nix::unistd::getegid().as_raw();
        for method in [CommitMethod::Linkat, CommitMethod::Rename] {
            let (files, _) = modes(method, false);
            assert_eq!(files, [(0o600, own); 2], "{method:?}");
            let (files, group) = modes(method, true);
            assert_eq!(files, [(0o640, group); 2], "{method:?}: the group of tmp/");
        }
    }

    #[test]
    fn commit_makes_a_removed_new_directory_again() {
        for method in [CommitMethod::Linkat, CommitMethod::Rename] {
            let dir = tempfile::tempdir().unwrap();
            let q = Queue::new(dir.path(), "h").with_commit_method(method);
            let commit = |q: &Queue, id: &str| {
                let mut f = q.create(id)?;
                f.write_all(id.as_bytes())?;
                f.commit()
            };
            commit(&q, "FIRST").unwrap();
            fs::remove_dir_all(dir.path().join("new")).unwrap();
            // Several commits find it missing at once: each one succeeds.
            let threads: Vec<_> = (0..8)
                .map(|i| {
                    let q = q.clone();
                    std::thread::spawn(move || commit(&q, &format!("T{i}")))
                })
                .collect();
            for t in threads {
                t.join().unwrap().unwrap();
            }
            for i in 0..8 {
                let text = fs::read(dir.path().join(format!("new/T{i}.h"))).unwrap();
                assert_eq!(text, format!("T{i}").as_bytes(), "{method:?}");
            }
        }
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
