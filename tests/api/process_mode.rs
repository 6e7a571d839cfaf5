//! `NOTIFIER_FANOUT_MODE=process`: one queue per process, fan-out to sessions in memory.

use crate::helpers::{BusKind, broker_line, rabbitmqctl, spawn_app_with, test_config};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_mode_each_replica_binds_one_queue_and_every_session_on_every_replica_gets_every_message()
{
    let first_config = test_config(BusKind::RabbitProcess);
    let mut second_config = first_config.clone();
    second_config.replica = format!("{}-b", first_config.replica);
    let first = spawn_app_with(first_config).await;
    let second = spawn_app_with(second_config).await;
    let mut sessions = Vec::new();
    for app in [&first, &second] {
        for _ in 0..3 {
            sessions.push(app.connect().await);
        }
    }
    // The broker sees one queue per process, however many sessions it holds.
    broker_line(&["list_queues", "name"], &format!("fanout-chat.{}.process", first.config.replica)).await;
    let bindings = rabbitmqctl(&["list_bindings", "source_name", "destination_name"]);
    // Besides the history stream, shared by all replicas.
    let history = first.config.rabbitmq.as_ref().unwrap().history.name.clone();
    let bound: Vec<&str> = bindings
        .lines()
        .filter(|l| {
            l.starts_with(&format!("{}\t", first.exchange())) && !l.ends_with(&format!("\t{history}"))
        })
        .collect();
    assert_eq!(bound.len(), 2, "one binding per replica: {bound:?}");

    let from_first = first.post_text("via the first replica").await;
    let from_second = second.post_text("via the second replica").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, from_first);
        assert_eq!(session.next_message().await, from_second);
    }
    first.stop().await;
    second.stop().await;
}
