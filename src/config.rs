//! Configuration: read once from the environment at start into one typed struct.
//!
//! No other module reads the environment. Tests build a [`Config`] value directly
//! (see [`Config::local`]) instead of mutating the process environment.
//!
//! [`Config`] holds the process-wide settings and one group per concern, each read by its
//! own `read`:
//!
//! - this file: [`Config`], [`MessageConfig`], [`HistoryConfig`], [`WsConfig`],
//!   [`ShutdownConfig`], [`LimitsConfig`], [`LogFormat`];
//! - `config/rabbit.rs`: [`RabbitConfig`] (the broker), its [`StreamConfig`] (the history
//!   stream) and [`FanoutMode`];
//! - `config/access.rs`: who may call: service [`ApiKeys`] and browser [`AllowedOrigins`];
//! - `config/vars.rs`: the raw variables as envy reads them, the helpers that parse one
//!   variable each (every error names its variable), [`Secret`] and [`ConfigError`].

mod access;
mod rabbit;
mod vars;

use std::time::Duration;

pub use access::{AllowedOrigins, ApiKeys};
pub use rabbit::{Endpoint, FanoutMode, RabbitConfig, StreamConfig};
pub use vars::{ConfigError, Secret};
use vars::{Env, boolean, parse, ranged, secs};

/// Everything the process needs to know, parsed and validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// `PORT` (default `8080`): the TCP port to listen on, on all interfaces; `0` picks a free one.
    pub port: u16,
    /// `HOSTNAME` (the pod name on Kubernetes): names this replica in queue names and logs.
    pub replica: String,
    /// `LOG_FORMAT` (default `text`): `json` for one JSON object per line.
    pub log_format: LogFormat,
    /// `NOTIFIER_READYZ_DETAIL` (default `false`): `/readyz` also says why the broker is not
    /// available (its address, its refusal). Off, that is only in the log: the route may be
    /// reachable by more than the kubelet. Turn it on where only operators can reach it.
    pub readyz_detail: bool,
    /// `RUST_LOG` (default `info,lapin=warn`): which log lines are written; lapin's IO loop is
    /// never logged below debug (see [`crate::telemetry::filter`]).
    pub log_filter: Option<String>,
    /// `NOTIFIER_RABBITMQ_HOST` and friends. `None` selects the embedded in-process bus.
    pub rabbitmq: Option<RabbitConfig>,
    /// What a message may be, and how many a slow session may fall behind on.
    pub messages: MessageConfig,
    /// The window of recent messages each process keeps.
    pub history: HistoryConfig,
    /// WebSocket sessions: keep-alive and slow browsers.
    pub ws: WsConfig,
    /// The stop sequence on SIGTERM.
    pub shutdown: ShutdownConfig,
    /// Rate and session limits.
    pub limits: LimitsConfig,
    /// Who may call: service keys, and the browser origins allowed.
    pub access: AccessConfig,
}

/// Callers: services by their keys, browsers by their origin.
#[derive(Clone, Debug)]
pub struct AccessConfig {
    /// `NOTIFIER_API_KEYS` (`name:key,...`) and `NOTIFIER_API_KEYS_FILE` (one `name:key` a
    /// line; both may be set): `Authorization: Bearer <key>` on `POST /messages` makes the
    /// caller that service. Unset: every caller is anonymous.
    pub api_keys: ApiKeys,
    /// `NOTIFIER_ALLOWED_ORIGINS` (default: the page's own origin): browser origins that may
    /// open a WebSocket or post; `*` for any. Requests without `Origin` are always allowed.
    pub allowed_origins: AllowedOrigins,
}

/// Chat messages: their size, and the buffer of each session on an in-process channel.
#[derive(Clone, Debug)]
pub struct MessageConfig {
    /// `NOTIFIER_MAX_MESSAGE_BYTES` (default `4096`): largest accepted message text, in UTF-8 bytes.
    pub max_bytes: usize,
    /// `NOTIFIER_MEMORY_CAPACITY` (default `1024`): messages kept for a session that falls
    /// behind, on the embedded bus and in `process` fan-out mode, before that session skips
    /// ahead (and is told so).
    pub memory_capacity: usize,
}

/// Recent messages kept in memory.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// `NOTIFIER_HISTORY_WINDOW` (default `1000`): recent messages each process keeps in memory
    /// for `GET /messages` and for sessions that resume with `?since=`; `0` turns history off
    /// (and, on RabbitMQ, the history stream with it).
    pub window: usize,
}

/// WebSocket sessions.
#[derive(Clone, Debug)]
pub struct WsConfig {
    /// `NOTIFIER_WS_PING_SECS` (default `20`): how often each WebSocket is pinged. Below the
    /// 60 s idle timeout of common proxies (ingress-nginx), so quiet sessions are never cut.
    pub ping_interval: Duration,
    /// `NOTIFIER_WS_SEND_TIMEOUT_SECS` (default `30`): a session whose browser has not taken a
    /// frame for this long is closed, so a stuck reader never holds its queue's prefetch forever.
    pub send_timeout: Duration,
    /// `NOTIFIER_WS_WRITE_BUFFER_BYTES` (default `65536`): the most a session may have buffered
    /// for its socket; past that the frame is refused instead of growing memory.
    pub max_write_buffer: usize,
    /// `NOTIFIER_WS_STALLED_BYTES` (default `67108864`, 64 MiB): what the sessions whose
    /// browser stopped reading may hold in the process, together. A session is stalled once its
    /// socket has taken nothing for a few seconds; past this budget it is closed at once (1013,
    /// and the page resumes with `since`) instead of at the send timeout.
    pub stalled_bytes: usize,
    /// `NOTIFIER_HTTP_WRITE_TIMEOUT_SECS` (default `60`): a connection whose client has taken
    /// nothing of what is written to it for this long is closed (a response nobody reads).
    /// Longer than the send timeout, which ends a stalled WebSocket session first, with a reason.
    pub http_write_timeout: Duration,
}

/// Stopping: first drain, then close.
#[derive(Clone, Debug)]
pub struct ShutdownConfig {
    /// `NOTIFIER_SHUTDOWN_TIMEOUT_SECS` (default `5`): how long shutdown waits for sessions to
    /// close after telling them to, before closing the broker connection anyway.
    pub timeout: Duration,
    /// `NOTIFIER_DRAIN_SECS` (default `0`): on SIGTERM, how long the process stays up reporting
    /// not-ready, still serving its open sessions, before it closes them with 1001. Give it the
    /// time a load balancer takes to stop sending new connections (a few seconds on Kubernetes).
    pub drain: Duration,
}

/// Overload protection: past these, requests are answered 429 with `Retry-After`.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// `NOTIFIER_MESSAGES_PER_CLIENT` (default `100`): messages per second (and burst) one
    /// client address may send without a service key, by POST and WebSocket together. Enough
    /// for a keyless service posting a steady 50/s, or a whole office behind one NAT address.
    pub messages_per_client: u32,
    /// `NOTIFIER_MESSAGES_PER_KEY` (default `1000`): messages per second (and burst) each
    /// service key may post; a keyed caller is not under its address's limit.
    pub messages_per_key: u32,
    /// `NOTIFIER_MESSAGES_GLOBAL` (default `2000`): messages per second the process accepts.
    pub messages_global: u32,
    /// `NOTIFIER_MAX_SESSIONS` (default `10000`): open WebSocket sessions per process.
    pub max_sessions: usize,
    /// `NOTIFIER_MAX_SESSIONS_PER_CLIENT` (default `1000`): open sessions per client address.
    /// An office behind one NAT address opens one or two per person.
    pub max_sessions_per_client: usize,
    /// `NOTIFIER_CLIENT_IP_HEADER` (unset): a header set by a trusted proxy that carries the
    /// client address (e.g. `x-forwarded-for`; its last address is used). Unset: the peer.
    pub client_ip_header: Option<String>,
    /// `NOTIFIER_TRUSTED_PROXIES` (default: the private, shared and loopback ranges, where a
    /// cluster's gateway is and an internet client never is): the peers whose
    /// `NOTIFIER_CLIENT_IP_HEADER` is believed. From any other peer the header is ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `NOTIFIER_HISTORY_PER_CLIENT` (default `10`, burst 100): `GET /messages` per second
    /// per client address.
    pub history_per_client: u32,
    /// `NOTIFIER_SESSIONS_OPENED_PER_CLIENT` (default `30`, burst 300): WebSocket sessions a
    /// client address may open per second; each is a queue declared and deleted on the broker.
    pub sessions_opened_per_client: u32,
}

/// The default of `NOTIFIER_TRUSTED_PROXIES`.
const PRIVATE_RANGES: &str =
    "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,100.64.0.0/10,127.0.0.0/8,::1/128,fc00::/7";

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for a cluster log stack.
    Json,
}

impl Config {
    /// Reads the process environment. The only place that does.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from `(NAME, value)` pairs, as if they were the environment.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let mut env = Env::from_vars(vars)?;
        // Written in the order the variables are checked: with several bad ones, the first
        // in this order is the one reported.
        Ok(Self {
            rabbitmq: RabbitConfig::read(&mut env)?,
            // 0 asks the OS for a free port (tests, several local processes).
            port: parse("PORT", env.port.take(), 8080, "a TCP port number from 0 to 65535", |_| true)?,
            messages: MessageConfig::read(&mut env)?,
            ws: WsConfig::read(&mut env)?,
            shutdown: ShutdownConfig::read(&mut env)?,
            history: HistoryConfig::read(&mut env)?,
            limits: LimitsConfig::read(&mut env)?,
            access: AccessConfig {
                api_keys: ApiKeys::read(
                    env.notifier_api_keys.take().as_deref(),
                    env.notifier_api_keys_file.take().as_deref(),
                )?,
                allowed_origins: AllowedOrigins::read(env.notifier_allowed_origins.take().as_deref())?,
            },
            replica: replica_name(env.hostname.take()),
            log_format: log_format(env.log_format.take())?,
            log_filter: env.rust_log.take().filter(|f| !f.trim().is_empty()),
            readyz_detail: boolean("NOTIFIER_READYZ_DETAIL", env.notifier_readyz_detail.take())?,
        })
    }

    /// The configuration of an unset environment: the embedded bus on port 8080.
    pub fn local() -> Self {
        // An empty environment only takes defaults, which are all valid.
        #[expect(clippy::expect_used, reason = "defaults are constants checked by unit tests")]
        Self::from_vars(std::iter::empty()).expect("the defaults are a valid configuration")
    }

    /// The same configuration, using RabbitMQ at `host:port` with guest credentials.
    pub fn with_rabbitmq(mut self, host: &str, port: u16, exchange: &str) -> Self {
        #[expect(clippy::expect_used, reason = "defaults are constants checked by unit tests")]
        let rabbit = Self::from_vars([
            ("NOTIFIER_RABBITMQ_HOST".to_owned(), host.to_owned()),
            ("NOTIFIER_RABBITMQ_PORT".to_owned(), port.to_string()),
            ("NOTIFIER_EXCHANGE".to_owned(), exchange.to_owned()),
        ])
        .expect("a host, a port and an exchange name make a valid configuration")
        .rabbitmq;
        self.rabbitmq = rabbit;
        self
    }

    /// The largest WebSocket frame a valid message can make: JSON may escape each byte of the
    /// text as `\u00XX` (6 bytes), plus the id, timestamp and user. Also the limit of a
    /// request body and of a browser's frame.
    pub fn max_frame_bytes(&self) -> usize {
        self.messages.max_bytes * 6 + 1024
    }

    /// `"rabbitmq"` or `"memory"`: which bus this configuration selects.
    pub fn mode(&self) -> &'static str {
        if self.rabbitmq.is_some() { "rabbitmq" } else { "memory" }
    }
}

impl MessageConfig {
    fn read(env: &mut Env) -> Result<Self, ConfigError> {
        Ok(Self {
            max_bytes: ranged(
                "NOTIFIER_MAX_MESSAGE_BYTES",
                env.notifier_max_message_bytes.take(),
                4096,
                1,
                1 << 20,
            )?,
            memory_capacity: ranged(
                "NOTIFIER_MEMORY_CAPACITY",
                env.notifier_memory_capacity.take(),
                1024,
                1,
                1 << 20,
            )?,
        })
    }
}

impl HistoryConfig {
    fn read(env: &mut Env) -> Result<Self, ConfigError> {
        Ok(Self {
            window: ranged(
                "NOTIFIER_HISTORY_WINDOW",
                env.notifier_history_window.take(),
                1000,
                0,
                1_000_000,
            )?,
        })
    }
}

impl WsConfig {
    fn read(env: &mut Env) -> Result<Self, ConfigError> {
        Ok(Self {
            ping_interval: secs(ranged(
                "NOTIFIER_WS_PING_SECS",
                env.notifier_ws_ping_secs.take(),
                20,
                1,
                3600,
            )?),
            send_timeout: secs(ranged(
                "NOTIFIER_WS_SEND_TIMEOUT_SECS",
                env.notifier_ws_send_timeout_secs.take(),
                30,
                1,
                3600,
            )?),
            max_write_buffer: ranged(
                "NOTIFIER_WS_WRITE_BUFFER_BYTES",
                env.notifier_ws_write_buffer_bytes.take(),
                64 * 1024,
                1024,
                1 << 26,
            )?,
            stalled_bytes: ranged(
                "NOTIFIER_WS_STALLED_BYTES",
                env.notifier_ws_stalled_bytes.take(),
                64 << 20,
                64 << 10,
                1 << 40,
            )?,
            http_write_timeout: secs(ranged(
                "NOTIFIER_HTTP_WRITE_TIMEOUT_SECS",
                env.notifier_http_write_timeout_secs.take(),
                60,
                1,
                3600,
            )?),
        })
    }
}

impl ShutdownConfig {
    fn read(env: &mut Env) -> Result<Self, ConfigError> {
        Ok(Self {
            timeout: secs(ranged(
                "NOTIFIER_SHUTDOWN_TIMEOUT_SECS",
                env.notifier_shutdown_timeout_secs.take(),
                5,
                1,
                60,
            )?),
            drain: secs(parse(
                "NOTIFIER_DRAIN_SECS",
                env.notifier_drain_secs.take(),
                0,
                "a whole number from 0 to 300",
                |n| *n <= 300,
            )?),
        })
    }
}

impl LimitsConfig {
    fn read(env: &mut Env) -> Result<Self, ConfigError> {
        Ok(Self {
            messages_per_client: ranged(
                "NOTIFIER_MESSAGES_PER_CLIENT",
                env.notifier_messages_per_client.take(),
                100,
                1,
                1_000_000,
            )?,
            messages_per_key: ranged(
                "NOTIFIER_MESSAGES_PER_KEY",
                env.notifier_messages_per_key.take(),
                1000,
                1,
                10_000_000,
            )?,
            messages_global: ranged(
                "NOTIFIER_MESSAGES_GLOBAL",
                env.notifier_messages_global.take(),
                2000,
                1,
                10_000_000,
            )?,
            max_sessions: ranged(
                "NOTIFIER_MAX_SESSIONS",
                env.notifier_max_sessions.take(),
                10_000,
                1,
                1_000_000,
            )?,
            max_sessions_per_client: ranged(
                "NOTIFIER_MAX_SESSIONS_PER_CLIENT",
                env.notifier_max_sessions_per_client.take(),
                1000,
                1,
                1_000_000,
            )?,
            client_ip_header: env
                .notifier_client_ip_header
                .take()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty()),
            trusted_proxies: cidr_list(
                "NOTIFIER_TRUSTED_PROXIES",
                env.notifier_trusted_proxies.take().as_deref().unwrap_or(PRIVATE_RANGES),
            )?,
            history_per_client: ranged(
                "NOTIFIER_HISTORY_PER_CLIENT",
                env.notifier_history_per_client.take(),
                10,
                1,
                1_000_000,
            )?,
            sessions_opened_per_client: ranged(
                "NOTIFIER_SESSIONS_OPENED_PER_CLIENT",
                env.notifier_sessions_opened_per_client.take(),
                30,
                1,
                1_000_000,
            )?,
        })
    }
}

/// A comma list of networks (`10.0.0.0/8`) or single addresses (`10.1.2.3`); empty: none.
fn cidr_list(name: &str, raw: &str) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    raw.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<ipnet::IpNet>()
                .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError(format!(
                        "{name}={raw:?}: {item:?} is not an address or a network; expected a comma list such as 10.0.0.0/8,fd00::/8"
                    ))
                })
        })
        .collect()
}

fn log_format(raw: Option<String>) -> Result<LogFormat, ConfigError> {
    match raw.as_deref().map(|r| r.trim().to_ascii_lowercase()).as_deref() {
        None | Some("text" | "") => Ok(LogFormat::Text),
        Some("json") => Ok(LogFormat::Json),
        Some(_) => {
            Err(ConfigError(format!("LOG_FORMAT={:?}: expected text or json", raw.unwrap_or_default())))
        }
    }
}

/// The pod name on Kubernetes; a random suffix elsewhere, so two local processes differ.
fn replica_name(hostname: Option<String>) -> String {
    match hostname.map(|h| h.trim().to_owned()) {
        Some(h) if !h.is_empty() => h,
        _ => format!("local-{}", &ulid::Ulid::new().to_string()[20..]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Config::from_vars`] over string pairs; shared by the tests of the sub-modules.
    pub(super) fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn an_empty_environment_selects_the_embedded_bus_on_8080() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.port, 8080);
        assert!(cfg.rabbitmq.is_none());
        assert_eq!(cfg.mode(), "memory");
        assert_eq!(cfg.messages.max_bytes, 4096);
        assert_eq!(cfg.log_format, LogFormat::Text);
    }

    #[test]
    fn every_variable_is_read() {
        let cfg = parse(&[
            ("PORT", "9000"),
            ("NOTIFIER_RABBITMQ_HOST", "h"),
            ("NOTIFIER_RABBITMQ_PORT", "5671"),
            ("NOTIFIER_RABBITMQ_USER", "u"),
            ("NOTIFIER_RABBITMQ_PASSWORD", "p@ss/word"),
            ("NOTIFIER_RABBITMQ_VHOST", "prod"),
            ("NOTIFIER_RABBITMQ_TLS", "true"),
            ("NOTIFIER_EXCHANGE", "notifications"),
            ("NOTIFIER_MAX_MESSAGE_BYTES", "100"),
            ("HOSTNAME", "fanout-chat-7d9f-abcde"),
            ("LOG_FORMAT", "json"),
        ])
        .unwrap();
        let r = cfg.rabbitmq.as_ref().unwrap();
        assert_eq!(cfg.port, 9000);
        assert_eq!((r.port, r.user.as_str(), r.password.expose()), (5671, "u", "p@ss/word"));
        assert_eq!((r.vhost.as_str(), r.tls, r.exchange.as_str()), ("prod", true, "notifications"));
        assert_eq!(cfg.messages.max_bytes, 100);
        assert_eq!(cfg.replica, "fanout-chat-7d9f-abcde");
        assert_eq!(cfg.log_format, LogFormat::Json);
    }

    #[test]
    fn a_zero_limit_is_refused() {
        let err = parse(&[("NOTIFIER_MAX_MESSAGE_BYTES", "0")]).unwrap_err().to_string();
        assert!(err.contains("NOTIFIER_MAX_MESSAGE_BYTES"), "{err}");
    }
}
