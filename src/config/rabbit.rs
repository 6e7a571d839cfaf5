//! The RabbitMQ settings: where the broker is, how sessions share its channels, and the
//! history stream. Present in [`Config`](super::Config) only when `NOTIFIER_RABBITMQ_HOST` is
//! set, yet always read and checked.

use std::time::Duration;

use super::vars::{ConfigError, Env, Secret, boolean, parse, port, positive, ranged, secs};

/// Where and how to reach RabbitMQ; present only when `NOTIFIER_RABBITMQ_HOST` is set.
#[derive(Clone, Debug)]
pub struct RabbitConfig {
    /// `NOTIFIER_RABBITMQ_HOST`: one broker host, or several separated by commas, each with an
    /// optional `:port` (`a,b:5682,c`); see [`RabbitConfig::endpoints`].
    pub host: String,
    /// `NOTIFIER_RABBITMQ_PORT` (default `5672`): the port of every host that names none.
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
    /// (per-session bounded buffers of `NOTIFIER_MEMORY_CAPACITY`; a slow session skips ahead,
    /// and gets what it skipped from the history window). Far fewer broker deliveries at
    /// thousands of sessions.
    Process,
}

/// One broker address as configured: a host name or IP address, and a port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// `NOTIFIER_RABBITMQ_HOST` split into addresses: `a`, `a:5682`, `10.0.0.1`, `[::1]:5682`,
/// separated by commas; a host without a port gets `default_port`.
pub fn parse_endpoints(hosts: &str, default_port: u16) -> Result<Vec<Endpoint>, String> {
    let mut endpoints = Vec::new();
    for item in hosts.split(',').map(str::trim) {
        if item.is_empty() {
            return Err("expected host names separated by commas, found an empty one".into());
        }
        let (host, port) = if let Some(rest) = item.strip_prefix('[') {
            // [IPv6] or [IPv6]:port
            let (ip, after) = rest.split_once(']').ok_or_else(|| format!("{item:?}: missing ']'"))?;
            match after {
                "" => (ip, None),
                _ => (
                    ip,
                    Some(
                        after
                            .strip_prefix(':')
                            .ok_or_else(|| format!("{item:?}: expected :port after ']'"))?,
                    ),
                ),
            }
        } else if item.matches(':').count() > 1 {
            (item, None) // a bare IPv6 address
        } else {
            match item.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (item, None),
            }
        };
        let port = match port {
            None => default_port,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{item:?}: the port must be a number from 1 to 65535"))?,
        };
        let valid_name = !host.is_empty()
            && host.len() <= 253
            && (host.parse::<std::net::IpAddr>().is_ok()
                || host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'));
        if !valid_name {
            return Err(format!("{item:?}: expected a host name or an IP address"));
        }
        let endpoint = Endpoint { host: host.to_owned(), port };
        if !endpoints.contains(&endpoint) {
            endpoints.push(endpoint);
        }
    }
    Ok(endpoints)
}

impl RabbitConfig {
    /// The broker addresses to connect to, in the order configured: each new connection takes
    /// the next (see `bus::rabbit::address`). A name that resolves to several addresses (a
    /// headless Service) counts as several.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        // Checked when the configuration was read; a value set in code (tests) that does not
        // parse is taken as one host.
        parse_endpoints(&self.host, self.port)
            .unwrap_or_else(|_| vec![Endpoint { host: self.host.clone(), port: self.port }])
    }

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
            Some(host) => {
                parse_endpoints(&host, rabbit.port)
                    .map_err(|e| ConfigError(format!("NOTIFIER_RABBITMQ_HOST={host:?}: {e}")))?;
                Ok(Some(RabbitConfig { host, ..rabbit }))
            }
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
    fn several_broker_hosts_each_with_an_optional_port() {
        use super::{Endpoint, parse_endpoints};
        let e = |h: &str, p| Endpoint { host: h.into(), port: p };
        assert_eq!(parse_endpoints("rabbit.svc", 5672).unwrap(), vec![e("rabbit.svc", 5672)]);
        assert_eq!(
            parse_endpoints(" a , b:5682,10.0.0.3,[::1]:5700,::2 ", 5671).unwrap(),
            vec![e("a", 5671), e("b", 5682), e("10.0.0.3", 5671), e("::1", 5700), e("::2", 5671)]
        );
        assert_eq!(parse_endpoints("a,a:5672", 5672).unwrap(), vec![e("a", 5672)], "duplicates once");
        assert_eq!(e("::1", 5672).to_string(), "[::1]:5672");
        let cfg =
            parse(&[("NOTIFIER_RABBITMQ_HOST", "a,b:5682"), ("NOTIFIER_RABBITMQ_PORT", "5681")]).unwrap();
        assert_eq!(cfg.rabbitmq.unwrap().endpoints(), vec![e("a", 5681), e("b", 5682)]);
        for bad in ["a,,b", "a:0", "a:99999", "a:x", "a b", "[::1", "[::1]5672", ","] {
            let err = parse(&[("NOTIFIER_RABBITMQ_HOST", bad)]).unwrap_err().to_string();
            assert!(err.contains("NOTIFIER_RABBITMQ_HOST"), "{bad}: {err}");
        }
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
