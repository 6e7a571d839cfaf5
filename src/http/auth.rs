//! Who is calling: a service that presents one of its API keys, or an anonymous caller (a
//! browser, `curl`); and whether a browser's `Origin` may use this server.
//!
//! A service sends `Authorization: Bearer <key>` on `POST /messages`. A valid key makes the
//! caller that service: its own rate limit instead of its address's, and its name in the
//! envelope's `from`. A header that is present but is not a valid key is refused with 401:
//! a service with a mistyped key learns it at once rather than being served as anonymous.

use std::sync::Arc;

use axum::{
    extract::FromRequestParts,
    http::{HeaderMap, header, request::Parts},
};

use super::error::AppError;
use crate::{config::AllowedOrigins, state::AppState};

/// The caller of a request, as its `Authorization` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// No `Authorization` header: a browser, `curl`, a service without a key.
    Anonymous,
    /// A valid service key; the key's name.
    Service(Arc<str>),
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let keys = &state.config.access.api_keys;
        // Without keys configured the header is not ours to judge: an auth proxy in front
        // (basic auth, oauth2-proxy) may pass its own on to us.
        let Some(value) = parts.headers.get(header::AUTHORIZATION).filter(|_| !keys.is_empty()) else {
            return Ok(Self::Anonymous);
        };
        let refused = |reason: &str| {
            state.metrics.count_auth_failure();
            AppError::Unauthorized(reason.to_owned())
        };
        let value = value.to_str().map_err(|_| refused("the Authorization header is not readable text"))?;
        let (scheme, token) = value.trim().split_once(' ').unwrap_or((value.trim(), ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(refused("only Bearer API keys are accepted: send Authorization: Bearer <key>"));
        }
        let token = token.trim();
        if token.is_empty() {
            return Err(refused("the Bearer API key is empty"));
        }
        match keys.find(token) {
            Some(name) => Ok(Self::Service(name)),
            None => Err(refused("this API key is not valid")),
        }
    }
}

/// Refuses a browser request whose `Origin` is not allowed (403): the page's own origin, and
/// those of `NOTIFIER_ALLOWED_ORIGINS`, are. A request without `Origin` (curl, a service)
/// passes. Each refused origin is logged at most once a minute.
pub fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), AppError> {
    let Some(origin) = headers.get(header::ORIGIN) else { return Ok(()) };
    let origin = origin.to_str().unwrap_or("").trim();
    let allowed = match &state.config.access.allowed_origins {
        AllowedOrigins::Any => true,
        AllowedOrigins::List(list) if list.iter().any(|allowed| allowed.eq_ignore_ascii_case(origin)) => true,
        AllowedOrigins::List(_) | AllowedOrigins::SameOrigin => {
            // Behind a proxy trusted to name the client, it also names the host it was asked for.
            let forwarded = state
                .config
                .limits
                .client_ip_header
                .as_ref()
                .and_then(|_| headers.get_all("x-forwarded-host").iter().next_back())
                .and_then(|v| v.to_str().ok())
                // The last value is the one the trusted proxy added.
                .and_then(|v| v.rsplit(',').next())
                .map(str::trim)
                .filter(|v| !v.is_empty());
            let host = forwarded.or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()));
            host.is_some_and(|host| same_origin(origin, host))
        }
    };
    if allowed {
        return Ok(());
    }
    // At most 200 bytes of what the client wrote reach the log, and the throttle's memory
    // (a readable header value is ASCII, so any byte is a character boundary).
    let shown = origin.get(..origin.len().min(200)).unwrap_or_default();
    if state.origin_log.first_in_a_while(shown) {
        tracing::warn!(origin = shown, "refused a browser request from an origin that is not allowed");
    }
    state.metrics.count_origin_refused();
    Err(AppError::ForbiddenOrigin)
}

/// Whether `origin` (`scheme://host[:port]`) names the server that `host` (a `Host` header,
/// `host[:port]`) is. A default port (80 for http, 443 for https) may be written or not.
fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else { return false };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => return false,
    };
    let strip = |a: &str| {
        let a = a.trim().to_ascii_lowercase();
        a.strip_suffix(default_port).map(str::to_owned).unwrap_or(a)
    };
    !authority.is_empty() && strip(authority) == strip(host)
}

#[cfg(test)]
mod tests {
    use super::same_origin;

    #[test]
    fn an_origin_is_the_same_as_the_host_it_names_with_or_without_its_default_port() {
        assert!(same_origin("http://127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(same_origin("https://Chat.Example.com", "chat.example.com"));
        assert!(same_origin("https://chat.example.com", "chat.example.com:443"));
        assert!(same_origin("http://chat.example.com:80", "chat.example.com"));
        assert!(!same_origin("http://evil.example", "chat.example.com"));
        assert!(!same_origin("http://127.0.0.1:8081", "127.0.0.1:8080"));
        assert!(!same_origin("https://chat.example.com", "chat.example.com:80"));
        assert!(!same_origin("null", "chat.example.com"));
        assert!(!same_origin("file://", ""));
    }
}
