//! `GET /ws`: one WebSocket session.
//!
//! The session's subscription is made *before* the upgrade is answered, so once a client sees
//! the socket open, every message published afterwards reaches it. Then one loop `select!`s
//! over shutdown, the subscription, the socket and a ping timer, and returns after a Close.

use std::{
    net::IpAddr,
    pin::Pin,
    sync::atomic::Ordering::Relaxed,
    task::Poll,
    time::{Duration, Instant},
};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::{
    extract::{
        Query, State,
        rejection::QueryRejection,
        ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade, close_code},
    },
    http::HeaderMap,
    response::Response,
};
use futures_util::{FutureExt, SinkExt};
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use super::{auth::check_origin, client::ClientIp, error::AppError};
use crate::{
    bus::{Ack, Event, Subscription},
    chat::{Draft, Envelope, is_from_the_future, ts_from_millis},
    limits::SessionPermit,
    metrics::DeliveryClock,
    state::{AppState, STALL_GRACE},
};

/// `GET /ws?since=<id>`: the id of the last message this browser showed, to get what it
/// missed first.
#[derive(Debug, Deserialize)]
pub struct Resume {
    since: Option<String>,
}

/// Most frames written with one flush: bounds how long the socket's reader (the browser's
/// frames, its Close) waits behind a burst.
const BATCH: usize = 32;

/// Longest `since` accepted: ids are ULIDs (26 characters) or another service's `message_id`.
const MAX_SINCE_BYTES: usize = 256;

pub async fn upgrade(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    headers: HeaderMap,
    resume: Result<Query<Resume>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, AppError> {
    // First: a page of another site gets nothing opened, not even a queue.
    check_origin(&state, &headers)?;
    let upgrade = upgrade.map_err(|r| AppError::Rejected(r.status(), r.body_text()))?;
    let Query(resume) = resume.map_err(|r| AppError::BadRequest(r.body_text()))?;
    let since = resume.since.filter(|s| !s.is_empty());
    if since.as_ref().is_some_and(|s| s.len() > MAX_SINCE_BYTES) {
        return Err(AppError::BadRequest(format!("since is longer than {MAX_SINCE_BYTES} bytes")));
    }
    if since.as_deref().is_some_and(|s| s.starts_with('@') && crate::bus::parse_position(s).is_none()) {
        return Err(AppError::BadRequest(
            "since=@N takes a position (a whole number), as GET /messages gives it in `resume`".into(),
        ));
    }
    if since.as_deref().is_some_and(is_from_the_future) {
        return Err(AppError::BadRequest(
            "since names a message from the future; no such message exists".into(),
        ));
    }
    if state.is_draining() {
        return Err(AppError::ShuttingDown);
    }
    let permit = state.limits.admit_session(client)?;
    let session = ulid::Ulid::new().to_string();
    let clock = DeliveryClock::new();
    let subscription = state.bus.subscribe(&session, since.as_deref()).await?;
    let frame_limit = state.config.max_frame_bytes();
    let span = tracing::info_span!("session", id = %session, replica = %state.config.replica);
    let sessions = state.sessions.clone();
    Ok(upgrade
        // Small read/write buffers keep an idle session cheap; the write buffer has a hard cap
        // so a browser that stops reading cannot grow our memory. Browsers send little (pongs,
        // the odd message), and tungstenite fills the whole read buffer with each read, so it
        // is 1 KiB (4 KiB cost every session 3 KiB more); a longer frame grows it as needed.
        .read_buffer_size(1024)
        // Frames fed in a batch collect here until the flush (or until it is full).
        .write_buffer_size(4 * 1024)
        // tungstenite refuses a frame larger than this cap outright, so it holds two of the
        // largest frames we ever send.
        .max_write_buffer_size(state.config.ws.max_write_buffer.max(frame_limit * 2))
        .max_message_size(frame_limit)
        .max_frame_size(frame_limit)
        .on_upgrade(move |socket| {
            let session = Session {
                state,
                id: session,
                client,
                socket,
                subscription,
                acks: Vec::new(),
                clock,
                _permit: permit,
            };
            sessions.track_future(session.run().instrument(span))
        }))
}

struct Session {
    state: AppState,
    id: String,
    client: IpAddr,
    socket: WebSocket,
    subscription: Subscription,
    /// Acks of the frames in the batch being written; kept to reuse its allocation.
    acks: Vec<Ack>,
    /// Times the delivery of a sample of its message frames.
    clock: DeliveryClock,
    /// This session's place under the session limits, freed when the session ends.
    _permit: SessionPermit,
}

/// Why a session ends, and what (if anything) to tell the browser.
enum End {
    /// The browser closed or vanished: nothing to send.
    Gone,
    Close(u16, &'static str),
}

impl Session {
    async fn run(mut self) {
        let metrics = self.state.metrics.clone();
        metrics.sessions_open.fetch_add(1, Relaxed);
        metrics.sessions_total.fetch_add(1, Relaxed);
        let opened = Instant::now();
        tracing::info!("session opened");
        let end = self.serve().await;
        if let End::Close(code, reason) = end {
            let frame = CloseFrame { code, reason: Utf8Bytes::from_static(reason) };
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.socket.send(Message::Close(Some(frame))))
                    .await;
        }
        metrics.sessions_open.fetch_sub(1, Relaxed);
        metrics.observe_session(opened.elapsed());
        tracing::info!("session closed");
        // Dropping the subscription cancels the consumer; the auto-delete queue goes with it.
    }

    async fn serve(&mut self) -> End {
        let config = self.state.config.clone();
        let shutdown = self.state.shutdown.clone();
        let welcome = json!({
            "type": "welcome", "session": self.id, "replica": config.replica, "mode": config.mode(),
        });
        if let Err(end) = self.send_json(welcome).await {
            return end;
        }
        let mut ping = tokio::time::interval(config.ws.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ping.tick().await;
        let mut last_heard = Instant::now();
        // Made once, not per turn of the loop: each new one registers a waiter under a lock.
        let mut stopping = std::pin::pin!(shutdown.cancelled());
        loop {
            // Unbiased: a subscription that always has a delivery ready must not starve the
            // socket (the browser's frames, its Close, our pings).
            let step = tokio::select! {
                () = &mut stopping => return End::Close(close_code::AWAY, "server shutting down"),
                event = self.subscription.next() => match event {
                    // Boxed: a batch's writes are a few hundred bytes of state that every
                    // session's task would otherwise carry while it waits, for one small
                    // allocation per batch.
                    Some(event) => Box::pin(self.deliver_batch(event)).await,
                    None => return End::Close(close_code::AWAY, "message bus closed"),
                },
                incoming = self.socket.recv() => {
                    last_heard = Instant::now();
                    // Boxed: publishing what the browser sent (its confirm wait, a retry on a new
                    // link) is the largest state this loop can be in, and it is rare. Inline, it
                    // made every session's task 1.8 KB larger (measured in a debug build) for as long
                    // as it is open.
                    Box::pin(self.receive(incoming)).await
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > config.ws.ping_interval.saturating_mul(5) / 2 {
                        tracing::info!("no pong from the browser; closing");
                        return End::Gone;
                    }
                    self.send(Message::Ping(Default::default())).await
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// Writes `first` and whatever else the subscription has ready (up to [`BATCH`]) with one
    /// flush, then acknowledges their deliveries: in a burst, one write to the socket carries
    /// many frames instead of one each.
    async fn deliver_batch(&mut self, first: Event) -> Result<(), End> {
        let mut acks = std::mem::take(&mut self.acks);
        let mut next = Some(first);
        let mut written = 0;
        let mut bus_closed = false;
        while let Some(event) = next.take() {
            self.write(event, &mut acks).await?;
            written += 1;
            if written == BATCH {
                break;
            }
            // Cancel-safe, so an event that is not ready yet is not lost by asking.
            match self.subscription.next().now_or_never() {
                Some(Some(event)) => next = Some(event),
                Some(None) => bus_closed = true,
                None => {}
            }
        }
        self.flush().await?;
        self.clock.flushed(&self.state.metrics);
        for ack in acks.drain(..) {
            ack.send();
        }
        self.acks = acks;
        if bus_closed {
            return Err(End::Close(close_code::AWAY, "message bus closed"));
        }
        Ok(())
    }

    /// Queues the frame for one event (not flushed); its ack, if any, goes to `acks`.
    async fn write(&mut self, event: Event, acks: &mut Vec<Ack>) -> Result<(), End> {
        match event {
            Event::Message(frame, ack) => {
                self.clock.frame(frame.text());
                self.feed(Message::Text(frame.into_text())).await?;
                self.state.metrics.delivered.fetch_add(1, Relaxed);
                acks.extend(ack);
                Ok(())
            }
            // `Behind` is made a gap by the subscription when it cannot replay; never seen here.
            Event::Gap(missed) | Event::Behind(missed) => {
                self.feed_json(json!({ "type": "gap", "missed": missed })).await
            }
            Event::Oversized { bytes, ack } => {
                self.state.metrics.skipped.fetch_add(1, Relaxed);
                let reason = format!("a message of {bytes} bytes was too large to deliver");
                acks.push(ack);
                self.feed_json(json!({ "type": "gap", "missed": 1, "reason": reason })).await
            }
            Event::Interrupted(reason) => {
                // The cause is logged by the bus; the browser needs to know what it means.
                tracing::debug!(%reason, "telling the browser delivery is interrupted");
                let reason = "the server lost its message broker link; waiting for it to come back";
                self.feed_json(json!({ "type": "interrupted", "reason": reason })).await
            }
            Event::Restored => self.feed_json(json!({ "type": "restored" })).await,
            Event::Duplicate(ack) => {
                acks.extend(ack);
                Ok(())
            }
            Event::ReplayGap { reason, replay_from } => {
                let from = replay_from.map(|(id, millis)| json!({ "id": id, "ts": ts_from_millis(millis) }));
                self.feed_json(json!({ "type": "gap", "reason": reason, "replay_from": from })).await
            }
        }
    }

    async fn receive(&mut self, incoming: Option<Result<Message, axum::Error>>) -> Result<(), End> {
        match incoming {
            None | Some(Ok(Message::Close(_))) => Err(End::Gone),
            Some(Err(e)) => {
                tracing::info!(error = %e, "WebSocket read failed");
                self.state.metrics.rejected_frames.fetch_add(1, Relaxed);
                // tungstenite refuses frames over the size limit with this error; anything
                // else is a broken connection.
                if e.to_string().contains("Space limit exceeded") {
                    Err(End::Close(close_code::SIZE, "message too big"))
                } else {
                    Err(End::Gone)
                }
            }
            Some(Ok(Message::Text(text))) => self.publish(text.as_str()).await,
            Some(Ok(Message::Binary(_))) => {
                self.state.metrics.rejected_frames.fetch_add(1, Relaxed);
                self.send_error("binary frames are not supported; send the message as a text frame".into())
                    .await
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
        }
    }

    /// A text frame is a message from this session: `{"text": ..., "user": ...}` JSON, or
    /// the frame's text itself.
    async fn publish(&mut self, text: &str) -> Result<(), End> {
        if let Err(limited) = self.state.limits.check_message(self.client) {
            self.state.metrics.rejected_frames.fetch_add(1, Relaxed);
            let retry_after = limited.retry_after_secs();
            return self
                .send_json(
                    json!({ "type": "error", "error": limited.to_string(), "retry_after": retry_after }),
                )
                .await;
        }
        let draft = match serde_json::from_str::<Draft>(text) {
            Ok(draft) if draft.text.is_some() => draft,
            _ => Draft { text: Some(text.to_owned()), user: None },
        };
        let envelope = match draft.validate(self.state.config.messages.max_bytes) {
            Ok(message) => Envelope::new(message),
            Err(invalid) => {
                self.state.metrics.rejected_frames.fetch_add(1, Relaxed);
                return self.send_error(invalid.to_string()).await;
            }
        };
        match self.state.publish(&envelope).await {
            Ok(()) => self.send_json(json!({ "type": "accepted", "id": envelope.id })).await,
            Err(e) => self.send_error(AppError::from(e).public_message()).await,
        }
    }

    async fn send_error(&mut self, error: String) -> Result<(), End> {
        self.send_json(json!({ "type": "error", "error": error })).await
    }

    async fn send_json(&mut self, value: serde_json::Value) -> Result<(), End> {
        self.send(Message::Text(value.to_string().into())).await
    }

    async fn feed_json(&mut self, value: serde_json::Value) -> Result<(), End> {
        self.feed(Message::Text(value.to_string().into())).await
    }

    /// Writes one frame and flushes it.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Queues one frame in the socket's write buffer (written out when the buffer is full or
    /// flushed); see [`Session::wait_for_socket`].
    async fn feed(&mut self, message: Message) -> Result<(), End> {
        // Disjoint fields: the state is read while the socket is written, with no clone per frame.
        let written = wait_for_socket(&self.state, self.socket.feed(message)).await;
        self.outcome(written)
    }

    async fn flush(&mut self) -> Result<(), End> {
        let written = wait_for_socket(&self.state, self.socket.flush()).await;
        self.outcome(written)
    }

    fn outcome(&self, written: Written) -> Result<(), End> {
        match written {
            Written::Done(Ok(())) => Ok(()),
            Written::Done(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket write failed");
                Err(End::Gone)
            }
            Written::ShuttingDown => Err(End::Close(close_code::AWAY, "server shutting down")),
            Written::TimedOut => {
                self.state.metrics.slow_sessions_closed.fetch_add(1, Relaxed);
                tracing::warn!("browser stopped reading; closing the session");
                Err(End::Close(close_code::AGAIN, "too slow: the browser stopped reading"))
            }
            Written::NoRoom => {
                self.state.metrics.slow_sessions_closed.fetch_add(1, Relaxed);
                tracing::warn!("browser stopped reading and the stalled sessions' budget is spent; closing");
                Err(End::Close(close_code::AGAIN, "too slow: the browser stopped reading"))
            }
        }
    }
}

/// How a wait for the socket ended.
enum Written {
    Done(Result<(), axum::Error>),
    /// Nothing taken within the send timeout.
    TimedOut,
    /// Stalled, and no stalled-session place left in the process.
    NoRoom,
    ShuttingDown,
}

/// Waits for the socket to take a write. A socket that takes nothing for [`STALL_GRACE`] makes
/// its session a stalled one, which holds one of the process's stalled-session places until
/// the write goes through: with none left, it ends at once ([`Written::NoRoom`]), so the
/// memory that browsers which stopped reading hold stays within the budget. Otherwise it waits
/// up to the send timeout.
async fn wait_for_socket(state: &AppState, write: impl Future<Output = Result<(), axum::Error>>) -> Written {
    let mut write = std::pin::pin!(write);
    // Almost always the socket takes the write at once: then no clock is read and no timer is
    // set up, and the waiting below (boxed) does not make every session's task larger.
    if let Poll::Ready(result) = futures_util::poll!(write.as_mut()) {
        return Written::Done(result);
    }
    Box::pin(wait_longer(state, write)).await
}

/// [`wait_for_socket`] once the socket did not take the write at once.
async fn wait_longer(
    state: &AppState,
    mut write: Pin<&mut impl Future<Output = Result<(), axum::Error>>>,
) -> Written {
    let until = Instant::now() + state.config.ws.send_timeout;
    let grace = state.config.ws.send_timeout.min(STALL_GRACE);
    tokio::select! {
        written = tokio::time::timeout(grace, &mut write) => match written {
            Ok(result) => return Written::Done(result),
            Err(_) if grace >= state.config.ws.send_timeout => return Written::TimedOut,
            Err(_) => {}
        },
        () = state.shutdown.cancelled() => return Written::ShuttingDown,
    }
    let Ok(_place) = state.stalled.try_acquire() else { return Written::NoRoom };
    tokio::select! {
        written = tokio::time::timeout_at(until.into(), write) => match written {
            Ok(result) => Written::Done(result),
            Err(_) => Written::TimedOut,
        },
        () = state.shutdown.cancelled() => Written::ShuttingDown,
    }
}
