//! Recent history: a bounded window of the latest messages, and the resuming subscription that
//! replays from it.
//!
//! On RabbitMQ every replica fills its window by following the history stream (see
//! `rabbit/stream.rs`), so all replicas hold the same messages in the same order, the stream's.
//! The embedded bus appends what it publishes. Each entry has a sequence number local to this
//! process; sessions read the window by sequence number.
//!
//! The hand-over from replay to live delivery is in [`resume`].

mod resume;

pub use resume::Resume;

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use super::Frame;

/// An id this young may not have reached the window yet; see [`History::wait_for_recent`].
const RECENT: Duration = Duration::from_secs(10);

/// A hash that identifies a message's content; see [`Frame::key`].
pub fn key_of(value: impl Hash) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

/// One message in the window.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Position in this process's window: consecutive, never reused.
    pub seq: u64,
    /// The envelope's id.
    pub id: Arc<str>,
    /// The envelope's `ts`, in milliseconds since the epoch.
    pub ts_millis: i64,
    /// Offset in the history stream, on RabbitMQ.
    pub offset: Option<u64>,
    pub frame: Frame,
}

/// A message about to enter the window.
#[derive(Clone, Debug)]
pub struct NewEntry {
    pub id: Arc<str>,
    pub ts_millis: i64,
    pub offset: Option<u64>,
    pub frame: Frame,
}

/// The window of recent messages of this process. Cheap to clone.
#[derive(Clone)]
pub struct History(Arc<Inner>);

struct Inner {
    capacity: usize,
    window: Mutex<Window>,
    /// The sequence number the next entry will get: sessions wait on it for new entries.
    next_seq: watch::Sender<u64>,
}

#[derive(Default)]
struct Window {
    entries: VecDeque<Entry>,
    /// Sequence number of `entries[0]` (or of the next entry, when empty).
    first_seq: u64,
    by_id: HashMap<Arc<str>, u64>,
    /// Looked up for every message a session is sent: keys are hashes already, so they are
    /// only mixed with a seed of this process (see [`KeyHasher`]), not hashed again.
    by_key: HashMap<u64, u64, KeySeed>,
    /// By the random part of ids that are ULIDs. A foreign message with neither `message_id`
    /// nor `timestamp` gets an id whose time is when a reader read it, which differs between
    /// readers, but whose random part is derived from the message (see
    /// `chat::Envelope::from_delivery`): a session can resume after it by that part.
    by_random: HashMap<u128, u64>,
    /// Where messages are missing from the window (the stream's retention removed them while
    /// this replica was away from the broker, or the stream was deleted), by the sequence
    /// number of the first entry after them, with why: a replay that crosses one says so.
    holes: std::collections::BTreeMap<u64, &'static str>,
}

/// Builds [`KeyHasher`]s with a seed drawn once per window. Keys are SipHash outputs with a
/// fixed key (every replica must derive the same key for a message), so anyone can compute
/// them, and could pick messages whose keys share their low bits; the seed keeps where a key
/// lands in the table unpredictable, so such messages cannot pile up in one place.
#[derive(Clone)]
struct KeySeed(u64);

impl Default for KeySeed {
    fn default() -> Self {
        use std::hash::BuildHasher;
        Self(std::collections::hash_map::RandomState::new().hash_one(0u64))
    }
}

impl std::hash::BuildHasher for KeySeed {
    type Hasher = KeyHasher;

    fn build_hasher(&self) -> KeyHasher {
        KeyHasher(self.0)
    }
}

/// Mixes a `u64` key with the seed in a dozen instructions, where SipHash took over a hundred
/// per lookup.
struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        // MurmurHash3's finalizer: every bit of the seeded key moves every bit of the result
        // (the table indexes by the low bits and compares tags of the high ones).
        let mut x = self.0;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        x ^ (x >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `u64` keys use this hasher; anything else is still mixed in, byte by byte.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01B3);
        }
    }

    fn write_u64(&mut self, key: u64) {
        self.0 ^= key;
    }
}

impl Window {
    /// The entry at window position `seq`, if the window holds it.
    fn entry(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(usize::try_from(seq.checked_sub(self.first_seq)?).ok()?)
    }
}

fn random_part(id: &str) -> Option<u128> {
    ulid::Ulid::from_string(id).ok().map(|u| u.random())
}

/// Where a resuming session starts, and whether something it asked for is gone.
#[derive(Debug, PartialEq, Eq)]
pub struct Start {
    /// The first sequence number to send.
    pub seq: u64,
    /// Set when the session cannot get everything after its `since`: why not.
    pub gap: Option<&'static str>,
}

/// What a resuming session is sent before the window: messages older than it, read from the
/// stream, and the share of the process's replay budget they hold until they are sent.
#[derive(Default)]
pub struct Older {
    pub entries: Vec<NewEntry>,
    pub budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// A page of history, oldest first.
pub struct Page {
    pub entries: Vec<Entry>,
    /// Older messages than these may exist in the window.
    pub more_in_window: bool,
}

impl History {
    /// A window of at most `capacity` messages; `0` keeps none (history off).
    pub fn new(capacity: usize) -> Self {
        let (next_seq, _) = watch::channel(0);
        Self(Arc::new(Inner { capacity, window: Mutex::new(Window::default()), next_seq }))
    }

    pub fn capacity(&self) -> usize {
        self.0.capacity
    }

    /// Messages in the window now.
    pub fn held(&self) -> usize {
        self.window().entries.len()
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        // The window is consistent after every statement that can panic (none do while it is
        // held), so a poisoned lock still holds a usable window.
        self.0.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The frame of the message in the window whose id is a ULID with this random part.
    pub fn find_random(&self, random: u128) -> Option<Frame> {
        let window = self.window();
        window.entry(*window.by_random.get(&random)?).map(|e| e.frame.clone())
    }

    /// The window holds a message with this key (see [`crate::bus::Frame::key`]).
    pub fn holds_key(&self, key: u64) -> bool {
        self.window().by_key.contains_key(&key)
    }

    /// Adds a message at the end, dropping the oldest past the capacity.
    pub fn append(&self, new: NewEntry) {
        if self.0.capacity == 0 {
            return;
        }
        let mut window = self.window();
        let seq = window.first_seq + window.entries.len() as u64;
        // An id seen again (another service's identical notification, with a derived id) keeps
        // pointing at its oldest copy: a session resuming after it then gets the later copy
        // again rather than missing what came between the two.
        window.by_id.entry(new.id.clone()).or_insert(seq);
        window.by_key.insert(new.frame.key(), seq);
        if let Some(random) = random_part(&new.id) {
            window.by_random.entry(random).or_insert(seq);
        }
        window.entries.push_back(Entry {
            seq,
            id: new.id,
            ts_millis: new.ts_millis,
            offset: new.offset,
            frame: new.frame,
        });
        while window.entries.len() > self.0.capacity {
            if let Some(old) = window.entries.pop_front() {
                window.first_seq += 1;
                let first = window.first_seq;
                window.holes.retain(|&seq, _| seq >= first);
                // Only if the maps still point at this entry (an id or key seen again points
                // at the newer one).
                if window.by_id.get(&old.id) == Some(&old.seq) {
                    window.by_id.remove(&old.id);
                }
                if window.by_key.get(&old.frame.key()) == Some(&old.seq) {
                    window.by_key.remove(&old.frame.key());
                }
                if let Some(random) = random_part(&old.id)
                    && window.by_random.get(&random) == Some(&old.seq)
                {
                    window.by_random.remove(&random);
                }
            }
        }
        drop(window);
        self.0.next_seq.send_replace(seq + 1);
    }

    /// Drops every entry (the stream they came from is gone); sequence numbers go on.
    pub fn clear(&self) {
        let mut window = self.window();
        window.first_seq += window.entries.len() as u64;
        window.entries.clear();
        window.by_id.clear();
        window.by_key.clear();
        window.by_random.clear();
        window.holes.clear();
    }

    /// Messages are missing between the window's newest entry and the next one: `reason`.
    pub fn mark_hole(&self, reason: &'static str) {
        let mut window = self.window();
        let next = window.first_seq + window.entries.len() as u64;
        window.holes.insert(next, reason);
    }

    /// Why messages are missing just before the entry `seq`, if they are.
    pub fn hole_before(&self, seq: u64) -> Option<&'static str> {
        self.window().holes.get(&seq).copied()
    }

    /// The stream offset and key of the newest entry, if it came from the stream.
    pub fn newest_offset_and_key(&self) -> Option<(u64, u64)> {
        let window = self.window();
        let newest = window.entries.back()?;
        Some((newest.offset?, newest.frame.key()))
    }

    /// The entry at `seq`: `Ok(None)` when it is not there yet, `Err(first)` when it already
    /// left the window, whose oldest entry is now `first`.
    fn get(&self, seq: u64) -> Result<Option<Entry>, u64> {
        let window = self.window();
        if seq < window.first_seq {
            return Err(window.first_seq);
        }
        Ok(window.entry(seq).cloned())
    }

    /// The window position of the message with this key, if it is in the window.
    fn seq_of_key(&self, key: u64) -> Option<u64> {
        self.window().by_key.get(&key).copied()
    }

    /// The newest entries, or those before `before` (an id), oldest first.
    /// `None`: `before` is not in the window.
    pub fn page(&self, limit: usize, before: Option<&str>) -> Option<Page> {
        let window = self.window();
        let end = match before {
            None => window.entries.len(),
            Some(id) => {
                let seq = *window.by_id.get(id).or_else(|| window.by_random.get(&random_part(id)?))?;
                usize::try_from(seq - window.first_seq).ok()?
            }
        };
        let start = end.saturating_sub(limit);
        Some(Page { entries: window.entries.range(start..end).cloned().collect(), more_in_window: start > 0 })
    }

    /// The oldest entry in the window.
    pub fn oldest(&self) -> Option<Entry> {
        self.window().entries.front().cloned()
    }

    /// Waits (at most `bound`) for a message the session saw moments ago to reach the window:
    /// the window's reader may lag the session's queue by a few milliseconds. Returns at once
    /// for an id that is in the window, or that is not from the last few seconds.
    pub async fn wait_for_recent(&self, since: &str, bound: Duration) {
        let Ok(ulid) = ulid::Ulid::from_string(since) else { return };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if ulid.timestamp_ms().saturating_add(RECENT.as_millis() as u64) < now || self.0.capacity == 0 {
            return;
        }
        let mut changes = self.0.next_seq.subscribe();
        let _ = tokio::time::timeout(bound, async {
            loop {
                changes.borrow_and_update();
                {
                    let window = self.window();
                    if window.by_id.contains_key(since) || window.by_random.contains_key(&ulid.random()) {
                        return;
                    }
                }
                if changes.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// The sequence number the next message will get: a resume point for "from now on" in
    /// `memory` mode (see [`crate::bus::Bus::resume_point`]).
    pub fn next_seq(&self) -> u64 {
        *self.0.next_seq.borrow()
    }

    /// Where a session that resumes from a position (`since=@N`, given by `GET /messages` as
    /// `resume`) starts: at the first message at or past it, by stream offset (`by_offset`,
    /// RabbitMQ: the same for every replica) or by sequence number (the embedded bus). A
    /// position past the window's end starts with the next message; one before the window,
    /// where messages already left it, starts at the oldest kept, with a gap.
    pub fn start_at(&self, position: u64, by_offset: bool) -> Start {
        let window = self.window();
        let next = window.first_seq + window.entries.len() as u64;
        if self.0.capacity == 0 {
            return Start { seq: next, gap: Some("history is turned off on this server") };
        }
        let evicted = window.first_seq > 0;
        let (first_position, found) = if by_offset {
            let first = window.entries.front().and_then(|e| e.offset);
            let found =
                window.entries.iter().find(|e| e.offset.is_some_and(|o| o >= position)).map(|e| e.seq);
            (first, found)
        } else {
            let found = (position < next).then(|| position.max(window.first_seq));
            (window.entries.front().map(|e| e.seq), found)
        };
        let seq = found.unwrap_or(next);
        let gap = (evicted && first_position.is_some_and(|first| first > position)).then_some(
            "messages after the resume point already left the history kept; replay starts at the oldest kept",
        );
        Start { seq, gap }
    }

    /// Where a session that last saw `since` starts.
    ///
    /// - `since` is in the window (by id, or by the random part of a ULID, which is what
    ///   identifies another service's message without a `message_id`): the entry after it.
    /// - Otherwise (older than the window, or unknown): the oldest entry, with a gap. On
    ///   RabbitMQ the caller then looks for `since` in the stream, before the window.
    ///
    /// (Times are not used to guess a position: ids made in the same millisecond as the
    /// window's oldest entry may be older than it.)
    pub fn start_after(&self, since: &str) -> Start {
        let window = self.window();
        let next = window.first_seq + window.entries.len() as u64;
        if self.0.capacity == 0 {
            return Start { seq: next, gap: Some("history is turned off on this server") };
        }
        if let Some(&seq) =
            window.by_id.get(since).or_else(|| random_part(since).and_then(|r| window.by_random.get(&r)))
        {
            return Start { seq: seq + 1, gap: None };
        }
        if window.entries.is_empty() {
            return Start { seq: next, gap: Some("the last message seen is not in the history") };
        }
        let reason = match ulid::Ulid::from_string(since) {
            Ok(_) => {
                "the last message seen is older than the history kept; replay starts at the oldest message kept"
            }
            Err(_) => "the last message seen is not in the history; replay starts at the oldest message kept",
        };
        Start { seq: window.first_seq, gap: Some(reason) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, ts_millis: i64) -> NewEntry {
        NewEntry {
            id: id.into(),
            ts_millis,
            offset: None,
            frame: Frame::from(format!("{{\"id\":\"{id}\"}}")),
        }
    }

    #[test]
    fn keys_that_share_their_low_or_high_bits_land_apart() {
        use std::{collections::HashSet, hash::BuildHasher};
        let seed = KeySeed::default();
        // Keys an attacker chose to differ only in their high bits, then only in their low ones:
        // the table's low 10 bits (its index in a window of 1,000) must still spread them.
        for keys in [(0..1000u64).map(|k| k << 40).collect::<Vec<_>>(), (0..1000u64).collect()] {
            let buckets: HashSet<u64> = keys.iter().map(|&k| seed.hash_one(k) & 1023).collect();
            assert!(buckets.len() > 550, "{} buckets of 1,024 for 1,000 keys", buckets.len());
        }
        // Another process's seed places them elsewhere.
        assert_ne!(seed.hash_one(1u64), KeySeed::default().hash_one(1u64));
    }

    #[test]
    fn a_resume_position_starts_at_the_first_message_at_or_past_it() {
        let history = History::new(3);
        // Empty: whatever comes next.
        assert_eq!(history.start_at(7, true), Start { seq: 0, gap: None });
        for (i, offset) in [10u64, 11, 13, 14].iter().enumerate() {
            let mut e = entry(&format!("m{i}"), i as i64);
            e.offset = Some(*offset);
            history.append(e);
        }
        // Window: seq 1..=3 at offsets 11, 13, 14; seq 0 (offset 10) left it.
        assert_eq!(history.start_at(12, true), Start { seq: 2, gap: None });
        assert_eq!(history.start_at(11, true), Start { seq: 1, gap: None });
        assert_eq!(history.start_at(15, true), Start { seq: 4, gap: None }, "past the end: next");
        let early = history.start_at(10, true);
        assert_eq!(early.seq, 1);
        assert!(early.gap.is_some(), "offset 10 left the window: {early:?}");
        // By sequence number (the embedded bus).
        assert_eq!(history.start_at(2, false), Start { seq: 2, gap: None });
        assert_eq!(history.start_at(9, false), Start { seq: 4, gap: None });
        assert!(history.start_at(0, false).gap.is_some());
    }

    #[test]
    fn the_window_keeps_the_newest_entries_and_pages_back() {
        let history = History::new(3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            history.append(entry(id, i as i64));
        }
        let page = history.page(10, None).unwrap();
        let ids: Vec<_> = page.entries.iter().map(|e| e.id.to_string()).collect();
        assert_eq!(ids, ["b", "c", "d"]);
        assert!(!page.more_in_window);
        let page = history.page(1, Some("d")).unwrap();
        assert_eq!(page.entries[0].id.as_ref(), "c");
        assert!(page.more_in_window);
        assert!(history.page(1, Some("a")).is_none(), "a left the window");
        assert!(matches!(history.get(0), Err(1)));
    }

    #[test]
    fn resuming_starts_after_the_last_seen_message_or_reports_a_gap() {
        let history = History::new(3);
        let ids: Vec<String> =
            (0..4).map(|i| ulid::Ulid::from_parts(1000 * (i + 1), u128::from(i) + 1).to_string()).collect();
        for (i, id) in ids.iter().enumerate() {
            history.append(entry(id, 1000 * (i as i64 + 1)));
        }
        assert_eq!(history.start_after(&ids[2]), Start { seq: 3, gap: None });
        let gone = history.start_after(&ids[0]);
        assert_eq!(gone.seq, 1);
        assert!(gone.gap.is_some(), "older than the window");
        // Another reader's id for the same foreign message: the same random part.
        let same = ulid::Ulid::from_parts(2999, 3).to_string();
        assert_eq!(history.start_after(&same), Start { seq: 3, gap: None });
        // A ULID not in the window, even from within its time span, is a gap (no guessing).
        let between = ulid::Ulid::from_parts(2500, 7).to_string();
        assert!(history.start_after(&between).gap.is_some());
        assert!(history.start_after("not-an-id").gap.is_some());
        assert!(History::new(0).start_after(&ids[3]).gap.is_some(), "history off");
    }
}
