//! Probes, metrics, an unreachable broker, and shutdown.

use serde_json::{Value, json};

use crate::{
    both_buses,
    helpers::{BusKind, spawn_app, spawn_app_with, test_config, wait_for_queue, within},
};

both_buses!(
    health_and_readiness_answer_200_when_the_bus_is_up,
    metrics_count_sessions_and_messages_in_prometheus_text,
    stopping_closes_every_session_with_1001,
);

async fn health_and_readiness_answer_200_when_the_bus_is_up(kind: BusKind) {
    let app = spawn_app(kind).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["mode"], app.config.mode());
    app.stop().await;
}

async fn metrics_count_sessions_and_messages_in_prometheus_text(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut session = app.connect().await;
    app.post_text("counted").await;
    session.next_message().await;
    let metrics = |text: &str, name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from:\n{text}"))
            .parse()
            .unwrap()
    };
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = response.text().await.unwrap();
    assert_eq!(metrics(&text, "fanout_chat_sessions_open"), 1.0);
    assert_eq!(metrics(&text, "fanout_chat_messages_published_total"), 1.0);
    assert_eq!(metrics(&text, "fanout_chat_publish_duration_seconds_count"), 1.0);
    // The delivered counter moves after the frame is written, so wait for it.
    within("the delivery to be counted", async {
        loop {
            let text = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
            if metrics(&text, "fanout_chat_messages_delivered_total") == 1.0 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(text.contains("# TYPE fanout_chat_broker_reconnects_total counter"));
    app.stop().await;
}

async fn stopping_closes_every_session_with_1001(kind: BusKind) {
    let app = spawn_app(kind).await;
    let mut first = app.connect().await;
    let mut second = app.connect().await;
    let queue = first.queue();
    let rabbit = app.config.rabbitmq.is_some();
    let stopping = tokio::spawn(app.stop());
    assert_eq!(first.closed().await, (1001, "server shutting down".to_owned()));
    assert_eq!(second.closed().await.0, 1001);
    within("the app to stop", stopping).await.unwrap();
    if rabbit {
        wait_for_queue(&queue, false).await;
    }
}

/// A broker that does not answer: the process serves, reports not-ready with a reason, and
/// refuses publishes and sessions with 503 rather than pretending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_broker_the_app_serves_but_is_not_ready_and_answers_503() {
    // Port 9 (discard) is closed on loopback: connections are refused at once.
    let config = test_config(BusKind::Memory).with_rabbitmq("127.0.0.1", 9, "unreachable");
    let app = fanout_chat::Application::build_on(config, [127, 0, 0, 1].into()).await.unwrap();
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let url = |path: &str| format!("http://{addr}{path}");

    assert_eq!(http.get(url("/healthz")).send().await.unwrap().status(), 200, "alive without a broker");
    let ready = http.get(url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let reason: Value = ready.json().await.unwrap();
    assert!(reason["error"].as_str().unwrap().contains("not ready"), "{reason}");

    let post = http.post(url("/messages")).json(&json!({ "text": "lost?" })).send().await.unwrap();
    assert_eq!(post.status(), 503);
    assert_eq!(post.headers()["retry-after"], "1");
    let body: Value = post.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("nothing was published"), "{body}");

    let ws = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await;
    match ws {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        other => panic!("expected the upgrade to be refused with 503, got {other:?}"),
    }
    // The page still renders: people see the app, and its status says it is not connected.
    assert_eq!(http.get(url("/")).send().await.unwrap().status(), 200);

    let _ = stop.send(());
    within("shutdown without a broker", server).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app_with(test_config(BusKind::Memory)).await;
    for (method, path, status) in [
        (reqwest::Method::GET, "/nope", 404),
        (reqwest::Method::GET, "/static/nope.js", 404),
        (reqwest::Method::PUT, "/messages", 405),
        (reqwest::Method::DELETE, "/healthz", 405),
        (reqwest::Method::GET, "/ws", 400),
    ] {
        let response = app.http.request(method.clone(), app.url(path)).send().await.unwrap();
        assert_eq!(response.status(), status, "{method} {path}");
        let body: Value = response.json().await.unwrap_or_else(|e| panic!("{method} {path}: not JSON: {e}"));
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    app.stop().await;
}

/// `NOTIFIER_RABBITMQ_TLS=true` against a plain-AMQP port: the TLS handshake fails, and the
/// app says why in its readiness reason and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_handshake_failure_is_reported_as_not_ready() {
    let mut config = test_config(BusKind::Rabbit);
    config.rabbitmq.as_mut().unwrap().tls = true;
    let app = fanout_chat::Application::build_on(config, [127, 0, 0, 1].into()).await.unwrap();
    let addr = app.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let reason = within("a TLS failure to be reported", async {
        loop {
            let ready = http.get(format!("http://{addr}/readyz")).send().await.unwrap();
            assert_eq!(ready.status(), 503);
            let body: Value = ready.json().await.unwrap();
            let reason = body["error"].as_str().unwrap().to_owned();
            if reason != "not ready: connecting to the broker" {
                return reason;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(reason.contains("127.0.0.1:5672"), "{reason}");
    assert_eq!(http.get(format!("http://{addr}/healthz")).send().await.unwrap().status(), 200);
    let _ = stop.send(());
    within("shutdown", server).await.unwrap().unwrap();
}

/// Rolling deploys: on the stop signal the replica turns not-ready at once, refuses new
/// sessions, keeps serving the open ones through the drain period, then closes them with 1001.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_stop_the_app_drains_before_closing_sessions() {
    let mut config = test_config(BusKind::Rabbit);
    config.shutdown.drain = std::time::Duration::from_secs(2);
    let mut app = spawn_app_with(config).await;
    let mut session = app.connect().await;
    app.signal_stop();
    let signalled = std::time::Instant::now();
    within("readiness to turn 503", async {
        while app.http.get(app.url("/readyz")).send().await.unwrap().status() != 503 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let refused = tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr)).await;
    assert!(
        matches!(&refused, Err(tokio_tungstenite::tungstenite::Error::Http(r)) if r.status() == 503),
        "new sessions go to other replicas: {refused:?}"
    );
    // The open session is still served during the drain.
    let message = app.post_text("during the drain").await;
    assert_eq!(session.next_message().await, message);
    let (code, _) = session.closed().await;
    assert_eq!(code, 1001);
    assert!(signalled.elapsed() >= std::time::Duration::from_secs(2), "closed only after the drain period");
    app.stop().await;
}

/// Quiet sessions are pinged, so proxies with idle timeouts never cut them, and a session that
/// answers stays open however long it is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_session_is_pinged_and_stays_open_while_it_answers() {
    use futures_util::StreamExt;
    let mut config = test_config(BusKind::Memory);
    config.ws.ping_interval = std::time::Duration::from_secs(1);
    let app = spawn_app_with(config).await;
    let mut session = app.connect().await;
    // Reading lets the client answer each ping with a pong (tungstenite does it on read).
    let mut pings = 0;
    within("four pings", async {
        while pings < 4 {
            match session.stream.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
                other => panic!("expected only pings on a quiet session, got {other:?}"),
            }
        }
    })
    .await;
    let message = app.post_text("still here after four pings").await;
    assert_eq!(session.next_message().await, message);
    app.stop().await;
}

/// A peer that stops answering pings (a vanished laptop, a dead NAT entry) is closed and its
/// place given back, instead of holding a queue forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_stops_answering_pings_is_closed() {
    let mut config = test_config(BusKind::Rabbit);
    config.ws.ping_interval = std::time::Duration::from_secs(1);
    let app = spawn_app_with(config).await;
    let silent = app.connect().await;
    let queue = silent.queue();
    // Never read again: no pongs go back.
    wait_for_queue(&queue, true).await;
    within("the silent session's queue to go", async {
        while crate::helpers::queue_exists(&queue).await {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    })
    .await;
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("fanout_chat_sessions_open 0"), "{metrics}");
    drop(silent);
    app.stop().await;
}

/// The broker permissions the README gives a user of its own, for the exchange `exchange`:
/// configure, write and read, as `rabbitmqctl set_permissions` takes them.
fn documented_permissions(exchange: &str) -> [String; 3] {
    let exchange = exchange.replace('.', "\\.");
    let own = format!("{exchange}|{exchange}\\.history");
    [
        format!("^({own}|fanout-chat\\..*)$"),
        format!("^({own}|amq\\.default|fanout-chat\\..*)$"),
        format!("^({own}|fanout-chat\\..*)$"),
    ]
}

/// A broker user with only the permissions the README documents (not the operator's
/// administrator) runs the app: declares, publishes, follows the history, resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_user_with_only_the_documented_permissions_runs_the_app() {
    let id = ulid::Ulid::new().to_string().to_lowercase();
    // Not under fanout-chat.*: the exchange must be allowed by its own name. (The test command
    // removes streams named fanout-chat-test.* that a failed run leaves.)
    let exchange = format!("fanout-chat-test.least-privilege-{id}");
    let user = TempUser(format!("fanout-chat-test-{id}"));
    let password = format!("pw-{id}");
    crate::helpers::rabbitmqctl_with(&["add_user", &user.0, &password]);
    let [configure, write, read] = documented_permissions(&exchange);
    crate::helpers::rabbitmqctl_with(&["set_permissions", "-p", "/", &user.0, &configure, &write, &read]);

    let mut config = test_config(BusKind::Rabbit);
    let rabbit = config.rabbitmq.as_mut().unwrap();
    rabbit.exchange.clone_from(&exchange);
    rabbit.history.name = format!("{exchange}.history");
    rabbit.user.clone_from(&user.0);
    rabbit.password = fanout_chat::config::Secret::new(password);
    let app = crate::helpers::spawn_app_with(config).await;
    let mut session = app.connect().await;
    let first = app.post_text("with least privilege").await;
    assert_eq!(session.next_message().await, first);
    let second = app.post_text("and again").await;
    assert_eq!(session.next_message().await, second);
    let page = within("the history to hold both", async {
        loop {
            let page = app.history("").await;
            if page["messages"].as_array().is_some_and(|m| m.len() == 2) {
                return page;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(page["messages"][1], second);
    let mut resumed = app.connect_since(first["id"].as_str().unwrap()).await;
    assert_eq!(resumed.next_message().await, second);
    app.stop().await;
}

/// A broker user of a test's own, deleted when the test ends, passed or not.
struct TempUser(String);

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["-q", "delete_user", &self.0]).output();
    }
}
