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
const RECENT_KEYS: usize = 16;

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
    /// `catch_up`) skips these instead of sending them twice.
    recent: [u64; RECENT_KEYS],
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
                    if self.announced_hole != Some(self.cursor)
                        && let Some(reason) = self.history.hole_before(self.cursor)
                    {
                        self.announced_hole = Some(self.cursor);
                        return Some(Event::ReplayGap { reason, replay_from: None });
                    }
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
