//! The HTTP surface: the whole URL table on one screen, plus the layers around it.

mod auth;
mod client;
mod error;
mod messages;
pub mod openapi;
mod pages;
mod probes;
mod ws;

use std::path::PathBuf;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderValue, header},
    routing::{any, get, post},
};
use tower_http::{
    compression::CompressionLayer, services::ServeDir, set_header::SetResponseHeaderLayer, trace::TraceLayer,
};

pub use error::AppError;

use crate::state::AppState;

/// Content Security Policy of every response: only our own scripts, styles and sockets.
const CSP: &str = "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.max_frame_bytes();
    let static_files = Router::new()
        .fallback_service(ServeDir::new(static_dir()).fallback(any(|| async { AppError::NotFound })))
        .layer(SetResponseHeaderLayer::overriding(
            header::CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=3600"),
        ));
    Router::new()
        .route("/", get(pages::index))
        .route(
            "/messages",
            post(messages::post_message)
                .layer(DefaultBodyLimit::max(body_limit))
                .get(messages::list_messages),
        )
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(probes::healthz))
        .route("/readyz", get(probes::readyz))
        .route("/metrics", get(probes::metrics))
        .route("/openapi.json", get(openapi::serve))
        .nest("/static", static_files)
        .fallback(|| async { AppError::NotFound })
        .method_not_allowed_fallback(|| async { AppError::MethodNotAllowed })
        .layer(CompressionLayer::new())
        .layer(SetResponseHeaderLayer::if_not_present(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::REFERRER_POLICY,
            HeaderValue::from_static("no-referrer"),
        ))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// `static/` in the working directory (a container image runs from the app's directory),
/// else the one beside `Cargo.toml` (`cargo run` or tests from anywhere).
fn static_dir() -> PathBuf {
    let local = PathBuf::from("static");
    if local.is_dir() { local } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("static") }
}
