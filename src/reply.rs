//! QMQP replies: the one K/Z/D type ([`Status`]), used by the server, the client and the
//! deliverer alike, and the one table from a transaction's result to a status and its text.
//!
//! Texts are Postfix qmqpd's, so log tools and clients see what they know. Owns nothing but
//! the mapping; writing the reply to a connection is `session`'s job, reading one `client`'s.

use std::fmt;

/// The class of a QMQP reply, given by its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `K`: the message was accepted.
    Ok,
    /// `Z`: temporary failure, try again later.
    TempFail,
    /// `D`: permanent failure, bounce.
    PermFail,
}

impl Status {
    /// The status letter on the wire.
    pub fn letter(self) -> char {
        char::from(self.byte())
    }

    /// The status byte on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Status::Ok => b'K',
            Status::TempFail => b'Z',
            Status::PermFail => b'D',
        }
    }

    /// The status a reply's first byte gives, if it is K, Z or D.
    pub(crate) fn from_byte(byte: u8) -> Option<Status> {
        match byte {
            b'K' => Some(Status::Ok),
            b'Z' => Some(Status::TempFail),
            b'D' => Some(Status::PermFail),
            _ => None,
        }
    }
}

/// Where in the request something happened (Postfix's words).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    Header,
    Message,
    Sender,
    Recipient,
    Reply,
}

impl fmt::Display for Where {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Where::Header => "receiving QMQP packet header",
            Where::Message => "receiving message content",
            Where::Sender => "receiving sender address",
            Where::Recipient => "receiving recipient address",
            Where::Reply => "sending completion status",
        })
    }
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// The client is not in `qmqpd_authorized_clients`; holds `name[addr]`.
    NotAuthorized(String),
    TooLarge,
    Format(Where),
    FieldTooLong(Where),
    BadSender,
    BadRecipient,
    /// VERP delimiters not allowed by `verp_delimiter_filter`: (delimiters, filter).
    Verp(String, String),
    NoRecipients,
    TooManyHops,
    Streaming,
    /// Writing, syncing or renaming the queue file failed.
    WriteError,
    /// Anything else that went wrong on our side, configuration included.
    Internal,
}

/// What the client is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Queued(String),
    Rejected(Rejection),
}

impl Rejection {
    /// True when the cause is on the server's side (the exit status reports it).
    pub(crate) fn is_local_failure(&self) -> bool {
        matches!(self, Rejection::WriteError | Rejection::Internal)
    }

    /// `Z` for problems that may go away, `D` for requests that will never be accepted.
    fn is_temporary(&self) -> bool {
        self.is_local_failure()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::NotAuthorized(who) => {
                write!(f, "Error: {who} is not authorized to use this service")
            }
            Rejection::TooLarge => f.write_str("Error: message too large"),
            Rejection::Format(at) => write!(f, "netstring format error while {at}"),
            Rejection::FieldTooLong(at) => {
                write!(f, "netstring length exceeds storage limit while {at}")
            }
            Rejection::BadSender => f.write_str("Error: bad sender address syntax"),
            Rejection::BadRecipient => f.write_str("Error: bad recipient address syntax"),
            Rejection::Verp(delims, filter) => write!(
                f,
                "Error: Invalid VERP delimiters: \"{delims}\". Need two characters from \"{filter}\""
            ),
            Rejection::NoRecipients => f.write_str("Error: no recipients specified"),
            Rejection::TooManyHops => f.write_str("Error: too many hops"),
            Rejection::Streaming => f.write_str("Error: streaming QMQP is not supported"),
            Rejection::WriteError => f.write_str("Error: queue file write error"),
            Rejection::Internal => f.write_str("Error: internal error"),
        }
    }
}

impl Reply {
    /// The status; `soft_bounce` turns every `D` into `Z`.
    pub fn status(&self, soft_bounce: bool) -> Status {
        match self {
            Reply::Queued(_) => Status::Ok,
            Reply::Rejected(r) if r.is_temporary() || soft_bounce => Status::TempFail,
            Reply::Rejected(_) => Status::PermFail,
        }
    }

    /// The human text after the status letter.
    pub fn text(&self) -> String {
        match self {
            Reply::Queued(id) => format!("Ok: queued as {id}"),
            Reply::Rejected(r) => r.to_string(),
        }
    }

    /// The reply as it goes on the wire: one netstring.
    pub fn encode(&self, soft_bounce: bool) -> Vec<u8> {
        let mut payload = vec![self.status(soft_bounce).byte()];
        payload.extend_from_slice(self.text().as_bytes());
        crate::netstring::encode(&payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: Rejection) -> String {
        String::from_utf8(Reply::Rejected(r).encode(false)).unwrap()
    }

    /// The expected netstring around a reply payload.
    fn ns(payload: &str) -> String {
        format!("{}:{payload},", payload.len())
    }

    #[test]
    fn encode_queued_is_k_netstring() {
        assert_eq!(
            Reply::Queued("ABC".into()).encode(false),
            b"18:KOk: queued as ABC,".to_vec()
        );
    }

    #[test]
    fn encode_uses_postfix_texts() {
        assert_eq!(wire(Rejection::TooLarge), ns("DError: message too large"));
        assert_eq!(
            wire(Rejection::Format(Where::Sender)),
            ns("Dnetstring format error while receiving sender address")
        );
        assert_eq!(
            wire(Rejection::FieldTooLong(Where::Recipient)),
            ns("Dnetstring length exceeds storage limit while receiving recipient address")
        );
        assert_eq!(
            wire(Rejection::NotAuthorized("unknown[192.0.2.1]".into())),
            ns("DError: unknown[192.0.2.1] is not authorized to use this service")
        );
        assert_eq!(
            wire(Rejection::Verp("XY".into(), "-=+".into())),
            ns("DError: Invalid VERP delimiters: \"XY\". Need two characters from \"-=+\"")
        );
    }

    #[test]
    fn local_failures_are_temporary() {
        assert_eq!(
            wire(Rejection::WriteError),
            ns("ZError: queue file write error")
        );
        assert_eq!(wire(Rejection::Internal), ns("ZError: internal error"));
    }

    #[test]
    fn soft_bounce_turns_d_into_z() {
        let r = Reply::Rejected(Rejection::NoRecipients);
        assert_eq!(r.status(false), Status::PermFail);
        assert_eq!(r.status(true), Status::TempFail);
        assert_eq!(Reply::Queued("X".into()).status(true), Status::Ok);
    }

    #[test]
    fn status_letters_round_trip() {
        for s in [Status::Ok, Status::TempFail, Status::PermFail] {
            assert_eq!(Status::from_byte(s.byte()), Some(s));
            assert_eq!(s.letter(), char::from(s.byte()));
        }
        assert_eq!(Status::from_byte(b'X'), None);
    }
}
