//! Client names through qmqpd's own resolver, never glibc's NSS: a one-shot qmqpd runs in a
//! mount, network and PID namespace of its own, with /etc/hosts, /etc/resolv.conf and
//! /etc/nsswitch.conf bind-mounted from the test and a real dnsmasq answering on the
//! namespace's loopback, under `strace` so that every file it opens is seen (no libnss_*).
//! Needs root, `unshare`, `ip`, `dnsmasq` and `strace`; skipped without them, except under
//! QMQPD_REQUIRE_INTEROP=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::{QueueFile, TestQueue, describe, request, run_bounded};

const LIMIT: Duration = Duration::from_secs(120);

/// What runs in the namespace: set up loopback and the files, start dnsmasq, wait until it
/// serves, run the command given as arguments. The namespace's PID 1 is this shell: when it
/// exits, or `unshare` is killed (--kill-child), the kernel ends dnsmasq too.
const SCRIPT: &str = r#"
set -eu
ip link set lo up
mount --bind "$D/hosts" /etc/hosts
mount --bind "$D/resolv.conf" /etc/resolv.conf
mount --bind "$D/nsswitch.conf" /etc/nsswitch.conf
# shellcheck disable=SC2086
dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
    --listen-address=127.0.0.1 --bind-interfaces --port=53 --user=root --pid-file= \
    --log-queries=extra --log-facility="$D/dnsmasq.log" $RECORDS </dev/null &
dnsmasq=$!
i=0
until grep -q started "$D/dnsmasq.log" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then echo "dnsmasq did not start" >&2; exit 97; fi
    sleep 0.1
done
status=0
"$@" || status=$?
# Stopped gently, dnsmasq writes out its log.
kill "$dnsmasq"
wait "$dnsmasq" || true
exit "$status"
"#;

/// The tools, or None when the test must be skipped.
struct Tools {
    strace: PathBuf,
}

fn tools() -> Option<Tools> {
    if !nix::unistd::geteuid().is_root() {
        let why = "needs root for namespaces and bind mounts";
        if std::env::var_os("QMQPD_REQUIRE_INTEROP").is_some_and(|v| v == "1") {
            panic!("QMQPD_REQUIRE_INTEROP=1: {why}");
        }
        eprintln!("skipped: {why}");
        return None;
    }
    common::require_tool("unshare")?;
    common::require_tool("ip")?;
    common::require_tool("dnsmasq")?;
    Some(Tools {
        strace: common::require_tool("strace")?,
    })
}

/// The name service of one run.
struct Names<'a> {
    nsswitch: &'a str,
    hosts: &'a str,
    /// dnsmasq options that define records (`--host-record=...`).
    records: &'a [String],
}

/// What one run showed.
struct Run {
    out: Output,
    log: String,
    /// strace's lines (openat, socket, connect) of qmqpd and every thread or child.
    trace: String,
    /// dnsmasq's log of the queries it answered.
    dnsmasq: String,
    file: Option<QueueFile>,
}

/// Runs a one-shot qmqpd for a client at `client` with name look-up on.
fn serve(tools: &Tools, names: &Names<'_>, client: &str) -> Run {
    let q = TestQueue::new();
    let dir = q.dir.path();
    std::fs::write(dir.join("nsswitch.conf"), names.nsswitch).unwrap();
    std::fs::write(dir.join("hosts"), names.hosts).unwrap();
    std::fs::write(
        dir.join("resolv.conf"),
        "nameserver 127.0.0.1\noptions timeout:5\n",
    )
    .unwrap();
    let trace = dir.join("strace");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--net",
        "--pid",
        "--fork",
        "--kill-child",
        "--mount-proc",
        "sh",
        "-c",
        SCRIPT,
        "sh",
    ])
    .arg(&tools.strace)
    .args(["-f", "-qq", "-e", "trace=openat,socket,connect", "-o"])
    .arg(&trace)
    .arg(common::qmqpd_bin())
    .args(q.args())
    .args(["-o", "qmqpd_peername_lookup=yes"])
    .args(["-o", "qmqpd_authorized_clients=192.0.2.0/24"])
    .env("D", dir)
    .env("RECORDS", names.records.join(" "))
    .env_remove("LISTEN_FDS")
    .env_remove("LISTEN_PID")
    .env_remove("MAIL_CONFIG")
    .env_remove("TCPREMOTEHOST")
    .env("PROTO", "TCP")
    .env("TCPREMOTEIP", client)
    .env("TCPREMOTEPORT", "40000");
    let out = run_bounded(
        &mut cmd,
        &request(b"Subject: x\n\nhi\n", b"s@x", &[b"r@x"]),
        LIMIT,
    );
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    let dnsmasq = read(&dir.join("dnsmasq.log"));
    let file = q.files("new").first().map(|p| QueueFile::read(p));
    let run = Run {
        log: q.log_text(),
        trace: read(&trace),
        dnsmasq,
        out,
        file,
    };
    assert!(
        run.file.is_some(),
        "no message queued: {}\nlog: {}\ndnsmasq: {}",
        describe(&run.out),
        run.log,
        run.dnsmasq
    );
    run
}

fn host_record(name: &str, addrs: &[String]) -> String {
    format!("--host-record={name},{}", addrs.join(","))
}

impl Run {
    /// The client name qmqpd settled on, from the queue file.
    fn client_name(&self) -> String {
        let file = self.file.as_ref().unwrap();
        file.attribute("client_name").unwrap_or("").to_owned()
    }

    fn assert_no_nss(&self) {
        assert!(!self.trace.is_empty(), "strace wrote nothing");
        assert!(
            !self.trace.contains("libnss_") && !self.trace.contains("nscd"),
            "qmqpd used glibc's NSS:\n{}",
            self.trace
        );
    }
}

const FILES_DNS: &str = "passwd: files\nhosts: files mdns4_minimal [NOTFOUND=return] dns\n";

#[test]
fn dns_names_the_client_without_nss() {
    let Some(tools) = tools() else { return };
    let names = Names {
        nsswitch: FILES_DNS,
        hosts: "127.0.0.1 localhost\n",
        records: &[host_record("mail.example.test", &["192.0.2.7".into()])],
    };
    let run = serve(&tools, &names, "192.0.2.7");
    assert_eq!(run.client_name(), "mail.example.test", "{}", run.log);
    assert!(
        run.log
            .contains("connect from mail.example.test[192.0.2.7]"),
        "{}",
        run.log
    );
    run.assert_no_nss();
    assert!(
        run.trace.contains("/etc/hosts"),
        "files come first: {}",
        run.trace
    );
    assert!(
        run.trace.contains("SOCK_DGRAM"),
        "no UDP query: {}",
        run.trace
    );
}

#[test]
fn nsswitch_order_decides_between_hosts_and_dns() {
    let Some(tools) = tools() else { return };
    let hosts = "127.0.0.1 localhost\n192.0.2.8 files.example.test\n";
    let records = [host_record("dns.example.test", &["192.0.2.8".into()])];
    let files_first = Names {
        nsswitch: FILES_DNS,
        hosts,
        records: &records,
    };
    let run = serve(&tools, &files_first, "192.0.2.8");
    assert_eq!(run.client_name(), "files.example.test", "{}", run.log);
    assert!(
        !run.trace.contains("SOCK_DGRAM"),
        "DNS asked though files knew: {}",
        run.trace
    );
    let dns_first = Names {
        nsswitch: "hosts: dns files\n",
        hosts,
        records: &records,
    };
    let run = serve(&tools, &dns_first, "192.0.2.8");
    assert_eq!(run.client_name(), "dns.example.test", "{}", run.log);
    run.assert_no_nss();
}

#[test]
fn truncated_dns_reply_is_asked_again_over_tcp() {
    let Some(tools) = tools() else { return };
    // 60 A records do not fit a 512-byte UDP reply.
    let records: Vec<String> = (1..=60)
        .map(|n| host_record("big.example.test", &[format!("192.0.2.{n}")]))
        .collect();
    let names = Names {
        nsswitch: "hosts: dns\n",
        hosts: "",
        records: &records,
    };
    let run = serve(&tools, &names, "192.0.2.60");
    assert_eq!(run.client_name(), "big.example.test", "{}", run.log);
    assert!(
        run.trace.contains("SOCK_STREAM"),
        "no TCP query: {}",
        run.trace
    );
    run.assert_no_nss();
}

#[test]
fn dns_name_that_does_not_point_back_is_not_used() {
    let Some(tools) = tools() else { return };
    let names = Names {
        nsswitch: "hosts: dns\n",
        hosts: "",
        records: &[
            "--ptr-record=9.2.0.192.in-addr.arpa,liar.example.test".to_owned(),
            host_record("liar.example.test", &["192.0.2.99".into()]),
        ],
    };
    let run = serve(&tools, &names, "192.0.2.9");
    assert!(
        run.log.contains("connect from unknown[192.0.2.9]"),
        "{}",
        run.log
    );
    assert!(
        run.log
            .contains("host name liar.example.test does not resolve to address 192.0.2.9"),
        "{}",
        run.log
    );
    run.assert_no_nss();
}

/// The binary the tests run names none of glibc's NSS entry points: no path can reach them.
#[test]
fn qmqpd_links_no_nss_function() {
    let Some(nm) = common::require_tool("nm") else {
        return;
    };
    let out = Command::new(nm)
        .args(["--dynamic", "--undefined-only"])
        .arg(common::qmqpd_bin())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let symbols = String::from_utf8_lossy(&out.stdout);
    let nss: Vec<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| {
            let s = s.split('@').next().unwrap_or(s);
            [
                "getaddrinfo",
                "getnameinfo",
                "gethostbyname",
                "gethostbyaddr",
                "getpwnam",
                "getpwuid",
                "getgrnam",
                "getgrgid",
                "getgrouplist",
                "initgroups",
                "getservbyname",
            ]
            .iter()
            .any(|f| s.starts_with(f))
        })
        .collect();
    assert!(nss.is_empty(), "qmqpd links {nss:?}");
}
