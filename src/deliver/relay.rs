//! Relaying a claimed message to a QMQP server (`--relay`): the queue file minus its
//! attributes, streamed from the file; and the one mapping from the server's reply to a
//! verdict.
//!
//! Does not move queue files: the verdict goes back to the deliverer, which disposes.

use super::{Deliverer, RecipientVerdict, Status, Verdict};
use crate::client;
use crate::logging::sanitize;
use crate::queue::{self, Claim, Envelope};

/// The one mapping from a QMQP server's reply to a verdict: K sent, Z deferred, D bounced.
pub(crate) fn classify_reply(reply: &client::Reply, relay: &str) -> Verdict {
    let text = sanitize(reply.text.as_bytes());
    match reply.status {
        Status::Ok => Verdict::new(Status::Ok, text),
        status => Verdict::new(status, format!("host {relay} said: {text}")),
    }
}

impl Deliverer {
    /// Sends the message to the relay; one verdict for all recipients.
    pub(super) fn run_relay(
        &self,
        server: &str,
        claim: &Claim,
        envelope: &Envelope,
    ) -> (String, Vec<RecipientVerdict>) {
        let (relay, verdict) = self.relay_message(server, claim, envelope);
        let verdicts = (0..envelope.recipients.len())
            .map(|index| RecipientVerdict {
                index,
                verdict: verdict.clone(),
            })
            .collect();
        (relay, verdicts)
    }

    /// One QMQP request: the queue file minus its attributes, streamed from the file.
    fn relay_message(&self, server: &str, claim: &Claim, envelope: &Envelope) -> (String, Verdict) {
        let mut stream = match client::connect(server, self.opts.timeout) {
            Ok(stream) => stream,
            Err(e) => {
                return (
                    "none".to_string(),
                    Verdict::new(Status::TempFail, format!("connect to {server}: {e}")),
                );
            }
        };
        let host = client::parse_server(server).map_or_else(|_| server.to_string(), |(h, _)| h);
        let relay = match stream.peer_addr() {
            Ok(addr) => format!("{host}[{}]:{}", addr.ip(), addr.port()),
            Err(_) => server.to_string(),
        };
        let mut message = match queue::open_message(&claim.path, envelope) {
            Ok(message) => message,
            Err(e) => {
                return (
                    relay,
                    Verdict::new(Status::TempFail, format!("cannot read queue file: {e}")),
                );
            }
        };
        let rcpts: Vec<&[u8]> = envelope.recipients.iter().map(Vec::as_slice).collect();
        let sent = client::send(
            &mut stream,
            &mut message,
            envelope.message_len,
            &envelope.sender,
            &rcpts,
        );
        let verdict = match sent {
            Ok(reply) => classify_reply(&reply, &relay),
            Err(e) => Verdict::new(
                Status::TempFail,
                format!("no valid reply from {relay}: {e}"),
            ),
        };
        (relay, verdict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_reply_maps_k_z_d() {
        let reply = |status, text: &str| client::Reply {
            status,
            text: text.into(),
        };
        let k = classify_reply(&reply(Status::Ok, "Ok: queued as X"), "h[1.2.3.4]:628");
        assert_eq!(k, Verdict::new(Status::Ok, "Ok: queued as X"));
        let z = classify_reply(&reply(Status::TempFail, "Error: x"), "h");
        assert_eq!(z.status, Status::TempFail);
        assert_eq!(z.reason, "host h said: Error: x");
        let d = classify_reply(&reply(Status::PermFail, "Error:\ny"), "h");
        assert_eq!(d.status, Status::PermFail);
        assert_eq!(d.reason, "host h said: Error:\\ny");
    }
}
