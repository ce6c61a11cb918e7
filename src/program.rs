//! The shell the three programs share: their exit statuses (sysexits numbers), the `-v`
//! verbosity steps, and the stop signal (SIGTERM/SIGINT waited for by one thread). Argument
//! parsing itself uses `lexopt` in each binary; this module owns what must be the same in
//! all three. It knows nothing about the protocol, the queue or the configuration.

use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// Exit status: success (and, for qmqpd, a transaction that ended normally: K, D, or a
/// client that went away).
pub const EX_OK: u8 = 0;
/// Exit status: bad command line (sysexits `EX_USAGE`).
pub const EX_USAGE: u8 = 64;
/// Exit status: the server refused the message for good (`EX_DATAERR`; qmqpc on `D`).
pub const EX_DATAERR: u8 = 65;
/// Exit status: no such message (`EX_NOINPUT`; `qmqp-queue show`).
pub const EX_NOINPUT: u8 = 66;
/// Exit status: the queue or a queue file could not be read, or output failed (`EX_IOERR`).
pub const EX_IOERR: u8 = 74;
/// Exit status: a temporary failure; trying again later may work (`EX_TEMPFAIL`).
pub const EX_TEMPFAIL: u8 = 75;
/// Exit status: configuration error (`EX_CONFIG`).
pub const EX_CONFIG: u8 = 78;

/// Every status `qmqpd` exits with (its man page lists each). A usage error is a
/// configuration error to qmqpd: the client still gets its `Z`.
pub const QMQPD_EXIT_STATUSES: &[u8] = &[EX_OK, EX_TEMPFAIL, EX_CONFIG];
/// Every status `qmqpc` exits with.
pub const QMQPC_EXIT_STATUSES: &[u8] = &[EX_OK, EX_USAGE, EX_DATAERR, EX_TEMPFAIL];
/// Every status `qmqp-queue` exits with.
pub const QMQP_QUEUE_EXIT_STATUSES: &[u8] = &[
    EX_OK,
    EX_USAGE,
    EX_NOINPUT,
    EX_IOERR,
    EX_TEMPFAIL,
    EX_CONFIG,
];

/// The log level for `-v` given `verbose` times: info, then debug, then trace.
pub fn log_level(verbose: u32) -> log::LevelFilter {
    match verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    }
}

/// Set by SIGTERM or SIGINT. Whoever waits can sleep on it ([`Stop::sleep`]) or poll its
/// descriptor ([`Stop::wake_fd`]), which becomes readable when the signal comes.
#[derive(Debug)]
pub struct Stop {
    flag: AtomicBool,
    signal: Mutex<Option<Signal>>,
    wake: Condvar,
    source: Source,
}

/// How a stop becomes visible to a poller.
#[derive(Debug)]
enum Source {
    /// [`Stop::set`] writes a byte into the pair (from the signal thread, or the program).
    Pair { rx: UnixStream, tx: UnixStream },
    /// The blocked signals themselves, read from a signalfd when someone looks: no thread.
    Signals(SignalFd),
}

impl Stop {
    /// A stop that only [`Stop::set`] sets (no signal is waited for).
    pub fn new() -> io::Result<Arc<Stop>> {
        let (rx, tx) = UnixStream::pair()?;
        Ok(Arc::new(Stop::from(Source::Pair { rx, tx })))
    }

    /// Blocks SIGTERM and SIGINT in this thread (and so in every thread started later;
    /// commands started later get a clean mask) and starts a thread that waits for them,
    /// calls `on_signal`, then sets the stop. Call before starting any other thread.
    pub fn install(on_signal: impl Fn(Signal) + Send + 'static) -> io::Result<Arc<Stop>> {
        let stop = Stop::new()?;
        let set = stop_signals();
        set.thread_block()?;
        let waiter = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(sig) = set.wait() {
                    on_signal(sig);
                    waiter.set(sig);
                }
            })?;
        Ok(stop)
    }

    /// Blocks SIGTERM and SIGINT like [`Stop::install`], but starts no thread: the signals
    /// wait in a signalfd until [`Stop::is_set`] or [`Stop::signal`] looks, or a `poll` on
    /// [`Stop::wake_fd`] sees them. For a process that serves one connection, where a
    /// thread would cost more than everything else it starts.
    pub fn watch() -> io::Result<Arc<Stop>> {
        let set = stop_signals();
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(Arc::new(Stop::from(Source::Signals(fd))))
    }

    fn from(source: Source) -> Stop {
        Stop {
            flag: AtomicBool::new(false),
            signal: Mutex::new(None),
            wake: Condvar::new(),
            source,
        }
    }

    /// Sets the stop as `sig` would, waking every waiter.
    pub fn set(&self, sig: Signal) {
        let mut signal = self.signal.lock().unwrap_or_else(PoisonError::into_inner);
        signal.get_or_insert(sig);
        self.flag.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        drop(signal);
        if let Source::Pair { tx, .. } = &self.source {
            let _ = (&*tx).write(b"x");
        }
    }

    /// Takes a signal waiting in the signalfd, if any.
    fn take_pending(&self) {
        if let Source::Signals(fd) = &self.source
            && !self.flag.load(Ordering::SeqCst)
            && let Ok(Some(info)) = fd.read_signal()
            && let Some(sig) = i32::try_from(info.ssi_signo)
                .ok()
                .and_then(|n| Signal::try_from(n).ok())
        {
            self.set(sig);
        }
    }

    /// True once a stop signal came.
    pub fn is_set(&self) -> bool {
        self.take_pending();
        self.flag.load(Ordering::SeqCst)
    }

    /// The first stop signal that came, if any.
    pub fn signal(&self) -> Option<Signal> {
        self.take_pending();
        *self.signal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The flag itself, for loops that only look at it (set by [`Stop::install`]'s thread
    /// or [`Stop::set`]; a [`Stop::watch`] sets it only when someone looks).
    pub fn flag(&self) -> &AtomicBool {
        &self.flag
    }

    /// A descriptor that becomes readable when the stop is set, for `poll`.
    pub(crate) fn wake_fd(&self) -> BorrowedFd<'_> {
        match &self.source {
            Source::Pair { rx, .. } => rx.as_fd(),
            Source::Signals(fd) => fd.as_fd(),
        }
    }

    /// Sleeps for `d`, or until stopped.
    pub fn sleep(&self, d: Duration) {
        if let Source::Signals(fd) = &self.source {
            let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
            let _ = poll(
                &mut fds,
                PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
            );
            return;
        }
        let guard = self.signal.lock().unwrap_or_else(PoisonError::into_inner);
        if self.flag.load(Ordering::SeqCst) {
            return;
        }
        // A spurious wake-up only makes the caller look around early.
        let _ = self
            .wake
            .wait_timeout(guard, d)
            .unwrap_or_else(PoisonError::into_inner);
    }
}

/// The signals that stop a program: SIGTERM and SIGINT.
fn stop_signals() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set
}

/// Ends the process the way `sig` would have without our handling, so that the supervisor
/// sees "killed by SIGTERM" as before. Returns only if that fails.
pub fn die_by(sig: Signal) {
    let mut set = SigSet::empty();
    set.add(sig);
    // Blocked signals are waited for by the signal thread; unblocked here, a signal sent to
    // this very thread takes its default action, which ends the process.
    if set.thread_unblock().is_ok() {
        let _ = nix::sys::signal::raise(sig);
    }
}
