//! `POST /messages`: publishing, the envelope, and every kind of bad input.

use serde_json::{Value, json};

use crate::{
    both_buses,
    helpers::{BusKind, spawn_app},
};

both_buses!(
    a_posted_message_reaches_every_open_session,
    a_form_post_like_curl_is_accepted,
    the_envelope_has_a_sortable_id_and_a_utc_timestamp,
    bad_input_gets_a_json_error_and_disturbs_no_session,
    a_message_at_exactly_the_limit_is_accepted_and_one_byte_more_is_413,
    a_session_receives_every_message_once_and_in_order,
);

async fn a_posted_message_reaches_every_open_session(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut alice = app.connect().await;
    let mut bob = app.connect().await;

    let response = app.post_json(json!({ "text": "hello, everyone", "user": "ada" })).await;
    assert_eq!(response.status(), 202);
    let accepted: Value = response.json().await.unwrap();

    assert_eq!(alice.next_message().await, accepted);
    assert_eq!(bob.next_message().await, accepted);
    assert_eq!(accepted["text"], "hello, everyone");
    assert_eq!(accepted["user"], "ada");
    app.stop().await;
}

async fn a_form_post_like_curl_is_accepted(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    let response = app.post_form("text=hello+from+curl+%F0%9F%91%8B&user=ops").await;
    assert_eq!(response.status(), 202);
    assert_eq!(response.headers()["content-type"], "application/json");
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(accepted["text"], "hello from curl 👋");
    assert_eq!(session.next_message().await, accepted);
    app.stop().await;
}

async fn the_envelope_has_a_sortable_id_and_a_utc_timestamp(kind: BusKind) {
    let app = spawn_app(kind).await;
    let first: Value = app.post_json(json!({ "text": "one" })).await.json().await.unwrap();
    let second: Value = app.post_json(json!({ "text": "two", "user": "  " })).await.json().await.unwrap();
    let (id1, id2) = (first["id"].as_str().unwrap(), second["id"].as_str().unwrap());
    assert_eq!(id1.len(), 26, "a ULID: {id1}");
    assert!(id1 < id2, "ids sort by time: {id1} then {id2}");
    let ts = first["ts"].as_str().unwrap();
    assert!(time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339).is_ok(), "{ts}");
    assert!(ts.ends_with('Z'), "UTC: {ts}");
    assert!(first.get("user").is_none(), "no user given, no user field: {first}");
    assert!(second.get("user").is_none(), "a blank user is no user: {second}");
    app.stop().await;
}

async fn bad_input_gets_a_json_error_and_disturbs_no_session(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut bystander = app.connect().await;
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("application/json", b"{not json".to_vec(), 400, "not valid message JSON"),
        ("application/json", br#"{"user":"ada"}"#.to_vec(), 400, "no text"),
        ("application/json", br#"{"text":"  \n "}"#.to_vec(), 400, "blank"),
        ("application/json", br#"{"text":5}"#.to_vec(), 400, "invalid type"),
        ("application/json", b"{\"text\":\"\xff\xfe\"}".to_vec(), 400, "UTF-8"),
        ("application/x-www-form-urlencoded", b"text=%FF%FE".to_vec(), 400, "UTF-8"),
        ("application/x-www-form-urlencoded", b"user=ada".to_vec(), 400, "no text"),
        ("text/plain", b"hello".to_vec(), 415, "content type"),
        (
            "application/json",
            format!(r#"{{"text":"x","user":"{}"}}"#, "u".repeat(65)).into_bytes(),
            400,
            "user name",
        ),
    ];
    for (content_type, body, status, phrase) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let response = app.post_raw(content_type, body).await;
        assert_eq!(response.status(), status, "{content_type} {shown}");
        let error: Value = response.json().await.expect("a JSON error body");
        let sentence = error["error"].as_str().expect("an error sentence");
        assert!(sentence.contains(phrase), "{shown}: {sentence:?} should mention {phrase:?}");
    }
    let no_content_type = app.http.post(app.url("/messages")).body("text=hi").send().await.unwrap();
    assert_eq!(no_content_type.status(), 415);

    // Nothing was published, and the bystander's session is still fine: the next frame it
    // gets is the next good message.
    let good = app.post_text("still here").await;
    assert_eq!(bystander.next_message().await, good);
    app.stop().await;
}

async fn a_message_at_exactly_the_limit_is_accepted_and_one_byte_more_is_413(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    let limit = app.config.messages.max_bytes;
    // Multi-byte characters: the limit counts UTF-8 bytes, not characters.
    let at_limit = "é".repeat(limit / 2);
    assert_eq!(at_limit.len(), limit);
    let response = app.post_json(json!({ "text": at_limit })).await;
    assert_eq!(response.status(), 202);
    assert_eq!(session.next_message().await["text"], at_limit);

    let over = format!("{at_limit}x");
    let response = app.post_json(json!({ "text": over })).await;
    assert_eq!(response.status(), 413);
    let error: Value = response.json().await.unwrap();
    assert!(error["error"].as_str().unwrap().contains(&format!("limit is {limit} bytes")), "{error}");

    // A body far beyond any valid message is cut off by the body limit, still as JSON.
    let huge = app.post_raw("application/json", vec![b' '; limit * 10]).await;
    assert_eq!(huge.status(), 413);
    assert!(huge.json::<Value>().await.unwrap()["error"].is_string());
    app.stop().await;
}

async fn a_session_receives_every_message_once_and_in_order(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    let mut sent = Vec::new();
    for n in 0..50 {
        sent.push(app.post_text(&format!("message {n}")).await["id"].clone());
    }
    for id in &sent {
        assert_eq!(&session.next_message().await["id"], id);
    }
    // No duplicate trails behind: the next frame is the next message.
    let sentinel = app.post_text("sentinel").await;
    assert_eq!(session.next_message().await, sentinel);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_connect_at_once_each_get_every_message_exactly_once() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut sessions = futures_util::future::join_all((0..40).map(|_| app.connect())).await;
    let first = app.post_text("first").await;
    let second = app.post_text("second").await;
    let third = app.post_text("third").await;
    for session in &mut sessions {
        // In order, and no duplicate between them.
        assert_eq!(session.next_message().await, first);
        assert_eq!(session.next_message().await, second);
        assert_eq!(session.next_message().await, third);
    }
    app.stop().await;
}
