//! The message bus: where chat messages are published and read back.
//!
//! Two backends, chosen once at start from the configuration: RabbitMQ (a fanout exchange;
//! each subscription binds its own exclusive queue) and the embedded in-process bus (a tokio
//! broadcast, for zero-setup local runs). Both sit behind [`Bus`], and every caller matches
//! neither: it publishes [`Envelope`]s and reads [`Event`]s.

pub mod history;
mod memory;
mod rabbit;

use std::{sync::Arc, time::Duration};

use axum::extract::ws::Utf8Bytes;
use futures_util::FutureExt;
use history::History;
use tokio_util::sync::CancellationToken;

pub use memory::MemoryBus;
pub use rabbit::RabbitBus;

use crate::{chat::Envelope, config::Config, metrics::Metrics};

/// Where chat messages go. Cheap to clone.
#[derive(Clone)]
pub enum Bus {
    /// This process only: zero-setup local runs.
    Memory(MemoryBus),
    /// A RabbitMQ fanout exchange; each subscription binds its own exclusive queue.
    Rabbit(RabbitBus),
}

/// A resume position, `@N` (see [`Bus::resume_point`]).
pub fn parse_position(since: &str) -> Option<u64> {
    since.strip_prefix('@')?.parse().ok()
}

/// Why the bus could not do what was asked. Each maps to `503`: the client may retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    #[error("the message broker is not available: {0}")]
    Unavailable(String),
    #[error("the message broker refused the message")]
    Nacked,
    #[error("the message broker did not confirm the message within {0:?}")]
    Timeout(std::time::Duration),
    #[error("the message broker failed: {0}")]
    Broker(String),
    /// The broker blocked the publishing connection (`connection.blocked`: a memory or disk
    /// alarm); publishing resumes when it unblocks it. A state the public may be told of, unlike
    /// the broker's address; the broker's reason is the field.
    #[error("the message broker is refusing publishes (a memory or disk alarm): {0}")]
    Blocked(String),
}

/// One message frame, ready to write to a WebSocket: envelope JSON.
///
/// It holds the WebSocket text type itself, built once from a `String`, so the UTF-8 check is
/// never repeated per session, and clones (one per session on the embedded bus) share the bytes.
#[derive(Clone, Debug)]
pub struct Frame {
    text: Utf8Bytes,
    /// What the message is, as a hash: equal for the copies of one message that reach a session
    /// by two paths (its queue and the history window), so a resuming session sends it once.
    key: u64,
    /// The message carried an AMQP `message_id`: a second copy with the same key is the same
    /// publish sent again (see `rabbit::publish`), never a new message, and is dropped.
    /// (Without one, another service's identical notifications may legitimately repeat.)
    identified: bool,
}

impl Frame {
    pub fn new(json: String, key: u64) -> Self {
        Self { text: Utf8Bytes::from(json), key, identified: false }
    }

    /// A frame for a message that carried a `message_id` (see [`Frame::identified`]).
    pub fn identified(json: String, key: u64) -> Self {
        Self { identified: true, ..Self::new(json, key) }
    }

    pub fn is_identified(&self) -> bool {
        self.identified
    }

    pub fn into_text(self) -> Utf8Bytes {
        self.text
    }

    pub fn text(&self) -> &str {
        self.text.as_str()
    }

    pub fn key(&self) -> u64 {
        self.key
    }
}

/// Drops the oldest of `frames` (oldest first) until the rest fit in `max_bytes`, keeping at
/// least the newest one; true when any was dropped.
pub fn keep_newest_within(frames: &mut Vec<Frame>, max_bytes: usize) -> bool {
    let mut total = 0;
    let keep_from = frames
        .iter()
        .rposition(|frame| {
            total += frame.text().len();
            total > max_bytes
        })
        .map_or(0, |over| (over + 1).min(frames.len() - 1));
    frames.drain(..keep_from);
    keep_from > 0
}

impl From<String> for Frame {
    /// A frame whose key is the hash of its JSON: for messages this process made.
    fn from(json: String) -> Self {
        let key = history::key_of(&json);
        Self::new(json, key)
    }
}

/// What a subscription yields, in order.
pub enum Event {
    /// A message for the browser; acknowledge it once its frame is written.
    Message(Frame, Option<Ack>),
    /// This many messages were dropped because the session fell behind.
    Gap(u64),
    /// The session fell more than the in-process channel holds behind it (the embedded bus,
    /// or process mode): it missed this many messages, the ones right before the channel's
    /// next. Its [`history::Resume`] replays them from the window, in order, and makes a
    /// [`Event::Gap`] of what the window no longer has; never sent to a browser as it is.
    Behind(u64),
    /// A message (from another service) too large for a WebSocket frame was skipped;
    /// acknowledge it once the browser was told.
    Oversized { bytes: usize, ack: Ack },
    /// Delivery stopped (broker link or channel lost); the subscription is being restored.
    Interrupted(String),
    /// Delivery is back after an interruption.
    Restored,
    /// A resuming session's queue delivered a message the history replay already sent:
    /// acknowledge it, send nothing.
    Duplicate(Option<Ack>),
    /// A resuming session cannot get everything it asked for: why, and the message (id and
    /// time in milliseconds) the replay starts from, if any.
    ReplayGap { reason: &'static str, replay_from: Option<(String, i64)> },
}

/// The acknowledgement of one RabbitMQ delivery.
pub struct Ack(AckBy);

enum AckBy {
    /// Through lapin's `Acker`: its internal task spawns a future per ack, which then writes
    /// the frame on the channel.
    Acker(lapin::Acker),
    /// Straight on the channel that delivered it: the frame is queued at once, with no task
    /// in between. The delivery's `Acker` must then never be used.
    Channel(Arc<lapin::Channel>, u64),
}

impl Ack {
    pub(crate) fn by_acker(acker: lapin::Acker) -> Self {
        Self(AckBy::Acker(acker))
    }

    /// The ack of delivery `tag` of `channel`, sent on the channel itself (see [`AckBy`]).
    pub(crate) fn on_channel(channel: Arc<lapin::Channel>, tag: u64) -> Self {
        Self(AckBy::Channel(channel, tag))
    }

    /// Tells the broker the message reached the browser's socket. It does not wait: lapin
    /// queues the ack on its first poll, and its IO loop writes it; waiting for that write per
    /// delivery held each session's loop up for a round trip through lapin's IO thread.
    pub fn send(self) {
        let options = lapin::options::BasicAckOptions::default();
        let sent = match self.0 {
            AckBy::Acker(acker) => acker.ack(options).now_or_never().map(|r| r.map(drop)),
            AckBy::Channel(channel, tag) => channel.basic_ack(tag, options).now_or_never(),
        };
        if let Some(Err(e)) = sent {
            // The channel died under us: the delivery will not be redelivered to this session
            // (its queue goes with the channel), and the subscription recovers.
            tracing::debug!(error = %e, "ack failed");
        }
    }
}

/// Whether the bus can take publishes now.
pub type Readiness = Result<(), BusError>;

impl Bus {
    /// Builds the bus the configuration selects. For RabbitMQ this returns at once and connects
    /// in the background: an unreachable broker makes the process not-ready, never stops it.
    pub fn start(config: &Config, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Self {
        let history = History::new(config.history.window);
        match &config.rabbitmq {
            None => Self::Memory(MemoryBus::new(config.messages.memory_capacity, Some(history), metrics)),
            Some(rabbit) => Self::Rabbit(RabbitBus::start(
                rabbit.clone(),
                config.replica.clone(),
                config.max_frame_bytes(),
                config.messages.memory_capacity,
                history,
                metrics,
                shutdown,
            )),
        }
    }

    /// Publishes one message. Returns once the bus has it for good (broker confirm).
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        match self {
            Self::Memory(bus) => bus.publish(envelope),
            Self::Rabbit(bus) => bus.publish(envelope).await,
        }
    }

    /// Starts receiving every message published from now on, and, with `since` (the id of the
    /// last message the session saw), every message after that one first. When this returns,
    /// the session is bound: a message published after it is delivered to it.
    ///
    /// After a broker outage, the subscription also replays what the session missed meanwhile
    /// from the history window (see [`history`]).
    pub async fn subscribe(&self, session: &str, since: Option<&str>) -> Result<Subscription, BusError> {
        let live = match self {
            Self::Memory(bus) => Live::Memory(bus.subscribe()),
            Self::Rabbit(bus) => bus.subscribe(session).await?,
        };
        Ok(match since {
            None => Subscription(self.history().follow(live)),
            // A position (`@N`, the `resume` of a history page): everything from it on.
            Some(since) if let Some(position) = parse_position(since) => {
                if let Self::Rabbit(bus) = self {
                    bus.history_filled(rabbit::HISTORY_FILL_WAIT).await?;
                }
                let history = self.history();
                let start = history.start_at(position, matches!(self, Self::Rabbit(_)));
                Subscription(history.resume(start, history::Older::default(), live))
            }
            // Looked up only now that the session is bound: nothing can fall between the two.
            Some(since) => {
                if let Self::Rabbit(bus) = self {
                    bus.history_filled(rabbit::HISTORY_FILL_WAIT).await?;
                }
                let history = self.history();
                history.wait_for_recent(since, Duration::from_secs(2)).await;
                let mut start = history.start_after(since);
                let mut older = history::Older::default();
                if let (Self::Rabbit(bus), Some(_)) = (self, start.gap) {
                    // Older than the window: RabbitMQ may still have it in the stream.
                    (older, start) = bus.replay_before_window(since, start).await;
                }
                Subscription(history.resume(start, older, live))
            }
        })
    }

    /// Where "from now on" is, as a resume point a page hands to its socket (`since=@N`), so
    /// that a message published between a history page and the socket's subscription is not
    /// missed even when the page was empty. `None` without history.
    pub fn resume_point(&self) -> Option<String> {
        if self.history().capacity() == 0 {
            return None;
        }
        let position = match self {
            Self::Memory(bus) => Some(bus.history().next_seq()),
            Self::Rabbit(bus) => bus.stream_position(),
        };
        position.map(|n| format!("@{n}"))
    }

    /// The window of recent messages.
    pub fn history(&self) -> &History {
        match self {
            Self::Memory(bus) => bus.history(),
            Self::Rabbit(bus) => bus.history(),
        }
    }

    /// Up to `limit` messages, and at most `max_bytes` of them, before the message `before`
    /// (or the newest), oldest first, and whether older ones may exist. Older than the window,
    /// RabbitMQ reads them from the history stream.
    pub async fn history_page(
        &self,
        limit: usize,
        before: Option<&str>,
        max_bytes: usize,
    ) -> Result<(Vec<Frame>, bool), BusError> {
        match self {
            Self::Memory(bus) => Ok(match bus.history().page(limit, before) {
                Some(page) => {
                    let mut frames: Vec<Frame> = page.entries.into_iter().map(|e| e.frame).collect();
                    let trimmed = keep_newest_within(&mut frames, max_bytes);
                    (frames, page.more_in_window || trimmed)
                }
                None => (Vec::new(), false),
            }),
            Self::Rabbit(bus) => bus.history_page(limit, before, max_bytes).await,
        }
    }

    /// `Ok` when a publish can succeed now, else why not.
    pub fn readiness(&self) -> Readiness {
        match self {
            Self::Memory(_) => Ok(()),
            Self::Rabbit(bus) => bus.readiness(),
        }
    }

    /// Closes broker connections after the shutdown token was cancelled.
    pub async fn close(&self) {
        match self {
            Self::Memory(_) => {}
            Self::Rabbit(bus) => bus.close().await,
        }
    }
}

/// One session's stream of [`Event`]s: its live subscription, with history replayed before it
/// and after outages. Dropping it unbinds the session (its queue goes away).
pub struct Subscription(history::Resume);

impl Subscription {
    /// The next event. Cancel-safe: it may be dropped inside `select!` without losing one.
    /// `None` means the bus shut down.
    pub async fn next(&mut self) -> Option<Event> {
        self.0.next().await
    }
}

/// What the bus itself delivers to one session: messages published while it is bound.
pub enum Live {
    Memory(memory::MemorySubscription),
    /// Boxed: it is ten times the size of the other, and one is made per session.
    Rabbit(Box<rabbit::RabbitSubscription>),
}

impl Live {
    /// Cancel-safe, as [`Subscription::next`].
    pub async fn next(&mut self) -> Option<Event> {
        match self {
            Self::Memory(sub) => sub.next().await,
            Self::Rabbit(sub) => sub.next().await,
        }
    }

    /// Counts messages the session fell behind the in-process channel by (replayed from the
    /// window where it has them).
    fn count_skipped(&self, missed: u64) {
        if let Self::Memory(sub) = self {
            sub.count_skipped(missed);
        }
    }

    /// Counts a second copy of a message that the session dropped.
    fn count_duplicate(&self) {
        // On the embedded bus (and in process mode, whose queue drops them first) there are
        // none to count.
        if let Self::Rabbit(sub) = self {
            sub.count_duplicate();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(sizes: &[usize]) -> Vec<Frame> {
        sizes.iter().map(|&n| Frame::from("x".repeat(n))).collect()
    }

    #[test]
    fn a_page_keeps_its_newest_messages_within_the_byte_cap() {
        let mut page = frames(&[400, 300, 200, 100]);
        assert!(keep_newest_within(&mut page, 350), "the oldest go");
        assert_eq!(page.iter().map(|f| f.text().len()).collect::<Vec<_>>(), [200, 100]);
        let mut page = frames(&[100, 100]);
        assert!(!keep_newest_within(&mut page, 200), "exactly at the cap: all stay");
        assert_eq!(page.len(), 2);
        let mut page = frames(&[900]);
        assert!(!keep_newest_within(&mut page, 100), "the newest always stays, even alone over the cap");
        assert_eq!(page.len(), 1);
        let mut page = frames(&[500, 900]);
        assert!(keep_newest_within(&mut page, 100));
        assert_eq!(page.iter().map(|f| f.text().len()).collect::<Vec<_>>(), [900]);
        let mut empty = Vec::new();
        assert!(!keep_newest_within(&mut empty, 0));
    }
}
