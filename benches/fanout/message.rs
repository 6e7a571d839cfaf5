//! The clock and the message text every phase sends: `<tag><seq> <unix_nanos>`, so that every
//! receiver can tell the phase, the sequence number and the latency of each copy it gets.

use std::{
    sync::OnceLock,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

/// One monotonic clock for the whole run, expressed as Unix nanoseconds: send and arrival
/// times are taken in this same process, so their difference needs no clock sync.
pub fn now_ns() -> u64 {
    static START: OnceLock<(Instant, u64)> = OnceLock::new();
    let (start, unix) = START.get_or_init(|| {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos();
        (Instant::now(), u64::try_from(unix).unwrap_or(0))
    });
    unix + u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX / 2)
}

/// `<tag><seq> <unix_nanos>`, e.g. `h17 1763893179279000000`.
pub fn message_text(tag: u8, seq: u32, sent_ns: u64) -> String {
    format!("{}{seq} {sent_ns}", tag as char)
}

pub fn parse_message_text(text: &str) -> Option<(u8, u32, u64)> {
    let tag = *text.as_bytes().first()?;
    let (seq, sent) = text.get(1..)?.split_once(' ')?;
    Some((tag, seq.parse().ok()?, sent.parse().ok()?))
}

/// The `text` of an envelope as serde_json writes it (`"text":"..."`, no spaces). The texts
/// this tool sends have no characters JSON escapes, so the value ends at the next quote.
/// Cheaper than a full parse, which matters when the generator handles 20,000 frames a second.
pub fn envelope_text(json: &str) -> Option<&str> {
    const KEY: &str = "\"text\":\"";
    let start = json.find(KEY)? + KEY.len();
    let len = json[start..].find('"')?;
    Some(&json[start..start + len])
}

/// An envelope as another service following the contract would publish it.
pub fn envelope_json(text: &str) -> (String, String) {
    let id = ulid::Ulid::new().to_string();
    let now = time::OffsetDateTime::now_utc();
    let ts = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
    let body = json!({ "id": id, "text": text, "user": "bench", "ts": ts }).to_string();
    (id, body)
}
