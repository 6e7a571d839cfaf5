//! The publishers: `POST /messages` from keep-alive HTTP clients, or a lapin publisher in
//! confirm mode straight into the exchange; paced or as fast as they are confirmed, with what
//! was accepted recorded so that only accepted messages count as lost.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use lapin::{
    BasicProperties, Channel, Connection, ExchangeKind,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions},
    types::FieldTable,
};
use serde_json::json;
use tokio::sync::Semaphore;

use crate::{
    AMQP_IN_FLIGHT, HTTP_BURST_STREAMS, HTTP_STREAMS, STEP_TIMEOUT,
    broker::connect_amqp,
    message::{envelope_json, message_text, now_ns},
    plan::Load,
};

#[derive(Default)]
pub struct PublishStats {
    pub ok: u32,
    pub failed: u32,
    /// One bit per message the broker confirmed (AMQP) or the app answered 202 for (HTTP):
    /// those must reach every receiver. A failed one may or may not have been routed.
    pub acked: Vec<u64>,
    /// The first error of each kind, with its count.
    pub errors: BTreeMap<String, u32>,
    /// Send time of the first message, and of the last.
    pub first_ns: u64,
    pub last_ns: u64,
    /// Publish to 202 (HTTP) or to the publisher confirm (AMQP).
    pub acked_us: Vec<u32>,
}

impl PublishStats {
    pub fn new(messages: u32) -> Self {
        Self { acked: vec![0; (messages as usize).div_ceil(64)], ..Self::default() }
    }

    pub fn record(&mut self, seq: u32, sent_ns: u64, result: Result<(), String>) {
        self.first_ns = if self.first_ns == 0 { sent_ns } else { self.first_ns.min(sent_ns) };
        self.last_ns = self.last_ns.max(sent_ns);
        match result {
            Ok(()) => {
                self.ok += 1;
                self.acked[seq as usize / 64] |= 1 << (seq % 64);
                let us = now_ns().saturating_sub(sent_ns) / 1000;
                self.acked_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Err(e) => {
                self.failed += 1;
                *self.errors.entry(e).or_insert(0) += 1;
            }
        }
    }

    pub fn achieved_rate(&self) -> f64 {
        let secs = self.last_ns.saturating_sub(self.first_ns) as f64 / 1e9;
        if secs > 0.0 { f64::from(self.ok + self.failed - 1) / secs } else { 0.0 }
    }
}

/// When message `i` is due: `start + i / rate` (all at once when the rate is 0).
pub fn due(start: tokio::time::Instant, rate: f64, i: u32) -> tokio::time::Instant {
    if rate == 0.0 { start } else { start + Duration::from_secs_f64(f64::from(i) / rate) }
}

#[derive(Clone)]
pub enum Publisher {
    /// `POST /messages` from `HTTP_STREAMS` keep-alive clients (`HTTP_BURST_STREAMS` unpaced).
    Http { client: reqwest::Client, url: String },
    /// Straight into the exchange, confirm mode, one channel.
    Amqp { channel: Channel, exchange: String },
}

impl Publisher {
    /// Publishing streams: the unit within which order is guaranteed. The burst and the target
    /// phase get as many HTTP clients as the AMQP publisher has unconfirmed publishes.
    pub fn streams(&self, load: Load, messages: u32) -> u32 {
        match (self, load) {
            (Self::Http { .. }, Load::Steady) => HTTP_STREAMS.min(messages),
            (Self::Http { .. }, Load::Burst | Load::Target) => HTTP_BURST_STREAMS.min(messages),
            (Self::Amqp { .. }, _) => 1,
        }
    }

    pub async fn publish(&self, tag: u8, load: Load, messages: u32, rate: f64) -> PublishStats {
        let start = tokio::time::Instant::now() + Duration::from_millis(20);
        let stats = Arc::new(Mutex::new(PublishStats::new(messages)));
        match self {
            Self::Http { client, url } => {
                // Stream `s` sends messages s, s + 16, s + 32... each after the previous one's
                // 202, each no earlier than its due time.
                let streams = self.streams(load, messages);
                let workers: Vec<_> = (0..streams)
                    .map(|s| {
                        let (client, url, stats) = (client.clone(), url.clone(), stats.clone());
                        tokio::spawn(async move {
                            for i in (s..messages).step_by(streams as usize) {
                                tokio::time::sleep_until(due(start, rate, i)).await;
                                let sent = now_ns();
                                let body = json!({ "text": message_text(tag, i, sent) }).to_string();
                                let request = client
                                    .post(&url)
                                    .header("content-type", "application/json")
                                    .body(body)
                                    .timeout(STEP_TIMEOUT)
                                    .send();
                                let result = match request.await {
                                    Ok(r) if r.status() == 202 => Ok(()),
                                    Ok(r) => Err(format!("HTTP {}", r.status())),
                                    Err(e) => Err(e.to_string()),
                                };
                                stats.lock().unwrap().record(i, sent, result);
                            }
                        })
                    })
                    .collect();
                futures_util::future::join_all(workers).await;
            }
            Self::Amqp { channel, exchange } => {
                let window = Arc::new(Semaphore::new(AMQP_IN_FLIGHT));
                for i in 0..messages {
                    tokio::time::sleep_until(due(start, rate, i)).await;
                    let permit = window.clone().acquire_owned().await.expect("semaphore open");
                    let sent = now_ns();
                    let (id, body) = envelope_json(&message_text(tag, i, sent));
                    let properties = BasicProperties::default()
                        .with_content_type("application/json".into())
                        .with_message_id(id.into())
                        .with_timestamp(sent / 1_000_000_000)
                        .with_app_id("fanout-bench".into())
                        .with_delivery_mode(2);
                    let options = BasicPublishOptions::default();
                    let published = channel.basic_publish(
                        exchange.as_str().into(),
                        "".into(),
                        options,
                        body.as_bytes(),
                        properties,
                    );
                    match published.await {
                        Ok(confirm) => {
                            let stats = stats.clone();
                            tokio::spawn(async move {
                                let result = match tokio::time::timeout(STEP_TIMEOUT, confirm).await {
                                    Ok(Ok(lapin::Confirmation::Ack(_))) => Ok(()),
                                    Ok(Ok(other)) => Err(format!("not acked: {other:?}")),
                                    Ok(Err(e)) => Err(e.to_string()),
                                    Err(_) => Err("no confirm within 30 s".into()),
                                };
                                stats.lock().unwrap().record(i, sent, result);
                                drop(permit);
                            });
                        }
                        Err(e) => stats.lock().unwrap().record(i, sent, Err(e.to_string())),
                    }
                }
                // Every confirm is in when the whole window is free again.
                let all = window.acquire_many(AMQP_IN_FLIGHT as u32);
                let _ = tokio::time::timeout(STEP_TIMEOUT + Duration::from_secs(1), all).await;
            }
        }
        std::mem::take(&mut *stats.lock().unwrap())
    }
}

/// A publisher connection in confirm mode, declaring `exchange` like the app does.
pub async fn amqp_publisher(name: &str, exchange: &str) -> (Connection, Channel) {
    let connection = connect_amqp(name).await;
    let channel = connection.create_channel().await.expect("a channel");
    channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm.select");
    let options = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(exchange.into(), ExchangeKind::Fanout, options, FieldTable::default())
        .await
        .expect("declare the exchange");
    (connection, channel)
}
