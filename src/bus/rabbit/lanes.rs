//! The consumer connections ("lanes") that carry the sessions, each on its own.
//!
//! Each lane has its own supervisor: it connects to the next broker address (see
//! [`super::address`]), hands the connection out, and when the connection fails, reconnects
//! (to another node, if the one it was on is down) with capped backoff. Only the sessions on
//! that connection are interrupted; they move to the other lanes that are up at once, and the
//! sessions on the other lanes notice nothing. A new session goes to the lane with the fewest.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use lapin::Connection;
use tokio::sync::{Mutex, watch};

use crate::config::Endpoint;

use super::{
    Shared,
    channels::Slot,
    link::{LinkState, backoff, close_connections, connection_lost, open_next},
};

/// A lane up for this long is healthy: its loss starts the backoff from the beginning.
const STABLE_LANE: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub(super) enum LaneState {
    Down,
    Up(Arc<LaneLink>),
    Closed,
}

/// One connection of a lane, with the channels its sessions share.
pub(super) struct LaneLink {
    /// Which lane, and which of its connections: a session's consumer is valid while both are
    /// the lane's current ones.
    pub(super) lane: usize,
    pub(super) generation: u64,
    pub(super) endpoint: Endpoint,
    pub(super) connection: Connection,
    pub(super) pool: Mutex<Vec<Arc<Slot>>>,
    /// Sessions on this connection.
    pub(super) sessions: Arc<AtomicUsize>,
    /// Sessions picked for this connection and not yet on it: counted too, so that sessions
    /// opened at the same moment spread instead of all picking the same connection.
    reserved: AtomicUsize,
}

/// A lane picked for one session, counted in its load until dropped (once the session is on
/// it, or failed to get there).
pub(super) struct Picked(pub(super) Arc<LaneLink>);

impl Drop for Picked {
    fn drop(&mut self) {
        self.0.reserved.fetch_sub(1, Relaxed);
    }
}

impl LaneLink {
    pub(super) fn usable(&self) -> bool {
        self.connection.status().connected()
    }
}

/// The lanes' states, and a counter bumped on every change, which a session waiting for a
/// lane watches.
pub(super) struct Lanes {
    pub(super) states: Vec<watch::Sender<LaneState>>,
    pub(super) changed: watch::Sender<u64>,
}

impl Lanes {
    pub(super) fn new(count: usize) -> Self {
        Self {
            states: (0..count).map(|_| watch::Sender::new(LaneState::Down)).collect(),
            changed: watch::Sender::new(0),
        }
    }

    fn set(&self, lane: usize, state: LaneState) {
        self.states[lane].send_replace(state);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The usable lane with the fewest sessions, preferring any other over `avoid` (the lane a
    /// session just lost its consumer on).
    pub(super) fn pick(&self, avoid: Option<usize>) -> Option<Picked> {
        let link = self
            .states
            .iter()
            .filter_map(|state| match &*state.borrow() {
                LaneState::Up(link) if link.usable() => Some(link.clone()),
                _ => None,
            })
            .min_by_key(|link| {
                (Some(link.lane) == avoid, link.sessions.load(Relaxed) + link.reserved.load(Relaxed))
            })?;
        link.reserved.fetch_add(1, Relaxed);
        Some(Picked(link))
    }

    /// Where the lanes that are up are connected.
    pub(super) fn endpoints(&self) -> Vec<Endpoint> {
        self.states
            .iter()
            .filter_map(|s| match &*s.borrow() {
                LaneState::Up(l) => Some(l.endpoint.clone()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn up(&self) -> usize {
        self.states.iter().filter(|s| matches!(&*s.borrow(), LaneState::Up(l) if l.usable())).count()
    }
}

/// Keeps lane `lane` connected until shutdown.
pub(super) async fn supervise_lane(shared: Arc<Shared>, lane: usize) {
    // The replica's own link connects first (its publishing connection is the first the
    // broker sees); the lanes follow it, and are independent from then on.
    let mut link = shared.link.clone();
    let first = tokio::select! {
        first = link.wait_for(|state| !matches!(state, LinkState::Down(_))) => first.is_ok(),
        () = shared.shutdown.cancelled() => false,
    };
    drop(link);
    let lanes = &shared.lanes;
    let mut generation = 0;
    let mut failures: u32 = 0;
    while first && !shared.shutdown.is_cancelled() {
        let role = format!("consume-{}", lane + 1);
        let opened = tokio::select! {
            opened = open_next(&shared, &role) => opened,
            () = shared.shutdown.cancelled() => break,
        };
        match opened {
            Ok((connection, endpoint)) => {
                generation += 1;
                let up_since = Instant::now();
                let link = Arc::new(LaneLink {
                    lane,
                    generation,
                    endpoint: endpoint.clone(),
                    connection,
                    pool: Mutex::new(Vec::new()),
                    sessions: Arc::new(AtomicUsize::new(0)),
                    reserved: AtomicUsize::new(0),
                });
                shared.metrics.consumer_connections_up.fetch_add(1, Relaxed);
                lanes.set(lane, LaneState::Up(link.clone()));
                tracing::debug!(lane, %endpoint, generation, "consumer connection up");
                let reason = tokio::select! {
                    reason = connection_lost(&link.connection, |_| {}) => reason,
                    () = shared.shutdown.cancelled() => {
                        lanes.set(lane, LaneState::Closed);
                        shared.metrics.consumer_connections_up.fetch_sub(1, Relaxed);
                        close_connections(std::slice::from_ref(&link.connection)).await;
                        return;
                    }
                };
                let sessions = link.sessions.load(Relaxed);
                tracing::warn!(
                    lane, %endpoint, %reason, sessions,
                    "consumer connection lost; its sessions move to the other connections"
                );
                shared.addresses.failed(&endpoint);
                shared.metrics.consumer_connections_up.fetch_sub(1, Relaxed);
                shared.metrics.consumer_connection_losses.fetch_add(1, Relaxed);
                lanes.set(lane, LaneState::Down);
                close_connections(std::slice::from_ref(&link.connection)).await;
                failures = if up_since.elapsed() > STABLE_LANE { 0 } else { failures.saturating_add(1) };
            }
            Err(reason) => {
                failures = failures.saturating_add(1);
                tracing::warn!(lane, %reason, attempt = failures, "cannot open a consumer connection; will retry");
            }
        }
        tokio::select! {
            () = tokio::time::sleep(backoff(failures, shared.config.reconnect_max)) => {}
            () = shared.reachable.notified() => {}
            () = shared.shutdown.cancelled() => break,
        }
    }
    lanes.set(lane, LaneState::Closed);
}
