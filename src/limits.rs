//! Overload protection: message rates and session counts, per client address and global.
//!
//! A refused request is answered `429 Too Many Requests` with `Retry-After`, so a flood of
//! posts or sessions never grows memory or file descriptors without bound.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use governor::{
    DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter,
    clock::{Clock, DefaultClock},
};

use crate::config::LimitsConfig;

/// How often (in checks) idle clients are forgotten, keeping the per-client table small.
const RETAIN_EVERY: u64 = 1024;

/// Why a request was refused, and when the client may try again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Limited {
    #[error("too many messages from your address; slow down")]
    ClientRate(Duration),
    #[error("too many messages for this API key; slow down")]
    KeyRate(Duration),
    #[error("the server is receiving too many messages; try again shortly")]
    GlobalRate(Duration),
    #[error("too many open sessions from your address")]
    ClientSessions,
    #[error("too many sessions opened from your address in a short time; wait a moment")]
    ClientSessionRate(Duration),
    #[error("too many requests for history from your address; slow down")]
    ClientHistoryRate(Duration),
    #[error("the server holds as many sessions as it can; try again shortly")]
    GlobalSessions,
}

impl Limited {
    /// Whole seconds to wait, at least 1: the value of `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        match self {
            Self::ClientRate(wait)
            | Self::KeyRate(wait)
            | Self::GlobalRate(wait)
            | Self::ClientSessionRate(wait)
            | Self::ClientHistoryRate(wait) => wait.as_secs_f64().ceil().max(1.0) as u64,
            Self::ClientSessions | Self::GlobalSessions => 5,
        }
    }
}

pub struct Limits {
    per_client: DefaultKeyedRateLimiter<IpAddr>,
    /// Per service key name; only configured names get here, so it stays small.
    per_key: DefaultKeyedRateLimiter<Arc<str>>,
    /// `GET /messages` per client address.
    history_per_client: DefaultKeyedRateLimiter<IpAddr>,
    /// Sessions opened per client address: each is a queue declared and deleted on the broker.
    opened_per_client: DefaultKeyedRateLimiter<IpAddr>,
    global: DefaultDirectRateLimiter,
    checks: AtomicU64,
    sessions: Mutex<Sessions>,
    max_sessions: usize,
    max_sessions_per_client: usize,
}

#[derive(Default)]
struct Sessions {
    total: usize,
    per_client: HashMap<IpAddr, usize>,
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Arc<Self> {
        let quota =
            |per_second: u32| Quota::per_second(NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN));
        // A rate with a burst of `times` seconds' worth: a page load, an office opening its
        // tabs after a restart, then a few a second.
        let burst = |per_second: u32, times: u32| {
            let rate = NonZeroU32::new(per_second).unwrap_or(NonZeroU32::MIN);
            let size = NonZeroU32::new(per_second.saturating_mul(times)).unwrap_or(rate);
            Quota::per_second(rate).allow_burst(size)
        };
        Arc::new(Self {
            per_client: RateLimiter::keyed(quota(config.messages_per_client)),
            per_key: RateLimiter::keyed(quota(config.messages_per_key)),
            history_per_client: RateLimiter::keyed(burst(config.history_per_client, 10)),
            opened_per_client: RateLimiter::keyed(burst(config.sessions_opened_per_client, 10)),
            global: RateLimiter::direct(quota(config.messages_global)),
            checks: AtomicU64::new(0),
            sessions: Mutex::new(Sessions::default()),
            max_sessions: config.max_sessions,
            max_sessions_per_client: config.max_sessions_per_client,
        })
    }

    /// Takes one message from the client's and the global budget.
    pub fn check_message(&self, client: IpAddr) -> Result<(), Limited> {
        self.tidy();
        let now = DefaultClock::default().now();
        self.per_client.check_key(&client).map_err(|n| Limited::ClientRate(n.wait_time_from(now)))?;
        self.global.check().map_err(|n| Limited::GlobalRate(n.wait_time_from(now)))
    }

    /// Takes one message from a service key's budget. A keyed caller is under neither its
    /// address's limit nor the global one (which holds anonymous floods back): busy services
    /// must not lock people out, and each key's own limit bounds it.
    pub fn check_key_message(&self, key: &Arc<str>) -> Result<(), Limited> {
        let now = DefaultClock::default().now();
        self.per_key.check_key(key).map_err(|n| Limited::KeyRate(n.wait_time_from(now)))
    }

    /// Takes one `GET /messages` from the client's budget.
    pub fn check_history(&self, client: IpAddr) -> Result<(), Limited> {
        self.tidy();
        let now = DefaultClock::default().now();
        self.history_per_client
            .check_key(&client)
            .map_err(|n| Limited::ClientHistoryRate(n.wait_time_from(now)))
    }

    /// Forgets idle clients now and then, keeping the per-client tables small.
    fn tidy(&self) {
        if self.checks.fetch_add(1, Relaxed).is_multiple_of(RETAIN_EVERY) {
            self.per_client.retain_recent();
            self.history_per_client.retain_recent();
            self.opened_per_client.retain_recent();
        }
    }

    /// Admits one more session, or says why not. The place is held until the permit drops.
    pub fn admit_session(self: &Arc<Self>, client: IpAddr) -> Result<SessionPermit, Limited> {
        // A poisoned lock only means a panic elsewhere mid-update of two counters; the
        // counts are still the best we have.
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.total >= self.max_sessions {
            return Err(Limited::GlobalSessions);
        }
        let mine = sessions.per_client.entry(client).or_default();
        if *mine >= self.max_sessions_per_client {
            return Err(Limited::ClientSessions);
        }
        // Last: a session refused for another reason does not spend the rate.
        let now = DefaultClock::default().now();
        self.opened_per_client
            .check_key(&client)
            .map_err(|n| Limited::ClientSessionRate(n.wait_time_from(now)))?;
        *mine += 1;
        sessions.total += 1;
        Ok(SessionPermit { limits: self.clone(), client })
    }
}

/// One admitted session's place; freed on drop.
pub struct SessionPermit {
    limits: Arc<Limits>,
    client: IpAddr,
}

impl Drop for SessionPermit {
    fn drop(&mut self) {
        let mut sessions = self.limits.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.total = sessions.total.saturating_sub(1);
        if let Some(mine) = sessions.per_client.get_mut(&self.client) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                sessions.per_client.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(per_client: u32, global: u32, sessions: usize, per_client_sessions: usize) -> Arc<Limits> {
        Limits::new(&limits_config(per_client, global, sessions, per_client_sessions))
    }

    fn limits_config(
        per_client: u32,
        global: u32,
        sessions: usize,
        per_client_sessions: usize,
    ) -> LimitsConfig {
        LimitsConfig {
            messages_per_client: per_client,
            messages_per_key: per_client,
            messages_global: global,
            trusted_proxies: Vec::new(),
            history_per_client: 100,
            sessions_opened_per_client: 1000,
            max_sessions: sessions,
            max_sessions_per_client: per_client_sessions,
            client_ip_header: None,
        }
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));

    #[test]
    fn a_client_over_its_rate_is_refused_and_others_are_not() {
        let l = limits(3, 100, 10, 10);
        for _ in 0..3 {
            assert_eq!(l.check_message(A), Ok(()));
        }
        let refused = l.check_message(A).unwrap_err();
        assert!(matches!(refused, Limited::ClientRate(_)));
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(l.check_message(B), Ok(()));
    }

    #[test]
    fn a_service_key_has_its_own_budget_apart_from_its_address() {
        let l = limits(2, 100, 10, 10);
        let billing: Arc<str> = "billing".into();
        let ci: Arc<str> = "ci".into();
        for _ in 0..2 {
            assert_eq!(l.check_message(A), Ok(()));
        }
        assert!(matches!(l.check_message(A), Err(Limited::ClientRate(_))), "the address is spent");
        assert_eq!(l.check_key_message(&billing), Ok(()), "a keyed caller from it is not");
        assert_eq!(l.check_key_message(&billing), Ok(()));
        assert!(matches!(l.check_key_message(&billing), Err(Limited::KeyRate(_))));
        assert_eq!(l.check_key_message(&ci), Ok(()), "each key has its own budget");
        let busy = limits(2, 1, 10, 10);
        assert_eq!(busy.check_key_message(&billing), Ok(()));
        assert_eq!(busy.check_key_message(&billing), Ok(()));
        assert_eq!(busy.check_message(A), Ok(()), "keyed traffic leaves the global budget to people");
    }

    #[test]
    fn opening_sessions_and_reading_history_have_rates_of_their_own() {
        let l = Limits::new(&LimitsConfig {
            history_per_client: 2,
            sessions_opened_per_client: 1,
            ..limits_config(100, 100, 100, 100)
        });
        let mut admitted = Vec::new();
        for _ in 0..10 {
            admitted.push(l.admit_session(A).unwrap());
        }
        assert!(matches!(l.admit_session(A), Err(Limited::ClientSessionRate(_))), "a burst of 10 s of it");
        assert!(l.admit_session(B).is_ok(), "per address");
        for _ in 0..20 {
            assert_eq!(l.check_history(A), Ok(()));
        }
        assert!(matches!(l.check_history(A), Err(Limited::ClientHistoryRate(_))));
        assert_eq!(l.check_message(A), Ok(()), "messages have their own budget");
    }

    #[test]
    fn the_global_rate_covers_all_clients() {
        let l = limits(100, 2, 10, 10);
        assert_eq!(l.check_message(A), Ok(()));
        assert_eq!(l.check_message(B), Ok(()));
        assert!(matches!(l.check_message(B), Err(Limited::GlobalRate(_))));
    }

    #[test]
    fn session_places_are_counted_and_given_back() {
        let l = limits(1, 1, 3, 2);
        let a1 = l.admit_session(A).unwrap();
        let _a2 = l.admit_session(A).unwrap();
        assert!(matches!(l.admit_session(A), Err(Limited::ClientSessions)));
        let _b1 = l.admit_session(B).unwrap();
        assert!(matches!(l.admit_session(B), Err(Limited::GlobalSessions)));
        drop(a1);
        assert!(l.admit_session(A).is_ok(), "a closed session frees its place");
    }
}
