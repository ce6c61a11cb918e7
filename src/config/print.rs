//! `qmqpd -n` and `qmqpd -d`: settings printed as postconf prints them, `name = value`
//! sorted by name, whitespace runs in the value made single spaces.

use std::io::{self, Write};

use super::file::is_space;
use super::params::{Builtin, TABLE, default_hostname};
use super::{Config, DEFAULT_CONFIG_DIR, PROCESS_NAME, Setting};

/// Write `name = value` with whitespace runs in the value made single spaces, as postconf.
fn write_setting<W: Write>(w: &mut W, name: &str, value: &str) -> io::Result<()> {
    let mut line = String::with_capacity(name.len() + value.len() + 4);
    line.push_str(name);
    line.push_str(" =");
    for word in value.split(is_space).filter(|word| !word.is_empty()) {
        line.push(' ');
        line.push_str(word);
    }
    line.push('\n');
    w.write_all(line.as_bytes())
}

impl Config {
    /// `qmqpd -n`: parameters set in main.cf or with -o, unexpanded, `name = value`, sorted by name.
    pub fn write_explicit<W: Write>(&self, mut w: W) -> io::Result<()> {
        let mut settings: Vec<&Setting> = self.explicit.iter().collect();
        settings.sort_by(|a, b| a.name.cmp(&b.name));
        for setting in settings {
            write_setting(&mut w, &setting.name, &setting.value)?;
        }
        w.flush()
    }
}

/// `qmqpd -d`: every parameter's default, `name = value`, sorted by name (postconf's format).
pub fn write_defaults<W: Write>(mut w: W) -> io::Result<()> {
    let hostname = default_hostname();
    let process_id = std::process::id().to_string();
    let mut lines: Vec<(&str, &str)> = TABLE
        .iter()
        .map(|row| match row.default {
            Builtin::Fixed(text) => (row.name, text),
            Builtin::Hostname => (row.name, hostname.as_str()),
        })
        .collect();
    lines.push(("config_directory", DEFAULT_CONFIG_DIR));
    lines.push(("process_id", &process_id));
    lines.push(("process_name", PROCESS_NAME));
    lines.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (name, value) in lines {
        write_setting(&mut w, name, value)?;
    }
    w.flush()
}
