//! A delivery from the broker turned into the frame a browser is sent.

use lapin::BasicProperties;

use crate::{
    bus::{Frame, history},
    chat::{Decoded, Envelope, ForeignProperties},
};

/// The WebSocket frame for one delivery: the body itself when it is an envelope, else the
/// body wrapped in a new envelope (see [`Envelope::from_delivery`]).
pub(super) fn frame(body: Vec<u8>, p: &BasicProperties) -> Frame {
    decode(body, p).0
}

/// The frame for one delivery, and the envelope it carries.
pub(super) fn decode(body: Vec<u8>, p: &BasicProperties) -> (Frame, Envelope) {
    let foreign = ForeignProperties {
        message_id: p.message_id().as_ref().map(|s| s.as_str()),
        timestamp: *p.timestamp(),
        app_id: p.app_id().as_ref().map(|s| s.as_str()),
    };
    // The same for the copy in a session's queue and the copy in the history stream.
    let key = history::key_of((&body, foreign.message_id, foreign.timestamp, foreign.app_id));
    match Envelope::from_delivery(&body, foreign) {
        // An envelope parsed from JSON is valid UTF-8, so this is a check, not a copy.
        Decoded::Envelope(envelope) => match String::from_utf8(body) {
            Ok(json) => (Frame::new(json, key), envelope),
            Err(e) => (Frame::new(String::from_utf8_lossy(e.as_bytes()).into_owned(), key), envelope),
        },
        Decoded::Reencoded(envelope) | Decoded::Wrapped(envelope) => {
            (Frame::new(envelope.to_json(), key), envelope)
        }
    }
}
