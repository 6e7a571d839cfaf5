//! What every handler shares: the bus, the limits, the metrics and the configuration.
//!
//! Below both [`crate::app`] (which builds it) and [`crate::http`] (whose handlers read it),
//! so that neither has to import the other. No routing here.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use tokio::sync::Semaphore;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::{Bus, BusError},
    chat::Envelope,
    config::Config,
    limits::Limits,
    metrics::Metrics,
    telemetry::Throttle,
};

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub bus: Bus,
    pub metrics: Arc<Metrics>,
    pub limits: Arc<Limits>,
    /// Cancelled at the stop signal: readiness turns 503 and new sessions are refused, while
    /// open ones are served on for the drain period.
    pub draining: CancellationToken,
    /// Cancelled when the process starts shutting down: sessions close on it.
    pub shutdown: CancellationToken,
    /// Every WebSocket session task, so shutdown can wait for them.
    pub sessions: TaskTracker,
    /// `?v=` of the page's asset URLs: changes with every build, so browsers never mix an old
    /// script with a new page.
    pub asset_version: Arc<str>,
    /// Refused browser origins already logged this minute: a flood logs a line a minute.
    pub origin_log: Arc<Throttle>,
    /// Bytes (in KiB) of history pages being sent at once, over every request: a client that
    /// asks for pages and never reads them holds its share, not the process's memory.
    pub page_budget: Arc<Semaphore>,
    /// Places for sessions whose browser stopped reading, each worth what such a session can
    /// hold (see [`stalled_session_places`]); a session that finds none is closed.
    pub stalled: Arc<Semaphore>,
    /// The `Idempotency-Key`s of `POST /messages` this replica has seen.
    pub idempotency: Arc<crate::idempotency::Keys>,
}

/// How long a session's socket may take nothing before the session counts as stalled.
pub const STALL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How many stalled sessions fit in `NOTIFIER_WS_STALLED_BYTES`: a stalled session holds at most
/// its consumer's prefetch of the largest frames, and its capped write buffer.
pub fn stalled_session_places(config: &Config) -> usize {
    let prefetch = config.rabbitmq.as_ref().map_or(0, |r| usize::from(r.prefetch));
    let write_buffer = config.ws.max_write_buffer.max(config.max_frame_bytes() * 2);
    let per_session = prefetch * config.max_frame_bytes() + write_buffer;
    (config.ws.stalled_bytes / per_session).max(1)
}

/// The process-wide budget of history pages in flight, in KiB (32 MiB: 32 full pages, or
/// thousands of ordinary ones).
pub const PAGE_BUDGET_KIB: usize = 32 * 1024;

impl AppState {
    /// Shutting down: not ready, no new sessions.
    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    /// Publishes on the bus, counting the outcome.
    pub async fn publish(&self, envelope: &Envelope) -> Result<(), BusError> {
        let started = std::time::Instant::now();
        let result = self.bus.publish(envelope).await;
        match result {
            Ok(()) => {
                self.metrics.published.fetch_add(1, Relaxed);
                self.metrics.observe_publish(started.elapsed());
            }
            Err(_) => {
                self.metrics.publish_failures.fetch_add(1, Relaxed);
            }
        }
        result
    }
}
