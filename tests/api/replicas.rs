//! Several replicas on one broker, as the Kubernetes deployment runs them: three processes of
//! the built binary, each with its own sessions.

use futures_util::future::join_all;
use serde_json::{Value, json};

use crate::{
    helpers::{AMQP_PORT, WsClient, connect_to, unique_exchange, wait_for_queue, within},
    process::Running,
};

async fn post(http: &reqwest::Client, addr: &str, text: &str) -> Value {
    let response = within(
        "POST /messages",
        http.post(format!("http://{addr}/messages")).json(&json!({ "text": text })).send(),
    )
    .await
    .unwrap();
    assert_eq!(response.status(), 202, "POST to {addr}");
    response.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_posted_to_any_replica_reaches_every_session_and_a_killed_replica_stops_no_one() {
    let exchange = unique_exchange();
    let port = AMQP_PORT.to_string();
    let run = ulid::Ulid::new();
    let replicas: Vec<Running> = (1..=3)
        .map(|n| {
            let name = format!("replica-{n}-{run}");
            Running::start(&[
                ("NOTIFIER_RABBITMQ_HOST", "127.0.0.1"),
                ("NOTIFIER_RABBITMQ_PORT", port.as_str()),
                ("NOTIFIER_EXCHANGE", exchange.as_str()),
                ("HOSTNAME", name.as_str()),
            ])
        })
        .collect();
    let mut addrs = Vec::new();
    for replica in &replicas {
        addrs.push(replica.addr().await);
        replica.log_line("connected to RabbitMQ").await;
    }
    // Two sessions on each replica.
    let mut sessions: Vec<(usize, WsClient)> = Vec::new();
    for (index, addr) in addrs.iter().enumerate() {
        for _ in 0..2 {
            sessions.push((index, connect_to(addr).await));
        }
    }

    let http = reqwest::Client::new();
    let mut posted = Vec::new();
    for addr in &addrs {
        posted.push(post(&http, addr, &format!("posted to {addr}")).await);
    }
    join_all(sessions.iter_mut().map(|(_, session)| {
        let posted = &posted;
        async move {
            for message in posted {
                assert_eq!(
                    &session.next_message().await,
                    message,
                    "every session gets every replica's message, in order"
                );
            }
        }
    }))
    .await;

    // SIGKILL the second replica: no goodbye, no close frames, no cancelled consumers.
    let [first, mut second, third]: [Running; 3] = replicas.try_into().ok().unwrap();
    second.signal("KILL");
    assert_ne!(second.exit().await, 0);
    let (survivors, orphans): (Vec<_>, Vec<_>) = sessions.into_iter().partition(|(index, _)| *index != 1);
    // The broker drops the dead replica's exclusive queues with its connections.
    for (_, orphan) in &orphans {
        wait_for_queue(&orphan.queue(), false).await;
    }

    let mut after = Vec::new();
    for addr in [&addrs[0], &addrs[2]] {
        after.push(post(&http, addr, &format!("after the kill, via {addr}")).await);
    }
    for (_, mut session) in survivors {
        for message in &after {
            assert_eq!(&session.next_message().await, message, "the surviving replicas keep delivering");
        }
    }
    drop((first, third));
    crate::helpers::delete_exchange_and_history(&exchange, &format!("{exchange}.history")).await;
}
