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

/// Upper bounds, in seconds, of the publish latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Upper bounds, in seconds, of the session duration buckets: a second to a day.
const SESSION_BUCKETS: [f64; 12] =
    [1.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0];

/// Every figure the process exports.
#[derive(Debug)]
pub struct Metrics {
    figures: Arc<Figures>,
    registry: Registry,
    publish_latency: Histogram,
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
        let session_duration = Histogram::new(SESSION_BUCKETS);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Scrape(figures.clone())));
        registry.register(
            "fanout_chat_publish_duration_seconds",
            "time from publish to broker confirmation",
            publish_latency.clone(),
        );
        registry.register(
            "fanout_chat_session_duration_seconds",
            "how long WebSocket sessions lasted, observed as each ends",
            session_duration.clone(),
        );
        Self { figures, registry, publish_latency, session_duration }
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
        "messages a session skipped: it fell behind (embedded bus) or the message was too large",
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
}
