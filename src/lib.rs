//! qmqpd: a QMQP server that queues each message durably into a maildir-style queue.
//!
//! Data flows one way: `listen` decides where connections come from; `server` serves each
//! one, asking `peer` who the client is and `access` whether it may use the service, then
//! hands it to one transaction (`session`), which parses the request with the netstring
//! codec (`netstring`), rewrites what qmqpd adds to the message (`message`), commits the
//! queue file (`queue`) and answers with one reply (`reply`). ARCHITECTURE.md at the top of
//! the repository describes each module's job and limits and the queue's invariants.
//!
//! # Layout
//! - `program`: what the three programs share: exit statuses, `-v` levels, the stop signal
//! - `listen`: where connections come from (stdin/stdout, `--listen`, systemd sockets)
//! - `agent`: HAProxy's agent check: is this host's queue fit for new mail
//! - `server`: one connection from identification to reply, and the accept loop
//! - `peer`: who the client is
//! - `resolve`: host names from /etc/hosts and DNS without glibc's NSS, in the calling thread
//! - `users`: `mail_owner` and its groups from /etc/passwd and /etc/group
//! - `access`: Postfix match lists (`qmqpd_authorized_clients`, `debug_peer_list`)
//! - `proxy`: the PROXY protocol header (v1, v2) a balancer sends before the request
//! - `session`: one QMQP transaction over any `Read + Write`
//! - `netstring`: bounded netstring codec over `Read`/`Write`
//! - `message`: our Received: header, the From_ line, hop count and Message-ID
//! - `reply`: K/Z/D replies and the one table from cause to reply
//! - `queue`: the queue family: layout and states, IDs and names, the mode rule, durable
//!   create (tmp -> fdatasync -> rename -> fsync dir), the queue file format, scan and claim
//! - `verp`: VERP senders: their delimiters (validated by `session`), per-recipient expansion
//!   (used by `deliver`)
//! - `config`: main.cf (`file`), `$name` expansion (`expand`), values (`value`), the
//!   parameter table (`params`) and `-n`/`-d` (`print`)
//! - `logging`: the `log` backend (syslog, file, stderr) and the Postfix-style lines
//! - `date`: UTC dates for the Received: header and log lines
//! - `client`: the QMQP client used by `qmqpc`, `qmqp-queue` and the tests
//! - `deliver`: `qmqp-queue`'s deliverer: claim, run (`--exec`, `--relay`) and dispose
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod access;
pub mod agent;
pub mod client;
pub mod config;
pub(crate) mod date;
pub mod deliver;
pub mod listen;
pub mod logging;
mod message;
pub mod netstring;
pub mod peer;
pub mod program;
pub mod proxy;
pub mod queue;
pub mod reply;
pub mod resolve;
pub mod server;
pub mod session;
pub mod users;
pub mod verp;
