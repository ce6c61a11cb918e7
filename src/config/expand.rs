//! `$name` expansion, as Postfix's mac_expand: `$name`, `${name}`, `$(name)`, the
//! `${name?text}`/`${name:text}` conditionals and `$$`, with loop detection and bounds on
//! nesting and size. Values come from the explicit settings, then the parameter table's
//! defaults, then the read-only parameters.

use std::borrow::Cow;
use std::cell::OnceCell;

use super::file::{is_name_char, is_space, shorten};
use super::params::{Builtin, default_hostname, row};
use super::{ConfigError, PROCESS_NAME, Reason, Setting};

/// Postfix's limit on nested macro evaluation.
const MAX_NESTING: usize = 100;
/// The longest expanded value: a few lines of `$name` references can otherwise double their
/// way to gigabytes.
const MAX_EXPANDED: usize = 1 << 20;

/// Call `found` with the name of every `$name`, `${name...}` and `$(name...)` in `value`,
/// conditional branches included.
pub(crate) fn for_each_reference<'a>(value: &'a str, mut found: impl FnMut(&'a str)) {
    let mut rest = value;
    while let Some(dollar) = rest.find('$') {
        let after = rest.get(dollar + 1..).unwrap_or("");
        if let Some(literal) = after.strip_prefix('$') {
            rest = literal;
            continue;
        }
        let after = after
            .strip_prefix('{')
            .or_else(|| after.strip_prefix('('))
            .unwrap_or(after);
        let end = after
            .find(|c: char| !is_name_char(c))
            .unwrap_or(after.len());
        let (name, tail) = after.split_at(end);
        if !name.is_empty() {
            found(name);
        }
        rest = tail;
    }
}

/// Why a `$` expression could not be expanded.
enum ExpandError {
    Syntax(String),
    /// The chain of parameter names, ending with the repeated one.
    Loop(String),
}

/// Stops an expansion that grows past `MAX_EXPANDED`.
fn check_expanded_len(out: &str) -> Result<(), ExpandError> {
    if out.len() > MAX_EXPANDED {
        return Err(ExpandError::Syntax(format!(
            "expanded value is longer than {MAX_EXPANDED} bytes"
        )));
    }
    Ok(())
}

/// Looks up and expands parameter values: explicit settings, then defaults, then the
/// read-only parameters.
pub(crate) struct Resolver<'a> {
    pub(crate) explicit: &'a [Setting],
    pub(crate) config_directory: &'a str,
    /// The computed `myhostname` default, only when something needs it.
    pub(crate) hostname: OnceCell<String>,
}

impl Resolver<'_> {
    /// The raw (unexpanded) value of `name`, or `None` when it is undefined.
    fn raw(&self, name: &str) -> Option<Cow<'_, str>> {
        if let Some(setting) = self.explicit.iter().find(|setting| setting.name == name) {
            return Some(Cow::Borrowed(&setting.value));
        }
        match name {
            "config_directory" => return Some(Cow::Borrowed(self.config_directory)),
            "process_name" => return Some(Cow::Borrowed(PROCESS_NAME)),
            "process_id" => return Some(Cow::Owned(std::process::id().to_string())),
            _ => {}
        }
        Some(match row(name)?.default {
            Builtin::Fixed(text) => Cow::Borrowed(text),
            Builtin::Hostname => Cow::Borrowed(self.hostname.get_or_init(default_hostname)),
        })
    }

    /// Where `name` was set, for messages.
    fn origin(&self, name: &str) -> String {
        self.explicit
            .iter()
            .find(|setting| setting.name == name)
            .map_or_else(
                || "built-in default".to_owned(),
                |setting| setting.origin.clone(),
            )
    }

    /// The expanded value of the known parameter `name`, free of control characters.
    fn value(&self, name: &'static str) -> Result<String, ConfigError> {
        let raw = self.raw(name).unwrap_or_default();
        let value = if raw.contains('$') {
            let mut out = String::with_capacity(raw.len());
            let mut stack = vec![name];
            self.expand(&raw, &mut out, &mut stack, 0)
                .map_err(|err| match err {
                    ExpandError::Syntax(reason) => ConfigError::Expand {
                        origin: self.origin(name),
                        name,
                        reason,
                    },
                    ExpandError::Loop(chain) => ConfigError::Loop {
                        origin: self.origin(name),
                        name,
                        chain,
                    },
                })?;
            out
        } else {
            raw.into_owned()
        };
        if value.chars().any(|c| c.is_control() && c != '\t') {
            return Err(self.invalid(name, value, "control character in value"));
        }
        Ok(value)
    }

    /// A validation error for `name`.
    fn invalid(
        &self,
        name: &'static str,
        value: String,
        reason: impl Into<Cow<'static, str>>,
    ) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin(name),
            name,
            value,
            reason: reason.into(),
        }
    }

    /// Expand `text` into `out`; `stack` holds the parameters being expanded.
    fn expand<'s>(
        &'s self,
        text: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        if depth > MAX_NESTING {
            return Err(ExpandError::Syntax(format!(
                "unreasonable macro call nesting: \"{}\"",
                shorten(text, 30)
            )));
        }
        let mut rest = text;
        while let Some(dollar) = rest.find('$') {
            out.push_str(rest.get(..dollar).unwrap_or(""));
            let after = rest.get(dollar + 1..).unwrap_or("");
            if let Some(tail) = after.strip_prefix('$') {
                out.push('$');
                rest = tail;
                continue;
            }
            let (expression, tail) = split_reference(after, text)?;
            self.expand_expression(expression, out, stack, depth)?;
            check_expanded_len(out)?;
            rest = tail;
        }
        out.push_str(rest);
        check_expanded_len(out)
    }

    /// Expand the inside of `$name`, `${...}` or `$(...)`.
    fn expand_expression<'s>(
        &'s self,
        expression: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        if expression.trim_start_matches(is_space).starts_with('{') {
            return Err(ExpandError::Syntax(format!(
                "logical expressions are not supported: \"{expression}\""
            )));
        }
        let name_end = expression
            .find(|c: char| !is_name_char(c))
            .unwrap_or(expression.len());
        let (name, rest) = expression.split_at(name_end);
        if name.is_empty() {
            return Err(ExpandError::Syntax(format!(
                "empty macro name: \"{expression}\""
            )));
        }
        let mut operator = rest.chars().next();
        let mut rest = rest.get(1..).unwrap_or("");
        match operator {
            None => return self.expand_parameter(name, out, stack, depth),
            Some('?' | ':') => {}
            Some(_) => {
                return Err(ExpandError::Syntax(format!(
                    "attribute name syntax error at \"{expression}\""
                )));
            }
        }
        // Postfix tests the raw value: set means defined and non-empty.
        let is_set = self.raw(name).is_some_and(|value| !value.is_empty());
        if operator == Some('?') {
            let (if_set, after) = split_operand(rest, expression)?;
            if is_set {
                self.expand(if_set, out, stack, depth + 1)?;
            }
            if after.is_empty() {
                return Ok(());
            }
            rest = after.strip_prefix(':').ok_or_else(|| {
                ExpandError::Syntax(format!("\":\" expected at \"{after}\" in \"{expression}\""))
            })?;
            operator = Some(':');
        }
        if operator == Some(':') {
            let (if_unset, after) = split_operand(rest, expression)?;
            if !is_set {
                self.expand(if_unset, out, stack, depth + 1)?;
            }
            if !after.is_empty() {
                return Err(ExpandError::Syntax(format!(
                    "unexpected input at \"{after}\" in \"{expression}\""
                )));
            }
        }
        Ok(())
    }

    /// Append the expanded value of parameter `name` (empty when undefined).
    fn expand_parameter<'s>(
        &'s self,
        name: &str,
        out: &mut String,
        stack: &mut Vec<&'s str>,
        depth: usize,
    ) -> Result<(), ExpandError> {
        let Some(value) = self.raw(name) else {
            return Ok(());
        };
        if !value.contains('$') {
            out.push_str(&value);
            return Ok(());
        }
        if stack.contains(&name) {
            let mut chain = stack.join(" -> ");
            chain.push_str(" -> ");
            chain.push_str(name);
            return Err(ExpandError::Loop(chain));
        }
        // Only explicit settings can hold a `$`, so the name lives as long as `self`.
        let Some(setting) = self.explicit.iter().find(|setting| setting.name == name) else {
            out.push_str(&value);
            return Ok(());
        };
        stack.push(&setting.name);
        let result = self.expand(&setting.value, out, stack, depth + 1);
        stack.pop();
        result
    }

    /// The expanded value of the known parameter `name`, validated by `parse`.
    pub(crate) fn typed<T>(
        &self,
        name: &'static str,
        parse: impl Fn(&str) -> Result<T, Reason>,
    ) -> Result<T, ConfigError> {
        let value = self.value(name)?;
        parse(&value).map_err(|reason| self.invalid(name, value, reason))
    }
}

/// Split the reference after a `$`: `(name...)`/`{name...}` with balanced brackets, or a
/// bare name. Returns the expression and the text after the reference.
fn split_reference<'t>(after: &'t str, whole: &str) -> Result<(&'t str, &'t str), ExpandError> {
    let close = match after.chars().next() {
        Some('{') => Some(('{', '}')),
        Some('(') => Some(('(', ')')),
        _ => None,
    };
    let (expression, tail) = match close {
        Some((open, close)) => {
            let mut level = 0usize;
            let end = after.char_indices().find_map(|(index, c)| {
                if c == open {
                    level += 1;
                } else if c == close {
                    level = level.saturating_sub(1);
                    if level == 0 {
                        return Some(index);
                    }
                }
                None
            });
            let Some(end) = end else {
                return Err(ExpandError::Syntax(format!(
                    "truncated macro reference: \"{whole}\""
                )));
            };
            (
                after.get(1..end).unwrap_or(""),
                after.get(end + 1..).unwrap_or(""),
            )
        }
        None => {
            let end = after
                .find(|c: char| !is_name_char(c))
                .unwrap_or(after.len());
            after.split_at(end)
        }
    };
    if expression.is_empty() {
        return Err(ExpandError::Syntax(format!(
            "empty macro name: \"{whole}\""
        )));
    }
    Ok((expression, tail))
}

/// One result operand of `?` or `:`: `{text}` (whitespace around it ignored, text after it
/// returned), or else all the remaining text.
fn split_operand<'t>(text: &'t str, expression: &str) -> Result<(&'t str, &'t str), ExpandError> {
    let trimmed = text.trim_start_matches(is_space);
    if !trimmed.starts_with('{') {
        return Ok((text, ""));
    }
    let mut level = 0usize;
    let end = trimmed.char_indices().find_map(|(index, c)| {
        match c {
            '{' => level += 1,
            '}' => {
                level = level.saturating_sub(1);
                if level == 0 {
                    return Some(index);
                }
            }
            _ => {}
        }
        None
    });
    let Some(end) = end else {
        return Err(ExpandError::Syntax(format!(
            "unbalanced {{}} in \"{expression}\""
        )));
    };
    Ok((
        trimmed.get(1..end).unwrap_or(""),
        trimmed
            .get(end + 1..)
            .unwrap_or("")
            .trim_start_matches(is_space),
    ))
}
