//! `Idempotency-Key` on `POST /messages`: a retry publishes at most once, on any replica.

use serde_json::{Value, json};

use crate::helpers::{BusKind, TestApp, metric, spawn_app, spawn_app_with, test_config, within};

async fn post_keyed(app: &TestApp, key: &str, text: &str) -> reqwest::Response {
    within(
        "POST /messages",
        app.http
            .post(app.url("/messages"))
            .header("idempotency-key", key)
            .json(&json!({ "text": text }))
            .send(),
    )
    .await
    .unwrap()
}

/// A caller that retries (it got no answer, say) with the same key gets the same envelope back
/// and publishes nothing more: every session shows the message once, the history holds it once.
async fn a_retry_with_the_same_key_answers_the_same_envelope_and_publishes_once(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    let key = ulid::Ulid::new().to_string();
    let first = post_keyed(&app, &key, "pay day").await;
    assert_eq!(first.status(), 202);
    assert!(first.headers().get("idempotent-replayed").is_none(), "the first one is published");
    let first: Value = first.json().await.unwrap();
    for _ in 0..2 {
        let retry = post_keyed(&app, &key, "pay day").await;
        assert_eq!(retry.status(), 202);
        assert_eq!(retry.headers()["idempotent-replayed"], "true");
        assert_eq!(retry.json::<Value>().await.unwrap(), first, "the same envelope: same id and ts");
    }
    // The same text under another key is another message.
    let other = app.post_text("after the retries").await;
    assert_eq!(session.next_message().await, first);
    assert_eq!(session.next_message().await, other, "no second copy in between");
    app.wait_for_history(other["id"].as_str().unwrap()).await;
    let page = app.history("").await;
    assert_eq!(page["messages"].as_array().unwrap(), &vec![first, other], "once in the history");
    assert_eq!(metric(&app, "fanout_chat_messages_published_total").await, 2.0);
    app.stop().await;
}

crate::both_buses!(a_retry_with_the_same_key_answers_the_same_envelope_and_publishes_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_reused_for_another_message_or_malformed_gets_a_clear_error_and_publishes_nothing() {
    let app = spawn_app(BusKind::Rabbit).await;
    let mut session = app.connect().await;
    assert_eq!(post_keyed(&app, "k-1", "the first").await.status(), 202);
    let first = session.next_message().await;
    let reused = post_keyed(&app, "k-1", "another text").await;
    assert_eq!(reused.status(), 422);
    let body: Value = reused.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("Idempotency-Key"), "{body}");
    for bad in ["", "has space", &"x".repeat(256)] {
        let response = post_keyed(&app, bad, "malformed key").await;
        assert_eq!(response.status(), 400, "{bad:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].as_str().unwrap().contains("visible ASCII"), "{body}");
    }
    let after = app.post_text("after the refused ones").await;
    assert_eq!(session.next_message().await, after, "nothing refused was published");
    assert_ne!(first, after);
    app.stop().await;
}

/// Behind a load balancer a retry may reach another replica: it finds the message in the
/// history window (fed from the stream every replica reads) and publishes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_that_reaches_another_replica_publishes_nothing() {
    let one = spawn_app(BusKind::Rabbit).await;
    let mut config = test_config(BusKind::Rabbit);
    config.rabbitmq = one.config.rabbitmq.clone();
    config.replica = format!("second-{}", ulid::Ulid::new());
    let two = spawn_app_with(config).await;
    let mut session = two.connect().await;
    let key = ulid::Ulid::new().to_string();
    let first = post_keyed(&one, &key, "posted to one").await;
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    assert_eq!(session.next_message().await, first);
    two.wait_for_history(first["id"].as_str().unwrap()).await;
    let retry = post_keyed(&two, &key, "posted to one").await;
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    let after = two.post_text("after the retry").await;
    assert_eq!(session.next_message().await, after, "no second copy");
    assert_eq!(metric(&two, "fanout_chat_messages_published_total").await, 1.0, "only the plain post");
    two.stop_keeping_broker_state().await;
    one.stop().await;
}
