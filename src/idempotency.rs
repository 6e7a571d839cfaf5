//! `Idempotency-Key` on `POST /messages`: a retry with the same key publishes at most once.
//!
//! A caller that got no answer, or a 503 after the broker took too long to confirm, cannot know
//! whether its message went out. With a key, it may simply send the same request again:
//!
//! - The message's id is made from the key: its random part is a hash of the key and the
//!   caller (its service key's name, or "anonymous"), so every replica gives the same request
//!   the same place in the history window. A retry that finds the message there, on any
//!   replica, gets `202` with that envelope and publishes nothing.
//! - This replica also remembers the envelope of each key it published (see [`Keys`]): a retry
//!   after a failed or timed-out attempt publishes the *same* envelope again (same id, `ts`
//!   and body), whose second copy every session and the window drop as a copy they have.
//! - A retry while the first attempt is still waiting for the broker gets `409`, and one whose
//!   message differs from the first's gets `422`.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash, Hasher},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::chat::{Envelope, NewMessage};

/// Longest key, in bytes. Keys are visible ASCII (a UUID is the usual choice).
pub const MAX_KEY_BYTES: usize = 255;
/// Keys remembered per replica: the oldest are forgotten first. Each holds its envelope, so
/// this bounds their memory at 2,000 of the largest messages (8 MiB at the default limit).
const REMEMBERED: usize = 2_000;
/// How long a key is remembered by this replica. Retries come within seconds or minutes; the
/// history window answers for its message for as long as it holds it, on every replica.
const REMEMBERED_FOR: Duration = Duration::from_secs(60 * 60);

/// Whether `key` has a key's form: 1 to [`MAX_KEY_BYTES`] visible ASCII characters.
pub fn is_valid_key(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && key.bytes().all(|b| b.is_ascii_graphic())
}

/// The sentence for a 400 about a key's form.
pub fn key_form() -> String {
    format!("Idempotency-Key must be 1 to {MAX_KEY_BYTES} visible ASCII characters (a UUID, for example)")
}

/// The random part (80 bits) of the id of the message a key stands for. The same on every
/// replica: it hashes with fixed keys.
pub fn random_part(scope: &str, key: &str) -> u128 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ("idempotency-key", scope, key).hash(&mut hasher);
    let high = hasher.finish();
    high.hash(&mut hasher);
    let low = hasher.finish() & 0xffff;
    (u128::from(high) << 16) | u128::from(low)
}

/// What a request with a key may do.
#[derive(Debug)]
pub enum Claim {
    /// Publish this envelope: the first attempt, or a retry of one that did not succeed (the
    /// same envelope again). Report the outcome with [`Keys::settle`].
    Publish(Envelope),
    /// Already published and confirmed: answer with this envelope.
    Done(Envelope),
    /// Another request with this key is waiting for the broker.
    InFlight,
    /// The key was used for another message.
    Mismatch,
}

enum State {
    InFlight(Envelope),
    Done(Envelope),
    /// The last attempt failed (or its confirm never came): a retry sends it again.
    Retry(Envelope),
}

struct Remembered {
    state: State,
    since: Instant,
}

/// The keys this replica has seen, bounded in number and age.
#[derive(Default)]
pub struct Keys(Mutex<Table>);

#[derive(Default)]
struct Table {
    by_key: HashMap<(String, String), Remembered>,
    /// Insertion order, to forget the oldest first.
    order: VecDeque<(String, String)>,
}

impl Keys {
    /// Claims `key` of `scope` for `message`; `fresh` makes the envelope of a first attempt.
    pub fn claim(
        &self,
        scope: &str,
        key: &str,
        message: &NewMessage,
        fresh: impl FnOnce() -> Envelope,
    ) -> Claim {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table.forget_old();
        let id = (scope.to_owned(), key.to_owned());
        if let Some(remembered) = table.by_key.get_mut(&id) {
            let envelope = match &remembered.state {
                State::InFlight(e) | State::Done(e) | State::Retry(e) => e,
            };
            if !envelope.carries(message) {
                return Claim::Mismatch;
            }
            return match &remembered.state {
                State::InFlight(_) => Claim::InFlight,
                State::Done(e) => Claim::Done(e.clone()),
                State::Retry(e) => {
                    let envelope = e.clone();
                    remembered.state = State::InFlight(envelope.clone());
                    Claim::Publish(envelope)
                }
            };
        }
        let envelope = fresh();
        table.order.push_back(id.clone());
        table
            .by_key
            .insert(id, Remembered { state: State::InFlight(envelope.clone()), since: Instant::now() });
        Claim::Publish(envelope)
    }

    /// Records how a [`Claim::Publish`] went.
    pub fn settle(&self, scope: &str, key: &str, published: bool) {
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(remembered) = table.by_key.get_mut(&(scope.to_owned(), key.to_owned()))
            && let State::InFlight(envelope) = &remembered.state
        {
            let envelope = envelope.clone();
            remembered.state = if published { State::Done(envelope) } else { State::Retry(envelope) };
        }
    }
}

impl Table {
    fn forget_old(&mut self) {
        while let Some(oldest) = self.order.front() {
            let expired = self.by_key.get(oldest).is_none_or(|r| r.since.elapsed() > REMEMBERED_FOR);
            if !expired && self.order.len() <= REMEMBERED {
                break;
            }
            if let Some(oldest) = self.order.pop_front() {
                self.by_key.remove(&oldest);
            }
        }
    }
}

/// Settles a claim as failed if the request goes away before it is answered (the client hung
/// up): the key must not stay "in flight" for ever.
pub struct Settle<'a> {
    keys: &'a Keys,
    scope: &'a str,
    key: &'a str,
    done: bool,
}

impl<'a> Settle<'a> {
    pub fn new(keys: &'a Keys, scope: &'a str, key: &'a str) -> Self {
        Self { keys, scope, key, done: false }
    }

    pub fn finish(mut self, published: bool) {
        self.keys.settle(self.scope, self.key, published);
        self.done = true;
    }
}

impl Drop for Settle<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.keys.settle(self.scope, self.key, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(text: &str) -> NewMessage {
        crate::chat::Draft { text: Some(text.into()), user: None }.validate(1000).unwrap()
    }

    #[test]
    fn a_key_publishes_once_retries_a_failure_with_the_same_envelope_and_refuses_another_message() {
        let keys = Keys::default();
        let first = Envelope::with_random(message("hello"), None, random_part("anonymous", "k1"));
        let Claim::Publish(sent) = keys.claim("anonymous", "k1", &message("hello"), || first.clone()) else {
            panic!("a first attempt publishes")
        };
        assert_eq!(sent, first);
        assert!(matches!(
            keys.claim("anonymous", "k1", &message("hello"), || unreachable!()),
            Claim::InFlight
        ));
        keys.settle("anonymous", "k1", false);
        let Claim::Publish(again) = keys.claim("anonymous", "k1", &message("hello"), || unreachable!())
        else {
            panic!("a retry after a failure publishes again")
        };
        assert_eq!(again, first, "the same envelope: same id, ts and body");
        keys.settle("anonymous", "k1", true);
        assert!(
            matches!(keys.claim("anonymous", "k1", &message("hello"), || unreachable!()), Claim::Done(e) if e == first)
        );
        assert!(matches!(
            keys.claim("anonymous", "k1", &message("other"), || unreachable!()),
            Claim::Mismatch
        ));
        // Another caller's key of the same name is its own.
        assert!(matches!(
            keys.claim("billing", "k1", &message("hello"), || first.clone()),
            Claim::Publish(_)
        ));
        // A request that went away before its answer leaves the key ready for a retry.
        drop(Settle::new(&keys, "billing", "k1"));
        assert!(matches!(
            keys.claim("billing", "k1", &message("hello"), || unreachable!()),
            Claim::Publish(_)
        ));
    }

    #[test]
    fn a_replica_remembers_a_bounded_number_of_keys_oldest_forgotten_first() {
        let keys = Keys::default();
        let fresh = || Envelope::with_random(message("m"), None, 1);
        for n in 0..=REMEMBERED {
            assert!(matches!(
                keys.claim("anonymous", &n.to_string(), &message("m"), fresh),
                Claim::Publish(_)
            ));
            keys.settle("anonymous", &n.to_string(), true);
        }
        // The next claim forgets the oldest: key 0 is new again, key 1 still known.
        assert!(matches!(keys.claim("anonymous", "1", &message("m"), fresh), Claim::Done(_)));
        assert!(matches!(keys.claim("anonymous", "0", &message("m"), fresh), Claim::Publish(_)));
        assert!(keys.0.lock().unwrap().by_key.len() <= REMEMBERED + 1);
    }

    #[test]
    fn keys_are_checked_and_hash_the_same_everywhere() {
        assert!(is_valid_key("3f1c2a9e-7b1d-4d8e-9a55-0c1f2e3d4b5a"));
        for bad in ["", "with space", "é", &"x".repeat(MAX_KEY_BYTES + 1)] {
            assert!(!is_valid_key(bad), "{bad:?}");
        }
        assert_eq!(random_part("anonymous", "k"), random_part("anonymous", "k"));
        assert_ne!(random_part("anonymous", "k"), random_part("billing", "k"));
        assert!(random_part("a", "k") < 1 << 80);
    }
}
