//! Every door has a rate, only trusted proxies name the client, and the public is told little:
//! a spoofed `X-Forwarded-For`, a flood of upgrades or of history reads, a wrong broker
//! password at trace level, and text that carries control characters.

use std::{collections::BTreeMap, net::IpAddr};

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    helpers::{BusKind, TestApp, spawn_app_with, test_config, within},
    process::AppProcess,
};

const PROXY: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip).build().unwrap()
}

async fn post_as(http: &reqwest::Client, app: &TestApp, forwarded: &[&str]) -> u16 {
    let mut request = http.post(app.url("/messages")).json(&json!({ "text": "hello" }));
    for value in forwarded {
        request = request.header("x-forwarded-for", *value);
    }
    within("POST /messages", request.send()).await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_names_the_client_only_when_a_trusted_proxy_sent_it() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let mut config = test_config(BusKind::Memory);
    config.limits.messages_per_client = 2;
    config.limits.client_ip_header = Some("x-forwarded-for".into());
    config.limits.trusted_proxies = vec!["127.0.0.2/32".parse().unwrap()];
    let app = spawn_app_with(config).await;

    // 127.0.0.1 is no proxy of ours: whatever it claims, it is one client with one budget.
    let untrusted = client_from(IpAddr::from([127, 0, 0, 1]));
    let mut statuses = Vec::new();
    for n in 0..6 {
        statuses.push(post_as(&untrusted, &app, &[&format!("198.51.100.{n}")]).await);
    }
    assert_eq!(statuses.iter().filter(|&&s| s == 202).count(), 2, "{statuses:?}");

    // From the proxy: the right-most address that is not the proxy's own, over every line.
    let proxy = client_from(PROXY);
    assert_eq!(post_as(&proxy, &app, &["203.0.113.7"]).await, 202);
    assert_eq!(post_as(&proxy, &app, &["6.6.6.6, 203.0.113.7"]).await, 202);
    assert_eq!(post_as(&proxy, &app, &["203.0.113.7"]).await, 429, "the same client, its budget spent");
    assert_eq!(post_as(&proxy, &app, &["203.0.113.7", "203.0.113.8, 127.0.0.2"]).await, 202, "a second line");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_upgrades_from_one_address_are_mostly_refused_and_declare_few_queues() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let mut config = test_config(BusKind::Rabbit);
    config.limits.sessions_opened_per_client = fanout_chat::Config::local().limits.sessions_opened_per_client;
    let app = spawn_app_with(config).await;
    let url = format!("ws://{}/ws", app.addr);
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    let started = std::time::Instant::now();
    for _ in 0..2000 {
        let status = crate::helpers::handshake_status(url.as_str()).await;
        *statuses.entry(status).or_default() += 1;
    }
    let took = started.elapsed();
    let opened = statuses.get(&101).copied().unwrap_or(0);
    // A burst of ten seconds' worth, then the rate over the time the loop took.
    let allowed = 300 + (took.as_secs_f64() * 30.0).ceil() as usize;
    assert!(opened <= allowed, "{statuses:?} in {took:?}");
    assert!(statuses.get(&429).copied().unwrap_or(0) >= 2000 - allowed, "{statuses:?}");
    let declared = crate::helpers::metric(&app, "fanout_chat_sessions_total").await as usize;
    assert_eq!(declared, opened, "a refused upgrade declares no queue");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_have_a_rate_per_address() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let mut config = test_config(BusKind::Memory);
    config.limits.history_per_client = fanout_chat::Config::local().limits.history_per_client;
    let app = spawn_app_with(config).await;
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for _ in 0..300 {
        let response = within("GET /messages", app.http.get(app.url("/messages")).send()).await.unwrap();
        if response.status() == 429 {
            assert!(response.headers().contains_key("retry-after"));
        }
        *statuses.entry(response.status().as_u16()).or_default() += 1;
    }
    let served = statuses.get(&200).copied().unwrap_or(0);
    assert!((100..300).contains(&served), "a burst of 100, then 10 a second: {statuses:?}");
    let other = client_from(IpAddr::from([127, 0, 0, 3]));
    let response = within("GET /messages", other.get(app.url("/messages")).send()).await.unwrap();
    assert_eq!(response.status(), 200, "another address has its own");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_broker_password_shows_no_secret_in_the_trace_log_nor_the_broker_to_the_public() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let secret = "s3cr3t-n0t-the-password";
    let app = AppProcess::spawn(&[("NOTIFIER_RABBITMQ_PASSWORD", secret), ("RUST_LOG", "trace")]).await;
    // Until it has tried and failed at least once.
    within("the app to report the refused login", async {
        while !app.log().contains("cannot reach the broker") {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    let readyz = within("GET /readyz", app.http.get(app.url("/readyz")).send()).await.unwrap();
    assert_eq!(readyz.status(), 503);
    let readyz = readyz.text().await.unwrap();
    let metrics = within("GET /metrics", async {
        app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap()
    })
    .await;
    for shown in [secret, "127.0.0.1", ":5672", "guest", "ACCESS_REFUSED", "vhost"] {
        assert!(!readyz.contains(shown), "/readyz shows {shown:?}: {readyz}");
    }
    for shown in [secret, "127.0.0.1", "guest", "ACCESS_REFUSED"] {
        assert!(!metrics.contains(shown), "/metrics shows {shown:?}");
    }
    let log = app.log();
    assert!(log.lines().count() > 10, "the log is at trace: {log}");
    assert!(!log.contains(secret), "the log at trace shows the password");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_and_bidi_overrides_are_refused_with_a_sentence_that_says_which() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let app = spawn_app_with(test_config(BusKind::Memory)).await;
    let mut session = app.connect().await;
    for (body, says) in [
        (json!({ "text": "bell\u{7}" }), "U+0007"),
        (json!({ "text": "\u{1b}[2Jcleared" }), "U+001B"),
        (json!({ "text": "nul\u{0}" }), "U+0000"),
        (json!({ "text": "hi", "user": "admin\u{202e}txt.exe" }), "U+202E"),
    ] {
        let response = app.post_json(body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let error: Value = response.json().await.unwrap();
        assert!(error["error"].as_str().unwrap().contains(says), "{body}: {error}");
    }
    // The same from the page's socket: an error frame, and the session goes on.
    session.stream.send(Message::Text("\u{1b}]0;pwned\u{7}".into())).await.unwrap();
    let frame = session.next_frame().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(frame["error"].as_str().unwrap().contains("U+001B"), "{frame}");
    let fine = app.post_text("two lines\nand a\ttab").await;
    assert_eq!(session.next_message().await, fine);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_half_sent_requests_are_closed_within_the_header_timeout_and_others_are_served() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(test_config(BusKind::Memory)).await;
    let mut half_open = Vec::new();
    for _ in 0..1000 {
        let mut socket = within("a connection", tokio::net::TcpStream::connect(app.addr)).await.unwrap();
        // Headers begun, never finished.
        socket.write_all(b"GET /messages HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        half_open.push(socket);
    }
    let started = std::time::Instant::now();
    let response = within("GET /healthz", app.http.get(app.url("/healthz")).send()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(started.elapsed() < std::time::Duration::from_millis(500), "answered in {:?}", started.elapsed());
    let header_timeout = fanout_chat::serve::HEADER_READ_TIMEOUT;
    let closed = tokio::time::timeout(header_timeout + std::time::Duration::from_secs(5), async {
        for socket in &mut half_open {
            let mut byte = [0u8; 1];
            // The server closes it (0 bytes, or an error for a reset), or answers 408 first.
            let _ = socket.read(&mut byte).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "half-sent requests still open after {:?}", started.elapsed());
    assert!(
        started.elapsed() >= header_timeout - std::time::Duration::from_secs(1),
        "not closed before the timeout"
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_timeout() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(test_config(BusKind::Memory)).await;
    let mut socket = within("a connection", tokio::net::TcpStream::connect(app.addr)).await.unwrap();
    socket.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = within("the answer", socket.read(&mut answer)).await.unwrap();
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer[..n]));
    // Kept alive, then nothing more: the server closes it once the header timeout has passed.
    let idle = std::time::Instant::now();
    let header_timeout = fanout_chat::serve::HEADER_READ_TIMEOUT;
    let closed =
        tokio::time::timeout(header_timeout + std::time::Duration::from_secs(5), socket.read(&mut answer))
            .await;
    assert!(matches!(closed, Ok(Ok(0) | Err(_))), "still open after {:?}: {closed:?}", idle.elapsed());
    assert!(idle.elapsed() >= header_timeout / 2, "closed after {:?}, before the timeout", idle.elapsed());
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_nobody_reads_is_dropped_after_the_write_timeout() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = test_config(BusKind::Memory);
    config.ws.http_write_timeout = std::time::Duration::from_secs(2);
    let app = spawn_app_with(config).await;
    let heavy = "\"".repeat(4000);
    for n in 0..200 {
        app.post_text(&format!("{n} {heavy}")).await;
    }
    let in_flight = "fanout_chat_history_pages_in_flight_bytes";
    let mut socket = within("a connection", tokio::net::TcpStream::connect(app.addr)).await.unwrap();
    socket.write_all(b"GET /messages?limit=500 HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut status = [0u8; 12];
    within("the status line", socket.read_exact(&mut status)).await.unwrap();
    assert_eq!(&status[9..12], b"200");
    // A megabyte does not fit in the sockets' buffers: the rest of the page waits in the app.
    assert!(crate::helpers::metric(&app, in_flight).await > 0.0, "the unread page is held");
    let stalled = std::time::Instant::now();
    within("the unread page to be dropped", async {
        while crate::helpers::metric(&app, in_flight).await > 0.0 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(stalled.elapsed() >= std::time::Duration::from_secs(1), "dropped after {:?}", stalled.elapsed());
    drop(socket);
    app.stop().await;
}
