//! Overload: rate and session limits answer 429 with Retry-After, per client address and
//! globally. Loopback has many addresses: 127.0.0.2 is a second client.

use std::net::IpAddr;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use crate::helpers::{BusKind, spawn_app_with, test_config, within};

const OTHER_CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

fn client_from(ip: IpAddr) -> reqwest::Client {
    reqwest::Client::builder().local_address(ip).build().unwrap()
}

/// The status of a WebSocket handshake to `addr` from `ip`.
async fn handshake_status(addr: std::net::SocketAddr, ip: IpAddr) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((ip, 0).into()).unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let result =
        within("a handshake", tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)).await;
    match result {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(tungstenite::Error::Http(response)) => {
            if response.status() == 429 {
                let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!(retry >= 1, "Retry-After says when to come back");
            }
            response.status().as_u16()
        }
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_message_rate_gets_429_and_other_clients_are_served() {
    let mut config = test_config(BusKind::Rabbit);
    // Slow refill (one message per 333 ms) so the burst below is refused however slow the machine.
    config.limits.messages_per_client = 3;
    let app = spawn_app_with(config).await;
    let mut session = app.connect().await;
    let mut statuses = Vec::new();
    for n in 0..8 {
        let response = app.post_json(json!({ "text": format!("burst {n}") })).await;
        statuses.push(response.status().as_u16());
        if response.status() == 429 {
            let retry: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
            assert!(retry >= 1);
            let body: Value = response.json().await.unwrap();
            assert!(body["error"].as_str().unwrap().contains("too many messages"), "{body}");
        }
    }
    assert_eq!(&statuses[..3], [202; 3], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "the burst over the limit is refused: {statuses:?}");
    // The session got exactly the accepted ones.
    for (n, _) in statuses.iter().enumerate().filter(|(_, s)| **s == 202) {
        assert_eq!(session.next_message().await["text"], format!("burst {n}"));
    }

    // A frame over the budget is refused with an error frame, and the session stays open.
    session.send_text("one more over the limit").await;
    let frame = session.next_frame().await;
    assert_eq!(frame["type"], "error", "{frame}");
    assert!(frame["retry_after"].as_u64().unwrap() >= 1, "{frame}");

    // Another address has its own budget.
    let other = client_from(OTHER_CLIENT);
    let response =
        other.post(app.url("/messages")).json(&json!({ "text": "from elsewhere" })).send().await.unwrap();
    assert_eq!(response.status(), 202);
    assert_eq!(session.next_message().await["text"], "from elsewhere");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_message_rate_covers_every_client() {
    let mut config = test_config(BusKind::Memory);
    config.limits.messages_global = 3;
    let app = spawn_app_with(config).await;
    let other = client_from(OTHER_CLIENT);
    let mut statuses = Vec::new();
    for n in 0..6 {
        let client = if n % 2 == 0 { &app.http } else { &other };
        statuses.push(
            client
                .post(app.url("/messages"))
                .json(&json!({ "text": "x" }))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16(),
        );
    }
    assert_eq!(&statuses[..3], [202; 3], "{statuses:?}");
    assert!(statuses[3..].iter().all(|&s| s == 429), "{statuses:?}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_over_the_per_client_and_global_limits_get_429() {
    let mut config = test_config(BusKind::Rabbit);
    config.limits.max_sessions_per_client = 2;
    config.limits.max_sessions = 3;
    let app = spawn_app_with(config).await;
    let first = app.connect().await;
    let _second = app.connect().await;
    assert_eq!(
        handshake_status(app.addr, "127.0.0.1".parse().unwrap()).await,
        429,
        "a third from the same address"
    );
    let _elsewhere = crate::helpers::connect_from(app.addr, OTHER_CLIENT).await;
    assert_eq!(handshake_status(app.addr, "127.0.0.3".parse().unwrap()).await, 429, "over the global limit");

    // A closed session gives its place back.
    first.close().await;
    within("a place to free up", async {
        while handshake_status(app.addr, "127.0.0.1".parse().unwrap()).await != 101 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_trusted_proxy_the_client_is_the_last_forwarded_address() {
    let mut config = test_config(BusKind::Memory);
    config.limits.messages_per_client = 1;
    config.limits.client_ip_header = Some("x-forwarded-for".into());
    let app = spawn_app_with(config).await;
    let post = |forwarded: &'static str| {
        app.http
            .post(app.url("/messages"))
            .header("x-forwarded-for", forwarded)
            .json(&json!({ "text": "x" }))
            .send()
    };
    // Same proxy peer (127.0.0.1), different clients: separate budgets. The first address is
    // the client's own claim and is ignored.
    assert_eq!(post("1.1.1.1, 203.0.113.7").await.unwrap().status(), 202);
    assert_eq!(post("9.9.9.9, 203.0.113.8").await.unwrap().status(), 202);
    assert_eq!(post("2.2.2.2, 203.0.113.7").await.unwrap().status(), 429, "same last address, same budget");
    app.stop().await;
}
