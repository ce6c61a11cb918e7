//! Host names without glibc's NSS: `/etc/hosts`, and DNS per `/etc/resolv.conf`, consulted in
//! the order of the `files` and `dns` sources on the `hosts:` line of `/etc/nsswitch.conf`.
//! Every look-up runs in the calling thread and gives up at a deadline. This is what lets
//! the release binaries be linked statically: glibc's NSS modules cannot be loaded by a
//! static program. Other NSS sources (mdns, myhostname, resolve, ldap, ...) and the action
//! items in brackets are not consulted. The DNS wire format is `hickory-proto`'s, the
//! resolv.conf syntax `resolv-conf`'s. Owns only the look-ups; which name a client gets
//! (reverse confirmed by forward) is `peer`'s.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// The largest `/etc/hosts`, `/etc/nsswitch.conf` or `/etc/resolv.conf` read.
const MAX_FILE: u64 = 4 << 20;
/// The largest DNS reply read over UDP (EDNS is not offered, so 512 is the protocol's limit;
/// some servers send more anyway).
const MAX_UDP_REPLY: usize = 4096;

/// The deadline passed before an answer came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// Where names come from, as `hosts:` in nsswitch.conf lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Files,
    Dns,
}

/// The files a look-up reads; `Default` gives the system's.
#[derive(Debug, Clone)]
pub struct HostFiles {
    pub nsswitch: PathBuf,
    pub hosts: PathBuf,
    pub resolv: PathBuf,
}

impl Default for HostFiles {
    fn default() -> HostFiles {
        HostFiles {
            nsswitch: PathBuf::from("/etc/nsswitch.conf"),
            hosts: PathBuf::from("/etc/hosts"),
            resolv: PathBuf::from("/etc/resolv.conf"),
        }
    }
}

impl HostFiles {
    /// One look-up's view of the files: each is read at most once however many queries the
    /// look-up makes (a verified name is a reverse and a forward query).
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            files: self,
            sources: OnceLock::new(),
            hosts: OnceLock::new(),
            dns: OnceLock::new(),
        }
    }

    /// The sources to ask, in order.
    pub fn sources(&self) -> Vec<Source> {
        match read_text(&self.nsswitch) {
            Ok(text) => host_sources(&text),
            Err(_) => host_sources(""),
        }
    }

    /// The name `addr` maps to: the first source that knows one wins.
    pub fn reverse(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        self.snapshot().reverse(addr, deadline)
    }

    /// The addresses `name` maps to (A and AAAA): the first source that knows any wins.
    pub fn forward(&self, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut> {
        self.snapshot().forward(name, deadline)
    }
}

/// `HostFiles` as one look-up reads them: nsswitch.conf, the hosts file and resolv.conf each
/// read when first needed, then kept.
pub struct Snapshot<'a> {
    files: &'a HostFiles,
    sources: OnceLock<Vec<Source>>,
    /// The hosts file's text; `None` when it cannot be read.
    hosts: OnceLock<Option<String>>,
    dns: OnceLock<Dns>,
}

impl Snapshot<'_> {
    fn sources(&self) -> &[Source] {
        self.sources.get_or_init(|| self.files.sources())
    }

    fn hosts(&self) -> Option<&str> {
        self.hosts
            .get_or_init(|| read_text(&self.files.hosts).ok())
            .as_deref()
    }

    fn dns(&self) -> &Dns {
        self.dns.get_or_init(|| {
            let config = read_text(&self.files.resolv)
                .ok()
                .and_then(|text| resolv_conf::Config::parse(text).ok())
                .unwrap_or_default();
            Dns::from_config(&config)
        })
    }

    /// The name `addr` maps to: the first source that knows one wins.
    pub fn reverse(&self, addr: IpAddr, deadline: Instant) -> Result<Option<String>, TimedOut> {
        for source in self.sources() {
            let name = match source {
                Source::Files => self.hosts().and_then(|text| hosts_reverse(text, addr)),
                Source::Dns => {
                    let records = self
                        .dns()
                        .query(Name::from(addr), RecordType::PTR, deadline)?;
                    records.into_iter().find_map(|r| match r.data {
                        RData::PTR(ptr) => Some(ptr.0.to_ascii()),
                        _ => None,
                    })
                }
            };
            if name.is_some() {
                return Ok(name);
            }
        }
        Ok(None)
    }

    /// The addresses `name` maps to (A and AAAA): the first source that knows any wins. The
    /// name is taken as absolute (no search list).
    pub fn forward(&self, name: &str, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut> {
        for source in self.sources() {
            let addrs = match source {
                Source::Files => self
                    .hosts()
                    .map(|text| hosts_forward(text, name))
                    .unwrap_or_default(),
                Source::Dns => {
                    let Ok(mut fqdn) = Name::from_ascii(name) else {
                        continue;
                    };
                    fqdn.set_fqdn(true);
                    let dns = self.dns();
                    let mut addrs = Vec::new();
                    for rtype in [RecordType::A, RecordType::AAAA] {
                        let records = dns.query(fqdn.clone(), rtype, deadline)?;
                        addrs.extend(records.iter().filter_map(|r| r.data.ip_addr()));
                    }
                    addrs
                }
            };
            if !addrs.is_empty() {
                return Ok(addrs);
            }
        }
        Ok(Vec::new())
    }
}

/// How much of a configuration file the first read asks for: these files are small, so one
/// read and the one that finds the end are the usual cost (no `fstat` for the size first).
const FIRST_READ: usize = 4096;

/// Reads a small configuration file, bounded in size.
fn read_text(path: &Path) -> io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::with_capacity(FIRST_READ);
    file.take(MAX_FILE).read_to_string(&mut text)?;
    Ok(text)
}

/// The `files` and `dns` sources of the `hosts:` line, in order. Without such a line, glibc's
/// built-in default: `dns` then `files`.
pub fn host_sources(nsswitch: &str) -> Vec<Source> {
    let line = nsswitch.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim_start();
        line.strip_prefix("hosts:")
    });
    let Some(line) = line else {
        return vec![Source::Dns, Source::Files];
    };
    let mut sources = Vec::new();
    let mut in_action = false;
    for word in line.split_ascii_whitespace() {
        // Action items ([NOTFOUND=return]) may hold spaces inside the brackets.
        if word.starts_with('[') {
            in_action = true;
        }
        if in_action {
            in_action = !word.ends_with(']');
            continue;
        }
        let source = match word {
            "files" => Source::Files,
            "dns" => Source::Dns,
            _ => continue,
        };
        if !sources.contains(&source) {
            sources.push(source);
        }
    }
    sources
}

/// The entries of an /etc/hosts file: address, then canonical name and aliases.
fn hosts_entries(text: &str) -> impl Iterator<Item = (IpAddr, std::str::SplitAsciiWhitespace<'_>)> {
    text.lines().filter_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_ascii_whitespace();
        let addr = words.next()?;
        let addr = addr.split_once('%').map_or(addr, |(a, _)| a);
        let addr = addr.parse::<IpAddr>().ok()?.to_canonical();
        Some((addr, words))
    })
}

/// The canonical name of the first line that lists `addr`.
pub fn hosts_reverse(text: &str, addr: IpAddr) -> Option<String> {
    let addr = addr.to_canonical();
    hosts_entries(text)
        .filter(|(a, _)| *a == addr)
        .find_map(|(_, mut names)| names.next().map(str::to_owned))
}

/// Every address listed with `name` as canonical name or alias (case-insensitive).
pub fn hosts_forward(text: &str, name: &str) -> Vec<IpAddr> {
    let name = name.trim_end_matches('.');
    hosts_entries(text)
        .filter_map(|(addr, mut names)| names.any(|n| n.eq_ignore_ascii_case(name)).then_some(addr))
        .collect()
}

/// A stub resolver: the name servers of resolv.conf, asked in turn over UDP, over TCP when the
/// reply is truncated.
struct Dns {
    servers: Vec<SocketAddr>,
    /// Per try (`options timeout:`).
    timeout: Duration,
    /// Rounds over all servers (`options attempts:`).
    attempts: u32,
}

/// What one server said.
enum Reply {
    /// An answer, or an authoritative "no such name"/"no such data" (no records).
    Answer(Vec<Record>),
    /// No usable answer from this server: ask the next.
    Unusable,
}

impl Dns {
    fn from_config(config: &resolv_conf::Config) -> Dns {
        Dns {
            servers: config
                .get_nameservers_or_local()
                .iter()
                .map(|ip| SocketAddr::new(IpAddr::from(ip), 53))
                .collect(),
            timeout: Duration::from_secs(u64::from(config.timeout.clamp(1, 30))),
            attempts: config.attempts.clamp(1, 5),
        }
    }

    /// The answer records for (`name`, `rtype`); empty when no server answered usefully
    /// before every attempt was spent, `TimedOut` when the deadline passed first.
    fn query(
        &self,
        name: Name,
        rtype: RecordType,
        deadline: Instant,
    ) -> Result<Vec<Record>, TimedOut> {
        let mut request = Message::query();
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(name, rtype));
        let Ok(wire) = request.to_vec() else {
            return Ok(Vec::new());
        };
        for _ in 0..self.attempts {
            for server in &self.servers {
                let now = Instant::now();
                let Some(left) = deadline
                    .checked_duration_since(now)
                    .filter(|d| !d.is_zero())
                else {
                    return Err(TimedOut);
                };
                let limit = Instant::now() + self.timeout.min(left);
                if let Reply::Answer(records) = ask(*server, &request, &wire, limit) {
                    return Ok(records);
                }
            }
        }
        if Instant::now() >= deadline {
            return Err(TimedOut);
        }
        Ok(Vec::new())
    }
}

/// Asks one server over UDP (and TCP on truncation), until `limit`.
fn ask(server: SocketAddr, request: &Message, wire: &[u8], limit: Instant) -> Reply {
    let Ok(reply) = ask_udp(server, request, wire, limit) else {
        return Reply::Unusable;
    };
    let reply = if reply.metadata.truncation {
        match ask_tcp(server, request, wire, limit) {
            Ok(reply) => reply,
            Err(_) => return Reply::Unusable,
        }
    } else {
        reply
    };
    match reply.metadata.response_code {
        ResponseCode::NoError => Reply::Answer(reply.answers),
        ResponseCode::NXDomain => Reply::Answer(Vec::new()),
        _ => Reply::Unusable,
    }
}

fn time_left(limit: Instant) -> io::Result<Duration> {
    limit
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| io::Error::from(io::ErrorKind::TimedOut))
}

/// The reply to `request` from `server` over UDP; datagrams that do not answer it are
/// dropped.
fn ask_udp(
    server: SocketAddr,
    request: &Message,
    wire: &[u8],
    limit: Instant,
) -> io::Result<Message> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    // Connected: the kernel drops datagrams from anywhere else, and a refusal shows up.
    socket.connect(server)?;
    socket.send(wire)?;
    let mut buf = vec![0; MAX_UDP_REPLY];
    loop {
        socket.set_read_timeout(Some(time_left(limit)?))?;
        let n = socket.recv(&mut buf)?;
        if let Some(reply) = buf.get(..n).and_then(|b| answers(request, b)) {
            return Ok(reply);
        }
    }
}

/// The reply to `request` from `server` over TCP (two-byte length, then the message).
fn ask_tcp(
    server: SocketAddr,
    request: &Message,
    wire: &[u8],
    limit: Instant,
) -> io::Result<Message> {
    let mut stream = TcpStream::connect_timeout(&server, time_left(limit)?)?;
    let len =
        u16::try_from(wire.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    stream.set_write_timeout(Some(time_left(limit)?))?;
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(wire);
    stream.write_all(&framed)?;
    stream.set_read_timeout(Some(time_left(limit)?))?;
    let mut len = [0; 2];
    stream.read_exact(&mut len)?;
    let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
    stream.set_read_timeout(Some(time_left(limit)?))?;
    stream.read_exact(&mut buf)?;
    answers(request, &buf).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))
}

/// `bytes` decoded, when they are a reply to `request`: same id, same question.
fn answers(request: &Message, bytes: &[u8]) -> Option<Message> {
    let reply = Message::from_vec(bytes).ok()?;
    (reply.metadata.id == request.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && reply.queries == request.queries)
        .then_some(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_sources_follow_the_hosts_line() {
        let debian =
            "passwd: files\nhosts:          files mdns4_minimal [NOTFOUND=return] dns myhostname\n";
        assert_eq!(host_sources(debian), [Source::Files, Source::Dns]);
        assert_eq!(
            host_sources("hosts: dns files # comment\n"),
            [Source::Dns, Source::Files]
        );
        assert_eq!(host_sources("hosts: files\n"), [Source::Files]);
        assert_eq!(
            host_sources("hosts: resolve [!UNAVAIL=return ] files dns\n"),
            [Source::Files, Source::Dns]
        );
        assert_eq!(
            host_sources("# hosts: files\n"),
            [Source::Dns, Source::Files]
        );
        assert_eq!(host_sources("hosts: ldap\n"), []);
    }

    const HOSTS: &str = "127.0.0.1 localhost\n\
        # 192.0.2.9 commented.example\n\
        192.0.2.1   Mail.Example.org mail  # trailing\n\
        192.0.2.1   second.example.org\n\
        2001:db8::1 v6.example.org mail\n\
        fe80::1%eth0 link.example.org\n\
        garbage line\n";

    #[test]
    fn hosts_reverse_takes_the_first_canonical_name() {
        let addr = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            hosts_reverse(HOSTS, addr("192.0.2.1")).as_deref(),
            Some("Mail.Example.org")
        );
        assert_eq!(
            hosts_reverse(HOSTS, addr("::ffff:127.0.0.1")).as_deref(),
            Some("localhost")
        );
        assert_eq!(
            hosts_reverse(HOSTS, addr("fe80::1")).as_deref(),
            Some("link.example.org")
        );
        assert_eq!(hosts_reverse(HOSTS, addr("192.0.2.9")), None);
    }

    #[test]
    fn hosts_forward_matches_names_and_aliases() {
        let mail = hosts_forward(HOSTS, "MAIL");
        assert_eq!(
            mail,
            [
                "192.0.2.1".parse::<IpAddr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        assert_eq!(hosts_forward(HOSTS, "mail.example.org.").len(), 1);
        assert!(hosts_forward(HOSTS, "commented.example").is_empty());
    }

    /// A name server on a loopback port that answers UDP with `udp` and TCP with `tcp`
    /// (None: never answers), for one query each.
    fn server(udp: Option<fn(&Message) -> Message>, tcp: Option<fn(&Message) -> Message>) -> Dns {
        // The same port number for UDP and TCP: another process may hold the TCP port of a
        // free UDP one, so try a few ports.
        let (socket, listener) = (0..20)
            .find_map(|_| {
                let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
                let addr = socket.local_addr().unwrap();
                std::net::TcpListener::bind(addr).ok().map(|l| (socket, l))
            })
            .expect("no loopback port free for both UDP and TCP in 20 tries");
        let addr = socket.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0; 512];
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            let request = Message::from_vec(&buf[..n]).unwrap();
            // A stray datagram with another id must be ignored.
            let mut stray = request.clone().into_response();
            stray.metadata.id = request.metadata.id.wrapping_add(1);
            socket.send_to(&stray.to_vec().unwrap(), from).unwrap();
            match udp {
                Some(answer) => {
                    socket
                        .send_to(&answer(&request).to_vec().unwrap(), from)
                        .unwrap();
                }
                None => std::thread::sleep(Duration::from_secs(5)),
            }
        });
        std::thread::spawn(move || {
            let Some(answer) = tcp else { return };
            let (mut stream, _) = listener.accept().unwrap();
            let mut len = [0; 2];
            stream.read_exact(&mut len).unwrap();
            let mut buf = vec![0; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).unwrap();
            let reply = answer(&Message::from_vec(&buf).unwrap()).to_vec().unwrap();
            stream
                .write_all(&(reply.len() as u16).to_be_bytes())
                .unwrap();
            stream.write_all(&reply).unwrap();
        });
        Dns {
            servers: vec![addr],
            timeout: Duration::from_secs(30),
            attempts: 1,
        }
    }

    fn with_a(request: &Message, truncated: bool) -> Message {
        let mut reply = request.clone().into_response();
        reply.metadata.truncation = truncated;
        if !truncated {
            let name = request.queries[0].name().clone();
            for last in 1..=60 {
                let a = hickory_proto::rr::rdata::A(Ipv4Addr::new(192, 0, 2, last));
                reply.add_answer(Record::from_rdata(name.clone(), 60, RData::A(a)));
            }
        }
        reply
    }

    fn a_records(dns: &Dns, deadline: Instant) -> Result<Vec<IpAddr>, TimedOut> {
        let name = Name::from_ascii("big.example.test.").unwrap();
        let records = dns.query(name, RecordType::A, deadline)?;
        Ok(records.iter().filter_map(|r| r.data.ip_addr()).collect())
    }

    #[test]
    fn dns_query_asks_again_over_tcp_when_truncated() {
        let dns = server(Some(|m| with_a(m, true)), Some(|m| with_a(m, false)));
        let deadline = Instant::now() + Duration::from_secs(30);
        let addrs = a_records(&dns, deadline).unwrap();
        assert_eq!(addrs.len(), 60);
        assert!(addrs.contains(&"192.0.2.60".parse().unwrap()));
    }

    #[test]
    fn dns_query_takes_nxdomain_as_no_records() {
        let dns = server(
            Some(|m| {
                let mut reply = m.clone().into_response();
                reply.metadata.response_code = ResponseCode::NXDomain;
                reply
            }),
            None,
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        assert_eq!(a_records(&dns, deadline), Ok(Vec::new()));
    }

    #[test]
    fn dns_query_gives_up_at_the_deadline() {
        let dns = server(None, None);
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        assert_eq!(a_records(&dns, deadline), Err(TimedOut));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited past the deadline"
        );
    }

    /// Files in `dir` that name hosts from `HOSTS` only.
    fn files_in(dir: &Path) -> HostFiles {
        let files = HostFiles {
            nsswitch: dir.join("nsswitch.conf"),
            hosts: dir.join("hosts"),
            resolv: dir.join("resolv.conf"),
        };
        std::fs::write(&files.nsswitch, "hosts: files\n").unwrap();
        std::fs::write(&files.hosts, HOSTS).unwrap();
        files
    }

    #[test]
    fn host_files_follow_nsswitch_and_read_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(
            files.reverse(addr, deadline).unwrap().as_deref(),
            Some("Mail.Example.org")
        );
        assert_eq!(files.forward("mail.example.org", deadline).unwrap(), [addr]);
        assert!(
            files
                .forward("absent.example.org", deadline)
                .unwrap()
                .is_empty()
        );
        // Without files on the hosts: line, /etc/hosts is not read.
        std::fs::write(&files.nsswitch, "hosts: ldap\n").unwrap();
        assert_eq!(files.reverse(addr, deadline).unwrap(), None);
    }

    #[test]
    fn a_snapshot_reads_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let files = files_in(dir.path());
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr: IpAddr = "192.0.2.1".parse().unwrap();
        let snapshot = files.snapshot();
        assert!(snapshot.reverse(addr, deadline).unwrap().is_some());
        // The forward query of the same look-up sees the files as the reverse one did.
        std::fs::write(&files.hosts, "").unwrap();
        assert_eq!(
            snapshot.forward("mail.example.org", deadline).unwrap(),
            [addr]
        );
        // A new look-up reads them again.
        assert!(
            files
                .forward("mail.example.org", deadline)
                .unwrap()
                .is_empty()
        );
    }
}
