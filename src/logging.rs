//! The `log` backend: where qmqpd's log lines go and what they look like.
//!
//! Owns the choice of destination (`maillog_file`, else the local syslog socket, else stderr
//! when stderr is known not to be the client connection, else nowhere), the Postfix-style
//! line (`warning: `/`error: ` prefixes, control characters escaped, 2000-byte cap), the
//! per-thread verbosity boost for `debug_peer_list` clients, and the panic hook. It never
//! writes to stdout and never talks to the network: syslog goes over a local UNIX socket only.
//! It does not decide *what* is logged; the Postfix wording lives with the callers.

use std::borrow::Cow;
use std::cell::Cell;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use anyhow::{Context, anyhow};
use log::{Level, LevelFilter, Log, Metadata, Record};
use syslog::{Facility, Formatter3164, LoggerBackend};

/// Longest logged message in bytes, after escaping (Postfix's `MSG_SYSLOG_RECLEN`).
pub const LINE_LIMIT: usize = 2000;

/// Where the local syslog daemon listens, tried in order (the `syslog` crate's list).
const SYSLOG_SOCKETS: [&str; 3] = ["/dev/log", "/var/run/syslog", "/var/run/log"];

/// How and where to log; built by the program from its configuration and command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSetup {
    /// The program's name in the tag: "qmqpd" or "qmqp-queue".
    pub program: &'static str,
    /// `syslog_facility`, e.g. "mail" (already validated).
    pub syslog_facility: String,
    /// `syslog_name`: the tag is "{syslog_name}/{program}", or the program alone when empty.
    pub syslog_name: String,
    /// `maillog_file`: when non-empty, append lines to this file instead of syslog.
    pub maillog_file: String,
    /// Base level: Info, raised by -v (Debug, Trace).
    pub level: LevelFilter,
    /// True only when fd 2 is known NOT to be the client connection.
    pub stderr_ok: bool,
}

impl Default for LogSetup {
    /// Postfix's defaults: facility mail, tag "qmqpd", syslog, level Info, stderr not trusted.
    fn default() -> Self {
        LogSetup {
            program: "qmqpd",
            syslog_facility: "mail".to_string(),
            syslog_name: String::new(),
            maillog_file: String::new(),
            level: LevelFilter::Info,
            stderr_ok: false,
        }
    }
}

type SyslogWriter = syslog::Logger<LoggerBackend, Formatter3164>;

/// Where the lines of one `Backend` go.
enum Sink {
    /// The local syslog daemon over a UNIX socket; the mutex serialises writers.
    Syslog(Mutex<SyslogWriter>),
    /// `maillog_file`, opened for append; each line is one `write`.
    File { file: File, hostname: String },
    /// fd 2, known not to be the client connection.
    Stderr,
    /// Nowhere safe to write: lines are dropped.
    Discard,
}

/// The `log::Log` implementation: one destination, a tag, a pid and a base level.
pub(crate) struct Backend {
    sink: Sink,
    tag: String,
    pid: u32,
    base: LevelFilter,
}

thread_local! {
    /// Extra verbosity steps for log calls made on this thread (`debug_peer_level`).
    static THREAD_BOOST: Cell<u32> = const { Cell::new(0) };
    /// Set while this thread is inside `Backend::log`, so that a panic raised there (and
    /// logged by the panic hook) cannot re-enter the backend and deadlock on its lock.
    static IN_LOG: Cell<bool> = const { Cell::new(false) };
}

/// The base level of the installed logger, for `set_thread_boost`.
static BASE_LEVEL: AtomicUsize = AtomicUsize::new(LevelFilter::Info as usize);

/// Install the global logger (once per process). Never writes to stdout; never uses the
/// network: syslog only over the local UNIX socket.
///
/// Order: `maillog_file` if set; else the local syslog socket (`/dev/log`, `/var/run/syslog`,
/// `/var/run/log`); if none answers, stderr when `stderr_ok`; else lines are dropped silently.
/// An unopenable `maillog_file`, an unknown facility or a second call is an error, and then no
/// logger has been installed.
pub fn init(setup: &LogSetup) -> anyhow::Result<()> {
    let backend = Backend::open(setup)?;
    log::set_boxed_logger(Box::new(backend))
        .map_err(|_| anyhow!("cannot install the logger: a logger is already installed"))?;
    BASE_LEVEL.store(setup.level as usize, Ordering::Relaxed);
    log::set_max_level(setup.level);
    Ok(())
}

impl Backend {
    /// Opens the destination `setup` asks for, in the order `init` documents.
    pub fn open(setup: &LogSetup) -> anyhow::Result<Backend> {
        let paths = SYSLOG_SOCKETS.map(Path::new);
        Backend::open_with(setup, &paths)
    }

    /// `open`, with the syslog socket paths to try given explicitly (tests use their own).
    fn open_with(setup: &LogSetup, syslog_paths: &[&Path]) -> anyhow::Result<Backend> {
        let facility: Facility = setup.syslog_facility.parse().map_err(|()| {
            anyhow!(
                "unknown syslog_facility \"{}\"",
                sanitize(setup.syslog_facility.as_bytes())
            )
        })?;
        let tag = tag_for(&setup.syslog_name, setup.program);
        let pid = std::process::id();
        let sink = if !setup.maillog_file.is_empty() {
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o640)
                .open(&setup.maillog_file)
                .with_context(|| {
                    format!(
                        "cannot open maillog_file \"{}\"",
                        sanitize(setup.maillog_file.as_bytes())
                    )
                })?;
            Sink::File {
                file,
                hostname: local_hostname(),
            }
        } else {
            let formatter = Formatter3164 {
                facility,
                hostname: None,
                process: tag.clone(),
                pid,
            };
            match connect_syslog(&formatter, syslog_paths) {
                Some(writer) => Sink::Syslog(Mutex::new(writer)),
                None if setup.stderr_ok => Sink::Stderr,
                None => Sink::Discard,
            }
        };
        Ok(Backend {
            sink,
            tag,
            pid,
            base: setup.level,
        })
    }

    /// Writes one message, already prefixed and sanitised, to the destination.
    fn emit(&self, level: Level, text: &str) {
        match &self.sink {
            Sink::Syslog(writer) => send_syslog(writer, level, text),
            Sink::File { file, hostname } => {
                let stamp = crate::date::syslog_stamp(SystemTime::now());
                let line = join_line(Some((&stamp, hostname)), &self.tag, self.pid, text);
                // O_APPEND and a single write per line keep lines from concurrent
                // processes whole; a failed log write has nowhere to be reported.
                let _ = (&*file).write_all(line.as_bytes());
            }
            Sink::Stderr => {
                let line = join_line(None, &self.tag, self.pid, text);
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Sink::Discard => {}
        }
    }
}

impl Log for Backend {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= raise(self.base, THREAD_BOOST.with(Cell::get))
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) || IN_LOG.with(Cell::get) {
            return;
        }
        let _guard = InLogGuard::enter();
        let message: Cow<'_, str> = match record.args().as_str() {
            Some(fixed) => Cow::Borrowed(fixed),
            None => Cow::Owned(render_capped(record.args())),
        };
        let text = format_text(record.level(), &message);
        self.emit(record.level(), &text);
    }

    fn flush(&self) {}
}

/// Clears `IN_LOG` when `Backend::log` returns or unwinds.
struct InLogGuard;

impl InLogGuard {
    fn enter() -> InLogGuard {
        IN_LOG.with(|flag| flag.set(true));
        InLogGuard
    }
}

impl Drop for InLogGuard {
    fn drop(&mut self) {
        IN_LOG.with(|flag| flag.set(false));
    }
}

/// Collects formatted text up to `LINE_LIMIT` bytes, then stops the formatting, so a huge
/// logged value costs no more memory than the line it can appear in.
struct CappedText {
    text: String,
}

impl fmt::Write for CappedText {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = LINE_LIMIT.saturating_sub(self.text.len());
        if s.len() <= room {
            self.text.push_str(s);
            return Ok(());
        }
        let mut end = room;
        while end > 0 && !s.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(s.get(..end).unwrap_or(""));
        Err(fmt::Error)
    }
}

/// The first `LINE_LIMIT` bytes of `args` formatted (every escaped byte is at least one byte,
/// so nothing beyond that could survive the cap).
fn render_capped(args: &fmt::Arguments<'_>) -> String {
    let mut capped = CappedText {
        text: String::new(),
    };
    // An Err here only means the cap was reached (or a Display impl failed): keep what we have.
    let _ = fmt::write(&mut capped, *args);
    capped.text
}

/// Tries each syslog socket in turn; the first that accepts a connection wins.
fn connect_syslog(formatter: &Formatter3164, paths: &[&Path]) -> Option<SyslogWriter> {
    paths
        .iter()
        .find_map(|path| syslog::unix_custom(formatter.clone(), path).ok())
}

/// Sends one message to syslog; if the daemon went away (restarted), reconnects once and
/// resends. Failures are dropped: there is nowhere left to report them.
fn send_syslog(writer: &Mutex<SyslogWriter>, level: Level, text: &str) {
    let mut writer = writer.lock().unwrap_or_else(PoisonError::into_inner);
    if write_severity(&mut writer, level, text).is_ok() {
        return;
    }
    let paths = SYSLOG_SOCKETS.map(Path::new);
    if let Some(fresh) = connect_syslog(&writer.formatter, &paths) {
        *writer = fresh;
        let _ = write_severity(&mut writer, level, text);
    }
}

/// Writes `text` at the syslog severity matching `level`.
fn write_severity(writer: &mut SyslogWriter, level: Level, text: &str) -> syslog::Result<()> {
    match level {
        Level::Error => writer.err(text),
        Level::Warn => writer.warning(text),
        Level::Info => writer.info(text),
        Level::Debug | Level::Trace => writer.debug(text),
    }
}

/// The syslog tag: "{syslog_name}/{program}", or the program alone when `syslog_name` is
/// empty (Postfix's "postfix/qmqpd").
fn tag_for(syslog_name: &str, program: &str) -> String {
    if syslog_name.is_empty() {
        program.to_string()
    } else {
        format!("{}/{program}", sanitize(syslog_name.as_bytes()))
    }
}

/// This host's name as the kernel reports it, for `maillog_file` lines (no DNS).
fn local_hostname() -> String {
    match nix::unistd::gethostname() {
        Ok(name) if !name.is_empty() => sanitize(name.as_bytes()),
        _ => "localhost".to_string(),
    }
}

/// `base` raised by `steps` levels, saturating at Trace.
fn raise(base: LevelFilter, steps: u32) -> LevelFilter {
    if steps == 0 {
        return base;
    }
    let index = (base as usize).saturating_add(usize::try_from(steps).unwrap_or(usize::MAX));
    LevelFilter::iter().nth(index).unwrap_or(LevelFilter::Trace)
}

/// A panic hook that logs the panic (message + location) through `log` at error level instead
/// of printing to stderr.
/// The process's main thread, where Rust's start-up did not run to name it "main"
/// (qmqpd's own entry point).
static MAIN_THREAD: std::sync::OnceLock<std::thread::ThreadId> = std::sync::OnceLock::new();

/// Records the calling thread as the main one, for the panic hook's `panic in thread main`.
pub fn note_main_thread() {
    let _ = MAIN_THREAD.set(std::thread::current().id());
}

/// The calling thread's name for a log line: its own, "main", or "unnamed".
fn current_thread_name() -> String {
    let thread = std::thread::current();
    match thread.name() {
        Some(name) => name.to_string(),
        None if MAIN_THREAD.get() == Some(&thread.id()) => "main".to_string(),
        None => "unnamed".to_string(),
    }
}

pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(non-text panic payload)");
        let name = current_thread_name();
        match info.location() {
            Some(at) => log::error!(
                "panic in thread {name} at {}:{}:{}: {message}",
                at.file(),
                at.line(),
                at.column()
            ),
            None => log::error!("panic in thread {name}: {message}"),
        }
    }));
}

/// Raise verbosity for the current thread only (debug_peer_level steps for a debug peer):
/// messages up to base+steps levels are emitted for log calls made on this thread.
///
/// `set_thread_boost(0)` ends the boost. The global maximum level is raised as needed and
/// never lowered, since other threads may still be boosted.
pub(crate) fn set_thread_boost(steps: u32) {
    THREAD_BOOST.with(|boost| boost.set(steps));
    if steps == 0 {
        return;
    }
    let base = LevelFilter::iter()
        .nth(BASE_LEVEL.load(Ordering::Relaxed))
        .unwrap_or(LevelFilter::Info);
    let wanted = raise(base, steps);
    if wanted > log::max_level() {
        log::set_max_level(wanted);
    }
}

/// True when fd 2 is the same open file (st_dev and st_ino via fstat) as fd 0 or fd 1 or the
/// given extra descriptor (e.g. a systemd-passed socket), or when fd 2 is closed/unusable.
///
/// A terminal shared by fds 1 and 2 counts as the connection too: the caller cannot tell a
/// terminal from a client here, and being wrong the other way would corrupt the reply.
pub fn stderr_is_connection(extra: Option<BorrowedFd<'_>>) -> bool {
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let mut others = vec![stdin.as_fd(), stdout.as_fd()];
    others.extend(extra);
    match nix::sys::stat::fstat(stderr.as_fd()) {
        Ok(_) => others
            .into_iter()
            .any(|fd| same_open_file(stderr.as_fd(), fd)),
        Err(_) => true,
    }
}

/// True when both descriptors refer to the same file (device and inode); false when either
/// cannot be examined.
fn same_open_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    match (nix::sys::stat::fstat(a), nix::sys::stat::fstat(b)) {
        (Ok(a), Ok(b)) => a.st_dev == b.st_dev && a.st_ino == b.st_ino,
        _ => false,
    }
}

/// Escape control characters (and bytes that are not valid UTF-8) for logging:
/// "\\n", "\\r", "\\t", others as "\\xNN"; backslash stays as is.
///
/// Other control characters are C0, DEL and C1 (escaped byte by byte in their UTF-8 form),
/// plus U+2028/U+2029, which some viewers show as line breaks. The result is capped at
/// `LINE_LIMIT` bytes, never cutting a character or an escape in two.
pub(crate) fn sanitize(s: &[u8]) -> String {
    // Most lines are printable ASCII and short: copied as they are.
    if s.len() <= LINE_LIMIT && s.iter().all(|b| (b' '..=b'~').contains(b)) {
        return String::from_utf8_lossy(s).into_owned();
    }
    let mut out = String::with_capacity(s.len().min(LINE_LIMIT));
    for chunk in s.utf8_chunks() {
        for c in chunk.valid().chars() {
            if !push_char(&mut out, c) {
                return out;
            }
        }
        for &byte in chunk.invalid() {
            if !push_piece(&mut out, &hex_escape(&[byte])) {
                return out;
            }
        }
    }
    out
}

/// Appends `c`, escaped if needed; false when it does not fit under the cap.
fn push_char(out: &mut String, c: char) -> bool {
    match c {
        '\n' => push_piece(out, "\\n"),
        '\r' => push_piece(out, "\\r"),
        '\t' => push_piece(out, "\\t"),
        c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
            let mut utf8 = [0u8; 4];
            push_piece(out, &hex_escape(c.encode_utf8(&mut utf8).as_bytes()))
        }
        c => {
            let mut utf8 = [0u8; 4];
            push_piece(out, c.encode_utf8(&mut utf8))
        }
    }
}

/// Appends `piece` whole if it fits under `LINE_LIMIT`; false otherwise.
fn push_piece(out: &mut String, piece: &str) -> bool {
    if out.len().saturating_add(piece.len()) > LINE_LIMIT {
        return false;
    }
    out.push_str(piece);
    true
}

/// "\xNN" for each byte.
fn hex_escape(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\x{b:02x}")).collect()
}

/// The text of one log message: Postfix's severity prefix ("warning: ", "error: ", none for
/// info and debug) followed by the message, sanitised and capped at `LINE_LIMIT` bytes.
pub fn format_text(level: Level, message: &str) -> String {
    let prefix = match level {
        Level::Error => "error: ",
        Level::Warn => "warning: ",
        Level::Info | Level::Debug | Level::Trace => "",
    };
    let mut text = String::with_capacity(prefix.len() + message.len().min(LINE_LIMIT));
    text.push_str(prefix);
    text.push_str(&sanitize(message.as_bytes()));
    text
}

/// One complete line for the file and stderr destinations, newline included:
/// "STAMP HOSTNAME TAG[PID]: text" when `stamp_host` is given (`maillog_file`), else
/// "TAG[PID]: text" (stderr), where text is `format_text(level, message)`.
#[cfg(test)]
pub(crate) fn format_line(
    stamp_host: Option<(&str, &str)>,
    tag: &str,
    pid: u32,
    level: Level,
    message: &str,
) -> String {
    join_line(stamp_host, tag, pid, &format_text(level, message))
}

/// `format_line` for a text already built by `format_text`.
fn join_line(stamp_host: Option<(&str, &str)>, tag: &str, pid: u32, text: &str) -> String {
    match stamp_host {
        Some((stamp, host)) => format!("{stamp} {host} {tag}[{pid}]: {text}\n"),
        None => format!("{tag}[{pid}]: {text}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixDatagram;

    fn setup_with(maillog_file: &str, stderr_ok: bool) -> LogSetup {
        LogSetup {
            maillog_file: maillog_file.to_string(),
            stderr_ok,
            ..LogSetup::default()
        }
    }

    fn log_at(backend: &Backend, level: Level, args: fmt::Arguments<'_>) {
        backend.log(&Record::builder().level(level).args(args).build());
    }

    #[test]
    fn sanitize_escapes_newline_cr_tab() {
        assert_eq!(sanitize(b"a\nb\rc\td"), "a\\nb\\rc\\td");
    }

    #[test]
    fn sanitize_escapes_nul_and_del() {
        assert_eq!(sanitize(b"a\0b\x7fc\x1b"), "a\\x00b\\x7fc\\x1b");
    }

    #[test]
    fn sanitize_escapes_invalid_utf8_bytes() {
        assert_eq!(sanitize(b"a\xffb\xc3"), "a\\xffb\\xc3");
        assert_eq!(sanitize("é".as_bytes()), "é");
    }

    #[test]
    fn sanitize_escapes_c1_and_line_separators() {
        assert_eq!(sanitize("a\u{85}b".as_bytes()), "a\\xc2\\x85b");
        assert_eq!(sanitize("a\u{2028}b".as_bytes()), "a\\xe2\\x80\\xa8b");
    }

    #[test]
    fn sanitize_keeps_backslash() {
        assert_eq!(sanitize(b"a\\nb"), "a\\nb");
    }

    #[test]
    fn sanitize_caps_at_limit() {
        let long = vec![b'x'; 5000];
        assert_eq!(sanitize(&long).len(), LINE_LIMIT);
    }

    #[test]
    fn sanitize_caps_on_char_boundary() {
        // 1999 ASCII bytes, then a 2-byte character that would end at byte 2001.
        let mut input = "x".repeat(LINE_LIMIT - 1);
        input.push('é');
        let out = sanitize(input.as_bytes());
        assert_eq!(out.len(), LINE_LIMIT - 1);
        assert!(out.chars().all(|c| c == 'x'));
    }

    #[test]
    fn sanitize_cap_never_splits_escape() {
        let mut input = vec![b'x'; LINE_LIMIT - 2];
        input.push(0);
        let out = sanitize(&input);
        assert_eq!(out.len(), LINE_LIMIT - 2);
        assert!(!out.contains('\\'));
    }

    #[test]
    fn format_text_uses_postfix_prefixes() {
        assert_eq!(format_text(Level::Warn, "w"), "warning: w");
        assert_eq!(format_text(Level::Error, "e"), "error: e");
        assert_eq!(format_text(Level::Info, "i"), "i");
        assert_eq!(format_text(Level::Debug, "d"), "d");
        assert_eq!(format_text(Level::Trace, "t"), "t");
    }

    #[test]
    fn format_line_for_file_has_stamp_host_tag_pid() {
        let line = format_line(
            Some(("Nov 28 12:40:57", "mx")),
            "qmqpd",
            42,
            Level::Warn,
            "evil\nline",
        );
        assert_eq!(line, "Nov 28 12:40:57 mx qmqpd[42]: warning: evil\\nline\n");
    }

    #[test]
    fn format_line_for_stderr_has_tag_pid() {
        let line = format_line(
            None,
            "lists/qmqpd",
            7,
            Level::Info,
            "connect from x[1.2.3.4]",
        );
        assert_eq!(line, "lists/qmqpd[7]: connect from x[1.2.3.4]\n");
    }

    #[test]
    fn format_line_caps_message_not_prefix() {
        let line = format_line(None, "qmqpd", 1, Level::Error, &"y".repeat(3000));
        assert_eq!(line.len(), "qmqpd[1]: error: ".len() + LINE_LIMIT + 1);
    }

    #[test]
    fn tag_for_uses_syslog_name() {
        assert_eq!(tag_for("", "qmqpd"), "qmqpd");
        assert_eq!(tag_for("postfix-out", "qmqpd"), "postfix-out/qmqpd");
        assert_eq!(tag_for("", "qmqp-queue"), "qmqp-queue");
    }

    #[test]
    fn render_capped_stops_at_limit() {
        let huge = "z".repeat(100_000);
        assert_eq!(render_capped(&format_args!("{huge}")).len(), LINE_LIMIT);
    }

    #[test]
    fn backend_writes_maillog_file_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maillog");
        let backend = Backend::open(&setup_with(path.to_str().unwrap(), false)).unwrap();
        log_at(
            &backend,
            Level::Info,
            format_args!("connect from a[192.0.2.1]"),
        );
        log_at(&backend, Level::Warn, format_args!("bad {}", "x\ny"));
        log_at(&backend, Level::Debug, format_args!("not shown at Info"));

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text:?}");
        let pid = std::process::id();
        assert!(lines[0].ends_with(&format!(" qmqpd[{pid}]: connect from a[192.0.2.1]")));
        assert!(lines[1].ends_with(&format!(" qmqpd[{pid}]: warning: bad x\\ny")));
        for line in &lines {
            // "Mmm dd hh:mm:ss HOST ..."
            assert_eq!(line.as_bytes()[3], b' ');
            assert_eq!(line.as_bytes()[9], b':');
            assert_eq!(line.as_bytes()[15], b' ');
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777 & !0o640, 0, "mode {mode:o}");
    }

    #[test]
    fn backend_appends_to_existing_maillog_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maillog");
        std::fs::write(&path, "old line\n").unwrap();
        let backend = Backend::open(&setup_with(path.to_str().unwrap(), false)).unwrap();
        log_at(&backend, Level::Info, format_args!("new line"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("old line\n"));
        assert!(text.ends_with("new line\n"));
    }

    #[test]
    fn open_rejects_unopenable_maillog_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("maillog");
        let err = Backend::open(&setup_with(path.to_str().unwrap(), true))
            .err()
            .unwrap();
        assert!(format!("{err:#}").starts_with("cannot open maillog_file \""));
    }

    #[test]
    fn open_rejects_unknown_facility() {
        let setup = LogSetup {
            syslog_facility: "bogus".to_string(),
            ..LogSetup::default()
        };
        let err = Backend::open(&setup).err().unwrap();
        assert_eq!(err.to_string(), "unknown syslog_facility \"bogus\"");
    }

    #[test]
    fn open_sends_to_syslog_socket() {
        let dir = tempfile::tempdir().unwrap();
        let socket_path = dir.path().join("log");
        let daemon = UnixDatagram::bind(&socket_path).unwrap();
        daemon.set_nonblocking(true).unwrap();
        let setup = LogSetup {
            syslog_name: "lists".to_string(),
            ..LogSetup::default()
        };
        let backend = Backend::open_with(&setup, &[&socket_path]).unwrap();
        assert!(matches!(backend.sink, Sink::Syslog(_)));
        log_at(&backend, Level::Warn, format_args!("a\nb"));

        let mut buf = [0u8; 4096];
        let n = daemon.recv(&mut buf).unwrap();
        let datagram = std::str::from_utf8(&buf[..n]).unwrap();
        // mail (2 << 3) | warning (4) = 20
        assert!(datagram.starts_with("<20>"), "{datagram:?}");
        let pid = std::process::id();
        assert!(
            datagram.ends_with(&format!(" lists/qmqpd[{pid}]: warning: a\\nb")),
            "{datagram:?}"
        );
    }

    #[test]
    fn open_without_syslog_falls_back_to_stderr_only_when_ok() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no-such-socket");
        let paths = [missing.as_path()];
        let backend = Backend::open_with(&setup_with("", true), &paths).unwrap();
        assert!(matches!(backend.sink, Sink::Stderr));
        let backend = Backend::open_with(&setup_with("", false), &paths).unwrap();
        assert!(matches!(backend.sink, Sink::Discard));
        log_at(&backend, Level::Error, format_args!("dropped"));
    }

    #[test]
    fn raise_steps_and_saturates() {
        assert_eq!(raise(LevelFilter::Info, 0), LevelFilter::Info);
        assert_eq!(raise(LevelFilter::Info, 1), LevelFilter::Debug);
        assert_eq!(raise(LevelFilter::Info, 2), LevelFilter::Trace);
        assert_eq!(raise(LevelFilter::Info, u32::MAX), LevelFilter::Trace);
    }

    #[test]
    fn set_thread_boost_affects_only_this_thread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maillog");
        let backend = Backend::open(&setup_with(path.to_str().unwrap(), false)).unwrap();
        let debug = Metadata::builder().level(Level::Debug).build();
        let trace = Metadata::builder().level(Level::Trace).build();
        assert!(!backend.enabled(&debug));

        set_thread_boost(1);
        assert!(backend.enabled(&debug));
        assert!(!backend.enabled(&trace));
        assert!(log::max_level() >= LevelFilter::Debug);
        std::thread::scope(|s| {
            s.spawn(|| assert!(!backend.enabled(&debug)));
        });
        set_thread_boost(0);
        assert!(!backend.enabled(&debug));
    }

    #[test]
    fn log_ignores_reentrant_call() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maillog");
        let backend = Backend::open(&setup_with(path.to_str().unwrap(), false)).unwrap();
        {
            let _inside = InLogGuard::enter();
            log_at(&backend, Level::Error, format_args!("from inside"));
        }
        log_at(&backend, Level::Error, format_args!("after"));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("from inside"));
        assert!(text.contains("error: after"));
    }

    #[test]
    fn same_open_file_compares_device_and_inode() {
        let (a_read, a_write) = nix::unistd::pipe().unwrap();
        let (b_read, _b_write) = nix::unistd::pipe().unwrap();
        let a_dup = nix::unistd::dup(&a_write).unwrap();
        assert!(same_open_file(a_write.as_fd(), a_dup.as_fd()));
        assert!(same_open_file(a_read.as_fd(), a_write.as_fd()));
        assert!(!same_open_file(a_write.as_fd(), b_read.as_fd()));
    }

    #[test]
    fn stderr_is_connection_when_extra_is_stderr() {
        let stderr_dup = nix::unistd::dup(std::io::stderr()).unwrap();
        assert!(stderr_is_connection(Some(stderr_dup.as_fd())));
    }

    #[test]
    fn stderr_is_connection_ignores_unrelated_extra() {
        // Whether fd 2 equals fd 0 or fd 1 depends on how the tests were started; an
        // unrelated pipe must not change the answer.
        let (pipe_read, _pipe_write) = nix::unistd::pipe().unwrap();
        assert_eq!(
            stderr_is_connection(Some(pipe_read.as_fd())),
            stderr_is_connection(None)
        );
    }

    #[test]
    fn current_thread_name_is_main_for_the_noted_thread_and_unnamed_elsewhere() {
        std::thread::spawn(|| {
            note_main_thread();
            assert_eq!(current_thread_name(), "main");
            let other = std::thread::spawn(current_thread_name).join().unwrap();
            assert_eq!(other, "unnamed");
        })
        .join()
        .unwrap();
        let named = std::thread::Builder::new()
            .name("connection".into())
            .spawn(current_thread_name)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(named, "connection");
    }
}
