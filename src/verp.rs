//! VERP senders (variable envelope return paths): recognising a `prefix@origin-@[]` sender
//! and its delimiters (the server validates them), and expanding it for one recipient (the
//! deliverer runs one delivery per recipient).
//!
//! Owns only the address arithmetic; which delimiters are allowed is the caller's
//! (`verp_delimiter_filter`).

/// The VERP delimiters a `prefix@origin-@[]` sender asks for (Postfix's rule: the character
/// before the first `@`, then `=`), or None when the sender is not such an address.
pub fn verp_delimiters(sender: &[u8]) -> Option<String> {
    let n = sender.len();
    if n <= 4 || !sender.ends_with(b"-@[]") {
        return None;
    }
    let at = sender.iter().position(|&b| b == b'@')?;
    // A non-empty prefix before the delimiter, and a non-empty origin after the '@'.
    if at < 2 || at + 5 >= n {
        return None;
    }
    let delim = char::from(sender[at - 1]);
    Some(format!("{delim}="))
}

/// The envelope sender for one recipient of a VERP sender, the qmail way: `prefix-@host-@[]`
/// and `user@domain` give `prefix-user=domain@host`. `None` when `sender` is not a VERP
/// sender (as qmqpd recognises them).
pub(crate) fn verp_sender(sender: &[u8], recipient: &[u8]) -> Option<Vec<u8>> {
    verp_delimiters(sender)?;
    let base = sender.strip_suffix(b"-@[]")?;
    let at = base.iter().rposition(|&b| b == b'@')?;
    let (local, host) = base.split_at(at);
    let mut out = Vec::with_capacity(base.len().saturating_add(recipient.len()));
    out.extend_from_slice(local);
    match recipient.iter().rposition(|&b| b == b'@') {
        Some(r) => {
            let (user, domain) = recipient.split_at(r);
            out.extend_from_slice(user);
            out.push(b'=');
            out.extend_from_slice(domain.get(1..).unwrap_or_default());
        }
        None => out.extend_from_slice(recipient),
    }
    out.extend_from_slice(host);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verp_delimiters_follow_postfix_rule() {
        assert_eq!(
            verp_delimiters(b"list-@example.org-@[]").as_deref(),
            Some("-=")
        );
        assert_eq!(
            verp_delimiters(b"list+@example.org-@[]").as_deref(),
            Some("+=")
        );
        assert_eq!(verp_delimiters(b"list@example.org"), None);
        assert_eq!(verp_delimiters(b"-@[]"), None);
        assert_eq!(verp_delimiters(b"x-@[]"), None, "no @ before the suffix");
        assert_eq!(verp_delimiters(b"-@o-@[]"), None, "empty prefix");
        assert_eq!(verp_delimiters(b"ab@-@[]"), None, "empty origin");
    }

    #[test]
    fn verp_sender_expands_the_qmail_way() {
        assert_eq!(
            verp_sender(b"list-@lists.example.org-@[]", b"user@example.com").unwrap(),
            b"list-user=example.com@lists.example.org".to_vec()
        );
        assert_eq!(
            verp_sender(b"list-@lists.example.org-@[]", b"postmaster").unwrap(),
            b"list-postmaster@lists.example.org".to_vec()
        );
        assert_eq!(
            verp_sender(b"b+@h-@[]", b"a@b@c").unwrap(),
            b"b+a@b=c@h".to_vec()
        );
    }

    #[test]
    fn verp_sender_ignores_plain_senders() {
        assert_eq!(verp_sender(b"list@example.org", b"u@d"), None);
        assert_eq!(verp_sender(b"", b"u@d"), None);
        assert_eq!(verp_sender(b"-@[]", b"u@d"), None);
    }
}
