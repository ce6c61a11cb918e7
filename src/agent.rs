//! HAProxy's agent check (`agent-check` on a server line): a listener answers, on its own
//! port (`qmqpd_agent_check_listen`), whether this host should get new mail.
//!
//! Owns the decision ([`decide`], pure), the look at the queue ([`probe`]: may qmqpd's user
//! write `tmp/` and `new/`, how much space and how many inodes the queue file system has
//! left) and the small accept loop that writes one answer line per connection. The answers
//! are HAProxy's words: `up ready` (healthy, and leave any drain state), `drain` (free space
//! or inodes below `qmqpd_agent_check_minfree` / `qmqpd_agent_check_mininodes`, or the
//! listener is stopping: finish what runs, send no new connections), `down` (the queue
//! cannot be written). Does not serve QMQP.

use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use nix::sys::statvfs::{FsFlags, statvfs};
use nix::unistd::{AccessFlags, access};

use crate::program::Stop;

/// How long the agent waits for HAProxy to take its answer.
const WRITE_LIMIT: Duration = Duration::from_secs(2);

/// What the agent tells the balancer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Up,
    Drain,
    Down,
}

impl State {
    /// The line HAProxy reads.
    pub fn answer(self) -> &'static [u8] {
        match self {
            State::Up => b"up ready\n",
            State::Drain => b"drain\n",
            State::Down => b"down\n",
        }
    }
}

/// The queue as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueState {
    /// Why new queue files cannot be made, if they cannot.
    pub unwritable: Option<String>,
    /// Bytes available to an unprivileged user on the queue file system.
    pub free_bytes: u64,
    /// Inodes available to an unprivileged user.
    pub free_inodes: u64,
}

/// The thresholds below which the host asks to be drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    pub min_free_bytes: u64,
    pub min_free_inodes: u64,
}

/// Decides the answer, with the reason for the log.
pub(crate) fn decide(queue: &QueueState, limits: Thresholds) -> (State, String) {
    if let Some(why) = &queue.unwritable {
        return (State::Down, format!("queue not writable: {why}"));
    }
    if queue.free_bytes < limits.min_free_bytes {
        return (
            State::Drain,
            format!(
                "{} bytes free, qmqpd_agent_check_minfree is {}",
                queue.free_bytes, limits.min_free_bytes
            ),
        );
    }
    if queue.free_inodes < limits.min_free_inodes {
        return (
            State::Drain,
            format!(
                "{} inodes free, qmqpd_agent_check_mininodes is {}",
                queue.free_inodes, limits.min_free_inodes
            ),
        );
    }
    (
        State::Up,
        "queue writable, space and inodes above the thresholds".to_owned(),
    )
}

/// Looks at the queue below `dir` with this process's credentials.
pub(crate) fn probe(dir: &Path) -> QueueState {
    let mut unwritable = None;
    for sub in ["tmp", "new"] {
        // qmqpd makes a missing tmp/ or new/ with the first message: then the queue
        // directory itself must be writable.
        let sub_dir = dir.join(sub);
        let path = if sub_dir.exists() {
            sub_dir
        } else {
            dir.to_path_buf()
        };
        if let Err(e) = access(&path, AccessFlags::W_OK | AccessFlags::X_OK) {
            unwritable = Some(format!("{}: {e}", path.display()));
            break;
        }
    }
    // fsblkcnt_t and friends are 32 bits on some targets.
    #[allow(clippy::useless_conversion)]
    let (free_bytes, free_inodes) = match statvfs(dir) {
        Ok(fs) => {
            if unwritable.is_none() && fs.flags().contains(FsFlags::ST_RDONLY) {
                unwritable = Some(format!("{}: read-only file system", dir.display()));
            }
            let blocks = u64::from(fs.blocks_available());
            let size = u64::from(fs.fragment_size());
            (blocks.saturating_mul(size), u64::from(fs.files_available()))
        }
        Err(e) => {
            unwritable.get_or_insert_with(|| format!("{}: {e}", dir.display()));
            (0, 0)
        }
    };
    QueueState {
        unwritable,
        free_bytes,
        free_inodes,
    }
}

/// The answer while the listener stops (SIGTERM/SIGINT): `drain` takes the host out of
/// rotation for new connections while the running ones finish; the next qmqpd's `up ready`
/// brings it back.
fn stopping() -> (State, String) {
    (
        State::Drain,
        "stopping: no new connections, running transactions finish".to_owned(),
    )
}

/// Answers agent checks on `listener` from a thread of its own, for as long as the process
/// runs. Each answer looks at the queue afresh, and is `drain` once `stop` is set; changes
/// of state are logged.
pub fn spawn(
    listener: TcpListener,
    dir: PathBuf,
    limits: Thresholds,
    stop: Arc<Stop>,
) -> io::Result<()> {
    std::thread::Builder::new()
        .name("agent-check".into())
        .spawn(move || {
            let mut last = None;
            for stream in listener.incoming() {
                let mut stream = match stream {
                    Ok(stream) => stream,
                    Err(e) => {
                        log::warn!("agent check: accept: {e}");
                        // A persistent error (out of descriptors) must not spin.
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                let (state, why) = if stop.is_set() {
                    stopping()
                } else {
                    decide(&probe(&dir), limits)
                };
                if last != Some(state) {
                    log::info!(
                        "agent check: {}: {why}",
                        String::from_utf8_lossy(state.answer()).trim_end()
                    );
                    last = Some(state);
                }
                let written = stream
                    .set_write_timeout(Some(WRITE_LIMIT))
                    .and_then(|()| stream.write_all(state.answer()));
                if let Err(e) = written {
                    log::debug!("agent check: cannot answer: {e}");
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const LIMITS: Thresholds = Thresholds {
        min_free_bytes: 1000,
        min_free_inodes: 10,
    };

    fn queue(unwritable: Option<&str>, free_bytes: u64, free_inodes: u64) -> QueueState {
        QueueState {
            unwritable: unwritable.map(str::to_owned),
            free_bytes,
            free_inodes,
        }
    }

    #[test]
    fn decide_up_only_above_both_thresholds() {
        assert_eq!(decide(&queue(None, 1000, 10), LIMITS).0, State::Up);
        assert_eq!(decide(&queue(None, 999, 10), LIMITS).0, State::Drain);
        let (state, why) = decide(&queue(None, 5000, 9), LIMITS);
        assert_eq!(state, State::Drain);
        assert!(why.contains("9 inodes free"), "{why}");
    }

    #[test]
    fn decide_down_when_unwritable_whatever_the_space() {
        let (state, why) = decide(&queue(Some("/q/new: EACCES"), u64::MAX, u64::MAX), LIMITS);
        assert_eq!(state, State::Down);
        assert!(why.contains("/q/new"), "{why}");
        assert_eq!(decide(&queue(Some("x"), 0, 0), LIMITS).0, State::Down);
    }

    #[test]
    fn decide_zero_thresholds_never_drain() {
        let none = Thresholds {
            min_free_bytes: 0,
            min_free_inodes: 0,
        };
        assert_eq!(decide(&queue(None, 0, 0), none).0, State::Up);
    }

    #[test]
    fn probe_sees_a_missing_queue_and_a_real_one() {
        let dir = tempfile::tempdir().unwrap();
        let missing = probe(&dir.path().join("nothing"));
        assert!(missing.unwritable.is_some());
        // An empty queue directory gets its tmp/ and new/ with the first message.
        assert_eq!(probe(dir.path()).unwritable, None);
        for sub in ["tmp", "new"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let real = probe(dir.path());
        assert_eq!(real.unwritable, None);
        assert!(real.free_bytes > 0 && real.free_inodes > 0, "{real:?}");
    }

    #[test]
    fn spawn_answers_each_connection_with_one_line() {
        let dir = tempfile::tempdir().unwrap();
        for sub in ["tmp", "new"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let huge = Thresholds {
            min_free_bytes: u64::MAX,
            min_free_inodes: 0,
        };
        spawn(
            listener,
            dir.path().to_path_buf(),
            huge,
            Stop::new().unwrap(),
        )
        .unwrap();
        let mut answer = String::new();
        std::net::TcpStream::connect(addr)
            .unwrap()
            .read_to_string(&mut answer)
            .unwrap();
        assert_eq!(answer, "drain\n");
    }

    #[test]
    fn spawn_answers_drain_once_stopping() {
        let dir = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Stop::new().unwrap();
        spawn(
            listener,
            dir.path().to_path_buf(),
            LIMITS,
            Arc::clone(&stop),
        )
        .unwrap();
        let answer = || {
            let mut answer = String::new();
            std::net::TcpStream::connect(addr)
                .unwrap()
                .read_to_string(&mut answer)
                .unwrap();
            answer
        };
        assert_eq!(answer(), "up ready\n");
        stop.set(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(answer(), "drain\n");
    }
}
