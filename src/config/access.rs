//! Service API keys (`NOTIFIER_API_KEYS`, `NOTIFIER_API_KEYS_FILE`) and the browser origins
//! allowed to use the server (`NOTIFIER_ALLOWED_ORIGINS`).
//!
//! A key is never shown: not by `Debug`, not in an error message, not in a log line.

use std::{fmt, path::Path, sync::Arc};

use subtle::ConstantTimeEq;

use super::{ConfigError, Secret};

/// Shortest key accepted: a guessable key is no credential.
const MIN_KEY_LEN: usize = 16;
/// Longest key accepted: keys are compared padded to this length, so that the time taken does
/// not tell a key's length either.
const MAX_KEY_LEN: usize = 256;
/// Longest key name: it is a label (in `from`, in metrics).
const MAX_NAME_LEN: usize = 64;

/// The services' keys, by name. Empty: every caller is anonymous.
#[derive(Clone, Default)]
pub struct ApiKeys(Vec<ApiKey>);

#[derive(Clone)]
struct ApiKey {
    name: Arc<str>,
    key: Secret,
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl ApiKeys {
    /// Reads `name:key` pairs from the comma list `list` and the file at `file` (one a line;
    /// blank lines and lines starting with `#` are skipped).
    pub fn read(list: Option<&str>, file: Option<&str>) -> Result<Self, ConfigError> {
        let mut keys = Self::default();
        if let Some(list) = list {
            // Empty entries (a trailing comma, an empty variable) are skipped.
            for (index, item) in list.split(',').map(str::trim).enumerate().filter(|(_, i)| !i.is_empty()) {
                keys.add(item)
                    .map_err(|e| ConfigError(format!("NOTIFIER_API_KEYS: entry {}: {e}", index + 1)))?;
            }
        }
        if let Some(path) = file.map(str::trim).filter(|p| !p.is_empty()) {
            let text = std::fs::read_to_string(Path::new(path))
                .map_err(|e| ConfigError(format!("NOTIFIER_API_KEYS_FILE={path:?}: cannot read it: {e}")))?;
            for (index, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                keys.add(line).map_err(|e| {
                    ConfigError(format!("NOTIFIER_API_KEYS_FILE={path:?}: line {}: {e}", index + 1))
                })?;
            }
        }
        Ok(keys)
    }

    /// Adds one `name:key`. The error shows neither: an entry written the wrong way round
    /// (`key:name`) would otherwise print its key.
    fn add(&mut self, entry: &str) -> Result<(), String> {
        let Some((name, key)) = entry.split_once(':') else {
            return Err("expected name:key".into());
        };
        let (name, key) = (name.trim(), key.trim());
        let name_ok = !name.is_empty()
            && name.len() <= MAX_NAME_LEN
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(format!("the name must be 1 to {MAX_NAME_LEN} letters, digits, '-', '_' or '.'"));
        }
        let key_ok = (MIN_KEY_LEN..=MAX_KEY_LEN).contains(&key.len())
            && key.bytes().all(|b| b.is_ascii_graphic() && b != b',');
        if !key_ok {
            return Err(format!(
                "the key must be {MIN_KEY_LEN} to {MAX_KEY_LEN} printable characters, without spaces or commas"
            ));
        }
        if self.0.iter().any(|k| &*k.name == name) {
            return Err("the same name as an earlier entry".into());
        }
        if self.find(key).is_some() {
            return Err("the same key as an earlier entry".into());
        }
        self.0.push(ApiKey { name: name.into(), key: Secret::new(key) });
        Ok(())
    }

    /// The name of the key `presented`, if it is one. Every key is compared, each in constant
    /// time over [`MAX_KEY_LEN`] bytes, so the time taken tells neither how much of a key was
    /// right, nor which key, nor how long the keys are.
    pub fn find(&self, presented: &str) -> Option<Arc<str>> {
        if presented.len() > MAX_KEY_LEN {
            return None; // No key is that long.
        }
        let padded = pad(presented.as_bytes());
        let length = presented.len() as u64;
        let mut found = None;
        for key in &self.0 {
            let own = key.key.expose().as_bytes();
            let same = pad(own).ct_eq(&padded) & (own.len() as u64).ct_eq(&length);
            if bool::from(same) {
                found = Some(key.name.clone());
            }
        }
        found
    }

    /// The names of the keys, in the order given.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|k| &*k.name)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// `bytes` (at most [`MAX_KEY_LEN`]) zero-padded to [`MAX_KEY_LEN`].
fn pad(bytes: &[u8]) -> [u8; MAX_KEY_LEN] {
    let mut padded = [0u8; MAX_KEY_LEN];
    let n = bytes.len().min(MAX_KEY_LEN);
    padded[..n].copy_from_slice(&bytes[..n]);
    padded
}

/// `NOTIFIER_ALLOWED_ORIGINS`: which browser origins may open a WebSocket or post, besides the
/// page's own (always allowed: the page served by this server posts to it).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AllowedOrigins {
    /// Unset: only the page's own origin (the request's `Host`, or `X-Forwarded-Host` behind
    /// a proxy trusted by `NOTIFIER_CLIENT_IP_HEADER`).
    #[default]
    SameOrigin,
    /// `*`: any origin.
    Any,
    /// The page's own origin and these, `scheme://host[:port]`, compared without case.
    List(Vec<String>),
}

impl AllowedOrigins {
    pub fn read(raw: Option<&str>) -> Result<Self, ConfigError> {
        let Some(raw) = raw.map(str::trim).filter(|r| !r.is_empty()) else { return Ok(Self::SameOrigin) };
        if raw == "*" {
            return Ok(Self::Any);
        }
        let mut list = Vec::new();
        for origin in raw.split(',').map(|o| o.trim().trim_end_matches('/')) {
            let valid = origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
            });
            if !valid {
                return Err(ConfigError(format!(
                    "NOTIFIER_ALLOWED_ORIGINS={raw:?}: {origin:?} is not an origin; expected * or a comma list \
                     such as https://chat.example.com,http://localhost:8080"
                )));
            }
            list.push(origin.to_ascii_lowercase());
        }
        Ok(Self::List(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_the_list_and_the_file_and_are_found_by_value() {
        let file = std::env::temp_dir().join(format!("fanout-chat-keys-{}", std::process::id()));
        std::fs::write(
            &file,
            "# services\nbilling:bbbbbbbbbbbbbbbbbbbbbbbb\n\n  ci : cccccccccccccccccc  \r\n",
        )
        .unwrap();
        let keys = ApiKeys::read(Some("alerts:aaaaaaaaaaaaaaaaaaaa"), file.to_str()).unwrap();
        std::fs::remove_file(&file).unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["alerts", "billing", "ci"]);
        assert_eq!(keys.find("bbbbbbbbbbbbbbbbbbbbbbbb").as_deref(), Some("billing"));
        assert_eq!(keys.find("cccccccccccccccccc").as_deref(), Some("ci"));
        assert_eq!(keys.find("bbbbbbbbbbbbbbbbbbbbbbb"), None, "a prefix is not the key");
        assert_eq!(keys.find(""), None);
        assert!(!format!("{keys:?}").contains("aaaa"), "Debug shows names only");
        assert!(ApiKeys::read(None, None).unwrap().is_empty());
        assert!(ApiKeys::read(Some(" "), Some("")).unwrap().is_empty());
    }

    #[test]
    fn a_bad_key_entry_names_the_variable_and_entry_and_never_echoes_a_name_or_key() {
        let key = "0123456789abcdef";
        for (list, expected) in [
            ("billing", "expected name:key"),
            ("billing:short", "16 to 256"),
            ("bad name:0123456789abcdef0", "must be 1 to 64"),
            ("a:0123456789abcdef0,a:0123456789abcdef1", "same name"),
            ("a:0123456789abcdef0,b:0123456789abcdef0", "same key"),
            ("x:0123456789abcdef y", "without spaces"),
            // Written the wrong way round: the "name" is the key.
            ("0123456789abcdef0123:billing", "16 to 256"),
            ("a+b/c=0123456789abcdef:billing", "must be 1 to 64"),
        ] {
            let err = ApiKeys::read(Some(list), None).unwrap_err().to_string();
            assert!(err.contains("NOTIFIER_API_KEYS: entry"), "{list}: {err}");
            assert!(err.contains(expected), "{list}: {err}");
            assert!(!err.contains(key) && !err.contains("billing"), "echoes an entry: {err}");
        }
        let err = ApiKeys::read(None, Some("/nonexistent/keys")).unwrap_err().to_string();
        assert!(err.contains("NOTIFIER_API_KEYS_FILE") && err.contains("/nonexistent/keys"), "{err}");
        let long = format!("a:{}", "k".repeat(257));
        assert!(ApiKeys::read(Some(&long), None).is_err(), "a key over 256 bytes");
        let keys = ApiKeys::read(Some("a:0123456789abcdef0,"), None).unwrap();
        assert_eq!(keys.names().collect::<Vec<_>>(), ["a"], "a trailing comma is no entry");
        assert_eq!(keys.find(&"k".repeat(300)), None);
    }

    #[test]
    fn allowed_origins_are_the_page_itself_any_or_a_list() {
        assert_eq!(AllowedOrigins::read(None).unwrap(), AllowedOrigins::SameOrigin);
        assert_eq!(AllowedOrigins::read(Some("*")).unwrap(), AllowedOrigins::Any);
        assert_eq!(
            AllowedOrigins::read(Some("https://Chat.example.com/, http://localhost:8080")).unwrap(),
            AllowedOrigins::List(vec!["https://chat.example.com".into(), "http://localhost:8080".into()])
        );
        for bad in ["chat.example.com", "ftp://x", "https://x/path", "https://"] {
            let err = AllowedOrigins::read(Some(bad)).unwrap_err().to_string();
            assert!(err.contains("NOTIFIER_ALLOWED_ORIGINS"), "{bad}: {err}");
        }
    }
}
