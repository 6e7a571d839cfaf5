//! The RabbitMQ backend: a durable fanout exchange, and one exclusive queue per session.
//!
//! A supervisor task owns the broker *link*: one connection for publishing (confirm mode) and
//! one for the replica's own consumers (overflow, history stream), so that flow control on the
//! publishing side never stalls delivery. It connects with capped exponential backoff and
//! jitter, declares the exchange, publishes the link for everyone to use, and starts over when
//! either connection fails. The sessions are on `consumer_connections` other connections, the
//! *lanes*, each with a supervisor of its own: a lost connection interrupts only its sessions.
//! Each new connection goes to the next broker address (several hosts, or a name that resolves
//! to several), so a replica's connections spread over a cluster's nodes.
//!
//! Session consumers share channels (`sessions_per_channel` each, `channels_per_connection`
//! per connection): RabbitMQ allows 2047 channels per connection by default and recommends far
//! fewer, while a process must hold thousands of sessions. Each channel has a per-consumer
//! prefetch, which bounds both the unacknowledged messages in the broker and lapin's buffer.
//! A channel error ends every consumer on that channel; each affected session then re-creates
//! its own queue and consumer, as it does after a lost connection.
//!
//! The files, one idea each:
//! - this one: [`RabbitBus`], the state its parts share, and waiting for a link;
//! - [`address`]: which broker address each new connection goes to;
//! - [`link`]: the supervisor: connect, back off, declare, notice a lost link, reconnect;
//! - [`lanes`]: the consumer connections that carry the sessions, each supervised on its own;
//! - [`declare`]: the exchange and the exclusive, bound queues, and telling a refused
//!   declare (a channel error) from a lost connection;
//! - [`channels`]: the consumer channels that sessions share, and a session's place on one;
//! - [`session`]: one session's queue and consumer, and its restore after a failure;
//! - [`publish`]: publishing with confirms;
//! - [`overflow`]: counting what full session queues drop, per session, as gaps;
//! - [`process`]: `process` fan-out mode (one queue per process, copied in memory);
//! - [`stream`]: the history stream: declare it, follow it into the window, read it back;
//! - [`history_reads`]: history pages and long replays, read from the stream on demand;
//! - [`codec`]: a delivery turned into the frame a browser is sent.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering::Relaxed},
};

use tokio::{sync::watch, task::JoinHandle};
use tokio_util::sync::CancellationToken;

mod address;
mod channels;
mod codec;
mod declare;
mod history_reads;
mod lanes;
mod link;
mod overflow;
mod process;
mod publish;
mod session;
mod stream;

pub use history_reads::HISTORY_FILL_WAIT;
pub use session::RabbitSubscription;

use self::{
    address::Addresses,
    history_reads::{REPLAY_BUDGET_KIB, STREAM_READS},
    lanes::{Lanes, supervise_lane},
    link::{Link, LinkState, supervise},
    session::SessionEntry,
};
use super::{BusError, MemoryBus, Readiness, history::History};
use crate::{
    config::{FanoutMode, RabbitConfig},
    metrics::Metrics,
};

/// A handle on the RabbitMQ bus. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBus(Arc<Shared>);

/// What the bus's parts share: the supervisor writes the link, sessions and readers of the
/// stream read it, and the overflow consumer counts drops into `sessions`.
struct Shared {
    config: RabbitConfig,
    replica: String,
    /// Larger bodies are not forwarded to browsers (see [`super::Event::Oversized`]).
    max_frame_bytes: usize,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    link: watch::Receiver<LinkState>,
    /// Where new connections go.
    addresses: Addresses,
    /// Told when a connection to the broker succeeds: the link and the lanes waiting out a
    /// backoff try again at once, so that they come back together.
    reachable: tokio::sync::Notify,
    /// Each message decoded once for all the sessions of the process.
    frames: codec::Frames,
    /// Why the broker blocked the publishing connection, while it does (`connection.blocked`).
    blocked: std::sync::Mutex<Option<String>>,
    /// When the link was lost, while it is down (see [`publish`]).
    down_since: std::sync::Mutex<Option<std::time::Instant>>,
    /// The consumer connections that carry the sessions (none in `process` mode).
    lanes: Lanes,
    /// The link's supervisor and the lanes'.
    supervisors: std::sync::Mutex<Vec<JoinHandle<()>>>,
    /// In `process` fan-out mode: hands the process queue's messages to the sessions.
    local: Option<MemoryBus>,
    /// Every open session, by its first queue name: what its full queue dropped.
    sessions: std::sync::Mutex<HashMap<String, Arc<SessionEntry>>>,
    /// The window of recent messages, filled from the history stream (capacity 0: no stream).
    history: History,
    /// In `process` fan-out mode: the sessions were told of an outage, and the next process
    /// queue must tell them `restored` before it hands them anything.
    process_restored: std::sync::atomic::AtomicBool,
    /// Bounds the reads of the stream made on demand (history pages, long replays), each a
    /// consumer on the broker: a flood of requests for old history cannot pile them up.
    stream_reads: tokio::sync::Semaphore,
    /// Bytes (KiB) of history replayed from the stream to resuming sessions and not yet sent.
    replay_budget: Arc<tokio::sync::Semaphore>,
    /// The stream offset the follower reads next; `None` before the first link.
    stream_next: std::sync::Mutex<Option<u64>>,
    /// The window has been filled from the stream up to its end at start-up: until then the
    /// process is not ready.
    history_filled: watch::Sender<bool>,
}

impl RabbitBus {
    /// Spawns the supervisor and returns at once; see [`super::Bus::start`].
    pub fn start(
        config: RabbitConfig,
        replica: String,
        max_frame_bytes: usize,
        session_buffer: usize,
        history: History,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Self {
        let (sender, link) = watch::channel(LinkState::Down("connecting to the broker".into()));
        let local = (config.fanout == FanoutMode::Process)
            .then(|| MemoryBus::new(session_buffer, None, metrics.clone()));
        let lanes = if local.is_some() { 0 } else { config.consumer_connections };
        let shared = Arc::new(Shared {
            addresses: Addresses::new(&config),
            reachable: tokio::sync::Notify::new(),
            frames: codec::Frames::new(),
            down_since: std::sync::Mutex::new(None),
            blocked: std::sync::Mutex::new(None),
            lanes: Lanes::new(lanes),
            history_filled: watch::Sender::new(history.capacity() == 0),
            history,
            stream_next: std::sync::Mutex::new(None),
            process_restored: std::sync::atomic::AtomicBool::new(false),
            stream_reads: tokio::sync::Semaphore::new(STREAM_READS),
            replay_budget: Arc::new(tokio::sync::Semaphore::new(REPLAY_BUDGET_KIB)),
            local,
            config,
            replica,
            max_frame_bytes,
            metrics,
            shutdown,
            link,
            supervisors: std::sync::Mutex::new(Vec::new()),
            sessions: std::sync::Mutex::new(HashMap::new()),
        });
        let mut handles = vec![tokio::spawn(supervise(shared.clone(), sender))];
        handles.extend((0..lanes).map(|lane| tokio::spawn(supervise_lane(shared.clone(), lane))));
        *shared.supervisors.lock().unwrap_or_else(|p| p.into_inner()) = handles;
        Self(shared)
    }

    pub fn readiness(&self) -> Readiness {
        self.ready_link()?;
        if let Some(reason) = self.blocked() {
            return Err(BusError::Blocked(reason));
        }
        if self.0.local.is_none() && self.0.lanes.up() == 0 {
            return Err(BusError::Unavailable(
                "no consumer connection to the broker is up: sessions cannot be served".into(),
            ));
        }
        Ok(())
    }

    /// Why the broker blocks publishing now, if it does.
    fn blocked(&self) -> Option<String> {
        self.0.blocked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The link, if publishing is allowed on it now.
    fn ready_link(&self) -> Result<Arc<Link>, BusError> {
        let link = self.current_link()?;
        if link.ready.load(Relaxed) {
            Ok(link)
        } else {
            Err(BusError::Unavailable("filling the history window from the stream".into()))
        }
    }

    fn current_link(&self) -> Result<Arc<Link>, BusError> {
        match &*self.0.link.borrow() {
            LinkState::Up(link) => Ok(link.clone()),
            LinkState::Down(reason) => Err(BusError::Unavailable(reason.clone())),
            LinkState::Closed => Err(BusError::Unavailable("shutting down".into())),
        }
    }

    /// Waits for a usable link newer than `seen` (or any, when `seen` is `None`).
    /// `None` once the bus is closed.
    async fn wait_for_link(&self, seen: Option<u64>) -> Option<Arc<Link>> {
        let mut link = self.0.link.clone();
        loop {
            match &*link.borrow_and_update() {
                LinkState::Up(l) if seen.is_none_or(|g| l.generation > g) => return Some(l.clone()),
                LinkState::Closed => return None,
                _ => {}
            }
            link.changed().await.ok()?;
        }
    }

    pub fn history(&self) -> &History {
        &self.0.history
    }

    /// The stream offset the window's reader takes next: "now", as far as this replica knows
    /// (a reader that lags only makes a resume from here replay a little more).
    pub fn stream_position(&self) -> Option<u64> {
        *self.0.stream_next.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn close(&self) {
        let handles = std::mem::take(&mut *self.0.supervisors.lock().unwrap_or_else(|p| p.into_inner()));
        futures_util::future::join_all(handles).await;
    }
}
