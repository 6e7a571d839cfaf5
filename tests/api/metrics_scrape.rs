//! `/metrics` scraped while sessions receive and services post, on RabbitMQ, and read with a
//! parser of the Prometheus text format (the `prometheus-parse` crate), not by matching lines:
//! every series must parse, carry the type its `# TYPE` line declares, and the figures must
//! agree with the traffic the test made.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering::Relaxed},
    time::Duration,
};

use fanout_chat::config::ApiKeys;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::json;

use crate::helpers::{BusKind, TestApp, spawn_app_with, test_config, within};

const SESSIONS: usize = 4;
const POSTS: usize = 40;
const BILLING_KEY: &str = "billing-5c1e0b7d93a2f468";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family `/metrics` has, with its type: those the README lists, and the rest.
const FAMILIES: [(&str, Kind); 27] = [
    ("fanout_chat_sessions_open", Kind::Gauge),
    ("fanout_chat_sessions_total", Kind::Counter),
    ("fanout_chat_messages_published_total", Kind::Counter),
    ("fanout_chat_publish_failures_total", Kind::Counter),
    ("fanout_chat_messages_delivered_total", Kind::Counter),
    ("fanout_chat_publish_duration_seconds", Kind::Histogram),
    ("fanout_chat_delivery_latency_seconds", Kind::Histogram),
    ("fanout_chat_session_duration_seconds", Kind::Histogram),
    ("fanout_chat_broker_ready", Kind::Gauge),
    ("fanout_chat_broker_connects_total", Kind::Counter),
    ("fanout_chat_broker_disconnects_total", Kind::Counter),
    ("fanout_chat_broker_reconnects_total", Kind::Counter),
    ("fanout_chat_broker_last_outage_seconds", Kind::Gauge),
    ("fanout_chat_session_resubscribes_total", Kind::Counter),
    ("fanout_chat_consumer_connections_up", Kind::Gauge),
    ("fanout_chat_consumer_connection_losses_total", Kind::Counter),
    ("fanout_chat_republished_total", Kind::Counter),
    ("fanout_chat_duplicates_dropped_total", Kind::Counter),
    ("fanout_chat_queue_overflow_total", Kind::Counter),
    ("fanout_chat_messages_skipped_total", Kind::Counter),
    ("fanout_chat_rejected_frames_total", Kind::Counter),
    ("fanout_chat_slow_sessions_closed_total", Kind::Counter),
    ("fanout_chat_history_window_messages", Kind::Gauge),
    ("fanout_chat_history_pages_in_flight_bytes", Kind::Gauge),
    ("fanout_chat_auth_failures_total", Kind::Counter),
    ("fanout_chat_origin_refused_total", Kind::Counter),
    ("fanout_chat_key_messages_total", Kind::Counter),
];

/// One scrape of `/metrics`, parsed.
struct Metrics {
    scrape: Scrape,
}

impl Metrics {
    async fn get(app: &TestApp) -> Self {
        let response = within("GET /metrics", app.http.get(app.url("/metrics")).send()).await.unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
        let text = response.text().await.unwrap();
        let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the text format parses");
        assert!(!scrape.samples.is_empty(), "{text}");
        Self { scrape }
    }

    fn samples(&self, name: &str) -> impl Iterator<Item = &Sample> {
        self.scrape.samples.iter().filter(move |s| s.metric == name)
    }

    /// The value of the one unlabelled series `name`, which must be of `kind`.
    fn value(&self, name: &str, kind: Kind) -> f64 {
        let mut samples = self.samples(name).filter(|s| s.labels.is_empty());
        let sample = samples.next().unwrap_or_else(|| panic!("no series {name}"));
        assert!(samples.next().is_none(), "{name} twice");
        match (&sample.value, kind) {
            (Value::Counter(v), Kind::Counter) | (Value::Gauge(v), Kind::Gauge) => *v,
            // prometheus-parse gives a histogram's _sum and _count untyped.
            (Value::Untyped(v), Kind::Histogram) => *v,
            (value, _) => panic!("{name} is {value:?}, not a {kind:?}"),
        }
    }

    /// A histogram's buckets (upper bound, cumulative count), sum and count, checked to be one.
    fn histogram(&self, name: &str) -> (Vec<(f64, f64)>, f64, f64) {
        let sample = self.samples(name).next().unwrap_or_else(|| panic!("no histogram {name}"));
        let Value::Histogram(buckets) = &sample.value else { panic!("{name} is {:?}", sample.value) };
        let buckets: Vec<(f64, f64)> = buckets.iter().map(|b| (b.less_than, b.count)).collect();
        let sum = self.value(&format!("{name}_sum"), Kind::Histogram);
        let count = self.value(&format!("{name}_count"), Kind::Histogram);
        assert!(buckets.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1), "{name}: {buckets:?}");
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, count)), "{name}: le=\"+Inf\" is the count");
        (buckets, sum, count)
    }
}

/// The names in the README's "Metrics" bullet of its Operations section.
fn readme_names() -> Vec<String> {
    let readme = include_str!("../../README.md");
    let start = readme.find("- **Metrics**").expect("the README's Metrics bullet");
    let bullet = &readme[start..];
    let bullet = &bullet[..bullet[2..].find("\n- ").map_or(bullet.len(), |end| end + 2)];
    let names: Vec<String> = bullet
        .split('`')
        .filter(|s| s.starts_with("fanout_chat_"))
        .map(|s| s.split('{').next().unwrap().to_owned())
        .collect();
    assert!(names.len() > 20, "{bullet}");
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_scraped_during_traffic_parse_with_every_documented_family_and_sensible_figures() {
    let mut config = test_config(BusKind::Rabbit);
    config.access.api_keys = ApiKeys::read(Some(&format!("billing:{BILLING_KEY}")), None).unwrap();
    let app = spawn_app_with(config).await;

    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        sessions.push(app.connect().await);
    }
    // One that comes and goes: a session duration to observe.
    app.connect().await.close().await;

    // Scrape over and over while the posts go on: each scrape parses, and counters only grow.
    let posting = AtomicBool::new(true);
    let post = async {
        for n in 0..POSTS {
            let request = app.http.post(app.url("/messages"));
            let request = if n % 4 == 0 {
                request.bearer_auth(BILLING_KEY).json(&json!({ "text": format!("invoice {n}") }))
            } else {
                request.json(&json!({ "text": format!("message {n}"), "user": "ada" }))
            };
            let response = within("POST /messages", request.send()).await.unwrap();
            assert_eq!(response.status(), 202);
        }
        posting.store(false, Relaxed);
    };
    let scrape = async {
        let mut scrapes = 0;
        let mut last = HashMap::new();
        while scrapes == 0 || posting.load(Relaxed) {
            let metrics = Metrics::get(&app).await;
            for name in ["fanout_chat_messages_published_total", "fanout_chat_messages_delivered_total"] {
                let value = metrics.value(name, Kind::Counter);
                let before = last.insert(name, value).unwrap_or(0.0);
                assert!(value >= before, "{name} went from {before} to {value}");
            }
            scrapes += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        scrapes
    };
    let ((), scrapes) = tokio::join!(post, scrape);
    assert!(scrapes > 1, "scraped {scrapes} times during the posts");
    for session in &mut sessions {
        for _ in 0..POSTS {
            session.next_message().await;
        }
    }

    // The last figures settle once the frames are counted and the closed session is gone.
    let metrics = within("the figures to settle", async {
        loop {
            let metrics = Metrics::get(&app).await;
            if metrics.value("fanout_chat_messages_delivered_total", Kind::Counter)
                >= (SESSIONS * POSTS) as f64
                && metrics.value("fanout_chat_sessions_open", Kind::Gauge) == SESSIONS as f64
                && metrics.histogram("fanout_chat_session_duration_seconds").2 >= 1.0
            {
                return metrics;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;

    // Every family, with its type. A `# TYPE` line that names something other than its series
    // (a counter's `_total` lost or doubled) leaves them untyped, which fails here.
    let readme = readme_names();
    for name in &readme {
        assert!(FAMILIES.iter().any(|(family, _)| family == name), "the README lists {name}, unchecked here");
    }
    for (name, kind) in FAMILIES {
        match kind {
            Kind::Histogram => {
                metrics.histogram(name);
            }
            Kind::Counter if name == "fanout_chat_key_messages_total" => {}
            kind => {
                metrics.value(name, kind);
            }
        }
        assert!(metrics.scrape.docs.contains_key(name), "{name} has no HELP");
    }
    for sample in &metrics.scrape.samples {
        if let Value::Untyped(_) = sample.value {
            let of_histogram = FAMILIES.iter().any(|(family, kind)| {
                *kind == Kind::Histogram
                    && [format!("{family}_sum"), format!("{family}_count")].contains(&sample.metric)
            });
            assert!(of_histogram, "{} has no type", sample.metric);
        }
    }

    // The figures match the traffic.
    let published = metrics.value("fanout_chat_messages_published_total", Kind::Counter);
    assert!(published >= POSTS as f64, "{published}");
    assert_eq!(metrics.value("fanout_chat_sessions_total", Kind::Counter), (SESSIONS + 1) as f64);
    assert_eq!(metrics.value("fanout_chat_broker_ready", Kind::Gauge), 1.0);
    assert!(metrics.value("fanout_chat_consumer_connections_up", Kind::Gauge) >= 1.0);
    assert_eq!(metrics.value("fanout_chat_publish_failures_total", Kind::Counter), 0.0);
    let keyed: Vec<(&str, f64)> = metrics
        .samples("fanout_chat_key_messages_total")
        .map(|s| match s.value {
            Value::Counter(v) => (s.labels.get("result").unwrap(), v),
            ref other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        metrics.samples("fanout_chat_key_messages_total").all(|s| s.labels.get("key") == Some("billing"))
    );
    assert!(keyed.contains(&("published", (POSTS / 4) as f64)), "{keyed:?}");
    assert!(keyed.contains(&("refused", 0.0)), "{keyed:?}");

    let (_, _, confirms) = metrics.histogram("fanout_chat_publish_duration_seconds");
    assert!(confirms >= POSTS as f64, "{confirms}");
    // At least the first message frame of each session is timed; deliveries on one machine take
    // nowhere near a minute.
    let (buckets, waited, timed) = metrics.histogram("fanout_chat_delivery_latency_seconds");
    assert!(timed >= SESSIONS as f64 && timed <= (SESSIONS * POSTS) as f64, "{timed}");
    assert!(waited >= 0.0 && waited / timed < 5.0, "{waited} s over {timed}");
    let under_a_minute = buckets.iter().find(|(le, _)| *le == 60.0).map(|(_, n)| *n);
    assert_eq!(under_a_minute, Some(timed), "{buckets:?}");
    let (_, lasted, ended) = metrics.histogram("fanout_chat_session_duration_seconds");
    assert_eq!(ended, 1.0, "only the brief session ended");
    assert!(lasted < 60.0, "{lasted}");

    for session in sessions {
        session.close().await;
    }
    app.stop().await;
}
