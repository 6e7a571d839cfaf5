//! Log set-up: human-readable text by default, JSON lines with `LOG_FORMAT=json`; and a
//! throttle for lines that a flood could repeat.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use tracing_subscriber::{EnvFilter, fmt};

use crate::config::LogFormat;

/// lapin's IO loop logs every frame at trace, the SASL response with the broker password
/// among them: never below debug, whatever `RUST_LOG` says.
const IO_LOOP_CAP: &str = "lapin::io_loop=debug";

/// The filter: `RUST_LOG` (default `info,lapin=warn`), with lapin's IO loop capped at debug.
pub fn filter(rust_log: Option<&str>) -> EnvFilter {
    let filter = rust_log
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new("info,lapin=warn"));
    match IO_LOOP_CAP.parse() {
        Ok(cap) => filter.add_directive(cap),
        Err(_) => filter,
    }
}

/// Installs the global subscriber, with [`filter`] of `RUST_LOG`.
pub fn init(format: LogFormat, rust_log: Option<&str>) {
    let filter = filter(rust_log);
    let builder = fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}

/// Says whether a line about `key` should be logged now: at most once per `every` for each
/// key, so that a flood of one kind of refusal logs a line a minute, not a line a request.
pub struct Throttle {
    every: Duration,
    last: Mutex<HashMap<String, Instant>>,
}

/// Keys remembered at most: a flood of distinct keys logs this many lines a period, and never
/// grows memory.
const THROTTLE_KEYS: usize = 1024;

impl Throttle {
    pub fn new(every: Duration) -> Self {
        Self { every, last: Mutex::new(HashMap::new()) }
    }

    /// True the first time `key` is seen, and again once `every` has passed since.
    pub fn first_in_a_while(&self, key: &str) -> bool {
        let now = Instant::now();
        // A poisoned lock only means a panic elsewhere mid-insert; the map is still usable.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.get(key).is_some_and(|at| now.duration_since(*at) < self.every) {
            return false;
        }
        if last.len() >= THROTTLE_KEYS {
            last.retain(|_, at| now.duration_since(*at) < self.every);
            if last.len() >= THROTTLE_KEYS {
                // As many distinct keys this period as it remembers: a flood of new ones is not
                // logged one by one (nor remembered), until the period frees room.
                return false;
            }
        }
        last.insert(key.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapins_io_loop_is_never_logged_at_trace_whatever_rust_log_says() {
        use std::sync::{Arc, Mutex};
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(bytes);
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        for rust_log in ["trace", "lapin=trace", "lapin::io_loop=trace,info"] {
            let capture = Capture::default();
            let writer = capture.clone();
            let subscriber =
                fmt().with_env_filter(filter(Some(rust_log))).with_writer(move || writer.clone()).finish();
            tracing::subscriber::with_default(subscriber, || {
                tracing::trace!(target: "lapin::io_loop", "SASL response hunter2");
                tracing::debug!(target: "lapin::io_loop", "frame sent");
                tracing::info!(target: "fanout_chat", "listening");
            });
            let text = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
            assert!(!text.contains("hunter2"), "RUST_LOG={rust_log}: {text}");
            assert!(
                text.contains("frame sent"),
                "capped at debug, not silenced: RUST_LOG={rust_log}: {text}"
            );
        }
    }

    #[test]
    fn a_key_is_logged_once_per_period_and_others_independently() {
        let throttle = Throttle::new(Duration::from_secs(60));
        assert!(throttle.first_in_a_while("http://evil.example"));
        assert!(!throttle.first_in_a_while("http://evil.example"));
        assert!(throttle.first_in_a_while("http://other.example"));
        let quick = Throttle::new(Duration::ZERO);
        assert!(quick.first_in_a_while("a"));
        assert!(quick.first_in_a_while("a"), "a period that has passed logs again");
        for n in 0..THROTTLE_KEYS {
            throttle.first_in_a_while(&format!("flood {n}"));
        }
        assert!(!throttle.first_in_a_while("one more"), "a flood of new keys is not logged one by one");
    }
}
