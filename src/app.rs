//! The application: build it from a [`Config`], serve until a stop signal, shut down in order.
//!
//! Shutdown order: readiness turns 503 → the listener stops accepting → every session is
//! closed with 1001 (its consumer cancelled, its queue deleted) → wait for them, bounded →
//! close the broker connections → return. Sessions and requests share one deadline
//! (`NOTIFIER_SHUTDOWN_TIMEOUT_SECS`), and closing the broker connections takes at most 2 s more.

use std::{
    future::Future,
    io,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    bus::Bus,
    config::Config,
    http,
    limits::Limits,
    metrics::Metrics,
    serve,
    state::{AppState, PAGE_BUDGET_KIB, stalled_session_places},
    telemetry::Throttle,
};

/// A bound, not yet serving, application.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    /// Cancelled only after the sessions are gone, so consumers are cancelled before their
    /// connections close.
    bus_shutdown: CancellationToken,
}

impl Application {
    /// Binds `0.0.0.0:$PORT` (port 0 picks a free port, as tests do) and starts the bus.
    pub async fn build(config: Config) -> io::Result<Self> {
        Self::build_on(config, Ipv4Addr::UNSPECIFIED.into()).await
    }

    /// As [`Application::build`], on a given interface (tests use loopback).
    pub async fn build_on(config: Config, ip: std::net::IpAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(SocketAddr::new(ip, config.port)).await?;
        let metrics = Arc::new(Metrics::default());
        let bus_shutdown = CancellationToken::new();
        if config.rabbitmq.is_none() {
            tracing::warn!(
                "SINGLE-PROCESS MODE: NOTIFIER_RABBITMQ_HOST is not set, so the embedded in-process bus \
                 is in use. Only sessions on this process see each other; do not run several replicas \
                 like this. Set NOTIFIER_RABBITMQ_HOST to use RabbitMQ."
            );
        }
        let bus = Bus::start(&config, metrics.clone(), bus_shutdown.clone());
        let limits = Limits::new(&config.limits);
        let stalled = Arc::new(Semaphore::new(stalled_session_places(&config)));
        let state = AppState {
            limits,
            asset_version: format!("{}-{}", env!("CARGO_PKG_VERSION"), std::process::id()).into(),
            config: Arc::new(config),
            bus,
            metrics,
            draining: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            sessions: TaskTracker::new(),
            origin_log: Arc::new(Throttle::new(Duration::from_secs(60))),
            page_budget: Arc::new(Semaphore::new(PAGE_BUDGET_KIB)),
            stalled,
            idempotency: Arc::default(),
        };
        Ok(Self { listener, state, bus_shutdown })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` resolves, then shuts down in order (see the module docs).
    pub async fn run_until_stopped(self, stop: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let Self { listener, state, bus_shutdown } = self;
        let shutdown = state.shutdown.clone();
        let sessions = state.sessions.clone();
        let bus = state.bus.clone();
        let grace = state.config.shutdown.timeout;
        tracing::info!(addr = %listener.local_addr()?, mode = state.config.mode(), replica = %state.config.replica, "listening");

        let (draining, stopping, drain) =
            (state.draining.clone(), shutdown.clone(), state.config.shutdown.drain);
        tokio::spawn(async move {
            stop.await;
            tracing::info!(drain_secs = drain.as_secs(), "stop signal received; not ready, draining");
            draining.cancel();
            tokio::time::sleep(drain).await;
            tracing::info!("closing sessions");
            stopping.cancel();
        });

        let write_timeout = state.config.ws.http_write_timeout;
        let server = serve::serve(listener, http::router(state), write_timeout, shutdown.clone());
        let mut server = tokio::spawn(server);
        tokio::select! {
            result = &mut server => return result.map_err(io::Error::other),
            () = shutdown.cancelled() => {}
        }
        // One deadline, from the stop signal, for open HTTP requests (a publish waiting for its
        // confirm) and sessions together.
        let deadline = tokio::time::Instant::now() + grace;
        match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(result) => result.map_err(io::Error::other)?,
            Err(_) => {
                tracing::warn!("HTTP connections still open at the shutdown deadline; closing them");
                server.abort();
            }
        }

        sessions.close();
        if tokio::time::timeout_at(deadline, sessions.wait()).await.is_err() {
            tracing::warn!(open = sessions.len(), "sessions still open at the shutdown deadline");
        }
        bus_shutdown.cancel();
        bus.close().await;
        tracing::info!("stopped");
        Ok(())
    }
}
