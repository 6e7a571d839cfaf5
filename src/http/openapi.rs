//! `GET /openapi.json`: the HTTP API as an OpenAPI 3.1 document, derived with `utoipa` from the
//! types the handlers send and take ([`Envelope`], [`Draft`], [`ErrorBody`]) and the paths
//! described below, one per route of the URL table in `http.rs`. CI checks it against a live
//! server with schemathesis (`scripts/check-openapi`): every response must be one the document
//! lists, and no input may make the server answer 500.

use std::sync::LazyLock;

use axum::{
    http::{HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use crate::chat::{Draft, Envelope};

/// Every error answer: one sentence for a person, saying what to do.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    #[schema(example = "the message has no text: send a non-empty \"text\" field")]
    pub error: String,
}

/// A page of history (built by hand in `messages.rs` for speed; its shape is this).
#[derive(Serialize, ToSchema)]
#[allow(dead_code, reason = "describes the JSON that list_messages writes")]
struct HistoryPage {
    /// Oldest first, ending with the newest message (or the one just before `before`).
    messages: Vec<Envelope>,
    /// Older messages may exist: ask for `before=<the oldest id here>`.
    has_more: bool,
    /// On the newest page only: where "now" was when the page was read. A socket opened with
    /// `?since=` this value gets everything published from then on.
    #[schema(example = "@1042")]
    resume: Option<String>,
}

#[derive(Serialize, ToSchema)]
#[allow(dead_code, reason = "describes the JSON that readyz and healthz write")]
struct Status {
    #[schema(example = "ready")]
    status: String,
    /// `memory` or `rabbitmq` (readyz only).
    mode: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fanout-chat",
        description = "Real-time fan-out chat over a RabbitMQ fanout exchange: post messages, read the history, \
                       and receive every message over a WebSocket. The broker side is described in \
                       docs/asyncapi.yaml.",
        license(name = "MIT")
    ),
    paths(post_message, list_messages, websocket, index, healthz, readyz, metrics, openapi_json),
    components(schemas(Envelope, Draft, ErrorBody, HistoryPage, Status)),
    tags((name = "messages"), (name = "operations"), (name = "page"))
)]
struct ApiDoc;

static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    // Serializing a document of plain strings and maps cannot fail.
    ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
});

/// The document, as served.
pub fn document() -> &'static str {
    &DOCUMENT
}

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    let mut response = document().into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

// The paths. Each function below only carries its route's description for the document.

#[utoipa::path(
    post, path = "/messages", tag = "messages",
    description = "Publishes one message to every open session (and to every consumer of the exchange). \
                   Accepted (202) only once the broker confirmed it. A caller with a service key sends \
                   `Authorization: Bearer <key>` and is named in `from`; a browser must come from an allowed origin.",
    params(
        ("Idempotency-Key" = Option<String>, Header,
            description = "Makes a retry safe: requests with the same key (per service key, or among anonymous callers) publish at most once. 1 to 255 visible ASCII characters, a UUID for example. A retry of a published message answers 202 with its envelope and `Idempotent-Replayed: true`; after a 503 it publishes the same envelope again, which consumers drop as a copy if the first went out."),
    ),
    request_body(
        description = "The message: `text` (required, at most the configured bytes) and `user` (optional, at most 64 bytes).",
        content(
            (Draft = "application/json"),
            (Draft = "application/x-www-form-urlencoded")
        )
    ),
    responses(
        (status = 202, description = "Published and confirmed by the broker", body = Envelope,
            headers(("Idempotent-Replayed" = String, description = "`true` when an earlier request with the same Idempotency-Key published it"))),
        (status = 400, description = "Not a valid message (no text, control characters, bad JSON or form), or a malformed Idempotency-Key", body = ErrorBody),
        (status = 401, description = "An Authorization header that is not a valid API key", body = ErrorBody,
            headers(("WWW-Authenticate" = String, description = "Bearer realm=\"fanout-chat\", error=\"invalid_token\""))),
        (status = 403, description = "A browser request from an origin that may not use this server", body = ErrorBody),
        (status = 413, description = "The text or the body is too large", body = ErrorBody),
        (status = 415, description = "Neither JSON nor a form", body = ErrorBody),
        (status = 429, description = "Over the caller's message rate", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 409, description = "A request with the same Idempotency-Key is still waiting for the broker", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 422, description = "The Idempotency-Key was used for a different message", body = ErrorBody),
        (status = 503, description = "The broker is unavailable or refusing publishes (nothing was published), or did not confirm in time (it may still be delivered: retry with the same Idempotency-Key)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
#[allow(dead_code, reason = "documentation only")]
fn post_message() {}

#[utoipa::path(
    get, path = "/messages", tag = "messages",
    description = "A page of history, oldest first. `limit` is a maximum: a page holds at most 1 MiB of messages.",
    params(
        ("limit" = Option<u32>, Query, description = "Messages in the page, 1 to 500 (default 50)", minimum = 1, maximum = 500),
        ("before" = Option<String>, Query, description = "The id of a message: the page ends just before it"),
    ),
    responses(
        (status = 200, description = "The page", body = HistoryPage),
        (status = 400, description = "A bad limit, or a `before` later than now", body = ErrorBody),
        (status = 429, description = "Over the caller's rate of history reads", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "The history cannot be read right now (starting up, broker unavailable, busy)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
#[allow(dead_code, reason = "documentation only")]
fn list_messages() {}

#[utoipa::path(
    get, path = "/ws", tag = "messages",
    description = "A WebSocket session (RFC 6455): text frames of JSON, one envelope per message, and notices \
                   (`welcome`, `interrupted`, `restored`, `gap`, ...; README, \"WebSocket protocol\"). \
                   With `since`, what came after that message (or after a history page's `resume` point) first. \
                   Without the upgrade headers, the request is refused.",
    params(
        ("since" = Option<String>, Query, description = "The id of the last message shown, or `@N` (a history page's `resume`)"),
    ),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, description = "A bad `since`, or not a WebSocket upgrade request", body = ErrorBody),
        (status = 403, description = "A browser from an origin that may not use this server", body = ErrorBody),
        (status = 405, description = "Not a GET", body = ErrorBody),
        (status = 426, description = "Not a WebSocket upgrade request"),
        (status = 429, description = "Over the caller's rate of new sessions, or its share of sessions", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
        (status = 503, description = "Shutting down, at capacity, or the broker is unavailable", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait"))),
    )
)]
#[allow(dead_code, reason = "documentation only")]
fn websocket() {}

#[utoipa::path(
    get, path = "/", tag = "page",
    responses((status = 200, description = "The chat page", content_type = "text/html", body = String))
)]
#[allow(dead_code, reason = "documentation only")]
fn index() {}

#[utoipa::path(
    get, path = "/healthz", tag = "operations",
    description = "The process runs (never tied to the broker).",
    responses((status = 200, description = "Alive", body = Status))
)]
#[allow(dead_code, reason = "documentation only")]
fn healthz() {}

#[utoipa::path(
    get, path = "/readyz", tag = "operations",
    description = "Whether a publish can succeed now.",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Not ready: the broker is unavailable or refusing publishes, or shutting down", body = ErrorBody),
    )
)]
#[allow(dead_code, reason = "documentation only")]
fn readyz() {}

#[utoipa::path(
    get, path = "/metrics", tag = "operations",
    description = "Prometheus text format.",
    responses((status = 200, description = "The metrics", content_type = "text/plain", body = String))
)]
#[allow(dead_code, reason = "documentation only")]
fn metrics() {}

#[utoipa::path(
    get, path = "/openapi.json", tag = "operations",
    responses((status = 200, description = "This document", content_type = "application/json", body = Object))
)]
#[allow(dead_code, reason = "documentation only")]
fn openapi_json() {}

#[cfg(test)]
mod tests {
    #[test]
    fn the_document_is_openapi_3_1_and_lists_every_route() {
        let doc: serde_json::Value = serde_json::from_str(super::document()).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"), "{}", doc["openapi"]);
        let mut paths: Vec<&str> = doc["paths"].as_object().unwrap().keys().map(String::as_str).collect();
        paths.sort_unstable();
        assert_eq!(paths, ["/", "/healthz", "/messages", "/metrics", "/openapi.json", "/readyz", "/ws"]);
        let envelope = &doc["components"]["schemas"]["Envelope"];
        let mut required: Vec<&str> =
            envelope["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        required.sort_unstable();
        assert_eq!(required, ["id", "text", "ts"]);
    }
}
