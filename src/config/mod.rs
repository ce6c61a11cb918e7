//! Configuration: `main.cf` in Postfix syntax, `-o name=value` overrides, and the typed
//! parameters qmqpd uses. Owns parsing, `$name` expansion and validation; does not know
//! about sockets, logging backends or the access-list syntax (see `access`).
//!
//! Order of work in [`load`]: read the logical lines of `main.cf` ([`parse`], in `file`),
//! apply the `-o` overrides (last setting of a name wins), warn about unknown names, then
//! expand (`expand`) and validate (`value`) every parameter of the table (`params`) into
//! [`Params`]. The unexpanded settings are kept for `qmqpd -n` ([`Config::write_explicit`],
//! in `print`).

mod expand;
mod file;
mod params;
mod print;
mod value;

use std::borrow::Cow;
use std::cell::OnceCell;
use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use expand::{Resolver, for_each_reference};
use file::{read_entries, split_override};

pub use file::{Entry, parse};
pub use params::Params;
pub use print::write_defaults;
pub use value::parse_time;

/// Why a value is not acceptable, as the value parsers say it.
pub(crate) type Reason = Cow<'static, str>;

pub(crate) const DEFAULT_CONFIG_DIR: &str = "/etc/qmqpd";

/// Where the configuration comes from (already extracted from argv/env by the binary).
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// `-c DIR` (a missing `main.cf` there is an error).
    pub dir: Option<PathBuf>,
    /// `$MAIL_CONFIG` (a missing `main.cf` there is an error too; empty counts as unset).
    pub mail_config: Option<PathBuf>,
    /// Each `-o` argument, `name=value` (or `{ name = value }`).
    pub overrides: Vec<String>,
}

/// The loaded configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Every known parameter, expanded and validated.
    pub params: Params,
    /// Problems that do not stop qmqpd, e.g. `/etc/qmqpd/main.cf, line 7: unknown parameter "foo"`.
    pub warnings: Vec<String>,
    /// The directory `main.cf` was looked for in.
    pub config_directory: PathBuf,
    /// The explicit settings (file, then `-o`), unexpanded, one per name, for `-n`.
    explicit: Vec<Setting>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `main.cf` could not be opened or read.
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    /// A logical line or `-o` argument is not `name = value`.
    #[error("{origin}: {reason}: \"{text}\"")]
    Syntax {
        origin: String,
        reason: &'static str,
        text: String,
    },
    /// A parameter's (expanded) value is not acceptable.
    #[error("{origin}: bad {name} value \"{value}\": {reason}")]
    Invalid {
        origin: String,
        name: &'static str,
        value: String,
        reason: Cow<'static, str>,
    },
    /// A `$` expression in a parameter's value cannot be expanded.
    #[error("{origin}: cannot expand {name}: {reason}")]
    Expand {
        origin: String,
        name: &'static str,
        reason: String,
    },
    /// Expanding a parameter leads back to a parameter being expanded.
    #[error("{origin}: macro loop in parameter \"{name}\": {chain}")]
    Loop {
        origin: String,
        name: &'static str,
        chain: String,
    },
}

/// Parameters that exist only for `$name` expansion and cannot be set.
const READ_ONLY: [&str; 3] = ["config_directory", "process_id", "process_name"];

/// Our process name, for `$process_name` and the default syslog tag.
const PROCESS_NAME: &str = "qmqpd";

/// One explicit setting: from `main.cf` or `-o`, unexpanded.
#[derive(Debug, Clone)]
pub(crate) struct Setting {
    name: String,
    value: String,
    /// `FILE, line N` or `-o ARG`, for messages.
    origin: String,
}

/// Load the configuration: `main.cf` from the chosen directory, then the `-o` overrides.
pub fn load(source: &Source) -> Result<Config, ConfigError> {
    let mail_config = source
        .mail_config
        .as_ref()
        .filter(|dir| !dir.as_os_str().is_empty());
    match (&source.dir, mail_config) {
        (Some(dir), _) | (None, Some(dir)) => load_from(dir, true, &source.overrides),
        (None, None) => load_from(Path::new(DEFAULT_CONFIG_DIR), false, &source.overrides),
    }
}

/// Load `dir/main.cf`; a missing file is an error only when the directory was `named`.
fn load_from(dir: &Path, named: bool, overrides: &[String]) -> Result<Config, ConfigError> {
    let path = dir.join("main.cf");
    let mut warnings = Vec::new();
    let origin = path.to_string_lossy();
    let entries = match File::open(&path) {
        Ok(file) => {
            read_entries(BufReader::new(file), &origin, &mut warnings).map_err(|err| match err {
                // The reader only knows the origin text; give the real path back.
                ConfigError::Read { source, .. } => ConfigError::Read {
                    path: path.clone(),
                    source,
                },
                other => other,
            })?
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound && !named => Vec::new(),
        Err(source) => return Err(ConfigError::Read { path, source }),
    };
    build(&entries, &origin, overrides, dir.to_path_buf(), warnings)
}

/// Merge entries and overrides, warn, expand and validate.
fn build(
    entries: &[Entry],
    file_origin: &str,
    overrides: &[String],
    config_directory: PathBuf,
    mut warnings: Vec<String>,
) -> Result<Config, ConfigError> {
    let mut explicit: Vec<Setting> = Vec::with_capacity(entries.len() + overrides.len());
    for entry in entries {
        let origin = format!("{file_origin}, line {}", entry.line);
        set(
            &mut explicit,
            &entry.name,
            &entry.value,
            origin,
            true,
            &mut warnings,
        );
    }
    for arg in overrides {
        let (name, value) = split_override(arg)?;
        set(
            &mut explicit,
            name,
            value,
            format!("-o {arg}"),
            false,
            &mut warnings,
        );
    }
    warn_unknown(&explicit, &mut warnings);
    let directory_text = config_directory.to_string_lossy();
    let params = Params::resolve(&Resolver {
        explicit: &explicit,
        config_directory: &directory_text,
        hostname: OnceCell::new(),
    })?;
    Ok(Config {
        params,
        warnings,
        config_directory,
        explicit,
    })
}

/// Record one explicit setting; the last one of a name wins.
fn set(
    explicit: &mut Vec<Setting>,
    name: &str,
    value: &str,
    origin: String,
    from_file: bool,
    warnings: &mut Vec<String>,
) {
    if READ_ONLY.contains(&name) {
        warnings.push(format!(
            "{origin}: parameter \"{name}\" is read-only; setting ignored"
        ));
        return;
    }
    match explicit.iter_mut().find(|setting| setting.name == name) {
        Some(setting) => {
            if from_file && setting.value != value {
                warnings.push(format!(
                    "{origin}: overriding earlier entry: {name}={}",
                    setting.value
                ));
            }
            value.clone_into(&mut setting.value);
            setting.origin = origin;
        }
        None => explicit.push(Setting {
            name: name.to_owned(),
            value: value.to_owned(),
            origin,
        }),
    }
}

/// Warn about settings qmqpd does not know, unless another value refers to them by
/// `$name` (user-defined helper parameters, as postconf allows).
fn warn_unknown(explicit: &[Setting], warnings: &mut Vec<String>) {
    let unknown = |setting: &&Setting| params::row(&setting.name).is_none();
    if !explicit.iter().any(|setting| unknown(&setting)) {
        return;
    }
    let mut referenced: Vec<&str> = Vec::new();
    for setting in explicit {
        for_each_reference(&setting.value, |name| referenced.push(name));
    }
    for setting in explicit.iter().filter(unknown) {
        if !referenced.contains(&setting.name.as_str()) {
            warnings.push(format!(
                "{}: unknown parameter \"{}\"",
                setting.origin, setting.name
            ));
        }
    }
}

#[cfg(test)]
mod tests;
