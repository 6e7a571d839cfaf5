//! `process` fan-out mode: one exclusive queue for the whole process, bound to the exchange; a
//! task copies each message to every session in memory and acks it. Far fewer broker
//! deliveries at thousands of sessions, at the cost of per-session bounds in the broker.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use futures_util::StreamExt;
use lapin::{
    Connection,
    options::{BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};

use super::{Shared, codec::frame, declare::declare_exclusive_bound, overflow::bounded_queue};
use crate::bus::{Ack, MemoryBus};

/// Unacknowledged messages the process queue's consumer may hold at least (more with a larger
/// `NOTIFIER_PREFETCH`): at most this many of the largest messages in memory.
const PROCESS_PREFETCH: u16 = 256;

/// The queue of `process` fan-out mode.
pub(super) fn process_queue(replica: &str) -> String {
    format!("fanout-chat.{replica}.process")
}

/// `process` fan-out mode: one exclusive queue for this whole process, bound to the exchange;
/// a task hands each message to every session through the in-memory channel and acks it.
pub(super) async fn consume_for_process(
    shared: &Arc<Shared>,
    local: MemoryBus,
    connection: &Connection,
) -> Result<(), lapin::Error> {
    let config = &shared.config;
    let channel = connection.create_channel().await?;
    let queue = process_queue(&shared.replica);
    // What it drops when full (the process fell behind the broker) is counted like a session
    // queue's drops, and every session of the process is told.
    let arguments = bounded_queue(config.queue_max_length, &queue);
    declare_exclusive_bound(&channel, &queue, arguments, &config.exchange, "").await?;
    // One consumer for every session of the process: with a session's prefetch (8) it waited
    // for an ack round trip every 8 messages, and fell behind (its queue dropping most of
    // them) at 10,000 messages/s in the benchmark.
    channel.basic_qos(config.prefetch.max(PROCESS_PREFETCH), BasicQosOptions { global: false }).await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            ShortString::from(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let max_frame_bytes = shared.max_frame_bytes;
    let metrics = shared.metrics.clone();
    // After an outage, `restored` goes out before the new queue's first message, from the task
    // that sends both: a session's catch-up starts after the last message it had before the
    // outage, never after one of the new queue's.
    if shared.process_restored.swap(false, Relaxed) {
        local.send_notice(None);
    }
    tokio::spawn(async move {
        // The last message keys, to drop a second copy of a publish sent again (see
        // `publish`), as a session's own queue does.
        let mut recent = [0u64; 64];
        let mut recent_at = 0usize;
        while let Some(Ok(delivery)) = consumer.next().await {
            let lapin::message::Delivery { data, properties, acker, .. } = delivery;
            if data.len() <= max_frame_bytes {
                let frame = frame(data, &properties);
                if properties.message_id().is_some() {
                    if recent.contains(&frame.key()) {
                        metrics.duplicates_dropped.fetch_add(1, Relaxed);
                        Ack::by_acker(acker).send();
                        continue;
                    }
                    recent[recent_at % recent.len()] = frame.key();
                    recent_at += 1;
                }
                // The channel never waits: a session that is behind skips ahead (and is told).
                local.send_frame(frame);
            } else {
                metrics.skipped.fetch_add(1, Relaxed);
            }
            Ack::by_acker(acker).send();
        }
        drop(channel);
    });
    Ok(())
}
