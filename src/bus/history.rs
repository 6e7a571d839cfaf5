//! Recent history: a bounded window of the latest messages, and the resuming subscription that
//! replays from it.
//!
//! On RabbitMQ every replica fills its window by following the history stream (see
//! `rabbit/stream.rs`), so all replicas hold the same messages in the same order, the stream's.
//! The embedded bus appends what it publishes. Each entry has a sequence number local to this
//! process; sessions read the window by sequence number.
//!
//! # The hand-over from replay to live delivery
//!
//! A session that asks for what it missed (`GET /ws?since=<id>`) has its own live subscription
//! (its queue) bound *before* the replay starts, and reads two sources:
//!
//! 1. the window, from the entry after `since`, up to its end and on as it grows; then
//! 2. its own queue, once the window has caught up with it.
//!
//! The window has every message; the queue has those published after it was bound. The first
//! message the queue yields is held back until it shows up in the window (the window's reader
//! may lag the queue by a few milliseconds): everything before it in the window has been sent
//! by then, so the session switches to its queue there, skipping the queue's copies of what the
//! window already sent. No gap (the window has everything up to the switch; the queue everything
//! after it) and no duplicate (copies are recognised by [`Frame::key`]).

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use super::{Ack, Event, Frame, Live};

/// How long a session's first live message may wait for the window to catch up with it. Past
/// this (a stalled stream reader) the session takes its queue as it is: nothing is lost, at
/// worst a message arrives twice.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How many of the last delivered messages a catch-up recognises as already sent.
const RECENT_KEYS: usize = 16;
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
    by_key: HashMap<u64, u64>,
    /// By the random part of ids that are ULIDs. A foreign message with neither `message_id`
    /// nor `timestamp` gets an id whose time is when a reader read it, which differs between
    /// readers, but whose random part is derived from the message (see
    /// `chat::Envelope::from_delivery`): a session can resume after it by that part.
    by_random: HashMap<u128, u64>,
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
    }

    /// The entry at `seq`: `Ok(None)` when it is not there yet, `Err(first)` when it already
    /// left the window, whose oldest entry is now `first`.
    fn get(&self, seq: u64) -> Result<Option<Entry>, u64> {
        let window = self.window();
        if seq < window.first_seq {
            return Err(window.first_seq);
        }
        Ok(usize::try_from(seq - window.first_seq).ok().and_then(|i| window.entries.get(i)).cloned())
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

    /// A subscription that delivers from `live` and, after a broker outage, replays from the
    /// window what the session missed while its queue was gone.
    pub fn follow(&self, live: Live) -> Resume {
        let next = *self.0.next_seq.borrow();
        let mut resume = self.resume(Start { seq: next, gap: None }, Vec::new(), live);
        resume.phase = Phase::Live;
        resume
    }

    pub fn resume(&self, start: Start, older: Vec<NewEntry>, live: Live) -> Resume {
        let notice = start.gap.map(|reason| {
            let from = older
                .first()
                .map(|e| (e.id.to_string(), e.ts_millis))
                .or_else(|| self.get(start.seq).ok().flatten().map(|e| (e.id.to_string(), e.ts_millis)));
            Event::ReplayGap { reason, replay_from: from }
        });
        Resume {
            history: self.clone(),
            changes: self.0.next_seq.subscribe(),
            older: older.into_iter().map(|e| e.frame).collect(),
            cursor: start.seq,
            start_seq: start.seq,
            last_key: None,
            last_next: start.seq,
            recent: [0; RECENT_KEYS],
            recent_at: 0,
            catching_up: false,
            live,
            // With history off there is nothing to replay, nor anything to wait for.
            phase: if self.0.capacity == 0 { Phase::Live } else { Phase::Replay { pending: None } },
            notice,
        }
    }
}

/// A resuming session's subscription; see the module docs.
pub struct Resume {
    history: History,
    changes: watch::Receiver<u64>,
    /// Sent before the window: what the session missed from before the window.
    older: VecDeque<Frame>,
    /// The next window entry to send.
    cursor: u64,
    /// Where this session's window part started: the catch-up point if it never got a message.
    start_seq: u64,
    /// The key of the last message this session got: the catch-up point after an outage.
    last_key: Option<u64>,
    /// The window's next sequence number when that message was delivered: the catch-up point
    /// if the message is not (or not yet) in the window.
    last_next: u64,
    /// Keys of the last messages delivered: a catch-up that starts a little early (see
    /// `catch_up`) skips these instead of sending them twice.
    recent: [u64; RECENT_KEYS],
    recent_at: usize,
    /// Replaying after an outage (not a `since` resume): only then are `recent` skipped, as
    /// identical notifications from another service may legitimately repeat.
    catching_up: bool,
    live: Live,
    phase: Phase,
    /// Sent first: why some of what the session asked for cannot be replayed.
    notice: Option<Event>,
}

enum Phase {
    /// Sending from the window; the queue's first message waits in `pending`.
    Replay { pending: Option<Pending> },
    /// Live from the queue, skipping the copies of what the window sent (window positions
    /// below `until`).
    Skip { until: u64 },
    /// Live from the queue only.
    Live,
}

struct Pending {
    frame: Frame,
    ack: Option<Ack>,
    since: tokio::time::Instant,
}

impl Resume {
    /// The next event; cancel-safe, as [`super::Subscription::next`] is.
    pub async fn next(&mut self) -> Option<Event> {
        let event = self.next_event().await;
        match &event {
            Some(Event::Message(frame, _)) => {
                self.last_key = Some(frame.key());
                // Exact when the message is in the window already; otherwise where the window
                // is now, which it has not passed (its reader lags the queue).
                self.last_next = self
                    .history
                    .seq_of_key(frame.key())
                    .map_or_else(|| *self.changes.borrow(), |seq| seq + 1);
                self.recent[self.recent_at % RECENT_KEYS] = frame.key();
                self.recent_at += 1;
            }
            // The session's queue is back after an outage, but what was published meanwhile
            // never reached it (the old queue went with the connection): replay that from the
            // window, and hand over to the new queue as a resuming session does.
            Some(Event::Restored) if self.history.capacity() > 0 => self.catch_up(),
            _ => {}
        }
        event
    }

    fn catch_up(&mut self) {
        // After the last message it got, found by its key; if the window does not have that
        // one (yet: its reader may lag the queue), from where the window was when it came,
        // which may repeat a few messages but skips none. A point that already left the
        // window shows as a gap with its count (see `Phase::Replay`).
        self.cursor = match self.last_key.and_then(|key| self.history.seq_of_key(key)) {
            Some(seq) => seq + 1,
            None if self.last_key.is_some() => self.last_next,
            None => self.start_seq,
        };
        tracing::debug!(cursor = self.cursor, "catching up from the history window after an outage");
        self.phase = Phase::Replay { pending: None };
        self.catching_up = true;
    }

    async fn next_event(&mut self) -> Option<Event> {
        if let Some(notice) = self.notice.take() {
            return Some(notice);
        }
        if let Some(frame) = self.older.pop_front() {
            return Some(Event::Message(frame, None));
        }
        loop {
            match &mut self.phase {
                Phase::Live => return self.live.next().await,
                Phase::Skip { until } => {
                    let until = *until;
                    let event = self.live.next().await?;
                    let Event::Message(frame, ack) = event else { return Some(event) };
                    match self.history.seq_of_key(frame.key()) {
                        Some(seq) if seq < until => return Some(Event::Duplicate(ack)),
                        _ => {
                            // The queue is past what the window sent: the rest is live only.
                            self.phase = Phase::Live;
                            return Some(Event::Message(frame, ack));
                        }
                    }
                }
                Phase::Replay { pending } => {
                    if let Some(held) = pending {
                        match self.history.seq_of_key(held.frame.key()) {
                            Some(seq) if seq < self.cursor => {
                                // The window sent this one: switch to the queue here.
                                let ack = pending.take().and_then(|p| p.ack);
                                self.phase = Phase::Skip { until: self.cursor };
                                self.catching_up = false;
                                return Some(Event::Duplicate(ack));
                            }
                            // Only when the window does not have it at all: if it does, the
                            // replay is sure to reach it.
                            None if held.since.elapsed() >= HANDOVER_TIMEOUT => {
                                // What the window has not reached yet was published before
                                // the queue was bound: this session may not get it. Say so.
                                tracing::warn!(
                                    "the history window did not catch up with the session's queue; \
                                     continuing from the queue"
                                );
                                let held = pending.take()?;
                                self.phase = Phase::Live;
                                self.catching_up = false;
                                self.notice = Some(Event::Message(held.frame, held.ack));
                                return Some(Event::ReplayGap {
                                    reason: "the history could not be replayed in time; messages sent just \
                                             before this point may be missing",
                                    replay_from: None,
                                });
                            }
                            _ => {}
                        }
                    }
                    // Mark the window's state seen before reading it, so no append is missed.
                    self.changes.borrow_and_update();
                    match self.history.get(self.cursor) {
                        Ok(Some(entry)) => {
                            self.cursor += 1;
                            if self.catching_up && self.recent.contains(&entry.frame.key()) {
                                continue; // Delivered by the queue just before an outage.
                            }
                            return Some(Event::Message(entry.frame, None));
                        }
                        Err(first) => {
                            // This session fell further behind than the window holds.
                            let missed = first - self.cursor;
                            self.cursor = first;
                            return Some(Event::Gap(missed));
                        }
                        Ok(None) => {}
                    }
                    let deadline = pending.as_ref().map(|p| p.since + HANDOVER_TIMEOUT);
                    tokio::select! {
                        changed = self.changes.changed() => {
                            if changed.is_err() {
                                // The window is gone with the bus: the queue alone goes on.
                                self.phase = Phase::Live;
                            }
                        }
                        event = self.live.next(), if pending.is_none() => match event? {
                            Event::Message(frame, ack) => {
                                *pending = Some(Pending { frame, ack, since: tokio::time::Instant::now() });
                            }
                            other => return Some(other),
                        },
                        () = sleep_until(deadline) => {}
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
