//! The RabbitMQ settings: where the broker is, how sessions share its channels, and the
//! history stream. Present in [`Config`](super::Config) only when `NOTIFIER_RABBITMQ_HOST` is
//! set, yet always read and checked.

use std::time::Duration;

use super::vars::{ConfigError, Env, Secret, boolean, parse, port, positive, ranged, secs};

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
    /// `NOTIFIER_PREFETCH` (default `8`): unacknowledged deliveries per session consumer. This
    /// is also the bound on lapin's in-process buffer for the session: a browser that stops
    /// reading holds up to this many messages in the process (8 × a 25 KB frame at most).
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

    /// Reads every RabbitMQ variable; `None` when `NOTIFIER_RABBITMQ_HOST` is unset.
    pub(super) fn read(env: &mut Env) -> Result<Option<Self>, ConfigError> {
        // Every variable is checked, even those of the bus not in use: a typo in a deployment
        // should fail now, not when someone switches buses.
        let exchange = exchange_name(env.notifier_exchange.take().unwrap_or_else(|| "chat".into()))?;
        let history = StreamConfig::read(env, &exchange)?;
        let rabbit = RabbitConfig {
            history,
            host: String::new(),
            port: port("NOTIFIER_RABBITMQ_PORT", env.notifier_rabbitmq_port.take(), 5672)?,
            user: env.notifier_rabbitmq_user.take().unwrap_or_else(|| "guest".into()),
            password: Secret::new(env.notifier_rabbitmq_password.take().unwrap_or_else(|| "guest".into())),
            vhost: env.notifier_rabbitmq_vhost.take().unwrap_or_else(|| "/".into()),
            tls: boolean("NOTIFIER_RABBITMQ_TLS", env.notifier_rabbitmq_tls.take())?,
            exchange,
            queue_max_length: ranged(
                "NOTIFIER_QUEUE_MAX_LENGTH",
                env.notifier_queue_max_length.take(),
                1000,
                1,
                i32::MAX,
            )?,
            prefetch: positive("NOTIFIER_PREFETCH", env.notifier_prefetch.take(), 8)?,
            sessions_per_channel: ranged(
                "NOTIFIER_SESSIONS_PER_CHANNEL",
                env.notifier_sessions_per_channel.take(),
                32,
                1,
                10_000,
            )?,
            channels_per_connection: parse(
                "NOTIFIER_CHANNELS_PER_CONNECTION",
                env.notifier_channels_per_connection.take(),
                64,
                "a whole number from 1 to 2047 (RabbitMQ's default channel_max)",
                |n| (1..=2047).contains(n),
            )?,
            consumer_connections: ranged(
                "NOTIFIER_CONSUMER_CONNECTIONS",
                env.notifier_consumer_connections.take(),
                4,
                1,
                64,
            )?,
            publish_timeout: Duration::from_millis(ranged(
                "NOTIFIER_PUBLISH_TIMEOUT_MS",
                env.notifier_publish_timeout_ms.take(),
                5000,
                1,
                600_000,
            )?),
            fanout: fanout_mode(env.notifier_fanout_mode.take())?,
            reconnect_max: secs(ranged(
                "NOTIFIER_RECONNECT_MAX_SECS",
                env.notifier_reconnect_max_secs.take(),
                30,
                1,
                3600,
            )?),
        };
        match env.notifier_rabbitmq_host.take().map(|h| h.trim().to_owned()) {
            None => Ok(None),
            Some(host) if host.is_empty() => Err(ConfigError(
                "NOTIFIER_RABBITMQ_HOST=\"\": expected a host name (unset it to use the embedded bus)".into(),
            )),
            Some(host) => Ok(Some(RabbitConfig { host, ..rabbit })),
        }
    }
}

impl StreamConfig {
    /// Reads the history stream's variables; its name defaults to `<exchange>.history`.
    fn read(env: &mut Env, exchange: &str) -> Result<Self, ConfigError> {
        Ok(Self {
            name: queue_name(
                "NOTIFIER_HISTORY_STREAM",
                env.notifier_history_stream.take().unwrap_or_else(|| format!("{exchange}.history")),
            )?,
            max_age: max_age(env.notifier_history_max_age.take())?,
            max_bytes: ranged(
                "NOTIFIER_HISTORY_MAX_BYTES",
                env.notifier_history_max_bytes.take(),
                100_000_000,
                1_000_000,
                1 << 50,
            )?,
        })
    }
}

fn fanout_mode(raw: Option<String>) -> Result<FanoutMode, ConfigError> {
    match raw.as_deref().map(|m| m.trim().to_ascii_lowercase()).as_deref() {
        None | Some("" | "session") => Ok(FanoutMode::Session),
        Some("process") => Ok(FanoutMode::Process),
        Some(_) => Err(ConfigError(format!(
            "NOTIFIER_FANOUT_MODE={:?}: expected session or process",
            raw.unwrap_or_default()
        ))),
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

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
        assert_eq!((cfg.history.window, stream.max_bytes), (1000, 100_000_000));
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
        assert_eq!(cfg.history.window, 0, "0 turns history off");
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
}
