//! The embedded bus: a tokio broadcast channel inside this process.
//!
//! Every session sees every message published through this process, and nothing else: two
//! replicas on this bus do not see each other, which is why start-up warns loudly about it.
//! A session that falls more than the channel's capacity behind skips ahead and is told how
//! many messages it missed.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use tokio::sync::broadcast;

use super::{BusError, Event, Frame};
use crate::{chat::Envelope, metrics::Metrics};

#[derive(Clone)]
pub struct MemoryBus {
    sender: broadcast::Sender<Frame>,
    metrics: Arc<Metrics>,
}

impl MemoryBus {
    pub fn new(capacity: usize, metrics: Arc<Metrics>) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        Self { sender, metrics }
    }

    pub fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        // Sending fails only when nobody listens, and then there is nobody to deliver to.
        let _ = self.sender.send(Frame::from(envelope.to_json()));
        Ok(())
    }

    pub fn subscribe(&self) -> MemorySubscription {
        MemorySubscription { receiver: self.sender.subscribe(), metrics: self.metrics.clone() }
    }
}

pub struct MemorySubscription {
    receiver: broadcast::Receiver<Frame>,
    metrics: Arc<Metrics>,
}

impl MemorySubscription {
    pub async fn next(&mut self) -> Option<Event> {
        match self.receiver.recv().await {
            Ok(frame) => Some(Event::Message(frame, None)),
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                self.metrics.skipped.fetch_add(missed, Relaxed);
                Some(Event::Gap(missed))
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}
