//! A hostile client, within the shipped limits: what it can make the process hold or wait on.
//! The real app, the real RabbitMQ at 127.0.0.1:5672, real HTTP and WebSocket clients.
//! Run: `cargo test --test hostile`.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, reason = "tests fail loudly")]

#[path = "../api/helpers.rs"]
mod helpers;

mod doors;
mod history_ids;
mod memory;
mod process;

/// One hostile test at a time: each loads both cores, and the times they assert would measure
/// each other.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
