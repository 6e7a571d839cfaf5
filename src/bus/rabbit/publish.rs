//! Publishing to the exchange, confirmed by the broker: a message is only reported accepted
//! (202) once the broker has confirmed it, within `publish_timeout`.
//!
//! A publish whose connection is lost before its confirm arrives (its node stopped) is sent
//! again on the next link, with the same message id, body and timestamp, within the same time
//! bound; a POST that arrives while the link is being rebuilt after a loss waits for it. The
//! first copy may have reached the exchange: sessions and the history window drop a second
//! copy of a message they already have (same key), so nobody sees it twice.

use std::time::{Duration, Instant, SystemTime};

use lapin::{BasicProperties, Confirmation, options::BasicPublishOptions, types::ShortString};
use tokio::time::timeout_at;

use super::{
    RabbitBus,
    link::{Link, LinkState},
};
use crate::{bus::BusError, chat::Envelope};

/// How often a publish waiting for a new link checks that publishing is allowed on it.
const READY_POLL: Duration = Duration::from_millis(10);

impl RabbitBus {
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let config = &self.0.config;
        let deadline = tokio::time::Instant::now() + config.publish_timeout;
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(envelope.id.as_str().into())
            // From the envelope, not the clock: a message published again (a lost confirm, an
            // Idempotency-Key retry) is then the same to the letter, and dropped as a copy.
            .with_timestamp(u64::try_from(envelope.ts_millis() / 1000).unwrap_or_else(|_| unix_now()))
            .with_app_id("fanout-chat".into())
            // Persistent, for the durable queues other services may bind; the sessions'
            // own queues are transient and ignore it.
            .with_delivery_mode(2);
        let body = envelope.to_json();
        if let Some(reason) = self.blocked() {
            // Anything sent now would wait in the socket until the alarm clears: refuse at once.
            return Err(BusError::Blocked(reason));
        }
        let mut link = match self.ready_link() {
            Ok(link) => link,
            // Lost a moment ago: ride through the reconnect rather than refuse at once. Down
            // for longer (or never up): refuse now, as `/readyz` says.
            Err(e) if self.recently_lost() => self.wait_for_ready_link(None, deadline).await.ok_or(e)?,
            Err(e) => return Err(e),
        };
        let mut sent = 0u32;
        let result = loop {
            if sent > 0 {
                self.0.metrics.republished.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(id = %envelope.id, generation = link.generation, "publishing again on the new broker link");
            }
            sent += 1;
            let attempt = timeout_at(deadline, async {
                tokio::select! {
                    confirmed = publish_on(&link, &config.exchange, body.as_bytes(), properties.clone()) => Some(confirmed),
                    () = self.link_gone(link.generation) => None,
                }
            })
            .await;
            match attempt {
                Ok(Some(Ok(Confirmation::Ack(_)))) => break Ok(()),
                Ok(Some(Ok(Confirmation::Nack(_)))) => break Err(BusError::Nacked),
                Ok(Some(Ok(Confirmation::NotRequested))) => {
                    break Err(BusError::Broker("publisher confirms are off".into()));
                }
                Ok(Some(Err(e)))
                    if link.connections[0].status().connected() && link.publisher.status().connected() =>
                {
                    break Err(BusError::Broker(e.to_string()));
                }
                // The publishing channel or connection is gone: the confirm went with it.
                Ok(Some(Err(_)) | None) => {
                    if !link.publisher.status().connected() {
                        // A channel error: have the supervisor build a new link.
                        link.broken.notify_one();
                    }
                    match self.wait_for_ready_link(Some(link.generation), deadline).await {
                        Some(next) => link = next,
                        None => break Err(BusError::Timeout(config.publish_timeout)),
                    }
                }
                Err(_) => break Err(BusError::Timeout(config.publish_timeout)),
            }
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, id = %envelope.id, attempts = sent, "publish failed");
        }
        result
    }

    /// The link was lost less than `publish_timeout` ago and is being rebuilt.
    fn recently_lost(&self) -> bool {
        matches!(&*self.0.link.borrow(), LinkState::Down(_))
            && self
                .0
                .down_since
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some_and(|at| at.elapsed() < self.0.config.publish_timeout)
    }

    /// A link newer than `seen` on which publishing is allowed, or `None` at `deadline` or when
    /// the bus closes.
    async fn wait_for_ready_link(
        &self,
        seen: Option<u64>,
        deadline: tokio::time::Instant,
    ) -> Option<std::sync::Arc<Link>> {
        timeout_at(deadline, async {
            let link = self.wait_for_link(seen).await?;
            while !link.ready.load(std::sync::atomic::Ordering::Relaxed) {
                tokio::time::sleep(READY_POLL).await;
                if !matches!(&*self.0.link.borrow(), LinkState::Up(l) if l.generation == link.generation) {
                    return Box::pin(self.wait_for_ready_link(Some(link.generation), deadline)).await;
                }
            }
            Some(link)
        })
        .await
        .ok()
        .flatten()
    }

    /// Resolves once link `generation` is no longer the bus's link.
    async fn link_gone(&self, generation: u64) {
        let mut state = self.0.link.clone();
        let _ = state.wait_for(|s| !matches!(s, LinkState::Up(l) if l.generation == generation)).await;
    }
}

async fn publish_on(
    link: &Link,
    exchange: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<Confirmation, lapin::Error> {
    link.publisher
        .basic_publish(
            exchange.into(),
            ShortString::from(""),
            BasicPublishOptions::default(),
            body,
            properties,
        )
        .await?
        .await
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// When the link was lost, for [`RabbitBus::publish`]'s ride-through.
pub(super) fn mark_down(since: &std::sync::Mutex<Option<Instant>>, down: bool) {
    *since.lock().unwrap_or_else(|p| p.into_inner()) = down.then(Instant::now);
}
