//! History ids steer reads of the stream: ids earlier than everything kept, or later than now,
//! are answered at once and never scan the stream or hold one of its few read slots.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use serde_json::Value;
use tokio_tungstenite::tungstenite;

use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
};

use crate::helpers::{BusKind, TestApp, service, spawn_app_with, test_config, within};

/// The smallest ULID (time 0) and the largest (the year 10889): before anything, after everything.
const FAR_PAST: &str = "00000000000000000000000000";
const FAR_FUTURE: &str = "7ZZZZZZZZZZZZZZZZZZZZZZZZZ";
/// A reply that is "at once" on a loaded two-core machine.
const AT_ONCE: Duration = Duration::from_millis(200);

/// An app whose window holds 5 messages, with 40 posted: 35 are in the stream only.
async fn app_with_history_beyond_the_window() -> (TestApp, Vec<Value>) {
    let mut config = test_config(BusKind::Rabbit);
    config.history.window = 5;
    let app = spawn_app_with(config).await;
    let mut posted = Vec::new();
    for n in 0..40 {
        posted.push(app.post_text(&format!("seed {n}")).await);
    }
    within("the window to hold the last message", async {
        let last = posted.last().unwrap()["id"].clone();
        loop {
            let page = app.history("?limit=1").await;
            if page["messages"][0]["id"] == last {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    (app, posted)
}

/// Another service publishes `count` messages (with a timestamp, as most do) straight to the
/// exchange, so the stream grows long quickly.
async fn publish_many(app: &TestApp, count: usize) {
    let service = service().await;
    service.channel.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut confirms = Vec::with_capacity(count);
    for n in 0..count {
        let properties = BasicProperties::default().with_app_id("load".into()).with_timestamp(now);
        let body = format!("bulk {n}");
        let confirm = service
            .channel
            .basic_publish(
                app.exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                properties,
            )
            .await
            .unwrap();
        confirms.push(confirm);
    }
    within("the bulk publish to be confirmed", join_all(confirms)).await;
}

async fn timed_get(app: &TestApp, query: &str) -> (u16, Value, Duration) {
    let started = Instant::now();
    let response =
        within("GET /messages", app.http.get(app.url(&format!("/messages{query}"))).send()).await.unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap();
    (status, body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_before_the_first_or_after_the_last_message_is_answered_at_once() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let (app, _) = app_with_history_beyond_the_window().await;
    // A long stream: reading it whole takes seconds. Timed once the window has taken it in.
    publish_many(&app, 20_000).await;
    within("the window to take the bulk in", async {
        loop {
            if app.history("?limit=1").await["messages"][0]["text"] == "bulk 19999" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (status, body, took) = timed_get(&app, &format!("?before={FAR_PAST}")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], Value::Array(vec![]), "nothing is older than the first message");
    assert_eq!(body["has_more"], false);
    assert!(took < AT_ONCE, "answered in {took:?}");
    let (status, body, took) = timed_get(&app, &format!("?before={FAR_FUTURE}")).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("future"), "{body}");
    assert!(took < AT_ONCE, "answered in {took:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_far_ids_leaves_the_stream_reads_to_people_loading_older_messages() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let (app, posted) = app_with_history_beyond_the_window().await;
    // Twice the process's stream read slots, at once, over and over.
    for _ in 0..3 {
        let flood = join_all((0..16).map(|i| {
            let query = format!("?before={}", if i % 2 == 0 { FAR_PAST } else { FAR_FUTURE });
            let app = &app;
            async move { timed_get(app, &query).await }
        }))
        .await;
        for (status, body, took) in flood {
            assert!(status == 200 || status == 400, "{status} {body}");
            assert!(took < AT_ONCE * 5, "answered in {took:?}");
        }
    }
    // "Load older" in the page: the 10 before the oldest of the window come from the stream.
    let oldest_in_window = &posted[35]["id"];
    let (status, body, took) =
        timed_get(&app, &format!("?limit=10&before={}", oldest_in_window.as_str().unwrap())).await;
    assert_eq!(status, 200, "{body}");
    let texts: Vec<&str> =
        body["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    let expected: Vec<String> = (25..35).map(|n| format!("seed {n}")).collect();
    assert_eq!(texts, expected, "took {took:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resuming_from_the_future_is_refused_and_from_the_far_past_told_of_its_gap_at_once() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let (app, posted) = app_with_history_beyond_the_window().await;
    let started = Instant::now();
    let future = tokio_tungstenite::connect_async(format!("ws://{}/ws?since={FAR_FUTURE}", app.addr));
    match within("a handshake", future).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 400),
        other => panic!("expected 400, got {other:?}"),
    }
    assert!(started.elapsed() < AT_ONCE, "refused in {:?}", started.elapsed());

    let started = Instant::now();
    let mut session = app.connect_since(FAR_PAST).await;
    let notice = session.next_frame().await;
    assert_eq!(notice["type"], "gap", "{notice}");
    let first = session.next_frame().await;
    // Not found in the stream (it is older than all of it): the window is replayed, after the notice.
    assert_eq!(first["text"], posted[35]["text"], "the replay starts at the window's oldest message");
    assert!(started.elapsed() < AT_ONCE * 5, "took {:?}", started.elapsed());
    app.stop().await;
}
