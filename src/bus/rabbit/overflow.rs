//! What full queues drop. A session queue holds at most `queue_max_length` messages and drops
//! the oldest first; each dropped message is dead-lettered to this replica's overflow queue
//! under the session's name, counted there, and shown to that session as a gap.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use futures_util::StreamExt;
use lapin::{
    Connection, ExchangeKind,
    options::{BasicConsumeOptions, ExchangeDeclareOptions},
    types::{AMQPValue, FieldTable, ShortString},
};

use super::{Shared, declare::declare_exclusive_bound, process::process_queue};

/// Where session queues dead-letter what they drop when full (a topic exchange: the routing key
/// is the session's queue name, so each replica binds `fanout-chat.<replica>.*`).
const OVERFLOW_EXCHANGE: &str = "fanout-chat.overflow";
/// Bound of a replica's overflow queue: it only carries counts, and is read as fast as it fills.
const OVERFLOW_QUEUE_MAX_LENGTH: i32 = 10_000;

/// Makes this replica's overflow queue and counts its dead-letters per session: each one is a
/// message a full session queue dropped. The task ends with the link's connection.
pub(super) async fn count_overflow(
    shared: &Arc<Shared>,
    connection: &Connection,
) -> Result<(), lapin::Error> {
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
pub(super) fn bounded_queue(max_length: i32, dead_letter_key: &str) -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(max_length));
    arguments.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
    arguments.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(OVERFLOW_EXCHANGE.into()));
    arguments.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(dead_letter_key.into()));
    arguments
}
