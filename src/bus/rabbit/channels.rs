//! The consumer channels that sessions share.
//!
//! A process holds thousands of sessions, and RabbitMQ recommends far fewer channels than its
//! default limit of 2047 per connection, so `sessions_per_channel` consumers share a channel
//! and each consumer connection carries at most `channels_per_connection` of them. A session
//! holds a [`SlotLease`] on its channel for as long as it consumes there.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering::Relaxed},
};

use lapin::{Channel, ErrorKind, options::BasicQosOptions};

use super::link::Link;
use crate::config::RabbitConfig;

/// A consumer channel and its share of sessions.
pub(super) struct Slot {
    pub(super) channel: Channel,
    /// Index in `Link::connections` (consumer connections start at 1).
    pub(super) connection: usize,
    sessions: AtomicUsize,
}

/// Holds one session's place on a [`Slot`]; gives it back when dropped.
pub(super) struct SlotLease(pub(super) Arc<Slot>);

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
    }
}

impl Link {
    /// A consumer channel with room for one more session, opening one when all are full.
    pub(super) async fn lease_slot(&self, config: &RabbitConfig) -> Result<SlotLease, lapin::Error> {
        let link = self;
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
}
