//! The RabbitMQ backend: a durable fanout exchange, and one exclusive queue per session.
//!
//! A supervisor task owns the broker *link*: one connection for publishing (confirm mode) and
//! a few for consuming, so that flow control on the publishing side never stalls delivery.
//! It connects with capped exponential backoff and jitter, declares the exchange, publishes
//! the link for everyone to use, and starts over when any of its connections fails.
//!
//! Session consumers share channels (`sessions_per_channel` each, `channels_per_connection`
//! per connection): RabbitMQ allows 2047 channels per connection by default and recommends far
//! fewer, while a process must hold thousands of sessions. Each channel has a per-consumer
//! prefetch, which bounds both the unacknowledged messages in the broker and lapin's buffer.
//! A channel error ends every consumer on that channel; each affected session then re-creates
//! its own queue and consumer, as it does after a lost connection.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant, SystemTime},
};

use futures_util::{StreamExt, stream::select_all};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ErrorKind,
    ExchangeKind,
    options::{
        BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
        ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    },
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable, ShortString},
    uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo},
};
use tokio::{
    sync::{Mutex, Notify, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

mod stream;

use super::{
    Ack, BusError, Event, Frame, Live, MemoryBus, Readiness,
    history::{self, History},
};
use crate::{
    chat::{Decoded, Envelope, ForeignProperties},
    config::{FanoutMode, RabbitConfig},
    metrics::Metrics,
};

/// First reconnect delay; doubled per failed attempt up to `reconnect_max`.
const RECONNECT_BASE: Duration = Duration::from_millis(250);
/// Heartbeat asked of the broker: a dead TCP peer is noticed within about twice this.
const HEARTBEAT_SECS: u16 = 15;
/// Largest AMQP frame asked of the broker. lapin keeps two buffers of 32 frames per
/// connection; at RabbitMQ's default of 128 KiB that was 8 MiB of resident memory per
/// connection, 40 MiB of the idle process's 46 MiB. At 16 KiB a typical message still fits one
/// frame (larger bodies are split) and the buffers take 1 MiB per connection.
const FRAME_MAX: u32 = 16 * 1024;
/// How long to wait for the TCP + AMQP handshake before trying again.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Where session queues dead-letter what they drop when full (a topic exchange: the routing key
/// is the session's queue name, so each replica binds `fanout-chat.<replica>.*`).
const OVERFLOW_EXCHANGE: &str = "fanout-chat.overflow";
/// Bound of a replica's overflow queue: it only carries counts, and is read as fast as it fills.
const OVERFLOW_QUEUE_MAX_LENGTH: i32 = 10_000;
/// A link up for this long is healthy: its loss starts the backoff from the beginning.
const STABLE_LINK: Duration = Duration::from_secs(30);
/// How long a request for history waits for the window to be filled at start-up, before it is
/// answered 503.
pub const HISTORY_FILL_WAIT: Duration = Duration::from_secs(5);
/// Reads of the history stream on demand that may run at once, per process.
const STREAM_READS: usize = 8;
/// How long a read of the stream waits for its turn before it is answered 503.
const STREAM_READ_WAIT: Duration = Duration::from_secs(2);
/// How long a clean close of a connection may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// A handle on the RabbitMQ bus. Cheap to clone.
#[derive(Clone)]
pub struct RabbitBus(Arc<Shared>);

struct Shared {
    config: RabbitConfig,
    replica: String,
    /// Larger bodies are not forwarded to browsers (see [`Event::Oversized`]).
    max_frame_bytes: usize,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    link: watch::Receiver<LinkState>,
    supervisor: std::sync::Mutex<Option<JoinHandle<()>>>,
    /// In `process` fan-out mode: hands the process queue's messages to the sessions.
    local: Option<MemoryBus>,
    /// Every open session, by its first queue name: what its full queue dropped, and which
    /// link its queue is bound on.
    sessions: std::sync::Mutex<HashMap<String, Arc<SessionEntry>>>,
    /// The window of recent messages, filled from the history stream (capacity 0: no stream).
    history: History,
    /// In `process` fan-out mode: the sessions were told of an outage, and the next process
    /// queue must tell them `restored` before it hands them anything.
    process_restored: std::sync::atomic::AtomicBool,
    /// Bounds the reads of the stream made on demand (history pages, long replays), each a
    /// consumer on the broker: a flood of requests for old history cannot pile them up.
    stream_reads: tokio::sync::Semaphore,
    /// The stream offset the follower reads next; `None` before the first link.
    stream_next: std::sync::Mutex<Option<u64>>,
    /// The window has been filled from the stream up to its end at start-up: until then the
    /// process is not ready.
    history_filled: watch::Sender<bool>,
}

/// What the bus knows of one open session.
#[derive(Default)]
struct SessionEntry {
    /// Messages its queue dropped (oldest first, at `x-max-length`), as counted by the
    /// replica's overflow consumer from the dead-letters of that queue.
    dropped: AtomicU64,
    notify: Notify,
    /// The generation of the link its queue is bound on; behind the current link while the
    /// session re-creates its queue after an outage.
    generation: AtomicU64,
}

#[derive(Clone)]
enum LinkState {
    /// Not connected (yet, or again); the reason is what `/readyz` reports.
    Down(String),
    Up(Arc<Link>),
    Closed,
}

/// One generation of broker connections and what was declared on them.
struct Link {
    generation: u64,
    /// Publishing is allowed. After a reconnect this waits until every open session has its
    /// queue bound again, so that no message is confirmed (202) while a session's queue is
    /// missing: it would be lost for that session without a trace.
    ready: std::sync::atomic::AtomicBool,
    publisher: Channel,
    connections: Vec<Connection>,
    /// Consumer channels and how many sessions each carries.
    pool: Mutex<Vec<Arc<Slot>>>,
    /// Notified by whoever finds the link broken in a way the connections do not report
    /// (the publishing channel closed by a channel error).
    broken: Arc<Notify>,
}

/// A consumer channel and its share of sessions.
struct Slot {
    channel: Channel,
    /// Index in `Link::connections` (consumer connections start at 1).
    connection: usize,
    sessions: AtomicUsize,
}

/// Holds one session's place on a [`Slot`]; gives it back when dropped.
struct SlotLease(Arc<Slot>);

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
    }
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
        let shared = Arc::new(Shared {
            history_filled: watch::Sender::new(history.capacity() == 0),
            history,
            stream_next: std::sync::Mutex::new(None),
            process_restored: std::sync::atomic::AtomicBool::new(false),
            stream_reads: tokio::sync::Semaphore::new(STREAM_READS),
            local,
            config,
            replica,
            max_frame_bytes,
            metrics,
            shutdown,
            link,
            supervisor: std::sync::Mutex::new(None),
            sessions: std::sync::Mutex::new(HashMap::new()),
        });
        let handle = tokio::spawn(supervise(shared.clone(), sender));
        if let Ok(mut slot) = shared.supervisor.lock() {
            *slot = Some(handle);
        }
        Self(shared)
    }

    pub fn readiness(&self) -> Readiness {
        self.ready_link().map(drop).map_err(|e| match e {
            BusError::Unavailable(reason) => reason,
            other => other.to_string(),
        })
    }

    /// The link, if publishing is allowed on it now.
    fn ready_link(&self) -> Result<Arc<Link>, BusError> {
        let link = self.current_link()?;
        if link.ready.load(Relaxed) {
            Ok(link)
        } else {
            Err(BusError::Unavailable("re-creating the open sessions' queues after a reconnect".into()))
        }
    }

    fn current_link(&self) -> Result<Arc<Link>, BusError> {
        match &*self.0.link.borrow() {
            LinkState::Up(link) => Ok(link.clone()),
            LinkState::Down(reason) => Err(BusError::Unavailable(reason.clone())),
            LinkState::Closed => Err(BusError::Unavailable("shutting down".into())),
        }
    }

    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let link = self.ready_link()?;
        let config = &self.0.config;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(envelope.id.as_str().into())
            .with_timestamp(unix_now())
            .with_app_id("fanout-chat".into())
            // Persistent, for the durable queues other services may bind; the sessions'
            // own queues are transient and ignore it.
            .with_delivery_mode(2);
        let body = envelope.to_json();
        let confirmed = tokio::time::timeout(config.publish_timeout, async {
            link.publisher
                .basic_publish(
                    config.exchange.as_str().into(),
                    ShortString::from(""),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    properties,
                )
                .await?
                .await
        })
        .await;
        let result = match confirmed {
            Ok(Ok(Confirmation::Ack(_))) => Ok(()),
            Ok(Ok(Confirmation::Nack(_))) => Err(BusError::Nacked),
            Ok(Ok(Confirmation::NotRequested)) => Err(BusError::Broker("publisher confirms are off".into())),
            Ok(Err(e)) => {
                if !link.publisher.status().connected() {
                    // The channel is gone (a channel error): nothing more can be published on
                    // this link, so have the supervisor build a new one.
                    link.broken.notify_one();
                }
                Err(BusError::Broker(e.to_string()))
            }
            Err(_) => Err(BusError::Timeout(config.publish_timeout)),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, id = %envelope.id, "publish failed");
        }
        result
    }

    /// Declares, binds and consumes the session's queue. The work runs in its own task, so a
    /// caller that gives up (a browser that goes away mid-handshake) cannot leave a consumer
    /// half made: the task finishes, and its result is dropped cleanly.
    pub async fn subscribe(&self, session: &str) -> Result<Live, BusError> {
        let link = self.current_link()?;
        if let Some(local) = &self.0.local {
            return Ok(Live::Memory(local.subscribe()));
        }
        let queue = format!("fanout-chat.{}.{}", self.0.replica, session);
        let bus = self.clone();
        let name = queue.clone();
        let active = tokio::spawn(async move { bus.attach(&link, &name, &name).await })
            .await
            .map_err(|e| BusError::Broker(e.to_string()))?
            .map_err(|e| BusError::Broker(e.to_string()))?;
        let entry =
            Arc::new(SessionEntry { generation: AtomicU64::new(active.generation), ..Default::default() });
        self.0.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(queue.clone(), entry.clone());
        Ok(Live::Rabbit(Box::new(RabbitSubscription {
            bus: self.clone(),
            entry,
            link: self.0.link.clone(),
            base_queue: queue.clone(),
            restores: 0,
            queue,
            state: State::Active(active),
            cancel: self.0.shutdown.child_token(),
        })))
    }

    /// Puts the queue on a channel of `link` and starts consuming it. What the queue drops when
    /// full is dead-lettered to this replica's overflow queue under `session` (the session's
    /// first queue name), which counts it for the session.
    async fn attach(&self, link: &Arc<Link>, queue: &str, session: &str) -> Result<Active, lapin::Error> {
        let config = &self.0.config;
        let lease = self.lease_slot(link).await?;
        // Declare and bind on a short-lived channel of the same connection (an exclusive queue
        // belongs to its connection): if either fails, that closes this channel only, not the
        // shared one that carries other sessions' consumers.
        let setup = link.connections[lease.0.connection].create_channel().await?;
        let arguments = bounded_queue(config.queue_max_length, session);
        declare_exclusive_bound(&setup, queue, arguments, &config.exchange, "").await?;
        let _ = setup.close(200, "OK".into()).await;
        let channel = &lease.0.channel;
        // An empty tag lets the broker name the consumer, so a retry never collides with a
        // tag still registered from an attempt that failed half-way.
        let consumer = channel
            .basic_consume(
                queue.into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Active { generation: link.generation, consumer, _lease: lease })
    }

    /// A consumer channel with room for one more session, opening one when all are full.
    async fn lease_slot(&self, link: &Link) -> Result<SlotLease, lapin::Error> {
        let config = &self.0.config;
        let mut pool = link.pool.lock().await;
        pool.retain(|slot| slot.channel.status().connected());
        if let Some(slot) = pool
            .iter()
            .filter(|slot| slot.sessions.load(Relaxed) < config.sessions_per_channel)
            .min_by_key(|slot| slot.sessions.load(Relaxed))
        {
            slot.sessions.fetch_add(1, Relaxed);
            return Ok(SlotLease(slot.clone()));
        }
        // Open a channel on the least loaded consumer connection that has room.
        let connection = (1..link.connections.len())
            .filter(|&c| link.connections[c].status().connected())
            .map(|c| (c, pool.iter().filter(|s| s.connection == c).count()))
            .filter(|&(_, channels)| channels < config.channels_per_connection)
            .min_by_key(|&(_, channels)| channels)
            .map(|(c, _)| c)
            .ok_or_else(|| lapin::Error::from(ErrorKind::ChannelsLimitReached))?;
        let channel = link.connections[connection].create_channel().await?;
        // Per consumer (global = false): each session may have `prefetch` unacknowledged
        // deliveries. RabbitMQ 4 refuses global QoS.
        channel.basic_qos(config.prefetch, BasicQosOptions { global: false }).await?;
        let slot = Arc::new(Slot { channel, connection, sessions: AtomicUsize::new(1) });
        pool.push(slot.clone());
        Ok(SlotLease(slot))
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

    /// See [`super::Bus::history_page`]: the window first, the stream for what is older.
    pub async fn history_page(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> Result<(Vec<Frame>, bool), BusError> {
        let history = &self.0.history;
        if history.capacity() == 0 {
            return Ok((Vec::new(), false));
        }
        self.history_filled(HISTORY_FILL_WAIT).await?;
        // Where the stream must be read from (exclusive end), and what the window gave.
        let (newer, read_before) = match history.page(limit, before) {
            Some(page) if page.entries.len() >= limit || page.more_in_window => {
                let frames = page.entries.into_iter().map(|e| e.frame).collect();
                return Ok((frames, true));
            }
            Some(page) => {
                let oldest = page.entries.first().cloned().or_else(|| history.oldest());
                let before = oldest.and_then(|e| e.offset);
                (page.entries, before)
            }
            None => {
                // Older than the window, or unknown.
                let Some(id) = before else { return Ok((Vec::new(), false)) };
                let Some(until) = history.oldest().and_then(|e| e.offset) else {
                    return Ok((Vec::new(), false));
                };
                let _reading = self.stream_read().await?;
                let link = self.current_link()?;
                let stream = &self.0.config.history.name;
                let located = stream::locate(&link.connections[1], stream, self.0.max_frame_bytes, id, until)
                    .await
                    .map_err(BusError::Broker)?;
                (Vec::new(), located)
            }
        };
        let mut frames = Vec::with_capacity(limit);
        let mut more = false;
        if let Some(offset) = read_before {
            let _reading = self.stream_read().await?;
            let link = self.current_link()?;
            let stream = &self.0.config.history.name;
            let wanted = limit - newer.len();
            let (older, older_more) =
                stream::read_before(&link.connections[1], stream, self.0.max_frame_bytes, offset, wanted)
                    .await
                    .map_err(BusError::Broker)?;
            more = older_more;
            frames.extend(older.into_iter().map(|e| e.frame));
        }
        frames.extend(newer.into_iter().map(|e| e.frame));
        Ok((frames, more))
    }

    /// Waits (at most `bound`) until the window holds the stream's end as it was at start-up:
    /// before that, history looks shorter than it is, and a resuming session would be told of
    /// a gap that does not exist.
    pub async fn history_filled(&self, bound: Duration) -> Result<(), BusError> {
        let mut filled = self.0.history_filled.subscribe();
        match tokio::time::timeout(bound, filled.wait_for(|filled| *filled)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BusError::Unavailable("the history is still loading from the broker".into())),
        }
    }

    /// A place among the [`STREAM_READS`] reads of the stream allowed at once.
    async fn stream_read(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BusError> {
        match tokio::time::timeout(STREAM_READ_WAIT, self.0.stream_reads.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BusError::Unavailable("too many reads of the history stream at once".into())),
        }
    }

    /// For a session resuming after `since`, which is older than the window: the messages
    /// after it up to the window, read from the stream (at most a window's worth: a browser
    /// away for longer gets the newest part, and a gap notice), and where the window part
    /// starts. The start as it was when the stream cannot help.
    pub async fn replay_before_window(
        &self,
        since: &str,
        start: history::Start,
    ) -> (Vec<history::NewEntry>, history::Start) {
        let history = &self.0.history;
        let Some(window_start) = history.oldest().and_then(|e| e.offset) else { return (Vec::new(), start) };
        let Ok(link) = self.current_link() else { return (Vec::new(), start) };
        let Ok(_reading) = self.stream_read().await else {
            tracing::warn!("too many history reads at once; a resuming session replays the window only");
            return (Vec::new(), start);
        };
        let stream = &self.0.config.history.name;
        let max = self.0.max_frame_bytes;
        let located = match stream::locate(&link.connections[1], stream, max, since, window_start).await {
            Ok(Some(offset)) if offset < window_start => offset,
            Ok(_) => return (Vec::new(), start),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the history stream for a resuming session");
                return (Vec::new(), start);
            }
        };
        let missed = window_start - located - 1;
        let wanted = usize::try_from(missed).unwrap_or(usize::MAX).min(history.capacity());
        match stream::read_before(&link.connections[1], stream, max, window_start, wanted).await {
            Ok((older, _)) => {
                let gap = (missed > wanted as u64).then_some(
                    "more messages were missed than are replayed; replay starts with the most recent of them",
                );
                (older, history::Start { seq: start.seq, gap })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the history stream for a resuming session");
                (Vec::new(), start)
            }
        }
    }

    pub async fn close(&self) {
        let handle = self.0.supervisor.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = handle.await;
        }
    }
}

/// Keeps the link up until shutdown.
async fn supervise(shared: Arc<Shared>, state: watch::Sender<LinkState>) {
    let config = &shared.config;
    let mut generation = 0;
    let mut failures: u32 = 0;
    let mut lost_at: Option<Instant> = None;
    while !shared.shutdown.is_cancelled() {
        generation += 1;
        let connected = tokio::select! {
            result = connect(&shared, generation) => result,
            () = shared.shutdown.cancelled() => break,
        };
        match connected {
            Ok(link) => {
                let up_since = Instant::now();
                shared.metrics.broker_connects.fetch_add(1, Relaxed);
                shared.metrics.broker_ready.store(1, Relaxed);
                match lost_at.take() {
                    Some(at) => {
                        let outage_ms = at.elapsed().as_millis() as u64;
                        shared.metrics.broker_reconnects.fetch_add(1, Relaxed);
                        shared.metrics.broker_last_outage_ms.store(outage_ms, Relaxed);
                        tracing::info!(outage_ms, generation, "broker link restored");
                    }
                    None => tracing::info!(
                        host = %config.host, port = config.port, exchange = %config.exchange,
                        "connected to RabbitMQ"
                    ),
                }
                state.send_replace(LinkState::Up(link.clone()));
                tokio::spawn(open_when_sessions_are_bound(shared.clone(), link.clone()));
                let reason = tokio::select! {
                    reason = link_lost(&link) => reason,
                    () = shared.shutdown.cancelled() => {
                        state.send_replace(LinkState::Closed);
                        shared.metrics.broker_ready.store(0, Relaxed);
                        close_link(&link).await;
                        return;
                    }
                };
                tracing::warn!(%reason, generation, "broker link lost; reconnecting");
                // A link that keeps failing soon after it is made must not reconnect in a tight
                // loop: the backoff only resets after the link stayed up for a while.
                failures = if up_since.elapsed() > STABLE_LINK { 0 } else { failures.saturating_add(1) };
                shared.metrics.broker_disconnects.fetch_add(1, Relaxed);
                shared.metrics.broker_ready.store(0, Relaxed);
                lost_at = Some(Instant::now());
                if let Some(local) = &shared.local {
                    local.send_notice(Some(reason.clone()));
                    // The new process queue's task announces `restored` before its first
                    // message, so sessions catch up from the right place.
                    shared.process_restored.store(true, Relaxed);
                }
                state.send_replace(LinkState::Down(format!("broker link lost: {reason}")));
                close_link(&link).await;
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                tracing::warn!(%reason, attempt = failures, "cannot reach the broker; will retry");
                state.send_replace(LinkState::Down(reason));
            }
        }
        let delay = backoff(failures, config.reconnect_max);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => break,
        }
    }
    state.send_replace(LinkState::Closed);
    shared.metrics.broker_ready.store(0, Relaxed);
}

/// Longest wait, after a reconnect, for the open sessions to bind their queues again before
/// publishing resumes anyway (a session that cannot restore must not stop everyone's chat).
const RESTORE_GRACE: Duration = Duration::from_secs(30);

/// Allows publishing on `link` once every open session's queue is bound on it (at once after
/// the first connect, when there are none) and, at start-up, the history window is filled, or
/// after [`RESTORE_GRACE`].
async fn open_when_sessions_are_bound(shared: Arc<Shared>, link: Arc<Link>) {
    let started = Instant::now();
    let behind = || {
        let sessions = shared.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let filling = usize::from(!*shared.history_filled.borrow());
        sessions.values().filter(|s| s.generation.load(Relaxed) < link.generation).count() + filling
    };
    loop {
        let waiting = behind();
        if waiting == 0 {
            break;
        }
        if started.elapsed() > RESTORE_GRACE {
            tracing::warn!(waiting, "sessions still re-creating their queues; publishing resumes anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if started.elapsed() > Duration::from_millis(10) {
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "open sessions bound again; publishing resumes"
        );
    }
    link.ready.store(true, Relaxed);
}

/// Full jitter: a random delay up to the capped exponential step.
fn backoff(failures: u32, max: Duration) -> Duration {
    let step = RECONNECT_BASE.saturating_mul(1 << failures.min(16)).min(max);
    step.mul_f64(rand::random::<f64>().max(0.1))
}

/// Opens every connection of one link and declares what publishing needs.
async fn connect(shared: &Arc<Shared>, generation: u64) -> Result<Arc<Link>, String> {
    let config = &shared.config;
    let mut connections = Vec::with_capacity(config.consumer_connections + 1);
    for index in 0..=config.consumer_connections {
        let role = if index == 0 { "publish".to_owned() } else { format!("consume-{index}") };
        let name = format!("fanout-chat {} {role}", shared.replica);
        let opened = match tokio::time::timeout(CONNECT_TIMEOUT, open_connection(config, name)).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(e)) => Err(describe(config, &e)),
            Err(_) => {
                Err(format!("no answer from {}:{} within {CONNECT_TIMEOUT:?}", config.host, config.port))
            }
        };
        match opened {
            Ok(connection) => connections.push(connection),
            Err(reason) => {
                close_connections(&connections).await;
                return Err(reason);
            }
        }
    }
    let broken = Arc::new(Notify::new());
    match declare(shared, &connections, &broken).await {
        Ok(publisher) => Ok(Arc::new(Link {
            generation,
            ready: std::sync::atomic::AtomicBool::new(false),
            publisher,
            connections,
            pool: Mutex::new(Vec::new()),
            broken,
        })),
        Err(reason) => {
            // Closed, not dropped: a dropped lapin connection stays open, and would keep
            // this replica's exclusive queues locked against the next attempt.
            close_connections(&connections).await;
            Err(reason)
        }
    }
}

/// Declares what a link needs on its fresh connections and starts its own consumers; returns
/// the publishing channel.
async fn declare(
    shared: &Arc<Shared>,
    connections: &[Connection],
    broken: &Arc<Notify>,
) -> Result<Channel, String> {
    let config = &shared.config;
    declare_exchange(&connections[0], &config.exchange).await.map_err(|e| describe(config, &e))?;
    count_overflow(shared, &connections[1]).await.map_err(|e| describe(config, &e))?;
    let publisher = connections[0].create_channel().await.map_err(|e| describe(config, &e))?;
    publisher.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| describe(config, &e))?;
    if shared.history.capacity() > 0 {
        stream::declare(&connections[0], &config.exchange, shared).await.map_err(|e| {
            format!(
                "{} (declaring the history stream {:?}: streams need RabbitMQ 3.9 or later; \
                 NOTIFIER_HISTORY_WINDOW=0 runs without history)",
                describe(config, &e),
                config.history.name
            )
        })?;
        stream::follow(shared, &connections[1], &publisher, broken.clone()).await?;
    }
    // Last: once it runs, sessions are told delivery is back (nothing after it can fail).
    if let Some(local) = &shared.local {
        consume_for_process(shared, local.clone(), &connections[1])
            .await
            .map_err(|e| describe(config, &e))?;
    }
    Ok(publisher)
}

async fn open_connection(config: &RabbitConfig, name: String) -> Result<Connection, lapin::Error> {
    // The URI is built field by field: no percent-encoding pitfalls with credentials, and
    // the vhost is taken literally ("/" is "/", not the empty vhost).
    let uri = AMQPUri {
        scheme: if config.tls { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: config.user.clone(),
                password: config.password.expose().to_owned(),
            },
            host: config.host.clone(),
            port: config.port,
        },
        vhost: config.vhost.clone(),
        query: AMQPQueryString {
            heartbeat: Some(HEARTBEAT_SECS),
            frame_max: Some(FRAME_MAX),
            ..Default::default()
        },
    };
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties).await
}

/// Makes this replica's overflow queue and counts its dead-letters per session: each one is a
/// message a full session queue dropped. The task ends with the link's connection.
async fn count_overflow(shared: &Arc<Shared>, connection: &Connection) -> Result<(), lapin::Error> {
    let channel = connection.create_channel().await?;
    channel
        .exchange_declare(
            OVERFLOW_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let queue = format!("fanout-chat.{}.overflow", shared.replica);
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(OVERFLOW_QUEUE_MAX_LENGTH));
    let pattern = format!("fanout-chat.{}.*", shared.replica);
    declare_exclusive_bound(&channel, &queue, arguments, OVERFLOW_EXCHANGE, &pattern).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let shared = shared.clone();
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            shared.metrics.queue_overflow.fetch_add(1, Relaxed);
            let session = delivery.routing_key.as_str();
            if let Some(local) = shared.local.as_ref().filter(|_| session == process_queue(&shared.replica)) {
                local.send_gap(1);
                continue;
            }
            let entry = shared.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(session).cloned();
            if let Some(entry) = entry {
                entry.dropped.fetch_add(1, Relaxed);
                entry.notify.notify_one();
            }
        }
        // Keep the channel open as long as the consumer runs.
        drop(channel);
    });
    Ok(())
}

/// The arguments of a session's (or the process's) queue: at most `max_length` ready messages,
/// the oldest dropped first and dead-lettered under `dead_letter_key` to the overflow exchange,
/// where this replica counts them.
fn bounded_queue(max_length: i32, dead_letter_key: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(OVERFLOW_EXCHANGE.into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dead_letter_key.into()));
    arguments
}

/// Declares an exclusive, auto-delete queue and binds it to `exchange` with `routing_key`.
async fn declare_exclusive_bound(
    channel: &Channel,
    queue: &str,
    arguments: FieldTable,
    exchange: &str,
    routing_key: &str,
) -> Result<(), lapin::Error> {
    let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    channel.queue_declare(queue.into(), options, arguments).await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            routing_key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The queue of `process` fan-out mode.
fn process_queue(replica: &str) -> String {
    format!("fanout-chat.{replica}.process")
}

/// `process` fan-out mode: one exclusive queue for this whole process, bound to the exchange;
/// a task hands each message to every session through the in-memory channel and acks it.
async fn consume_for_process(
    shared: &Arc<Shared>,
    local: MemoryBus,
    connection: &Connection,
) -> Result<(), lapin::Error> {
    let config = &shared.config;
    let channel = connection.create_channel().await?;
    let queue = process_queue(&shared.replica);
    // What it drops when full (the process fell behind the broker) is counted like a session
    // queue's drops, and every session of the process is told.
    let arguments = bounded_queue(config.queue_max_length, &queue);
    declare_exclusive_bound(&channel, &queue, arguments, &config.exchange, "").await?;
    channel.basic_qos(config.prefetch, BasicQosOptions { global: false }).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max_frame_bytes = shared.max_frame_bytes;
    let metrics = shared.metrics.clone();
    // After an outage, `restored` goes out before the new queue's first message, from the task
    // that sends both: a session's catch-up starts after the last message it had before the
    // outage, never after one of the new queue's.
    if shared.process_restored.swap(false, Relaxed) {
        local.send_notice(None);
    }
    tokio::spawn(async move {
        while let Some(Ok(delivery)) = consumer.next().await {
            let lapin::message::Delivery { data, properties, acker, .. } = delivery;
            if data.len() <= max_frame_bytes {
                // The channel never waits: a session that is behind skips ahead (and is told).
                local.send_frame(frame(data, &properties));
            } else {
                metrics.skipped.fetch_add(1, Relaxed);
            }
            Ack(acker).send();
        }
        drop(channel);
    });
    Ok(())
}

/// Declares the exchange durable. If one of that name exists with other properties, it is used
/// as it is, with a warning: another team may own it, and refusing to start helps nobody.
async fn declare_exchange(connection: &Connection, name: &str) -> Result<(), lapin::Error> {
    // A channel of its own: a refused declare closes the channel it was made on.
    let channel = connection.create_channel().await?;
    let declared = channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions { durable: true, ..Default::default() },
            FieldTable::default(),
        )
        .await;
    match declared {
        Err(e) if channel_error(&e) == Some(&AMQPSoftError::PRECONDITIONFAILED) => {
            // The failed declare closed that channel; check existence on a fresh one.
            let probe = connection.create_channel().await?;
            probe
                .exchange_declare(
                    name.into(),
                    ExchangeKind::Fanout,
                    ExchangeDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            let _ = probe.close(200, "OK".into()).await;
            tracing::warn!(
                exchange = name, error = %e,
                "the exchange exists with other properties than a durable fanout; using it as it is"
            );
            Ok(())
        }
        Ok(()) => {
            let _ = channel.close(200, "OK".into()).await;
            Ok(())
        }
        Err(e) => Err(e),
    }
}

/// The kind of a soft AMQP error: one that closes a channel, not the connection.
fn channel_error(error: &lapin::Error) -> Option<&AMQPSoftError> {
    match error.kind() {
        ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(kind) => Some(kind),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// A readable reason, without credentials: lapin errors never contain the password.
fn describe(config: &RabbitConfig, error: &lapin::Error) -> String {
    format!("RabbitMQ at {}:{} (vhost {:?}): {error}", config.host, config.port, config.vhost)
}

/// Resolves with a reason when a connection of the link fails, or someone reported the link
/// broken. Channel errors also reach the connection's events; those end only the consumers of
/// that channel, which restore themselves, so they must not tear down every session's link.
async fn link_lost(link: &Link) -> String {
    let events = link.connections.iter().map(|c| c.events_listener().map(move |event| (c, event)).boxed());
    let errors = select_all(events).filter_map(|(connection, event)| async move {
        match event {
            lapin::Event::Error(e) if channel_error(&e).is_some() && connection.status().connected() => {
                tracing::debug!(error = %e, "channel error; the sessions on that channel restore themselves");
                None
            }
            lapin::Event::Error(e) => Some(e.to_string()),
            _ => None,
        }
    });
    let mut errors = std::pin::pin!(errors);
    // Events are only sent while a listener exists, so the connections may have died before
    // we listened: check once after subscribing.
    if let Some(dead) = link.connections.iter().find(|c| !c.status().connected()) {
        return format!("connection {:?} is not connected", dead.status());
    }
    tokio::select! {
        Some(reason) = errors.next() => reason,
        () = link.broken.notified() => "the publishing channel was closed".into(),
    }
}

async fn close_link(link: &Link) {
    close_connections(&link.connections).await;
}

async fn close_connections(connections: &[Connection]) {
    let closing = connections.iter().filter(|c| c.status().connected()).map(|connection| async move {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "fanout-chat closing".into())).await;
    });
    futures_util::future::join_all(closing).await;
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// One session's queue while it is consumed.
struct Active {
    generation: u64,
    consumer: Consumer,
    /// Declared after `consumer` so that the consumer is cancelled before the place is freed.
    _lease: SlotLease,
}

enum State {
    Active(Active),
    /// Re-creating the queue and consumer after a failure; `None` in the task's result means
    /// the bus closed.
    Restoring(JoinHandle<Option<Active>>),
}

/// A session's subscription: its own exclusive, auto-delete queue, bound to the exchange.
pub struct RabbitSubscription {
    bus: RabbitBus,
    /// What the bus knows of this session (drops, generation).
    entry: Arc<SessionEntry>,
    /// The bus's link state: a link declared dead (by its heartbeat) may never fail this
    /// session's consumer, so the session watches the link too.
    link: watch::Receiver<LinkState>,
    /// `fanout-chat.<replica>.<session>`: the first queue's name, and the stem of the next.
    base_queue: String,
    /// How many times the queue was re-created.
    restores: u32,
    /// The current queue's name.
    queue: String,
    state: State,
    /// Stops a restore task once the session is gone.
    cancel: CancellationToken,
}

impl Drop for RabbitSubscription {
    fn drop(&mut self) {
        // A restore in flight finishes its broker round trips and drops what it made; it must
        // not be aborted half-way (see `subscribe`).
        self.cancel.cancel();
        self.bus.0.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.base_queue);
    }
}

impl RabbitSubscription {
    pub async fn next(&mut self) -> Option<Event> {
        match &mut self.state {
            State::Active(active) => {
                let delivered = loop {
                    tokio::select! {
                        delivered = active.consumer.next() => break Ok(delivered),
                        () = self.entry.notify.notified() => {
                            let missed = self.entry.dropped.swap(0, Relaxed);
                            if missed > 0 {
                                return Some(Event::Gap(missed));
                            }
                        }
                        changed = self.link.changed() => {
                            if changed.is_err() {
                                return None;
                            }
                            let still_up = matches!(
                                &*self.link.borrow_and_update(),
                                LinkState::Up(link) if link.generation == active.generation
                            );
                            if !still_up {
                                break Err("the broker link was lost".to_owned());
                            }
                        }
                    }
                };
                let reason = match delivered {
                    Err(reason) => reason,
                    Ok(delivered) => match delivered {
                        Some(Ok(delivery)) => {
                            let lapin::message::Delivery { data, properties, acker, .. } = delivery;
                            // Another service may publish anything; a body far over what a browser
                            // may send is skipped rather than copied into thousands of sessions.
                            if data.len() > self.bus.0.max_frame_bytes {
                                return Some(Event::Oversized { bytes: data.len(), ack: Ack(acker) });
                            }
                            return Some(Event::Message(frame(data, &properties), Some(Ack(acker))));
                        }
                        Some(Err(e)) => e.to_string(),
                        None => "the broker cancelled the session's consumer".to_owned(),
                    },
                };
                tracing::warn!(queue = %self.queue, %reason, "session delivery interrupted");
                let failed_on = active.generation;
                // A new name: the broker may not have noticed yet that the old connection is
                // dead, and would refuse to re-declare its exclusive queue until it does.
                self.restores += 1;
                let queue = format!("{}.{}", self.base_queue, self.restores);
                self.queue.clone_from(&queue);
                let restore =
                    restore(self.bus.clone(), queue, self.base_queue.clone(), failed_on, self.cancel.clone());
                self.state = State::Restoring(tokio::spawn(restore));
                Some(Event::Interrupted(reason))
            }
            State::Restoring(task) => {
                // Awaiting a `&mut JoinHandle` is cancel-safe: the task keeps running.
                let active = task.await.ok().flatten()?;
                self.entry.generation.store(active.generation, Relaxed);
                self.bus.0.metrics.resubscribes.fetch_add(1, Relaxed);
                tracing::info!(queue = %self.queue, "session delivery restored");
                self.state = State::Active(active);
                Some(Event::Restored)
            }
        }
    }
}

/// Re-creates a session's queue and consumer, on the same link when only the channel or the
/// consumer failed, on the next link when the connection did.
async fn restore(
    bus: RabbitBus,
    queue: String,
    session: String,
    failed_on: u64,
    cancel: CancellationToken,
) -> Option<Active> {
    let mut attempt = 0u32;
    loop {
        let link = tokio::select! {
            link = bus.wait_for_link(None) => link?,
            () = cancel.cancelled() => return None,
        };
        // A link that died with our consumer is useless; wait for the supervisor's next one.
        let link = if link.generation == failed_on && !link.connections.iter().all(|c| c.status().connected())
        {
            tokio::select! {
                link = bus.wait_for_link(Some(failed_on)) => link?,
                () = cancel.cancelled() => return None,
            }
        } else {
            link
        };
        match bus.attach(&link, &queue, &session).await {
            Ok(active) => return Some(active),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                tracing::debug!(%queue, error = %e, attempt, "restoring the session queue failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(backoff(attempt, Duration::from_secs(5))) => {}
                    () = cancel.cancelled() => return None,
                }
            }
        }
    }
}

/// The WebSocket frame for one delivery: the body itself when it is an envelope, else the
/// body wrapped in a new envelope (see [`Envelope::from_delivery`]).
fn frame(body: Vec<u8>, p: &BasicProperties) -> Frame {
    decode(body, p).0
}

/// The frame for one delivery, and the envelope it carries.
fn decode(body: Vec<u8>, p: &BasicProperties) -> (Frame, Envelope) {
    let foreign = ForeignProperties {
        message_id: p.message_id().as_ref().map(|s| s.as_str()),
        timestamp: *p.timestamp(),
        app_id: p.app_id().as_ref().map(|s| s.as_str()),
    };
    // The same for the copy in a session's queue and the copy in the history stream.
    let key = history::key_of((&body, foreign.message_id, foreign.timestamp, foreign.app_id));
    match Envelope::from_delivery(&body, foreign) {
        // An envelope parsed from JSON is valid UTF-8, so this is a check, not a copy.
        Decoded::Envelope(envelope) => match String::from_utf8(body) {
            Ok(json) => (Frame::new(json, key), envelope),
            Err(e) => (Frame::new(String::from_utf8_lossy(e.as_bytes()).into_owned(), key), envelope),
        },
        Decoded::Wrapped(envelope) => (Frame::new(envelope.to_json(), key), envelope),
    }
}
