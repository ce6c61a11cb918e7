//! Finding and moving queue files: listing `new/`, `cur/` and `failed/`, finding one message,
//! claiming a message by renaming it from `new/` into `cur/`, taking back stale claims and
//! removing stale `tmp/` files.
//!
//! The rename is the whole claim protocol: it is atomic, so of several deliverers only one
//! wins and the others skip the file. This module does not read file contents (that is
//! `envelope`) nor decide what becomes of a delivered message (that is `deliver`).

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::id::{REASON_SUFFIX, is_queue_file_name, queue_id_of};
use super::{Queue, QueueError, State};

/// One queue file found by [`list_messages`] or [`find_message`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Message {
    /// The file name, `QUEUEID.HOSTNAME`.
    pub(crate) name: OsString,
    /// The queue ID: the file name up to its first dot.
    pub(crate) queue_id: String,
    /// Which directory it is in.
    pub(crate) state: State,
    /// Its full path.
    pub(crate) path: PathBuf,
}

/// The queue files in the given states, sorted by name (so by arrival) and then state.
/// A missing state directory holds no messages; a missing `queue_dir` is an error.
pub(crate) fn list_messages(
    queue_dir: &Path,
    states: &[State],
) -> Result<Vec<Message>, QueueError> {
    fs::metadata(queue_dir).map_err(|source| QueueError::Dir {
        path: queue_dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for &state in states {
        let dir = queue_dir.join(state.dir_name());
        let entries = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            other => other.map_err(|source| QueueError::Dir {
                path: dir.clone(),
                source,
            })?,
        };
        for entry in entries {
            let entry = entry.map_err(|source| QueueError::Dir {
                path: dir.clone(),
                source,
            })?;
            let name = entry.file_name();
            if !is_queue_file_name(&name) {
                continue;
            }
            out.push(Message {
                queue_id: queue_id_of(&name),
                path: entry.path(),
                name,
                state,
            });
        }
    }
    out.sort_by(|a, b| (&a.name, a.state).cmp(&(&b.name, b.state)));
    Ok(out)
}

/// The message whose queue ID or file name is `id`, looked for in `new/`, `cur/` and
/// `failed/`; `None` when there is none. An `id` holding `/` or starting with `.` matches
/// nothing.
pub(crate) fn find_message(queue_dir: &Path, id: &str) -> Result<Option<Message>, QueueError> {
    if id.is_empty() || id.starts_with('.') || id.contains('/') {
        return Ok(None);
    }
    let all = list_messages(queue_dir, &[State::New, State::Cur, State::Failed])?;
    Ok(all
        .into_iter()
        .find(|m| m.queue_id == id || m.name.as_bytes() == id.as_bytes()))
}

/// The reason recorded beside a message in `failed/`, if any.
pub(crate) fn failure_reason(message: &Message) -> Option<String> {
    if message.state != State::Failed {
        return None;
    }
    let mut path = message.path.clone().into_os_string();
    path.push(REASON_SUFFIX);
    fs::read(path)
        .ok()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Renames `from` to `to`; `Ok(false)` when `from` no longer exists.
pub(crate) fn rename(from: &Path, to: &Path) -> Result<bool, QueueError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(QueueError::Move {
            from: from.to_path_buf(),
            to: Some(to.to_path_buf()),
            source,
        }),
    }
}

/// Removes `path` (a delivered message).
pub(crate) fn remove(path: &Path) -> Result<(), QueueError> {
    fs::remove_file(path).map_err(|source| QueueError::Move {
        from: path.to_path_buf(),
        to: None,
        source,
    })
}

/// A message held in `cur/` by the deliverer that claimed it.
pub(crate) struct Claim {
    pub(crate) name: OsString,
    pub(crate) queue_id: String,
    /// `cur/NAME`.
    pub(crate) path: PathBuf,
    /// The open queue file, for refreshing its mtime while a command runs.
    pub(crate) file: File,
}

/// Whether the next attempt time (mtime) of a file in `new/` has come.
fn is_due(modified: io::Result<SystemTime>, now: SystemTime) -> bool {
    modified.map_or(true, |m| m <= now)
}

impl Queue {
    /// Claims `message` by renaming it into `cur/`, after checking (on the open file, so a
    /// deferral by another deliverer since the directory was read is seen) that it is due,
    /// and marking it fresh so no one takes it back as stale. `None`: not due, or another
    /// deliverer was faster.
    pub(crate) fn claim(
        &self,
        message: &Message,
        ignore_due: bool,
        now: SystemTime,
    ) -> Result<Option<Claim>, QueueError> {
        // Not through a symbolic link: only qmqpd's own files are delivered.
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&message.path);
        let file = match opened {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                log::warn!("cannot open {}: {e}", message.path.display());
                return Ok(None);
            }
        };
        let meta = match file.metadata() {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Ok(None),
            Err(e) => {
                log::warn!("cannot stat {}: {e}", message.path.display());
                return Ok(None);
            }
        };
        if !ignore_due && !is_due(meta.modified(), now) {
            return Ok(None);
        }
        if let Err(e) = file.set_modified(now) {
            log::debug!("cannot touch {}: {e}", message.path.display());
        }
        let path = self.path(State::Cur, &message.name);
        if !rename(&message.path, &path)? {
            return Ok(None);
        }
        Ok(Some(Claim {
            name: message.name.clone(),
            queue_id: message.queue_id.clone(),
            path,
            file,
        }))
    }

    /// Takes claims in `cur/` untouched for `stale` back into `new/` (their deliverer died);
    /// returns how many. A `stale` of zero takes back every claim.
    pub(crate) fn take_back_stale(
        &self,
        stale: Duration,
        now: SystemTime,
    ) -> Result<usize, QueueError> {
        let mut taken = 0;
        for message in list_messages(self.dir(), &[State::Cur])? {
            let Ok(meta) = fs::symlink_metadata(&message.path) else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .map_or(stale.is_zero(), |age| age >= stale);
            if !old || !meta.is_file() {
                continue;
            }
            let to = self.path(State::New, &message.name);
            if rename(&message.path, &to)? {
                log::warn!(
                    "{}: stale claim in cur/ (untouched for {}s or more): back to new/",
                    message.queue_id,
                    stale.as_secs()
                );
                taken += 1;
            }
        }
        Ok(taken)
    }

    /// Removes files in `tmp/` last modified more than `max_age` before `now`; returns how
    /// many were removed. A missing `tmp/` is not an error.
    pub fn remove_stale_tmp(&self, max_age: Duration, now: SystemTime) -> io::Result<usize> {
        let entries = match fs::read_dir(self.dir().join(super::TMP)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            other => other?,
        };
        let mut removed = 0;
        for entry in entries {
            let entry = entry?;
            let Ok(meta) = entry.metadata() else { continue };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .is_some_and(|age| age > max_age);
            if old && meta.is_file() && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::STALE_TMP_AGE;

    #[test]
    fn list_messages_sorts_and_skips_reason_and_hidden_files() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["new", "cur", "failed"] {
            fs::create_dir(dir.path().join(sub)).unwrap();
        }
        fs::write(dir.path().join("new/B.h"), b"").unwrap();
        fs::write(dir.path().join("cur/A.h"), b"").unwrap();
        fs::write(dir.path().join("failed/C.h"), b"").unwrap();
        fs::write(dir.path().join("failed/C.h.reason"), b"why").unwrap();
        fs::write(dir.path().join("new/.hidden"), b"").unwrap();
        let all = list_messages(dir.path(), &[State::New, State::Cur, State::Failed]).unwrap();
        let names: Vec<_> = all.iter().map(|m| (m.queue_id.as_str(), m.state)).collect();
        assert_eq!(
            names,
            [("A", State::Cur), ("B", State::New), ("C", State::Failed)]
        );
        let c = find_message(dir.path(), "C").unwrap().unwrap();
        assert_eq!(failure_reason(&c).as_deref(), Some("why"));
        assert!(find_message(dir.path(), "C.h").unwrap().is_some());
        assert!(find_message(dir.path(), "../new/B.h").unwrap().is_none());
        assert!(find_message(dir.path(), "D").unwrap().is_none());
    }

    #[test]
    fn list_messages_rejects_missing_queue_but_not_missing_state_dirs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(list_messages(dir.path(), &[State::New]).unwrap().is_empty());
        assert!(list_messages(&dir.path().join("nope"), &[State::New]).is_err());
    }

    #[test]
    fn take_back_stale_moves_only_old_claims() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        q.create_dirs().unwrap();
        fs::write(dir.path().join("cur/OLD.h"), b"x").unwrap();
        fs::write(dir.path().join("cur/FRESH.h"), b"x").unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        File::open(dir.path().join("cur/OLD.h"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        let hour = Duration::from_secs(3600);
        assert_eq!(q.take_back_stale(hour, SystemTime::now()).unwrap(), 1);
        assert!(dir.path().join("new/OLD.h").exists());
        assert!(dir.path().join("cur/FRESH.h").exists());
        assert_eq!(
            q.take_back_stale(Duration::ZERO, SystemTime::now())
                .unwrap(),
            1
        );
        assert!(dir.path().join("new/FRESH.h").exists());
    }

    #[test]
    fn claim_skips_messages_not_yet_due() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        q.create_dirs().unwrap();
        let path = dir.path().join("new/A.h");
        fs::write(&path, b"x").unwrap();
        let now = SystemTime::now();
        File::open(&path)
            .unwrap()
            .set_modified(now + Duration::from_secs(600))
            .unwrap();
        let message = list_messages(dir.path(), &[State::New]).unwrap().remove(0);
        assert!(q.claim(&message, false, now).unwrap().is_none());
        let claim = q.claim(&message, true, now).unwrap().unwrap();
        assert_eq!(claim.path, dir.path().join("cur/A.h"));
        assert!(q.claim(&message, true, now).unwrap().is_none(), "gone");
    }

    #[test]
    fn remove_stale_tmp_removes_only_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::new(dir.path(), "h");
        q.create_dirs().unwrap();
        fs::write(dir.path().join("tmp/old"), b"x").unwrap();
        let now = SystemTime::now();
        assert_eq!(q.remove_stale_tmp(STALE_TMP_AGE, now).unwrap(), 0);
        let later = now + STALE_TMP_AGE + Duration::from_secs(60);
        assert_eq!(q.remove_stale_tmp(STALE_TMP_AGE, later).unwrap(), 1);
    }
}
