//! Counters and a latency histogram, rendered in the Prometheus text format at `/metrics`.
//!
//! Hand-rolled on atomics rather than a global recorder so that each [`crate::app::Application`]
//! (several run in one test process) has its own figures.

use std::{
    collections::BTreeMap,
    fmt::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

/// Upper bounds, in seconds, of the publish latency histogram buckets.
const LATENCY_BUCKETS: [f64; 12] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// Every figure the process exports.
#[derive(Debug, Default)]
pub struct Metrics {
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
    publish_latency: Histogram,
}

#[derive(Debug, Default, Clone, Copy)]
struct KeyCounts {
    published: u64,
    refused: u64,
}

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Metrics {
    /// Records how long the broker took to confirm one publish.
    pub fn observe_publish(&self, took: Duration) {
        let h = &self.publish_latency;
        let secs = took.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS.iter().position(|&b| secs <= b) {
            h.buckets[i].fetch_add(1, Relaxed);
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_micros.fetch_add(took.as_micros() as u64, Relaxed);
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

    /// The Prometheus text exposition of every figure.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let counters: [(&str, &str, &AtomicU64); 17] = [
            (
                "fanout_chat_auth_failures_total",
                "requests refused (401) for an Authorization header that is not a valid API key",
                &self.auth_failures,
            ),
            (
                "fanout_chat_origin_refused_total",
                "browser requests refused (403) for an Origin that is not allowed",
                &self.origins_refused,
            ),
            (
                "fanout_chat_queue_overflow_total",
                "messages dropped from full session queues (x-max-length), each shown to its session as a gap",
                &self.queue_overflow,
            ),
            ("fanout_chat_sessions_total", "WebSocket sessions opened", &self.sessions_total),
            (
                "fanout_chat_messages_published_total",
                "messages published and confirmed by the bus",
                &self.published,
            ),
            (
                "fanout_chat_publish_failures_total",
                "publishes refused with 503 (broker down, nack or timeout)",
                &self.publish_failures,
            ),
            (
                "fanout_chat_messages_delivered_total",
                "message frames written to WebSocket sessions",
                &self.delivered,
            ),
            (
                "fanout_chat_messages_skipped_total",
                "messages a session skipped: it fell behind (embedded bus) or the message was too large",
                &self.skipped,
            ),
            (
                "fanout_chat_rejected_frames_total",
                "WebSocket frames refused (binary, oversized, invalid)",
                &self.rejected_frames,
            ),
            (
                "fanout_chat_slow_sessions_closed_total",
                "sessions closed because their browser stopped reading",
                &self.slow_sessions_closed,
            ),
            ("fanout_chat_broker_connects_total", "successful broker (re)connections", &self.broker_connects),
            ("fanout_chat_broker_disconnects_total", "broker connections lost", &self.broker_disconnects),
            (
                "fanout_chat_broker_reconnects_total",
                "broker connections re-established after a loss",
                &self.broker_reconnects,
            ),
            (
                "fanout_chat_session_resubscribes_total",
                "session queues and consumers re-created after a broker or channel failure",
                &self.resubscribes,
            ),
            (
                "fanout_chat_consumer_connection_losses_total",
                "consumer connections lost (only their sessions are interrupted)",
                &self.consumer_connection_losses,
            ),
            (
                "fanout_chat_republished_total",
                "publishes sent again, with the same message id, after their connection was lost before the confirm",
                &self.republished,
            ),
            (
                "fanout_chat_duplicates_dropped_total",
                "copies of a message id already delivered, dropped instead of shown twice",
                &self.duplicates_dropped,
            ),
        ];
        for (name, help, value) in counters {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", value.load(Relaxed));
        }
        let name = "fanout_chat_key_messages_total";
        let _ = writeln!(
            out,
            "# HELP {name} messages posted with a service API key, by key name: published or refused\n# TYPE {name} counter"
        );
        let by_key = self.by_key.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (key, counts) in by_key {
            let _ = writeln!(out, "{name}{{key=\"{key}\",result=\"published\"}} {}", counts.published);
            let _ = writeln!(out, "{name}{{key=\"{key}\",result=\"refused\"}} {}", counts.refused);
        }
        let gauges: [(&str, &str, &AtomicI64); 3] = [
            ("fanout_chat_sessions_open", "WebSocket sessions open now", &self.sessions_open),
            ("fanout_chat_broker_ready", "1 when the bus can publish, else 0", &self.broker_ready),
            (
                "fanout_chat_consumer_connections_up",
                "broker connections carrying sessions that are up now",
                &self.consumer_connections_up,
            ),
        ];
        for (name, help, value) in gauges {
            let _ =
                writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {}", value.load(Relaxed));
        }
        let name = "fanout_chat_broker_last_outage_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} time from losing the broker link to being ready again, for the last loss\n# TYPE {name} gauge\n{name} {}",
            self.broker_last_outage_ms.load(Relaxed) as f64 / 1e3
        );
        let name = "fanout_chat_publish_duration_seconds";
        let _ =
            writeln!(out, "# HELP {name} time from publish to broker confirmation\n# TYPE {name} histogram");
        let h = &self.publish_latency;
        let mut cumulative = 0;
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
            cumulative += bucket.load(Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = h.count.load(Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", h.sum_micros.load(Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
        out
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
        assert!(text.contains("fanout_chat_publish_duration_seconds_count 2"), "{text}");
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
