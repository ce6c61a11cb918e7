//! qmqpd: a QMQP server that queues each message durably into a maildir-style queue.
//!
//! Data flows one way: a connection (stdin/stdout, a systemd socket or `--listen`) is
//! identified (`peer`), checked against the access list (`access`), and handed to one
//! transaction (`session`), which parses the request with the netstring codec
//! (`netstring`), rewrites what qmqpd adds to the message (`message`), commits the queue
//! file (`queue`) and answers with one reply (`reply`).
//!
//! # Layout
//! - `netstring`: bounded netstring codec over `Read`/`Write`
//! - `reply`: K/Z/D replies and the one table from error to reply
//! - `message`: our Received: header, the From_ line, hop count and Message-ID
//! - `queue`: queue IDs, tmp -> fsync -> new -> fsync dir, the queue file reader
//! - `session`: one QMQP transaction over any `Read + Write`
//! - `config`: main.cf parsing and typed parameters
//! - `access`: Postfix match lists (`qmqpd_authorized_clients`, `debug_peer_list`)
//! - `peer`: who the client is
//! - `proxy`: the PROXY protocol header (v1, v2) a balancer sends before the request
//! - `logging`: the `log` backend (syslog, file, stderr) and the Postfix-style lines
//! - `listen`: where connections come from (stdin/stdout, `--listen`, systemd sockets)
//! - `agent`: HAProxy's agent check: is this host's queue fit for new mail
//! - `server`: one connection from identification to reply, and the accept loop
//! - `date`: UTC dates for the Received: header and log lines
//! - `client`: the QMQP client used by `qmqpc`, `qmqp-queue` and the tests
//! - `deliver`: `qmqp-queue`'s consumer: list, show and deliver queue files
#![forbid(unsafe_code)]
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod access;
pub mod agent;
pub mod client;
pub mod config;
pub mod date;
pub mod deliver;
pub mod listen;
pub mod logging;
pub mod message;
pub mod netstring;
pub mod peer;
pub mod proxy;
pub mod queue;
pub mod reply;
pub mod server;
pub mod session;
