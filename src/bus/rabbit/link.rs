//! The broker *link* and its supervisor: open the connections, declare what publishing needs,
//! hand the link out, notice when it is lost, and reconnect with capped backoff and jitter.
//!
//! After a reconnect, publishing waits until every open session has bound its queue again
//! (see [`open_when_sessions_are_bound`]): a message confirmed while a session's queue is
//! missing would be lost for that session without a trace.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use futures_util::{StreamExt, stream::select_all};
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::ConfirmSelectOptions,
    uri::{AMQPAuthority, AMQPQueryString, AMQPScheme, AMQPUri, AMQPUserInfo},
};
use tokio::sync::{Mutex, Notify, watch};

use super::{
    Shared,
    channels::Slot,
    declare::{channel_error, declare_exchange},
    overflow::count_overflow,
    process::consume_for_process,
    stream,
};
use crate::config::RabbitConfig;

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

/// One generation of broker connections and what was declared on them.
pub(super) struct Link {
    pub(super) generation: u64,
    /// Publishing is allowed. After a reconnect this waits until every open session has its
    /// queue bound again, so that no message is confirmed (202) while a session's queue is
    /// missing: it would be lost for that session without a trace.
    pub(super) ready: std::sync::atomic::AtomicBool,
    pub(super) publisher: Channel,
    /// `[0]` publishes (and declares); `[1..]` carry the session consumers, and `[1]` also
    /// the replica's own consumers (overflow, history stream, process queue).
    pub(super) connections: Vec<Connection>,
    /// Consumer channels and how many sessions each carries.
    pub(super) pool: Mutex<Vec<Arc<Slot>>>,
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
                // Up before it is said: whoever reads "connected" in the log may subscribe at once.
                state.send_replace(LinkState::Up(link.clone()));
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
pub(super) fn backoff(failures: u32, max: Duration) -> Duration {
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

/// A readable reason, without credentials: lapin errors never contain the password.
pub(super) fn describe(config: &RabbitConfig, error: &lapin::Error) -> String {
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

pub(super) async fn close_connections(connections: &[Connection]) {
    let closing = connections.iter().filter(|c| c.status().connected()).map(|connection| async move {
        let _ =
            tokio::time::timeout(CLOSE_TIMEOUT, connection.close(200, "fanout-chat closing".into())).await;
    });
    futures_util::future::join_all(closing).await;
}
