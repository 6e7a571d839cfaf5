//! One session's subscription: its own exclusive, auto-delete queue bound to the exchange, its
//! consumer on a shared channel, and the restore of both after a channel or link failure.
//!
//! A restore declares a queue of a new name (`<first name>.<n>`): the broker may not yet know
//! that the old connection is dead, and would refuse to re-declare its exclusive queue.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use futures_util::StreamExt;
use lapin::{
    Consumer,
    options::BasicConsumeOptions,
    types::{FieldTable, ShortString},
};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    RabbitBus,
    channels::SlotLease,
    codec::frame,
    declare::declare_exclusive_bound,
    link::{Link, LinkState, backoff},
    overflow::bounded_queue,
};
use crate::bus::{Ack, BusError, Event, Live};

/// What the bus knows of one open session.
#[derive(Default)]
pub(super) struct SessionEntry {
    /// Messages its queue dropped (oldest first, at `x-max-length`), as counted by the
    /// replica's overflow consumer from the dead-letters of that queue.
    pub(super) dropped: AtomicU64,
    pub(super) notify: Notify,
    /// The generation of the link its queue is bound on; behind the current link while the
    /// session re-creates its queue after an outage.
    pub(super) generation: AtomicU64,
}

impl RabbitBus {
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
        let lease = link.lease_slot(config).await?;
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
