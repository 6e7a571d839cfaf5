//! The history stream: a durable RabbitMQ stream bound to the fanout exchange.
//!
//! Every message published to the exchange is appended to it, whoever published it. Each
//! replica *follows* it (an AMQP 0-9-1 consumer with `x-stream-offset`) to fill its in-memory
//! window, and reads older parts of it on demand for `GET /messages?before=`.
//!
//! At its first start a process must know where the stream ends, to fill its window with the
//! last messages and report ready only once it has. AMQP 0-9-1 has no "tail offset" query, so
//! the replica appends a *marker* (published to the stream directly through the default
//! exchange, so no browser or other consumer of the exchange sees it), attaches at `last` (the
//! stream's last chunk, which exists now), and takes the first offset it sees there as the tail.
//! Markers carry the header `x-fanout-chat-marker`; every reader here skips them.

use std::{
    sync::{Arc, atomic::Ordering::Relaxed},
    time::Duration,
};

use futures_util::{FutureExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    message::Delivery,
    options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    protocol::AMQPSoftError,
    types::{AMQPValue, FieldTable, ShortString},
};

use tokio::sync::Notify;

use super::{Shared, codec::decode, declare::channel_error};
use crate::bus::history::NewEntry;

/// Why the window misses messages after an outage (see `History::mark_hole`).
const RETENTION_CUT: &str = "messages sent while this server was away from the broker were removed from the \
     history by its retention before it could read them";
const STREAM_REPLACED: &str =
    "the history was deleted while this server was away from the broker; what it held before is gone";

/// Header that marks the replicas' own bookkeeping messages in the stream.
const MARKER_HEADER: &str = "x-fanout-chat-marker";
/// Unacknowledged deliveries of a stream consumer (streams require a prefetch).
const STREAM_PREFETCH: u16 = 500;
/// How far past the time in an id [`locate`] reads before it gives up: the clock skew between
/// servers, and a second for the whole-second AMQP timestamp.
const LOCATE_SLACK_MS: u64 = crate::chat::CLOCK_SKEW.as_millis() as u64 + 1000;
/// How long one read of the stream (finding the tail, a page of history) may take.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Declares the stream with its retention and binds it to the exchange. A stream that exists
/// with other retention settings is used as it is, with a warning (as the exchange is).
pub(super) async fn declare(
    connection: &Connection,
    exchange: &str,
    shared: &Shared,
) -> Result<(), lapin::Error> {
    let stream = &shared.config.history;
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    arguments.insert("x-max-age".into(), AMQPValue::LongString(stream.max_age.as_str().into()));
    let max_bytes = i64::try_from(stream.max_bytes).unwrap_or(i64::MAX);
    arguments.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(max_bytes));
    // Retention removes whole segments, so a segment must be well under the size limit
    // (RabbitMQ's default segment is 500 MB).
    let segment = (max_bytes / 4).clamp(250_000, 500_000_000);
    arguments.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(segment));
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            stream.name.as_str().into(),
            QueueDeclareOptions { durable: true, ..Default::default() },
            arguments,
        )
        .await;
    let channel = match declared {
        Ok(_) => channel,
        Err(e) if channel_error(&e) == Some(&AMQPSoftError::PRECONDITIONFAILED) => {
            let probe = connection.create_channel().await?;
            probe
                .queue_declare(
                    stream.name.as_str().into(),
                    QueueDeclareOptions { passive: true, ..Default::default() },
                    FieldTable::default(),
                )
                .await?;
            tracing::warn!(
                stream = %stream.name, error = %e,
                "the history stream exists with other settings; using it as it is"
            );
            probe
        }
        Err(e) => return Err(e),
    };
    channel
        .queue_bind(
            stream.name.as_str().into(),
            exchange.into(),
            ShortString::from(""),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "OK".into()).await;
    Ok(())
}

/// Starts following the stream into the window: from where the last link stopped, or, the
/// first time, from the last `window` messages (see the module docs). The task ends with the
/// connection; the next link resumes it.
pub(super) async fn follow(
    shared: &Arc<Shared>,
    connection: &Connection,
    publisher: &Channel,
    broken: Arc<Notify>,
) -> Result<(), String> {
    let stream = shared.config.history.name.clone();
    let log_stream = stream.clone();
    let resume_at = *shared.stream_next.lock().unwrap_or_else(|p| p.into_inner());
    let window = shared.history.capacity() as u64;
    // Resuming after an outage, the stream may not be where this replica left it: retention
    // may have removed what came next, or the stream may have been deleted (and declared
    // again, starting over at 0). Re-read from the last message the window has, and check.
    let mut expect = None;
    let (start, tail) = match resume_at {
        Some(next) => {
            let end = find_tail(connection, publisher, &stream).await?;
            if end + 1 < next {
                // Shorter than where this replica was: not the stream it followed.
                tracing::warn!(%stream, next, end, "the history stream was deleted while the link was down; the window starts over");
                shared.history.clear();
                shared.history.mark_hole(STREAM_REPLACED);
                *shared.stream_next.lock().unwrap_or_else(|p| p.into_inner()) = None;
                (end.saturating_sub(window), None)
            } else {
                let last = next.saturating_sub(1);
                let key = shared.history.newest_offset_and_key().filter(|&(o, _)| o == last).map(|(_, k)| k);
                expect = (next > 0).then_some((last, key));
                (last, None)
            }
        }
        None => {
            let tail = find_tail(connection, publisher, &stream).await?;
            (tail.saturating_sub(window), Some(tail))
        }
    };
    if tail.is_none() {
        shared.history_filled.send_replace(true);
    }
    let channel = connection.create_channel().await.map_err(|e| e.to_string())?;
    let mut consumer = consume(&channel, &stream, offset_value(start)).await.map_err(|e| e.to_string())?;
    tracing::debug!(%stream, start, "following the history stream");
    let shared = shared.clone();
    tokio::spawn(async move {
        loop {
            // `None`: the consumer ended without an error (the broker cancelled it).
            let failed = loop {
                let delivery = match consumer.next().await {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => break Some(e),
                    None => break None,
                };
                let Some(offset) = stream_offset(&delivery) else { continue };
                // Queued with lapin, not waited for (see `Ack::send`).
                let _ = delivery.acker.ack(BasicAckOptions::default()).now_or_never();
                // The broker starts at the beginning of the chunk that holds `last`: the first
                // delivery at or past it is the one to check.
                if let Some((last, key)) = expect.take_if(|&mut (last, _)| offset >= last) {
                    let same = offset == last
                        && key.is_none_or(|key| {
                            is_marker(&delivery)
                                || decode(delivery.data.clone(), &delivery.properties).0.key() == key
                        });
                    if !same {
                        let reason = if offset > last { RETENTION_CUT } else { STREAM_REPLACED };
                        tracing::warn!(stream = %log_stream, expected = last, got = offset, reason, "the history stream changed while the link was down");
                        if offset <= last {
                            shared.history.clear();
                        }
                        shared.history.mark_hole(reason);
                        *shared.stream_next.lock().unwrap_or_else(|p| p.into_inner()) = Some(offset);
                    }
                }
                {
                    let mut next = shared.stream_next.lock().unwrap_or_else(|p| p.into_inner());
                    if next.is_some_and(|n| offset < n) {
                        continue; // Already in the window (a chunk re-read from its start).
                    }
                    *next = Some(offset + 1);
                }
                if tail.is_some_and(|t| offset >= t) && !shared.history_filled.send_replace(true) {
                    tracing::info!(offset, "history window filled from the stream");
                }
                let has_id = delivery.properties.message_id().is_some();
                if let Some(entry) = into_entry(delivery, offset, shared.max_frame_bytes) {
                    // A message published again after its confirm was lost with its
                    // connection (same id, body and timestamp) is in the stream twice: keep
                    // the first. Messages without an id keep every copy (see `append`).
                    if has_id && shared.history.holds_key(entry.frame.key()) {
                        shared.metrics.duplicates_dropped.fetch_add(1, Relaxed);
                    } else {
                        shared.history.append(entry);
                    }
                }
            };
            // With the connection lost, the next link resumes where this one stopped.
            if failed.is_some() || !channel.status().connected() || shared.shutdown.is_cancelled() {
                break;
            }
            // The broker ended the consumer on a live channel: the stream's leader went away
            // (a node stopped; another member takes over), or the stream was deleted. Follow
            // on from where the window is: on a stream that is still there that just works,
            // and nothing is interrupted.
            let next = shared.stream_next.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(0);
            match consume(&channel, &stream, offset_value(next)).await {
                Ok(again) => {
                    tracing::info!(stream = %log_stream, next, "the history stream's reader was stopped by the broker; following on");
                    consumer = again;
                }
                Err(e) => {
                    // Deleted (and maybe declared again, starting over at offset 0): rebuild the
                    // link, refilling the window from the new stream's end; a window that
                    // silently stopped growing would leave resuming sessions waiting on it.
                    // Anything else: rebuild the link too, keeping the window.
                    if channel_error(&e) == Some(&AMQPSoftError::NOTFOUND) {
                        *shared.stream_next.lock().unwrap_or_else(|p| p.into_inner()) = None;
                        shared.history.clear();
                    }
                    tracing::warn!(stream = %log_stream, error = %e, "the history stream's reader cannot follow on; rebuilding the link");
                    broken.notify_one();
                    break;
                }
            }
        }
        drop(channel);
    });
    Ok(())
}

/// The offset of the stream's end (roughly: the first message of its last chunk).
async fn find_tail(connection: &Connection, publisher: &Channel, stream: &str) -> Result<u64, String> {
    let token = ulid::Ulid::new().to_string();
    let mut headers = FieldTable::default();
    headers.insert(MARKER_HEADER.into(), AMQPValue::LongString(token.as_str().into()));
    let read = async {
        publisher
            .basic_publish(
                ShortString::from(""),
                stream.into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default().with_headers(headers),
            )
            .await?
            .await?;
        let channel = connection.create_channel().await?;
        let mut consumer = consume(&channel, stream, AMQPValue::LongString("last".into())).await?;
        let first = consumer.next().await.transpose()?;
        let _ = channel.close(200, "OK".into()).await;
        Ok::<_, lapin::Error>(first.as_ref().and_then(stream_offset))
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(Ok(Some(offset))) => Ok(offset),
        Ok(Ok(None)) => Err(format!("the history stream {stream:?} delivered nothing at its end")),
        Ok(Err(e)) => Err(format!("reading the end of the history stream {stream:?}: {e}")),
        Err(_) => Err(format!("no answer reading the end of the history stream {stream:?}")),
    }
}

/// Reads up to `limit` messages before `before` (an offset), at most `budget` bytes of them (the
/// newest), oldest first; and whether older ones may exist in the stream, and whether some of
/// those read were left out for the budget. Held in memory: never more than the budget and one
/// message.
pub(super) async fn read_before(
    connection: &Connection,
    stream: &str,
    max_bytes: usize,
    before: u64,
    limit: usize,
    budget: usize,
) -> Result<(Vec<NewEntry>, bool, bool), String> {
    if before == 0 || limit == 0 {
        return Ok((Vec::new(), false, false));
    }
    let start = before.saturating_sub(limit as u64);
    let read = async {
        let channel = connection.create_channel().await?;
        let mut consumer = consume(&channel, stream, offset_value(start)).await?;
        let mut entries = std::collections::VecDeque::new();
        let mut held = 0;
        let mut dropped = false;
        let mut first_seen = None;
        while let Some(delivery) = consumer.next().await.transpose()? {
            let Some(offset) = stream_offset(&delivery) else { continue };
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            if offset >= before {
                break;
            }
            first_seen.get_or_insert(offset);
            if let Some(entry) = into_entry(delivery, offset, max_bytes) {
                held += entry.frame.text().len();
                entries.push_back(entry);
                // Over the budget: the oldest go (the page keeps the newest), but never the last.
                while held > budget && entries.len() > 1 {
                    if let Some(old) = entries.pop_front() {
                        held -= old.frame.text().len();
                        dropped = true;
                    }
                }
            }
            if offset + 1 >= before {
                break;
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        // Retention may have removed what came before `start`: then the broker starts later.
        let older_exist = start > 0 && first_seen == Some(start);
        Ok::<_, lapin::Error>((Vec::from(entries), older_exist, dropped))
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(result) => result.map_err(|e| format!("reading the history stream: {e}")),
        Err(_) => Err("reading the history stream took too long".into()),
    }
}

/// Finds the offset of the message `id`, older than offset `until` (the window's oldest), by
/// reading the stream from a second before the time in its ULID up to `until`, or up to the
/// first message published well after that time. `None`: not an
/// id of ours, or no longer in the stream. A read that does not finish in time is an error.
pub(super) async fn locate(
    connection: &Connection,
    stream: &str,
    max_bytes: usize,
    id: &str,
    until: u64,
) -> Result<Option<u64>, String> {
    let Ok(ulid) = ulid::Ulid::from_string(id) else { return Ok(None) };
    let millis = ulid.timestamp_ms();
    let read = async {
        let channel = connection.create_channel().await?;
        let from = AMQPValue::Timestamp((millis / 1000).saturating_sub(1));
        let mut consumer = consume(&channel, stream, from).await?;
        let mut found = None;
        while let Some(delivery) = consumer.next().await.transpose()? {
            let Some(offset) = stream_offset(&delivery) else { continue };
            let _ = delivery.acker.ack(BasicAckOptions::default()).now_or_never();
            if offset >= until {
                break; // From here on the window has it all, and it was not there.
            }
            // Past the id's time (and any clock skew between servers): it is not further on.
            // This bounds the read for an id older than the stream, whatever the stream holds.
            // Only the publisher's own timestamp counts (ours, and most services', set it).
            let published_ms = delivery.properties.timestamp().map(|secs| secs.saturating_mul(1000));
            if published_ms.is_some_and(|ms| ms > millis.saturating_add(LOCATE_SLACK_MS)) {
                break;
            }
            let Some(entry) = into_entry(delivery, offset, max_bytes) else { continue };
            // The random part too: another service's message without a timestamp has the time
            // of whoever read it in its id.
            let same_random = ulid::Ulid::from_string(&entry.id).is_ok_and(|u| u.random() == ulid.random());
            if &*entry.id == id || same_random {
                found = Some(offset);
                break;
            }
        }
        let _ = channel.close(200, "OK".into()).await;
        Ok::<_, lapin::Error>(found)
    };
    match tokio::time::timeout(READ_TIMEOUT, read).await {
        Ok(result) => result.map_err(|e| format!("reading the history stream: {e}")),
        Err(_) => Err("finding a message in the history stream took too long".into()),
    }
}

async fn consume(channel: &Channel, stream: &str, offset: AMQPValue) -> Result<Consumer, lapin::Error> {
    channel.basic_qos(STREAM_PREFETCH, BasicQosOptions { global: false }).await?;
    let mut arguments = FieldTable::default();
    arguments.insert("x-stream-offset".into(), offset);
    channel
        .basic_consume(stream.into(), ShortString::from(""), BasicConsumeOptions::default(), arguments)
        .await
}

fn offset_value(offset: u64) -> AMQPValue {
    AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX))
}

/// The `x-stream-offset` header RabbitMQ puts on every delivery from a stream.
fn stream_offset(delivery: &Delivery) -> Option<u64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get("x-stream-offset")? {
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        _ => None,
    }
}

fn is_marker(delivery: &Delivery) -> bool {
    delivery.properties.headers().as_ref().is_some_and(|h| h.inner().contains_key(MARKER_HEADER))
}

/// A window entry for one delivery from the stream; `None` for a marker, or for a message too
/// large for a browser (sessions skip those too).
fn into_entry(delivery: Delivery, offset: u64, max_bytes: usize) -> Option<NewEntry> {
    if is_marker(&delivery) || delivery.data.len() > max_bytes {
        return None;
    }
    let Delivery { data, properties, .. } = delivery;
    let (frame, envelope) = decode(data, &properties);
    Some(NewEntry {
        id: envelope.id.as_str().into(),
        ts_millis: envelope.ts_millis(),
        offset: Some(offset),
        frame,
    })
}
