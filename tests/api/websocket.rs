//! `GET /ws`: sessions, frames from the browser, bad frames, and each session's own queue.

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::{
    both_buses,
    helpers::{BusKind, broker_line, rabbitmqctl, spawn_app, wait_for_queue},
};

both_buses!(
    a_text_frame_is_published_to_every_session,
    a_binary_frame_gets_an_error_frame_and_the_session_stays_open,
    a_text_frame_over_the_limit_gets_an_error_frame,
    a_huge_frame_closes_only_its_own_session_with_1009,
);

/// Takes the sender's next two frames, which are its "accepted" notice and the message itself
/// in either order, and returns (accepted, message).
async fn accepted_and_message(session: &mut crate::helpers::WsClient) -> (Value, Value) {
    let a = session.next_frame().await;
    let b = session.next_frame().await;
    if a["type"] == "accepted" { (a, b) } else { (b, a) }
}

async fn a_text_frame_is_published_to_every_session(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut sender = app.connect().await;
    let mut reader = app.connect().await;

    sender.send_text(r#"{"text":"json frame","user":"grace"}"#).await;
    let (accepted, echoed) = accepted_and_message(&mut sender).await;
    assert_eq!(accepted["type"], "accepted");
    let message = reader.next_message().await;
    assert_eq!(message, echoed);
    assert_eq!(
        (&message["text"], &message["user"], &message["id"]),
        (&json!("json frame"), &json!("grace"), &accepted["id"])
    );

    // What the Python demo's page sends: the frame's text is the message.
    sender.send_text("plain frame").await;
    let (_, echoed) = accepted_and_message(&mut sender).await;
    let message = reader.next_message().await;
    assert_eq!(message, echoed);
    assert_eq!(message["text"], "plain frame");
    assert!(message.get("user").is_none());
    app.stop().await;
}

async fn a_binary_frame_gets_an_error_frame_and_the_session_stays_open(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    session.send(Message::Binary(Bytes::from_static(b"\x00\x01"))).await;
    let error = session.next_frame().await;
    assert_eq!(error["type"], "error");
    assert!(error["error"].as_str().unwrap().contains("binary frames are not supported"), "{error}");
    let message = app.post_text("after the binary frame").await;
    assert_eq!(session.next_message().await, message);
    app.stop().await;
}

async fn a_text_frame_over_the_limit_gets_an_error_frame(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    let limit = app.config.messages.max_bytes;
    session.send_text(&"x".repeat(limit + 1)).await;
    let error = session.next_frame().await;
    assert_eq!(error["type"], "error");
    assert!(error["error"].as_str().unwrap().contains(&format!("limit is {limit} bytes")), "{error}");
    session.send_text("   ").await;
    assert_eq!(session.next_frame().await["type"], "error", "a blank frame is refused");
    let message = app.post_text("still open").await;
    assert_eq!(session.next_message().await, message);
    app.stop().await;
}

async fn a_huge_frame_closes_only_its_own_session_with_1009(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut bystander = app.connect().await;
    let mut abuser = app.connect().await;
    abuser.send_text(&"x".repeat(app.config.messages.max_bytes * 10)).await;
    let (code, reason) = abuser.closed().await;
    assert_eq!(code, 1009, "close code for a message too big");
    assert!(!reason.is_empty(), "the close frame says why");
    let message = app.post_text("the others carry on").await;
    assert_eq!(bystander.next_message().await, message);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_session_has_its_own_queue_which_is_gone_when_the_session_ends() {
    let app = spawn_app(BusKind::Rabbit).await;
    let first = app.connect().await;
    let second = app.connect().await;
    assert_ne!(first.queue(), second.queue());
    wait_for_queue(&first.queue(), true).await;
    wait_for_queue(&second.queue(), true).await;
    let (first_queue, second_queue) = (first.queue(), second.queue());
    first.close().await;
    wait_for_queue(&first_queue, false).await;
    wait_for_queue(&second_queue, true).await;
    second.close().await;
    wait_for_queue(&second_queue, false).await;
    app.stop().await;
}

/// Reads the broker's own view of the session queue and its consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_queue_is_exclusive_auto_delete_bounded_and_consumed_with_a_prefetch() {
    let app = spawn_app(BusKind::Rabbit).await;
    let session = app.connect().await;
    let rabbit = app.config.rabbitmq.clone().unwrap();
    let line = broker_line(
        &["list_queues", "name", "exclusive", "auto_delete", "durable", "arguments"],
        &session.queue(),
    )
    .await;
    let fields: Vec<&str> = line.split('\t').collect();
    assert_eq!(&fields[1..4], ["true", "true", "false"], "exclusive, auto-delete, not durable: {line}");
    assert!(line.contains(&format!("\"x-max-length\",{}", rabbit.queue_max_length)), "{line}");
    assert!(line.contains("\"x-overflow\"") && line.contains("drop-head"), "{line}");
    let line =
        broker_line(&["list_consumers", "queue_name", "ack_required", "prefetch_count"], &session.queue())
            .await;
    assert_eq!(line, format!("{}\ttrue\t{}", session.queue(), rabbit.prefetch), "manual acks and a prefetch");
    let bindings = rabbitmqctl(&["list_bindings", "source_name", "destination_name"]);
    assert!(
        bindings.lines().any(|l| l == format!("{}\t{}", app.exchange(), session.queue())),
        "bound to the exchange"
    );
    app.stop().await;
}

/// A browser that stops reading fills its own queue; the broker drops the oldest messages
/// (x-max-length) and the session is told how many it missed: everything posted is either
/// delivered, in order, or counted in a gap notice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_falls_behind_is_told_how_many_messages_its_full_queue_dropped() {
    let mut config = crate::helpers::test_config(BusKind::Rabbit);
    config.messages.max_bytes = 64 * 1024;
    let rabbit = config.rabbitmq.as_mut().unwrap();
    rabbit.queue_max_length = 5;
    rabbit.prefetch = 1;
    let app = crate::helpers::spawn_app_with(config).await;
    let mut slow = app.connect().await;

    // Large messages fill the socket buffers between the app and the unread client, so the
    // session's consumer stalls and its queue overflows.
    const POSTED: usize = 300;
    let body = "x".repeat(60 * 1024);
    for n in 0..POSTED {
        let response = app.post_json(serde_json::json!({ "text": format!("{n:03} {body}") })).await;
        assert_eq!(response.status(), 202);
    }
    let metric = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("fanout_chat_queue_overflow_total "))
            .unwrap()
            .parse()
            .unwrap()
    };
    // Now read everything: delivered messages in order, plus gap notices for the rest.
    let (mut delivered, mut missed, mut last) = (0, 0, None::<usize>);
    while delivered + missed < POSTED {
        let frame = slow.next_frame().await;
        match frame["type"].as_str() {
            Some("gap") => missed += frame["missed"].as_u64().unwrap() as usize,
            None => {
                let n: usize = frame["text"].as_str().unwrap()[..3].parse().unwrap();
                assert!(last.is_none_or(|l| n > l), "in order, no duplicates: {n} after {last:?}");
                last = Some(n);
                delivered += 1;
            }
            Some(other) => panic!("unexpected frame {other}"),
        }
    }
    assert_eq!(delivered + missed, POSTED);
    assert!(missed > 0, "the queue overflowed (else this test tests nothing)");
    assert_eq!(last, Some(POSTED - 1), "the newest message is never the one dropped");
    let overflowed = metric(&app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap());
    assert_eq!(overflowed as usize, missed, "the metric counts what the session was told");
    app.stop().await;
}
