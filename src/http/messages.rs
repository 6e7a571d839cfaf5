//! `POST /messages`: validate, publish, answer with the envelope. Delivery is the bus's job.
//! `GET /messages`: recent history, newest last, a page at a time.

use std::{sync::Arc, time::Duration};

use axum::{
    Json,
    body::{Body, Bytes},
    extract::{Query, State, rejection::BytesRejection, rejection::QueryRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use percent_encoding::percent_decode;
use serde::Deserialize;
use tokio::sync::OwnedSemaphorePermit;

use super::{
    auth::{Caller, check_origin},
    client::ClientIp,
    error::AppError,
};
use crate::{
    chat::{Draft, Envelope, NewMessage, is_from_the_future},
    idempotency::{Claim, Settle, is_valid_key, key_form, random_part},
    state::AppState,
};

/// `POST /messages`. A caller with a service key is under its key's limit and named in
/// `from`; anyone else is under its address's limit, and a browser must come from an allowed
/// origin.
pub async fn post_message(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    caller: Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, HeaderMap, Json<Envelope>), AppError> {
    match &caller {
        Caller::Service(key) => {
            let result = publish(&state, Some(key), &headers, body).await;
            state.metrics.count_key(key, result.is_ok());
            result
        }
        Caller::Anonymous => {
            check_origin(&state, &headers)?;
            state.limits.check_message(client)?;
            publish(&state, None, &headers, body).await
        }
    }
}

/// Reads, validates and publishes one message; a service's after its key's limit.
async fn publish(
    state: &AppState,
    key: Option<&Arc<str>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, HeaderMap, Json<Envelope>), AppError> {
    if let Some(key) = key {
        state.limits.check_key_message(key)?;
    }
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => AppError::TooLarge(format!(
            "the request body is too large; the message limit is {} bytes",
            state.config.messages.max_bytes
        )),
        _ => AppError::BadRequest(rejection.body_text()),
    })?;
    let idempotency_key = idempotency_key(headers)?;
    let draft = parse_body(headers, &body)?;
    let message = draft.validate(state.config.messages.max_bytes)?;
    let Some(idempotency_key) = idempotency_key else {
        let envelope = match key {
            Some(key) => Envelope::from_service(message, key),
            None => Envelope::new(message),
        };
        state.publish(&envelope).await?;
        return Ok((StatusCode::ACCEPTED, HeaderMap::new(), Json(envelope)));
    };
    publish_once(state, key.map(|k| &**k), idempotency_key, message).await
}

/// The `Idempotency-Key` header, if any, checked.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<&str>, AppError> {
    let Some(value) = headers.get("idempotency-key") else { return Ok(None) };
    let key =
        value.to_str().ok().filter(|k| is_valid_key(k)).ok_or_else(|| AppError::BadRequest(key_form()))?;
    Ok(Some(key))
}

/// Publishes `message` at most once for `key` (see [`crate::idempotency`]). A request answered
/// from an earlier one says so in `Idempotent-Replayed: true`.
async fn publish_once(
    state: &AppState,
    service: Option<&str>,
    key: &str,
    message: NewMessage,
) -> Result<(StatusCode, HeaderMap, Json<Envelope>), AppError> {
    let scope = service.unwrap_or("anonymous");
    let random = random_part(scope, key);
    let replayed = |envelope: Envelope| {
        let mut headers = HeaderMap::new();
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
        Ok((StatusCode::ACCEPTED, headers, Json(envelope)))
    };
    // Published already, through this replica or another: the history window has it.
    if let Some(frame) = state.bus.history().find_random(random)
        && let Ok(envelope) = serde_json::from_str::<Envelope>(frame.text())
    {
        if !envelope.carries(&message) {
            return Err(AppError::KeyReused);
        }
        return replayed(envelope);
    }
    let fresh = || Envelope::with_random(message.clone(), service, random);
    match state.idempotency.claim(scope, key, &message, fresh) {
        Claim::Publish(envelope) => {
            let settle = Settle::new(&state.idempotency, scope, key);
            let published = state.publish(&envelope).await;
            settle.finish(published.is_ok());
            published?;
            Ok((StatusCode::ACCEPTED, HeaderMap::new(), Json(envelope)))
        }
        Claim::Done(envelope) => replayed(envelope),
        Claim::InFlight => Err(AppError::KeyInFlight),
        Claim::Mismatch => Err(AppError::KeyReused),
    }
}

/// Default and largest page of `GET /messages`, in messages.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 500;
/// Most bytes of messages in one page: `limit` is a maximum, not a promise. A page cut short
/// says `has_more`, and the next one starts before its oldest message.
pub const PAGE_MAX_BYTES: usize = 1 << 20;
/// How long a page may wait for room in the process's page budget before it is answered 503.
const PAGE_BUDGET_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, Deserialize)]
pub struct PageQuery {
    limit: Option<String>,
    before: Option<String>,
}

/// `GET /messages?limit=N&before=<id>`: `{"messages": [envelope, ...], "has_more": bool}`,
/// oldest first, ending with the newest message (or the one just before `before`). The newest
/// page also has `"resume": "@N"`: a socket opened with `?since=@N` gets everything published
/// from the moment the page was read, even when the page is empty.
pub async fn list_messages(
    State(state): State<AppState>,
    ClientIp(client): ClientIp,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Response, AppError> {
    state.limits.check_history(client)?;
    let Query(query) = query.map_err(|r| AppError::BadRequest(r.body_text()))?;
    let limit = match query.limit.as_deref() {
        None | Some("") => DEFAULT_PAGE,
        Some(raw) => raw.parse().ok().filter(|n| (1..=MAX_PAGE).contains(n)).ok_or_else(|| {
            AppError::BadRequest(format!("limit must be a whole number from 1 to {MAX_PAGE}, not {raw:?}"))
        })?,
    };
    let before = query.before.filter(|b| !b.is_empty());
    if before.as_deref().is_some_and(is_from_the_future) {
        return Err(AppError::BadRequest(
            "before names a message from the future; no such message exists".into(),
        ));
    }
    // Room for a full page first, before anything is read; what the page does not use is given
    // back once it is built. Held until the body is sent (or the client goes).
    let full_page_kib = (PAGE_MAX_BYTES + PAGE_OVERHEAD).div_ceil(1024);
    let mut permit = tokio::time::timeout(
        PAGE_BUDGET_WAIT,
        state.page_budget.clone().acquire_many_owned(full_page_kib as u32),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .ok_or(AppError::Busy("too many pages of history are being sent right now; try again shortly"))?;
    // Taken before the page is read: a message that arrives meanwhile is in the page or after
    // the point, or both (the page's reader drops what it already shows), never in neither.
    let resume = if before.is_none() { state.bus.resume_point() } else { None };
    let (frames, has_more) =
        state.bus.history_page(limit, before.as_deref(), PAGE_MAX_BYTES).await.map_err(|e| {
            tracing::warn!(error = %e, "history read failed");
            AppError::History(e)
        })?;
    // The frames are envelope JSON already: the page is put together, not re-encoded.
    let mut body = String::with_capacity(frames.iter().map(|f| f.text().len() + 1).sum::<usize>() + 40);
    body.push_str("{\"messages\":[");
    for (i, frame) in frames.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(frame.text());
    }
    body.push_str("],\"has_more\":");
    body.push_str(if has_more { "true" } else { "false" });
    if let Some(resume) = resume {
        // `@` and digits only: nothing to escape.
        body.push_str(",\"resume\":\"");
        body.push_str(&resume);
        body.push('"');
    }
    body.push('}');
    let _unused = permit.split(full_page_kib.saturating_sub(body.len().div_ceil(1024)));
    let body = Bytes::from_owner(PageBody { json: body.into_bytes(), _permit: permit });
    let mut response = Body::from(body).into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

/// The JSON of the envelopes' page wrapper and separators, beyond the messages themselves.
const PAGE_OVERHEAD: usize = MAX_PAGE + 64;

/// A page's bytes and its share of the page budget, given back when the bytes are dropped
/// (sent, or the client gone).
struct PageBody {
    json: Vec<u8>,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for PageBody {
    fn as_ref(&self) -> &[u8] {
        &self.json
    }
}

/// Reads a draft from JSON or from a form, by content type.
fn parse_body(headers: &HeaderMap, body: &[u8]) -> Result<Draft, AppError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_json = content_type == "application/json" || content_type.ends_with("+json");
    let is_form = content_type == "application/x-www-form-urlencoded";
    if !is_json && !is_form {
        return Err(AppError::UnsupportedMediaType);
    }
    let body = std::str::from_utf8(body)
        .map_err(|_| AppError::BadRequest("the request body is not valid UTF-8".into()))?;
    if is_json {
        serde_json::from_str(body)
            .map_err(|e| AppError::BadRequest(format!("the body is not valid message JSON: {e}")))
    } else {
        parse_form(body)
    }
}

/// Parses `text=...&user=...`, refusing what does not decode to UTF-8 (rather than replacing
/// it, as lenient form parsers do, which would change the text the user sent).
fn parse_form(body: &str) -> Result<Draft, AppError> {
    let mut draft = Draft::default();
    for pair in body.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = value.replace('+', " ");
        let value = percent_decode(value.as_bytes())
            .decode_utf8()
            .map_err(|_| AppError::BadRequest(format!("the form field {key:?} is not valid UTF-8")))?
            .into_owned();
        match key {
            "text" => draft.text = Some(value),
            "user" => draft.user = Some(value),
            _ => {}
        }
    }
    Ok(draft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_decode_plus_and_percent_escapes() {
        let d = parse_form("text=hello+world%21%20%F0%9F%91%8B&user=ada&x=1").unwrap();
        assert_eq!(d.text.as_deref(), Some("hello world! 👋"));
        assert_eq!(d.user.as_deref(), Some("ada"));
    }

    #[test]
    fn forms_with_invalid_utf8_are_refused() {
        assert!(matches!(parse_form("text=%FF"), Err(AppError::BadRequest(_))));
    }
}
