//! On the project's own three-node RabbitMQ cluster (`scripts/cluster-broker start`: nodes on
//! 127.0.0.1:5681-5683): replicas on different nodes chat, and a node stopped under a replica's
//! sessions interrupts them, then restores them with every message confirmed meanwhile.
//! Run: `cargo test --test cluster` with the cluster up (the test command starts it).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, reason = "tests fail loudly")]

#[path = "../api/helpers.rs"]
mod helpers;

use std::{process::Command, time::Duration};

use serde_json::Value;

use helpers::{TestApp, WsClient, spawn_app_with, unique_exchange, within};

/// The cluster's nodes: AMQP ports, in node order.
const NODES: [u16; 3] = [5681, 5682, 5683];

/// One test at a time: a test that stops a node would disturb the others.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fails with what to do when the cluster is not running; never skips.
fn cluster_is_up() {
    let output = Command::new("scripts/cluster-broker")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("status")
        .output()
        .expect("scripts/cluster-broker");
    assert!(
        output.status.success(),
        "the three-node cluster is not running; start it with `scripts/cluster-broker start`:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn cluster_broker(args: &[&str]) {
    let output = Command::new("scripts/cluster-broker")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("scripts/cluster-broker");
    assert!(
        output.status.success(),
        "scripts/cluster-broker {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A replica on node `node` (0-based) of the cluster, on `exchange`.
async fn replica_on(node: usize, exchange: &str) -> TestApp {
    let mut config =
        helpers::test_config(helpers::BusKind::Memory).with_rabbitmq("127.0.0.1", NODES[node], exchange);
    config.replica = format!("cluster-{node}-{}", &ulid::Ulid::new().to_string()[20..]);
    spawn_app_with(config).await
}

async fn texts(session: &mut WsClient, count: usize) -> Vec<String> {
    let mut texts = Vec::with_capacity(count);
    while texts.len() < count {
        let frame = session.next_frame().await;
        if let Some(text) = frame["text"].as_str() {
            texts.push(text.to_owned());
        }
    }
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_different_nodes_chat_and_share_the_history() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    let first = replica_on(0, &exchange).await;
    let second = replica_on(1, &exchange).await;
    let mut on_first = first.connect().await;
    let mut on_second = second.connect().await;
    let a = first.post_text("posted on node 1").await;
    let b = second.post_text("posted on node 2").await;
    for session in [&mut on_first, &mut on_second] {
        assert_eq!(session.next_message().await, a);
        assert_eq!(session.next_message().await, b);
    }
    for app in [&first, &second] {
        let page = within("the history to hold both", async {
            loop {
                let page = app.history("").await;
                if page["messages"].as_array().is_some_and(|m| m.len() == 2) {
                    return page;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(page["messages"], Value::Array(vec![a.clone(), b.clone()]));
    }
    second.stop_keeping_broker_state().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_under_sessions_interrupts_them_and_they_get_everything_confirmed_meanwhile() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    // The sessions' replica is on node 3; the other one, on node 1, takes posts throughout.
    let stay = replica_on(0, &exchange).await;
    let lose = replica_on(2, &exchange).await;
    let mut sessions = vec![lose.connect().await, lose.connect().await];
    let before = stay.post_text("before the stop").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, before);
    }
    cluster_broker(&["stop-node", "3"]);
    for session in &mut sessions {
        let frame = session.next_frame().await;
        assert_eq!(frame["type"], "interrupted", "{frame}");
    }
    let mut confirmed = Vec::new();
    for n in 0..5 {
        confirmed.push(
            stay.post_text(&format!("while node 3 is down {n}")).await["text"].as_str().unwrap().to_owned(),
        );
    }
    let restarted = std::time::Instant::now();
    cluster_broker(&["start-node", "3"]);
    for session in &mut sessions {
        let frame = within("the session to be restored", async { session.next_frame().await }).await;
        assert_eq!(frame["type"], "restored", "{frame}");
        assert_eq!(
            texts(session, confirmed.len()).await,
            confirmed,
            "every confirmed message, once, in order"
        );
    }
    eprintln!("sessions restored {:?} after node 3 was started again", restarted.elapsed());
    let after = stay.post_text("after").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, after, "nothing repeated, live again");
    }
    lose.stop_keeping_broker_state().await;
    stay.stop().await;
}
