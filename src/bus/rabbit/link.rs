//! The broker *link* and its supervisor: the replica's two connections of its own (one that
//! publishes and declares; one for the replica's own consumers: overflow counting, the history
//! stream, the process queue), handed out, watched, and reconnected with capped backoff and
//! jitter. Sessions are not on the link: they are on the consumer connections ([`super::lanes`]),
//! so losing the link interrupts no session.
//!
//! At start-up, publishing waits until the history window is filled (see
//! [`open_when_history_is_filled`]).

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::ConfirmSelectOptions,
    uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo},
};
use tokio::sync::{Notify, watch};

use super::{
    Shared,
    declare::{channel_error, declare_exchange},
    overflow::count_overflow,
    process::consume_for_process,
    stream,
};
use crate::config::{Endpoint, RabbitConfig};

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
/// A link up for this long is healthy: its loss starts the backoff from the beginning.
const STABLE_LINK: Duration = Duration::from_secs(30);
/// How long a clean close of a connection may take at shutdown.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub(super) enum LinkState {
    /// Not connected (yet, or again); the reason is what `/readyz` reports.
    Down(String),
    Up(Arc<Link>),
    Closed,
}

/// One generation of the replica's own connections and what was declared on them.
pub(super) struct Link {
    pub(super) generation: u64,
    /// Publishing is allowed: at start-up, once the history window is filled.
    pub(super) ready: std::sync::atomic::AtomicBool,
    pub(super) publisher: Channel,
    /// `[0]` publishes (and declares); `[1]` carries the replica's own consumers (overflow,
    /// history stream, process queue) and the reads of the stream on demand.
    pub(super) connections: Vec<Connection>,
    /// Where each connection went.
    pub(super) endpoints: Vec<Endpoint>,
    /// Notified by whoever finds the link broken in a way the connections do not report
    /// (the publishing channel closed by a channel error).
    pub(super) broken: Arc<Notify>,
}

/// Keeps the link up until shutdown.
pub(super) async fn supervise(shared: Arc<Shared>, state: watch::Sender<LinkState>) {
    let config = &shared.config;
    let mut generation = 0;
    let mut failures: u32 = 0;
    let mut lost_at: Option<Instant> = None;
    let mut first = true;
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
                // Up before it is said: whoever reads "connected" in the log may subscribe at once
                // (it is said once the consumer connections are up too: `open_when_ready`).
                state.send_replace(LinkState::Up(link.clone()));
                super::publish::mark_down(&shared.down_since, false);
                if let Some(at) = lost_at.take() {
                    let outage_ms = at.elapsed().as_millis() as u64;
                    shared.metrics.broker_reconnects.fetch_add(1, Relaxed);
                    shared.metrics.broker_last_outage_ms.store(outage_ms, Relaxed);
                    tracing::info!(outage_ms, generation, "broker link restored");
                }
                *shared.blocked.lock().unwrap_or_else(|p| p.into_inner()) = None;
                tokio::spawn(open_when_ready(
                    shared.clone(),
                    link.clone(),
                    std::mem::replace(&mut first, false),
                ));
                let (reason, failed) = tokio::select! {
                    reason = link_lost(&shared, &link) => reason,
                    () = shared.shutdown.cancelled() => {
                        state.send_replace(LinkState::Closed);
                        shared.metrics.broker_ready.store(0, Relaxed);
                        close_link(&link).await;
                        return;
                    }
                };
                tracing::warn!(%reason, generation, "broker link lost; reconnecting");
                if let Some(endpoint) = failed.and_then(|i| link.endpoints.get(i)) {
                    shared.addresses.failed(endpoint);
                }
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
                super::publish::mark_down(&shared.down_since, true);
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
            // Another of the replica's connections just got through: the broker is back.
            () = shared.reachable.notified() => {}
            () = shared.shutdown.cancelled() => break,
        }
    }
    state.send_replace(LinkState::Closed);
    shared.metrics.broker_ready.store(0, Relaxed);
}

/// Allows publishing on `link` once the history window is filled (at once after a reconnect,
/// where it was filled before): a replica that published before it could show what came
/// before would serve pages that miss it. The first time, also once every consumer connection
/// is up (or [`LANES_GRACE`] passed), so that the first sessions spread over all of them; then
/// says "connected to RabbitMQ", which whoever reads the log may take as ready for sessions.
async fn open_when_ready(shared: Arc<Shared>, link: Arc<Link>, first: bool) {
    let mut filled = shared.history_filled.subscribe();
    let started = Instant::now();
    let _ = filled.wait_for(|filled| *filled).await;
    if first {
        let lanes = shared.lanes.states.len();
        let mut changed = shared.lanes.changed.subscribe();
        let all_up = tokio::time::timeout(LANES_GRACE, async {
            while shared.lanes.up() < lanes {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        });
        if all_up.await.is_err() {
            tracing::warn!(
                up = shared.lanes.up(),
                lanes,
                "not every consumer connection is up; starting anyway"
            );
        }
        let endpoints: Vec<String> = shared.lanes.endpoints().iter().map(ToString::to_string).collect();
        tracing::info!(
            publish = %link.endpoints[0], own = %link.endpoints[1], consumers = %endpoints.join(","),
            exchange = %shared.config.exchange, "connected to RabbitMQ"
        );
    } else if started.elapsed() > Duration::from_millis(10) {
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            "history window filled; publishing starts"
        );
    }
    link.ready.store(true, Relaxed);
}

/// Longest wait at start-up for every consumer connection before the replica says it is ready.
const LANES_GRACE: Duration = Duration::from_secs(10);

/// Full jitter: a random delay up to the capped exponential step.
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
    let step = RECONNECT_BASE.saturating_mul(1 << failures.min(16)).min(max);
    step.mul_f64(rand::random::<f64>().max(0.1))
}

/// Opens a connection to the next broker address (see [`super::address`]), within
/// [`CONNECT_TIMEOUT`]; an address that fails is passed over for a while.
pub(super) async fn open_next(shared: &Shared, role: &str) -> Result<(Connection, Endpoint), String> {
    let config = &shared.config;
    let endpoint = shared.addresses.next().await;
    let name = format!("fanout-chat {} {role}", shared.replica);
    let opened = match tokio::time::timeout(CONNECT_TIMEOUT, open_connection(config, &endpoint, name)).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(e)) => Err(describe_at(config, &endpoint, &e)),
        Err(_) => Err(format!("no answer from {endpoint} within {CONNECT_TIMEOUT:?}")),
    };
    match opened {
        Ok(connection) => {
            shared.addresses.succeeded(&endpoint);
            // The others waiting out their backoff try now: sessions restored on a consumer
            // connection catch up from the history window, which the link's reader fills.
            shared.reachable.notify_waiters();
            Ok((connection, endpoint))
        }
        Err(reason) => {
            shared.addresses.failed(&endpoint);
            Err(reason)
        }
    }
}

/// Opens the link's two connections and declares what publishing needs.
async fn connect(shared: &Arc<Shared>, generation: u64) -> Result<Arc<Link>, String> {
    let mut connections = Vec::with_capacity(2);
    let mut endpoints = Vec::with_capacity(2);
    for role in ["publish", "own"] {
        match open_next(shared, role).await {
            Ok((connection, endpoint)) => {
                connections.push(connection);
                endpoints.push(endpoint);
            }
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
            endpoints,
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

async fn open_connection(
    config: &RabbitConfig,
    endpoint: &Endpoint,
    name: String,
) -> Result<Connection, lapin::Error> {
    // The URI is built field by field: no percent-encoding pitfalls with credentials, and
    // the vhost is taken literally ("/" is "/", not the empty vhost).
    let uri = AMQPUri {
        scheme: if config.tls { AMQPScheme::AMQPS } else { AMQPScheme::AMQP },
        authority: AMQPAuthority {
            userinfo: AMQPUserInfo {
                username: config.user.clone(),
                password: config.password.expose().to_owned(),
            },
            host: endpoint.host.clone(),
            port: endpoint.port,
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

/// A readable reason, without credentials: lapin errors never contain the password.
pub(super) fn describe(config: &RabbitConfig, error: &lapin::Error) -> String {
    let hosts: Vec<String> = config.endpoints().iter().map(ToString::to_string).collect();
    format!("RabbitMQ at {} (vhost {:?}): {error}", hosts.join(","), config.vhost)
}

/// [`describe`], for a connection to one address.
pub(super) fn describe_at(config: &RabbitConfig, endpoint: &Endpoint, error: &lapin::Error) -> String {
    format!("RabbitMQ at {endpoint} (vhost {:?}): {error}", config.vhost)
}

/// Resolves with a reason, and the index of the connection that failed, when a connection of
/// the link fails or someone reported the link broken. Meanwhile keeps `shared.blocked` to what
/// the broker says of the publishing connection: a memory or disk alarm blocks publishing
/// connections (`connection.blocked`) until it clears.
async fn link_lost(shared: &Shared, link: &Link) -> (String, Option<usize>) {
    let on_blocked = |blocked: Option<String>| {
        match &blocked {
            Some(reason) => {
                tracing::warn!(%reason, "the broker blocks publishing (a resource alarm); POSTs answer 503 until it clears")
            }
            None => tracing::info!("the broker accepts publishes again"),
        }
        *shared.blocked.lock().unwrap_or_else(|p| p.into_inner()) = blocked;
    };
    let publishing = async { (connection_lost(&link.connections[0], on_blocked).await, Some(0)) };
    let own = async { (connection_lost(&link.connections[1], |_| {}).await, Some(1)) };
    tokio::select! {
        lost = publishing => lost,
        lost = own => lost,
        () = link.broken.notified() => ("the publishing channel was closed".into(), None),
    }
}

/// Resolves with a reason when `connection` fails. Channel errors also reach the connection's
/// events; those end only the consumers of that channel, which restore themselves, so they
/// must not count as the connection's loss. `on_blocked` hears `connection.blocked` (with the
/// broker's reason) and `connection.unblocked` (`None`).
///
/// lapin hands each event to one of the connection's listeners only (they share one queue), so
/// this must be the only listener of `connection`.
pub(super) async fn connection_lost(connection: &Connection, on_blocked: impl Fn(Option<String>)) -> String {
    let mut events = std::pin::pin!(connection.events_listener());
    // Events are only sent while a listener exists, so the connection may have died before we
    // listened: check once after subscribing.
    if !connection.status().connected() {
        return format!("connection {:?} is not connected", connection.status());
    }
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::Error(e) if channel_error(&e).is_some() && connection.status().connected() => {
                tracing::debug!(error = %e, "channel error; the consumers on that channel restore themselves");
            }
            lapin::Event::Error(e) => return e.to_string(),
            lapin::Event::ConnectionBlocked(reason) => on_blocked(Some(reason)),
            lapin::Event::ConnectionUnblocked => on_blocked(None),
            _ => {}
        }
    }
    "the connection's events ended".into()
}

async fn close_link(link: &Link) {
    close_connections(&link.connections).await;
}

pub(super) async fn close_connections(connections: &[Connection]) {
    let closing = connections.iter().filter(|c| c.status().connected()).map(|connection| async move {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "fanout-chat closing".into())).await;
    });
    futures_util::future::join_all(closing).await;
}
