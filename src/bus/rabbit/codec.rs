//! A delivery from the broker turned into the frame a browser is sent.
//!
//! In the per-session fan-out mode every session of the process receives its own copy of each
//! message, and decoding it (parsing the envelope, hashing it into its key) was a tenth of the
//! process's instructions per delivery at 1,000 sessions. [`Frames`] remembers the frames of the
//! last messages, so each message is decoded once per process and the other copies share its
//! frame.

use std::{hash::BuildHasher, sync::Mutex};

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
    let (frame, envelope, _) = decode_as_is(body, p);
    (frame, envelope)
}

/// [`decode`], and whether the frame is the body as it came (an envelope as it is).
fn decode_as_is(body: Vec<u8>, p: &BasicProperties) -> (Frame, Envelope, bool) {
    let foreign = ForeignProperties {
        message_id: p.message_id().as_ref().map(|s| s.as_str()),
        timestamp: *p.timestamp(),
        app_id: p.app_id().as_ref().map(|s| s.as_str()),
    };
    // The same for the copy in a session's queue and the copy in the history stream.
    let key = history::key_of((&body, foreign.message_id, foreign.timestamp, foreign.app_id));
    let make = if foreign.message_id.is_some() { Frame::identified } else { Frame::new };
    match Envelope::from_delivery(&body, foreign) {
        // An envelope parsed from JSON is valid UTF-8, so this is a check, not a copy.
        Decoded::Envelope(envelope) => match String::from_utf8(body) {
            Ok(json) => (make(json, key), envelope, true),
            Err(e) => (make(String::from_utf8_lossy(e.as_bytes()).into_owned(), key), envelope, false),
        },
        Decoded::Reencoded(envelope) | Decoded::Wrapped(envelope) => {
            (make(envelope.to_json(), key), envelope, false)
        }
    }
}

/// Slots of [`Frames`]. The copies of one message reach the sessions over as long as a burst
/// takes to drain (seconds at 1,000 sessions), so the slots hold a burst's messages, not just
/// a session's prefetch: with 64, a burst of 100 decoded a third of its copies again. About
/// 110 bytes a slot, plus the bodies of the last messages.
const SLOTS: usize = 512;

/// The frames of the last messages decoded, by message id: a direct-mapped cache, one lock
/// per slot.
pub(super) struct Frames {
    slots: Vec<Mutex<Option<Cached>>>,
    hasher: std::hash::RandomState,
}

struct Cached {
    message_id: String,
    timestamp: Option<u64>,
    app_id: Option<String>,
    /// Its text is the body it was decoded from: only bodies that are envelopes as they are
    /// get here, so a later copy is the same message exactly when its body is the same.
    frame: Frame,
}

impl Frames {
    pub(super) fn new() -> Self {
        Self { slots: (0..SLOTS).map(|_| Mutex::new(None)).collect(), hasher: std::hash::RandomState::new() }
    }

    /// [`frame`], decoded once for all the copies of a message (those with a message id).
    pub(super) fn frame(&self, body: Vec<u8>, p: &BasicProperties) -> Frame {
        let Some(id) = p.message_id().as_ref().map(|s| s.as_str()) else { return frame(body, p) };
        let timestamp = *p.timestamp();
        let app_id = p.app_id().as_ref().map(|s| s.as_str());
        let slot = &self.slots[(self.hasher.hash_one(id) as usize) % SLOTS];
        if let Some(cached) = &*slot.lock().unwrap_or_else(|p| p.into_inner())
            && cached.message_id == id
            && cached.timestamp == timestamp
            && cached.app_id.as_deref() == app_id
            && cached.frame.text().as_bytes() == body.as_slice()
        {
            return cached.frame.clone();
        }
        let (frame, _, as_is) = decode_as_is(body, p);
        // Re-encoded or wrapped bodies differ from their frame: they are not cached (rare: other
        // services' messages).
        if as_is {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(Cached {
                message_id: id.to_owned(),
                timestamp,
                app_id: app_id.map(str::to_owned),
                frame: frame.clone(),
            });
        }
        frame
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(id: &str) -> BasicProperties {
        BasicProperties::default()
            .with_message_id(id.into())
            .with_timestamp(1)
            .with_app_id("fanout-chat".into())
    }

    #[test]
    fn copies_of_a_message_share_one_frame_and_nothing_else_does() {
        let frames = Frames::new();
        let body =
            r#"{"id":"01M94N6EXYPF95DD9R8TWWMBCA","text":"hi","user":"ada","ts":"2026-12-06T03:00:00.000Z"}"#;
        let first = frames.frame(body.as_bytes().to_vec(), &props("01M94N6EXYPF95DD9R8TWWMBCA"));
        let second = frames.frame(body.as_bytes().to_vec(), &props("01M94N6EXYPF95DD9R8TWWMBCA"));
        assert_eq!((first.text(), first.key()), (second.text(), second.key()));
        assert_eq!(first.text().as_ptr(), second.text().as_ptr(), "one frame, shared");
        // The same id with another body (another service reusing ids) is decoded on its own.
        let other = body.replace("hi", "ho");
        let third = frames.frame(other.as_bytes().to_vec(), &props("01M94N6EXYPF95DD9R8TWWMBCA"));
        assert!(third.text().contains("ho") && third.key() != first.key());
        // Each is what decoding it alone gives.
        let alone = frame(other.into_bytes(), &props("01M94N6EXYPF95DD9R8TWWMBCA"));
        assert_eq!((third.text(), third.key()), (alone.text(), alone.key()));
        // A body that is wrapped (not an envelope) is wrapped again for each copy, the same way.
        let a = frames.frame(b"plain".to_vec(), &props("x1"));
        let b = frames.frame(b"plain".to_vec(), &props("x1"));
        assert_eq!((a.text(), a.key()), (b.text(), b.key()));
    }
}
