//! Several qmqpd hosts behind HAProxy, for real, in network namespaces the test makes (as
//! docs/scaling.md describes, with the HAProxy configuration of docs/haproxy.cfg).
//!
//! Six namespaces, `qcl-<pid>-*`: `lb` holds a bridge (192.0.2.10/24) and HAProxy; `h1`..`h3`
//! (192.0.2.1-3; every namespace also has 2001:db8::N) each run `qmqpd --listen :628` on a queue of their own, with
//! `qmqpd_upstream_proxy_protocol = haproxy` and the agent check on :8628, as user `nobody`;
//! `ca` (192.0.2.50, the one authorized client) and `cd` (192.0.2.60, denied) run Postfix's
//! qmqp-source and qmqpc against HAProxy (192.0.2.10:628, `send-proxy-v2`, `balance
//! leastconn`, health and agent checks). The test shows, in order: the hosts see the real
//! client addresses; load spreads over the three hosts; a host killed with SIGKILL in the
//! middle of a load loses nothing that got `K` and HAProxy takes it out; restarted, it comes
//! back; a host whose queue is not writable, and one short of free space, are taken out by
//! the agent check while mail goes to the others; finally `qmqp-queue deliver --relay` of
//! every host's queue brings all of it into one private Postfix.
//!
//! Root only (namespaces, Postfix): skipped with the reason otherwise, or failing under
//! `QMQPD_REQUIRE_INTEROP=1`. Every namespace (and so every veth and the bridge) and every
//! process is removed by Drop guards, also when an assertion fails.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::haproxy::Haproxy;
use common::postfix::{Entry, Postfix, postfix_package};
use common::{
    InteropTool, QueueFile, TestQueue, describe, interop_tool, qmqpc_bin, qmqpd_bin, require_tool,
    run_bounded, skip_or_fail, text,
};

/// A safety net for every child; never expected to be reached.
const LIMIT: Duration = Duration::from_secs(120);
/// How long HAProxy may take to see a change (checks every 500 ms, 2 to fall or rise).
const CHECK_LIMIT: Duration = Duration::from_secs(30);
const BALANCER: &str = "192.0.2.10";
/// The balancer's IPv6 address: every namespace also has 2001:db8::N, N as in 192.0.2.N.
const BALANCER6: &str = "2001:db8::10";
const HOSTS: [(&str, &str); 3] = [
    ("h1", "192.0.2.1"),
    ("h2", "192.0.2.2"),
    ("h3", "192.0.2.3"),
];
const ALLOWED: (&str, &str) = ("ca", "192.0.2.50");
const DENIED: (&str, &str) = ("cd", "192.0.2.60");
const SENDER: &str = "list@example.org";
const RECIPIENT: &str = "member@example.net";

/// The namespaces of one run; Drop deletes them, which removes their veths and the bridge.
/// Processes running in them must be gone first (their guards are dropped before this one).
struct Namespaces {
    prefix: String,
    made: Vec<String>,
}

impl Namespaces {
    fn name(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// `lb` with the bridge, and one namespace per host and client, each on a veth whose
    /// other end is a port of the bridge.
    fn build() -> Namespaces {
        let mut ns = Namespaces {
            prefix: format!("qcl-{}", std::process::id()),
            made: Vec::new(),
        };
        let lb = ns.name("lb");
        ip(&["netns", "add", &lb]);
        ns.made.push(lb.clone());
        ip_in(&lb, "link set lo up");
        ip_in(&lb, "link add br0 type bridge");
        ip_in(&lb, &format!("addr add {BALANCER}/24 dev br0"));
        // nodad: usable at once, not after duplicate address detection.
        ip_in(&lb, &format!("addr add {BALANCER6}/64 dev br0 nodad"));
        ip_in(&lb, "link set br0 up");
        for (short, addr) in HOSTS.iter().chain([&ALLOWED, &DENIED]) {
            let name = ns.name(short);
            ip(&["netns", "add", &name]);
            ns.made.push(name.clone());
            let port = format!("v{short}");
            ip(&[
                "link", "add", "eth0", "netns", &name, "type", "veth", "peer", "name", &port,
                "netns", &lb,
            ]);
            ip_in(&lb, &format!("link set {port} master br0 up"));
            ip_in(&name, &format!("addr add {addr}/24 dev eth0"));
            ip_in(
                &name,
                &format!("addr add {}/64 dev eth0 nodad", v6_of(addr)),
            );
            ip_in(&name, "link set eth0 up");
            ip_in(&name, "link set lo up");
        }
        ns
    }

    /// `ip netns exec NS PROGRAM`.
    fn exec(&self, short: &str, program: &Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name(short)]).arg(program);
        cmd
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in self.made.iter().rev() {
            let _ = Command::new("ip")
                .args(["netns", "del", name])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// 2001:db8::N for 192.0.2.N.
fn v6_of(addr: &str) -> String {
    let last = addr.rsplit('.').next().unwrap_or_default();
    format!("2001:db8::{last}")
}

/// Runs `ip -n NS WORDS...`; panics when it fails.
fn ip_in(netns: &str, words: &str) {
    let mut args = vec!["-n", netns];
    args.extend(words.split_whitespace());
    ip(&args);
}

/// Runs `ip ARGS`; panics when it fails.
fn ip(args: &[&str]) {
    let out = run_bounded(Command::new("ip").args(args), b"", LIMIT);
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        describe(&out)
    );
}

/// One host: its queue, and the qmqpd listener running in its namespace.
struct Host {
    short: &'static str,
    addr: &'static str,
    /// The QMQP port (628).
    port: u16,
    queue: TestQueue,
    child: Option<Child>,
}

impl Host {
    /// A queue that `nobody` (qmqpd's mail_owner here) can write.
    fn new(short: &'static str, addr: &'static str) -> Host {
        let queue = TestQueue::new();
        std::fs::set_permissions(queue.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod the test directory");
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("look up nobody")
            .expect("a user nobody");
        chown(queue.queue_dir(), Some(nobody.uid.as_raw()), None).expect("chown queue/");
        Host {
            short,
            addr,
            port: 628,
            queue,
            child: None,
        }
    }

    /// Starts `qmqpd --listen ADDR:PORT` in the host's namespace and waits until it listens.
    fn start(&mut self, ns: &Namespaces, extra: &[&str]) {
        self.stop();
        let listening = format!("listening on {}:{}", self.addr, self.port);
        let before = self.queue.log_text().matches(&listening).count();
        let agent = format!("qmqpd_agent_check_listen={}:8628", self.addr);
        let child = ns
            .exec(self.short, &qmqpd_bin())
            .args(["--listen", &format!("{}:{}", self.addr, self.port)])
            .args(self.queue.args())
            .args(["-o", "mail_owner=nobody", "-o", &agent])
            .args(["-o", "qmqpd_upstream_proxy_protocol=haproxy"])
            .args(["-o", &format!("qmqpd_upstream_proxy_clients={BALANCER}")])
            .args([
                "-o",
                &format!(
                    "qmqpd_authorized_clients={}, [{}]",
                    ALLOWED.1,
                    v6_of(ALLOWED.1)
                ),
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start qmqpd");
        self.child = Some(child);
        let deadline = Instant::now() + LIMIT;
        while self.queue.log_text().matches(&listening).count() == before {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait().expect("wait for qmqpd")
            {
                panic!(
                    "{}: qmqpd exited with {status}:\n{}",
                    self.short,
                    self.log()
                );
            }
            assert!(Instant::now() < deadline, "{}: not listening", self.short);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then reap.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        self.queue.log_text()
    }

    /// The queue IDs of the files in new/, each read whole (a torn file panics).
    fn queued(&self) -> BTreeSet<String> {
        self.queue
            .files("new")
            .iter()
            .map(|path| {
                let file = QueueFile::read(path);
                assert_eq!(file.sender, SENDER.as_bytes(), "{}", path.display());
                file.attribute("queue_id").expect("queue_id").to_owned()
            })
            .collect()
    }

    /// new/ and tmp/ of the queue: made unwritable for `nobody`, or writable again.
    fn set_writable(&self, writable: bool) {
        let mode = if writable { 0o700 } else { 0o500 };
        for sub in ["new", "tmp"] {
            std::fs::set_permissions(
                self.queue.queue_dir().join(sub),
                std::fs::Permissions::from_mode(mode),
            )
            .expect("chmod a queue directory");
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What one qmqpc run through the balancer came to.
#[derive(Debug)]
struct Sent {
    /// The message's number (in its Subject:).
    n: usize,
    code: Option<i32>,
    /// The queue ID of a `K` reply.
    queue_id: Option<String>,
    output: String,
}

/// Sends message `n` with qmqpc from client namespace `client` through the balancer.
fn qmqpc(ns: &Namespaces, client: &str, n: usize) -> Sent {
    qmqpc_to(ns, client, &format!("{BALANCER}:628"), n)
}

/// Sends message `n` with qmqpc from client namespace `client` to `target`.
fn qmqpc_to(ns: &Namespaces, client: &str, target: &str, n: usize) -> Sent {
    let out = run_bounded(
        ns.exec(client, &qmqpc_bin())
            .args(["-t", "60", "-s", target, "-f", SENDER, RECIPIENT]),
        format!("Subject: cluster message {n}\n\nbody {n}\n").as_bytes(),
        LIMIT,
    );
    let stdout = text(&out.stdout);
    let queue_id = (out.status.code() == Some(0))
        .then(|| {
            stdout
                .split("queued as ")
                .nth(1)
                .map(|rest| rest.trim().trim_end_matches(',').to_owned())
        })
        .flatten();
    Sent {
        n,
        code: out.status.code(),
        queue_id,
        output: describe(&out),
    }
}

/// Runs Postfix's qmqp-source from the allowed client: `count` messages over `sessions`
/// connections at once; it exits 0 only when every reply was `K`.
fn qmqp_source(ns: &Namespaces, tool: &InteropTool, count: usize, sessions: usize) -> Output {
    qmqp_source_to(ns, tool, &format!("{BALANCER}:628"), count, sessions)
}

/// qmqp-source from the allowed client to `target` (address:port).
fn qmqp_source_to(
    ns: &Namespaces,
    tool: &InteropTool,
    target: &str,
    count: usize,
    sessions: usize,
) -> Output {
    let mut cmd = ns.exec(ALLOWED.0, Path::new("env"));
    cmd.arg(format!(
        "LD_LIBRARY_PATH={}",
        tool.root.join("usr/lib/postfix").display()
    ))
    .arg(&tool.path)
    .args([
        "-s",
        &sessions.to_string(),
        "-m",
        &count.to_string(),
        "-l",
        "1024",
    ])
    .args(["-f", SENDER, "-t", RECIPIENT, target]);
    run_bounded(&mut cmd, b"", LIMIT)
}

/// new/ counts of every host.
fn counts(hosts: &[Host]) -> Vec<usize> {
    hosts.iter().map(|h| h.queue.files("new").len()).collect()
}

/// The HAProxy configuration the test runs: docs/haproxy.cfg with the test's addresses.
fn haproxy_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/haproxy.cfg");
    let doc = std::fs::read_to_string(&path).expect("read docs/haproxy.cfg");
    // The proxies only: the test supplies its own `global` section (admin socket, logs).
    let proxies = doc
        .split_once("\ndefaults")
        .map(|(_, rest)| format!("defaults{rest}"))
        .expect("docs/haproxy.cfg has a defaults section");
    assert!(
        proxies.contains("192.0.2.1:628"),
        "docs/haproxy.cfg changed"
    );
    proxies
}

#[test]
fn cluster_behind_haproxy_keeps_clients_and_mail() {
    if !nix::unistd::geteuid().is_root() {
        skip_or_fail::<()>("not root: the test makes network namespaces and runs Postfix");
        return;
    }
    let (Some(_), Some(_), Some(source), Some(package)) = (
        require_tool("ip"),
        require_tool("haproxy"),
        interop_tool("QMQPD_POSTFIX_ROOT", "usr/sbin/qmqp-source"),
        postfix_package(),
    ) else {
        return;
    };
    let started = Instant::now();
    // Dropped last: the processes below go first.
    let ns = Namespaces::build();
    let mut hosts: Vec<Host> = HOSTS.iter().map(|(s, a)| Host::new(s, a)).collect();
    for host in &mut hosts {
        host.start(&ns, &[]);
    }
    let haproxy =
        Haproxy::start(&haproxy_config(), Some(&ns.name("lb"))).expect("haproxy was found");
    for (short, _) in HOSTS {
        haproxy.wait_status("qmqp_hosts", short, "UP", CHECK_LIMIT);
    }
    let mut k_replies = 0usize;

    // 1. The hosts see the real clients: the allowed one queues, the denied one is told so
    //    under its own address.
    let sent = qmqpc(&ns, ALLOWED.0, 0);
    assert!(sent.queue_id.is_some(), "{}", sent.output);
    k_replies += 1;
    let denied = qmqpc(&ns, DENIED.0, 1);
    assert_eq!(denied.code, Some(65), "{}", denied.output);
    assert!(
        denied
            .output
            .contains("unknown[192.0.2.60] is not authorized to use this service"),
        "{}",
        denied.output
    );
    //    Over IPv6 too: HAProxy's v2 header then carries an IPv6 client.
    let sent6 = qmqpc_to(&ns, ALLOWED.0, &format!("[{BALANCER6}]:628"), 2);
    assert!(sent6.queue_id.is_some(), "{}", sent6.output);
    k_replies += 1;
    let denied6 = qmqpc_to(&ns, DENIED.0, &format!("[{BALANCER6}]:628"), 3);
    assert_eq!(denied6.code, Some(65), "{}", denied6.output);
    assert!(
        denied6
            .output
            .contains("unknown[2001:db8::60] is not authorized"),
        "{}",
        denied6.output
    );
    let logs: String = hosts.iter().map(Host::log).collect();
    assert!(
        logs.contains("connect from unknown[2001:db8::50]"),
        "{logs}"
    );
    assert!(logs.contains("connect from unknown[192.0.2.50]"), "{logs}");
    assert!(logs.contains("connect from unknown[192.0.2.60]"), "{logs}");
    let mut clients: Vec<String> = hosts
        .iter()
        .flat_map(|h| h.queue.files("new"))
        .map(|p| {
            let file = QueueFile::read(&p);
            file.attribute("client_address")
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    clients.sort();
    assert_eq!(clients, [ALLOWED.1.to_owned(), v6_of(ALLOWED.1)]);

    // 2. leastconn spreads concurrent sessions over the three hosts.
    let before = counts(&hosts);
    let out = qmqp_source(&ns, &source, 60, 6);
    assert!(out.status.success(), "qmqp-source: {}", describe(&out));
    k_replies += 60;
    let after = counts(&hosts);
    for (i, host) in hosts.iter().enumerate() {
        assert!(
            after[i] > before[i],
            "{} got none of the load: {before:?} -> {after:?}",
            host.short
        );
    }

    // 3. h2 killed in the middle of a load: whatever got K is in exactly one host's new/;
    //    clients see K or a temporary failure; HAProxy takes h2 out.
    let done = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    thread::scope(|scope| {
        for worker in 0..4 {
            let (ns, done, results) = (&ns, &done, &results);
            scope.spawn(move || {
                for i in 0..30 {
                    let sent = qmqpc(ns, ALLOWED.0, 1000 + worker * 100 + i);
                    done.fetch_add(1, Ordering::SeqCst);
                    results.lock().unwrap().push(sent);
                }
            });
        }
        let deadline = Instant::now() + LIMIT;
        while done.load(Ordering::SeqCst) < 30 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        hosts[1].stop();
    });
    let results = results.into_inner().unwrap();
    let mut acked = BTreeSet::new();
    let mut failed = BTreeSet::new();
    for sent in &results {
        match (sent.code, &sent.queue_id) {
            (Some(0), Some(id)) => assert!(acked.insert(id.clone()), "K twice for {id}"),
            (Some(75), None) => assert!(failed.insert(sent.n)),
            _ => panic!("neither K nor a temporary failure: {sent:?}"),
        }
    }
    k_replies += acked.len();
    haproxy.wait_status("qmqp_hosts", "h2", "DOWN", CHECK_LIMIT);
    let queued: Vec<BTreeSet<String>> = hosts.iter().map(Host::queued).collect();
    for id in &acked {
        let holders = queued.iter().filter(|q| q.contains(id)).count();
        assert_eq!(holders, 1, "{id} (acknowledged) is in {holders} queues");
    }
    // A message queued without a K: the host died between committing it and replying. Its
    // client saw a temporary failure (and would send it again: at least once, never lost).
    let mut unacked = 0;
    for host in &hosts {
        for path in host.queue.files("new") {
            let file = QueueFile::read(&path);
            let id = file.attribute("queue_id").expect("queue_id");
            let number = text(&file.message)
                .split("Subject: cluster message ")
                .nth(1)
                .and_then(|rest| rest.split('\n').next()?.parse::<usize>().ok());
            if let Some(n) = number.filter(|n| *n >= 1000)
                && !acked.contains(id)
            {
                assert!(
                    failed.contains(&n),
                    "message {n} queued as {id} without a K"
                );
                unacked += 1;
            }
        }
    }
    eprintln!(
        "kill phase: {} K, {} temporary failures, {unacked} of them queued, new/ counts {:?}",
        acked.len(),
        failed.len(),
        counts(&hosts)
    );

    // 4. h2 restarted comes back into rotation and gets mail again.
    hosts[1].start(&ns, &[]);
    haproxy.wait_status("qmqp_hosts", "h2", "UP", CHECK_LIMIT);
    let before = counts(&hosts);
    let out = qmqp_source(&ns, &source, 30, 6);
    assert!(out.status.success(), "qmqp-source: {}", describe(&out));
    k_replies += 30;
    assert!(
        counts(&hosts)[1] > before[1],
        "h2 got no mail after its restart"
    );

    // 5. The agent check: h3's queue not writable -> down; mail goes to h1 and h2.
    hosts[2].set_writable(false);
    haproxy.wait_status("qmqp_hosts", "h3", "DOWN", CHECK_LIMIT);
    let before = counts(&hosts);
    let out = qmqp_source(&ns, &source, 20, 4);
    assert!(out.status.success(), "qmqp-source: {}", describe(&out));
    k_replies += 20;
    assert_eq!(counts(&hosts)[2], before[2], "h3 got mail while down");
    hosts[2].set_writable(true);
    haproxy.wait_status("qmqp_hosts", "h3", "UP", CHECK_LIMIT);
    //    ... and h3 short of free space (a threshold above what any disk has) -> drain.
    hosts[2].start(
        &ns,
        &["-o", "qmqpd_agent_check_minfree=18446744073709551615"],
    );
    haproxy.wait_status("qmqp_hosts", "h3", "DRAIN", CHECK_LIMIT);
    let before = counts(&hosts);
    let out = qmqp_source(&ns, &source, 20, 4);
    assert!(out.status.success(), "qmqp-source: {}", describe(&out));
    k_replies += 20;
    assert_eq!(counts(&hosts)[2], before[2], "h3 got mail while draining");
    assert!(
        hosts[2].log().contains("agent check: drain: "),
        "{}",
        hosts[2].log()
    );

    // 6. Every host's queue relayed into one Postfix: as many messages there as new/ held,
    //    which is every K plus what the killed host committed without acknowledging it.
    for host in &mut hosts {
        host.stop();
    }
    drop(haproxy);
    let held: BTreeMap<&str, usize> = hosts
        .iter()
        .map(|h| (h.short, h.queue.files("new").len()))
        .collect();
    let in_queues: usize = held.values().sum();
    assert_eq!(
        in_queues,
        k_replies + unacked,
        "{in_queues} messages queued for {k_replies} K replies and {unacked} unacknowledged"
    );
    let postfix = Postfix::start(&package, Entry::Qmqpd);
    let port = postfix.port.expect("Postfix's qmqpd port");
    for host in &hosts {
        let out = run_bounded(
            Command::new(env!("CARGO_BIN_EXE_qmqp-queue"))
                .args(host.queue.args())
                .args(["deliver", "--once", "--relay", &format!("127.0.0.1:{port}")])
                .env_remove("MAIL_CONFIG"),
            b"",
            LIMIT,
        );
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}: {}\n{}",
            host.short,
            describe(&out),
            host.log()
        );
        assert!(
            host.queue.files("new").is_empty(),
            "{} not drained",
            host.short
        );
    }
    let in_postfix = postfix.files("incoming").len();
    assert_eq!(
        in_postfix,
        in_queues,
        "Postfix holds {in_postfix} messages, the hosts held {in_queues}\n{}",
        postfix.logs()
    );
    eprintln!(
        "cluster: {k_replies} K replies, {in_queues} queued ({unacked} committed but \
         unacknowledged by the killed host), {in_postfix} in Postfix, queued per host \
         {held:?}, in {:?}",
        started.elapsed()
    );
}

/// Messages a second through HAProxy with 1, 2 and 3 hosts in rotation (the others in
/// maintenance), for docs/scaling.md: `benches/cluster` runs it in release mode. Not a
/// test of speed (nothing is asserted about it); ignored by the ordinary run.
#[test]
#[ignore = "a measurement: benches/cluster runs it"]
fn cluster_throughput_with_one_two_three_hosts() {
    if !nix::unistd::geteuid().is_root() {
        skip_or_fail::<()>("not root: the measurement makes network namespaces");
        return;
    }
    let (Some(_), Some(_), Some(source)) = (
        require_tool("ip"),
        require_tool("haproxy"),
        interop_tool("QMQPD_POSTFIX_ROOT", "usr/sbin/qmqp-source"),
    ) else {
        return;
    };
    let env_number = |name: &str, default: usize| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let messages = env_number("QMQPD_CLUSTER_MESSAGES", 2000);
    let sessions = env_number("QMQPD_CLUSTER_SESSIONS", 12);
    let runs = env_number("QMQPD_CLUSTER_RUNS", 3);
    let ns = Namespaces::build();
    let mut hosts: Vec<Host> = HOSTS.iter().map(|(s, a)| Host::new(s, a)).collect();
    for host in &mut hosts {
        host.start(&ns, &["-o", "default_process_limit=200"]);
    }
    // The baseline: a qmqpd of its own on h1, reached without HAProxy and without PROXY.
    let mut direct = Host::new(HOSTS[0].0, HOSTS[0].1);
    direct.port = 6280;
    direct.start(
        &ns,
        &[
            "-o",
            "qmqpd_upstream_proxy_protocol=",
            "-o",
            "qmqpd_agent_check_listen=",
            "-o",
            "default_process_limit=200",
        ],
    );
    let haproxy =
        Haproxy::start(&haproxy_config(), Some(&ns.name("lb"))).expect("haproxy was found");
    // Configurations: 0 = direct, n = n hosts in HAProxy's rotation. The runs go round the
    // configurations, so that a change in the machine's load touches each alike.
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); HOSTS.len() + 1];
    for _ in 0..runs {
        for (config, samples) in rates.iter_mut().enumerate() {
            let target = if config == 0 {
                format!("{}:{}", direct.addr, direct.port)
            } else {
                for (i, (short, _)) in HOSTS.iter().enumerate() {
                    let (verb, want) = if i < config {
                        ("enable", "UP")
                    } else {
                        ("disable", "MAINT")
                    };
                    haproxy.admin(&format!("{verb} server qmqp_hosts/{short}"));
                    haproxy.wait_status("qmqp_hosts", short, want, CHECK_LIMIT);
                }
                format!("{BALANCER}:628")
            };
            let started = Instant::now();
            let out = qmqp_source_to(&ns, &source, &target, messages, sessions);
            let elapsed = started.elapsed().as_secs_f64();
            assert!(out.status.success(), "qmqp-source: {}", describe(&out));
            samples.push(messages as f64 / elapsed);
        }
    }
    // A line of its own: the test harness's "test NAME ... " precedes the first one.
    println!();
    println!("| hosts | messages/s (median of {runs}) | runs |");
    println!("|---|---:|---|");
    for (config, samples) in rates.iter_mut().enumerate() {
        let shown: Vec<String> = samples.iter().map(|r| format!("{r:.0}")).collect();
        samples.sort_by(f64::total_cmp);
        let what = if config == 0 {
            "1, direct (no HAProxy, no PROXY header)".to_owned()
        } else {
            format!("{config}, through HAProxy")
        };
        println!(
            "| {what} | {:.0} | {} |",
            samples[samples.len() / 2],
            shown.join(", ")
        );
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "({messages} messages of 1 KiB a run, {sessions} qmqp-source sessions; new/ per host \
         {:?}; load average at the end {})",
        counts(&hosts),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
