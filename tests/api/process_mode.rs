//! `NOTIFIER_FANOUT_MODE=process`: one queue per process, fan-out to sessions in memory.

use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

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

/// Process mode hands each message to the sessions through an in-process channel that holds
/// only `NOTIFIER_MEMORY_CAPACITY` of them; a session that falls further behind (here: a
/// burst into a channel of one) is not cut short: what the channel skipped is replayed to it
/// from the history window, in order, with no gap notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_mode_a_session_behind_the_in_process_channel_gets_every_message_in_order() {
    const SENT: usize = 500;
    let mut config = test_config(BusKind::RabbitProcess);
    config.messages.memory_capacity = 1;
    let app = spawn_app_with(config).await;
    let mut sessions = vec![app.connect().await, app.connect().await, app.connect().await];
    // Another service's burst, published without waiting for each confirm, as fast as it goes.
    let service = crate::helpers::service().await;
    service.channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::with_capacity(SENT);
    for i in 0..SENT {
        let properties = BasicProperties::default().with_message_id(ulid::Ulid::new().to_string().into());
        let body = format!("burst {i}");
        let options = BasicPublishOptions::default();
        let confirm = service.channel.basic_publish(
            app.exchange().into(),
            "".into(),
            options,
            body.as_bytes(),
            properties,
        );
        confirms.push(confirm.await.unwrap());
    }
    for confirm in confirms {
        assert!(confirm.await.unwrap().is_ack());
    }
    for session in &mut sessions {
        // `next_message` fails on any notice, a gap among them.
        for i in 0..SENT {
            assert_eq!(session.next_message().await["text"], format!("burst {i}"), "in order, none missing");
        }
    }
    // The sessions did fall behind the channel: the replay was needed.
    let skipped = crate::helpers::metric(&app, "fanout_chat_messages_skipped_total").await;
    assert!(skipped > 0.0, "no session fell behind; the test proved nothing");
    eprintln!("the sessions fell {skipped} messages behind the channel, all replayed");
    app.stop().await;
}
