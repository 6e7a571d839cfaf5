//! Where each new broker connection goes: the configured addresses in turn.
//!
//! `NOTIFIER_RABBITMQ_HOST` may name several hosts, and a name may resolve to several addresses
//! (a Kubernetes headless Service names every broker pod). Each new connection takes the next
//! address, starting from a random one so that replicas do not all pick the first, and skips
//! addresses that failed in the last [`FAILED_FOR`], unless all did. A replica's connections so
//! spread over the nodes, and a connection that lost its node reconnects to another.
//!
//! With TLS the names are used as they are (the broker's certificate names them, not their
//! addresses), so a name is one address then.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use crate::config::{Endpoint, RabbitConfig};

/// How long an address that failed is passed over.
pub(super) const FAILED_FOR: Duration = Duration::from_secs(10);

pub(super) struct Addresses {
    endpoints: Vec<Endpoint>,
    tls: bool,
    /// The next address to hand out, modulo the number of addresses.
    cursor: AtomicUsize,
    failed: Mutex<HashMap<Endpoint, Instant>>,
}

impl Addresses {
    pub(super) fn new(config: &RabbitConfig) -> Self {
        Self {
            endpoints: config.endpoints(),
            tls: config.tls,
            cursor: AtomicUsize::new(rand::random::<u16>() as usize),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// Every address to choose from now: each configured host, and without TLS, each address
    /// a name resolves to (a name that does not resolve stays as it is, and its connection
    /// attempt says why).
    async fn candidates(&self) -> Vec<Endpoint> {
        let mut all = Vec::new();
        for endpoint in &self.endpoints {
            if self.tls || endpoint.host.parse::<IpAddr>().is_ok() {
                all.push(endpoint.clone());
                continue;
            }
            match tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)).await {
                Ok(addrs) => {
                    let before = all.len();
                    for addr in addrs {
                        let resolved = Endpoint { host: addr.ip().to_string(), port: addr.port() };
                        if !all.contains(&resolved) {
                            all.push(resolved);
                        }
                    }
                    if all.len() == before {
                        all.push(endpoint.clone());
                    }
                }
                Err(_) => all.push(endpoint.clone()),
            }
        }
        all
    }

    /// The address for the next connection.
    pub(super) async fn next(&self) -> Endpoint {
        let candidates = self.candidates().await;
        let start = self.cursor.fetch_add(1, Relaxed);
        self.pick(&candidates, start)
    }

    fn pick(&self, candidates: &[Endpoint], start: usize) -> Endpoint {
        let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        let recently_failed = |e: &Endpoint| failed.get(e).is_some_and(|at| at.elapsed() < FAILED_FOR);
        let n = candidates.len().max(1);
        (0..n)
            .map(|i| &candidates[(start + i) % n])
            .find(|e| !recently_failed(e))
            .unwrap_or(&candidates[start % n])
            .clone()
    }

    /// A connection to `endpoint` failed or was lost: pass it over for a while.
    pub(super) fn failed(&self, endpoint: &Endpoint) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).insert(endpoint.clone(), Instant::now());
    }

    /// A connection to `endpoint` was made.
    pub(super) fn succeeded(&self, endpoint: &Endpoint) {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).remove(endpoint);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;

    fn addresses(hosts: &str) -> Addresses {
        let config = crate::config::Config::local().with_rabbitmq(hosts, 5672, "chat");
        Addresses::new(config.rabbitmq.as_ref().expect("with_rabbitmq sets it"))
    }

    #[tokio::test]
    async fn connections_take_the_addresses_in_turn_and_skip_one_that_just_failed() {
        let a = addresses("127.0.0.1:5681,127.0.0.1:5682,127.0.0.1:5683");
        let picks: Vec<Endpoint> = futures_util::future::join_all((0..6).map(|_| a.next())).await;
        let ports: Vec<u16> = picks.iter().map(|e| e.port).collect();
        for pair in ports.windows(2) {
            assert_ne!(pair[0], pair[1], "in turn: {ports:?}");
        }
        assert_eq!(ports[0], ports[3], "every third the same: {ports:?}");
        let bad = Endpoint { host: "127.0.0.1".into(), port: 5682 };
        a.failed(&bad);
        let picks: Vec<u16> =
            futures_util::future::join_all((0..6).map(|_| a.next())).await.iter().map(|e| e.port).collect();
        assert!(!picks.contains(&5682), "a failed address is passed over: {picks:?}");
        assert!(picks.contains(&5681) && picks.contains(&5683), "{picks:?}");
        a.succeeded(&bad);
        let picks: Vec<u16> =
            futures_util::future::join_all((0..3).map(|_| a.next())).await.iter().map(|e| e.port).collect();
        assert!(picks.contains(&5682), "back once it works: {picks:?}");
    }

    #[tokio::test]
    async fn when_every_address_failed_connections_still_try_them() {
        let a = addresses("127.0.0.1:5681,127.0.0.1:5682");
        for port in [5681, 5682] {
            a.failed(&Endpoint { host: "127.0.0.1".into(), port });
        }
        let picks: Vec<u16> =
            futures_util::future::join_all((0..4).map(|_| a.next())).await.iter().map(|e| e.port).collect();
        assert!(picks.contains(&5681) && picks.contains(&5682), "{picks:?}");
    }

    #[tokio::test]
    async fn a_name_counts_as_every_address_it_resolves_to() {
        // "localhost" resolves to 127.0.0.1 (and maybe ::1): each is an address of its own.
        let a = addresses("localhost:5672");
        let all = a.candidates().await;
        assert!(all.iter().any(|e| e.host == "127.0.0.1" && e.port == 5672), "{all:?}");
        let tls = Addresses { tls: true, ..addresses("localhost:5671") };
        assert_eq!(tls.candidates().await, vec![Endpoint { host: "localhost".into(), port: 5671 }]);
    }
}
