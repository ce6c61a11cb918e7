// The invariants every fuzz target checks, shared by the fuzz targets (fuzz/fuzz_targets/)
// and by tests/fuzz_corpus.rs, which replays the committed corpus and every crash found
// through the same functions as ordinary `cargo test` tests. Both include this file with
// `include!`, so it holds items only: no inner attributes, no `mod`, no `use` of anything but
// std, `log`, `tempfile` and `qmqpd` (dependencies of both crates).
//
// A violated invariant panics, which libFuzzer records as a crash and `cargo test` as a
// failure. The five checks:
//   check_netstring(data)        the netstring codec and the client's reply reader
//   check_transaction(dir, data) one whole transaction over arbitrary bytes into a queue
//   check_config(dir, data)      main.cf parsing, expansion and validation
//   check_access(dir, data)      access-list (match list) parsing and matching
//   check_proxy(data)            the PROXY v1/v2 header reader
// `dir` is a scratch directory the check may fill and empties again.

/// The longest text of one log line qmqpd writes, without its severity prefix.
const CHECK_LINE_LIMIT: usize = qmqpd::logging::LINE_LIMIT;

/// The longest expanded parameter value the config check accepts (see check_config).
const CHECK_EXPANSION_LIMIT: usize = 1024 * 1024;

/// Splits one strict netstring off the front of `bytes`: (payload, rest). The reference
/// decoder the codec is compared with: decimal length without leading zeros, `:`, payload,
/// `,`.
fn check_split_netstring(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = bytes.iter().position(|&b| b == b':')?;
    let digits = bytes.get(..colon)?;
    if digits.is_empty()
        || !digits.iter().all(u8::is_ascii_digit)
        || (digits.len() > 1 && digits.first() == Some(&b'0'))
    {
        return None;
    }
    let len: usize = std::str::from_utf8(digits).ok()?.parse().ok()?;
    let start = colon.checked_add(1)?;
    let end = start.checked_add(len)?;
    let payload = bytes.get(start..end)?;
    match bytes.get(end) {
        Some(b',') => Some((payload, bytes.get(end + 1..)?)),
        _ => None,
    }
}

/// Splits a whole byte string into netstrings; None unless it is exactly a sequence of them.
fn check_split_all(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut parts = Vec::new();
    while !bytes.is_empty() {
        let (payload, rest) = check_split_netstring(bytes)?;
        parts.push(payload);
        bytes = rest;
    }
    Some(parts)
}

/// A `BufRead` over a byte slice that hands out at most `chunk` bytes per `fill_buf`, so the
/// transaction sees the request split at every kind of boundary, and that counts exactly how
/// many bytes were consumed (the server must not read past the outer `,`).
struct CheckChunked<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
}

impl std::io::Read for CheckChunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let avail = std::io::BufRead::fill_buf(self)?;
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        std::io::BufRead::consume(self, n);
        Ok(n)
    }
}

impl std::io::BufRead for CheckChunked<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        let rest = &self.data[self.pos..];
        Ok(&rest[..rest.len().min(self.chunk)])
    }
    fn consume(&mut self, amt: usize) {
        assert!(
            amt <= self.data.len() - self.pos,
            "consumed {amt} bytes with only {} left",
            self.data.len() - self.pos
        );
        self.pos += amt;
    }
}

/// A logger that formats every record the library emits (so every logged value's Display
/// runs on fuzzed data) and checks the line qmqpd would write: one line, capped.
struct CheckLogger;

impl log::Log for CheckLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let text = qmqpd::logging::format_text(record.level(), &record.args().to_string());
        assert!(
            !text.contains(['\n', '\r', '\0']),
            "log line holds a line break or NUL: {text:?}"
        );
        assert!(
            text.len() <= CHECK_LINE_LIMIT + "warning: ".len(),
            "log line of {} bytes",
            text.len()
        );
    }
    fn flush(&self) {}
}

static CHECK_LOGGER: CheckLogger = CheckLogger;

/// Installs the checking logger once per process (a no-op when another logger is in place).
fn check_install_logger() {
    if log::set_logger(&CHECK_LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Trace);
    }
}

/// The netstring codec against the reference decoder, and the client's reply reader.
///
/// Invariants: `read_len` agrees with the reference (value, overflow, or error when the
/// reference has none), never reads past the `:`, and charges its budget exactly; decoding a
/// sequence of netstrings with the codec and encoding it again gives back the bytes read;
/// `encode` and `len_prefix_size` agree; `read_reply` accepts exactly the netstrings of at
/// most 64 KiB that start with K, Z or D, and its text is the rest of the payload.
pub fn check_netstring(data: &[u8]) -> &'static str {
    use qmqpd::netstring::{self, NetstringError};
    use std::io::Cursor;

    check_install_logger();
    // read_len against the reference, with and without a budget.
    let reference_len = data.iter().position(|&b| b == b':').and_then(|colon| {
        let digits = &data[..colon];
        let ok = !digits.is_empty()
            && digits.iter().all(u8::is_ascii_digit)
            && !(digits.len() > 1 && digits[0] == b'0');
        let value = std::str::from_utf8(digits)
            .ok()
            .and_then(|d| d.parse::<u64>().ok());
        ok.then_some((colon, value))
    });
    let mut rdr = Cursor::new(data);
    let got = netstring::read_len(&mut rdr, None);
    match (&got, reference_len) {
        (Ok(len), Some((colon, Some(want)))) => {
            assert_eq!(*len, want, "read_len value");
            assert_eq!(rdr.position(), colon as u64 + 1, "read_len stops after ':'");
        }
        (Err(NetstringError::Overflow), Some((_, None))) => {}
        (
            Err(NetstringError::Format | NetstringError::Lost(_) | NetstringError::Overflow),
            None,
        ) => {}
        (got, want) => panic!("read_len gave {got:?}, reference {want:?}"),
    }
    let budget_start = (data.len() as u64) / 2;
    let mut budget = budget_start;
    let mut rdr = Cursor::new(data);
    match netstring::read_len(&mut rdr, Some(&mut budget)) {
        Ok(_) => assert_eq!(
            budget_start - budget,
            rdr.position(),
            "the budget is charged one unit per byte read"
        ),
        Err(_) => assert!(rdr.position() <= budget_start + 1, "read past the budget"),
    }

    // Decode a sequence with the codec; re-encoding what was decoded gives the bytes read.
    let mut rdr = Cursor::new(data);
    let mut decoded = Vec::new();
    let mut read_ok = 0u64;
    for _ in 0..data.len() {
        let Ok(len) = netstring::read_len(&mut rdr, None) else {
            break;
        };
        let left = data.len() as u64 - rdr.position();
        if len > left {
            // The codec must refuse to produce bytes that are not there, without allocating.
            let mut buf = Vec::new();
            let short = usize::try_from(len).map_or(Ok(()), |n| {
                netstring::read_exact_into(&mut rdr, n, &mut buf)
            });
            assert!(short.is_err(), "read_exact_into invented bytes");
            assert!(buf.len() as u64 <= left, "read_exact_into overfilled");
            break;
        }
        let mut buf = Vec::new();
        let Ok(n) = usize::try_from(len) else { break };
        netstring::read_exact_into(&mut rdr, n, &mut buf).expect("bytes are there");
        if netstring::read_comma(&mut rdr).is_err() {
            break;
        }
        decoded.push(buf);
        read_ok = rdr.position();
    }
    let mut again = Vec::new();
    for part in &decoded {
        again.extend_from_slice(&netstring::encode(part));
        assert_eq!(
            netstring::encode(part).len() as u64,
            netstring::len_prefix_size(part.len() as u64) + part.len() as u64 + 1
        );
    }
    assert_eq!(
        again.as_slice(),
        &data[..read_ok as usize],
        "decode then encode is the identity"
    );
    // encode then decode is the identity too.
    let enc = netstring::encode(data);
    let mut rdr = Cursor::new(enc.as_slice());
    let len = netstring::read_len(&mut rdr, None).expect("own length");
    assert_eq!(len, data.len() as u64);
    let mut buf = Vec::new();
    netstring::read_exact_into(&mut rdr, data.len(), &mut buf).expect("own payload");
    netstring::read_comma(&mut rdr).expect("own comma");
    assert_eq!(buf, data);
    // skip stops at the end of the input.
    let mut rdr = Cursor::new(data);
    let skip = netstring::skip(&mut rdr, data.len() as u64 + 1);
    assert!(skip.is_err() && rdr.position() == data.len() as u64);

    // The client's reply reader: a hostile server can send anything.
    let mut rdr = Cursor::new(data);
    let reply = qmqpd::client::read_reply(&mut rdr);
    let reference = check_split_netstring(data).filter(|(payload, _)| {
        payload.len() as u64 <= qmqpd::client::MAX_REPLY_LEN
            && matches!(payload.first(), Some(b'K' | b'Z' | b'D'))
    });
    match (reply, reference) {
        (Ok(reply), Some((payload, rest))) => {
            assert_eq!(
                u64::from(reply.status.letter() as u8),
                u64::from(payload[0])
            );
            assert_eq!(reply.text, String::from_utf8_lossy(&payload[1..]));
            assert_eq!(
                rdr.position(),
                (data.len() - rest.len()) as u64,
                "read_reply reads no further than the reply"
            );
            let shown = reply.to_string();
            assert!(!shown.contains(|c: char| c.is_control()), "{shown:?}");
        }
        (Err(_), None) => return "bad reply",
        (got, want) => panic!("read_reply gave {got:?}, reference {want:?}"),
    }
    "reply"
}

/// The documented replies (qmqpd(8), DIAGNOSTICS), without their status letter.
const CHECK_REPLY_TEXTS: [&str; 11] = [
    "Ok: queued as ",
    "Error: message too large",
    "netstring format error while receiving ",
    "netstring length exceeds storage limit while receiving ",
    "Error: bad sender address syntax",
    "Error: bad recipient address syntax",
    "Error: Invalid VERP delimiters: ",
    "Error: no recipients specified",
    "Error: too many hops",
    "Error: streaming QMQP is not supported",
    "Error: unknown[",
];

/// What the reference parser makes of a request.
struct CheckRequest<'a> {
    /// The outer netstring's payload length and the request's length in bytes.
    outer_len: usize,
    request_len: usize,
    message: &'a [u8],
    sender: &'a [u8],
    recipients: Vec<&'a [u8]>,
}

/// Parses a request strictly: an outer netstring holding message, sender and any number of
/// recipient netstrings, nothing else.
fn check_parse_request(bytes: &[u8]) -> Option<CheckRequest<'_>> {
    let (body, rest) = check_split_netstring(bytes)?;
    let parts = check_split_all(body)?;
    let (message, sender) = (*parts.first()?, *parts.get(1)?);
    Some(CheckRequest {
        outer_len: body.len(),
        request_len: bytes.len() - rest.len(),
        message,
        sender,
        recipients: parts.get(2..)?.to_vec(),
    })
}

/// One transaction over arbitrary bytes into a queue under `dir`.
///
/// `data[0]` picks the settings (bit 0: the client is denied; bit 1: small limits; bit 2:
/// soft_bounce; bits 3-4: the client address: IPv4, IPv6, IPv4-mapped IPv6 or unknown;
/// bits 5-7: how many bytes each read returns: 1, 2, 3, 7, 64, 512, 4096 or 65536); the rest
/// is what the client sends.
///
/// Invariants: no panic; `tmp/` empty afterwards; the reply is exactly one netstring
/// starting with K, Z or D and holding one of the documented reply texts (Z only under
/// soft_bounce: the scratch queue never fails), or nothing when the input was empty; `new/` holds a file
/// exactly when the reply is K, and that file is the request's envelope and message (our
/// Received: header first, the content as its suffix); K only for a request that a strict
/// reference parser finds complete and valid, and K for every such request unless it may
/// count too many hops; a complete, drainable request is read to its outer `,` and never a
/// byte further, whatever the reply.
pub fn check_transaction(dir: &std::path::Path, data: &[u8]) -> &'static str {
    use qmqpd::session::{self, End, Transaction};
    use std::net::IpAddr;

    check_install_logger();
    let Some((&settings, request)) = data.split_first() else {
        return "empty";
    };
    let authorized = settings & 1 == 0;
    let small = settings & 2 != 0;
    let soft_bounce = settings & 4 != 0;
    let client = match (settings >> 3) & 3 {
        0 => qmqpd::peer::Client::at(IpAddr::from([192, 0, 2, 1]), Some(1234)),
        1 => qmqpd::peer::Client::at("2001:db8::1".parse().expect("v6"), Some(1234)),
        2 => qmqpd::peer::Client::at("::ffff:192.0.2.1".parse().expect("mapped"), None),
        _ => qmqpd::peer::Client::unknown(),
    };
    let chunk = [1, 2, 3, 7, 64, 512, 4096, 65536][usize::from(settings >> 5)];
    let queue_dir = dir.join("queue");
    let mut params = qmqpd::config::Params {
        queue_directory: queue_dir.clone(),
        qmqpd_error_delay: std::time::Duration::ZERO,
        myhostname: "mx.example".into(),
        soft_bounce,
        ..qmqpd::config::Params::default()
    };
    if small {
        params.message_size_limit = 512;
        params.line_length_limit = 32;
        params.hopcount_limit = 3;
    }
    let queue = qmqpd::queue::Queue::new(&queue_dir, "host.example");
    let t = Transaction {
        client: &client,
        params: &params,
        queue: &queue,
        authorized,
    };
    let mut rdr = CheckChunked {
        data: request,
        pos: 0,
        chunk,
    };
    let mut out = Vec::new();
    let outcome = session::serve(&mut rdr, &mut out, &t);
    let consumed = rdr.pos;

    let list = |sub: &str| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(queue_dir.join(sub)).map_or_else(
            |_| Vec::new(),
            |entries| entries.map(|e| e.expect("queue entry").path()).collect(),
        )
    };
    let new_files = list("new");
    let tmp_files = list("tmp");
    // Keep what was queued, and leave the scratch queue empty for the next input whatever
    // happens below.
    let mut queued = Vec::new();
    for file in &new_files {
        queued.push(std::fs::read(file).expect("read queue file"));
        let _ = std::fs::remove_file(file);
    }
    assert!(tmp_files.is_empty(), "tmp/ not empty: {tmp_files:?}");

    let reference = check_parse_request(request);
    if let End::Lost { .. } = outcome.end {
        assert!(out.is_empty(), "a lost connection got a reply: {out:?}");
        assert_eq!(consumed, request.len(), "lost before the input ended");
        assert!(new_files.is_empty(), "queued for a lost connection");
        assert!(reference.is_none(), "a complete request counted as lost");
        return "lost";
    }
    let (payload, rest) = check_split_netstring(&out).unwrap_or_else(|| {
        panic!(
            "reply is not one netstring: {:?}",
            String::from_utf8_lossy(&out)
        )
    });
    assert!(rest.is_empty(), "bytes after the reply: {out:?}");
    let text = std::str::from_utf8(payload).expect("reply is UTF-8");
    let (letter, words) = text.split_at(1.min(text.len()));
    assert!(
        matches!(letter, "K" | "Z" | "D"),
        "reply does not start with K, Z or D: {text:?}"
    );
    assert!(
        CHECK_REPLY_TEXTS.iter().any(|t| words.starts_with(t)),
        "reply text not documented: {text:?}"
    );
    assert!(
        letter != "Z" || soft_bounce,
        "Z without soft_bounce from a working queue: {text:?}"
    );
    assert!(
        words.starts_with("Error: unknown[") != authorized,
        "access verdict not in the reply: {text:?}"
    );

    let limit = params.message_size_limit;
    let valid = reference.as_ref().filter(|r| {
        let fits = |field: &[u8]| field.len() as u64 <= params.line_length_limit;
        let clean = |field: &[u8]| !field.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'));
        let verp_ok = qmqpd::verp::verp_delimiters(r.sender)
            .is_none_or(|d| d.chars().all(|c| params.verp_delimiter_filter.contains(c)));
        authorized
            && (limit == 0 || r.outer_len as u64 <= limit)
            && fits(r.sender)
            && clean(r.sender)
            && verp_ok
            && !r.recipients.is_empty()
            && r.recipients
                .iter()
                .all(|&rcpt| fits(rcpt) && clean(rcpt) && !rcpt.is_empty())
            && r.message != b"M"
    });
    if let Some(r) = &reference {
        let drain_limit = if limit == 0 {
            4 * 10_240_000
        } else {
            4 * limit
        };
        if r.outer_len as u64 <= drain_limit {
            assert_eq!(
                consumed, r.request_len,
                "reply before the end of a drainable request"
            );
            assert!(outcome.request_read);
        }
    }
    assert!(consumed <= reference.as_ref().map_or(request.len(), |r| r.request_len));

    if letter != "K" {
        assert!(new_files.is_empty(), "queued without K: {new_files:?}");
        let hop_text = reference.as_ref().is_some_and(|r| {
            r.message
                .to_ascii_lowercase()
                .windows(8)
                .any(|w| w == b"received")
        });
        assert!(
            valid.is_none() || (hop_text && words == "Error: too many hops"),
            "a valid request was refused: {text:?}"
        );
        return if letter == "Z" { "Z" } else { "D" };
    }
    let r = valid.unwrap_or_else(|| panic!("K for a request the reference refuses: {text:?}"));
    let id = words.strip_prefix("Ok: queued as ").expect("K text");
    assert!(matches!(outcome.end, End::Replied(_)));
    assert_eq!(new_files.len(), 1, "K but new/ holds {new_files:?}");
    let name = new_files[0]
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    assert_eq!(name, format!("{id}.host.example"), "queue file name");
    let parts = check_split_all(&queued[0]).expect("queue file is a sequence of netstrings");
    assert!(
        parts.len() >= 4,
        "queue file has {} netstrings",
        parts.len()
    );
    let attributes = std::str::from_utf8(parts[0]).expect("attributes are UTF-8");
    assert!(attributes.starts_with("qmqpd-queue 1\n"), "{attributes:?}");
    assert!(
        attributes.contains(&format!("\nqueue_id={id}\n")),
        "{attributes:?}"
    );
    let want_addr = match client.addr {
        Some(addr) => format!("\nclient_address={addr}\n"),
        None => "\nclient_address=unknown\n".to_owned(),
    };
    assert!(attributes.contains(&want_addr), "{attributes:?}");
    assert!(
        !want_addr.contains("::ffff:"),
        "mapped address kept: {want_addr}"
    );
    let message = parts[1];
    assert!(
        message.starts_with(b"Received: from "),
        "our header comes first"
    );
    assert!(
        check_unconvert_mailbox_lines(message).ends_with(r.message),
        "the content is stored as received, but for its leading From_ lines"
    );
    assert_eq!(parts[2], r.sender, "sender stored as received");
    assert_eq!(
        &parts[3..],
        r.recipients.as_slice(),
        "recipients stored as received"
    );
    "K"
}

/// A stored message with its leading `X-Mailbox-Line: ` prefixes taken off again: our
/// Received: header (two lines), then the content as the client sent it (after an empty
/// line when it starts with white space).
fn check_unconvert_mailbox_lines(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = message;
    let mut lines = 0;
    while lines < 2 {
        let Some(end) = rest.iter().position(|&b| b == b'\n') else {
            break;
        };
        out.extend_from_slice(&rest[..=end]);
        rest = &rest[end + 1..];
        lines += 1;
    }
    while let Some(line) = rest.strip_prefix(b"X-Mailbox-Line: ") {
        let end = line.iter().position(|&b| b == b'\n').map_or(line.len(), |i| i + 1);
        out.extend_from_slice(&line[..end]);
        rest = &line[end..];
    }
    out.extend_from_slice(rest);
    out
}

/// `main.cf` parsing, `-o` overrides, expansion and validation, with `dir` as the
/// configuration directory.
///
/// `data` up to the first NUL is `main.cf`; each NUL-separated piece after it is one `-o`
/// argument. Invariants: no panic; `parse` gives entries with non-empty names free of
/// whitespace and `=`, values without surrounding whitespace, on increasing line numbers
/// that exist; a loaded configuration has parameters within their documented ranges, free
/// of control characters and no longer than 1 MiB once expanded (no unbounded allocation), and its `qmqpd -n` output loads again and prints the same
/// (postconf's round trip); an error has a message.
pub fn check_config(dir: &std::path::Path, data: &[u8]) -> &'static str {
    use qmqpd::config::{self, Source};

    check_install_logger();
    let mut pieces = data.split(|&b| b == 0);
    let main_cf = pieces.next().unwrap_or_default();
    let overrides: Vec<String> = pieces
        .take(8)
        .map(|piece| String::from_utf8_lossy(piece).into_owned())
        .collect();

    let lines = main_cf.split(|&b| b == b'\n').count();
    match config::parse(std::io::Cursor::new(main_cf), "main.cf") {
        Ok(entries) => {
            let mut last = 0;
            for entry in &entries {
                assert!(!entry.name.is_empty(), "empty name: {entry:?}");
                assert!(
                    !entry
                        .name
                        .contains(|c: char| c == '=' || c.is_ascii_whitespace()),
                    "name holds '=' or whitespace: {entry:?}"
                );
                assert_eq!(
                    entry.value,
                    entry
                        .value
                        .trim_matches([' ', '\t', '\n', '\r', '\x0b', '\x0c']),
                    "value keeps surrounding whitespace"
                );
                assert!(
                    entry.line > last && entry.line <= lines,
                    "line number {entry:?}"
                );
                last = entry.line;
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }

    let main_cf_path = dir.join("main.cf");
    std::fs::write(&main_cf_path, main_cf).expect("write main.cf");
    let source = Source {
        dir: Some(dir.to_path_buf()),
        mail_config: None,
        overrides,
    };
    let loaded = config::load(&source);
    let cfg = match loaded {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = std::fs::remove_file(&main_cf_path);
            assert!(!e.to_string().is_empty());
            return "error";
        }
    };
    let p = &cfg.params;
    // No unbounded allocation: a few hundred bytes of `$name` references can describe
    // gigabytes (each level repeating the one below), so an expanded value must be capped.
    for (name, len) in [
        ("qmqpd_authorized_clients", p.qmqpd_authorized_clients.len()),
        ("debug_peer_list", p.debug_peer_list.len()),
        ("myhostname", p.myhostname.len()),
        ("mail_name", p.mail_name.len()),
        ("mail_owner", p.mail_owner.len()),
        ("content_filter", p.content_filter.len()),
        ("receive_override_options", p.receive_override_options.len()),
        ("syslog_name", p.syslog_name.len()),
        ("maillog_file", p.maillog_file.len()),
        ("verp_delimiter_filter", p.verp_delimiter_filter.len()),
        ("queue_directory", p.queue_directory.as_os_str().len()),
    ] {
        assert!(
            len <= CHECK_EXPANSION_LIMIT,
            "{name} expanded to {len} bytes from a {}-byte input",
            data.len()
        );
    }
    assert!(!p.qmqpd_timeout.is_zero() && !p.daemon_timeout.is_zero() && !p.ipc_timeout.is_zero());
    assert!(p.line_length_limit >= 1 && p.hopcount_limit >= 1);
    assert!(p.max_use >= 1 && p.default_process_limit >= 1);
    assert!(!p.verp_delimiter_filter.is_empty() && !p.mail_owner.is_empty());
    assert!(!p.queue_directory.as_os_str().is_empty());
    for (name, value) in [
        ("qmqpd_authorized_clients", &p.qmqpd_authorized_clients),
        ("debug_peer_list", &p.debug_peer_list),
        ("myhostname", &p.myhostname),
        ("mail_name", &p.mail_name),
        ("mail_owner", &p.mail_owner),
        ("content_filter", &p.content_filter),
        ("syslog_name", &p.syslog_name),
        ("maillog_file", &p.maillog_file),
    ] {
        assert!(
            !value.contains(|c: char| c.is_control() && c != '\t'),
            "{name} holds a control character: {value:?}"
        );
    }
    for warning in &cfg.warnings {
        assert!(!warning.is_empty());
    }

    // postconf's round trip: `qmqpd -n` output is a main.cf that means the same. Known
    // exception (docs/reliability.md, finding 1): an `-o` name starting with `#` is accepted
    // as an unknown parameter, and `-n` prints it as a line main.cf reads as a comment.
    let ws = [' ', '\t', '\n', '\r', '\x0b', '\x0c'];
    if source.overrides.iter().any(|o| {
        o.trim_start_matches(ws)
            .trim_start_matches('{')
            .trim_start_matches(ws)
            .starts_with('#')
    }) {
        let _ = std::fs::remove_file(&main_cf_path);
        return "loaded";
    }
    let mut explicit = Vec::new();
    cfg.write_explicit(&mut explicit).expect("write -n");
    std::fs::write(&main_cf_path, &explicit).expect("write main.cf");
    let again = config::load(&Source {
        dir: Some(dir.to_path_buf()),
        mail_config: None,
        overrides: Vec::new(),
    });
    let _ = std::fs::remove_file(&main_cf_path);
    let again = again.unwrap_or_else(|e| {
        panic!(
            "qmqpd -n output does not load again: {e}\n{}",
            String::from_utf8_lossy(&explicit)
        )
    });
    let mut explicit_again = Vec::new();
    again.write_explicit(&mut explicit_again).expect("write -n");
    assert_eq!(
        String::from_utf8_lossy(&explicit),
        String::from_utf8_lossy(&explicit_again),
        "qmqpd -n is not stable"
    );
    "loaded"
}

/// Rewrites every `/file` pattern token of `text` (after any `!`s) to `file`, so the parser
/// reads only the scratch pattern file, never a file of the host.
fn check_confine_files(text: &str, file: &str) -> String {
    let is_separator = |c: char| matches!(c, ',' | ' ' | '\t' | '\r' | '\n' | '\x0b' | '\x0c');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(|c: char| !is_separator(c)).unwrap_or(rest.len());
        out.push_str(&rest[..start]);
        rest = &rest[start..];
        let end = rest.find(is_separator).unwrap_or(rest.len());
        let token = &rest[..end];
        let pattern = token.trim_start_matches('!');
        if pattern.starts_with('/') {
            out.push_str(&token[..token.len() - pattern.len()]);
            out.push_str(file);
        } else {
            out.push_str(token);
        }
        rest = &rest[end..];
    }
    out
}

/// Access-list parsing and matching, with a scratch pattern file in `dir`.
///
/// `data` up to the first NUL is the value of `qmqpd_authorized_clients`; the rest is the
/// content of the one pattern file every `/file` token names. Invariants: no panic; an
/// error has a message; a parsed list matches nothing when nothing is known of the client,
/// gives the same verdict for an IPv4 address and its IPv4-mapped IPv6 form (so that it
/// can neither bypass nor miss a rule) and for a name in any case, ignores names when it has
/// no name pattern, and when its first pattern is a plain address, matches that address (or,
/// negated, refuses it): the first match decides.
pub fn check_access(dir: &std::path::Path, data: &[u8]) -> &'static str {
    use qmqpd::access::MatchList;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    check_install_logger();
    let (value, file) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], &data[nul + 1..]),
        None => (data, &[][..]),
    };
    let file_path = dir.join("patterns");
    let file_name = file_path.to_string_lossy().into_owned();
    let value = check_confine_files(&String::from_utf8_lossy(value), &file_name);
    let file_text = check_confine_files(&String::from_utf8_lossy(file), &file_name);
    std::fs::write(&file_path, file_text.as_bytes()).expect("write pattern file");

    let parsed = MatchList::parse("qmqpd_authorized_clients", &value);
    let _ = std::fs::remove_file(&file_path);
    let list = match parsed {
        Ok(list) => list,
        Err(e) => {
            assert!(!e.to_string().is_empty());
            return "error";
        }
    };
    for warning in list.warnings() {
        assert!(!warning.is_empty());
    }
    assert!(!list.matches(None, None), "a client nobody knows matched");

    // Addresses and names to try: fixed ones, ones taken from the patterns, ones from bytes.
    let mut addrs: Vec<IpAddr> = vec![
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from([192, 0, 2, 1]),
        IpAddr::from([10, 1, 2, 3]),
        IpAddr::from(Ipv6Addr::LOCALHOST),
        "2001:db8::1".parse().expect("v6"),
    ];
    let mut names: Vec<String> = vec!["host.example.com".into(), "example.com".into()];
    let words = value
        .split([',', ' ', '\t', '\r', '\n'])
        .chain(file_text.split([',', ' ', '\t', '\r', '\n']));
    for word in words.take(64) {
        let bare = word.trim_start_matches('!');
        let bare = bare.trim_start_matches('[');
        let bare = bare.split(['/', ']']).next().unwrap_or_default();
        if let Ok(addr) = bare.parse::<IpAddr>() {
            addrs.push(addr);
        } else if !bare.is_empty() && bare.len() < 256 {
            names.push(bare.trim_start_matches('.').to_owned());
            names.push(format!("x.{}", bare.trim_start_matches('.')));
        }
    }
    for bytes in data.chunks_exact(4).take(8) {
        addrs.push(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]));
    }
    let mut named: Vec<Option<&str>> = names.iter().map(|n| Some(n.as_str())).collect();
    named.push(None);
    for &addr in &addrs {
        for &name in &named {
            let verdict = list.matches(name, Some(addr));
            if let IpAddr::V4(v4) = addr.to_canonical() {
                let mapped = IpAddr::V6(v4.to_ipv6_mapped());
                assert_eq!(
                    verdict,
                    list.matches(name, Some(mapped)),
                    "{addr} and {mapped} differ for name {name:?}"
                );
            }
            if let Some(name) = name {
                assert_eq!(
                    verdict,
                    list.matches(Some(&name.to_ascii_uppercase()), Some(addr)),
                    "name case changes the verdict for {name:?}"
                );
                if !list.needs_name() {
                    assert_eq!(verdict, list.matches(None, Some(addr)), "name used");
                }
            }
        }
    }

    // The first pattern decides for its own address.
    let first = value
        .split([',', ' ', '\t', '\r', '\n', '\x0b', '\x0c'])
        .find(|word| !word.is_empty());
    if let Some(first) = first {
        let bare = first.trim_start_matches('!');
        let negated = (first.len() - bare.len()) % 2 == 1;
        let addr = bare
            .parse::<Ipv4Addr>()
            .map(IpAddr::V4)
            .or_else(|_| bare.parse::<Ipv6Addr>().map(IpAddr::V6))
            .or_else(|_| {
                bare.strip_prefix('[')
                    .and_then(|b| b.strip_suffix(']'))
                    .unwrap_or("")
                    .parse::<Ipv6Addr>()
                    .map(IpAddr::V6)
            });
        if let Ok(addr) = addr {
            assert_eq!(
                list.matches(None, Some(addr)),
                !negated,
                "first pattern {first:?} does not decide for {addr}"
            );
        }
    }
    "parsed"
}

/// A scratch directory for one fuzzing process: on /dev/shm when there is one (fsync costs
/// nothing on tmpfs, so more executions per second), else the system's temporary directory.
/// A reader over a byte slice that hands out at most `chunk` bytes a call and counts what
/// was taken, so the PROXY reader is seen not to read past the header.
struct CheckCounted<'a> {
    data: &'a [u8],
    pos: usize,
    chunk: usize,
}

impl std::io::Read for CheckCounted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let rest = &self.data[self.pos..];
        let n = rest.len().min(buf.len()).min(self.chunk);
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

/// The PROXY header reader over arbitrary bytes: it takes at most one header's bytes (v1 at
/// most 107, v2 at most 16 plus its cap), ends a v1 header exactly at its CRLF and a v2 one
/// exactly at its declared length, gives the same answer whatever the read sizes, agrees
/// with the whole-header parsers, and a TCP4 header prints back to the bytes it came from.
pub fn check_proxy(data: &[u8]) -> &'static str {
    use qmqpd::proxy::{self, Header, ProxyError};

    let read = |chunk: usize| {
        let mut rdr = CheckCounted {
            data,
            pos: 0,
            chunk,
        };
        let result = proxy::read_header(&mut rdr);
        (result, rdr.pos)
    };
    let (result, used) = read(usize::MAX);
    let (again, used_again) = read(1 + data.len() % 7);
    assert_eq!(used, used_again, "the read sizes changed how much was read");
    assert_eq!(
        format!("{result:?}"),
        format!("{again:?}"),
        "the read sizes changed the answer"
    );
    assert!(used <= 16 + proxy::V2_MAX_LEN, "read {used} bytes");
    let header = &data[..used];
    let is_v2 = header.starts_with(&proxy::V2_SIGNATURE);
    if !is_v2 {
        assert!(used <= proxy::V1_MAX_LEN, "read {used} bytes of a v1 header");
    }
    let header_ok = match &result {
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty() && text.len() <= CHECK_LINE_LIMIT, "{text:?}");
            match e {
                ProxyError::Eof => assert_eq!(used, data.len(), "Eof before the end"),
                ProxyError::Closed => assert!(data.is_empty(), "Closed with input"),
                ProxyError::Missing { .. } => assert!(used <= 12),
                _ => {}
            }
            return "error";
        }
        Ok(h) => h,
    };
    if is_v2 {
        let [_, _, hi, lo] = header[12..16] else {
            panic!("a v2 header of {used} bytes");
        };
        assert_eq!(used, 16 + usize::from(u16::from_be_bytes([hi, lo])));
        assert_eq!(&proxy::parse_v2(header).expect("parse_v2 of a read header"), header_ok);
    } else {
        assert!(header.ends_with(b"\r\n"), "a v1 header not ending in CRLF");
        assert_eq!(
            header.iter().filter(|&&b| b == b'\n').count(),
            1,
            "a v1 header with more than one line"
        );
        assert_eq!(&proxy::parse_v1(header).expect("parse_v1 of a read header"), header_ok);
    }
    match header_ok {
        Header::Proxied {
            version: 1,
            source,
            destination,
        } if source.is_ipv4() => {
            let line = format!(
                "PROXY TCP4 {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            );
            assert_eq!(line.as_bytes(), header, "TCP4 header does not print back");
            "v1"
        }
        Header::Proxied { version: 1, .. } => "v1",
        Header::Proxied { .. } => "v2",
        Header::Local => "local",
        Header::Unknown { .. } => "unknown",
    }
}

/// libFuzzer exits without running destructors, so it stays behind; its name starts with
/// `qmqpd-fuzz.`. (Unused by the replay, which gives each input a directory of its own.)
#[allow(dead_code)]
fn check_scratch_dir() -> &'static std::path::Path {
    static SCRATCH: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    SCRATCH.get_or_init(|| {
        let shm = std::path::Path::new("/dev/shm");
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("qmqpd-fuzz.");
            b
        };
        let dir = if shm.is_dir() {
            builder.tempdir_in(shm)
        } else {
            builder.tempdir()
        };
        dir.expect("scratch directory").keep()
    })
}
