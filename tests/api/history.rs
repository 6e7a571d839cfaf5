//! History: `GET /messages` pages, and sessions that resume with `?since=` after being away.
//! On RabbitMQ both come from the history stream, shared by every replica and kept across
//! restarts of the app and of the broker.

use std::time::Duration;

use futures_util::future::join_all;
use lapin::BasicProperties;
use serde_json::{Value, json};

use crate::{
    both_buses,
    helpers::{BusKind, TestApp, WsClient, metric, service, spawn_app, spawn_app_with, test_config, within},
};

fn ids(messages: &[Value]) -> Vec<String> {
    messages.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
}

fn page_ids(page: &Value) -> Vec<String> {
    ids(page["messages"].as_array().expect("a messages array"))
}

async fn post_many(app: &TestApp, prefix: &str, count: usize) -> Vec<Value> {
    let mut posted = Vec::with_capacity(count);
    for i in 0..count {
        posted.push(app.post_text(&format!("{prefix} {i}")).await);
    }
    posted
}

/// Reads `count` message envelopes; fails on any notice in between.
async fn read_messages(session: &mut WsClient, count: usize) -> Vec<Value> {
    let mut got = Vec::with_capacity(count);
    for _ in 0..count {
        got.push(session.next_message().await);
    }
    got
}

async fn history_pages_back_from_the_newest_message(kind: BusKind) {
    let app = spawn_app(kind).await;
    let posted = ids(&post_many(&app, "page", 5).await);
    app.wait_for_history(&posted[4]).await;

    let newest = app.history("?limit=3").await;
    assert_eq!(page_ids(&newest), posted[2..], "the newest three, oldest first");
    assert_eq!(newest["has_more"], true);
    let older = app.history(&format!("?limit=3&before={}", posted[2])).await;
    assert_eq!(page_ids(&older), posted[..2], "the two before them");
    assert_eq!(older["has_more"], false, "nothing before the first message");
    let all = app.history("").await;
    assert_eq!(page_ids(&all), posted, "the default page holds them all");
    assert_eq!(all["messages"][0]["text"], "page 0", "whole envelopes");
    app.stop().await;
}

/// The tutorial's promise, kept: session B goes away; A posts three messages; B comes back
/// with its last id and gets exactly those three, in order, then live messages.
async fn a_session_that_comes_back_gets_what_it_missed_then_live_messages(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut a = app.connect().await;
    let mut b = app.connect().await;
    let before = app.post_text("before B leaves").await;
    assert_eq!(b.next_message().await, before);
    assert_eq!(a.next_message().await, before);
    b.close().await;

    let mut missed = Vec::new();
    for i in 0..3 {
        a.send_text(&format!("while B was away {i}")).await;
        let accepted = a.next_frame().await;
        assert_eq!(accepted["type"], "accepted", "{accepted}");
        missed.push(a.next_message().await);
    }

    let mut b = app.connect_since(before["id"].as_str().unwrap()).await;
    assert_eq!(read_messages(&mut b, 3).await, missed, "exactly the three, in order");
    let live = app.post_text("after B is back").await;
    assert_eq!(b.next_message().await, live, "then live, with nothing repeated in between");
    app.stop().await;
}

/// The hand-over from replay to live delivery under load: messages are posted without pause
/// while sessions resume from different points; each gets every message after its point, once,
/// in order.
async fn resuming_while_messages_flow_loses_and_repeats_nothing(kind: BusKind) {
    const TOTAL: usize = 150;
    let app = spawn_app(kind).await;
    let mut watcher = app.connect().await;
    let first = post_many(&app, "flow", 20).await;
    // The reference order: what a session that never left saw.
    let mut reference = ids(&read_messages(&mut watcher, 20).await);
    assert_eq!(reference, ids(&first), "the first twenty as posted");
    let http = app.http.clone();
    let url = app.url("/messages");
    let poster = tokio::spawn(async move {
        for i in 20..TOTAL {
            let response =
                http.post(&url).json(&json!({ "text": format!("flow {i}") })).send().await.unwrap();
            assert_eq!(response.status(), 202);
        }
    });
    // Resume while the poster posts.
    let resume_points = [0, 5, 19];
    let sessions = join_all(resume_points.map(|point| app.connect_since(&reference[point]))).await;
    reference.extend(ids(&read_messages(&mut watcher, TOTAL - 20).await));
    within("the poster", poster).await.unwrap();
    let last = app.post_text("the end").await;
    let results = join_all(sessions.into_iter().map(|mut session| {
        let last = &last;
        async move {
            let mut got = Vec::new();
            loop {
                let message = session.next_message().await;
                let done = message == *last;
                got.push(message["id"].as_str().unwrap().to_owned());
                if done {
                    return got;
                }
            }
        }
    }))
    .await;
    for (point, got) in resume_points.iter().zip(results) {
        let mut expected = reference[point + 1..].to_vec();
        expected.push(last["id"].as_str().unwrap().to_owned());
        assert_eq!(got.len(), expected.len(), "resumed after #{point}: count");
        assert_eq!(got, expected, "resumed after #{point}: every message once, in order");
    }
    app.stop().await;
}

async fn an_unknown_or_too_old_id_is_reported_as_a_gap_before_the_replay(kind: BusKind) {
    let app = spawn_app(kind).await;
    let posted = ids(&post_many(&app, "kept", 2).await);
    app.wait_for_history(&posted[1]).await;
    // A ULID from 2020: older than anything this history holds.
    let ancient = ulid::Ulid::from_parts(1_600_000_000_000, 42).to_string();
    for since in [ancient.as_str(), "no-such-message"] {
        let mut session = app.connect_since(since).await;
        let notice = session.next_frame().await;
        assert_eq!(notice["type"], "gap", "the first frame says there is a gap: {notice}");
        assert!(notice["reason"].as_str().unwrap().contains("replay starts"), "{notice}");
        assert_eq!(notice["replay_from"]["id"], posted[0].as_str(), "and where the replay starts");
        assert_eq!(ids(&read_messages(&mut session, 2).await), posted, "then everything kept");
        session.close().await;
    }
    app.stop().await;
}

async fn bad_history_requests_get_a_clear_400(kind: BusKind) {
    let app = spawn_app(kind).await;
    for query in ["?limit=0", "?limit=501", "?limit=ten"] {
        let response = app.http.get(app.url(&format!("/messages{query}"))).send().await.unwrap();
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("limit"), "{query}: {body}");
    }
    let long = "x".repeat(300);
    let response = app.http.get(app.url(&format!("/ws?since={long}"))).send().await.unwrap();
    assert_eq!(response.status(), 400, "an absurd since is refused before the upgrade");
    let unknown = app.history("?before=no-such-message").await;
    assert_eq!(page_ids(&unknown), Vec::<String>::new(), "nothing is known before an unknown id");
    // The app still serves.
    let mut session = app.connect().await;
    let message = app.post_text("still fine").await;
    assert_eq!(session.next_message().await, message);
    app.stop().await;
}

both_buses!(
    history_pages_back_from_the_newest_message,
    a_session_that_comes_back_gets_what_it_missed_then_live_messages,
    resuming_while_messages_flow_loses_and_repeats_nothing,
    an_unknown_or_too_old_id_is_reported_as_a_gap_before_the_replay,
    bad_history_requests_get_a_clear_400,
);

/// A config of a second replica on the same exchange (and so the same history stream).
fn replica_of(app: &TestApp) -> fanout_chat::Config {
    let mut config = test_config(BusKind::Rabbit);
    config.rabbitmq = app.config.rabbitmq.clone();
    config.replica = format!("second-{}", ulid::Ulid::new());
    config
}

/// History written through one replica is read through another: pages, and a session that
/// left replica one and comes back on replica two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_written_through_one_replica_is_read_through_another() {
    let one = spawn_app(BusKind::Rabbit).await;
    let two = spawn_app_with(replica_of(&one)).await;
    let mut session = one.connect().await;
    let seen = one.post_text("seen on one").await;
    assert_eq!(session.next_message().await, seen);
    session.close().await;
    let missed = ids(&post_many(&one, "posted to one", 3).await);

    two.wait_for_history(&missed[2]).await;
    let page = two.history("?limit=4").await;
    assert_eq!(page_ids(&page)[1..], missed[..], "replica two pages what replica one took");
    let mut back = two.connect_since(seen["id"].as_str().unwrap()).await;
    assert_eq!(ids(&read_messages(&mut back, 3).await), missed, "resumed on the other replica");
    let live = one.post_text("live through one").await;
    assert_eq!(back.next_message().await, live);
    two.stop_keeping_broker_state().await;
    one.stop().await;
}

/// The window is bounded; what is older is read from the stream on demand, for pages and for
/// a session that was away longer than the window holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_history_than_the_window_comes_from_the_stream() {
    let mut config = test_config(BusKind::Rabbit);
    config.history.window = 5;
    let app = spawn_app_with(config).await;
    let posted = ids(&post_many(&app, "deep", 12).await);
    app.wait_for_history(&posted[11]).await;
    assert_eq!(
        metric(&app, "fanout_chat_history_window_messages").await,
        5.0,
        "the window holds only its five"
    );

    let page = app.history("?limit=10").await;
    assert_eq!(page_ids(&page), posted[2..], "five from the window, five from the stream");
    assert_eq!(page["has_more"], true);
    let rest = app.history(&format!("?limit=10&before={}", posted[2])).await;
    assert_eq!(page_ids(&rest), posted[..2]);
    assert_eq!(rest["has_more"], false);
    let middle = app.history(&format!("?limit=3&before={}", posted[4])).await;
    assert_eq!(page_ids(&middle), posted[1..4], "a page before an id the window no longer holds");

    let mut session = app.connect_since(&posted[1]).await;
    assert_eq!(
        ids(&read_messages(&mut session, 10).await),
        posted[2..],
        "replayed from the stream, then the window"
    );
    let live = app.post_text("live").await;
    assert_eq!(session.next_message().await, live);
    app.stop().await;
}

/// The stream is durable, of type stream, bound to the exchange, with the configured retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_stream_is_durable_bound_and_has_the_configured_retention() {
    let mut config = test_config(BusKind::Rabbit);
    let stream = config.rabbitmq.as_mut().unwrap();
    stream.history.max_age = "12h".into();
    stream.history.max_bytes = 8_000_000;
    let name = stream.history.name.clone();
    let app = spawn_app_with(config).await;
    let line = crate::helpers::broker_line(
        &["list_queues", "name", "type", "durable", "arguments"],
        &format!("{name}\t"),
    )
    .await;
    assert!(line.starts_with(&format!("{name}\tstream\ttrue\t")), "{line}");
    assert!(line.contains(r#"{"x-max-age","12h"}"#), "{line}");
    assert!(line.contains(r#"{"x-max-length-bytes",8000000}"#), "{line}");
    let bindings = crate::helpers::rabbitmqctl(&["list_bindings", "source_name", "destination_name"]);
    assert!(bindings.lines().any(|l| l == format!("{}\t{name}", app.exchange())), "bound to the exchange");
    app.stop().await;
}

/// History survives a restart of the app: a new process fills its window from the stream
/// before it reports ready, and resumes sessions from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_survives_an_app_restart() {
    let first = spawn_app(BusKind::Rabbit).await;
    let posted = ids(&post_many(&first, "before restart", 4).await);
    let config = replica_of(&first);
    first.stop_keeping_broker_state().await;

    // Ready means filled: the very first request already sees the history.
    let second = spawn_app_with(config).await;
    assert_eq!(page_ids(&second.history("").await), posted, "the window was filled before ready");
    let mut session = second.connect_since(&posted[1]).await;
    assert_eq!(ids(&read_messages(&mut session, 2).await), posted[2..]);
    second.stop().await;
}

/// A message another service publishes straight to the exchange, without a message_id, is in
/// the history, and a session can resume right after it: every reader derives the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_message_is_in_the_history_and_can_be_resumed_after() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut session = app.connect().await;
    let service = service().await;
    service.publish(app.exchange(), b"deploy finished", BasicProperties::default()).await;
    let foreign = session.next_message().await;
    assert_eq!(foreign["text"], "deploy finished");
    within("the notification to show in the history", async {
        while !app.history("").await["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["text"] == "deploy finished")
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    session.close().await;
    let after = app.post_text("after the notification").await;
    let mut back = app.connect_since(foreign["id"].as_str().unwrap()).await;
    assert_eq!(back.next_message().await, after, "resumed right after the foreign message");
    app.stop().await;
}

/// `NOTIFIER_HISTORY_WINDOW=0` turns history off: no stream on the broker, empty pages, and a
/// resuming session is told there is no history, then gets live messages without delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_can_be_turned_off() {
    let mut config = test_config(BusKind::Rabbit);
    config.history.window = 0;
    let stream = config.rabbitmq.as_ref().unwrap().history.name.clone();
    let app = spawn_app_with(config).await;
    let posted = app.post_text("not kept").await;
    let page = app.history("").await;
    assert_eq!(page_ids(&page), Vec::<String>::new());
    assert_eq!(page["has_more"], false);
    assert!(!crate::helpers::queue_exists(&stream).await, "no stream declared");

    let mut session = app.connect_since(posted["id"].as_str().unwrap()).await;
    let notice = session.next_frame().await;
    assert_eq!(notice["type"], "gap", "{notice}");
    assert!(notice["reason"].as_str().unwrap().contains("history is turned off"), "{notice}");
    let started = std::time::Instant::now();
    let live = app.post_text("live").await;
    assert_eq!(session.next_message().await, live);
    assert!(started.elapsed() < Duration::from_secs(2), "not held back: {:?}", started.elapsed());
    app.stop().await;
}

/// An empty history still tells the page where "now" is: a message published between the page
/// and the socket's subscription reaches a socket that resumes from there, with no gap notice.
/// Without it (no `since`), the socket would only get what came after its own subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_history_page_gives_a_resume_point_that_misses_nothing_sent_before_the_socket() {
    for kind in [BusKind::Memory, BusKind::Rabbit] {
        let app = spawn_app(kind).await;
        let page = app.history("").await;
        assert_eq!(page["messages"].as_array().unwrap().len(), 0, "{page}");
        let resume = page["resume"].as_str().expect("a resume point even when empty");
        assert!(resume.starts_with('@'), "{resume}");
        let missed = app.post_text("between the page and the socket").await;
        let mut late = app.connect().await;
        let mut resumed = app.connect_since(resume).await;
        assert_eq!(resumed.next_message().await, missed, "{kind:?}: the resume point replays it");
        // The socket without it never gets it: the next thing it sees is the next message.
        let next = app.post_text("after both sockets").await;
        assert_eq!(late.next_message().await, next, "{kind:?}");
        assert_eq!(resumed.next_message().await, next, "{kind:?}: once, then live");
        // A page with messages gives the point too; a malformed one is refused.
        assert!(app.history("").await["resume"].is_string());
        assert!(app.history("?before=01ARZ3NDEKTSV4RRFFQ69G5FAV").await.get("resume").is_none());
        let status = crate::helpers::handshake_status(format!("ws://{}/ws?since=@x", app.addr)).await;
        assert_eq!(status, 400, "{kind:?}");
        app.stop().await;
    }
}
