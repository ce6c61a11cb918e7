//! qmqpc: send one message read from stdin to a QMQP server and print its reply.
//!
//! `qmqpc [-s host[:port]] [-t SECONDS] -f sender [--] rcpt... < message`. Exit status: 0 on
//! `K`, 65 on `D`, 75 on `Z` or when there is no valid answer, 64 on usage errors (sysexits).
//! This file is only the command-line shell: the protocol is in `qmqpd::client`.
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use qmqpd::client::{self, Reply, Status};
use qmqpd::program::{EX_DATAERR, EX_OK, EX_TEMPFAIL, EX_USAGE};

const USAGE: &str =
    "usage: qmqpc [-s host[:port]] [-t seconds] -f sender [--] recipient... < message";
const DEFAULT_SERVER: &str = "127.0.0.1:628";
const DEFAULT_TIMEOUT_SECS: u64 = 300;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    server: String,
    timeout: Duration,
    sender: Vec<u8>,
    recipients: Vec<Vec<u8>>,
}

/// The outcome of parsing the command line.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Send(Args),
    Help,
}

/// Parses the arguments after the program name, getopt style: options first (`-sX` or
/// `-s X`), then `--` or the first recipient; everything after that is a recipient.
fn parse_args<I: IntoIterator<Item = OsString>>(argv: I) -> Result<Command, String> {
    use lexopt::prelude::*;
    let mut parser = lexopt::Parser::from_args(argv);
    let mut server = None;
    let mut timeout = None;
    let mut sender = None;
    let mut recipients = Vec::new();
    let usage = |e: lexopt::Error| e.to_string();
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => return Ok(Command::Help),
            Short('s') => {
                let text = parser.value().map_err(usage)?.into_vec();
                let text = String::from_utf8(text)
                    .map_err(|e| format!("bad server \"{}\"", e.as_bytes().escape_ascii()))?;
                client::parse_server(&text).map_err(|e| e.to_string())?;
                server = Some(text);
            }
            Short('t') => {
                timeout = Some(parse_timeout(&parser.value().map_err(usage)?.into_vec())?)
            }
            Short('f') => sender = Some(parser.value().map_err(usage)?.into_vec()),
            Value(first) => {
                // The first recipient ends the options: the rest are recipients as they are.
                recipients.push(first.into_vec());
                let rest = parser.raw_args().map_err(usage)?;
                recipients.extend(rest.map(OsStringExt::into_vec));
            }
            _ => return Err(arg.unexpected().to_string()),
        }
    }
    let sender = sender.ok_or("missing -f sender (use -f '' for a null sender)")?;
    if recipients.is_empty() {
        return Err("no recipients".into());
    }
    Ok(Command::Send(Args {
        server: server.unwrap_or_else(|| DEFAULT_SERVER.to_string()),
        timeout: timeout.unwrap_or(Duration::from_secs(DEFAULT_TIMEOUT_SECS)),
        sender,
        recipients,
    }))
}

/// Parses `-t`: a positive number of seconds.
fn parse_timeout(value: &[u8]) -> Result<Duration, String> {
    let bad = || format!("bad timeout \"{}\"", value.escape_ascii());
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let secs: u64 = std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&s| s > 0)
        .ok_or_else(bad)?;
    Ok(Duration::from_secs(secs))
}

/// The message on stdin and its length: a regular file is streamed from its current
/// offset using its size; anything else is read into memory first.
fn open_message() -> anyhow::Result<(Box<dyn Read>, u64)> {
    let fd = io::stdin()
        .as_fd()
        .try_clone_to_owned()
        .context("cannot duplicate standard input")?;
    let mut file = File::from(fd);
    let meta = file.metadata().context("cannot stat standard input")?;
    if meta.file_type().is_file() {
        let offset = file
            .stream_position()
            .context("cannot get the offset of standard input")?;
        let len = meta.len().saturating_sub(offset);
        return Ok((Box::new(io::BufReader::new(file)), len));
    }
    let mut message = Vec::new();
    file.read_to_end(&mut message)
        .context("cannot read the message from standard input")?;
    let len = u64::try_from(message.len()).context("message too large")?;
    Ok((Box::new(io::Cursor::new(message)), len))
}

/// Sends the message on stdin as `args` say and returns the server's reply.
fn run(args: &Args) -> anyhow::Result<Reply> {
    let (mut message, message_len) = open_message()?;
    let mut stream = client::connect(&args.server, args.timeout)
        .with_context(|| format!("cannot connect to {}", args.server))?;
    let recipients: Vec<&[u8]> = args.recipients.iter().map(Vec::as_slice).collect();
    client::send(
        &mut stream,
        &mut message,
        message_len,
        &args.sender,
        &recipients,
    )
    .with_context(|| format!("no valid reply from {}", args.server))
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Send(args)) => args,
        Ok(Command::Help) => {
            let _ = writeln!(io::stdout(), "{USAGE}");
            return ExitCode::from(EX_OK);
        }
        Err(why) => {
            let _ = writeln!(io::stderr(), "qmqpc: {why}\n{USAGE}");
            return ExitCode::from(EX_USAGE);
        }
    };
    match run(&args) {
        Ok(reply) => {
            let _ = writeln!(io::stdout(), "{reply}");
            ExitCode::from(match reply.status {
                Status::Ok => EX_OK,
                Status::PermFail => EX_DATAERR,
                Status::TempFail => EX_TEMPFAIL,
            })
        }
        Err(e) => {
            let _ = writeln!(io::stderr(), "qmqpc: {e:#}");
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, String> {
        parse_args(args.iter().map(OsString::from))
    }

    fn send_args(args: &[&str]) -> Args {
        match parse(args).unwrap() {
            Command::Send(a) => a,
            Command::Help => panic!("help"),
        }
    }

    #[test]
    fn parse_args_uses_defaults() {
        let a = send_args(&["-f", "s@x", "r@y"]);
        assert_eq!(a.server, "127.0.0.1:628");
        assert_eq!(a.timeout, Duration::from_secs(300));
        assert_eq!(a.sender, b"s@x");
        assert_eq!(a.recipients, vec![b"r@y".to_vec()]);
    }

    #[test]
    fn parse_args_accepts_attached_values_and_double_dash() {
        let a = send_args(&["-s[::1]:6280", "-t5", "-f", "", "--", "-r@y", "q@z"]);
        assert_eq!(a.server, "[::1]:6280");
        assert_eq!(a.timeout, Duration::from_secs(5));
        assert_eq!(a.sender, b"");
        assert_eq!(a.recipients, vec![b"-r@y".to_vec(), b"q@z".to_vec()]);
    }

    #[test]
    fn parse_args_stops_options_at_first_recipient() {
        let a = send_args(&["-f", "s", "r1", "-f", "r2"]);
        assert_eq!(a.recipients.len(), 3);
    }

    #[test]
    fn parse_args_rejects_usage_errors() {
        for bad in [
            &["r@y"][..],
            &["-f", "s"],
            &["-f"],
            &["-x", "-f", "s", "r"],
            &["-t", "0", "-f", "s", "r"],
            &["-t", "1s", "-f", "s", "r"],
            &["-s", "host:99999", "-f", "s", "r"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parse_args_recognises_help() {
        assert_eq!(parse(&["-h"]).unwrap(), Command::Help);
    }
}
