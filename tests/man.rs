//! The manual pages (issue 8): each page in `man/`
//! renders with `groff -man -ww` and with `man -l` without a single warning; qmqpd(8) has
//! Postfix's sections and documents every parameter `qmqpd -d` prints, with the default it
//! prints; the exit statuses in qmqpd(8) and qmqpc(1) are the ones the programs use. The
//! example `main.cf` that the package installs shows every default as `qmqpd -d` prints it,
//! and it and the package's `/etc/qmqpd/main.cf` are accepted by `qmqpd -n`.
//!
//! groff missing skips the rendering tests with the reason, or fails them under
//! QMQPD_REQUIRE_INTEROP=1 (`.ci/run` installs `groff-base`). `man` is optional: without it
//! only groff renders the pages.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{describe, qmqpd_bin, require_tool, run_bounded_from, text};

/// Safety net for one groff or man run.
const RUN_LIMIT: Duration = Duration::from_secs(120);

/// The pages this project ships, relative to the crate root.
const PAGES: [&str; 4] = [
    "man/qmqpd.8",
    "man/qmqpc.1",
    "man/qmqpd-queue.5",
    "man/qmqp-queue.8",
];

/// The sections of qmqpd(8), in the shape of Postfix's qmqpd(8).
const QMQPD_SECTIONS: [&str; 11] = [
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "CONFIGURATION PARAMETERS",
    "SECURITY",
    "STANDARDS",
    "DIAGNOSTICS",
    "EXIT STATUS",
    "FILES",
    "BUGS",
    "SEE ALSO",
];

/// Parameters whose `qmqpd -d` value depends on the host or the run: qmqpd(8) must name
/// them with a default, but cannot quote the value.
const HOST_DEPENDENT: [&str; 2] = ["myhostname", "process_id"];

/// Read-only parameters: `qmqpd -d` prints them, a main.cf cannot set them.
const READ_ONLY: [&str; 3] = ["config_directory", "process_id", "process_name"];

/// The crate root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every page to check.
fn pages() -> Vec<PathBuf> {
    PAGES.iter().map(|p| root().join(p)).collect()
}

/// The roff source of a shipped page.
fn source(page: &str) -> String {
    let path = root().join(page);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Runs `cmd` with no input, bounded in time.
fn run(cmd: &mut Command) -> Output {
    run_bounded_from(cmd, Stdio::null(), RUN_LIMIT)
}

/// Asserts that a renderer exited 0 and wrote nothing to stderr.
fn assert_clean(what: &str, page: &Path, output: &Output) {
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "{what} {} is not clean: {}\n{}",
        page.display(),
        output.status,
        text(&output.stderr)
    );
}

/// `page` rendered for a terminal as plain text with one very long line per paragraph, so
/// that nothing is broken or hyphenated between the words a test looks for; runs of white
/// space are folded into one space.
fn plain_text(groff: &Path, page: &Path) -> String {
    let output = run(Command::new(groff)
        .args([
            "-man",
            "-Tascii",
            "-rLL=5000n",
            "-P-c",
            "-P-b",
            "-P-o",
            "-P-u",
        ])
        .arg(page));
    assert_clean("groff -Tascii", page, &output);
    // Whatever overstriking is left ("X\bX", "_\bX") becomes the character itself.
    let mut chars: Vec<char> = Vec::new();
    for c in text(&output.stdout).chars() {
        if c == '\u{8}' {
            chars.pop();
        } else {
            chars.push(c);
        }
    }
    let rendered: String = chars.into_iter().collect();
    rendered.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// `qmqpd -d` as (name, value) pairs.
fn qmqpd_defaults() -> Vec<(String, String)> {
    let output = run(Command::new(qmqpd_bin())
        .arg("-d")
        .env_remove("MAIL_CONFIG"));
    assert!(
        output.status.success(),
        "qmqpd -d failed:\n{}",
        describe(&output)
    );
    let defaults: Vec<(String, String)> = text(&output.stdout)
        .lines()
        .map(|line| {
            let (name, value) = line
                .split_once(" =")
                .unwrap_or_else(|| panic!("qmqpd -d printed {line:?}, not name = value"));
            (name.to_string(), value.trim().to_string())
        })
        .collect();
    assert!(
        defaults.len() > 20,
        "qmqpd -d printed too little:\n{}",
        describe(&output)
    );
    defaults
}

/// The roff source of one `.SH` section (up to the next `.SH`).
fn section<'a>(roff: &'a str, name: &str) -> &'a str {
    let heading = format!("\n.SH {name}\n");
    let start = roff
        .find(&heading)
        .unwrap_or_else(|| panic!("no .SH {name}"))
        + heading.len();
    let rest = roff.get(start..).unwrap_or_default();
    rest.find("\n.SH ")
        .map_or(rest, |end| rest.get(..end).unwrap_or(rest))
}

#[test]
fn man_pages_render_without_groff_warnings() {
    let Some(groff) = require_tool("groff") else {
        return;
    };
    for page in pages() {
        // The default device (PostScript) and a terminal, where lines are broken
        // differently: either can warn.
        let output = run(Command::new(&groff).args(["-man", "-ww", "-z"]).arg(&page));
        assert_clean("groff -man -ww -z", &page, &output);
        let output = run(Command::new(&groff)
            .args(["-man", "-Tutf8", "-ww", "-z"])
            .arg(&page));
        assert_clean("groff -man -Tutf8 -ww -z", &page, &output);
    }
}

#[test]
fn man_pages_render_without_man_warnings() {
    let Ok(probe) = Command::new("man")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    else {
        eprintln!("skipped: man is not installed (the pages are still checked with groff)");
        return;
    };
    assert!(probe.success(), "man --version failed: {probe}");
    for page in pages() {
        let output = run(Command::new("man")
            .args(["--warnings=w", "-l"])
            .arg(&page)
            .env("MANWIDTH", "80")
            .env("MANPAGER", "cat")
            .env("PAGER", "cat")
            .env("LC_ALL", "C.UTF-8")
            // man-db's seccomp sandbox fails in some containers; the page is trusted.
            .env("MAN_DISABLE_SECCOMP", "1"));
        assert_clean("man -l", &page, &output);
        assert!(
            !output.stdout.is_empty(),
            "man -l {} printed nothing",
            page.display()
        );
    }
}

#[test]
fn qmqpd_page_has_postfix_sections() {
    let roff = source("man/qmqpd.8");
    let headings: Vec<&str> = roff
        .lines()
        .filter_map(|line| line.strip_prefix(".SH "))
        .map(|h| h.trim_matches('"'))
        .collect();
    for wanted in QMQPD_SECTIONS {
        assert!(
            headings.contains(&wanted),
            "qmqpd.8 has no {wanted} section; it has {headings:?}"
        );
    }
}

#[test]
fn qmqpd_page_documents_every_parameter_with_its_default() {
    let Some(groff) = require_tool("groff") else {
        return;
    };
    let rendered = plain_text(&groff, &root().join("man/qmqpd.8"));
    let mut missing = Vec::new();
    for (name, value) in qmqpd_defaults() {
        let wanted = if HOST_DEPENDENT.contains(&name.as_str()) {
            format!("{name} (default: ")
        } else if value.is_empty() {
            format!("{name} (default: empty)")
        } else {
            format!("{name} (default: {value})")
        };
        if !rendered.contains(&wanted) {
            missing.push(wanted);
        }
    }
    assert!(
        missing.is_empty(),
        "qmqpd.8 does not document these as qmqpd -d prints them:\n{}",
        missing.join("\n")
    );
}

/// Each program's page lists every status the program exits with (the library's list).
#[test]
fn pages_list_every_exit_status() {
    use qmqpd::program::{QMQP_QUEUE_EXIT_STATUSES, QMQPC_EXIT_STATUSES, QMQPD_EXIT_STATUSES};
    for (page, statuses) in [
        ("man/qmqpd.8", QMQPD_EXIT_STATUSES),
        ("man/qmqpc.1", QMQPC_EXIT_STATUSES),
        ("man/qmqp-queue.8", QMQP_QUEUE_EXIT_STATUSES),
    ] {
        let roff = source(page);
        let exit = section(&roff, "EXIT STATUS");
        for status in statuses {
            assert!(
                exit.contains(&format!("\n.B {status}\n")),
                "{page} EXIT STATUS does not list {status}"
            );
        }
    }
}

/// Runs `qmqpd -c DIR -n` on `main_cf` (copied into a fresh DIR) and returns its output.
fn print_explicit(main_cf: &str) -> Output {
    let dir = tempfile::tempdir().expect("cannot create a temporary directory");
    std::fs::write(dir.path().join("main.cf"), main_cf).expect("cannot write main.cf");
    run(Command::new(qmqpd_bin())
        .arg("-c")
        .arg(dir.path())
        .arg("-n")
        .env_remove("MAIL_CONFIG"))
}

#[test]
fn main_cf_example_shows_every_default() {
    let example = source("packaging/main.cf.example");
    let mut missing = Vec::new();
    for (name, value) in qmqpd_defaults() {
        if READ_ONLY.contains(&name.as_str()) {
            continue;
        }
        let found = if HOST_DEPENDENT.contains(&name.as_str()) {
            let prefix = format!("#{name} = ");
            example.lines().any(|line| line.starts_with(&prefix))
        } else {
            let wanted = if value.is_empty() {
                format!("#{name} =")
            } else {
                format!("#{name} = {value}")
            };
            example.lines().any(|line| line == wanted)
        };
        if !found {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "packaging/main.cf.example lacks a \"#name = default\" line for {missing:?}"
    );
}

#[test]
fn main_cf_example_is_accepted_as_shipped_and_uncommented() {
    let example = source("packaging/main.cf.example");
    let output = print_explicit(&example);
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "qmqpd -n on the example as shipped:\n{}",
        describe(&output)
    );
    // Every "#name = value" line made a setting: each must be valid.
    let settings: Vec<&str> = example
        .lines()
        .filter_map(|line| line.strip_prefix('#'))
        .filter(|line| {
            line.split_once(" =").is_some_and(|(name, _)| {
                !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
        })
        .collect();
    assert!(settings.len() > 20, "too few settings found: {settings:?}");
    let output = print_explicit(&settings.join("\n"));
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "qmqpd -n rejects the example's settings:\n{}",
        describe(&output)
    );
    let printed = text(&output.stdout);
    assert_eq!(printed.lines().count(), settings.len(), "{printed}");
}

#[test]
fn packaged_main_cf_sets_nothing() {
    let output = print_explicit(&source("packaging/main.cf"));
    assert!(
        output.status.success() && output.stdout.is_empty() && output.stderr.is_empty(),
        "qmqpd -n on packaging/main.cf:\n{}",
        describe(&output)
    );
}
