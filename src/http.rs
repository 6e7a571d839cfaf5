//! The HTTP surface: the whole URL table on one screen, plus the layers around it.

mod auth;
mod client;
mod error;
mod messages;
pub mod openapi;
mod pages;
mod probes;
mod ws;

use std::{
    path::{Path, PathBuf},
    sync::LazyLock,
};

use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderValue, StatusCode, header},
    middleware::{self, Next},
    response::Response,
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
        .layer(middleware::from_fn(cache_static));
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

/// The version in the page's asset URLs (`?v=`): a digest of the files in `static/`, so a
/// URL names one content, whatever the process or the replica. Read once, at the first page.
pub(crate) fn asset_version() -> &'static str {
    static VERSION: LazyLock<String> = LazyLock::new(|| digest_of(&static_dir()));
    &VERSION
}

/// FNV-1a (64 bits) of each file's name, length and bytes, in name order.
fn digest_of(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &b in bytes {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for file in files {
        let content = std::fs::read(&file).unwrap_or_default();
        feed(file.file_name().map(|n| n.as_encoded_bytes()).unwrap_or_default());
        feed(&(content.len() as u64).to_le_bytes());
        feed(&content);
    }
    format!("{hash:016x}")
}

/// `Cache-Control` of `/static/*`. Under the current version (as the page links them) a file
/// never changes: a year, immutable. Under another version (a page from another replica, mid
/// deploy) it is not what that URL names: not kept. Unversioned: an hour.
async fn cache_static(request: Request, next: Next) -> Response {
    let query = request.uri().query().unwrap_or_default();
    let version = query.split('&').find_map(|p| p.strip_prefix("v=")).map(|v| v == asset_version());
    let mut response = next.run(request).await;
    let found = response.status().is_success() || response.status() == StatusCode::NOT_MODIFIED;
    let policy = match version {
        _ if !found => "public, max-age=3600",
        Some(true) => "public, max-age=31536000, immutable",
        Some(false) => "no-cache",
        None => "public, max-age=3600",
    };
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static(policy));
    response
}
