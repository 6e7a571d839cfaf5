//! A round-robin TCP proxy in front of the cluster's nodes: one address, each new connection to
//! the next node that accepts it, as a Kubernetes Service spreads connections over broker pods.
//! Dropping it stops it and closes every connection it carries.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long one node may take to accept before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

pub struct RoundRobin {
    pub addr: SocketAddr,
    stop: CancellationToken,
}

impl RoundRobin {
    pub async fn start(upstreams: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let next = Arc::new(AtomicUsize::new(0));
        let stopping = stop.clone();
        tokio::spawn(async move {
            loop {
                let client = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((client, _)) => client,
                        Err(_) => continue,
                    },
                    () = stopping.cancelled() => return,
                };
                let first = next.fetch_add(1, Relaxed);
                let upstreams = upstreams.clone();
                let stopping = stopping.clone();
                tokio::spawn(async move {
                    // The next node that accepts; a stopped one is skipped, as a Service skips a
                    // pod that is not ready.
                    for i in 0..upstreams.len() {
                        let upstream = upstreams[(first + i) % upstreams.len()];
                        let Ok(Ok(server)) =
                            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(upstream)).await
                        else {
                            continue;
                        };
                        pipe(client, server, stopping).await;
                        return;
                    }
                });
            }
        });
        Self { addr, stop }
    }
}

impl Drop for RoundRobin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn pipe(mut client: TcpStream, mut server: TcpStream, stop: CancellationToken) {
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        () = stop.cancelled() => {}
    }
}
