//! Where connections come from: sockets passed by systemd (`LISTEN_FDS`), `--listen`
//! addresses, and stdin. Owns telling a listening socket from a connected one by the socket
//! itself (`SO_ACCEPTCONN`), never by trusting a helper crate, and refusing anything that is
//! not a stream socket. Serving connections is `server`'s job.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::sys::socket::SockaddrLike;
use std::os::unix::net::UnixListener;

/// A socket that accepts connections: TCP (IPv4 or IPv6) or UNIX-domain.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Makes `accept` return at once when no connection is waiting.
    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        }
    }

    /// Accepts one connection, as a plain descriptor.
    pub fn accept(&self) -> io::Result<OwnedFd> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
            Listener::Unix(l) => l.accept().map(|(s, _)| OwnedFd::from(s)),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

impl fmt::Display for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(addr) => write!(f, "{addr}"),
                Err(_) => f.write_str("a TCP socket"),
            },
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(path) => write!(f, "unix:{path}"),
                None => f.write_str("a UNIX-domain socket"),
            },
        }
    }
}

/// A stream socket passed by systemd, not yet classified.
#[derive(Debug)]
pub enum Passed {
    Tcp(OwnedFd),
    Unix(OwnedFd),
}

/// Takes the sockets systemd passed (`LISTEN_FDS`/`LISTEN_PID`, via listenfd). Call first
/// thing in `main`: listenfd removes the variables from the environment. Anything that is not
/// a TCP or UNIX-domain stream socket is refused, naming its descriptor.
pub fn take_systemd_fds() -> Result<Vec<Passed>, String> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut out = Vec::new();
    for idx in 0..fds.len() {
        // These checks only look at the family and type; whether a socket listens is decided
        // later from the socket itself (listenfd also wraps connected sockets as listeners).
        if let Ok(Some(sock)) = fds.take_tcp_listener(idx) {
            out.push(Passed::Tcp(OwnedFd::from(sock)));
        } else if let Ok(Some(sock)) = fds.take_unix_listener(idx) {
            out.push(Passed::Unix(OwnedFd::from(sock)));
        } else {
            return Err(format!(
                "systemd passed file descriptor {} that is not a TCP or UNIX-domain stream \
                 socket (check ListenStream= in the .socket unit; datagram and other sockets \
                 cannot carry QMQP)",
                idx + 3
            ));
        }
    }
    Ok(out)
}

/// True when `fd` is a listening socket (`SO_ACCEPTCONN`).
pub fn is_listening(fd: BorrowedFd<'_>) -> io::Result<bool> {
    Ok(nix::sys::socket::getsockopt(
        &fd,
        nix::sys::socket::sockopt::AcceptConn,
    )?)
}

/// Where this process's connections come from, decided once at start-up.
#[derive(Debug)]
pub enum Incoming {
    /// One connection on stdin/stdout (inetd `nowait`, xinetd, tcpserver, pipes); `socket`
    /// when stdin is a (connected) socket.
    Stdio { socket: bool },
    /// One connected socket passed by systemd (Accept=yes without StandardInput=socket).
    Passed(OwnedFd),
    /// Listening sockets passed by systemd (Accept=no), or on stdin (inetd `wait`).
    Listen(Vec<Listener>),
    /// `--listen` addresses: qmqpd binds them itself ([`Incoming::bind`]), once the
    /// configuration is known to be good.
    Addresses(Vec<String>),
}

impl Incoming {
    /// True when qmqpd serves many connections; then no standard descriptor is a client.
    pub fn is_listener(&self) -> bool {
        matches!(self, Incoming::Listen(_) | Incoming::Addresses(_))
    }

    /// The listening sockets: those passed, or the `--listen` addresses bound now.
    /// `None` for the one-connection sources.
    pub fn bind(self) -> Option<Result<Vec<Listener>, String>> {
        match self {
            Incoming::Listen(listeners) => Some(Ok(listeners)),
            Incoming::Addresses(addrs) => Some(bind_all(&addrs)),
            Incoming::Stdio { .. } | Incoming::Passed(_) => None,
        }
    }
}

/// Decides the source, in this order: `--listen` addresses, then systemd's sockets, then
/// stdin (which may itself be a listening socket, as inetd's `wait` mode passes). Binds
/// nothing.
pub fn classify(listen: Vec<String>, passed: Vec<Passed>) -> Result<Incoming, String> {
    if !listen.is_empty() {
        // systemd's sockets, if any, are closed: `--listen` says where to listen.
        return Ok(Incoming::Addresses(listen));
    }
    if passed.is_empty() {
        // Not a socket at all when the question fails (ENOTSOCK).
        return match is_listening(io::stdin().as_fd()) {
            Ok(true) => stdin_listener().map(|l| Incoming::Listen(vec![l])),
            Ok(false) => Ok(Incoming::Stdio { socket: true }),
            Err(_) => Ok(Incoming::Stdio { socket: false }),
        };
    }
    let mut listeners = Vec::new();
    let mut connected = Vec::new();
    for sock in passed {
        let fd = match &sock {
            Passed::Tcp(fd) | Passed::Unix(fd) => fd.as_fd(),
        };
        let listening = is_listening(fd)
            .map_err(|e| format!("cannot inspect a socket passed by systemd: {e}"))?;
        match (sock, listening) {
            (Passed::Tcp(fd), true) => listeners.push(Listener::Tcp(TcpListener::from(fd))),
            (Passed::Unix(fd), true) => listeners.push(Listener::Unix(UnixListener::from(fd))),
            (Passed::Tcp(fd) | Passed::Unix(fd), false) => connected.push(fd),
        }
    }
    match (listeners.is_empty(), connected.pop()) {
        (false, None) => Ok(Incoming::Listen(listeners)),
        (true, Some(fd)) if connected.is_empty() => Ok(Incoming::Passed(fd)),
        _ => Err(
            "systemd passed a mix of listening and connected sockets, or several \
                  connections: use Accept=yes with one socket, or Accept=no"
                .to_owned(),
        ),
    }
}

/// Stdin, a listening socket, as a listener (inetd `wait` mode).
fn stdin_listener() -> Result<Listener, String> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| format!("cannot use stdin: {e}"))?;
    let unix = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd())
        .is_ok_and(|a| a.family() == Some(nix::sys::socket::AddressFamily::Unix));
    Ok(if unix {
        Listener::Unix(UnixListener::from(fd))
    } else {
        Listener::Tcp(TcpListener::from(fd))
    })
}

/// Binds every `--listen` address.
fn bind_all(addrs: &[String]) -> Result<Vec<Listener>, String> {
    let mut listeners = Vec::new();
    for addr in addrs {
        let sock_addr: SocketAddr = addr.parse().map_err(|_| {
            format!("--listen {addr}: not an address:port like 127.0.0.1:6280 or [::1]:6280")
        })?;
        let l =
            TcpListener::bind(sock_addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listeners.push(Listener::Tcp(l));
    }
    Ok(listeners)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_listening_tells_listeners_from_connections() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        assert!(is_listening(l.as_fd()).unwrap());
        assert!(!is_listening(c.as_fd()).unwrap());
    }

    #[test]
    fn choose_classifies_passed_sockets() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let u = UnixListener::bind(dir.path().join("s")).unwrap();
        let listen = classify(
            vec![],
            vec![
                Passed::Tcp(OwnedFd::from(l)),
                Passed::Unix(OwnedFd::from(u)),
            ],
        );
        assert!(matches!(listen, Ok(Incoming::Listen(ref v)) if v.len() == 2));
        let one = classify(vec![], vec![Passed::Tcp(OwnedFd::from(c))]);
        assert!(matches!(one, Ok(Incoming::Passed(_))));
    }

    #[test]
    fn choose_refuses_a_mix_and_bad_addresses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mixed = classify(
            vec![],
            vec![Passed::Tcp(OwnedFd::from(l)), Passed::Tcp(OwnedFd::from(c))],
        );
        assert!(mixed.is_err());
        let bad = classify(vec!["localhost".to_owned()], vec![]).unwrap();
        assert!(bad.is_listener());
        let bound = bad.bind().unwrap();
        assert!(bound.err().unwrap().contains("not an address:port"));
    }
}
