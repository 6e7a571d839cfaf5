//! Integration tests: the real app on a loopback port, the real RabbitMQ at 127.0.0.1:5672,
//! real HTTP, WebSocket and AMQP clients. Each test uses its own exchange, so they run in
//! parallel. Tests written once run on both buses through `both_buses!`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails loudly where its setup is broken")]

mod callers;
mod capacity;
mod chaos;
mod faults;
mod helpers;
mod history;
mod idempotency;
mod interop;
mod limits;
mod messages;
mod metrics_scrape;
mod operations;
mod page;
mod process;
mod process_mode;
mod replicas;
mod websocket;

/// Runs an `async fn name(kind: BusKind)` test body once per bus (and per RabbitMQ fan-out mode).
#[macro_export]
macro_rules! both_buses {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::BusKind::Memory).await
                }
            )*
        }
        mod rabbit {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::BusKind::Rabbit).await
                }
            )*
        }
        mod rabbit_process {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::BusKind::RabbitProcess).await
                }
            )*
        }
    };
}
