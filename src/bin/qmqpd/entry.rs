//! The process entry point: qmqpd exports C's `main` itself instead of letting Rust's
//! start-up run first, and does here the two parts of that start-up it relies on.
//!
//! A one-shot qmqpd is started for every connection, so whatever runs before `run` is paid
//! once per message. Rust's start-up asks glibc for the main thread's stack bounds for its
//! stack-overflow guard, and glibc answers by reading and parsing `/proc/self/maps`: about a
//! sixth of the instructions of a whole transaction (docs/performance.md). It also maps a
//! signal stack for the message it prints on a stack overflow. Without them a stack overflow
//! still ends the process, by `SIGSEGV`, without that message.
//!
//! What qmqpd keeps of that start-up:
//! - `SIGPIPE` is ignored, so that writing to a client that went away is an error to report,
//!   not the end of the process;
//! - descriptors 0, 1 and 2 are open: any of them found closed is opened on `/dev/null`, so
//!   that no queue file or socket can become "standard error" by being the lowest free
//!   descriptor.
//!
//! The arguments and the environment are read through `std::env` as usual: on Linux with
//! glibc the standard library picks them up on its own (from `.init_array`) before any
//! `main` runs, which is why this module is used on that platform only. The main thread is
//! named to the panic hook here, as Rust's start-up would have named it.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int};
use std::io::Write;
use std::os::fd::IntoRawFd;
use std::panic::{self, AssertUnwindSafe};

use nix::fcntl::{OFlag, open};
use nix::libc;
use nix::sys::signal::{SigHandler, Signal, signal};
use nix::sys::stat::Mode;

use qmqpd::logging;
use qmqpd::program::EX_TEMPFAIL;

/// The exit status of a panic that reached `main`, as Rust's own start-up would give.
const EXIT_PANIC: c_int = 101;

/// The process's entry point, called by the C library's start-up with the command line.
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    // Neither can fail on a working system; if one does, the supervisor sees a temporary
    // failure (nothing can be logged yet).
    if prepare_process().is_err() {
        return c_int::from(EX_TEMPFAIL);
    }
    logging::note_main_thread();
    // A panic must not unwind into the C library's caller (that would abort); the panic hook
    // has logged it by the time it arrives here.
    let status = panic::catch_unwind(AssertUnwindSafe(super::run));
    // Rust's start-up would flush standard output at exit; `-n`, `-d` and `-h` print there.
    let _ = std::io::stdout().flush();
    status.map_or(EXIT_PANIC, c_int::from)
}

/// Ignores `SIGPIPE` and opens any of descriptors 0–2 that is closed on `/dev/null`.
fn prepare_process() -> nix::Result<()> {
    // SAFETY: `SIG_IGN` installs no handler, so nothing runs in signal context; no other
    // thread exists yet to race with the change of disposition.
    unsafe { signal(Signal::SIGPIPE, SigHandler::SigIgn) }?;
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: `fds` is a live array of three `pollfd`s, the length passed; a zero timeout
    // only asks, for each descriptor, whether it is open (POLLNVAL when it is not).
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), 3, 0) };
    // (Rust's start-up would fall back to `fcntl` on each descriptor, then abort; a
    // `poll` of three descriptors with no wait does not fail on a working system.)
    if ready < 0 {
        return Err(nix::Error::last());
    }
    for pfd in fds.iter().filter(|p| p.revents & libc::POLLNVAL != 0) {
        // The lowest free descriptor is the closed one: those below it are open by now.
        let fd = open("/dev/null", OFlag::O_RDWR, Mode::empty())?.into_raw_fd();
        if fd != pfd.fd {
            return Err(nix::Error::EBADF);
        }
    }
    Ok(())
}
