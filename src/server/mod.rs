//! One connection from identification to reply, and the accept loop that serves many.
//!
//! Owns the edges of a transaction: timeouts on every read and write (`qmqpd_timeout`) and
//! on the whole connection (`daemon_timeout`), the `connect from`/`disconnect from` lines,
//! the access decision, debug peers, the PROXY header, and a clean close after the reply.
//! The accept loop of the listener modes is in `accept`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{MsgFlags, Shutdown, recv, send, shutdown};

use crate::access::{AccessError, MatchList};
use crate::config::Params;
use crate::peer::{self, Client, LaunchEnv, NameCache, Resolver, SocketPeer, SystemResolver};
use crate::program::Stop;
use crate::proxy::{self, Header};
use crate::queue::Queue;
use crate::reply::{Rejection, Reply, Where};
use crate::session::{self, CutOff, End, Outcome, Transaction};

mod accept;
pub use accept::{Limits, run_listeners};

/// How long a closing connection waits for the client to finish sending after an early
/// reply, so that unread input does not turn the close into a reset that destroys the reply.
const LINGER: Duration = Duration::from_secs(2);
/// How long a stopping listener waits for running transactions at most.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long a stopping listener then waits for the transactions it cut off to clean up.
const CUT_OFF_WAIT: Duration = Duration::from_secs(5);
/// The longest a client's host name look-up may take (further bounded by qmqpd_timeout).
const PEERNAME_LIMIT: Duration = Duration::from_secs(5);
/// How long a listener reuses a client's looked-up name (one-shot processes never do).
const PEERNAME_TTL: Duration = Duration::from_secs(60);
/// How long a denied client may take to send the rest of its request (the drain), so that
/// denied clients cannot hold connection slots for long.
const DENIED_DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// The per-read and per-write timeout while every connection slot is busy (Postfix shortens
/// its timeouts under stress the same way), so silent or dribbling clients make room.
const STRESS_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a waiting read looks again whether the listener came under stress.
const STRESS_CHECK: Duration = Duration::from_secs(1);

/// What every connection needs: the configuration and what was built from it at start-up.
pub struct Service {
    pub(crate) params: Params,
    pub(crate) clients: MatchList,
    pub(crate) debug_peers: MatchList,
    /// The peers that may send a PROXY header (`qmqpd_upstream_proxy_clients`).
    pub(crate) proxy_clients: MatchList,
    pub(crate) queue: Queue,
    pub(crate) env: LaunchEnv,
    /// Where client names come from when the launcher gave none.
    pub(crate) resolver: Arc<dyn Resolver>,
    /// How long a name look-up may take.
    pub(crate) peername_limit: Duration,
    /// Names already looked up, shared by a listener's connections.
    pub(crate) names: NameCache,
    /// Set by the accept loop while every connection slot is busy.
    pub(crate) stress: AtomicBool,
    /// When set, the requests being read are cut off (logged, their queue files removed):
    /// a one-shot process's stop signal, or a listener's own stop after its grace period.
    pub(crate) cut_off: Option<Arc<Stop>>,
}

impl Service {
    /// The configuration it was built from.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The queue it writes to.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// When `stop` is set, the requests being read are cut off (logged, their queue files
    /// removed). A one-shot process passes its stop signal; a listener a stop of its own,
    /// which the accept loop sets once running transactions had their grace period.
    pub fn cut_off_by(&mut self, stop: Arc<Stop>) {
        self.cut_off = Some(stop);
    }

    /// Builds the service; a broken access list is a configuration error.
    pub fn new(params: Params, env: LaunchEnv) -> Result<Service, AccessError> {
        let clients =
            MatchList::parse("qmqpd_authorized_clients", &params.qmqpd_authorized_clients)?;
        let debug_peers = MatchList::parse("debug_peer_list", &params.debug_peer_list)?;
        let proxy_clients = MatchList::parse(
            "qmqpd_upstream_proxy_clients",
            &params.qmqpd_upstream_proxy_clients,
        )?;
        for warning in clients
            .warnings()
            .iter()
            .chain(debug_peers.warnings())
            .chain(proxy_clients.warnings())
        {
            log::warn!("{warning}");
        }
        let queue = Queue::new(&params.queue_directory, &params.myhostname)
            .with_commit_method(params.queue_commit_method);
        let peername_limit = PEERNAME_LIMIT.min(params.qmqpd_timeout);
        Ok(Service {
            params,
            clients,
            debug_peers,
            proxy_clients,
            queue,
            env,
            resolver: Arc::new(SystemResolver),
            peername_limit,
            names: NameCache::new(PEERNAME_TTL),
            stress: AtomicBool::new(false),
            cut_off: None,
        })
    }
}

/// A client connection: where the request is read from and the reply written to.
pub struct Connection {
    rd: File,
    /// Where the reply goes when that is not `rd` (stdout, beside stdin).
    wr: Option<File>,
    /// Whether it is a socket (connected or not any more), not a pipe or a file.
    socket: bool,
}

impl Connection {
    /// The connection on stdin/stdout (inetd, xinetd, tcpserver, pipes); `socket` when
    /// stdin is a socket (as `listen::classify` found).
    pub fn stdio(socket: bool) -> io::Result<Connection> {
        Ok(Connection {
            rd: File::from(io::stdin().as_fd().try_clone_to_owned()?),
            wr: Some(File::from(io::stdout().as_fd().try_clone_to_owned()?)),
            socket,
        })
    }

    /// A connected socket (accepted, or passed by systemd with Accept=yes).
    pub fn socket(fd: OwnedFd) -> io::Result<Connection> {
        Ok(Connection {
            rd: File::from(fd),
            wr: None,
            socket: true,
        })
    }

    /// Where the reply goes.
    fn wr(&self) -> &File {
        self.wr.as_ref().unwrap_or(&self.rd)
    }

    /// The read side with one overall time limit, for the PROXY header.
    fn rd_timed(&self, limit: Duration) -> Timed<'_> {
        let now = Instant::now();
        Timed {
            file: &self.rd,
            socket: self.socket,
            timeout: limit,
            deadline: now.checked_add(limit).unwrap_or(now),
            stress: None,
            cut_off: None,
            unchecked: 0,
        }
    }

    /// True when the connection is a socket (connected or not any more), not a pipe.
    fn is_socket(&self) -> bool {
        self.socket
    }

    /// Who is at the other end, according to the descriptor.
    pub(crate) fn peer(&self) -> SocketPeer {
        peer::socket_peer(self.rd.as_fd())
    }
}

/// Reads or writes with a per-operation timeout and an overall deadline; the timeout
/// shrinks to `STRESS_TIMEOUT` while `stress` is set.
struct Timed<'a> {
    file: &'a File,
    /// A socket is first read or written without waiting (`MSG_DONTWAIT`), which saves a
    /// `poll` whenever it is ready, as it mostly is.
    socket: bool,
    timeout: Duration,
    deadline: Instant,
    stress: Option<&'a AtomicBool>,
    /// Reads fail with [`CutOff`] once this is set.
    cut_off: Option<&'a Stop>,
    /// Reads done at once since `cut_off` was last asked.
    unchecked: u32,
}

/// How many reads may be done at once before `Timed` asks whether the transaction is cut
/// off (at 64 KiB a read, every 1 MiB).
const CUT_OFF_EVERY: u32 = 16;

impl Timed<'_> {
    /// The per-operation timeout in force now.
    fn timeout(&self) -> Duration {
        match self.stress {
            Some(flag) if flag.load(Ordering::Relaxed) => self.timeout.min(STRESS_TIMEOUT),
            _ => self.timeout,
        }
    }

    /// Waits until the descriptor is ready; `TimedOut` when a limit passes first.
    fn wait(&self, flags: PollFlags) -> io::Result<()> {
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let op_left = (started + self.timeout()).saturating_duration_since(now);
            let mut wait = op_left.min(self.deadline.saturating_duration_since(now));
            if wait.is_zero() {
                return Err(io::ErrorKind::TimedOut.into());
            }
            if self.stress.is_some() {
                wait = wait.min(STRESS_CHECK);
            }
            let cut_off = self.cut_off.filter(|_| flags.contains(PollFlags::POLLIN));
            if let Some(stop) = cut_off
                && stop.is_set()
            {
                let signal = stop.signal().map_or("a signal", |sig| sig.as_str());
                return Err(io::Error::other(CutOff(format!("stopped by {signal}"))));
            }
            let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
            let mut fds = vec![PollFd::new(self.file.as_fd(), flags)];
            fds.extend(cut_off.map(|stop| PollFd::new(stop.wake_fd(), PollFlags::POLLIN)));
            match poll(&mut fds, timeout) {
                Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
                // Ready, unless only the stop woke us (then the next round returns CutOff).
                Ok(_) if fds[0].any().unwrap_or(true) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `op` (a socket operation that does not wait) when it can be done at once: `None`
    /// when it would wait, was interrupted, or a limit has passed or the transaction is cut
    /// off (then `wait` says so).
    fn at_once(
        &mut self,
        flags: PollFlags,
        op: impl FnOnce() -> nix::Result<usize>,
    ) -> io::Result<Option<usize>> {
        if !self.socket || Instant::now() >= self.deadline {
            return Ok(None);
        }
        // Whether the transaction is cut off is a system call to ask (a one-shot reads its
        // signalfd): asked every `CUT_OFF_EVERY` reads that need not wait, and before every
        // wait, so a client that keeps sending is still cut off soon after a stop.
        if flags.contains(PollFlags::POLLIN) && self.cut_off.is_some() {
            self.unchecked += 1;
            if self.unchecked >= CUT_OFF_EVERY {
                self.unchecked = 0;
                if self.cut_off.is_some_and(Stop::is_set) {
                    return Ok(None);
                }
            }
        }
        match op() {
            Ok(n) => Ok(Some(n)),
            // ENOTSOCK: stdin is a socket but this side (stdout) is not; it is written the
            // plain way.
            Err(
                nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR | nix::errno::Errno::ENOTSOCK,
            ) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

impl Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        if let Some(n) =
            self.at_once(PollFlags::POLLIN, || recv(fd, buf, MsgFlags::MSG_DONTWAIT))?
        {
            return Ok(n);
        }
        self.wait(PollFlags::POLLIN)?;
        (&mut &*self.file).read(buf)
    }
}

impl Write for Timed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let fd = self.file.as_raw_fd();
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        if let Some(n) = self.at_once(PollFlags::POLLOUT, || send(fd, buf, flags))? {
            return Ok(n);
        }
        self.wait(PollFlags::POLLOUT)?;
        (&mut &*self.file).write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why no client could be taken from a PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoHeader {
    /// The peer went away before the first byte (a balancer's plain TCP health check):
    /// nobody to answer, and nothing wrong here.
    Gone,
    /// A peer that may not send a header, or a missing, malformed or late header: answered
    /// with `Z`, since a misconfigured balancer must not bounce mail.
    Refused,
}

/// The client a balancer's PROXY header names, read from `rdr`; `real` is the connection's
/// own peer. A peer not in `qmqpd_upstream_proxy_clients`, or a missing or malformed header,
/// is logged with the real peer and refused.
fn proxied_client(
    svc: &Service,
    mut rdr: Timed<'_>,
    real: Client,
    is_socket: bool,
) -> Result<Client, NoHeader> {
    if real.addr.is_none() && is_socket {
        // A socket without a peer: reset before we looked (a balancer's plain TCP check).
        log::info!(
            "{}: lost connection before the PROXY header",
            real.namaddr()
        );
        return Err(NoHeader::Gone);
    }
    if !svc.proxy_clients.matches(None, real.addr) {
        log::warn!(
            "{}: not in qmqpd_upstream_proxy_clients: refusing a connection that must start \
             with a PROXY header",
            real.namaddr()
        );
        return Err(NoHeader::Refused);
    }
    match proxy::read_header(&mut rdr) {
        Ok(Header::Proxied {
            version, source, ..
        }) => {
            let mut client = Client::at(source.ip(), Some(source.port()));
            client.port_logging = real.port_logging;
            log::debug!(
                "{}: PROXY v{version} header: client {}",
                real.namaddr(),
                client.namaddr()
            );
            Ok(client)
        }
        Ok(Header::Local) => {
            log::debug!("{}: PROXY v2 LOCAL: keeping the real peer", real.namaddr());
            Ok(real)
        }
        Ok(Header::Unknown { version, family }) => {
            log::info!(
                "{}: PROXY v{version} header with address family {family}: keeping the real peer",
                real.namaddr()
            );
            Ok(real)
        }
        // Connected and gone without a byte: a health check, not a misconfiguration.
        Err(e @ proxy::ProxyError::Closed) => {
            log::info!("{}: {e}", real.namaddr());
            Err(NoHeader::Gone)
        }
        Err(e) => {
            log::warn!("{}: {e}", real.namaddr());
            Err(NoHeader::Refused)
        }
    }
}

/// Serves one connection: identify, check access, run the transaction, close cleanly.
pub fn serve_connection(svc: &Service, conn: Connection) -> Outcome {
    let params = &svc.params;
    let started = Instant::now();
    let deadline = started
        .checked_add(params.daemon_timeout)
        .unwrap_or(started + Duration::from_secs(86400 * 365));
    let mut client = peer::identify(&svc.env, conn.peer(), params.qmqpd_client_port_logging);
    if params.qmqpd_upstream_proxy_protocol {
        let rdr = conn.rd_timed(params.qmqpd_upstream_proxy_timeout);
        match proxied_client(svc, rdr, client, conn.is_socket()) {
            Ok(proxied) => client = proxied,
            // Nobody to answer: the client went away, which is no local failure.
            Err(NoHeader::Gone) => {
                return Outcome {
                    end: End::Lost {
                        at: Where::Header,
                        timeout: false,
                    },
                    request_read: false,
                };
            }
            Err(NoHeader::Refused) => {
                let reply = Reply::Rejected(Rejection::Internal);
                refuse(&conn, &reply);
                return Outcome {
                    end: End::Replied(reply),
                    request_read: false,
                };
            }
        }
    }
    if params.qmqpd_peername_lookup
        && !client.name_verified
        && let Some(addr) = client.addr
        && let Some(name) = svc
            .names
            .verified_name(&svc.resolver, addr, svc.peername_limit)
    {
        client.name = name;
        client.name_verified = true;
    }
    let debug_peer = svc.debug_peers.matches(client.verified_name(), client.addr);
    // Until this connection ends: its thread serves the next one afterwards.
    let _boost = debug_peer.then(|| ThreadBoost::set(params.debug_peer_level));
    log::info!("connect from {}", client.namaddr());
    let authorized = svc.clients.matches(client.verified_name(), client.addr);
    log::debug!(
        "{}: qmqpd_authorized_clients: {}",
        client.namaddr(),
        if authorized { "match" } else { "no match" }
    );
    // A denied client's request is only drained: it gets little time to send it (the reply
    // itself still has the connection's full deadline).
    let read_deadline = if authorized {
        deadline
    } else {
        deadline.min(Instant::now() + DENIED_DRAIN_LIMIT)
    };
    let outcome = run_transaction(svc, &conn, &client, authorized, (read_deadline, deadline));
    close(&conn, &outcome, deadline);
    log::info!("disconnect from {}", client.namaddr());
    if client.addr.is_none() && !authorized {
        log::warn!(
            "the client of a connection that is not a socket is unknown: run qmqpd under a \
             launcher that names it (ucspi-tcp sets PROTO=TCP TCPREMOTEIP=...)"
        );
    }
    outcome
}

/// `debug_peer_level` extra verbosity for this thread's log lines while it lives.
struct ThreadBoost;

impl ThreadBoost {
    fn set(steps: u32) -> ThreadBoost {
        crate::logging::set_thread_boost(steps);
        ThreadBoost
    }
}

impl Drop for ThreadBoost {
    fn drop(&mut self) {
        crate::logging::set_thread_boost(0);
    }
}

fn run_transaction(
    svc: &Service,
    conn: &Connection,
    client: &Client,
    authorized: bool,
    (read_deadline, deadline): (Instant, Instant),
) -> Outcome {
    let timeout = svc.params.qmqpd_timeout;
    let mut rdr = Timed {
        file: &conn.rd,
        socket: conn.socket,
        timeout,
        deadline: read_deadline,
        stress: Some(&svc.stress),
        cut_off: svc.cut_off.as_deref(),
        unchecked: 0,
    };
    let mut wr = Timed {
        file: conn.wr(),
        socket: conn.socket,
        timeout,
        deadline,
        stress: Some(&svc.stress),
        cut_off: None,
        unchecked: 0,
    };
    let t = Transaction {
        client,
        params: &svc.params,
        queue: &svc.queue,
        authorized,
    };
    reply_on_panic(&mut wr, |wr| session::serve(&mut rdr, wr, &t))
}

/// Runs a transaction; a bug (a panic) still ends in `Z`, never a silent close. The panic
/// hook has logged it, and an unfinished queue file removes itself while unwinding.
fn reply_on_panic<W: Write>(wr: &mut W, serve: impl FnOnce(&mut W) -> Outcome) -> Outcome {
    let served = std::panic::catch_unwind(AssertUnwindSafe(|| serve(&mut *wr)));
    served.unwrap_or_else(|_| {
        let reply = Reply::Rejected(Rejection::Internal);
        let end = match wr.write_all(&reply.encode(false)) {
            Ok(()) => End::Replied(reply),
            Err(_) => End::ReplyFailed(reply),
        };
        Outcome {
            end,
            request_read: false,
        }
    })
}

/// Answers without reading the request (qmqpd cannot serve it), then closes cleanly so the
/// unread request does not reset the connection before the client reads the reply.
pub fn refuse(conn: &Connection, reply: &Reply) {
    let deadline = Instant::now() + LINGER;
    let mut wr = Timed {
        file: conn.wr(),
        socket: conn.socket,
        timeout: LINGER,
        deadline,
        stress: None,
        cut_off: None,
        unchecked: 0,
    };
    let end = match wr.write_all(&reply.encode(false)) {
        Ok(()) => End::Replied(reply.clone()),
        Err(_) => End::ReplyFailed(reply.clone()),
    };
    let outcome = Outcome {
        end,
        request_read: false,
    };
    close(conn, &outcome, deadline + LINGER);
}

/// Ends the connection after the reply: shut down our write side, and when the client
/// may still be sending (an early reply), read and discard for a moment so the close does
/// not reset the connection before the client reads the reply.
fn close(conn: &Connection, outcome: &Outcome, deadline: Instant) {
    if !conn.socket || shutdown(conn.wr().as_raw_fd(), Shutdown::Write).is_err() {
        return;
    }
    if outcome.request_read || matches!(outcome.end, End::Lost { .. }) {
        return;
    }
    let mut rd = Timed {
        file: &conn.rd,
        socket: true,
        timeout: LINGER,
        deadline: deadline.min(Instant::now() + LINGER),
        stress: None,
        cut_off: None,
        unchecked: 0,
    };
    let mut buf = [0u8; 8192];
    while let Ok(n) = rd.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// A resolver that knows one name, after a delay.
    struct Slow {
        delay: Duration,
    }

    impl Resolver for Slow {
        fn reverse(
            &self,
            _: std::net::IpAddr,
            deadline: Instant,
        ) -> Result<Option<String>, crate::resolve::TimedOut> {
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(self.delay.min(left));
            if self.delay >= left {
                return Err(crate::resolve::TimedOut);
            }
            Ok(Some("client.example.com".into()))
        }
        fn forward(
            &self,
            _: &str,
            _: Instant,
        ) -> Result<Vec<std::net::IpAddr>, crate::resolve::TimedOut> {
            Ok(vec!["127.0.0.1".parse().unwrap()])
        }
    }

    fn service(dir: &std::path::Path, clients: &str, delay: Duration, limit: Duration) -> Service {
        let params = Params {
            queue_directory: dir.to_path_buf(),
            qmqpd_error_delay: Duration::ZERO,
            qmqpd_authorized_clients: clients.into(),
            myhostname: "mx.example".into(),
            ..Params::default()
        };
        let mut svc = Service::new(params, LaunchEnv::default()).unwrap();
        svc.resolver = Arc::new(Slow { delay });
        svc.peername_limit = limit;
        svc
    }

    /// Serves one request over a real loopback connection; returns the reply.
    fn exchange(svc: &Service, request: &[u8]) -> (Outcome, Vec<u8>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        client.write_all(request).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let outcome =
            serve_connection(svc, Connection::socket(OwnedFd::from(server_side)).unwrap());
        let mut reply = Vec::new();
        client.read_to_end(&mut reply).unwrap();
        (outcome, reply)
    }

    /// Asserts that `reply` is a K and returns the text of the first file in `dir`/new.
    fn queued_text(dir: &std::path::Path, reply: &[u8]) -> String {
        assert!(
            reply.starts_with(b"33:KOk: queued as "),
            "{}",
            String::from_utf8_lossy(reply)
        );
        let new = std::fs::read_dir(dir.join("new"))
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        String::from_utf8(std::fs::read(new.path()).unwrap()).unwrap()
    }

    #[test]
    fn reply_on_panic_answers_z_and_counts_as_local_failure() {
        let mut out = Vec::new();
        let outcome = reply_on_panic(&mut out, |_| panic!("a bug"));
        assert_eq!(out, b"22:ZError: internal error,");
        assert!(outcome.local_failure());
    }

    const REQUEST: &[u8] = b"17:2:x\n,3:s@x,3:r@x,,";

    #[test]
    fn serve_connection_matches_confirmed_name() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(
            dir.path(),
            ".example.com",
            Duration::ZERO,
            Duration::from_secs(30),
        );
        let text = queued_text(dir.path(), &exchange(&svc, REQUEST).1);
        assert!(
            text.contains("Received: from client.example.com (client.example.com [127.0.0.1])"),
            "{text}"
        );
    }

    #[test]
    fn serve_connection_replies_despite_hanging_resolver() {
        let dir = tempfile::tempdir().unwrap();
        let svc = service(
            dir.path(),
            "127.0.0.1",
            Duration::from_secs(20),
            Duration::from_millis(200),
        );
        let started = Instant::now();
        let (_, reply) = exchange(&svc, REQUEST);
        assert!(
            reply.starts_with(b"33:KOk: queued as "),
            "{}",
            String::from_utf8_lossy(&reply)
        );
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the look-up was cut off"
        );
        let svc = service(
            dir.path(),
            ".example.com",
            Duration::from_secs(20),
            Duration::from_millis(200),
        );
        let (_, reply) = exchange(&svc, REQUEST);
        assert_eq!(
            reply,
            b"64:DError: unknown[127.0.0.1] is not authorized to use this service,"
        );
    }

    fn proxy_service(dir: &std::path::Path, proxy_clients: &str) -> Service {
        let params = Params {
            queue_directory: dir.to_path_buf(),
            qmqpd_error_delay: Duration::ZERO,
            qmqpd_authorized_clients: "192.0.2.0/24".into(),
            qmqpd_peername_lookup: false,
            qmqpd_upstream_proxy_protocol: true,
            qmqpd_upstream_proxy_clients: proxy_clients.into(),
            myhostname: "mx.example".into(),
            ..Params::default()
        };
        Service::new(params, LaunchEnv::default()).unwrap()
    }

    #[test]
    fn serve_connection_takes_the_client_from_the_proxy_header() {
        let dir = tempfile::tempdir().unwrap();
        let svc = proxy_service(dir.path(), "127.0.0.0/8");
        let mut request = b"PROXY TCP4 192.0.2.7 203.0.113.1 56324 628\r\n".to_vec();
        request.extend_from_slice(REQUEST);
        let text = queued_text(dir.path(), &exchange(&svc, &request).1);
        assert!(text.contains("(unknown [192.0.2.7])"), "{text}");
        // Without the header the real peer (127.0.0.1) would be denied; with a v2 LOCAL
        // header it is the client and is denied as such.
        let mut local = proxy::V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        local.extend_from_slice(REQUEST);
        let (_, reply) = exchange(&svc, &local);
        assert_eq!(
            reply,
            b"64:DError: unknown[127.0.0.1] is not authorized to use this service,"
        );
    }

    #[test]
    fn serve_connection_answers_z_without_a_valid_proxy_header() {
        let dir = tempfile::tempdir().unwrap();
        let svc = proxy_service(dir.path(), "127.0.0.0/8");
        let (outcome, reply) = exchange(&svc, REQUEST);
        assert_eq!(reply, b"22:ZError: internal error,");
        assert!(outcome.local_failure());
        // A peer that may not speak PROXY is refused even with a well-formed header.
        let svc = proxy_service(dir.path(), "192.0.2.1");
        let mut request = b"PROXY TCP4 192.0.2.7 203.0.113.1 56324 628\r\n".to_vec();
        request.extend_from_slice(REQUEST);
        let (_, reply) = exchange(&svc, &request);
        assert_eq!(reply, b"22:ZError: internal error,");
        assert!(std::fs::read_dir(dir.path().join("new")).map_or(true, |mut d| d.next().is_none()));
    }

    #[test]
    fn serve_connection_without_a_byte_is_a_lost_client_not_a_local_failure() {
        let dir = tempfile::tempdir().unwrap();
        let svc = proxy_service(dir.path(), "127.0.0.0/8");
        let (outcome, reply) = exchange(&svc, b"");
        assert_eq!(reply, b"");
        assert!(matches!(outcome.end, End::Lost { .. }), "{outcome:?}");
        assert!(!outcome.local_failure());
    }
}
