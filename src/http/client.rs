//! The client's address, for per-client limits.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};

use crate::state::AppState;

/// The address of whoever sent the request: the TCP peer, or, behind a trusted proxy, the
/// last address in the header `NOTIFIER_CLIENT_IP_HEADER` names (the one that proxy added;
/// earlier ones are the client's own claims).
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let from_header = state.config.limits.client_ip_header.as_deref().and_then(|name| {
            let value = parts.headers.get_all(name).iter().next_back()?.to_str().ok()?;
            value.rsplit(',').next()?.trim().parse::<IpAddr>().ok()
        });
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|ConnectInfo(addr)| addr.ip());
        // Without connect info (a router served without it) every client shares one budget.
        Ok(Self(from_header.or(peer).unwrap_or(IpAddr::from([0, 0, 0, 0]))))
    }
}
