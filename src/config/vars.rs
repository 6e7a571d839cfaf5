//! The raw environment and the helpers that turn one variable into one typed value.
//!
//! Each helper takes the variable's name, so every error names the variable, shows the value
//! and says what was expected. What the variables mean is documented on the settings they
//! fill, in [`super`] and `rabbit.rs`.

use std::{fmt, str::FromStr, time::Duration};

use serde::Deserialize;

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

/// Why the environment could not be turned into a [`Config`](super::Config).
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub(super) String);

/// The environment as envy sees it: one field per variable (lower-cased), raw text. Typed
/// parsing happens in each group's `read`, which takes the fields it needs, so every error
/// can name its variable and say what was expected.
#[derive(Deserialize)]
pub(super) struct Env {
    pub(super) port: Option<String>,
    pub(super) notifier_rabbitmq_host: Option<String>,
    pub(super) notifier_rabbitmq_port: Option<String>,
    pub(super) notifier_rabbitmq_user: Option<String>,
    pub(super) notifier_rabbitmq_password: Option<String>,
    pub(super) notifier_rabbitmq_vhost: Option<String>,
    pub(super) notifier_rabbitmq_tls: Option<String>,
    pub(super) notifier_exchange: Option<String>,
    pub(super) notifier_max_message_bytes: Option<String>,
    pub(super) notifier_memory_capacity: Option<String>,
    pub(super) notifier_queue_max_length: Option<String>,
    pub(super) notifier_prefetch: Option<String>,
    pub(super) notifier_sessions_per_channel: Option<String>,
    pub(super) notifier_channels_per_connection: Option<String>,
    pub(super) notifier_consumer_connections: Option<String>,
    pub(super) notifier_publish_timeout_ms: Option<String>,
    pub(super) notifier_reconnect_max_secs: Option<String>,
    pub(super) notifier_fanout_mode: Option<String>,
    pub(super) notifier_history_window: Option<String>,
    pub(super) notifier_history_stream: Option<String>,
    pub(super) notifier_history_max_age: Option<String>,
    pub(super) notifier_history_max_bytes: Option<String>,
    pub(super) notifier_ws_ping_secs: Option<String>,
    pub(super) notifier_ws_send_timeout_secs: Option<String>,
    pub(super) notifier_ws_write_buffer_bytes: Option<String>,
    pub(super) notifier_ws_stalled_bytes: Option<String>,
    pub(super) notifier_http_write_timeout_secs: Option<String>,
    pub(super) notifier_shutdown_timeout_secs: Option<String>,
    pub(super) notifier_drain_secs: Option<String>,
    pub(super) notifier_messages_per_client: Option<String>,
    pub(super) notifier_messages_global: Option<String>,
    pub(super) notifier_max_sessions: Option<String>,
    pub(super) notifier_max_sessions_per_client: Option<String>,
    pub(super) notifier_client_ip_header: Option<String>,
    pub(super) notifier_trusted_proxies: Option<String>,
    pub(super) notifier_history_per_client: Option<String>,
    pub(super) notifier_sessions_opened_per_client: Option<String>,
    pub(super) notifier_messages_per_key: Option<String>,
    pub(super) notifier_api_keys: Option<String>,
    pub(super) notifier_api_keys_file: Option<String>,
    pub(super) notifier_allowed_origins: Option<String>,
    pub(super) hostname: Option<String>,
    pub(super) log_format: Option<String>,
    pub(super) rust_log: Option<String>,
    pub(super) notifier_readyz_detail: Option<String>,
}

impl Env {
    /// Reads `(NAME, value)` pairs; fails only on what envy itself refuses.
    pub(super) fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        envy::from_iter(vars).map_err(|e| ConfigError(e.to_string()))
    }
}

/// Parses one variable, or takes its default when it is unset.
pub(super) fn parse<T: FromStr>(
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

pub(super) fn port(name: &str, raw: Option<String>, default: u16) -> Result<u16, ConfigError> {
    parse(name, raw, default, "a TCP port number from 1 to 65535", |p| *p > 0)
}

/// A whole number within `low..=high`: upper bounds keep every derived figure (frame limits,
/// timeouts) far from overflow.
pub(super) fn ranged<T: FromStr + PartialOrd + fmt::Display + Copy>(
    name: &str,
    raw: Option<String>,
    default: T,
    low: T,
    high: T,
) -> Result<T, ConfigError> {
    parse(name, raw, default, &format!("a whole number from {low} to {high}"), |n| (low..=high).contains(n))
}

pub(super) fn positive<T: FromStr + Default + PartialOrd>(
    name: &str,
    raw: Option<String>,
    default: T,
) -> Result<T, ConfigError> {
    parse(name, raw, default, "a whole number greater than 0", |n| *n > T::default())
}

pub(super) fn boolean(name: &str, raw: Option<String>) -> Result<bool, ConfigError> {
    match raw.as_deref().map(|r| r.trim().to_ascii_lowercase()).as_deref() {
        None | Some("false" | "0" | "no" | "") => Ok(false),
        Some("true" | "1" | "yes") => Ok(true),
        Some(_) => Err(ConfigError(format!("{name}={:?}: expected true or false", raw.unwrap_or_default()))),
    }
}

pub(super) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[cfg(test)]
mod tests {
    use crate::config::tests::parse;

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
    fn the_password_never_shows_in_debug_output() {
        let cfg =
            parse(&[("NOTIFIER_RABBITMQ_HOST", "h"), ("NOTIFIER_RABBITMQ_PASSWORD", "hunter2")]).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
