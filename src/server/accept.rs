//! The accept loop of the listener modes: one thread per running connection (threads are
//! kept a while for reuse), at most
//! `default_process_limit` at once (at the cap it stops accepting, never drops a
//! connection), `max_use` and `max_idle`, the stop signal with its grace period, and what
//! systemd is told (`sd_notify`). Each connection is served by `serve_connection`.

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use super::{CUT_OFF_WAIT, Connection, STOP_GRACE, Service, refuse, serve_connection};
use crate::listen::Listener;
use crate::program::Stop;
use crate::reply::{Rejection, Reply};

/// When a listener exits by itself.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections to serve before exiting (systemd listener mode).
    pub max_use: Option<u64>,
    /// Idle time without connections before exiting (systemd listener mode).
    pub max_idle: Option<Duration>,
    /// Connections served at once.
    pub process_limit: usize,
}

/// Counts running connections so the loop can stop accepting at the cap.
struct Active {
    state: Mutex<Count>,
    changed: Condvar,
}

#[derive(Default)]
struct Count {
    running: usize,
    /// Threads in `wait_below`: only they need to hear of a change (a wake-up is a
    /// system call, not worth making twice a connection for nobody).
    waiting: usize,
}

impl Active {
    fn lock(&self) -> MutexGuard<'_, Count> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self) -> usize {
        self.lock().running
    }

    /// Waits up to `wait` while the count is at least `limit`; returns the count.
    fn wait_below(&self, limit: usize, wait: Duration) -> usize {
        let mut count = self.lock();
        if count.running < limit {
            return count.running;
        }
        count.waiting += 1;
        let (mut count, _) = self
            .changed
            .wait_timeout_while(count, wait, |c| c.running >= limit)
            .unwrap_or_else(|e| e.into_inner());
        count.waiting -= 1;
        count.running
    }

    fn add(&self, delta: isize) {
        let mut count = self.lock();
        count.running = count.running.saturating_add_signed(delta);
        let waiting = count.waiting > 0;
        drop(count);
        if waiting {
            self.changed.notify_all();
        }
    }
}

/// Releases a connection slot when the connection's thread ends, even by a panic.
struct Slot(Arc<Active>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

/// A connection and its slot, handed to a connection thread.
struct Job {
    conn: Connection,
    slot: Slot,
}

/// How long a connection thread waits for the next connection before it exits.
const WORKER_IDLE: Duration = Duration::from_secs(10);

/// The connection threads, kept for reuse: one that has served its connection waits up to
/// `WORKER_IDLE` for the next before it exits, so a busy listener does not create and tear
/// down a thread per message (clone, stack and signal-stack set-up, and the TLB flush on
/// every CPU when the stack is given back). There is never more than one thread per
/// running connection, so `Active` still caps the threads too.
#[derive(Default)]
struct Workers {
    state: Mutex<Waiting>,
    work: Condvar,
}

#[derive(Default)]
struct Waiting {
    jobs: VecDeque<Job>,
    /// Threads waiting for a job; each queued job has one of them to itself.
    idle: usize,
}

impl Workers {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves `job` on a waiting thread, or on a new one. When no thread can be started,
    /// the client is answered `Z` here and the error returned.
    fn run(self: &Arc<Self>, svc: &Arc<Service>, job: Job) -> io::Result<()> {
        let mut waiting = self.lock();
        if waiting.idle > waiting.jobs.len() {
            waiting.jobs.push_back(job);
            // Woken after the lock is released, so the thread need not wait for it.
            drop(waiting);
            self.work.notify_one();
            return Ok(());
        }
        drop(waiting);
        // Handed over through a slot so that, if no thread can be started, the
        // connection is still here to be answered.
        let handover = Arc::new(Mutex::new(Some(job)));
        let for_thread = Arc::clone(&handover);
        let (workers, svc) = (Arc::clone(self), Arc::clone(svc));
        let spawned = std::thread::Builder::new()
            .name("connection".into())
            .spawn(move || {
                let first = for_thread.lock().unwrap_or_else(|e| e.into_inner()).take();
                let mut next = first;
                while let Some(Job { conn, slot }) = next {
                    serve_connection(&svc, conn);
                    next = workers.next_job(slot);
                }
            });
        spawned.map(drop).inspect_err(|_| {
            let job = handover.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(job) = job {
                refuse(&job.conn, &Reply::Rejected(Rejection::Internal));
            }
        })
    }

    /// Gives back the slot of the connection just served and waits up to `WORKER_IDLE` for
    /// the next job; `None` tells the thread to exit. The thread counts as waiting before
    /// its slot is free, so the accept loop, woken by the free slot, hands the next
    /// connection to it instead of starting another thread.
    fn next_job(&self, done: Slot) -> Option<Job> {
        let mut waiting = self.lock();
        waiting.idle += 1;
        drop(done);
        let (mut waiting, _) = self
            .work
            .wait_timeout_while(waiting, WORKER_IDLE, |w| w.jobs.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        waiting.idle -= 1;
        waiting.jobs.pop_front()
    }
}

/// Accepts connections on `listeners` until stopped; returns how many were served.
///
/// The listeners are closed as soon as accepting stops, before running transactions get
/// their grace period: a socket qmqpd bound itself then refuses new connections at once
/// (a balancer tries another host) instead of holding them in a backlog that is reset at
/// exit. A socket systemd or inetd passed stays open in the launcher, which keeps its own
/// copy: connections arriving meanwhile wait there for the next start.
pub fn run_listeners(
    svc: Arc<Service>,
    listeners: Vec<Listener>,
    limits: Limits,
    stop: &Stop,
) -> io::Result<u64> {
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    let active = Arc::new(Active {
        state: Mutex::new(Count::default()),
        changed: Condvar::new(),
    });
    let limit = limits.process_limit.max(1);
    let workers = Arc::new(Workers::default());
    let mut served: u64 = 0;
    let mut idle_since = Instant::now();
    let mut notifier = Notifier::new();
    notifier.ready();
    loop {
        let busy_slots = active.get();
        svc.stress.store(busy_slots >= limit, Ordering::Relaxed);
        notifier.tick(served, busy_slots);
        if stop.is_set() || limits.max_use.is_some_and(|m| served >= m) {
            break;
        }
        // At the cap, stop accepting: connections wait in the kernel's queue, none is dropped.
        if active.wait_below(limit, Duration::from_secs(1)) >= limit {
            continue;
        }
        let busy = active.get() > 0;
        if busy {
            idle_since = Instant::now();
        }
        let wait = match limits.max_idle {
            Some(idle) if !busy => {
                let left = idle.saturating_sub(idle_since.elapsed());
                if left.is_zero() {
                    log::info!("idle for {}s: exiting", idle.as_secs());
                    break;
                }
                left.min(Duration::from_secs(1))
            }
            _ => Duration::from_secs(1),
        }
        .min(notifier.interval());
        let mut fds: Vec<PollFd<'_>> = listeners
            .iter()
            .map(|l| PollFd::new(l.as_fd(), PollFlags::POLLIN))
            .collect();
        fds.push(PollFd::new(stop.wake_fd(), PollFlags::POLLIN));
        match poll(
            &mut fds,
            PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        let ready: Vec<bool> = fds.iter().map(|f| f.any().unwrap_or(false)).collect();
        drop(fds);
        for (listener, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            let stream = match listener.accept() {
                Ok(stream) => stream,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    continue;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    continue;
                }
            };
            served += 1;
            idle_since = Instant::now();
            // On Linux an accepted socket does not inherit the listener's O_NONBLOCK; every
            // read and write is preceded by poll() anyway.
            let conn = match Connection::socket(stream) {
                Ok(conn) => conn,
                Err(e) => {
                    log::warn!("cannot set up connection: {e}");
                    continue;
                }
            };
            active.add(1);
            let slot = Slot(Arc::clone(&active));
            if let Err(e) = workers.run(&svc, Job { conn, slot }) {
                log::warn!("cannot start a connection thread: {e}: answering Z");
            }
            if limits.max_use.is_some_and(|m| served >= m) {
                break;
            }
        }
    }
    drop(listeners);
    log::info!("stopped listening: {} connections running", active.get());
    // Let running transactions finish. After max_use or max_idle they all may (each is
    // bounded by daemon_timeout); after SIGTERM/SIGINT only for a grace period, since the
    // service manager is waiting (what is then cut off is not acknowledged).
    notifier.stopping(served, active.get());
    let grace = if stop.is_set() {
        STOP_GRACE.min(svc.params.qmqpd_timeout)
    } else {
        svc.params.daemon_timeout
    };
    let deadline = Instant::now()
        .checked_add(grace)
        .unwrap_or_else(Instant::now);
    while active.get() > 0 && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        active.wait_below(1, left.min(notifier.interval()));
        notifier.tick(served, active.get());
    }
    // What is still being read is cut off: each transaction logs what it lost and removes
    // its queue file before the process exits.
    if let (Some(sig), Some(cut_off)) = (stop.signal(), &svc.cut_off)
        && active.get() > 0
    {
        cut_off.set(sig);
        let deadline = Instant::now() + CUT_OFF_WAIT;
        while active.get() > 0 && Instant::now() < deadline {
            active.wait_below(1, notifier.interval());
            notifier.tick(served, active.get());
        }
    }
    Ok(served)
}

/// Tells systemd how the listener is doing (a no-op without `$NOTIFY_SOCKET`): READY=1,
/// STATUS= when the counts change (at most once a second), WATCHDOG=1 at half the watchdog
/// interval, STOPPING=1.
struct Notifier {
    /// Whether a service manager listens (`$NOTIFY_SOCKET` is set).
    listening: bool,
    watchdog: Option<Duration>,
    last_ping: Instant,
    last_status: (u64, usize),
    status_sent: Option<Instant>,
}

impl Notifier {
    /// The most often STATUS= is sent: a busy listener's counts change with every message.
    const STATUS_EVERY: Duration = Duration::from_secs(1);

    fn new() -> Notifier {
        Notifier {
            listening: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: Instant::now(),
            last_status: (u64::MAX, usize::MAX),
            status_sent: None,
        }
    }

    /// The longest the accept loop may sleep between ticks.
    fn interval(&self) -> Duration {
        self.watchdog.map_or(Duration::from_secs(1), |w| {
            (w / 2).clamp(Duration::from_millis(10), Duration::from_secs(1))
        })
    }

    fn send(states: &[sd_notify::NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            log::debug!("sd_notify: {e}");
        }
    }

    fn ready(&mut self) {
        Self::send(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status("waiting for connections"),
        ]);
    }

    fn tick(&mut self, served: u64, active: usize) {
        if !self.listening {
            return;
        }
        if self.last_status != (served, active)
            && self
                .status_sent
                .is_none_or(|at| at.elapsed() >= Self::STATUS_EVERY)
        {
            self.last_status = (served, active);
            self.status_sent = Some(Instant::now());
            let status = format!("served {served} connections, {active} active");
            Self::send(&[sd_notify::NotifyState::Status(&status)]);
        }
        if let Some(w) = self.watchdog
            && self.last_ping.elapsed() >= w / 2
        {
            self.last_ping = Instant::now();
            Self::send(&[sd_notify::NotifyState::Watchdog]);
        }
    }

    fn stopping(&mut self, served: u64, active: usize) {
        let status = format!("stopping: served {served} connections, {active} active");
        Self::send(&[
            sd_notify::NotifyState::Stopping,
            sd_notify::NotifyState::Status(&status),
        ]);
    }
}
