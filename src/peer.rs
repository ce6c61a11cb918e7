//! Who the client is: its address, port and name, from the launcher's environment (UCSPI
//! `${PROTO}REMOTEIP`, systemd's `REMOTE_ADDR`, xinetd's `REMOTE_HOST`) or from the socket
//! itself, in that order (see `identify`), and its name (reverse look-up confirmed by a
//! forward look-up, in the calling thread, bounded in time; `resolve` does the look-ups).
//! Owns the `name[addr]` form used in logs and replies.
//! Does not decide whether the client may use the service (that is `access`).

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getpeername};

use crate::logging::sanitize;
use crate::resolve::{HostFiles, Snapshot, TimedOut};

/// The name of a client nobody could name.
pub(crate) const UNKNOWN: &str = "unknown";

/// The client of one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's name, made safe for logs, or "unknown".
    pub name: String,
    /// True when `name` came from the launcher or a confirmed DNS look-up (name patterns in
    /// access lists match only then).
    pub name_verified: bool,
    /// The client's address, IPv4-mapped IPv6 turned into IPv4; None when unknown.
    pub addr: Option<IpAddr>,
    pub port: Option<u16>,
    /// Show the port in `namaddr` (`qmqpd_client_port_logging`).
    pub port_logging: bool,
}

impl Client {
    /// A client with no identity (a pipe without UCSPI variables): always denied.
    pub fn unknown() -> Client {
        Client {
            name: UNKNOWN.to_owned(),
            name_verified: false,
            addr: None,
            port: None,
            port_logging: false,
        }
    }

    /// A client at `addr`, name unknown.
    pub fn at(addr: IpAddr, port: Option<u16>) -> Client {
        Client {
            addr: Some(addr.to_canonical()),
            port,
            ..Client::unknown()
        }
    }

    /// The verified name, for access lists.
    pub(crate) fn verified_name(&self) -> Option<&str> {
        self.name_verified.then_some(self.name.as_str())
    }

    /// The address as logged and stored: IPv6 without brackets, or "unknown".
    pub(crate) fn addr_text(&self) -> String {
        self.addr
            .map_or_else(|| UNKNOWN.to_owned(), |a| a.to_string())
    }

    /// `name[addr]`, or `name[addr]:port` with port logging.
    pub(crate) fn namaddr(&self) -> String {
        match (self.port_logging, self.port) {
            (true, Some(port)) => format!("{}[{}]:{port}", self.name, self.addr_text()),
            (true, None) => format!("{}[{}]:{UNKNOWN}", self.name, self.addr_text()),
            _ => format!("{}[{}]", self.name, self.addr_text()),
        }
    }
}

/// The launcher's variables that say who the client is, read once at start-up.
#[derive(Debug, Clone, Default)]
pub struct LaunchEnv {
    /// `${PROTO}REMOTEIP` (or the TCP/TCP6 fallbacks) when PROTO is set.
    pub ucspi_ip: Option<OsString>,
    pub ucspi_port: Option<OsString>,
    pub ucspi_host: Option<OsString>,
    /// systemd Accept=yes.
    pub remote_addr: Option<OsString>,
    pub remote_port: Option<OsString>,
    /// xinetd and stunnel: an IP address.
    pub remote_host: Option<OsString>,
}

impl LaunchEnv {
    /// Reads the variables from the process environment.
    pub fn from_env() -> LaunchEnv {
        let get = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let proto = get("PROTO").and_then(|p| p.into_string().ok());
        let proto = proto.filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()));
        let mut env = LaunchEnv {
            remote_addr: get("REMOTE_ADDR"),
            remote_port: get("REMOTE_PORT"),
            remote_host: get("REMOTE_HOST"),
            ..LaunchEnv::default()
        };
        if let Some(proto) = proto {
            for family in [proto.as_str(), "TCP", "TCP6"] {
                if let Some(ip) = get(&format!("{family}REMOTEIP")) {
                    env.ucspi_ip = Some(ip);
                    env.ucspi_port = get(&format!("{family}REMOTEPORT"));
                    env.ucspi_host = get(&format!("{family}REMOTEHOST"));
                    break;
                }
            }
        }
        env
    }
}

/// What the connection's file descriptor says about the peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SocketPeer {
    Inet(SocketAddr),
    /// A UNIX-domain socket: the client is this host.
    Local,
    /// Not a socket (a pipe or a file), or the peer is gone.
    None,
}

/// Asks the socket who its peer is.
pub(crate) fn socket_peer(fd: BorrowedFd<'_>) -> SocketPeer {
    let Ok(addr) = getpeername::<SockaddrStorage>(fd.as_raw_fd()) else {
        return SocketPeer::None;
    };
    if let Some(v4) = addr.as_sockaddr_in() {
        return SocketPeer::Inet(SocketAddr::V4((*v4).into()));
    }
    if let Some(v6) = addr.as_sockaddr_in6() {
        return SocketPeer::Inet(SocketAddr::V6((*v6).into()));
    }
    match addr.family() {
        Some(AddressFamily::Unix) => SocketPeer::Local,
        _ => SocketPeer::None,
    }
}

/// Decides who the client is: UCSPI variables first, then the socket, then the
/// variables of launchers that pass no socket; else unknown.
pub(crate) fn identify(env: &LaunchEnv, sock: SocketPeer, port_logging: bool) -> Client {
    let mut client = identify_unlogged(env, sock);
    client.port_logging = port_logging;
    client
}

fn identify_unlogged(env: &LaunchEnv, sock: SocketPeer) -> Client {
    if let Some(ip) = &env.ucspi_ip {
        let Some(addr) = parse_ip(ip) else {
            log::warn!(
                "cannot parse the client address {:?} from the launcher",
                sanitize(ip.as_encoded_bytes())
            );
            return Client::unknown();
        };
        let mut client = Client::at(addr, env.ucspi_port.as_ref().and_then(parse_port));
        if let Some(host) = &env.ucspi_host {
            client.name = sanitize(host.as_encoded_bytes()).to_ascii_lowercase();
            client.name_verified = client.name != UNKNOWN;
        }
        return client;
    }
    match sock {
        SocketPeer::Inet(sa) => Client::at(sa.ip(), Some(sa.port())),
        SocketPeer::Local => Client {
            name: "localhost".to_owned(),
            name_verified: true,
            addr: Some(IpAddr::from([127, 0, 0, 1])),
            port: None,
            port_logging: false,
        },
        SocketPeer::None => {
            if let Some(addr) = env.remote_addr.as_ref().and_then(parse_ip) {
                Client::at(addr, env.remote_port.as_ref().and_then(parse_port))
            } else if let Some(addr) = env.remote_host.as_ref().and_then(parse_ip) {
                Client::at(addr, None)
            } else {
                Client::unknown()
            }
        }
    }
}

/// Parses an address from the environment; a `%zone` suffix is dropped.
fn parse_ip(value: &OsString) -> Option<IpAddr> {
    let text = value.to_str()?.trim();
    let text = text.split_once('%').map_or(text, |(a, _)| a);
    let text = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    text.parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

fn parse_port(value: &OsString) -> Option<u16> {
    value.to_str()?.trim().parse().ok()
}

/// Name look-ups, behind a trait so tests can give any answer (or none, or hang). Each must
/// return by `deadline`, with `TimedOut` when it could not finish.
pub(crate) trait Resolver: Send + Sync {
    /// The name the address maps to (PTR), if any.
    fn reverse(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut>;
    /// The addresses the name maps to (A and AAAA).
    fn forward(&self, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut>;
    /// The verified name of `addr` (see `confirm_name`), asked of one consistent view of
    /// the resolver's sources where it has one.
    fn confirm(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        confirm_name(self, addr, deadline)
    }
}

/// The system's hosts: /etc/hosts and DNS as /etc/nsswitch.conf orders them, without glibc's
/// NSS (see `resolve`).
pub(crate) struct SystemResolver;

impl Resolver for SystemResolver {
    fn reverse(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        HostFiles::default().reverse(addr, deadline)
    }

    fn forward(&self, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut> {
        HostFiles::default().forward(name, deadline)
    }

    /// Both queries read the system's files once between them.
    fn confirm(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        let files = HostFiles::default();
        confirm_name(&Files(files.snapshot()), addr, deadline)
    }
}

/// One look-up's view of the system's files, as a `Resolver`.
struct Files<'a>(Snapshot<'a>);

impl Resolver for Files<'_> {
    fn reverse(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        self.0.reverse(addr, deadline)
    }

    fn forward(&self, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut> {
        self.0.forward(name, deadline)
    }
}

/// The client's verified name: the reverse look-up of `addr`, kept only when that name's
/// forward look-up lists `addr` again (Postfix's rule). Both run in the calling thread and
/// take at most `limit` together: a resolver that does not answer in time leaves the name
/// unknown.
#[cfg(test)]
pub(crate) fn verified_name(
    resolver: &dyn Resolver,
    addr: IpAddr,
    limit: Duration,
) -> Option<String> {
    look_up(resolver, addr, limit).unwrap_or(None)
}

/// `verified_name`, telling a resolver that did not answer from one that found no name.
fn look_up(
    resolver: &dyn Resolver,
    addr: IpAddr,
    limit: Duration,
) -> Result<Option<String>, TimedOut> {
    let now = Instant::now();
    let deadline = now.checked_add(limit).unwrap_or(now);
    resolver.confirm(addr, deadline).inspect_err(|_| {
        log::warn!(
            "host name look-up for {addr} took longer than {}s: using unknown",
            limit.as_secs_f32()
        );
    })
}

/// Confirmed names (and the absence of one) by address, for a listener that serves the same
/// few list hosts over and over: a look-up costs two or three resolver queries.
pub(crate) struct NameCache {
    ttl: Duration,
    /// The answer and when it expires.
    entries: Mutex<HashMap<IpAddr, (Option<String>, Instant)>>,
}

impl NameCache {
    /// The most addresses kept; a full cache is emptied rather than managed.
    const MAX_ENTRIES: usize = 4096;
    /// How long "the resolver did not answer" is remembered.
    const NO_ANSWER_TTL: Duration = Duration::from_secs(10);

    /// A cache whose answers are reused for `ttl`.
    pub fn new(ttl: Duration) -> NameCache {
        NameCache {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The verified name of `addr`, from the cache while fresh, else from `verified_name`.
    pub(crate) fn verified_name(
        &self,
        resolver: &Arc<dyn Resolver>,
        addr: IpAddr,
        limit: Duration,
    ) -> Option<String> {
        let now = Instant::now();
        let lock = || self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((name, expires)) = lock().get(&addr)
            && now < *expires
        {
            return name.clone();
        }
        // A resolver that did not answer is asked again sooner: the name may be needed for
        // access, and a short memory still keeps a dead resolver from costing a thread per
        // connection.
        let (name, ttl) = match look_up(resolver.as_ref(), addr, limit) {
            Ok(name) => (name, self.ttl),
            Err(TimedOut) => (None, self.ttl.min(Self::NO_ANSWER_TTL)),
        };
        let mut entries = lock();
        if entries.len() >= Self::MAX_ENTRIES {
            entries.clear();
        }
        if let Some(expires) = now.checked_add(ttl) {
            entries.insert(addr, (name.clone(), expires));
        }
        name
    }
}

fn confirm_name<R: Resolver + ?Sized>(
    resolver: &R,
    addr: IpAddr,
    deadline: Instant,
) -> Result<Option<String>, TimedOut> {
    let addr = addr.to_canonical();
    let Some(found) = resolver.reverse(addr, deadline)? else {
        return Ok(None);
    };
    let name = found.trim_end_matches('.').to_ascii_lowercase();
    if name.parse::<IpAddr>().is_ok() || name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        // getnameinfo answers with the address itself when there is no name.
        if name != addr.to_string() {
            log::warn!(
                "numeric host name {} for address {addr}: using unknown",
                sanitize(name.as_bytes())
            );
        }
        return Ok(None);
    }
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        log::warn!(
            "malformed host name {} for address {addr}: using unknown",
            sanitize(found.as_bytes())
        );
        return Ok(None);
    }
    if resolver
        .forward(&name, deadline)?
        .iter()
        .any(|a| a.to_canonical() == addr)
    {
        Ok(Some(name))
    } else {
        log::warn!("host name {name} does not resolve to address {addr}: using unknown");
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    /// A resolver with fixed answers; `hang` makes every look-up wait that long.
    struct Fake {
        ptr: Option<&'static str>,
        a: Vec<IpAddr>,
        hang: Duration,
    }

    impl Resolver for Fake {
        fn reverse(&self, _: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
            let left = deadline.saturating_duration_since(Instant::now());
            std::thread::sleep(self.hang.min(left));
            if self.hang >= left {
                return Err(TimedOut);
            }
            Ok(self.ptr.map(str::to_owned))
        }
        fn forward(&self, _: &str, _: Instant) -> Result<Vec<IpAddr>, TimedOut> {
            Ok(self.a.clone())
        }
    }

    fn name_of(ptr: Option<&'static str>, a: &[&str], client: &str) -> Option<String> {
        let fake = Fake {
            ptr,
            a: a.iter().map(|s| s.parse().unwrap()).collect(),
            hang: Duration::ZERO,
        };
        verified_name(&fake, client.parse().unwrap(), Duration::from_secs(30))
    }

    #[test]
    fn verified_name_needs_forward_confirmation() {
        assert_eq!(
            name_of(
                Some("Mail.Example.COM."),
                &["192.0.2.9", "192.0.2.1"],
                "192.0.2.1"
            )
            .as_deref(),
            Some("mail.example.com")
        );
        assert_eq!(
            name_of(Some("mail.example.com"), &["192.0.2.9"], "192.0.2.1"),
            None
        );
        assert_eq!(name_of(None, &["192.0.2.1"], "192.0.2.1"), None);
        assert_eq!(
            name_of(Some("v6.example.com"), &["2001:db8::1"], "2001:db8::1").as_deref(),
            Some("v6.example.com")
        );
        assert_eq!(
            name_of(Some("m.example.com"), &["192.0.2.1"], "::ffff:192.0.2.1").as_deref(),
            Some("m.example.com")
        );
    }

    #[test]
    fn verified_name_rejects_numeric_and_malformed_names() {
        assert_eq!(
            name_of(Some("192.0.2.1"), &["192.0.2.1"], "192.0.2.1"),
            None
        );
        assert_eq!(name_of(Some("10.0.0.1"), &["192.0.2.1"], "192.0.2.1"), None);
        assert_eq!(name_of(Some("1.2.3"), &["192.0.2.1"], "192.0.2.1"), None);
        assert_eq!(
            name_of(Some("evil name\n"), &["192.0.2.1"], "192.0.2.1"),
            None
        );
    }

    #[test]
    fn verified_name_gives_up_on_a_hanging_resolver() {
        let fake = Fake {
            ptr: Some("slow.example.com"),
            a: vec!["192.0.2.1".parse().unwrap()],
            hang: Duration::from_secs(5),
        };
        let started = std::time::Instant::now();
        let name = verified_name(
            &fake,
            "192.0.2.1".parse().unwrap(),
            Duration::from_millis(100),
        );
        assert_eq!(name, None);
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not wait for the resolver"
        );
    }

    /// Counts reverse look-ups.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Resolver for Counting {
        fn reverse(&self, _: IpAddr, _: Instant) -> Result<Option<String>, TimedOut> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(Some("list.example.org".into()))
        }
        fn forward(&self, _: &str, _: Instant) -> Result<Vec<IpAddr>, TimedOut> {
            Ok(vec!["192.0.2.1".parse().unwrap()])
        }
    }

    #[test]
    fn name_cache_reuses_answers_until_they_expire() {
        let counting = Arc::new(Counting(Default::default()));
        let resolver: Arc<dyn Resolver> = counting.clone();
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let limit = Duration::from_secs(30);
        let cache = NameCache::new(Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(
                cache.verified_name(&resolver, addr, limit).as_deref(),
                Some("list.example.org")
            );
        }
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        let expired = NameCache::new(Duration::ZERO);
        expired.verified_name(&resolver, addr, limit);
        expired.verified_name(&resolver, addr, limit);
        assert_eq!(counting.0.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn name_cache_remembers_a_silent_resolver_only_briefly() {
        let slow: Arc<dyn Resolver> = Arc::new(Fake {
            ptr: Some("slow.example.com"),
            a: vec!["192.0.2.1".parse().unwrap()],
            hang: Duration::from_secs(2),
        });
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let cache = NameCache::new(Duration::from_secs(3600));
        let before = Instant::now();
        assert_eq!(
            cache.verified_name(&slow, addr, Duration::from_millis(50)),
            None
        );
        let expires = cache.entries.lock().unwrap()[&addr].1;
        assert!(expires <= before + NameCache::NO_ANSWER_TTL + Duration::from_secs(5));
        assert!(expires > before + Duration::from_secs(1));
    }

    #[test]
    fn system_resolver_confirms_localhost() {
        // /etc/hosts maps 127.0.0.1 to localhost on every machine this runs on.
        let name = verified_name(
            &SystemResolver,
            "127.0.0.1".parse().unwrap(),
            Duration::from_secs(30),
        );
        assert_eq!(name.as_deref(), Some("localhost"));
    }

    #[test]
    fn identify_prefers_ucspi_and_canonicalises_mapped_addresses() {
        let env = LaunchEnv {
            ucspi_ip: os("::ffff:192.0.2.7"),
            ucspi_port: os("4242"),
            ucspi_host: os("Client.Example"),
            ..LaunchEnv::default()
        };
        let sock = SocketPeer::Inet("127.0.0.1:1".parse().unwrap());
        let c = identify(&env, sock, false);
        assert_eq!(c.addr, Some("192.0.2.7".parse().unwrap()));
        assert_eq!(c.namaddr(), "client.example[192.0.2.7]");
        assert_eq!(c.verified_name(), Some("client.example"));
        assert_eq!(
            identify(&env, sock, true).namaddr(),
            "client.example[192.0.2.7]:4242"
        );
    }

    #[test]
    fn identify_uses_socket_then_remote_variables() {
        let sock = SocketPeer::Inet("[::ffff:10.1.2.3]:99".parse().unwrap());
        assert_eq!(
            identify(&LaunchEnv::default(), sock, false).namaddr(),
            "unknown[10.1.2.3]"
        );
        let env = LaunchEnv {
            remote_addr: os("2001:db8::5"),
            remote_port: os("7"),
            ..LaunchEnv::default()
        };
        assert_eq!(
            identify(&env, SocketPeer::None, true).namaddr(),
            "unknown[2001:db8::5]:7"
        );
        let env = LaunchEnv {
            remote_host: os("::ffff:127.0.0.1"),
            ..LaunchEnv::default()
        };
        assert_eq!(
            identify(&env, SocketPeer::None, false).namaddr(),
            "unknown[127.0.0.1]"
        );
    }

    #[test]
    fn identify_treats_unix_socket_as_localhost() {
        let c = identify(&LaunchEnv::default(), SocketPeer::Local, false);
        assert_eq!(c.namaddr(), "localhost[127.0.0.1]");
    }

    #[test]
    fn identify_leaves_bare_pipe_unknown() {
        let c = identify(&LaunchEnv::default(), SocketPeer::None, false);
        assert_eq!(c.namaddr(), "unknown[unknown]");
        assert_eq!(c.addr, None);
        assert_eq!(c.verified_name(), None);
    }

    #[test]
    fn identify_rejects_garbage_and_escapes_host_names() {
        let env = LaunchEnv {
            ucspi_ip: os("not-an-ip"),
            ..LaunchEnv::default()
        };
        assert_eq!(identify(&env, SocketPeer::None, false), Client::unknown());
        let env = LaunchEnv {
            ucspi_ip: os("fe80::1%eth0"),
            ucspi_host: os("evil\nhost"),
            ..LaunchEnv::default()
        };
        let c = identify(&env, SocketPeer::None, false);
        assert_eq!(c.namaddr(), "evil\\nhost[fe80::1]");
    }

    #[test]
    fn socket_peer_sees_tcp_unix_and_pipes() {
        use std::os::fd::AsFd;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        assert_eq!(
            socket_peer(server.as_fd()),
            SocketPeer::Inet(stream.local_addr().unwrap())
        );
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(socket_peer(a.as_fd()), SocketPeer::Local);
        let (r, _w) = std::io::pipe().unwrap();
        assert_eq!(socket_peer(r.as_fd()), SocketPeer::None);
    }
}
