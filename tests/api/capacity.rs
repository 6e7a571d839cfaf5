//! One process holds 5,000 concurrent sessions on RabbitMQ, each with its own queue, on a
//! bounded number of channels and connections.

use futures_util::{StreamExt, stream};

use crate::helpers::{BusKind, WsClient, rabbitmqctl, spawn_app_with, test_config, within};

const SESSIONS: usize = 5_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_process_holds_5000_sessions_and_delivers_to_all_of_them() {
    let mut config = test_config(BusKind::Rabbit);
    config.replica = format!("capacity-{}", ulid::Ulid::new());
    let rabbit = config.rabbitmq.clone().unwrap();
    let app = spawn_app_with(config).await;

    // Open them 100 at a time, as a crowd arriving, not one by one.
    let mut sessions: Vec<WsClient> =
        stream::iter(0..SESSIONS).map(|_| app.connect()).buffer_unordered(100).collect().await;
    assert_eq!(sessions.len(), SESSIONS);

    let prefix = format!("fanout-chat.{}.", app.config.replica);
    let queues = rabbitmqctl(&["list_queues", "name"]);
    let overflow = format!("{prefix}overflow");
    let session_queues = queues.lines().filter(|l| l.starts_with(&prefix) && *l != overflow).count();
    assert_eq!(session_queues, SESSIONS, "one queue per session");

    // Channels are shared, and connections stay far below RabbitMQ's channel_max.
    let connections = rabbitmqctl(&["list_connections", "client_properties", "channels"]);
    let ours: Vec<usize> = connections
        .lines()
        .filter(|l| l.contains(&format!("fanout-chat {} consume-", app.config.replica)))
        .map(|l| l.rsplit('\t').next().unwrap().trim().parse().unwrap())
        .collect();
    assert_eq!(ours.len(), rabbit.consumer_connections, "{connections}");
    // One channel per `sessions_per_channel` sessions on each connection (the replica's own
    // consumers are on a connection of their own): at most one channel per connection not full.
    let fewest = SESSIONS.div_ceil(rabbit.sessions_per_channel);
    let channels = ours.iter().sum::<usize>();
    assert!(
        (fewest..fewest + rabbit.consumer_connections).contains(&channels),
        "channels: {ours:?}, expected {fewest} and at most one not full per connection"
    );
    let (least, most) = (ours.iter().min().unwrap(), ours.iter().max().unwrap());
    assert!(most - least <= 1, "sessions spread evenly over the connections: {ours:?}");
    assert!(ours.iter().all(|&c| c <= rabbit.channels_per_connection), "channels per connection: {ours:?}");

    let message = app.post_text("to all five thousand").await;
    let received = stream::iter(sessions.iter_mut())
        .map(|s| async move { s.next_message().await })
        .buffer_unordered(500)
        .filter(|m| std::future::ready(*m == message))
        .count();
    // 5,000 deliveries on a broker the other tests share: generous, but bounded.
    let received = tokio::time::timeout(std::time::Duration::from_secs(60), received).await;
    assert_eq!(received.expect("every session to receive the message within 60 s"), SESSIONS);

    stream::iter(sessions).for_each_concurrent(500, WsClient::close).await;
    within("every session queue to be deleted", async {
        loop {
            let queues = rabbitmqctl(&["list_queues", "name"]);
            if !queues.lines().any(|l| l.starts_with(&prefix) && *l != overflow) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
    })
    .await;
    app.stop().await;
}
