//! The maildir-style queue: `tmp/`, `new/`, `cur/` under `queue_directory`.
//!
//! Owns queue IDs, the queue file's name and attributes block, and the durable commit:
//! write into `tmp/`, `fdatasync`, rename into `new/`, `fsync` of `new/` — only then may the
//! client hear `K`. A queue file that is dropped before its commit removes itself. Also reads
//! queue files back for consumers and tests. It does not know the protocol.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::netstring;

/// The first line of every queue file's attributes block.
pub const FORMAT_LINE: &str = "qmqpd-queue 1";
/// Stray `tmp/` files older than this are removed (maildir's rule).
pub const STALE_TMP_AGE: Duration = Duration::from_secs(36 * 3600);

/// Digits of the queue ID, in ascending byte order so IDs sort by time.
const ID_DIGITS: &[u8; 32] = b"0123456789ABCDEFGHIJKLMNOPQRSTUV";

static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A new queue ID: arrival time in microseconds (11 digits), process ID (5 digits) and a
/// per-process counter (2 digits), base 32. Unique on this host; sorts by arrival time.
pub fn new_queue_id(now: SystemTime) -> String {
    let micros = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let counter = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut id = String::with_capacity(18);
    push_base32(&mut id, micros, 11);
    push_base32(&mut id, u64::from(std::process::id()), 5);
    push_base32(&mut id, u64::from(counter), 2);
    id
}

/// Appends the low `width` base-32 digits of `value`, most significant first.
fn push_base32(out: &mut String, value: u64, width: u32) {
    for i in (0..width).rev() {
        let digit = (value >> (5 * i)) & 31;
        out.push(char::from(ID_DIGITS[digit as usize]));
    }
}

/// Makes a host name safe for a maildir file name, as maildir asks (`/` and `:` escaped).
fn file_name_host(host: &str) -> String {
    let mut out = String::with_capacity(host.len());
    for c in host.chars() {
        match c {
            '/' => out.push_str("\\057"),
            ':' => out.push_str("\\072"),
            c if c.is_ascii_graphic() => out.push(c),
            _ => out.push('_'),
        }
    }
    out
}

/// The attributes block at the start of a queue file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    /// `name=value` pairs in file order, `queue_id` first.
    pub pairs: Vec<(String, String)>,
}

impl Attributes {
    /// Adds one attribute; newlines and other control characters in the value are escaped so
    /// a value can never add a line of its own.
    pub fn push(&mut self, name: &str, value: &str) {
        self.pairs
            .push((name.to_owned(), crate::logging::sanitize(value.as_bytes())));
    }

    /// The value of an attribute.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The block's payload: the format line, then one `name=value` line each.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{FORMAT_LINE}\n");
        for (name, value) in &self.pairs {
            out.push_str(name);
            out.push('=');
            out.push_str(value);
            out.push('\n');
        }
        out.into_bytes()
    }

    /// Parses a block's payload.
    pub fn decode(payload: &[u8]) -> Option<Attributes> {
        let text = std::str::from_utf8(payload).ok()?;
        let mut lines = text.lines();
        if lines.next()? != FORMAT_LINE {
            return None;
        }
        let mut pairs = Vec::new();
        for line in lines {
            let (name, value) = line.split_once('=')?;
            pairs.push((name.to_owned(), value.to_owned()));
        }
        Some(Attributes { pairs })
    }
}

/// A queue directory.
#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
    host: String,
    new_sync: Arc<DirSync>,
    /// Mode of new queue files, decided on first use (see `file_mode`).
    file_mode: std::sync::OnceLock<u32>,
}

impl Queue {
    /// A queue at `dir`; touches nothing until the first file is created (so start-up costs
    /// no system calls), then creates `tmp/`, `new/` and `cur/` (mode 0750) when missing.
    pub fn new(dir: &Path, hostname: &str) -> Queue {
        Queue {
            dir: dir.to_path_buf(),
            host: file_name_host(hostname),
            new_sync: Arc::new(DirSync::new(dir.join("new"))),
            file_mode: std::sync::OnceLock::new(),
        }
    }

    /// The queue directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates `tmp/`, `new/` and `cur/` when missing.
    pub fn create_dirs(&self) -> io::Result<()> {
        let mut builder = DirBuilder::new();
        builder.recursive(true).mode(0o750);
        for sub in ["tmp", "new", "cur"] {
            let path = self.dir.join(sub);
            builder.create(&path).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
            })?;
        }
        Ok(())
    }

    /// Opens a new queue file in `tmp/` (mode 0600, never an existing file).
    pub fn create(&self, queue_id: &str) -> io::Result<QueueFile> {
        let name = format!("{queue_id}.{}", self.host);
        let tmp = self.dir.join("tmp").join(&name);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(self.file_mode())
                .open(&tmp)
        };
        let file = match open() {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.create_dirs()?;
                open()
            }
            other => other,
        }
        .map_err(|e| io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display())))?;
        Ok(QueueFile {
            wtr: BufWriter::with_capacity(64 * 1024, file),
            new: self.dir.join("new").join(&name),
            new_sync: Arc::clone(&self.new_sync),
            tmp,
            committed: false,
        })
    }

    /// 0600, or 0640 when `tmp/` has the set-group-ID bit: its files then belong to the
    /// directory's group (a consumer's), which may read them. Never world-readable.
    fn file_mode(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        let setgid = |m: u32| if m & 0o2000 != 0 { 0o640 } else { 0o600 };
        match fs::metadata(self.dir.join("tmp")) {
            Ok(meta) => *self
                .file_mode
                .get_or_init(|| setgid(meta.permissions().mode())),
            Err(_) => 0o600,
        }
    }

    /// Removes files in `tmp/` last modified more than `max_age` before `now`; returns how
    /// many were removed. A missing `tmp/` is not an error.
    pub fn remove_stale_tmp(&self, max_age: Duration, now: SystemTime) -> io::Result<usize> {
        let entries = match fs::read_dir(self.dir.join("tmp")) {
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

/// A queue file being written in `tmp/`. Dropping it without `commit` removes it.
pub struct QueueFile {
    wtr: BufWriter<File>,
    tmp: PathBuf,
    new: PathBuf,
    new_sync: Arc<DirSync>,
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
    /// Makes the file durable in `new/`: flush, fdatasync, rename, fsync of `new/`.
    pub fn commit(mut self) -> io::Result<()> {
        self.wtr.flush()?;
        self.wtr.get_ref().sync_data()?;
        fs::rename(&self.tmp, &self.new)?;
        self.committed = true;
        self.new_sync.sync()
    }

    /// The file's path in `tmp/`.
    pub fn tmp_path(&self) -> &Path {
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
struct DirSync {
    path: PathBuf,
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Callers so far, numbered from 1.
    requested: u64,
    /// Every caller up to this number is covered by a completed fsync.
    synced: u64,
    running: bool,
    /// The directory, opened once.
    dir: Option<File>,
}

impl DirSync {
    fn new(path: PathBuf) -> DirSync {
        DirSync {
            path,
            state: Mutex::new(SyncState::default()),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SyncState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once an fsync of the directory that started after this call has succeeded.
    fn sync(&self) -> io::Result<()> {
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

/// A queue file's envelope, read without holding its message in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub attributes: Attributes,
    /// Length of the stored message (our Received: header included).
    pub message_len: u64,
    /// Where the message netstring's payload starts in the file.
    pub message_offset: u64,
    pub sender: Vec<u8>,
    pub recipients: Vec<Vec<u8>>,
}

/// Reads a queue file's attributes and envelope, skipping over the message.
pub fn read_envelope(path: &Path) -> io::Result<Envelope> {
    let mut rdr = EnvelopeReader {
        rdr: BufReader::new(File::open(path)?),
        path,
        offset: 0,
    };
    let (_, attrs) = rdr.field(true)?;
    let attributes = Attributes::decode(&attrs).ok_or_else(|| rdr.bad("bad attributes block"))?;
    let (message_offset, _) = rdr.field(false)?;
    let message_len = rdr.offset - message_offset - 1;
    let (_, sender) = rdr.field(true)?;
    let mut recipients = Vec::new();
    while !rdr.rdr.fill_buf()?.is_empty() {
        recipients.push(rdr.field(true)?.1);
    }
    Ok(Envelope {
        attributes,
        message_len,
        message_offset,
        sender,
        recipients,
    })
}

/// Reads the netstrings of a queue file, keeping count of the offset.
struct EnvelopeReader<'a> {
    rdr: BufReader<File>,
    path: &'a Path,
    offset: u64,
}

impl EnvelopeReader<'_> {
    /// The longest attributes block, sender or recipient this reader keeps.
    const FIELD_MAX: u64 = 1 << 20;

    fn bad(&self, what: &str) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", self.path.display()),
        )
    }

    /// Reads one netstring; returns where its payload starts and (when `keep`) the payload.
    fn field(&mut self, keep: bool) -> io::Result<(u64, Vec<u8>)> {
        let len = netstring::read_len(&mut self.rdr, None).map_err(|e| self.bad(&e.to_string()))?;
        let start = self.offset + netstring::len_prefix_size(len);
        let mut buf = Vec::new();
        let read = if keep {
            if len > Self::FIELD_MAX {
                return Err(self.bad("field too long"));
            }
            netstring::read_exact_into(&mut self.rdr, len as usize, &mut buf)
        } else {
            netstring::skip(&mut self.rdr, len)
        };
        read.and_then(|()| netstring::read_comma(&mut self.rdr))
            .map_err(|e| self.bad(&e.to_string()))?;
        self.offset = start + len + 1;
        Ok((start, buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_sort_by_time_and_are_unique() {
        let t0 = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let a = new_queue_id(t0);
        let b = new_queue_id(t0);
        let c = new_queue_id(t0 + Duration::from_micros(1));
        let d = new_queue_id(t0 + Duration::from_secs(1));
        assert_eq!(a.len(), 18);
        assert_ne!(a, b);
        assert!(a < c && c < d && b < c, "{a} {b} {c} {d}");
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn file_name_host_escapes_maildir_characters() {
        assert_eq!(file_name_host("a/b:c d"), "a\\057b\\072c_d");
    }

    #[test]
    fn attributes_escape_newlines_and_round_trip() {
        let mut a = Attributes::default();
        a.push("queue_id", "ABC");
        a.push("client_name", "evil\nx=y");
        let enc = a.encode();
        assert_eq!(
            enc,
            b"qmqpd-queue 1\nqueue_id=ABC\nclient_name=evil\\nx=y\n"
        );
        assert_eq!(
            Attributes::decode(&enc).unwrap().get("client_name"),
            Some("evil\\nx=y")
        );
    }

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

    #[test]
    fn queue_files_are_group_readable_only_in_a_setgid_queue() {
        use std::os::unix::fs::PermissionsExt;
        let mode_of = |setgid: bool| {
            let dir = tempfile::tempdir().unwrap();
            let q = Queue::new(dir.path(), "h");
            q.create_dirs().unwrap();
            if setgid {
                fs::set_permissions(dir.path().join("tmp"), fs::Permissions::from_mode(0o2750))
                    .unwrap();
            }
            let f = q.create("ID").unwrap();
            fs::metadata(f.tmp_path()).unwrap().permissions().mode() & 0o7777
        };
        assert_eq!(mode_of(false), 0o600);
        assert_eq!(mode_of(true), 0o640);
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
