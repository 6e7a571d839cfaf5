//! Configuration: read once from the environment at start into one typed struct.
//!
//! No other module reads the environment. Tests build a [`Config`] value directly
//! (see [`Config::local`]) instead of mutating the process environment.

use std::{fmt, time::Duration};

use std::str::FromStr;

use serde::Deserialize;

/// Everything the process needs to know, parsed and validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// `PORT` (default `8080`): the TCP port to listen on, on all interfaces; `0` picks a free one.
    pub port: u16,
    /// `NOTIFIER_RABBITMQ_HOST` and friends. `None` selects the embedded in-process bus.
    pub rabbitmq: Option<RabbitConfig>,
    /// `NOTIFIER_MAX_MESSAGE_BYTES` (default `4096`): largest accepted message text, in UTF-8 bytes.
    pub max_message_bytes: usize,
    /// `NOTIFIER_MEMORY_CAPACITY` (default `1024`): messages kept for a session that falls
    /// behind, on the embedded bus and in `process` fan-out mode, before that session skips
    /// ahead (and is told so).
    pub memory_capacity: usize,
    /// `NOTIFIER_WS_PING_SECS` (default `20`): how often each WebSocket is pinged. Below the
    /// 60 s idle timeout of common proxies (ingress-nginx), so quiet sessions are never cut.
    pub ws_ping_interval: Duration,
    /// `NOTIFIER_WS_SEND_TIMEOUT_SECS` (default `30`): a session whose browser has not taken a
    /// frame for this long is closed, so a stuck reader never holds its queue's prefetch forever.
    pub ws_send_timeout: Duration,
    /// `NOTIFIER_WS_WRITE_BUFFER_BYTES` (default `65536`): the most a session may have buffered
    /// for its socket; past that the frame is refused instead of growing memory.
    pub ws_max_write_buffer: usize,
    /// `NOTIFIER_SHUTDOWN_TIMEOUT_SECS` (default `5`): how long shutdown waits for sessions to
    /// close after telling them to, before closing the broker connection anyway.
    pub shutdown_timeout: Duration,
    /// `NOTIFIER_DRAIN_SECS` (default `0`): on SIGTERM, how long the process stays up reporting
    /// not-ready, still serving its open sessions, before it closes them with 1001. Give it the
    /// time a load balancer takes to stop sending new connections (a few seconds on Kubernetes).
    pub drain: Duration,
    /// `NOTIFIER_HISTORY_WINDOW` (default `1000`): recent messages each process keeps in memory
    /// for `GET /messages` and for sessions that resume with `?since=`; `0` turns history off
    /// (and, on RabbitMQ, the history stream with it).
    pub history_window: usize,
    /// Rate and session limits.
    pub limits: LimitsConfig,
    /// `HOSTNAME` (the pod name on Kubernetes): names this replica in queue names and logs.
    pub replica: String,
    /// `LOG_FORMAT` (default `text`): `json` for one JSON object per line.
    pub log_format: LogFormat,
}

/// Overload protection: past these, requests are answered 429 with `Retry-After`.
#[derive(Clone, Debug)]
pub struct LimitsConfig {
    /// `NOTIFIER_MESSAGES_PER_CLIENT` (default `10`): messages per second (and burst) one client
    /// address may send, by POST and WebSocket together.
    pub messages_per_client: u32,
    /// `NOTIFIER_MESSAGES_GLOBAL` (default `2000`): messages per second the process accepts.
    pub messages_global: u32,
    /// `NOTIFIER_MAX_SESSIONS` (default `10000`): open WebSocket sessions per process.
    pub max_sessions: usize,
    /// `NOTIFIER_MAX_SESSIONS_PER_CLIENT` (default `50`): open sessions per client address.
    pub max_sessions_per_client: usize,
    /// `NOTIFIER_CLIENT_IP_HEADER` (unset): a header set by a trusted proxy that carries the
    /// client address (e.g. `x-forwarded-for`; its last address is used). Unset: the peer.
    pub client_ip_header: Option<String>,
}

/// Where and how to reach RabbitMQ; present only when `NOTIFIER_RABBITMQ_HOST` is set.
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// `NOTIFIER_RABBITMQ_HOST`.
    pub host: String,
    /// `NOTIFIER_RABBITMQ_PORT` (default `5672`).
    pub port: u16,
    /// `NOTIFIER_RABBITMQ_USER` (default `guest`).
    pub user: String,
    /// `NOTIFIER_RABBITMQ_PASSWORD` (default `guest`); never printed, see [`Secret`].
    pub password: Secret,
    /// `NOTIFIER_RABBITMQ_VHOST` (default `/`).
    pub vhost: String,
    /// `NOTIFIER_RABBITMQ_TLS` (default `false`): `amqps` to the broker.
    pub tls: bool,
    /// `NOTIFIER_EXCHANGE` (default `chat`): the fanout exchange.
    pub exchange: String,
    /// `NOTIFIER_QUEUE_MAX_LENGTH` (default `1000`): `x-max-length` of each session queue; the
    /// oldest ready message is dropped first, so a stalled browser cannot fill the broker.
    pub queue_max_length: i32,
    /// `NOTIFIER_PREFETCH` (default `64`): unacknowledged deliveries per session consumer. This
    /// is also the bound on lapin's in-process buffer for the session.
    pub prefetch: u16,
    /// `NOTIFIER_SESSIONS_PER_CHANNEL` (default `32`): consumers sharing one AMQP channel.
    pub sessions_per_channel: usize,
    /// `NOTIFIER_CHANNELS_PER_CONNECTION` (default `64`): channels per consumer connection,
    /// far below RabbitMQ's default `channel_max` of 2047.
    pub channels_per_connection: usize,
    /// `NOTIFIER_CONSUMER_CONNECTIONS` (default `4`): connections that carry session consumers;
    /// publishing has a connection of its own so flow control on it never stalls delivery.
    pub consumer_connections: usize,
    /// `NOTIFIER_PUBLISH_TIMEOUT_MS` (default `5000`): a publish the broker has not confirmed
    /// by then is reported as failed (503), never as accepted.
    pub publish_timeout: Duration,
    /// `NOTIFIER_RECONNECT_MAX_SECS` (default `30`): cap of the exponential reconnect backoff.
    pub reconnect_max: Duration,
    /// `NOTIFIER_FANOUT_MODE` (default `session`): where messages are copied to sessions.
    pub fanout: FanoutMode,
    /// The durable history stream, bound to the exchange.
    pub history: StreamConfig,
}

/// The history stream: a RabbitMQ stream (an append-only log) bound to the exchange, shared by
/// every replica, kept across restarts of the app and of the broker.
#[derive(Clone, Debug)]
pub struct StreamConfig {
    /// `NOTIFIER_HISTORY_STREAM` (default `<exchange>.history`): the stream's name.
    pub name: String,
    /// `NOTIFIER_HISTORY_MAX_AGE` (default `7D`): messages older than this are discarded
    /// (`x-max-age`: a number and one of `Y`, `M`, `D`, `h`, `m`, `s`).
    pub max_age: String,
    /// `NOTIFIER_HISTORY_MAX_BYTES` (default `100000000`): the stream is truncated, oldest
    /// segment first, past this size (`x-max-length-bytes`).
    pub max_bytes: u64,
}

/// Where the copy per session is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FanoutMode {
    /// The broker copies each message into every session's own queue (the design's default:
    /// per-session bounds, acks and gaps in the broker).
    #[default]
    Session,
    /// One queue per process; the process copies each message to its sessions in memory
    /// (per-session bounded buffers of `NOTIFIER_MEMORY_CAPACITY`; a slow session skips ahead
    /// and is told). Far fewer broker deliveries at thousands of sessions.
    Process,
}

impl RabbitConfig {
    /// The most sessions one process can hold with these settings.
    pub fn session_capacity(&self) -> usize {
        self.sessions_per_channel * self.channels_per_connection * self.consumer_connections
    }
}

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for a cluster log stack.
    Json,
}

/// A string that is never shown by `Debug` or `Display`.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself; call only where it is handed to the broker.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// Why the environment could not be turned into a [`Config`].
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// The environment as envy sees it: one field per variable (lower-cased), raw text. Typed
/// parsing happens in [`Config::from_iter`], so every error can name its variable and say
/// what was expected.
#[derive(Deserialize)]
struct Env {
    port: Option<String>,
    notifier_rabbitmq_host: Option<String>,
    notifier_rabbitmq_port: Option<String>,
    notifier_rabbitmq_user: Option<String>,
    notifier_rabbitmq_password: Option<String>,
    notifier_rabbitmq_vhost: Option<String>,
    notifier_rabbitmq_tls: Option<String>,
    notifier_exchange: Option<String>,
    notifier_max_message_bytes: Option<String>,
    notifier_memory_capacity: Option<String>,
    notifier_queue_max_length: Option<String>,
    notifier_prefetch: Option<String>,
    notifier_sessions_per_channel: Option<String>,
    notifier_channels_per_connection: Option<String>,
    notifier_consumer_connections: Option<String>,
    notifier_publish_timeout_ms: Option<String>,
    notifier_reconnect_max_secs: Option<String>,
    notifier_fanout_mode: Option<String>,
    notifier_history_window: Option<String>,
    notifier_history_stream: Option<String>,
    notifier_history_max_age: Option<String>,
    notifier_history_max_bytes: Option<String>,
    notifier_ws_ping_secs: Option<String>,
    notifier_ws_send_timeout_secs: Option<String>,
    notifier_ws_write_buffer_bytes: Option<String>,
    notifier_shutdown_timeout_secs: Option<String>,
    notifier_drain_secs: Option<String>,
    notifier_messages_per_client: Option<String>,
    notifier_messages_global: Option<String>,
    notifier_max_sessions: Option<String>,
    notifier_max_sessions_per_client: Option<String>,
    notifier_client_ip_header: Option<String>,
    hostname: Option<String>,
    log_format: Option<String>,
}

/// Parses one variable, or takes its default when it is unset.
fn parse<T: FromStr>(
    name: &str,
    raw: Option<String>,
    default: T,
    expected: &str,
    valid: impl Fn(&T) -> bool,
) -> Result<T, ConfigError> {
    let Some(raw) = raw else { return Ok(default) };
    match raw.trim().parse::<T>() {
        Ok(value) if valid(&value) => Ok(value),
        _ => Err(ConfigError(format!("{name}={raw:?}: expected {expected}"))),
    }
}

fn port(name: &str, raw: Option<String>, default: u16) -> Result<u16, ConfigError> {
    parse(name, raw, default, "a TCP port number from 1 to 65535", |p| *p > 0)
}

/// A whole number within `low..=high`: upper bounds keep every derived figure (frame limits,
/// timeouts) far from overflow.
fn ranged<T: FromStr + PartialOrd + std::fmt::Display + Copy>(
    name: &str,
    raw: Option<String>,
    default: T,
    low: T,
    high: T,
) -> Result<T, ConfigError> {
    parse(name, raw, default, &format!("a whole number from {low} to {high}"), |n| (low..=high).contains(n))
}

fn positive<T: FromStr + Default + PartialOrd>(
    name: &str,
    raw: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    parse(name, raw, default, "a whole number greater than 0", |n| *n > T::default())
}

fn boolean(name: &str, raw: Option<String>) -> Result<bool, ConfigError> {
    match raw.as_deref().map(|r| r.trim().to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no" | "") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(_) => Err(ConfigError(format!("{name}={:?}: expected true or false", raw.unwrap_or_default()))),
    }
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

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

impl Config {
    /// Reads the process environment. The only place that does.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads configuration from `(NAME, value)` pairs, as if they were the environment.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: Env = envy::from_iter(vars).map_err(|e| ConfigError(e.to_string()))?;
        // Every variable is checked, even those of the bus not in use: a typo in a deployment
        // should fail now, not when someone switches buses.
        let exchange = exchange_name(env.notifier_exchange.unwrap_or_else(|| "chat".into()))?;
        let history = StreamConfig {
            name: queue_name(
                "NOTIFIER_HISTORY_STREAM",
                env.notifier_history_stream.unwrap_or_else(|| format!("{exchange}.history")),
            )?,
            max_age: max_age(env.notifier_history_max_age)?,
            max_bytes: ranged(
                "NOTIFIER_HISTORY_MAX_BYTES",
                env.notifier_history_max_bytes,
                100_000_000,
                1_000_000,
                1 << 50,
            )?,
        };
        let rabbit = RabbitConfig {
            history,
            host: String::new(),
            port: port("NOTIFIER_RABBITMQ_PORT", env.notifier_rabbitmq_port, 5672)?,
            user: env.notifier_rabbitmq_user.unwrap_or_else(|| "guest".into()),
            password: Secret(env.notifier_rabbitmq_password.unwrap_or_else(|| "guest".into())),
            vhost: env.notifier_rabbitmq_vhost.unwrap_or_else(|| "/".into()),
            tls: boolean("NOTIFIER_RABBITMQ_TLS", env.notifier_rabbitmq_tls)?,
            exchange,
            queue_max_length: ranged(
                "NOTIFIER_QUEUE_MAX_LENGTH",
                env.notifier_queue_max_length,
                1000,
                1,
                i32::MAX,
            )?,
            prefetch: positive("NOTIFIER_PREFETCH", env.notifier_prefetch, 64)?,
            sessions_per_channel: ranged(
                "NOTIFIER_SESSIONS_PER_CHANNEL",
                env.notifier_sessions_per_channel,
                32,
                1,
                10_000,
            )?,
            channels_per_connection: parse(
                "NOTIFIER_CHANNELS_PER_CONNECTION",
                env.notifier_channels_per_connection,
                64,
                "a whole number from 1 to 2047 (RabbitMQ's default channel_max)",
                |n| (1..=2047).contains(n),
            )?,
            consumer_connections: ranged(
                "NOTIFIER_CONSUMER_CONNECTIONS",
                env.notifier_consumer_connections,
                4,
                1,
                64,
            )?,
            publish_timeout: Duration::from_millis(ranged(
                "NOTIFIER_PUBLISH_TIMEOUT_MS",
                env.notifier_publish_timeout_ms,
                5000,
                1,
                600_000,
            )?),
            fanout: match env
                .notifier_fanout_mode
                .as_deref()
                .map(|m| m.trim().to_ascii_lowercase())
                .as_deref()
            {
                None | Some("" | "session") => FanoutMode::Session,
                Some("process") => FanoutMode::Process,
                Some(_) => {
                    return Err(ConfigError(format!(
                        "NOTIFIER_FANOUT_MODE={:?}: expected session or process",
                        env.notifier_fanout_mode.unwrap_or_default()
                    )));
                }
            },
            reconnect_max: secs(ranged(
                "NOTIFIER_RECONNECT_MAX_SECS",
                env.notifier_reconnect_max_secs,
                30,
                1,
                3600,
            )?),
        };
        let rabbitmq = match env.notifier_rabbitmq_host.map(|h| h.trim().to_owned()) {
            None => None,
            Some(host) if host.is_empty() => {
                return Err(ConfigError(
                    "NOTIFIER_RABBITMQ_HOST=\"\": expected a host name (unset it to use the embedded bus)"
                        .into(),
                ));
            }
            Some(host) => Some(RabbitConfig { host, ..rabbit }),
        };
        Ok(Self {
            // 0 asks the OS for a free port (tests, several local processes).
            port: parse("PORT", env.port, 8080, "a TCP port number from 0 to 65535", |_| true)?,
            rabbitmq,
            max_message_bytes: ranged(
                "NOTIFIER_MAX_MESSAGE_BYTES",
                env.notifier_max_message_bytes,
                4096,
                1,
                1 << 20,
            )?,
            memory_capacity: ranged(
                "NOTIFIER_MEMORY_CAPACITY",
                env.notifier_memory_capacity,
                1024,
                1,
                1 << 20,
            )?,
            ws_ping_interval: secs(ranged("NOTIFIER_WS_PING_SECS", env.notifier_ws_ping_secs, 20, 1, 3600)?),
            ws_send_timeout: secs(ranged(
                "NOTIFIER_WS_SEND_TIMEOUT_SECS",
                env.notifier_ws_send_timeout_secs,
                30,
                1,
                3600,
            )?),
            ws_max_write_buffer: ranged(
                "NOTIFIER_WS_WRITE_BUFFER_BYTES",
                env.notifier_ws_write_buffer_bytes,
                64 * 1024,
                1024,
                1 << 26,
            )?,
            shutdown_timeout: secs(ranged(
                "NOTIFIER_SHUTDOWN_TIMEOUT_SECS",
                env.notifier_shutdown_timeout_secs,
                5,
                1,
                60,
            )?),
            drain: secs(parse(
                "NOTIFIER_DRAIN_SECS",
                env.notifier_drain_secs,
                0,
                "a whole number from 0 to 300",
                |n| *n <= 300,
            )?),
            history_window: ranged(
                "NOTIFIER_HISTORY_WINDOW",
                env.notifier_history_window,
                1000,
                0,
                1_000_000,
            )?,
            limits: LimitsConfig {
                messages_per_client: ranged(
                    "NOTIFIER_MESSAGES_PER_CLIENT",
                    env.notifier_messages_per_client,
                    10,
                    1,
                    1_000_000,
                )?,
                messages_global: ranged(
                    "NOTIFIER_MESSAGES_GLOBAL",
                    env.notifier_messages_global,
                    2000,
                    1,
                    10_000_000,
                )?,
                max_sessions: ranged(
                    "NOTIFIER_MAX_SESSIONS",
                    env.notifier_max_sessions,
                    10_000,
                    1,
                    1_000_000,
                )?,
                max_sessions_per_client: ranged(
                    "NOTIFIER_MAX_SESSIONS_PER_CLIENT",
                    env.notifier_max_sessions_per_client,
                    50,
                    1,
                    1_000_000,
                )?,
                client_ip_header: env
                    .notifier_client_ip_header
                    .map(|h| h.trim().to_ascii_lowercase())
                    .filter(|h| !h.is_empty()),
            },
            replica: replica_name(env.hostname),
            log_format: log_format(env.log_format)?,
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
        self.max_message_bytes * 6 + 1024
    }

    /// `"rabbitmq"` or `"memory"`: which bus this configuration selects.
    pub fn mode(&self) -> &'static str {
        if self.rabbitmq.is_some() { "rabbitmq" } else { "memory" }
    }
}

/// RabbitMQ accepts exchange names of up to 255 bytes; `amq.` is reserved for the broker.
fn exchange_name(name: String) -> Result<String, ConfigError> {
    let name = name.trim().to_owned();
    if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
        return Err(ConfigError(format!(
            "expected a name of 1 to 255 bytes not starting with \"amq.\" while parsing value \
             '{name}' provided by NOTIFIER_EXCHANGE"
        )));
    }
    Ok(name)
}

/// A queue name RabbitMQ accepts: 1 to 255 bytes, not starting with `amq.`.
fn queue_name(variable: &str, name: String) -> Result<String, ConfigError> {
    let name = name.trim().to_owned();
    if name.is_empty() || name.len() > 255 || name.starts_with("amq.") {
        return Err(ConfigError(format!(
            "{variable}={name:?}: expected a name of 1 to 255 bytes not starting with \"amq.\""
        )));
    }
    Ok(name)
}

/// A stream's `x-max-age`: a whole number and a unit, `Y`, `M`, `D`, `h`, `m` or `s`.
fn max_age(raw: Option<String>) -> Result<String, ConfigError> {
    let Some(raw) = raw else { return Ok("7D".into()) };
    let age = raw.trim();
    let (number, unit) = age.split_at(age.len().saturating_sub(1));
    let valid = matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s")
        && number.parse::<u32>().is_ok_and(|n| n > 0)
        && number.bytes().all(|b| b.is_ascii_digit());
    if !valid {
        return Err(ConfigError(format!(
            "NOTIFIER_HISTORY_MAX_AGE={raw:?}: expected a whole number followed by Y, M, D, h, m or s (e.g. 7D)"
        )));
    }
    Ok(age.to_owned())
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

    fn parse(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    #[test]
    fn an_empty_environment_selects_the_embedded_bus_on_8080() {
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.port, 8080);
        assert!(cfg.rabbitmq.is_none());
        assert_eq!(cfg.mode(), "memory");
        assert_eq!(cfg.max_message_bytes, 4096);
        assert_eq!(cfg.log_format, LogFormat::Text);
    }

    #[test]
    fn a_broker_host_selects_rabbitmq_with_the_contract_defaults() {
        let cfg = parse(&[("NOTIFIER_RABBITMQ_HOST", "rabbit.svc")]).unwrap();
        let r = cfg.rabbitmq.unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.user.as_str(), r.password.expose(), r.vhost.as_str()),
            ("rabbit.svc", 5672, "guest", "guest", "/")
        );
        assert!(!r.tls);
        assert_eq!(r.exchange, "chat");
        assert!(r.session_capacity() >= 5000, "defaults must hold 5,000 sessions");
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
        assert_eq!(cfg.max_message_bytes, 100);
        assert_eq!(cfg.replica, "fanout-chat-7d9f-abcde");
        assert_eq!(cfg.log_format, LogFormat::Json);
    }

    #[test]
    fn a_bad_port_names_the_variable_and_what_it_expected() {
        let err = parse(&[("PORT", "abc")]).unwrap_err().to_string();
        assert!(err.contains("PORT"), "{err}");
        assert!(err.contains("expected a TCP port number"), "{err}");
        assert!(err.contains("\"abc\""), "shows the value: {err}");
        let err = parse(&[("PORT", "70000")]).unwrap_err().to_string();
        assert!(err.contains("PORT"), "{err}");
    }

    #[test]
    fn a_bad_boolean_names_the_variable() {
        let err = parse(&[("NOTIFIER_RABBITMQ_TLS", "maybe")]).unwrap_err().to_string();
        assert!(err.contains("NOTIFIER_RABBITMQ_TLS"), "{err}");
        assert!(err.contains("expected true or false"), "{err}");
    }

    #[test]
    fn a_zero_limit_is_refused() {
        let err = parse(&[("NOTIFIER_MAX_MESSAGE_BYTES", "0")]).unwrap_err().to_string();
        assert!(err.contains("NOTIFIER_MAX_MESSAGE_BYTES"), "{err}");
    }

    #[test]
    fn a_reserved_exchange_name_is_refused() {
        let err = parse(&[("NOTIFIER_RABBITMQ_HOST", "h"), ("NOTIFIER_EXCHANGE", "amq.fanout")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("NOTIFIER_EXCHANGE"), "{err}");
    }

    #[test]
    fn history_settings_are_read_and_checked() {
        let cfg = parse(&[("NOTIFIER_RABBITMQ_HOST", "h"), ("NOTIFIER_EXCHANGE", "news")]).unwrap();
        let stream = cfg.rabbitmq.unwrap().history;
        assert_eq!((stream.name.as_str(), stream.max_age.as_str()), ("news.history", "7D"));
        assert_eq!((cfg.history_window, stream.max_bytes), (1000, 100_000_000));
        let cfg = parse(&[
            ("NOTIFIER_RABBITMQ_HOST", "h"),
            ("NOTIFIER_HISTORY_STREAM", "chat-log"),
            ("NOTIFIER_HISTORY_MAX_AGE", "12h"),
            ("NOTIFIER_HISTORY_MAX_BYTES", "5000000"),
            ("NOTIFIER_HISTORY_WINDOW", "0"),
        ])
        .unwrap();
        let stream = cfg.rabbitmq.unwrap().history;
        assert_eq!(
            (stream.name.as_str(), stream.max_age.as_str(), stream.max_bytes),
            ("chat-log", "12h", 5_000_000)
        );
        assert_eq!(cfg.history_window, 0, "0 turns history off");
        for (var, value) in [
            ("NOTIFIER_HISTORY_MAX_AGE", "7"),
            ("NOTIFIER_HISTORY_MAX_AGE", "-1D"),
            ("NOTIFIER_HISTORY_MAX_AGE", "1W"),
            ("NOTIFIER_HISTORY_MAX_BYTES", "10"),
            ("NOTIFIER_HISTORY_STREAM", "amq.x"),
            ("NOTIFIER_HISTORY_WINDOW", "many"),
        ] {
            let err = parse(&[(var, value)]).unwrap_err().to_string();
            assert!(err.contains(var), "{var}={value}: {err}");
        }
    }

    #[test]
    fn the_password_never_shows_in_debug_output() {
        let cfg =
            parse(&[("NOTIFIER_RABBITMQ_HOST", "h"), ("NOTIFIER_RABBITMQ_PASSWORD", "hunter2")]).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
