//! Chat messages: the envelope every browser receives, and validation of what users send.
//!
//! Knows nothing of HTTP or AMQP: the web layer and the buses call into it.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Longest accepted sender name, in UTF-8 bytes. Names are labels, not messages.
pub const MAX_USER_BYTES: usize = 64;

/// One chat message as it travels through the exchange and reaches every browser.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// A ULID: unique, and sortable by the time the server accepted the message.
    pub id: String,
    /// The text exactly as sent.
    pub text: String,
    /// The sender's name, when one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// RFC 3339 UTC time, with milliseconds, at which the server accepted the message.
    pub ts: String,
    /// The name of the service key the message was posted with; absent for everyone else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl Envelope {
    /// Stamps a validated message with a fresh id and the current time.
    pub fn new(message: NewMessage) -> Self {
        let now = OffsetDateTime::now_utc();
        Self { id: next_id(), text: message.text, user: message.user, ts: rfc3339_millis(now), from: None }
    }

    /// As [`Envelope::new`] (or [`Envelope::from_service`] with `service`), with the random
    /// part of the id given: the message an `Idempotency-Key` stands for (see
    /// [`crate::idempotency`]), which every replica finds in the history window by that part.
    pub fn with_random(message: NewMessage, service: Option<&str>, random: u128) -> Self {
        let now = OffsetDateTime::now_utc();
        let millis = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        Self {
            id: ulid::Ulid::from_parts(millis, random).to_string(),
            text: message.text,
            user: message.user,
            ts: rfc3339_millis(now),
            from: service.map(str::to_owned),
        }
    }

    /// Whether this envelope carries `message` (its text and sender).
    pub fn carries(&self, message: &NewMessage) -> bool {
        self.text == message.text && self.user == message.user
    }

    /// As [`Envelope::new`], for a message posted with the service key named `key`.
    pub fn from_service(message: NewMessage, key: &str) -> Self {
        Self { from: Some(key.to_owned()), ..Self::new(message) }
    }

    /// The envelope as JSON, the body of an AMQP message and of a WebSocket frame.
    pub fn to_json(&self) -> String {
        // Serializing a struct of strings to a String cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a message body that arrived from the exchange.
    ///
    /// An envelope (ours, or another service's that follows the contract) is returned as it
    /// came. Anything else, plain text or JSON of another shape, becomes the `text` of a new
    /// envelope, so other services can notify browsers without knowing our format.
    ///
    /// The id of a wrapped message is its `message_id`; without one it is derived from the
    /// body and properties, so every replica (and the history stream's reader) gives the same
    /// message the same id.
    pub fn from_delivery(body: &[u8], foreign: ForeignProperties<'_>) -> Decoded {
        if let Ok(envelope) = serde_json::from_slice::<Envelope>(body)
            && envelope.is_well_formed()
        {
            return Decoded::Envelope(envelope);
        }
        // An envelope with fields this version does not know (a newer replica's, during a
        // rolling deploy): the fields it knows, re-encoded. Never one with a `type`, which
        // would make a control frame of it (errors, gaps) in the browser.
        if let Ok(newer) = serde_json::from_slice::<NewerEnvelope>(body)
            && newer.kind.is_none()
        {
            let envelope =
                Self { id: newer.id, text: newer.text, user: newer.user, ts: newer.ts, from: newer.from };
            if envelope.is_well_formed() {
                return Decoded::Reencoded(envelope);
            }
        }
        let now = OffsetDateTime::now_utc();
        let ts = foreign
            .timestamp
            .and_then(|secs| i64::try_from(secs).ok())
            .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
            // Years before 0 or after 9999 have no RFC 3339 form.
            .filter(|t| (0..=9999).contains(&t.year()))
            .unwrap_or(now);
        Decoded::Wrapped(Self {
            id: foreign
                .message_id
                .filter(|id| !id.trim().is_empty())
                .map_or_else(|| derived_id(ts, body, foreign).to_string(), str::to_owned),
            text: String::from_utf8_lossy(body).into_owned(),
            user: foreign.app_id.filter(|a| !a.trim().is_empty()).map(str::to_owned),
            ts: rfc3339_millis(ts),
            from: None,
        })
    }

    fn is_well_formed(&self) -> bool {
        !self.id.is_empty() && OffsetDateTime::parse(&self.ts, &Rfc3339).is_ok()
    }

    /// `ts` in milliseconds since the epoch (0 if it does not parse, which a well-formed
    /// envelope's always does).
    pub fn ts_millis(&self) -> i64 {
        OffsetDateTime::parse(&self.ts, &Rfc3339)
            .map_or(0, |t| i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(0))
    }
}

/// A ULID for a foreign message without `message_id`: its time, and 80 bits of a hash of what
/// the message is, so every reader of the same delivery derives the same id.
fn derived_id(ts: OffsetDateTime, body: &[u8], foreign: ForeignProperties<'_>) -> ulid::Ulid {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (body, foreign.timestamp, foreign.app_id).hash(&mut hasher);
    let high = hasher.finish();
    high.hash(&mut hasher);
    let low = hasher.finish() & 0xffff;
    let millis = u64::try_from(ts.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
    ulid::Ulid::from_parts(millis, (u128::from(high) << 16) | u128::from(low))
}

/// An [`Envelope`] that may carry fields this version does not know; see
/// [`Envelope::from_delivery`].
#[derive(Deserialize)]
struct NewerEnvelope {
    id: String,
    text: String,
    #[serde(default)]
    user: Option<String>,
    ts: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<serde::de::IgnoredAny>,
}

/// What the AMQP properties of a foreign message contribute to its envelope.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForeignProperties<'a> {
    /// `message_id`: becomes the envelope id.
    pub message_id: Option<&'a str>,
    /// `timestamp` (seconds since the epoch): becomes `ts`.
    pub timestamp: Option<u64>,
    /// `app_id`: the publishing service, shown as the sender.
    pub app_id: Option<&'a str>,
}

/// The outcome of [`Envelope::from_delivery`].
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// The body is an envelope already: forward it byte for byte.
    Envelope(Envelope),
    /// An envelope with fields this version does not know: forward it re-encoded, without them.
    Reencoded(Envelope),
    /// The body was something else, now wrapped in this envelope.
    Wrapped(Envelope),
}

/// A new ULID, greater than every one this process made before, even within one millisecond
/// (plain `Ulid::new()` is random within the millisecond, so two messages accepted in the same
/// millisecond could sort in the wrong order).
fn next_id() -> String {
    static GENERATOR: Mutex<ulid::Generator> = Mutex::new(ulid::Generator::new());
    let generated = GENERATOR.lock().map_err(|_| ()).and_then(|mut g| g.generate().map_err(|_| ()));
    // The generator fails only after 2^80 ids in one millisecond, or if a thread panicked
    // while holding the lock; a random ULID is then the best we can do.
    generated.unwrap_or_else(|()| ulid::Ulid::new()).to_string()
}

/// How far ahead of this server's clock another server's clock may be: ids up to this far in
/// the future are taken as real.
pub const CLOCK_SKEW: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `id` is a ULID whose time is later than now (give or take [`CLOCK_SKEW`]): no message
/// has it yet, so a request that names it as a place in history is a mistake (or a probe), and
/// is answered at once rather than by waiting for such a message to appear.
pub fn is_from_the_future(id: &str) -> bool {
    let Ok(ulid) = ulid::Ulid::from_string(id) else { return false };
    let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    i128::from(ulid.timestamp_ms()) > now + CLOCK_SKEW.as_millis() as i128
}

/// Milliseconds since the epoch as an envelope's `ts`.
pub fn ts_from_millis(millis: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    rfc3339_millis(t)
}

fn rfc3339_millis(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// A message a user wants to send, after validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewMessage {
    text: String,
    user: Option<String>,
}

/// A message as submitted, before validation.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
pub struct Draft {
    /// The text: required, not empty, at most the configured bytes (4,096 by default); no
    /// control characters but tab and line breaks.
    pub text: Option<String>,
    /// The sender's name: at most 64 bytes; no control characters or bidirectional overrides.
    pub user: Option<String>,
}

/// Why a submitted message was refused; each sentence is shown to the user as it is.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    #[error("the message has no text: send a non-empty \"text\" field")]
    MissingText,
    #[error("the message text is blank")]
    BlankText,
    #[error("the message text is {actual} bytes; the limit is {limit} bytes")]
    TooLong { actual: usize, limit: usize },
    #[error("the user name is {actual} bytes; the limit is {MAX_USER_BYTES} bytes")]
    UserTooLong { actual: usize },
    #[error(
        "the message text contains the control character U+{code:04X}; only line breaks (\\n, \\r\\n) and tabs are allowed"
    )]
    ControlInText { code: u32 },
    #[error("the user name contains the control character U+{code:04X}; a name is one line of text")]
    ControlInUser { code: u32 },
    #[error(
        "the user name contains the bidirectional formatting character U+{code:04X}, which can disguise a name; send the name without it"
    )]
    BidiInUser { code: u32 },
}

/// Unicode's explicit bidirectional embeddings, overrides and isolates: in a name they can make
/// it read as another, or reverse what follows it.
fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{200E}' | '\u{200F}' | '\u{061C}')
}

/// The first control character of `text` other than a tab, a line feed, or a carriage return
/// followed by a line feed (what a form sends for a line break). NUL, ESC and the like reach
/// other consumers of the exchange raw, where a terminal or a log would act on them.
fn forbidden_control_in_text(text: &str) -> Option<char> {
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\t' | '\n' => {}
            '\r' if chars.peek() == Some(&'\n') => {}
            c if c.is_control() => return Some(c),
            _ => {}
        }
    }
    None
}

impl Draft {
    /// Checks the draft against the limits. Text is kept exactly as sent; a blank user is
    /// treated as no user.
    pub fn validate(self, max_text_bytes: usize) -> Result<NewMessage, InvalidMessage> {
        let text = self.text.ok_or(InvalidMessage::MissingText)?;
        if text.trim().is_empty() {
            return Err(InvalidMessage::BlankText);
        }
        if text.len() > max_text_bytes {
            return Err(InvalidMessage::TooLong { actual: text.len(), limit: max_text_bytes });
        }
        if let Some(c) = forbidden_control_in_text(&text) {
            return Err(InvalidMessage::ControlInText { code: u32::from(c) });
        }
        let user = self.user.map(|u| u.trim().to_owned()).filter(|u| !u.is_empty());
        if let Some(u) = &user {
            if u.len() > MAX_USER_BYTES {
                return Err(InvalidMessage::UserTooLong { actual: u.len() });
            }
            if let Some(c) = u.chars().find(|c| c.is_control()) {
                return Err(InvalidMessage::ControlInUser { code: u32::from(c) });
            }
            if let Some(c) = u.chars().find(|&c| is_bidi_control(c)) {
                return Err(InvalidMessage::BidiInUser { code: u32::from(c) });
            }
        }
        Ok(NewMessage { text, user })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draft(text: &str) -> Draft {
        Draft { text: Some(text.into()), user: None }
    }

    #[test]
    fn envelopes_have_sortable_ids_and_utc_millisecond_timestamps() {
        let a = Envelope::new(draft("a").validate(10).unwrap());
        let b = Envelope::new(draft("b").validate(10).unwrap());
        assert_eq!(a.id.len(), 26);
        assert!(a.id < b.id, "{} then {}", a.id, b.id);
        // Within one millisecond too.
        let ids: Vec<String> = (0..1000).map(|_| next_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids made in a burst are increasing");
        assert!(a.ts.ends_with('Z') && a.ts.len() == 24, "{}", a.ts);
        assert!(OffsetDateTime::parse(&a.ts, &Rfc3339).is_ok());
    }

    #[test]
    fn an_envelope_without_user_omits_the_field() {
        let json = Envelope::new(draft("hi").validate(10).unwrap()).to_json();
        assert!(!json.contains("user"), "{json}");
    }

    #[test]
    fn text_is_kept_exactly_and_user_is_trimmed() {
        let m =
            Draft { text: Some("  <b>hi</b>\n".into()), user: Some("  ada ".into()) }.validate(100).unwrap();
        let e = Envelope::new(m);
        assert_eq!((e.text.as_str(), e.user.as_deref()), ("  <b>hi</b>\n", Some("ada")));
    }

    #[test]
    fn control_characters_other_than_line_breaks_and_tabs_are_refused_with_their_code() {
        assert!(draft("two\nlines\r\nand\ta tab").validate(100).is_ok(), "line breaks and tabs are text");
        for (text, code) in
            [("a\u{0}b", 0x0), ("\u{1b}[31mred", 0x1b), ("lone\rreturn", 0xd), ("\u{7f}", 0x7f)]
        {
            let err = draft(text).validate(100).unwrap_err();
            assert_eq!(err, InvalidMessage::ControlInText { code }, "{text:?}");
            assert!(err.to_string().contains(&format!("U+{code:04X}")), "{err}");
        }
        let named = |user: &str| Draft { text: Some("hi".into()), user: Some(user.into()) }.validate(100);
        assert_eq!(named("ada\nbob"), Err(InvalidMessage::ControlInUser { code: 0xa }));
        assert_eq!(named("admin\u{202E}nimda"), Err(InvalidMessage::BidiInUser { code: 0x202E }));
        assert_eq!(named("\u{2067}x"), Err(InvalidMessage::BidiInUser { code: 0x2067 }));
        assert!(named("علي").is_ok(), "right-to-left names are names");
        assert!(draft("مرحبا \u{2067}hello\u{2069}").validate(100).is_ok(), "isolates are fine in text");
    }

    #[test]
    fn missing_blank_and_long_texts_are_refused() {
        assert_eq!(Draft::default().validate(10), Err(InvalidMessage::MissingText));
        assert_eq!(draft(" \n\t").validate(10), Err(InvalidMessage::BlankText));
        assert_eq!(draft("ééé").validate(5), Err(InvalidMessage::TooLong { actual: 6, limit: 5 }));
        assert!(draft("ééé").validate(6).is_ok(), "exactly at the limit is accepted");
        let long_user = Draft { text: Some("x".into()), user: Some("u".repeat(65)) };
        assert_eq!(long_user.validate(10), Err(InvalidMessage::UserTooLong { actual: 65 }));
    }

    #[test]
    fn an_envelope_from_the_exchange_is_forwarded_as_is() {
        let e = Envelope::new(draft("x").validate(10).unwrap());
        let decoded = Envelope::from_delivery(e.to_json().as_bytes(), ForeignProperties::default());
        assert_eq!(decoded, Decoded::Envelope(e));
    }

    #[test]
    fn plain_text_from_another_service_is_wrapped_with_its_message_id() {
        let props =
            ForeignProperties { message_id: Some("billing-42"), timestamp: Some(0), app_id: Some("billing") };
        let Decoded::Wrapped(e) = Envelope::from_delivery(b"invoice paid", props) else {
            panic!("plain text must be wrapped")
        };
        assert_eq!((e.id.as_str(), e.text.as_str()), ("billing-42", "invoice paid"));
        assert_eq!((e.user.as_deref(), e.ts.as_str()), (Some("billing"), "1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn json_of_another_shape_is_delivered_as_text() {
        let body = br#"{"event":"deploy","text":"v2 is live"}"#;
        let Decoded::Wrapped(e) = Envelope::from_delivery(body, ForeignProperties::default()) else {
            panic!("foreign JSON must be wrapped")
        };
        assert_eq!(e.text.as_bytes(), body);
        assert_eq!(e.id.len(), 26, "a ULID when there is no message_id");
        let Decoded::Wrapped(again) = Envelope::from_delivery(body, ForeignProperties::default()) else {
            panic!("foreign JSON must be wrapped")
        };
        // Without a timestamp the time part is when it was read; the random part, which is what
        // replicas and the stream's reader match on, is the same.
        let random = |id: &str| ulid::Ulid::from_string(id).unwrap().random();
        assert_eq!(random(&again.id), random(&e.id), "the same delivery read twice is recognised");
        let props = ForeignProperties { timestamp: Some(1_800_000_000), ..Default::default() };
        let Decoded::Wrapped(stamped) = Envelope::from_delivery(b"other", props) else { panic!() };
        assert_ne!(stamped.id, e.id, "different messages get different ids");
        assert_eq!(ulid::Ulid::from_string(&stamped.id).unwrap().timestamp_ms(), 1_800_000_000_000);
    }

    #[test]
    fn an_envelope_with_fields_this_version_does_not_know_is_still_an_envelope_without_them() {
        let body = br#"{"id":"01M8A","text":"invoice paid","ts":"2026-12-06T10:00:00.000Z","from":"billing","priority":"high"}"#;
        let Decoded::Reencoded(e) = Envelope::from_delivery(body, ForeignProperties::default()) else {
            panic!("an envelope with a newer field is an envelope")
        };
        assert_eq!(
            (e.id.as_str(), e.text.as_str(), e.from.as_deref()),
            ("01M8A", "invoice paid", Some("billing"))
        );
        assert!(!e.to_json().contains("priority"), "unknown fields are not forwarded");
        let control = br#"{"id":"x","text":"t","ts":"2026-12-06T10:00:00.000Z","type":"error"}"#;
        assert!(
            matches!(Envelope::from_delivery(control, ForeignProperties::default()), Decoded::Wrapped(_)),
            "a body with a type could pass for a control frame: it is only text"
        );
    }

    #[test]
    fn an_envelope_shaped_body_with_a_bad_timestamp_is_wrapped() {
        let body = br#"{"id":"x","text":"t","ts":"yesterday"}"#;
        assert!(matches!(Envelope::from_delivery(body, ForeignProperties::default()), Decoded::Wrapped(_)));
    }
}
