//! fanout-chat: a chat page whose messages flow through a RabbitMQ fanout exchange.
//!
//! - [`config`]: the environment, read once into one typed struct.
//! - [`chat`]: the message envelope and validation of what users send; no HTTP, no AMQP.
//! - [`bus`]: where messages are published and read back: RabbitMQ or the embedded bus.
//! - [`state`]: [`state::AppState`], what every handler shares (below both `app` and `http`).
//! - [`http`]: the routes (page, `POST /messages`, `/ws`, probes, metrics) and their layers.
//! - [`app`]: building, serving and shutting down the whole.
//! - [`serve`]: HTTP on each accepted connection, with header and idle timeouts.
//! - [`limits`]: message rates and session counts, per client and global (429s).
//! - [`idempotency`]: `Idempotency-Key` on `POST /messages`: a retry publishes at most once.
//! - [`metrics`]: the figures exported at `/metrics`.
//! - [`telemetry`]: log set-up (human text or JSON lines).

pub mod app;
pub mod bus;
pub mod chat;
pub mod config;
pub mod http;
pub mod idempotency;
pub mod limits;
pub mod metrics;
pub mod serve;
pub mod state;
pub mod telemetry;

pub use app::Application;
pub use config::Config;
