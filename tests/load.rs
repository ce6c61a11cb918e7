//! Load: one listener, 1000 connections over 60 s from 50 concurrent clients, then five
//! rounds of 1000 as fast as they go. Every `K` has its complete file in `new/` and every
//! file in `new/` had its `K`; the server's file descriptors and threads come back to where
//! they were after each round; its memory stays flat. The figures go to stderr
//! (`cargo test --test load -- --nocapture`) and into docs/reliability.md.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{QueueFile, Server, TestQueue, request, wait_until};

/// Concurrent clients.
const CLIENTS: usize = 50;
/// Connections each client makes, one after the other.
const PER_CLIENT: usize = 20;
/// The time the connections are spread over (the figure).
const SPREAD: Duration = Duration::from_secs(60);
/// A safety net for every connection and every wait: never expected to fire.
const LIMIT: Duration = Duration::from_secs(60);

/// Sends one request and returns the reply payload ("" when the server sent nothing).
fn send(addr: SocketAddr, bytes: &[u8]) -> String {
    common::send_on(common::connect(addr), bytes)
}

/// The message, sender and recipients of round `r`, client `c`, connection `i`: unique, so
/// each queue file can be matched with the request it came from.
fn envelope(r: usize, c: usize, i: usize) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    let message = format!(
        "From: c{c}@example.org\nSubject: load {r}/{c}/{i}\n\n{}\n",
        format!("round {r} client {c} message {i} ").repeat(30)
    );
    (
        message.into_bytes(),
        format!("c{c}@example.org").into_bytes(),
        vec![
            format!("r{i}@example.net").into_bytes(),
            b"all@example.net".to_vec(),
        ],
    )
}

/// Queue ID -> (round, client, connection), from the K replies.
type Accepted = BTreeMap<String, (usize, usize, usize)>;

/// One round: CLIENTS threads, PER_CLIENT connections each, spread over `spread` (zero: as
/// fast as they go). Returns the K'd IDs, every other reply, the RSS samples (ten a second)
/// and how long the round took.
fn run_round(
    server: &Server,
    round: usize,
    spread: Duration,
) -> (Accepted, Vec<String>, Vec<u64>, Duration) {
    let accepted: Arc<Mutex<Accepted>> = Arc::default();
    let refused: Arc<Mutex<Vec<String>>> = Arc::default();
    let started = Instant::now();
    let step = spread / u32::try_from(PER_CLIENT).unwrap();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (accepted, refused) = (Arc::clone(&accepted), Arc::clone(&refused));
            let addr = server.addr;
            // Clients start spread over one step, then each connects once per step.
            let offset = step * u32::try_from(c).unwrap() / u32::try_from(CLIENTS).unwrap();
            std::thread::spawn(move || {
                for i in 0..PER_CLIENT {
                    let due = started + offset + step * u32::try_from(i).unwrap();
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                    let (message, sender, rcpts) = envelope(round, c, i);
                    let rcpts: Vec<&[u8]> = rcpts.iter().map(Vec::as_slice).collect();
                    let reply = send(addr, &request(&message, &sender, &rcpts));
                    match reply.strip_prefix("KOk: queued as ") {
                        Some(id) => {
                            accepted
                                .lock()
                                .unwrap()
                                .insert(id.to_owned(), (round, c, i));
                        }
                        None => refused.lock().unwrap().push(reply),
                    }
                }
            })
        })
        .collect();
    let mut rss = Vec::new();
    while clients.iter().any(|c| !c.is_finished()) {
        assert!(
            started.elapsed() < spread + 2 * LIMIT,
            "the clients do not finish"
        );
        rss.push(server.status_kib("VmRSS:"));
        std::thread::sleep(Duration::from_millis(100));
    }
    for client in clients {
        client.join().unwrap();
    }
    let accepted = accepted.lock().unwrap().clone();
    let refused = refused.lock().unwrap().clone();
    (accepted, refused, rss, started.elapsed())
}

/// Runs `rounds` rounds of the load against one listener, checks everything, prints the
/// figures.
fn run_load(spread: Duration, rounds: usize) {
    let q = TestQueue::new();
    let server = Server::start(&q, &[]);
    let threads_before = server.proc_count("task");
    // One message first: from then on the listener keeps new/ open for its fsyncs.
    let warm = send(
        server.addr,
        &request(b"Subject: warm-up\n\nx\n", b"w@x", &[b"w@x"]),
    );
    assert!(warm.starts_with("KOk"), "{warm}");
    wait_until("the warm-up thread ends", || {
        server.proc_count("task") == threads_before
    });
    let fds_before = server.proc_count("fd");
    let rss_before = server.status_kib("VmRSS:");

    let mut accepted = Accepted::new();
    let mut rss_after_round = Vec::new();
    for round in 0..rounds {
        let (ids, refused, rss, elapsed) = run_round(&server, round, spread);
        assert!(
            refused.is_empty(),
            "round {round}: replies other than K: {refused:?}"
        );
        assert_eq!(
            ids.len(),
            CLIENTS * PER_CLIENT,
            "round {round}: distinct queue IDs"
        );
        let n = ids.len();
        accepted.extend(ids);
        // Nothing leaked: threads and fds back to where they were once the connections end.
        wait_until("connection threads end", || {
            server.proc_count("task") == threads_before
        });
        wait_until("connection fds closed", || {
            server.proc_count("fd") == fds_before
        });
        let after = server.status_kib("VmRSS:");
        rss_after_round.push(after);
        eprintln!(
            "round {round}: {n} connections in {elapsed:.1?} from {CLIENTS} clients ({:.0}/s); \
             threads back to {threads_before}, fds back to {fds_before}; RSS KiB during: \
             min {} max {}, after: {after}",
            n as f64 / elapsed.as_secs_f64(),
            rss.iter().min().unwrap_or(&0),
            rss.iter().max().unwrap_or(&0),
        );
    }

    // Every K has its complete file, and every file had its K (the warm-up's aside).
    let files = q.files("new");
    assert_eq!(files.len(), accepted.len() + 1);
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let id = name.split('.').next().unwrap();
        let parsed = QueueFile::read(file);
        if parsed.sender == b"w@x" {
            continue;
        }
        let &(r, c, i) = accepted
            .get(id)
            .unwrap_or_else(|| panic!("{name} in new/ without a K"));
        let (message, sender, rcpts) = envelope(r, c, i);
        assert!(parsed.message.ends_with(&message), "{name}: message");
        assert_eq!(
            (parsed.sender, parsed.recipients),
            (sender, rcpts),
            "{name}"
        );
    }
    assert!(q.files("tmp").is_empty());
    let peak = server.status_kib("VmHWM:");
    eprintln!("RSS KiB before {rss_before}, after each round {rss_after_round:?}, peak {peak}");
    // Flat: after the first round has filled the allocator's per-thread arenas, later
    // rounds end where it ended, give or take 1 MiB.
    let first = rss_after_round[0];
    for (round, &after) in rss_after_round.iter().enumerate() {
        assert!(
            after <= first + 1024,
            "memory grows: {first} KiB after round 0, {after} KiB after round {round}"
        );
    }
}

#[test]
fn load_1000_connections_over_60s_from_50_clients_lose_nothing_and_leak_nothing() {
    run_load(SPREAD, 1);
}

#[test]
fn load_5_rounds_of_1000_connections_at_full_speed_lose_nothing_and_leak_nothing() {
    run_load(Duration::ZERO, 5);
}
