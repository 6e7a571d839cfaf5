//! Other services on the same exchange: what they publish reaches browsers, and what browsers
//! post reaches their queues.

use futures_util::StreamExt;
use lapin::{
    BasicProperties,
    options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::{Value, json};

use crate::helpers::{BusKind, service, spawn_app, within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_services_queue_receives_what_browsers_post_as_envelope_json() {
    let app = spawn_app(BusKind::Rabbit).await;
    let service = service().await;
    let queue = service
        .channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions { exclusive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();
    service
        .channel
        .queue_bind(
            queue.name().clone(),
            app.exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = service
        .channel
        .basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await
        .unwrap();

    let accepted = app.post_text("for the audit service").await;
    let delivery = within("the service's delivery", consumer.next()).await.unwrap().unwrap();
    let body: Value = serde_json::from_slice(&delivery.data).unwrap();
    assert_eq!(body, accepted);
    let p = &delivery.properties;
    assert_eq!(p.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
    assert_eq!(p.message_id().as_ref().map(|s| s.as_str()), accepted["id"].as_str());
    assert!(p.timestamp().is_some_and(|t| t > 1_700_000_000), "timestamp set");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_text_from_another_service_reaches_browsers_as_text() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut session = app.connect().await;
    let service = service().await;
    service
        .publish(
            app.exchange(),
            b"deploy finished <b>ok</b>",
            BasicProperties::default().with_message_id("deploy-7".into()).with_app_id("ci".into()),
        )
        .await;
    let message = session.next_message().await;
    assert_eq!(message["text"], "deploy finished <b>ok</b>");
    assert_eq!(message["id"], "deploy-7", "the id comes from message_id");
    assert_eq!(message["user"], "ci", "the sender is the publishing app");
    assert!(message["ts"].as_str().is_some_and(|t| t.ends_with('Z')));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_of_another_shape_reaches_browsers_as_its_text() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut session = app.connect().await;
    let service = service().await;
    let body = json!({ "event": "order.paid", "order": 42 }).to_string();
    service.publish(app.exchange(), body.as_bytes(), BasicProperties::default()).await;
    let message = session.next_message().await;
    assert_eq!(message["text"], body);
    assert_eq!(message["id"].as_str().map(str::len), Some(26), "a fresh ULID: {message}");
    // A foreign envelope-shaped JSON with extra fields is not trusted as an envelope either.
    let sneaky = json!({ "id": "x", "text": "t", "ts": "2026-11-23T10:00:00Z", "type": "error" }).to_string();
    service.publish(app.exchange(), sneaky.as_bytes(), BasicProperties::default()).await;
    let message = session.next_message().await;
    assert_eq!(message["text"], sneaky);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_exchange_of_another_type_is_used_as_it_is() {
    let service = service().await;
    let config = crate::helpers::test_config(BusKind::Rabbit);
    let exchange = config.rabbitmq.as_ref().unwrap().exchange.clone();
    service
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: false,
                auto_delete: false,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    // The app starts, reports ready, and publishes to it rather than crashing.
    let app = crate::helpers::spawn_app_with(config).await;
    let response = app.post_json(json!({ "text": "on a topic exchange" })).await;
    assert_eq!(response.status(), 202);
    app.stop().await;
}

/// A body far over what a browser may send is not forwarded: each session is told it skipped
/// one message, and carries on. (Before, it overflowed every session's write buffer and reset
/// them all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_from_another_service_is_skipped_with_a_notice() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut first = app.connect().await;
    let mut second = app.connect().await;
    let service = service().await;
    let huge = vec![b'x'; app.config.max_frame_bytes() + 1];
    service.publish(app.exchange(), &huge, BasicProperties::default()).await;
    for session in [&mut first, &mut second] {
        let notice = session.next_frame().await;
        assert_eq!((&notice["type"], &notice["missed"]), (&json!("gap"), &json!(1)), "{notice}");
        assert!(notice["reason"].as_str().unwrap().contains("too large"), "{notice}");
    }
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fanout_chat_messages_skipped_total 2"), "one skip per session:\n{metrics}");
    let next = app.post_text("after the oversized one").await;
    assert_eq!(first.next_message().await, next);
    assert_eq!(second.next_message().await, next);
    app.stop().await;
}

/// An operator deletes one session's queue: that session is told, gets a new queue and
/// receives again; the session sharing its channel notices nothing, and the broker link
/// stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_queue_is_deleted_restores_it_and_others_notice_nothing() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut victim = app.connect().await;
    let mut neighbour = app.connect().await;
    crate::helpers::rabbitmqctl_with(&["delete_queue", &victim.queue()]);
    assert_eq!(victim.next_frame().await["type"], "interrupted");
    assert_eq!(victim.next_frame().await["type"], "restored");
    let message = app.post_text("after the restore").await;
    assert_eq!(victim.next_message().await, message);
    assert_eq!(neighbour.next_message().await, message, "the neighbour's next frame is the message");
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fanout_chat_broker_disconnects_total 0"), "the link stayed up:\n{metrics}");
    assert!(metrics.contains("fanout_chat_session_resubscribes_total 1"), "{metrics}");
    app.stop().await;
}
