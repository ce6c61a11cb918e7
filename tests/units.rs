//! The deployment files in `systemd/` checked offline (issue 3): `systemd-analyze verify`
//! must be silent on copies whose `ExecStart=` runs the built qmqpd, `systemd-analyze
//! security` must rate both services at an exposure of 2.0 or better, the sysusers.d and
//! tmpfiles.d snippets must create the user and the queue, and the settings that keep the
//! client connection clean (nothing but the reply on it) must be there. A missing systemd tool skips a
//! test with the reason, or fails it under QMQPD_REQUIRE_INTEROP=1.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{describe, qmqpd_bin, require_tool, run_bounded};

/// Safety net for one systemd tool run.
const RUN_LIMIT: Duration = Duration::from_secs(120);
/// The unit files, as shipped.
const UNITS: [&str; 4] = [
    "qmqpd.socket",
    "qmqpd@.service",
    "qmqpd-listener.socket",
    "qmqpd-listener.service",
];
/// Where the units say qmqpd is installed.
const INSTALLED_QMQPD: &str = "/usr/sbin/qmqpd";
/// `systemd-analyze security --threshold`: exposure 2.0 on its 0-100 scale.
const EXPOSURE_THRESHOLD: &str = "20";

/// The shipped file `name` from systemd/.
fn shipped(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("systemd")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The values of `key=` in a unit file, in order (comments skipped, no section tracking:
/// every key this file asks about appears in one section only).
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#') && !line.starts_with(';'))
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

/// The single value of `key=` in `name`; panics when it is missing or repeated.
fn value(name: &str, key: &str) -> String {
    let found = values(&shipped(name), key);
    match found.as_slice() {
        [one] => one.clone(),
        _ => panic!("{name}: expected one {key}=, found {found:?}"),
    }
}

/// The words of the `ExecStart=` of `name`.
fn exec_start(name: &str) -> Vec<String> {
    value(name, "ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// Copies every unit into a fresh directory with `ExecStart=` pointing at the built qmqpd
/// (verify fails when the binary does not exist).
fn units_for_built_qmqpd() -> (tempfile::TempDir, Vec<PathBuf>) {
    let dir = tempfile::Builder::new()
        .prefix("qmqpd-units.")
        .tempdir()
        .unwrap();
    let built = format!("ExecStart={}", qmqpd_bin().display());
    let mut paths = Vec::new();
    for name in UNITS {
        let text = shipped(name);
        let mut rewritten = String::new();
        let mut exec_starts = 0;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&format!("ExecStart={INSTALLED_QMQPD}")) {
                exec_starts += 1;
                rewritten.push_str(&built);
                rewritten.push_str(rest);
            } else {
                rewritten.push_str(line);
            }
            rewritten.push('\n');
        }
        let want = usize::from(name.ends_with(".service"));
        assert_eq!(
            exec_starts, want,
            "{name}: expected {want} ExecStart={INSTALLED_QMQPD}..."
        );
        let path = dir.path().join(name);
        std::fs::write(&path, rewritten).unwrap();
        paths.push(path);
    }
    (dir, paths)
}

#[test]
fn units_pass_systemd_analyze_verify_silently() {
    let Some(analyze) = require_tool("systemd-analyze") else {
        return;
    };
    let (_dir, paths) = units_for_built_qmqpd();
    let output = run_bounded(
        Command::new(&analyze)
            .arg("verify")
            .arg("--man=no")
            .args(&paths),
        b"",
        RUN_LIMIT,
    );
    // Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "systemd-analyze verify is not silent: {}",
        describe(&output)
    );
}

#[test]
fn services_pass_systemd_analyze_security_at_exposure_2() {
    let Some(analyze) = require_tool("systemd-analyze") else {
        return;
    };
    let (_dir, paths) = units_for_built_qmqpd();
    let services = paths
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "service"));
    let mut checked = 0;
    for path in services {
        checked += 1;
        let output = run_bounded(
            Command::new(&analyze)
                .arg("security")
                .arg("--offline=true")
                .arg(format!("--threshold={EXPOSURE_THRESHOLD}"))
                .arg("--no-pager")
                .arg(path),
            b"",
            RUN_LIMIT,
        );
        let text = common::text(&output.stdout);
        let overall = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .unwrap_or("(no overall exposure line)");
        assert!(
            output.status.success(),
            "{}: exposure above 2.0: {overall}\n{}",
            path.display(),
            describe(&output)
        );
    }
    assert_eq!(checked, 2, "expected two services");
}

#[test]
fn per_connection_service_keeps_stderr_off_the_connection() {
    // Accept=yes + StandardInput=socket makes stdout the connection, and stderr too unless
    // StandardError= says otherwise: logs must never reach the client.
    assert_eq!(value("qmqpd.socket", "Accept"), "yes");
    assert_eq!(value("qmqpd@.service", "StandardInput"), "socket");
    assert_eq!(value("qmqpd@.service", "StandardOutput"), "socket");
    assert_eq!(value("qmqpd@.service", "StandardError"), "journal");
    assert!(!value("qmqpd@.service", "RuntimeMaxSec").is_empty());
}

#[test]
fn listener_service_is_type_notify_on_an_accept_no_socket() {
    assert_eq!(value("qmqpd-listener.socket", "Accept"), "no");
    assert_eq!(value("qmqpd-listener.service", "Type"), "notify");
    assert_eq!(
        value("qmqpd-listener.service", "Requires"),
        "qmqpd-listener.socket"
    );
    // The two sockets bind the same port: starting one stops the other, the stop first
    // (the ordering), and the listener's side alone declares both, so that it wins when
    // both are enabled (tests/systemd.rs boots them).
    assert_eq!(value("qmqpd-listener.socket", "Conflicts"), "qmqpd.socket");
    assert_eq!(value("qmqpd-listener.socket", "After"), "qmqpd.socket");
    assert!(values(&shipped("qmqpd.socket"), "Conflicts").is_empty());
    assert!(values(&shipped("qmqpd.socket"), "After").is_empty());
    // Every max_use or max_idle exit is a start: no start limit; a failed start is retried
    // after a pause instead of at once (issue 15).
    assert_eq!(
        value("qmqpd-listener.service", "StartLimitIntervalSec"),
        "0"
    );
    assert_eq!(value("qmqpd-listener.service", "Restart"), "on-failure");
    assert_eq!(value("qmqpd-listener.service", "RestartSec"), "5s");
}

#[test]
fn services_run_as_qmqpd_with_only_the_queue_writable() {
    for service in ["qmqpd@.service", "qmqpd-listener.service"] {
        assert_eq!(value(service, "User"), "qmqpd", "{service}");
        assert_eq!(value(service, "Group"), "qmqpd", "{service}");
        assert_eq!(value(service, "ProtectSystem"), "strict", "{service}");
        assert_eq!(
            value(service, "ReadWritePaths"),
            "/var/spool/qmqpd",
            "{service}"
        );
        assert_eq!(value(service, "CapabilityBoundingSet"), "", "{service}");
        assert_eq!(exec_start(service)[0], INSTALLED_QMQPD, "{service}");
        assert!(
            values(&shipped(service), "DynamicUser").is_empty(),
            "{service}: DynamicUser= would give every Accept=yes instance its own uid"
        );
    }
}

/// The `-o name=value` arguments of an ExecStart= line, as a map.
fn overrides(words: &[String]) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut words = words.iter().skip(1);
    while let Some(word) = words.next() {
        assert_eq!(word, "-o", "only -o options expected, got {word:?}");
        let setting = words.next().expect("-o without a value");
        let (name, val) = setting.split_once('=').expect("-o without =");
        found.push((name.to_owned(), val.to_owned()));
    }
    found
}

#[test]
fn listener_max_use_outlasts_the_socket_trigger_limit() {
    // Each start of the listener is one activation of the socket; past TriggerLimitBurst
    // starts in TriggerLimitIntervalSec the socket fails for good. max_use connections per
    // start must make that take a burst no QMQP sender produces (10000 connections/s).
    let settings = overrides(&exec_start("qmqpd-listener.service"));
    let max_use: u64 = settings
        .iter()
        .find(|(n, _)| n == "max_use")
        .map(|(_, v)| v.parse().expect("max_use is a number"))
        .expect("qmqpd-listener.service sets max_use");
    let burst: u64 = value("qmqpd-listener.socket", "TriggerLimitBurst")
        .parse()
        .unwrap();
    let interval = value("qmqpd-listener.socket", "TriggerLimitIntervalSec");
    let seconds: u64 = interval
        .strip_suffix('s')
        .and_then(|s| s.parse().ok())
        .expect("TriggerLimitIntervalSec in whole seconds");
    assert!(
        max_use * burst >= 10_000 * seconds,
        "max_use {max_use} x TriggerLimitBurst {burst} per {seconds}s is too few connections"
    );
    assert!(settings.iter().any(|(n, _)| n == "max_idle"));
}

#[test]
fn exec_start_options_are_known_to_qmqpd() {
    let empty_config = tempfile::Builder::new()
        .prefix("qmqpd-units.")
        .tempdir()
        .unwrap();
    std::fs::write(empty_config.path().join("main.cf"), b"").unwrap();
    for service in ["qmqpd@.service", "qmqpd-listener.service"] {
        let words = exec_start(service);
        let output = run_bounded(
            Command::new(qmqpd_bin())
                .arg("-c")
                .arg(empty_config.path())
                .args(&words[1..])
                .arg("-n"),
            b"",
            RUN_LIMIT,
        );
        assert!(output.status.success(), "{service}: {}", describe(&output));
        // An unknown parameter would be a warning on stderr.
        assert!(output.stderr.is_empty(), "{service}: {}", describe(&output));
        let printed = common::text(&output.stdout);
        for (name, val) in overrides(&words) {
            let line = format!("{name} = {val}");
            assert!(
                printed.lines().any(|l| l == line),
                "{service}: qmqpd -n does not print {line:?}:\n{printed}"
            );
        }
    }
}

#[test]
fn sysusers_and_tmpfiles_create_the_user_and_the_queue() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: systemd-tmpfiles can give the queue to qmqpd only as root");
        return;
    }
    let (Some(sysusers), Some(tmpfiles)) = (
        require_tool("systemd-sysusers"),
        require_tool("systemd-tmpfiles"),
    ) else {
        return;
    };
    // An empty root with the snippets where a package installs them.
    let root = tempfile::Builder::new()
        .prefix("qmqpd-root.")
        .tempdir()
        .unwrap();
    let r = root.path();
    for (dir, snippet) in [
        ("usr/lib/sysusers.d", "qmqpd.sysusers"),
        ("usr/lib/tmpfiles.d", "qmqpd.tmpfiles"),
    ] {
        std::fs::create_dir_all(r.join(dir)).unwrap();
        std::fs::write(r.join(dir).join("qmqpd.conf"), shipped(snippet)).unwrap();
    }
    std::fs::create_dir_all(r.join("etc")).unwrap();
    let output = run_bounded(
        Command::new(&sysusers).arg(format!("--root={}", r.display())),
        b"",
        RUN_LIMIT,
    );
    assert!(output.status.success(), "{}", describe(&output));
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let entry = passwd
        .lines()
        .find(|l| l.starts_with("qmqpd:"))
        .unwrap_or_else(|| panic!("no qmqpd in passwd:\n{passwd}"));
    let fields: Vec<&str> = entry.split(':').collect();
    let uid: u32 = fields[2].parse().unwrap();
    let gid: u32 = fields[3].parse().unwrap();
    assert!(uid > 0 && uid < 1000, "not a system uid: {entry}");
    assert_eq!(fields[6], "/usr/sbin/nologin", "{entry}");

    let output = run_bounded(
        Command::new(&tmpfiles)
            .arg(format!("--root={}", r.display()))
            .arg("--create"),
        b"",
        RUN_LIMIT,
    );
    assert!(output.status.success(), "{}", describe(&output));
    for sub in ["", "tmp", "new", "cur"] {
        let dir = r.join("var/spool/qmqpd").join(sub);
        let meta = std::fs::metadata(&dir)
            .unwrap_or_else(|e| panic!("{} not created: {e}", dir.display()));
        assert!(meta.is_dir());
        assert_eq!(
            meta.permissions().mode() & 0o7777,
            0o750,
            "{}",
            dir.display()
        );
        assert_eq!((meta.uid(), meta.gid()), (uid, gid), "{}", dir.display());
    }
}
