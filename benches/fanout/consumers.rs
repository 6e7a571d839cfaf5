//! The raw run's receivers: lapin consumers laid out like the app's sessions (4 connections,
//! 32 per channel, the app's prefetch, manual acks, each its own queue with x-max-length 1000
//! drop-head), and the follower of the history stream the app keeps on every exchange.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use futures_util::{StreamExt, stream};
use lapin::{
    Connection,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    CONSUMER_CONNECTIONS, HISTORY_MAX_AGE, HISTORY_MAX_BYTES, HISTORY_PREFETCH, HISTORY_SEGMENT_BYTES,
    OPEN_CONCURRENCY, PREFETCH, QUEUE_MAX_LENGTH, SESSIONS_PER_CHANNEL, STEP_TIMEOUT,
    broker::connect_amqp,
    message::now_ns,
    receivers::{Fleet, Opened, Receiver, Totals},
};

/// The raw run's consumer connections, as many as the app's. Opened before the broker's RSS is
/// read, so that what the opening adds is the queues (with their consumers and channels), as
/// for the app, whose connections are open before its first session.
pub async fn connect_raw(run: &str) -> Vec<Connection> {
    let mut connections = Vec::new();
    for c in 0..CONSUMER_CONNECTIONS {
        connections.push(connect_amqp(&format!("fanout-bench {run} raw consume-{c}")).await);
    }
    connections
}

/// N consumers on `connections`: each its own exclusive, auto-delete queue bound to `exchange`,
/// 32 per channel (per-consumer prefetch 8), channels spread over the connections, manual acks.
pub async fn open_raw_consumers(
    connections: &[Connection],
    exchange: &str,
    run: &str,
    n: usize,
) -> (Fleet, BTreeMap<String, usize>) {
    let mut channels = Vec::new();
    for c in 0..n.div_ceil(SESSIONS_PER_CHANNEL) {
        let channel = connections[c % connections.len()].create_channel().await.expect("a channel");
        channel.basic_qos(PREFETCH, BasicQosOptions { global: false }).await.expect("basic.qos");
        channels.push(channel);
    }
    let totals = Arc::new(Totals::default());
    let cancel = CancellationToken::new();
    let opened: Vec<Opened> = stream::iter(0..n)
        .map(|i| {
            let channel = channels[i / SESSIONS_PER_CHANNEL].clone();
            let (totals, cancel) = (totals.clone(), cancel.clone());
            let queue = format!("fanout-bench.{run}.n{n}.raw.{i}");
            async move {
                let mut arguments = FieldTable::default();
                arguments.insert("x-max-length".into(), AMQPValue::LongInt(QUEUE_MAX_LENGTH));
                arguments.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
                let declare = async {
                    let options =
                        QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
                    channel.queue_declare(queue.as_str().into(), options, arguments).await?;
                    let bind = QueueBindOptions::default();
                    channel
                        .queue_bind(
                            queue.as_str().into(),
                            exchange.into(),
                            "".into(),
                            bind,
                            FieldTable::default(),
                        )
                        .await?;
                    let consume = BasicConsumeOptions::default();
                    channel
                        .basic_consume(queue.as_str().into(), "".into(), consume, FieldTable::default())
                        .await
                };
                let consumer = tokio::time::timeout(STEP_TIMEOUT, declare)
                    .await
                    .map_err(|_| "declare/bind/consume timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
                let receiver = Receiver::new(totals);
                let task = tokio::spawn(read_raw(consumer, receiver.clone(), cancel));
                Ok((receiver, task))
            }
        })
        .buffer_unordered(OPEN_CONCURRENCY)
        .collect()
        .await;
    Fleet::gather(opened, totals, cancel)
}

/// The app's history stream, on the raw run's exchange: `<exchange>.history`, declared with the
/// app's arguments (durable, 7 days, 100 MB in 25 MB segments) on `declarer`, bound to the
/// exchange, and followed from its end on `follower` by one consumer with the app's prefetch
/// that acks every delivery, as the app's follower does (src/bus/rabbit/stream.rs). So that
/// each raw publish is written to the stream too and read back once, as each app publish is.
/// Returns the follower's task (it ends with `cancel`) and its count of deliveries.
pub async fn follow_raw_history(
    declarer: &Connection,
    follower: &Connection,
    exchange: &str,
    stream_name: &str,
    cancel: CancellationToken,
) -> (JoinHandle<()>, Arc<AtomicU64>) {
    let mut arguments = FieldTable::default();
    arguments.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
    arguments.insert("x-max-age".into(), AMQPValue::LongString(HISTORY_MAX_AGE.into()));
    arguments.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(HISTORY_MAX_BYTES));
    arguments.insert("x-stream-max-segment-size-bytes".into(), AMQPValue::LongLongInt(HISTORY_SEGMENT_BYTES));
    let declare = async {
        let channel = declarer.create_channel().await?;
        let options = QueueDeclareOptions { durable: true, ..Default::default() };
        channel.queue_declare(stream_name.into(), options, arguments).await?;
        let bind = QueueBindOptions::default();
        channel
            .queue_bind(stream_name.into(), exchange.into(), "".into(), bind, FieldTable::default())
            .await?;
        let _ = channel.close(200, "OK".into()).await;
        let channel = follower.create_channel().await?;
        channel.basic_qos(HISTORY_PREFETCH, BasicQosOptions { global: false }).await?;
        let mut arguments = FieldTable::default();
        arguments.insert("x-stream-offset".into(), AMQPValue::LongString("next".into()));
        let consume = BasicConsumeOptions::default();
        let consumer = channel.basic_consume(stream_name.into(), "".into(), consume, arguments).await?;
        Ok::<_, lapin::Error>((channel, consumer))
    };
    let (channel, mut consumer) = tokio::time::timeout(STEP_TIMEOUT, declare)
        .await
        .expect("the history stream declared within 30 s")
        .unwrap_or_else(|e| {
            panic!("declare and follow the stream {stream_name} (RabbitMQ 3.9 or later): {e}")
        });
    let followed = Arc::new(AtomicU64::new(0));
    let count = followed.clone();
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => break,
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                        count.fetch_add(1, Relaxed);
                    }
                    Some(Err(_)) | None => break,
                },
            }
        }
        let _ = channel.close(200, "bench done".into()).await;
    });
    (task, followed)
}

/// One raw consumer: the same bookkeeping as a WebSocket session, then the ack (the app acks
/// each delivery once its frame is written).
pub async fn read_raw(mut consumer: lapin::Consumer, receiver: Arc<Receiver>, cancel: CancellationToken) {
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            delivery = consumer.next() => match delivery {
                Some(Ok(delivery)) => {
                    receiver.on_frame(std::str::from_utf8(&delivery.data).unwrap_or(""), now_ns());
                    let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                }
                Some(Err(_)) | None => {
                    receiver.totals.closed_early.fetch_add(1, Relaxed);
                    return;
                }
            },
        }
    }
}
