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

use super::lanes::LaneLink;
use crate::config::RabbitConfig;

/// A consumer channel and its share of sessions.
pub(super) struct Slot {
    /// Shared with the acks of its deliveries (see [`crate::bus::Ack`]).
    pub(super) channel: Arc<Channel>,
    sessions: AtomicUsize,
    /// The sessions of the whole connection, which this slot's count is part of.
    lane_sessions: Arc<AtomicUsize>,
}

/// Holds one session's place on a [`Slot`]; gives it back when dropped.
pub(super) struct SlotLease(pub(super) Arc<Slot>);

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
        self.0.lane_sessions.fetch_sub(1, Relaxed);
    }
}

impl LaneLink {
    /// A consumer channel with room for one more session, opening one when all are full.
    pub(super) async fn lease_slot(&self, config: &RabbitConfig) -> Result<SlotLease, lapin::Error> {
        let mut pool = self.pool.lock().await;
        pool.retain(|slot| slot.channel.status().connected());
        let take = |slot: &Arc<Slot>| {
            slot.sessions.fetch_add(1, Relaxed);
            self.sessions.fetch_add(1, Relaxed);
            SlotLease(slot.clone())
        };
        if let Some(slot) = pool
            .iter()
            .filter(|slot| slot.sessions.load(Relaxed) < config.sessions_per_channel)
            .min_by_key(|slot| slot.sessions.load(Relaxed))
        {
            return Ok(take(slot));
        }
        if pool.len() >= config.channels_per_connection || !self.connection.status().connected() {
            return Err(lapin::Error::from(ErrorKind::ChannelsLimitReached));
        }
        let channel = self.connection.create_channel().await?;
        // Per consumer (global = false): each session may have `prefetch` unacknowledged
        // deliveries. RabbitMQ 4 refuses global QoS.
        channel.basic_qos(config.prefetch, BasicQosOptions { global: false }).await?;
        let slot = Arc::new(Slot {
            channel: Arc::new(channel),
            sessions: AtomicUsize::new(0),
            lane_sessions: self.sessions.clone(),
        });
        pool.push(slot.clone());
        Ok(take(&slot))
    }
}
