//! A resuming session's subscription: the replay from the window, then its own queue.
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

use std::{collections::VecDeque, time::Duration};

use tokio::sync::watch;

use super::{History, Older, Start};
use crate::bus::{Ack, Event, Frame, Live};

/// How long a session's first live message may wait for the window to catch up with it. Past
/// this (a stalled stream reader) the session takes its queue as it is: nothing is lost, at
/// worst a message arrives twice.
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(5);
/// How many of the last delivered messages a catch-up recognises as already sent.
const RECENT_KEYS: usize = 64;

impl History {
    /// A subscription that delivers from `live` and, after a broker outage, replays from the
    /// window what the session missed while its queue was gone.
    pub fn follow(&self, live: Live) -> Resume {
        let next = *self.0.next_seq.borrow();
        let mut resume = self.resume(Start { seq: next, gap: None }, Older::default(), live);
        resume.phase = Phase::Live;
        resume
    }

    pub fn resume(&self, start: Start, older: Older, live: Live) -> Resume {
        let Older { entries: older, budget: older_budget } = older;
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
            older_budget,
            cursor: start.seq,
            start_seq: start.seq,
            last_key: None,
            last_next: start.seq,
            recent: [0; RECENT_KEYS],
            before_outage: None,
            recent_at: 0,
            catching_up: false,
            announced_hole: None,
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
    /// The share of the replay budget `older` holds; given back once `older` is sent.
    older_budget: Option<tokio::sync::OwnedSemaphorePermit>,
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
    /// `catch_up`) skips these instead of sending them twice, and a second copy of one that
    /// carried a message id (a publish sent again) is dropped.
    recent: [u64; RECENT_KEYS],
    /// `recent` as it was when the catch-up began: what the replay skips. (The replay's own
    /// messages go into `recent` too, and would push out the ones to skip.) Held only while
    /// catching up.
    before_outage: Option<Box<[u64; RECENT_KEYS]>>,
    recent_at: usize,
    /// Replaying after an outage (not a `since` resume): only then are `recent` skipped, as
    /// identical notifications from another service may legitimately repeat.
    catching_up: bool,
    /// The last hole in the window (see `History::mark_hole`) this session was told of.
    announced_hole: Option<u64>,
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
    /// The window has held it (it may have left since).
    in_window: bool,
}

impl Resume {
    /// The next event; cancel-safe, as [`super::Subscription::next`] is.
    pub async fn next(&mut self) -> Option<Event> {
        let event = loop {
            match self.next_event().await {
                // A second copy of a message it was sent: a publish sent again after its confirm
                // was lost with its connection (same id, body and timestamp, so the same key).
                Some(Event::Message(frame, ack))
                    if frame.is_identified() && self.recent.contains(&frame.key()) =>
                {
                    self.live.count_duplicate();
                    return Some(Event::Duplicate(ack));
                }
                // The in-process channel moved on without this session: what it skipped comes
                // right before the channel's next message, so a replay from the window after
                // the last message it got, handed over to the channel as after an outage,
                // sends them in order. A replay under way covers them already.
                Some(Event::Behind(missed)) => {
                    self.live.count_skipped(missed);
                    if self.history.capacity() == 0 {
                        return Some(Event::Gap(missed));
                    }
                    if !matches!(self.phase, Phase::Replay { .. }) {
                        self.catch_up();
                    }
                }
                event => break event,
            }
        };
        match &event {
            Some(Event::Message(frame, _)) => {
                self.last_key = Some(frame.key());
                // Exact when the message is in the window. When it is not, it may be newer (the
                // window's reader lags the queue) or older (a session whose queue is behind
                // the window, which already dropped it): keep the last exact point, which may
                // repeat a few messages (the `recent` ones are skipped) but skips none. (Taking
                // the window's end here skipped what an older message's session had not seen.)
                if let Some(seq) = self.history.seq_of_key(frame.key()) {
                    self.last_next = seq + 1;
                }
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
        self.before_outage = Some(Box::new(self.recent));
    }

    async fn next_event(&mut self) -> Option<Event> {
        if let Some(notice) = self.notice.take() {
            return Some(notice);
        }
        if let Some(frame) = self.older.pop_front() {
            return Some(Event::Message(frame, None));
        }
        self.older_budget = None;
        loop {
            match &mut self.phase {
                Phase::Live => return self.live.next().await,
                Phase::Skip { until } => {
                    let until = *until;
                    let event = self.live.next().await?;
                    let Event::Message(frame, ack) = event else { return Some(event) };
                    match self.history.seq_of_key(frame.key()) {
                        Some(seq) if seq < until => return Some(Event::Duplicate(ack)),
                        Some(_) => {
                            // The queue is past what the window sent: the rest is live only.
                            self.phase = Phase::Live;
                            return Some(Event::Message(frame, ack));
                        }
                        // Left the window already, but the replay just sent it.
                        None if self.recent.contains(&frame.key()) => return Some(Event::Duplicate(ack)),
                        // Not in the window (yet, or any more): the replay did not send it. Go
                        // on checking: the queue may still hold copies of what it sent.
                        None => return Some(Event::Message(frame, ack)),
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
                                self.before_outage = None;
                                return Some(Event::Duplicate(ack));
                            }
                            Some(_) => held.in_window = true,
                            // It was in the window and left it before the replay reached it:
                            // the replay's gap notice covers it (or the replay sent it). Drop
                            // it, and hand over at the queue's next message instead.
                            None if held.in_window => {
                                let ack = pending.take().and_then(|p| p.ack);
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
                                // The queue's copies of what the window already sent are
                                // still skipped.
                                self.phase = Phase::Skip { until: self.cursor };
                                self.catching_up = false;
                                self.before_outage = None;
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
                    if self.announced_hole != Some(self.cursor)
                        && let Some(reason) = self.history.hole_before(self.cursor)
                    {
                        self.announced_hole = Some(self.cursor);
                        return Some(Event::ReplayGap { reason, replay_from: None });
                    }
                    match self.history.get(self.cursor) {
                        Ok(Some(entry)) => {
                            self.cursor += 1;
                            if self.catching_up
                                && self
                                    .before_outage
                                    .as_ref()
                                    .is_some_and(|keys| keys.contains(&entry.frame.key()))
                            {
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
                                *pending = Some(Pending { frame, ack, since: tokio::time::Instant::now(), in_window: false });
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

/// A property of resuming: whatever happens to a session (publishes, outages of its live feed,
/// messages removed from the history before they were read, a window too small for an
/// outage), the messages it shows plus its gap notices cover exactly what was published, in
/// order, with nothing twice.
#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        bus::{history::NewEntry, memory::MemoryBus},
        metrics::Metrics,
    };

    /// A small deterministic generator (xorshift64*), so a failing seed can be replayed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
    }

    #[derive(Debug, PartialEq)]
    enum Seen {
        Message(u64),
        Gap,
        Note(String),
    }

    /// Message `n` into the window; its frame, for the live feed.
    fn append(history: &History, n: u64) -> Frame {
        let frame = Frame::from(format!("{{\"n\":{n}}}"));
        history.append(NewEntry {
            id: format!("m{n}").into(),
            ts_millis: 0,
            offset: None,
            frame: frame.clone(),
        });
        frame
    }

    /// What the session shows until the live feed and the window go quiet.
    async fn drain(resume: &mut Resume, seen: &mut Vec<Seen>) {
        while let Ok(Some(event)) = tokio::time::timeout(Duration::from_secs(30), resume.next()).await {
            match event {
                Event::Message(frame, _) => {
                    let n = frame.text().trim_start_matches("{\"n\":").trim_end_matches('}').parse().unwrap();
                    seen.push(Seen::Message(n));
                }
                Event::Gap(n) => {
                    seen.push(Seen::Note(format!("gap{n}")));
                    seen.push(Seen::Gap)
                }
                Event::ReplayGap { reason, .. } => {
                    seen.push(Seen::Note(reason.chars().take(12).collect()));
                    seen.push(Seen::Gap)
                }
                Event::Interrupted(_) => seen.push(Seen::Note("interrupted".into())),
                Event::Restored => seen.push(Seen::Note("restored".into())),
                Event::Duplicate(_) => seen.push(Seen::Note("dup".into())),
                _ => {}
            }
        }
    }

    /// A session that falls behind its in-process channel (the embedded bus, process mode)
    /// gets what the channel skipped from the window, in order, with no gap notice; a notice
    /// only for what the window no longer has.
    #[tokio::test(start_paused = true)]
    async fn a_session_behind_its_channel_gets_what_it_skipped_from_the_window() {
        for (window, expected_gap) in [(100, None), (10, Some(Seen::Note("gap40".into())))] {
            let history = History::new(window);
            let live = MemoryBus::new(4, None, Arc::new(Metrics::default()));
            let mut resume = history.follow(Live::Memory(live.subscribe()));
            // Published while the session did not read: the channel holds only the last 4.
            for n in 0..50u64 {
                let frame = append(&history, n);
                live.send_frame(frame);
            }
            let mut seen = Vec::new();
            drain(&mut resume, &mut seen).await;
            let shown: Vec<u64> =
                seen.iter().filter_map(|s| if let Seen::Message(n) = s { Some(*n) } else { None }).collect();
            let notices: Vec<&Seen> =
                seen.iter().filter(|s| matches!(s, Seen::Note(n) if n.starts_with("gap"))).collect();
            match expected_gap {
                None => {
                    assert_eq!(shown, (0..50).collect::<Vec<_>>(), "all of it, in order: {seen:?}");
                    assert!(notices.is_empty(), "no gap notice: {seen:?}");
                }
                Some(gap) => {
                    // The window kept the last 10: those are replayed; the 40 before are told.
                    assert_eq!(shown, (40..50).collect::<Vec<_>>(), "{seen:?}");
                    assert_eq!(notices, [&gap], "{seen:?}");
                }
            }
        }
    }

    async fn one_run(seed: u64) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let capacity = 1 + rng.below(8) as usize;
        let history = History::new(capacity);
        // The session's live feed: its queue (a broadcast channel that tells when it lags).
        let live = MemoryBus::new(4 + rng.below(16) as usize, None, Arc::new(Metrics::default()));
        let mut resume = history.follow(Live::Memory(live.subscribe()));
        let mut seen = Vec::new();
        let mut connected = true;
        let mut published = 0u64;
        for _ in 0..(20 + rng.below(60)) {
            match rng.below(10) {
                // An outage of the session's feed, or its end.
                0 if connected => {
                    seen.push(Seen::Note(format!("OP down at {published}")));
                    live.send_notice(Some("outage".into()));
                    connected = false;
                }
                1 if !connected => {
                    seen.push(Seen::Note(format!("OP up at {published}")));
                    live.send_notice(None);
                    connected = true;
                }
                // Published while the window's reader was away: retention removed these from
                // the history before it read them, and the reader marks the hole.
                2 if !connected => {
                    seen.push(Seen::Note(format!("OP cut at {published}")));
                    published += 1 + rng.below(3);
                    history.mark_hole("retention");
                }
                _ => {
                    let n = published;
                    published += 1;
                    let frame = append(&history, n);
                    if connected {
                        live.send_frame(frame);
                    }
                }
            }
            if rng.below(3) == 0 {
                seen.push(Seen::Note(format!("OP drain at {published}")));
                drain(&mut resume, &mut seen).await;
            }
        }
        if !connected {
            live.send_notice(None);
        }
        // A last message, so that what went missing at the end is followed by something shown.
        let last = published;
        let frame = append(&history, last);
        live.send_frame(frame);
        drain(&mut resume, &mut seen).await;

        let shown: Vec<u64> =
            seen.iter().filter_map(|s| if let Seen::Message(n) = s { Some(*n) } else { None }).collect();
        let mut unique = shown.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), shown.len(), "seed {seed}: nothing twice: {seen:?}");
        assert!(shown.contains(&last), "seed {seed}: the last message shows: {seen:?}");
        // Every message not shown lies in a stretch that a gap notice covers: the session never
        // skips ahead past a message without a gap notice since the last one it showed. (One
        // shown late, after such a notice, is not a loss.)
        let mut expected = 0u64;
        let mut gap_since_last_shown = false;
        for s in &seen {
            match s {
                Seen::Gap => gap_since_last_shown = true,
                Seen::Note(_) => {}
                Seen::Message(n) => {
                    assert!(
                        *n <= expected || gap_since_last_shown,
                        "seed {seed}: messages {expected}..{n} went missing without a notice: {seen:?}"
                    );
                    if *n >= expected {
                        expected = n + 1;
                        gap_since_last_shown = false;
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn what_a_session_shows_plus_its_gap_notices_cover_exactly_what_was_published() {
        for seed in 0..2000 {
            one_run(seed).await;
        }
    }
}
