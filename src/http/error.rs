//! The one place where failures become HTTP responses: JSON `{"error": "<sentence>"}`.
//!
//! 4xx sentences explain the mistake to the client. 5xx bodies stay generic; their cause is
//! logged where it happened.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{bus::BusError, chat::InvalidMessage, limits::Limited};

/// Everything a handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("unsupported content type: send application/json or application/x-www-form-urlencoded")]
    UnsupportedMediaType,
    #[error("no such route")]
    NotFound,
    #[error("this route does not take that method")]
    MethodNotAllowed,
    /// A request refused by an extractor (a bad WebSocket upgrade), with its own status.
    #[error("{1}")]
    Rejected(StatusCode, String),
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Reading history failed (`GET /messages`).
    #[error("the message history cannot be read right now; try again")]
    History(BusError),
    #[error("the server is shutting down")]
    ShuttingDown,
    /// A budget of the process is spent for now (503, retry shortly).
    #[error("{0}")]
    Busy(&'static str),
    #[error(transparent)]
    Limited(#[from] Limited),
    /// An `Authorization` header that is not a valid API key.
    #[error("{0}")]
    Unauthorized(String),
    /// A browser request from an origin that may not use this server.
    #[error("requests from this page's origin are not allowed; see NOTIFIER_ALLOWED_ORIGINS")]
    ForbiddenOrigin,
    #[error("the page could not be rendered")]
    Render(#[from] askama::Error),
    /// Another request with the same `Idempotency-Key` is still waiting for the broker.
    #[error("a request with this Idempotency-Key is still being published; retry once it is answered")]
    KeyInFlight,
    /// The `Idempotency-Key` was used for another message.
    #[error("this Idempotency-Key was used for a different message; use a new key for a new message")]
    KeyReused,
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid(InvalidMessage::TooLong { .. }) | Self::TooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::Invalid(_) | Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Rejected(status, _) => *status,
            Self::Bus(_) | Self::History(_) | Self::ShuttingDown | Self::Busy(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Limited(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::ForbiddenOrigin => StatusCode::FORBIDDEN,
            Self::Render(_) => StatusCode::INTERNAL_SERVER_ERROR,
            Self::KeyInFlight => StatusCode::CONFLICT,
            Self::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// The sentence shown to the client.
    pub fn public_message(&self) -> String {
        match self {
            // The cause (host, port, broker error) is logged by the bus; the client only
            // needs to know that retrying is the right move.
            Self::Bus(BusError::Blocked(_)) => {
                "the message broker is refusing new messages for now (it is short \
                 of memory or disk space); nothing was published, try again later"
                    .into()
            }
            // The confirm did not come in time: the message may still go out.
            Self::Bus(BusError::Timeout(_)) => {
                "the message broker did not confirm the message in time; it may still be delivered. \
                 To retry without the risk of sending it twice, send it again with the same \
                 Idempotency-Key header"
                    .into()
            }
            Self::Bus(_) => {
                "the message broker is not available right now; nothing was published, try again".into()
            }
            other => other.to_string(),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        if let Self::Render(e) = &self {
            tracing::error!(error = %e, "template rendering failed");
        }
        let body = super::openapi::ErrorBody { error: self.public_message() };
        let mut response = (status, Json(body)).into_response();
        let retry_after = match &self {
            Self::Limited(limited) => Some(limited.retry_after_secs()),
            // An alarm clears when the broker frees memory or disk: not within a second.
            Self::Bus(BusError::Blocked(_)) => Some(5),
            _ if status == StatusCode::SERVICE_UNAVAILABLE => Some(1),
            Self::KeyInFlight => Some(1),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let Self::Unauthorized(_) = &self {
            // RFC 6750: the scheme to use, and that the token offered was not a valid one.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fanout-chat\", error=\"invalid_token\""),
            );
        }
        response
    }
}
