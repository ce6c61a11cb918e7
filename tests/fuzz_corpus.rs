//! Replays the fuzzing corpus as ordinary tests: every file under `fuzz/corpus/<target>/` and
//! every crash libFuzzer recorded under `fuzz/artifacts/<target>/` goes through the same
//! invariant checks as the fuzz targets (fuzz/checks.rs, included here), so CI keeps what
//! fuzzing found without running a fuzzer.

use std::path::{Path, PathBuf};

include!("../fuzz/checks.rs");

/// The most memory this test process may ever have held (VmHWM). A replayed input that
/// allocates without bound (a length taken on trust, an expansion that explodes) blows past
/// it; the fuzzer itself checks each input more tightly with `-malloc_limit_mb`. No counting
/// allocator here: the crate forbids `unsafe`, which a `GlobalAlloc` needs.
const PEAK_RSS_LIMIT_KIB: u64 = 512 * 1024;

/// The process's peak resident set size, in KiB (0 where /proc is not readable).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The corpus and the recorded crashes of one target, sorted.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in [
        root.join("corpus").join(target),
        root.join("artifacts").join(target),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("corpus entry").path();
            if path.is_file() {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// Runs `check` over every input of `target`, each with a fresh scratch directory, and
/// checks the process's peak memory after each; returns what the inputs came to (the kinds
/// of outcome the checks report), so a test can insist the corpus reaches each of them.
fn replay(target: &str, check: impl Fn(&Path, &[u8]) -> &'static str) -> Vec<&'static str> {
    let files = inputs(target);
    assert!(
        files.len() >= 10,
        "fuzz/corpus/{target} holds {} files: the seed corpus is missing",
        files.len()
    );
    let mut kinds = Vec::new();
    for path in &files {
        let data = std::fs::read(path).expect("read corpus file");
        let scratch = tempfile::Builder::new()
            .prefix("qmqpd-corpus.")
            .tempdir()
            .expect("scratch directory");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            check(scratch.path(), &data)
        }));
        let kind = match outcome {
            Ok(kind) => kind,
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                panic!("{}: invariant broken: {why}", path.display());
            }
        };
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
        let peak = peak_rss_kib();
        assert!(
            peak <= PEAK_RSS_LIMIT_KIB,
            "{}: the test process peaked at {peak} KiB (limit {PEAK_RSS_LIMIT_KIB} KiB)",
            path.display()
        );
    }
    kinds.sort_unstable();
    kinds
}

#[test]
fn corpus_netstring_holds_invariants() {
    let kinds = replay("netstring", |_, data| check_netstring(data));
    assert_eq!(kinds, ["bad reply", "reply"]);
}

#[test]
fn corpus_transaction_holds_invariants() {
    let kinds = replay("transaction", check_transaction);
    for kind in ["D", "K", "Z", "lost"] {
        assert!(
            kinds.contains(&kind),
            "no corpus input ends in {kind}: {kinds:?}"
        );
    }
}

#[test]
fn corpus_config_holds_invariants() {
    let kinds = replay("config", check_config);
    assert_eq!(kinds, ["error", "loaded"]);
}

#[test]
fn corpus_access_holds_invariants() {
    let kinds = replay("access", check_access);
    assert_eq!(kinds, ["error", "parsed"]);
}

#[test]
fn corpus_proxy_holds_invariants() {
    let kinds = replay("proxy", |_, data| check_proxy(data));
    assert_eq!(kinds, ["error", "local", "unknown", "v1", "v2"]);
}
