use std::path::PathBuf;
use std::time::Duration;

use super::file::split_override;
use super::params::{Builtin, TABLE};
use super::*;

fn entries(text: &str) -> Vec<Entry> {
    parse(text.as_bytes(), "main.cf").unwrap()
}

fn config(text: &str, overrides: &[&str]) -> Result<Config, ConfigError> {
    let mut warnings = Vec::new();
    let entries = read_entries(text.as_bytes(), "main.cf", &mut warnings)?;
    let overrides: Vec<String> = overrides.iter().map(|arg| arg.to_string()).collect();
    build(
        &entries,
        "main.cf",
        &overrides,
        PathBuf::from("/etc/qmqpd"),
        warnings,
    )
}

fn params(text: &str) -> Params {
    config(text, &[]).unwrap().params
}

fn error(text: &str) -> String {
    config(text, &[]).unwrap_err().to_string()
}

fn explicit(config: &Config) -> String {
    let mut out = Vec::new();
    config.write_explicit(&mut out).unwrap();
    String::from_utf8(out).unwrap()
}

#[test]
fn parse_joins_continuation_keeping_leading_whitespace() {
    let got = entries("a = one,\n  two\n\tthree\nb=x\n");
    assert_eq!(
        got,
        vec![
            Entry {
                line: 1,
                name: "a".into(),
                value: "one,  two\tthree".into()
            },
            Entry {
                line: 4,
                name: "b".into(),
                value: "x".into()
            },
        ]
    );
}

#[test]
fn parse_keeps_logical_line_open_across_comments_and_blank_lines() {
    let got = entries("a = 1\n# note\n\n   \n  2\n#x\nb = 3");
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].value, "1  2");
    assert_eq!((got[1].line, got[1].value.as_str()), (7, "3"));
}

#[test]
fn parse_treats_hash_after_text_as_value() {
    let got = entries("  # indented comment\na = x # not a comment\n");
    assert_eq!(got[0].value, "x # not a comment");
}

#[test]
fn parse_trims_whitespace_and_carriage_returns() {
    let got = entries("name\t =  value  \r\n  more \r\nother=\r\n");
    assert_eq!(got[0].name, "name");
    assert_eq!(got[0].value, "value    more");
    assert_eq!(got[1].value, "");
}

#[test]
fn parse_warns_on_continuation_without_logical_line() {
    let mut warnings = Vec::new();
    let got = read_entries(
        "# head\n  orphan = 1\n  more\na = 2\n".as_bytes(),
        "main.cf",
        &mut warnings,
    )
    .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].line, got[0].name.as_str()), (4, "a"));
    assert_eq!(
        warnings,
        vec!["main.cf, line 2: logical line must not start with whitespace: \"orphan = 1\""]
    );
}

#[test]
fn parse_rejects_missing_equals_naming_file_and_line() {
    let err = parse("a = 1\n\nbroken value\n".as_bytes(), "/etc/qmqpd/main.cf").unwrap_err();
    assert_eq!(
        err.to_string(),
        "/etc/qmqpd/main.cf, line 3: missing '=' after attribute name: \"broken value\""
    );
}

#[test]
fn parse_reports_first_line_of_continued_logical_line() {
    let err = parse("a = 1\nbroken\n  value\n".as_bytes(), "main.cf").unwrap_err();
    assert_eq!(
        err.to_string(),
        "main.cf, line 2: missing '=' after attribute name: \"broken  value\""
    );
}

#[test]
fn parse_rejects_missing_name() {
    let err = parse("= value\n".as_bytes(), "main.cf").unwrap_err();
    assert_eq!(
        err.to_string(),
        "main.cf, line 1: missing attribute name: \"= value\""
    );
}

#[test]
fn parse_rejects_invalid_utf8() {
    let err = parse(&b"a = \xff\n"[..], "main.cf").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("main.cf, line 1: invalid UTF-8")
    );
}

#[test]
fn parse_ignores_invalid_utf8_in_comments() {
    let got = parse(&b"# caf\xe9\na = b\n"[..], "main.cf").unwrap();
    assert_eq!(got[0].value, "b");
}

#[test]
fn parse_truncates_at_nul_with_warning() {
    let mut warnings = Vec::new();
    let got = read_entries(&b"a = x\0y\n"[..], "main.cf", &mut warnings).unwrap();
    assert_eq!(got[0].value, "x");
    assert_eq!(
        warnings,
        vec!["main.cf, line 1: text after null byte ignored"]
    );
}

#[test]
fn build_duplicate_name_last_wins_with_warning() {
    let config = config("mail_name = one\nmail_name = two\n", &[]).unwrap();
    assert_eq!(config.params.mail_name, "two");
    assert_eq!(
        config.warnings,
        vec!["main.cf, line 2: overriding earlier entry: mail_name=one"]
    );
    assert_eq!(explicit(&config), "mail_name = two\n");
}

#[test]
fn build_defaults_match_params_default() {
    let built = config("", &[]).unwrap();
    assert_eq!(
        format!("{:?}", built.params),
        format!("{:?}", Params::default())
    );
    assert!(built.warnings.is_empty());
}

#[test]
fn table_names_unique_and_fixed_defaults_valid() {
    let mut names: Vec<&str> = TABLE.iter().map(|row| row.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), TABLE.len());
    for row in TABLE {
        assert!(!READ_ONLY.contains(&row.name), "{}", row.name);
        if let Builtin::Fixed(text) = row.default {
            // Each default, set explicitly, must pass its own validation.
            let setting = format!("{}={text}", row.name);
            assert!(config("", &[&setting]).is_ok(), "{setting}");
        }
    }
}

#[test]
fn expand_dollar_name_braces_and_parens() {
    let p = params("x = X\nmail_name = a$x-${x}-$(x)b\n");
    assert_eq!(p.mail_name, "aX-X-Xb");
}

#[test]
fn expand_double_dollar_is_literal_dollar() {
    let p = params("mail_name = a$$x$$\n");
    assert_eq!(p.mail_name, "a$x$");
}

#[test]
fn expand_undefined_name_is_empty() {
    let p = params("mail_name = [$nothing_here]\n");
    assert_eq!(p.mail_name, "[]");
}

#[test]
fn expand_is_recursive_and_uses_defaults() {
    let p = params("a = $b/$mail_owner\nb = ${c}\nc = C$$\nmail_name = $a\n");
    assert_eq!(p.mail_name, "C$/qmqpd");
}

#[test]
fn expand_read_only_parameters() {
    let p =
        params("queue_directory = $config_directory/q\nmail_name = $process_name:$process_id\n");
    assert_eq!(p.queue_directory, PathBuf::from("/etc/qmqpd/q"));
    assert_eq!(p.mail_name, format!("qmqpd:{}", std::process::id()));
}

#[test]
fn expand_conditional_forms() {
    let text = "full = F\nempty =\n\
                mail_name = <${full?yes}|${empty?yes}|${full:no}|${empty:no}|${unset:$full}>\n";
    assert_eq!(params(text).mail_name, "<yes|||no|F>");
}

#[test]
fn expand_conditional_curly_ternary() {
    let text = "full = F\n\
                mail_name = ${full?{a}:{b}}/${nope?{a} : {b}}/${full?{$full}:b}\n";
    assert_eq!(params(text).mail_name, "a/b/F");
}

#[test]
fn expand_conditional_plain_text_keeps_colon() {
    // Postfix 2.x compatibility: unbraced text after '?' runs to the end.
    assert_eq!(params("x = 1\nmail_name = ${x?a:b}\n").mail_name, "a:b");
}

#[test]
fn expand_detects_loop_naming_parameter() {
    let err = error("a = $b\nb = ${a}\nmail_name = x$a\n");
    assert_eq!(
        err,
        "main.cf, line 3: macro loop in parameter \"mail_name\": mail_name -> a -> b -> a"
    );
}

#[test]
fn expand_detects_self_reference() {
    let err = error("mail_name = x$mail_name\n");
    assert_eq!(
        err,
        "main.cf, line 1: macro loop in parameter \"mail_name\": mail_name -> mail_name"
    );
}

#[test]
fn expand_test_of_own_value_is_not_loop() {
    assert_eq!(params("mail_name = ${mail_name?set}\n").mail_name, "set");
}

#[test]
fn expand_rejects_syntax_errors() {
    assert_eq!(
        error("mail_name = ${x\n"),
        "main.cf, line 1: cannot expand mail_name: truncated macro reference: \"${x\""
    );
    assert_eq!(
        error("mail_name = a$\n"),
        "main.cf, line 1: cannot expand mail_name: empty macro name: \"a$\""
    );
    assert!(error("mail_name = $-\n").contains("empty macro name"));
    assert!(error("mail_name = ${}\n").contains("empty macro name"));
    assert!(error("mail_name = ${a-b}\n").contains("attribute name syntax error"));
    assert!(error("mail_name = ${a?{b}x}\n").contains("\":\" expected"));
    assert!(error("mail_name = ${a?{b}:{c}d}\n").contains("unexpected input"));
    assert!(error("mail_name = ${a?{b}\n").contains("truncated macro reference"));
    assert!(error("mail_name = ${{a} == {b}?x}\n").contains("not supported"));
}

#[test]
fn expand_bounds_expanded_size() {
    let mut text = String::from("a = xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\n");
    for i in 0..30 {
        let prev = if i == 0 {
            "a".to_owned()
        } else {
            format!("b{}", i - 1)
        };
        text.push_str(&format!("b{i} = ${prev}${prev}\n"));
    }
    text.push_str("mail_name = $b29\n");
    let entries = parse(text.as_bytes(), "main.cf").unwrap();
    let err = build(
        &entries,
        "main.cf",
        &[],
        PathBuf::from("/etc/qmqpd"),
        Vec::new(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("expanded value is longer than"), "{err}");
}

#[test]
fn parse_rejects_names_that_expansion_cannot_reach() {
    assert!(split_override("#x=1").is_err());
    assert!(split_override("a-b=1").is_err());
    assert!(split_override("good_name2=1").is_ok());
    assert!(parse(&b"a.b = 1\n"[..], "main.cf").is_err());
}

#[test]
fn expand_bounds_nesting() {
    let mut value = String::new();
    for _ in 0..150 {
        value.push_str("${mail_owner?");
    }
    value.push('x');
    for _ in 0..150 {
        value.push('}');
    }
    let err = error(&format!("mail_name = {value}\n"));
    assert!(err.contains("unreasonable macro call nesting"), "{err}");
}

#[test]
fn override_replaces_file_value() {
    let config = config("mail_name = file\n", &["mail_name=cli", "max_use=5"]).unwrap();
    assert_eq!(config.params.mail_name, "cli");
    assert_eq!(config.params.max_use, 5);
    assert!(config.warnings.is_empty());
    assert_eq!(explicit(&config), "mail_name = cli\nmax_use = 5\n");
}

#[test]
fn override_accepts_brace_form() {
    let config = config("", &["{ mail_name = a  b }", " {syslog_name=x}"]).unwrap();
    assert_eq!(config.params.mail_name, "a  b");
    assert_eq!(config.params.syslog_name, "x");
}

#[test]
fn override_expands_against_file() {
    let config = config("base = /srv\n", &["queue_directory=$base/q"]).unwrap();
    assert_eq!(config.params.queue_directory, PathBuf::from("/srv/q"));
}

#[test]
fn override_rejects_bad_syntax() {
    let err = config("", &["mail_name"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "-o mail_name: missing '=' after attribute name: \"mail_name\""
    );
    let err = config("", &["{ a = b"]).unwrap_err();
    assert!(err.to_string().starts_with("-o { a = b: missing '}'"));
}

#[test]
fn override_validation_error_names_argument() {
    let err = config("", &["qmqpd_timeout=0"]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "-o qmqpd_timeout=0: bad qmqpd_timeout value \"0\": must be greater than zero"
    );
}

#[test]
fn unknown_parameter_is_warning() {
    let config = config("foo = 1\nmail_name = x\n", &["bar=2"]).unwrap();
    assert_eq!(
        config.warnings,
        vec![
            "main.cf, line 1: unknown parameter \"foo\"",
            "-o bar=2: unknown parameter \"bar\"",
        ]
    );
}

#[test]
fn unknown_parameter_referenced_by_value_is_not_warned() {
    let config = config(
        "mynetworks = 10.0.0.0/8\nqmqpd_authorized_clients = ${mynetworks}, $$x\n",
        &[],
    )
    .unwrap();
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    assert_eq!(config.params.qmqpd_authorized_clients, "10.0.0.0/8, $x");
}

#[test]
fn read_only_parameter_setting_is_ignored() {
    let config = config("process_name = evil\nmail_name = $process_name\n", &[]).unwrap();
    assert_eq!(config.params.mail_name, "qmqpd");
    assert_eq!(
        config.warnings,
        vec!["main.cf, line 1: parameter \"process_name\" is read-only; setting ignored"]
    );
    assert_eq!(explicit(&config), "mail_name = $process_name\n");
}

#[test]
fn validate_times() {
    assert_eq!(
        error("x = 1\nqmqpd_timeout = 0s\n"),
        "main.cf, line 2: bad qmqpd_timeout value \"0s\": must be greater than zero"
    );
    assert_eq!(
        error("daemon_timeout = 5x\n"),
        "main.cf, line 1: bad daemon_timeout value \"5x\": unit must be one of s, m, h, d, w"
    );
    assert!(error("ipc_timeout = 0\n").starts_with("main.cf, line 1: bad ipc_timeout"));
    let p = params("qmqpd_error_delay = 0\nmax_idle = 0s\nqmqpd_timeout = 2m\n");
    assert_eq!(p.qmqpd_error_delay, Duration::ZERO);
    assert_eq!(p.max_idle, Duration::ZERO);
    assert_eq!(p.qmqpd_timeout, Duration::from_secs(120));
}

#[test]
fn validate_booleans() {
    assert_eq!(
        error("soft_bounce = true\n"),
        "main.cf, line 1: bad soft_bounce value \"true\": expected \"yes\" or \"no\""
    );
    let p = params("soft_bounce = YES\nqmqpd_peername_lookup = no\n");
    assert!(p.soft_bounce);
    assert!(!p.qmqpd_peername_lookup);
}

#[test]
fn validate_integers() {
    assert_eq!(
        error("hopcount_limit = +5\n"),
        "main.cf, line 1: bad hopcount_limit value \"+5\": expected an unsigned decimal number"
    );
    assert!(error("max_use = -1\n").contains("expected an unsigned decimal number"));
    assert!(error("max_use = 99999999999999999999\n").contains("number too large"));
    assert_eq!(
        error("line_length_limit = 0\n"),
        "main.cf, line 1: bad line_length_limit value \"0\": must be at least 1"
    );
    assert!(error("default_process_limit = 0\n").contains("must be at least 1"));
    assert_eq!(
        error("debug_peer_level = 4294967296\n"),
        "main.cf, line 1: bad debug_peer_level value \"4294967296\": number too large"
    );
    let p = params("message_size_limit = 0\ndebug_peer_level = 4294967295\n");
    assert_eq!(p.size_limit(), None);
    assert_eq!(p.debug_peer_level, u32::MAX);
    assert_eq!(Params::default().size_limit(), Some(10_240_000));
}

#[test]
fn validate_syslog_facility() {
    assert_eq!(
        params("syslog_facility = LOG_Local3\n").syslog_facility,
        "local3"
    );
    assert_eq!(
        params("syslog_facility = AUTHPRIV\n").syslog_facility,
        "authpriv"
    );
    assert_eq!(
        error("syslog_facility = local8\n"),
        "main.cf, line 1: bad syslog_facility value \"local8\": unknown syslog facility"
    );
}

#[test]
fn validate_non_empty_strings() {
    assert_eq!(
        error("verp_delimiter_filter =\n"),
        "main.cf, line 1: bad verp_delimiter_filter value \"\": must not be empty"
    );
    assert!(error("mail_owner = $unset\n").starts_with("main.cf, line 1: bad mail_owner"));
    assert!(error("queue_directory =\n").starts_with("main.cf, line 1: bad queue_directory"));
}

#[test]
fn validate_content_filter() {
    for good in [
        "",
        "smtp:",
        "scan:[127.0.0.1]:10025",
        "lmtp:unix:/run/x",
        "a.b_c-d:host",
    ] {
        assert_eq!(
            params(&format!("content_filter = {good}\n")).content_filter,
            good
        );
    }
    assert_eq!(
        error("content_filter = :host\n"),
        "main.cf, line 1: bad content_filter value \":host\": empty transport name"
    );
    assert!(error("content_filter = smtp\n").contains("expected transport:"));
    assert!(error("content_filter = sm/tp:x\n").contains("bad character '/'"));
    assert!(error("content_filter = smtp:[::1\n").contains("missing ']'"));
    assert!(error("content_filter = smtp:[::1]:99999\n").contains("bad port"));
    assert!(error("content_filter = smtp:a b\n").contains("whitespace"));
}

#[test]
fn validate_receive_override_options() {
    let text = "receive_override_options = no_milters, no_address_mappings no_header_body_checks\n";
    assert_eq!(
        params(text).receive_override_options,
        "no_milters, no_address_mappings no_header_body_checks"
    );
    assert!(
        error("receive_override_options = no_milters,no_unknown_recipient_checks,bogus\n")
            .starts_with(
                "main.cf, line 1: bad receive_override_options value \"no_milters,no_unknown_recipient_checks,bogus\": unknown option \"bogus\""
            )
    );
}

#[test]
fn validate_myhostname() {
    assert_eq!(
        params("myhostname = mx.example.org\n").myhostname,
        "mx.example.org"
    );
    assert!(error("myhostname = bad..name\n").contains("misplaced dot"));
    assert!(error("myhostname = 192.0.2.1\n").contains("numeric host name"));
    assert!(error("myhostname = a b\n").contains("invalid character"));
}

#[test]
fn validate_rejects_control_characters() {
    let err = config("", &["mail_name=a\r\nX-Evil: 1"]).unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");
}

#[test]
fn parse_time_accepts_suffixes() {
    assert_eq!(parse_time("0"), Ok(Duration::ZERO));
    assert_eq!(parse_time("7"), Ok(Duration::from_secs(7)));
    assert_eq!(parse_time("7s"), Ok(Duration::from_secs(7)));
    assert_eq!(parse_time("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_time("3h"), Ok(Duration::from_secs(10800)));
    assert_eq!(parse_time("1d"), Ok(Duration::from_secs(86400)));
    assert_eq!(parse_time("2w"), Ok(Duration::from_secs(1_209_600)));
    assert_eq!(
        parse_time("2147483647"),
        Ok(Duration::from_secs(2_147_483_647))
    );
}

#[test]
fn parse_time_rejects_bad_values() {
    for bad in ["", "s", "-1", "+1", "1.5s", "1 s", "1S", "1ms", "1x"] {
        assert!(parse_time(bad).is_err(), "{bad}");
    }
    assert_eq!(
        parse_time("5x").unwrap_err(),
        "bad time value \"5x\": unit must be one of s, m, h, d, w"
    );
    assert!(parse_time("2147483648").unwrap_err().contains("too large"));
    assert!(
        parse_time("99999999999999999999w")
            .unwrap_err()
            .contains("too large")
    );
}

#[test]
fn write_explicit_sorts_normalises_and_keeps_unexpanded() {
    let config = config(
        "z = 1\nqmqpd_authorized_clients = $z,\n    10.0.0.0/8\t [::1]\nmail_name =\n",
        &["a={ x }", "{ b = y  z }"],
    )
    .unwrap();
    assert_eq!(
        explicit(&config),
        "a = { x }\nb = y z\nmail_name =\nqmqpd_authorized_clients = $z, 10.0.0.0/8 [::1]\nz = 1\n"
    );
}

#[test]
fn write_defaults_prints_sorted_table() {
    let mut out = Vec::new();
    write_defaults(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let names: Vec<&str> = lines
        .iter()
        .map(|line| line.split(" =").next().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(lines.len(), TABLE.len() + READ_ONLY.len());
    for expected in [
        "config_directory = /etc/qmqpd",
        "content_filter =",
        "daemon_timeout = 18000s",
        "debug_peer_level = 2",
        "max_idle = 100s",
        "message_size_limit = 10240000",
        "process_name = qmqpd",
        "qmqpd_authorized_clients = 127.0.0.0/8, [::1]/128",
        "qmqpd_client_port_logging = no",
        "qmqpd_error_delay = 1s",
        "qmqpd_peername_lookup = yes",
        "qmqpd_timeout = 300s",
        "verp_delimiter_filter = -=+",
    ] {
        assert!(lines.contains(&expected), "{expected}");
    }
    let host = lines
        .iter()
        .find_map(|line| line.strip_prefix("myhostname = "))
        .unwrap();
    assert!(host.contains('.'));
}

#[test]
fn load_missing_default_file_means_defaults() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = load_from(dir.path(), false, &["mail_name=x".to_string()]).unwrap();
    assert_eq!(config.params.mail_name, "x");
    assert_eq!(config.config_directory, dir.path());
}

#[test]
fn load_missing_named_file_is_error() {
    let dir = tempfile::TempDir::new().unwrap();
    let source = Source {
        dir: Some(dir.path().to_path_buf()),
        ..Source::default()
    };
    let err = load(&source).unwrap_err();
    let main_cf = dir.path().join("main.cf");
    assert!(
        err.to_string()
            .starts_with(&format!("cannot read {}: ", main_cf.display())),
        "{err}"
    );
    let source = Source {
        mail_config: Some(dir.path().to_path_buf()),
        ..Source::default()
    };
    assert!(matches!(load(&source), Err(ConfigError::Read { .. })));
}

#[test]
fn load_reads_main_cf_from_dir_before_mail_config() {
    let dir = tempfile::TempDir::new().unwrap();
    let other = tempfile::TempDir::new().unwrap();
    std::fs::write(
        dir.path().join("main.cf"),
        "# test\nqueue_directory = $config_directory/queue\nfoo = bar\n",
    )
    .unwrap();
    let source = Source {
        dir: Some(dir.path().to_path_buf()),
        mail_config: Some(other.path().to_path_buf()),
        overrides: vec!["max_use=7".into()],
    };
    let config = load(&source).unwrap();
    assert_eq!(config.params.queue_directory, dir.path().join("queue"));
    assert_eq!(config.params.max_use, 7);
    assert_eq!(config.config_directory, dir.path());
    let main_cf = dir.path().join("main.cf");
    assert_eq!(
        config.warnings,
        vec![format!(
            "{}, line 3: unknown parameter \"foo\"",
            main_cf.display()
        )]
    );
}

#[test]
fn load_error_names_file_and_line() {
    let dir = tempfile::TempDir::new().unwrap();
    std::fs::write(dir.path().join("main.cf"), "\n\nmax_idle = soon\n").unwrap();
    let source = Source {
        mail_config: Some(dir.path().to_path_buf()),
        ..Source::default()
    };
    let err = load(&source).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "{}, line 3: bad max_idle value \"soon\": expected a number with an optional unit s, m, h, d or w",
            dir.path().join("main.cf").display()
        )
    );
}

#[test]
fn params_upstream_proxy_and_agent_check() {
    let p = Params::default();
    assert!(!p.qmqpd_upstream_proxy_protocol);
    assert_eq!(p.qmqpd_upstream_proxy_timeout, Duration::from_secs(5));
    assert_eq!(p.qmqpd_agent_check_listen, "");
    let p = params(
        "qmqpd_upstream_proxy_protocol = haproxy\nqmqpd_upstream_proxy_timeout = 2s\n\
         qmqpd_agent_check_listen = [2001:db8::1]:8628\nqmqpd_agent_check_minfree = 0\n",
    );
    assert!(p.qmqpd_upstream_proxy_protocol);
    assert_eq!(p.qmqpd_upstream_proxy_timeout, Duration::from_secs(2));
    assert_eq!(p.qmqpd_agent_check_listen, "[2001:db8::1]:8628");
    assert_eq!(p.qmqpd_agent_check_minfree, 0);
    assert!(error("qmqpd_upstream_proxy_protocol = nginx\n").contains("haproxy"));
    assert!(error("qmqpd_upstream_proxy_timeout = 0\n").contains("greater than zero"));
    assert!(error("qmqpd_agent_check_listen = localhost:80\n").contains("address:port"));
}

#[test]
fn params_queue_commit_method() {
    use crate::queue::CommitMethod;
    assert_eq!(Params::default().queue_commit_method, CommitMethod::Auto);
    for (value, method) in [
        ("auto", CommitMethod::Auto),
        ("linkat", CommitMethod::Linkat),
        (" rename ", CommitMethod::Rename),
    ] {
        let p = params(&format!("queue_commit_method = {value}\n"));
        assert_eq!(p.queue_commit_method, method, "{value}");
    }
    let e = error("queue_commit_method = link\n");
    assert!(e.contains("\"auto\", \"linkat\" or \"rename\""), "{e}");
}
