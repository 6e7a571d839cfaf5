//! The embedded bus: a tokio broadcast channel inside this process.
//!
//! Every session sees every message published through this process, and nothing else: two
//! replicas on this bus do not see each other, which is why start-up warns loudly about it.
//! A session that falls more than the channel's capacity behind skips ahead: it is never waited
//! for. What it skipped is replayed to it from the history window, in order, and it is told how
//! many messages it missed only when the window no longer has them.
//!
//! The RabbitMQ bus in `process` fan-out mode uses the same channel to hand the messages of
//! its one per-process queue to the sessions, with notices of broker outages in between.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use tokio::sync::broadcast;

use super::{
    BusError, Event, Frame,
    history::{History, NewEntry},
};
use crate::{chat::Envelope, metrics::Metrics};

/// What goes through the channel.
#[derive(Clone, Debug)]
enum Item {
    Frame(Frame),
    /// Messages every session missed (the process queue dropped them).
    Missed(u64),
    Interrupted(String),
    Restored,
}

#[derive(Clone)]
pub struct MemoryBus {
    sender: broadcast::Sender<Item>,
    /// As the embedded bus: the window every publish is appended to. (In `process` mode the
    /// history stream fills the window instead.)
    history: Option<(History, Arc<std::sync::Mutex<()>>)>,
    metrics: Arc<Metrics>,
}

impl MemoryBus {
    pub fn new(capacity: usize, history: Option<History>, metrics: Arc<Metrics>) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self { sender, history: history.map(|h| (h, Arc::default())), metrics }
    }

    pub fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let frame = Frame::from(envelope.to_json());
        match &self.history {
            Some((history, order)) => {
                // One lock around both, so the window and the sessions see publishes in the
                // same order.
                let _order = order.lock().unwrap_or_else(|p| p.into_inner());
                history.append(NewEntry {
                    id: envelope.id.as_str().into(),
                    ts_millis: envelope.ts_millis(),
                    offset: None,
                    frame: frame.clone(),
                });
                self.send_frame(frame);
            }
            None => self.send_frame(frame),
        }
        Ok(())
    }

    /// Hands one frame to every session.
    pub fn send_frame(&self, frame: Frame) {
        // Sending fails only when nobody listens, and then there is nobody to deliver to.
        let _ = self.sender.send(Item::Frame(frame));
    }

    /// Tells every session it missed `count` messages.
    pub fn send_gap(&self, count: u64) {
        let _ = self.sender.send(Item::Missed(count));
    }

    /// Tells every session that delivery stopped, or that it is back.
    pub fn send_notice(&self, interrupted: Option<String>) {
        let _ = self.sender.send(interrupted.map_or(Item::Restored, Item::Interrupted));
    }

    /// The embedded bus's window (empty, with capacity 0, in `process` mode's local bus).
    pub fn history(&self) -> &History {
        static NONE: std::sync::LazyLock<History> = std::sync::LazyLock::new(|| History::new(0));
        self.history.as_ref().map_or(&NONE, |(history, _)| history)
    }

    pub fn subscribe(&self) -> MemorySubscription {
        MemorySubscription { receiver: self.sender.subscribe(), held: None, metrics: self.metrics.clone() }
    }
}

pub struct MemorySubscription {
    receiver: broadcast::Receiver<Item>,
    /// Taken from the channel while counting a run of `Missed`, and not yet returned.
    held: Option<Item>,
    metrics: Arc<Metrics>,
}

impl MemorySubscription {
    pub(super) fn count_skipped(&self, missed: u64) {
        self.metrics.skipped.fetch_add(missed, Relaxed);
    }

    /// Cancel-safe: `recv` is, and what is taken meanwhile is held, not dropped.
    pub async fn next(&mut self) -> Option<Event> {
        let item = match self.held.take() {
            Some(item) => Ok(item),
            None => self.receiver.recv().await,
        };
        match item {
            Ok(Item::Frame(frame)) => Some(Event::Message(frame, None)),
            Ok(Item::Interrupted(reason)) => Some(Event::Interrupted(reason)),
            Ok(Item::Restored) => Some(Event::Restored),
            Ok(Item::Missed(mut count)) => {
                // Drops are counted one dead-letter at a time: one notice for a run of them.
                loop {
                    match self.receiver.try_recv() {
                        Ok(Item::Missed(more)) => count += more,
                        Ok(other) => {
                            self.held = Some(other);
                            break;
                        }
                        // Fell behind meanwhile: those are missed too.
                        Err(broadcast::error::TryRecvError::Lagged(skipped)) => {
                            self.metrics.skipped.fetch_add(skipped, Relaxed);
                            count += skipped;
                        }
                        Err(_) => break,
                    }
                }
                Some(Event::Gap(count))
            }
            // Replayed from the history window where it has them (see `Event::Behind`).
            Err(broadcast::error::RecvError::Lagged(missed)) => Some(Event::Behind(missed)),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
