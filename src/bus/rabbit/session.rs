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

use super::lanes::{LaneLink, LaneState};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    Consumer,
    options::BasicConsumeOptions,
    types::{FieldTable, ShortString},
};
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};

/// Longest wait for a session's queue and consumer to be made.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(10);
use tokio_util::sync::CancellationToken;

use super::{
    RabbitBus, channels::SlotLease, declare::declare_exclusive_bound, link::backoff, overflow::bounded_queue,
};
use crate::bus::{Ack, BusError, Event, Live};

/// What the bus knows of one open session.
#[derive(Default)]
pub(super) struct SessionEntry {
    /// Messages its queue dropped (oldest first, at `x-max-length`), as counted by the
    /// replica's overflow consumer from the dead-letters of that queue.
    pub(super) dropped: AtomicU64,
    pub(super) notify: Notify,
}

impl RabbitBus {
    /// Declares, binds and consumes the session's queue. The work runs in its own task, so a
    /// caller that gives up (a browser that goes away mid-handshake) cannot leave a consumer
    /// half made: the task finishes, and its result is dropped cleanly.
    pub async fn subscribe(&self, session: &str) -> Result<Live, BusError> {
        self.current_link()?;
        if let Some(local) = &self.0.local {
            return Ok(Live::Memory(local.subscribe()));
        }
        let lane = self
            .0
            .lanes
            .pick(None)
            .ok_or_else(|| BusError::Unavailable("no consumer connection to the broker is up".into()))?;
        let queue = format!("fanout-chat.{}.{}", self.0.replica, session);
        let bus = self.clone();
        let name = queue.clone();
        let active = tokio::spawn(async move { bus.attach_while_up(&lane.0, &name, &name).await })
            .await
            .map_err(|e| BusError::Broker(e.to_string()))?
            .map_err(BusError::Broker)?;
        let entry = Arc::new(SessionEntry::default());
        self.0.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(queue.clone(), entry.clone());
        Ok(Live::Rabbit(Box::new(RabbitSubscription {
            bus: self.clone(),
            entry,
            base_queue: queue.clone(),
            restores: 0,
            queue,
            state: State::Active(active),
            cancel: self.0.shutdown.child_token(),
        })))
    }

    /// [`Self::attach`], given up when the lane's connection is lost meanwhile (a request on a
    /// connection that died may never be answered) or after [`ATTACH_TIMEOUT`].
    async fn attach_while_up(
        &self,
        lane: &Arc<LaneLink>,
        queue: &str,
        session: &str,
    ) -> Result<Active, String> {
        let mut state = self.0.lanes.states[lane.lane].subscribe();
        let gone = state.wait_for(|s| !matches!(s, LaneState::Up(l) if l.generation == lane.generation));
        tokio::select! {
            attached = tokio::time::timeout(ATTACH_TIMEOUT, self.attach(lane, queue, session)) => match attached {
                Ok(attached) => attached.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer from the broker within {ATTACH_TIMEOUT:?}")),
            },
            _ = gone => Err("the broker connection was lost".into()),
        }
    }

    /// Puts the queue on a channel of `lane` and starts consuming it. What the queue drops when
    /// full is dead-lettered to this replica's overflow queue under `session` (the session's
    /// first queue name), which counts it for the session.
    async fn attach(&self, lane: &Arc<LaneLink>, queue: &str, session: &str) -> Result<Active, lapin::Error> {
        let config = &self.0.config;
        let lease = lane.lease_slot(config).await?;
        // Declare and bind on a short-lived channel of the same connection (an exclusive queue
        // belongs to its connection): if either fails, that closes this channel only, not the
        // shared one that carries other sessions' consumers.
        let setup = lane.connection.create_channel().await?;
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
        Ok(Active {
            lane: lane.lane,
            generation: lane.generation,
            watch: self.0.lanes.states[lane.lane].subscribe(),
            consumer,
            lease,
        })
    }
}

/// One session's queue while it is consumed.
struct Active {
    /// The lane and its connection the consumer is on; the session watches the lane, as a
    /// connection declared dead (by its heartbeat) may never fail the consumer itself.
    lane: usize,
    generation: u64,
    watch: watch::Receiver<LaneState>,
    consumer: Consumer,
    /// Declared after `consumer` so that the consumer is cancelled before the place is freed.
    /// Its channel also carries the acks.
    lease: SlotLease,
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
    /// What the bus knows of this session (its drops).
    entry: Arc<SessionEntry>,
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
    pub(crate) fn count_duplicate(&self) {
        self.bus.0.metrics.duplicates_dropped.fetch_add(1, Relaxed);
    }

    pub async fn next(&mut self) -> Option<Event> {
        match &mut self.state {
            State::Active(active) => {
                // A delivery ready now is taken at once: a session in a burst then registers no
                // waiter on its drop notice and lane state per delivery. Those are looked at
                // whenever none is ready, which a lost connection soon makes so.
                let ready = active.consumer.next().now_or_never();
                let delivered = if let Some(delivered) = ready {
                    Ok(delivered)
                } else {
                    loop {
                        tokio::select! {
                            delivered = active.consumer.next() => break Ok(delivered),
                            () = self.entry.notify.notified() => {
                                let missed = self.entry.dropped.swap(0, Relaxed);
                                if missed > 0 {
                                    return Some(Event::Gap(missed));
                                }
                            }
                            changed = active.watch.changed() => {
                                if changed.is_err() {
                                    return None;
                                }
                                let still_up = matches!(
                                    &*active.watch.borrow_and_update(),
                                    LaneState::Up(link) if link.generation == active.generation
                                );
                                if !still_up {
                                    break Err("the broker connection was lost".to_owned());
                                }
                            }
                        }
                    }
                };
                let reason = match delivered {
                    Err(reason) => reason,
                    Ok(delivered) => match delivered {
                        Some(Ok(delivery)) => {
                            let lapin::message::Delivery { delivery_tag, data, properties, .. } = delivery;
                            // Acked on the channel itself, which skips a task spawned per ack
                            // in lapin (its `Acker`, dropped unused here).
                            let ack = Ack::on_channel(active.lease.0.channel.clone(), delivery_tag);
                            // Another service may publish anything; a body far over what a browser
                            // may send is skipped rather than copied into thousands of sessions.
                            if data.len() > self.bus.0.max_frame_bytes {
                                return Some(Event::Oversized { bytes: data.len(), ack });
                            }
                            // A second copy (a publish sent again after its confirm was lost)
                            // is dropped by the session's `Resume`, which remembers the keys of
                            // what it sent.
                            let frame = self.bus.0.frames.frame(data, &properties);
                            return Some(Event::Message(frame, Some(ack)));
                        }
                        Some(Err(e)) => e.to_string(),
                        None => "the broker cancelled the session's consumer".to_owned(),
                    },
                };
                tracing::warn!(queue = %self.queue, %reason, "session delivery interrupted");
                let failed_on = active.lane;
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
                self.bus.0.metrics.resubscribes.fetch_add(1, Relaxed);
                tracing::info!(queue = %self.queue, "session delivery restored");
                self.state = State::Active(active);
                Some(Event::Restored)
            }
        }
    }
}

/// Re-creates a session's queue and consumer on a usable lane, another than `failed_on` if
/// there is one: the same lane's connection may be gone with its node.
async fn restore(
    bus: RabbitBus,
    queue: String,
    session: String,
    failed_on: usize,
    cancel: CancellationToken,
) -> Option<Active> {
    let mut attempt = 0u32;
    let mut changes = bus.0.lanes.changed.subscribe();
    loop {
        let Some(lane) = bus.0.lanes.pick(Some(failed_on)) else {
            // None up: wait for one.
            tokio::select! {
                changed = changes.changed() => changed.ok()?,
                () = cancel.cancelled() => return None,
            }
            if bus.0.shutdown.is_cancelled() {
                return None;
            }
            continue;
        };
        let attached = tokio::select! {
            attached = bus.attach_while_up(&lane.0, &queue, &session) => attached,
            () = cancel.cancelled() => return None,
        };
        match attached {
            Ok(active) => return Some(active),
            Err(e) => {
                attempt = attempt.saturating_add(1);
                tracing::debug!(%queue, error = %e, attempt, "restoring the session queue failed; retrying");
                // Until the backoff ends, or at once when a connection comes up (or goes): an
                // attempt that failed while the node was still starting must not keep the
                // session waiting seconds after a connection is there to take it.
                tokio::select! {
                    () = tokio::time::sleep(backoff(attempt, Duration::from_secs(5))) => {}
                    changed = changes.changed() => changed.ok()?,
                    () = cancel.cancelled() => return None,
                }
            }
        }
    }
}
