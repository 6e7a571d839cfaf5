//! Every real caller is served with the default settings: a service with an API key (its own
//! limit, named in `from`), a keyless service, an office of browsers behind one address; and
//! a page of another site is refused (403) before anything is opened or published.

use std::time::Duration;

use fanout_chat::{
    Config,
    config::{AllowedOrigins, ApiKeys},
};
use futures_util::future::join_all;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{client::IntoClientRequest, http::HeaderValue};

use crate::helpers::{
    AMQP_HOST, AMQP_PORT, TestApp, metric, rabbitmqctl, spawn_app_with, unique_exchange, within,
};

const BILLING_KEY: &str = "billing-7f3a9c2e41d8b6a0";

/// The shipped defaults (limits included), on RabbitMQ, on a free port.
fn defaults() -> Config {
    let mut config = Config::local().with_rabbitmq(AMQP_HOST, AMQP_PORT, &unique_exchange());
    config.port = 0;
    config
}

fn with_billing_key(mut config: Config) -> Config {
    config.access.api_keys = ApiKeys::read(Some(&format!("billing:{BILLING_KEY}")), None).unwrap();
    config
}

async fn post_with(app: &TestApp, header: (&str, &str), body: Value) -> reqwest::Response {
    within(
        "POST /messages",
        app.http.post(app.url("/messages")).header(header.0, header.1).json(&body).send(),
    )
    .await
    .unwrap()
}

/// The status of a WebSocket handshake sent with `Origin: origin`.
async fn upgrade_from_origin(app: &TestApp, origin: &str) -> u16 {
    let mut request = format!("ws://{}/ws", app.addr).into_client_request().unwrap();
    request.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
    crate::helpers::handshake_status(request).await
}

/// This app's session queues on the broker (its replica's queues but its overflow queue).
fn session_queues(app: &TestApp) -> Vec<String> {
    let prefix = format!("fanout-chat.{}.", app.config.replica);
    rabbitmqctl(&["-q", "--no-table-headers", "list_queues", "name"])
        .lines()
        .filter(|q| q.starts_with(&prefix) && !q.ends_with(".overflow"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_service_posts_300_messages_in_a_second_and_every_session_gets_each_with_from() {
    let app = spawn_app_with(with_billing_key(defaults())).await;
    let mut sessions = vec![app.connect().await, app.connect().await];
    let started = std::time::Instant::now();
    // Ten callers at once, as a service's workers would post.
    let statuses: Vec<Vec<u16>> = join_all((0..10).map(|worker| {
        let app = &app;
        async move {
            let mut statuses = Vec::new();
            for n in 0..30 {
                let body = json!({ "text": format!("invoice {worker}-{n} paid") });
                let response =
                    post_with(app, ("authorization", &format!("Bearer {BILLING_KEY}")), body).await;
                statuses.push(response.status().as_u16());
            }
            statuses
        }
    }))
    .await;
    let took = started.elapsed();
    let statuses: Vec<u16> = statuses.into_iter().flatten().collect();
    assert_eq!(statuses, vec![202; 300], "every keyed POST is accepted (took {took:?})");
    for session in &mut sessions {
        for _ in 0..300 {
            let message = session.next_message().await;
            assert_eq!(message["from"], "billing", "{message}");
            assert!(message["text"].as_str().unwrap().starts_with("invoice "), "{message}");
        }
    }
    let published = r#"fanout_chat_key_messages_total{key="billing",result="published"}"#;
    assert_eq!(metric(&app, published).await, 300.0);
    // A message without a key carries no `from`.
    let anonymous = app.post_text("from a person").await;
    assert!(anonymous.get("from").is_none(), "{anonymous}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_an_empty_bearer_and_another_scheme_get_401_and_publish_nothing() {
    let app = spawn_app_with(with_billing_key(defaults())).await;
    let mut session = app.connect().await;
    for value in ["Bearer not-the-billing-key-000", "Bearer ", "Bearer", &format!("Basic {BILLING_KEY}")] {
        let response =
            post_with(&app, ("authorization", value), json!({ "text": "should not appear" })).await;
        assert_eq!(response.status(), 401, "{value:?}");
        let challenge = response.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(challenge.starts_with("Bearer"), "{value:?}: {challenge}");
        let body: Value = response.json().await.unwrap();
        let error = body["error"].as_str().unwrap();
        assert!(!error.is_empty() && !error.contains(BILLING_KEY), "{value:?}: {body}");
    }
    let after = app.post_text("after the refused ones").await;
    assert_eq!(session.next_message().await, after, "nothing refused reached the session");
    app.wait_for_history(after["id"].as_str().unwrap()).await;
    let history = app.history("").await;
    assert_eq!(history["messages"].as_array().unwrap(), &vec![after], "nor the history");
    assert_eq!(metric(&app, "fanout_chat_auth_failures_total").await, 4.0);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_service_over_its_own_limit_gets_429_with_retry_after() {
    let mut config = with_billing_key(defaults());
    config.limits.messages_per_key = 3;
    let app = spawn_app_with(config).await;
    // At once: the bucket (3, refilled one every 333 ms) cannot refill under the burst.
    let bearer = format!("Bearer {BILLING_KEY}");
    let responses = join_all((0..12).map(|n| {
        let body = json!({ "text": format!("burst {n}") });
        post_with(&app, ("authorization", &bearer), body)
    }))
    .await;
    let mut statuses = Vec::new();
    for response in responses {
        if response.status() == 429 {
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry >= 1);
        }
        statuses.push(response.status().as_u16());
    }
    let accepted = statuses.iter().filter(|&&s| s == 202).count();
    assert!((3..12).contains(&accepted), "{statuses:?}");
    assert!(statuses.iter().all(|&s| s == 202 || s == 429), "{statuses:?}");
    let refused = r#"fanout_chat_key_messages_total{key="billing",result="refused"}"#;
    assert_eq!(metric(&app, refused).await, (12 - accepted) as f64);
    // The key's limit is its own: the same address without a key is still served.
    assert_eq!(app.post_json(json!({ "text": "a person" })).await.status(), 202);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_configured_an_auth_proxys_authorization_header_is_not_refused() {
    let app = spawn_app_with(defaults()).await;
    let mut session = app.connect().await;
    for value in ["Basic dXNlcjpwYXNz", "Bearer eyJhbGciOiJSUzI1NiJ9.e30.sig"] {
        let response = post_with(&app, ("authorization", value), json!({ "text": value })).await;
        assert_eq!(response.status(), 202, "{value}");
        let message = session.next_message().await;
        assert_eq!(message["text"], value);
        assert!(message.get("from").is_none(), "anonymous: {message}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_from_one_address_open_with_the_default_limits() {
    let app = spawn_app_with(defaults()).await;
    let mut sessions = Vec::new();
    for _ in 0..200 {
        sessions.push(app.connect().await);
    }
    let message = app.post_text("to the whole office").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, message);
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyless_service_posting_50_per_second_for_5_seconds_gets_no_429() {
    let app = spawn_app_with(defaults()).await;
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    let mut statuses = Vec::new();
    for n in 0..250 {
        ticks.tick().await;
        let response =
            app.post_json(json!({ "text": format!("disk 81% full ({n})"), "user": "monitor" })).await;
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, vec![202; 250]);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_site_gets_403_and_nothing_is_opened_or_published() {
    let app = spawn_app_with(defaults()).await;
    let mut session = app.connect().await;
    let status = upgrade_from_origin(&app, "http://evil.example").await;
    assert_eq!(status, 403);
    let response =
        post_with(&app, ("origin", "http://evil.example"), json!({ "text": "posted by another site" })).await;
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("origin"), "{body}");
    assert_eq!(metric(&app, "fanout_chat_sessions_total").await, 1.0, "only the first session was opened");
    assert_eq!(session_queues(&app), [session.queue()], "no queue was declared for the refused one");
    let after = app.post_text("after the refused ones").await;
    assert_eq!(session.next_message().await, after, "nothing of the other site was published");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_own_origin_no_origin_and_listed_origins_are_accepted() {
    let app = spawn_app_with(defaults()).await;
    let own = format!("http://{}", app.addr);
    assert_eq!(upgrade_from_origin(&app, &own).await, 101);
    assert_eq!(post_with(&app, ("origin", &own), json!({ "text": "from the page" })).await.status(), 202);
    assert_eq!(
        app.post_json(json!({ "text": "from curl" })).await.status(),
        202,
        "no Origin: curl, a service"
    );
    app.stop().await;

    let mut config = defaults();
    config.access.allowed_origins = AllowedOrigins::read(Some("https://chat.example.com")).unwrap();
    let app = spawn_app_with(config).await;
    assert_eq!(upgrade_from_origin(&app, "https://chat.example.com").await, 101);
    assert_eq!(upgrade_from_origin(&app, &format!("http://{}", app.addr)).await, 101, "and the page's own");
    assert_eq!(upgrade_from_origin(&app, "https://ops.example.com").await, 403, "but no other");
    app.stop().await;

    // Behind a trusted proxy, the page's origin is the host the proxy was asked for; from
    // anyone else, X-Forwarded-Host is only a claim.
    for (trusted, expected) in [(true, 202), (false, 403)] {
        let mut config = defaults();
        config.limits.client_ip_header = trusted.then(|| "x-forwarded-for".to_owned());
        let app = spawn_app_with(config).await;
        let response = app
            .http
            .post(app.url("/messages"))
            .header("origin", "https://chat.example.com")
            .header("x-forwarded-host", "chat.example.com")
            .json(&json!({ "text": "through the gateway" }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected, "behind a trusted proxy: {trusted}");
        app.stop().await;
    }

    let mut config = defaults();
    config.access.allowed_origins = AllowedOrigins::Any;
    let app = spawn_app_with(config).await;
    assert_eq!(upgrade_from_origin(&app, "http://anywhere.example").await, 101);
    app.stop().await;
}
