//! Counters, gauges and latency histograms, served at `/metrics` in the Prometheus text format
//! (version 0.0.4), encoded by `prometheus-client`.
//!
//! Each [`Metrics`] has its own [`Registry`] rather than a global recorder, so that each
//! [`crate::app::Application`] (several run in one test process) has its own figures. The
//! counters and gauges are plain atomics that the bus and the HTTP handlers move directly (the
//! fields of [`Figures`], reached through `Deref`); a [`Collector`] reads them at scrape time.
//! The histograms are `prometheus-client`'s own.

use std::{
    collections::BTreeMap,
    ops::Deref,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge, histogram::Histogram},
    registry::Registry,
};
use serde::Deserialize;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Upper bounds, in seconds, of the publish latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds, in seconds, of the delivery latency buckets. The publish time is an envelope's
/// `ts`, in whole milliseconds, so nothing finer than a few milliseconds means anything; the top
/// buckets catch deliveries held up by a broker outage.
const DELIVERY_BUCKETS: [f64; 14] =
    [0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// Upper bounds, in seconds, of the session duration buckets: a second to a day.
const SESSION_BUCKETS: [f64; 12] =
    [1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0];

/// One message frame in this many, per session, has its delivery latency measured.
pub const DELIVERY_SAMPLE: u32 = 16;

/// Every figure the process exports.
#[derive(Debug)]
pub struct Metrics {
    figures: Arc<Figures>,
    registry: Registry,
    publish_latency: Histogram,
    delivery_latency: Histogram,
    session_duration: Histogram,
}

/// The counters and gauges: atomics, moved where things happen and read at each scrape.
#[derive(Debug, Default)]
pub struct Figures {
    pub sessions_open: AtomicI64,
    pub sessions_total: AtomicU64,
    pub published: AtomicU64,
    pub publish_failures: AtomicU64,
    pub delivered: AtomicU64,
    pub skipped: AtomicU64,
    pub queue_overflow: AtomicU64,
    pub rejected_frames: AtomicU64,
    pub slow_sessions_closed: AtomicU64,
    pub broker_connects: AtomicU64,
    pub broker_disconnects: AtomicU64,
    pub broker_reconnects: AtomicU64,
    pub broker_ready: AtomicI64,
    /// Milliseconds from noticing the last broker loss to being ready again.
    pub broker_last_outage_ms: AtomicU64,
    pub resubscribes: AtomicU64,
    /// Consumer connections (the ones that carry sessions) up now, and lost so far.
    pub consumer_connections_up: AtomicI64,
    pub consumer_connection_losses: AtomicU64,
    /// Publishes sent again on a new link because the confirm was lost with the old one.
    pub republished: AtomicU64,
    /// Copies a session (or the process queue) received twice and dropped (a republish).
    pub duplicates_dropped: AtomicU64,
    /// Requests refused for an `Authorization` header that is not a valid API key.
    auth_failures: AtomicU64,
    /// Browser requests refused for their `Origin`.
    origins_refused: AtomicU64,
    /// Per service key name: messages published, and refused (rate, bad message, broker).
    /// Only names of configured keys get here, so the label set is bounded.
    by_key: Mutex<BTreeMap<Arc<str>, KeyCounts>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyCounts {
    published: u64,
    refused: u64,
}

impl Deref for Metrics {
    type Target = Figures;

    fn deref(&self) -> &Figures {
        &self.figures
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let figures = Arc::new(Figures::default());
        let publish_latency = Histogram::new(LATENCY_BUCKETS);
        let delivery_latency = Histogram::new(DELIVERY_BUCKETS);
        let session_duration = Histogram::new(SESSION_BUCKETS);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(figures.clone())));
        registry.register(
            "fanout_chat_publish_duration_seconds",
            "time from publish to broker confirmation",
            publish_latency.clone(),
        );
        registry.register(
            "fanout_chat_delivery_latency_seconds",
            format!(
                "time from a message's ts (when a server accepted it) to its WebSocket frame being \
                 flushed; sampled, one message frame in {DELIVERY_SAMPLE} per session, as reading ts \
                 parses the frame's JSON on the hottest path; messages older than the session (a \
                 resume's replay) are not counted"
            ),
            delivery_latency.clone(),
        );
        registry.register(
            "fanout_chat_session_duration_seconds",
            "how long WebSocket sessions lasted, observed as each ends",
            session_duration.clone(),
        );
        Self { figures, registry, publish_latency, delivery_latency, session_duration }
    }
}

impl Metrics {
    /// Records how long the broker took to confirm one publish.
    pub fn observe_publish(&self, took: Duration) {
        self.publish_latency.observe(took.as_secs_f64());
    }

    /// Records how long a WebSocket session lasted, as it ends.
    pub fn observe_session(&self, lasted: Duration) {
        self.session_duration.observe(lasted.as_secs_f64());
    }

    pub fn count_auth_failure(&self) {
        self.auth_failures.fetch_add(1, Relaxed);
    }

    pub fn count_origin_refused(&self) {
        self.origins_refused.fetch_add(1, Relaxed);
    }

    /// Counts one message of the service key `name`: published, or refused.
    pub fn count_key(&self, name: &Arc<str>, published: bool) {
        // A poisoned lock only means a panic elsewhere mid-count; the counts are still usable.
        let mut by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        let counts = by_key.entry(name.clone()).or_default();
        if published {
            counts.published += 1;
        } else {
            counts.refused += 1;
        }
    }

    /// The Prometheus text exposition (version 0.0.4) of every figure.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8192);
        // Writing to a String cannot fail, and neither can the collector.
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Counters: the name each is exposed under, its help, and its atomic. The encoder adds the
/// `_total` of a counter itself, so it is taken off the name first.
type Reading = fn(&Figures) -> &AtomicU64;
const COUNTERS: [(&str, &str, Reading); 17] = [
    (
        "fanout_chat_auth_failures_total",
        "requests refused (401) for an Authorization header that is not a valid API key",
        |f| &f.auth_failures,
    ),
    (
        "fanout_chat_origin_refused_total",
        "browser requests refused (403) for an Origin that is not allowed",
        |f| &f.origins_refused,
    ),
    (
        "fanout_chat_queue_overflow_total",
        "messages dropped from full session queues (x-max-length), each shown to its session as a gap",
        |f| &f.queue_overflow,
    ),
    ("fanout_chat_sessions_total", "WebSocket sessions opened", |f| &f.sessions_total),
    ("fanout_chat_messages_published_total", "messages published and confirmed by the bus", |f| &f.published),
    (
        "fanout_chat_publish_failures_total",
        "publishes refused with 503 (broker down, nack or timeout)",
        |f| &f.publish_failures,
    ),
    ("fanout_chat_messages_delivered_total", "message frames written to WebSocket sessions", |f| {
        &f.delivered
    }),
    (
        "fanout_chat_messages_skipped_total",
        "messages a session fell behind the in-process channel by (embedded bus, process mode; replayed from the history window while it has them), or too large to send",
        |f| &f.skipped,
    ),
    ("fanout_chat_rejected_frames_total", "WebSocket frames refused (binary, oversized, invalid)", |f| {
        &f.rejected_frames
    }),
    (
        "fanout_chat_slow_sessions_closed_total",
        "sessions closed because their browser stopped reading",
        |f| &f.slow_sessions_closed,
    ),
    ("fanout_chat_broker_connects_total", "successful broker (re)connections", |f| &f.broker_connects),
    ("fanout_chat_broker_disconnects_total", "broker connections lost", |f| &f.broker_disconnects),
    ("fanout_chat_broker_reconnects_total", "broker connections re-established after a loss", |f| {
        &f.broker_reconnects
    }),
    (
        "fanout_chat_session_resubscribes_total",
        "session queues and consumers re-created after a broker or channel failure",
        |f| &f.resubscribes,
    ),
    (
        "fanout_chat_consumer_connection_losses_total",
        "consumer connections lost (only their sessions are interrupted)",
        |f| &f.consumer_connection_losses,
    ),
    (
        "fanout_chat_republished_total",
        "publishes sent again, with the same message id, after their connection was lost before the confirm",
        |f| &f.republished,
    ),
    (
        "fanout_chat_duplicates_dropped_total",
        "copies of a message id already delivered, dropped instead of shown twice",
        |f| &f.duplicates_dropped,
    ),
];

type GaugeReading = fn(&Figures) -> &AtomicI64;
const GAUGES: [(&str, &str, GaugeReading); 3] = [
    ("fanout_chat_sessions_open", "WebSocket sessions open now", |f| &f.sessions_open),
    ("fanout_chat_broker_ready", "1 when the bus can publish, else 0", |f| &f.broker_ready),
    ("fanout_chat_consumer_connections_up", "broker connections carrying sessions that are up now", |f| {
        &f.consumer_connections_up
    }),
];

/// Reads the atomics of [`Figures`] at each scrape.
#[derive(Debug)]
struct Scrape(Arc<Figures>);

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let figures = &*self.0;
        for (name, help, read) in COUNTERS {
            let family = name.strip_suffix("_total").unwrap_or(name);
            let counter = ConstCounter::new(read(figures).load(Relaxed));
            counter.encode(encoder.encode_descriptor(family, help, None, MetricType::Counter)?)?;
        }
        let by_key = figures.by_key.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut family = encoder.encode_descriptor(
            "fanout_chat_key_messages",
            "messages posted with a service API key, by key name: published or refused",
            None,
            MetricType::Counter,
        )?;
        for (key, counts) in &by_key {
            for (result, count) in [("published", counts.published), ("refused", counts.refused)] {
                let labels = [("key", &**key), ("result", result)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        for (name, help, read) in GAUGES {
            let gauge = ConstGauge::new(read(figures).load(Relaxed));
            gauge.encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        let outage = ConstGauge::new(figures.broker_last_outage_ms.load(Relaxed) as f64 / 1e3);
        outage.encode(encoder.encode_descriptor(
            "fanout_chat_broker_last_outage_seconds",
            "time from losing the broker link to being ready again, for the last loss",
            None,
            MetricType::Gauge,
        )?)
    }
}

/// Times the delivery of one message frame in [`DELIVERY_SAMPLE`] of a WebSocket session, from
/// its publish (the envelope's `ts`) to its frame being flushed to the socket.
///
/// Reading `ts` means parsing the frame's JSON, which the delivery path otherwise never does,
/// so only a sample is read: per frame the cost is a counter. Frames of messages published
/// before the session opened (what a resuming session is replayed) are not timed: their wait
/// is the browser's absence, not delivery.
#[derive(Debug)]
pub struct DeliveryClock {
    opened: OffsetDateTime,
    frames: u32,
    /// The publish time of the sampled frame written and not yet flushed.
    pending: Option<OffsetDateTime>,
}

/// The fields of an envelope the clock reads.
#[derive(Deserialize)]
struct Stamp<'a> {
    ts: &'a str,
}

impl DeliveryClock {
    /// A clock for a session opening now (before its subscription is made).
    pub fn new() -> Self {
        let now = OffsetDateTime::now_utc();
        // In whole milliseconds, as `ts` is.
        let opened = now.replace_millisecond(now.millisecond()).unwrap_or(now);
        Self { opened, frames: 0, pending: None }
    }

    /// Called with each message frame before it is written: reads the publish time of one in
    /// [`DELIVERY_SAMPLE`], starting with the first (at most one per flush: in a burst the first
    /// of a batch is timed).
    pub fn frame(&mut self, text: &str) {
        let sampled = self.frames.is_multiple_of(DELIVERY_SAMPLE);
        self.frames = self.frames.wrapping_add(1);
        if !sampled || self.pending.is_some() {
            return;
        }
        self.pending = serde_json::from_str::<Stamp<'_>>(text)
            .ok()
            .and_then(|stamp| OffsetDateTime::parse(stamp.ts, &Rfc3339).ok())
            .filter(|published| *published >= self.opened);
    }

    /// Called once the frames written so far are flushed: records the sampled one, if any.
    pub fn flushed(&mut self, metrics: &Metrics) {
        if let Some(published) = self.pending.take() {
            // Another replica's clock may be a little ahead: a negative wait counts as none.
            let waited = (OffsetDateTime::now_utc() - published).as_seconds_f64().max(0.0);
            metrics.delivery_latency.observe(waited);
        }
    }
}

impl Default for DeliveryClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative() {
        let m = Metrics::default();
        m.observe_publish(Duration::from_micros(300));
        m.observe_publish(Duration::from_millis(3));
        let text = m.render();
        assert!(text.contains("fanout_chat_publish_duration_seconds_bucket{le=\"0.0005\"} 1"), "{text}");
        assert!(text.contains("fanout_chat_publish_duration_seconds_bucket{le=\"0.005\"} 2"), "{text}");
        assert!(text.contains("fanout_chat_publish_duration_seconds_bucket{le=\"+Inf\"} 2"), "{text}");
        assert!(text.contains("fanout_chat_publish_duration_seconds_count 2"), "{text}");
    }

    #[test]
    fn counters_keep_their_names_and_types() {
        let m = Metrics::default();
        m.sessions_total.fetch_add(3, Relaxed);
        m.sessions_open.fetch_add(2, Relaxed);
        m.broker_last_outage_ms.store(1500, Relaxed);
        let text = m.render();
        for (name, _, _) in COUNTERS {
            assert!(name.ends_with("_total"), "{name}");
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}:\n{text}");
        }
        assert!(text.contains("# TYPE fanout_chat_key_messages_total counter\n"), "{text}");
        assert!(text.contains("\nfanout_chat_sessions_total 3\n"), "{text}");
        assert!(text.contains("\nfanout_chat_sessions_open 2\n"), "{text}");
        assert!(text.contains("\nfanout_chat_broker_last_outage_seconds 1.5\n"), "{text}");
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn messages_of_each_service_key_are_counted_under_its_name() {
        let m = Metrics::default();
        let billing: Arc<str> = "billing".into();
        m.count_key(&billing, true);
        m.count_key(&billing, true);
        m.count_key(&billing, false);
        let text = m.render();
        assert!(
            text.contains("fanout_chat_key_messages_total{key=\"billing\",result=\"published\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("fanout_chat_key_messages_total{key=\"billing\",result=\"refused\"} 1"),
            "{text}"
        );
    }

    fn sample(m: &Metrics, name: &str) -> f64 {
        let text = m.render();
        let value = text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' '));
        value.and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    }

    fn frame_published(at: OffsetDateTime) -> String {
        let ts = crate::chat::ts_from_millis((at.unix_timestamp_nanos() / 1_000_000) as i64);
        format!(r#"{{"id":"01M94N6EXYPF95DD9R8TWWMBCA","text":"\"ts\":\"1970\"","ts":"{ts}"}}"#)
    }

    #[test]
    fn one_frame_in_the_sample_is_timed_and_replays_are_not() {
        let m = Metrics::default();
        let mut clock = DeliveryClock::new();
        clock.opened -= time::Duration::seconds(10);
        // Published before the session opened: a replay, not timed.
        clock.frame(&frame_published(clock.opened - time::Duration::seconds(60)));
        clock.flushed(&m);
        // Skipped by the sample.
        for _ in 1..DELIVERY_SAMPLE {
            clock.frame(&frame_published(OffsetDateTime::now_utc()));
            clock.flushed(&m);
        }
        assert_eq!(sample(&m, "fanout_chat_delivery_latency_seconds_count"), 0.0);
        clock.frame(&frame_published(OffsetDateTime::now_utc() - time::Duration::milliseconds(250)));
        clock.flushed(&m);
        assert_eq!(sample(&m, "fanout_chat_delivery_latency_seconds_count"), 1.0);
        let waited = sample(&m, "fanout_chat_delivery_latency_seconds_sum");
        assert!((0.24..5.0).contains(&waited), "{waited}");
        // Not an envelope: nothing timed, nothing broken.
        for _ in 0..DELIVERY_SAMPLE {
            clock.frame("plain");
            clock.flushed(&m);
        }
        assert_eq!(sample(&m, "fanout_chat_delivery_latency_seconds_count"), 1.0);
    }
}
