//! Operations endpoints: liveness, readiness and Prometheus metrics.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use prometheus_client::{encoding::prometheus_text, metrics::gauge::ConstGauge, registry::Registry};
use serde_json::json;

use crate::{
    bus::BusError,
    state::{AppState, PAGE_BUDGET_KIB},
};

/// `GET /healthz`: the process runs. Never tied to the broker, so a broker outage does not
/// make Kubernetes restart healthy pods.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({ "status": "ok" }))
}

/// `GET /readyz`: `200` when a publish can succeed now; `503` otherwise. The answer says only
/// whether the broker or a shutdown is the cause: the broker's address, vhost and refusal text
/// are for the log (written by the bus when the link changes), not for whoever can reach this,
/// unless `NOTIFIER_READYZ_DETAIL` is on.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": "not ready: shutting down" })));
    }
    let not_ready = |error: String| (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": error })));
    match state.bus.readiness() {
        Ok(()) => (StatusCode::OK, Json(json!({ "status": "ready", "mode": state.config.mode() }))),
        Err(BusError::Unavailable(reason)) if state.config.readyz_detail => {
            not_ready(format!("not ready: {reason}"))
        }
        Err(other) if state.config.readyz_detail => not_ready(format!("not ready: {other}")),
        // An alarm is no secret, and tells the public why publishing waits.
        Err(BusError::Blocked(_)) => {
            not_ready("not ready: the message broker is refusing publishes (a memory or disk alarm)".into())
        }
        Err(_) => {
            not_ready("not ready: the message broker is not available; the server's log says why".into())
        }
    }
}

/// `GET /metrics`: the Prometheus text format (version 0.0.4).
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut text = state.metrics.render();
    // Two gauges of the bus's history and of the page budget, which `Metrics` does not see: read
    // now, and encoded by the same crate after the others.
    let mut now = Registry::default();
    now.register(
        "fanout_chat_history_window_messages",
        "recent messages held in memory for history and resuming sessions",
        ConstGauge::new(state.bus.history().held()),
    );
    let used_kib = PAGE_BUDGET_KIB.saturating_sub(state.page_budget.available_permits());
    now.register(
        "fanout_chat_history_pages_in_flight_bytes",
        format!(
            "bytes of history pages being sent now (reserved while a page is built), of a budget of {}",
            PAGE_BUDGET_KIB * 1024
        ),
        ConstGauge::new(used_kib * 1024),
    );
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut text, &now);
    ([(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)], text)
}
