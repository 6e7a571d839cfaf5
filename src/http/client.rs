//! The client's address, for per-client limits: the peer, or what a trusted proxy says.

use std::net::{IpAddr, SocketAddr};

use axum::{
    extract::{ConnectInfo, FromRequestParts},
    http::request::Parts,
};

use crate::state::AppState;

/// The address of whoever sent the request: the TCP peer; or, when the peer is a trusted proxy
/// (`NOTIFIER_TRUSTED_PROXIES`), the right-most address of the header `NOTIFIER_CLIENT_IP_HEADER`
/// names that is not itself a trusted proxy. Every line of the header counts, in order; entries
/// left of that one are the client's own claims.
#[derive(Clone, Copy, Debug)]
pub struct ClientIp(pub IpAddr);

impl FromRequestParts<AppState> for ClientIp {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let limits = &state.config.limits;
        // Without connect info (a router served without it) every client shares one budget.
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map_or(IpAddr::from([0, 0, 0, 0]), |ConnectInfo(addr)| addr.ip());
        let Some(header) = limits.client_ip_header.as_deref() else { return Ok(Self(peer)) };
        let trusted = |ip: &IpAddr| limits.trusted_proxies.iter().any(|net| net.contains(&canonical(*ip)));
        if !trusted(&peer) {
            return Ok(Self(peer));
        }
        let values: Vec<&str> =
            parts.headers.get_all(header).iter().filter_map(|v| v.to_str().ok()).collect();
        let mut client = peer;
        for entry in values.iter().rev().flat_map(|v| v.rsplit(',')).map(str::trim) {
            // The proxy's view ends at an entry it did not write (garbage, or empty).
            let Ok(ip) = entry.parse::<IpAddr>() else { break };
            client = ip;
            if !trusted(&ip) {
                break;
            }
        }
        Ok(Self(canonical(client)))
    }
}

/// An IPv4 address written as IPv6 (`::ffff:10.0.0.1`) is the IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
