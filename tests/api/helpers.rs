//! Test harness: spawn the real app on a free loopback port, talk to it with real clients.

use std::{future::Future, net::SocketAddr, time::Duration};

use fanout_chat::{Application, Config};
use futures_util::{SinkExt, StreamExt};
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeclareOptions},
    types::FieldTable,
};
use serde_json::Value;
use tokio::{net::TcpStream, sync::oneshot, task::JoinHandle};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

/// Every network wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(10);

/// The broker the tests use: the machine's RabbitMQ on loopback.
pub const AMQP_HOST: &str = "127.0.0.1";
pub const AMQP_PORT: u16 = 5672;

pub fn amqp_url() -> String {
    format!("amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/%2f")
}

/// Awaits `future`, failing the test with `what` if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    within_for(WAIT, what, future).await
}

/// [`within`], with a bound of its own.
pub async fn within_for<T>(bound: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(bound, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {bound:?} waiting for {what}"),
    }
}

#[derive(Clone, Copy, Debug)]
pub enum BusKind {
    Memory,
    Rabbit,
    /// RabbitMQ with `NOTIFIER_FANOUT_MODE=process`: one queue per process.
    RabbitProcess,
}

/// A unique exchange per test, so tests run in parallel without seeing each other.
pub fn unique_exchange() -> String {
    format!("fanout-chat-test.{}", ulid::Ulid::new())
}

pub fn test_config(kind: BusKind) -> Config {
    let mut config = Config::local();
    config.port = 0;
    // Tests post in tight loops from one address; the limits have tests of their own.
    config.limits.messages_per_client = 1_000_000;
    config.limits.messages_global = 1_000_000;
    config.limits.max_sessions_per_client = 1_000_000;
    config.limits.sessions_opened_per_client = 1_000_000;
    config.limits.history_per_client = 1_000_000;
    // Tests read why the broker is not available, as an operator would.
    config.readyz_detail = true;
    match kind {
        BusKind::Memory => config,
        BusKind::Rabbit => config.with_rabbitmq(AMQP_HOST, AMQP_PORT, &unique_exchange()),
        BusKind::RabbitProcess => {
            let mut config = config.with_rabbitmq(AMQP_HOST, AMQP_PORT, &unique_exchange());
            if let Some(rabbit) = config.rabbitmq.as_mut() {
                rabbit.fanout = fanout_chat::config::FanoutMode::Process;
            }
            config
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
}

pub async fn spawn_app(kind: BusKind) -> TestApp {
    spawn_app_with(test_config(kind)).await
}

pub async fn spawn_app_with(config: Config) -> TestApp {
    let app =
        Application::build_on(config.clone(), [127, 0, 0, 1].into()).await.expect("bind a loopback port");
    let addr = app.local_addr().expect("a bound address");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async move {
        let _ = stopped.await;
    }));
    let app = TestApp { addr, http: reqwest::Client::new(), config, stop: Some(stop), server: Some(server) };
    app.wait_until_ready().await;
    app
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn exchange(&self) -> &str {
        &self.config.rabbitmq.as_ref().expect("a RabbitMQ app").exchange
    }

    /// Polls `/readyz` until it answers 200: the broker is connected and the exchange declared.
    pub async fn wait_until_ready(&self) {
        wait_until_ready(&self.http, self.addr).await;
    }

    pub async fn post_json(&self, body: Value) -> reqwest::Response {
        within("POST /messages", self.http.post(self.url("/messages")).json(&body).send())
            .await
            .expect("POST /messages")
    }

    pub async fn post_form(&self, body: &str) -> reqwest::Response {
        within(
            "POST /messages",
            self.http
                .post(self.url("/messages"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(body.to_owned())
                .send(),
        )
        .await
        .expect("POST /messages")
    }

    pub async fn post_raw(&self, content_type: &str, body: Vec<u8>) -> reqwest::Response {
        within(
            "POST /messages",
            self.http.post(self.url("/messages")).header("content-type", content_type).body(body).send(),
        )
        .await
        .expect("POST /messages")
    }

    /// Posts `text` as `user` and returns the envelope from the 202 answer.
    pub async fn post_text(&self, text: &str) -> Value {
        let response = self.post_json(serde_json::json!({ "text": text, "user": "tester" })).await;
        assert_eq!(response.status(), 202, "POST /messages of {text:?}");
        response.json().await.expect("an envelope")
    }

    /// Opens a WebSocket session and waits for its welcome frame.
    pub async fn connect(&self) -> WsClient {
        connect_to(self.addr).await
    }

    /// Sends the stop signal (as SIGTERM does) without waiting for the shutdown.
    pub fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the app the way SIGTERM does and checks it shut down cleanly; removes the
    /// test's exchange and history stream.
    pub async fn stop(self) {
        let rabbit = self.config.rabbitmq.clone();
        self.stop_keeping_broker_state().await;
        if let Some(rabbit) = rabbit {
            delete_exchange_and_history(&rabbit.exchange, &rabbit.history.name).await;
        }
    }

    /// Stops the app as [`TestApp::stop`] does, leaving its exchange and history stream for
    /// the next app on them.
    pub async fn stop_keeping_broker_state(mut self) {
        self.signal_stop();
        if let Some(server) = self.server.take() {
            within("the app to shut down", server).await.expect("the server task").expect("a clean shutdown");
        }
    }

    /// `GET /messages` with this query string, answered 200: the page as JSON.
    pub async fn history(&self, query: &str) -> Value {
        let response = within("GET /messages", self.http.get(self.url(&format!("/messages{query}"))).send())
            .await
            .expect("GET /messages");
        assert_eq!(response.status(), 200, "GET /messages{query}");
        response.json().await.expect("a page of history")
    }

    /// Waits until the history shows the message `id`: the history is fed by the stream's
    /// follower, so a message can reach a session before it is in a page.
    pub async fn wait_for_history(&self, id: &str) {
        within(&format!("message {id} to show in the history"), async {
            loop {
                let page = self.history("?limit=500").await;
                let messages = page["messages"].as_array().expect("a messages array");
                if messages.iter().any(|m| m["id"] == id) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// Opens a session that resumes after the message `since`.
    pub async fn connect_since(&self, since: &str) -> WsClient {
        connect_path(self.addr, &format!("/ws?since={since}")).await
    }
}

/// Polls the app at `addr` until `/readyz` answers 200, within the tests' bound.
pub async fn wait_until_ready(http: &reqwest::Client, addr: SocketAddr) {
    within("the app to report ready (is RabbitMQ running at 127.0.0.1:5672?)", async {
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

/// Opens a WebSocket session on the app at `addr` and waits for its welcome frame.
pub async fn connect_to(addr: impl std::fmt::Display) -> WsClient {
    connect_path(addr, "/ws").await
}

/// The status of a WebSocket handshake (101 when it opened, then closed at once).
pub async fn handshake_status(
    request: impl tokio_tungstenite::tungstenite::client::IntoClientRequest + Unpin,
) -> u16 {
    match within("a WebSocket handshake", tokio_tungstenite::connect_async(request)).await {
        Ok((mut ws, response)) => {
            let _ = ws.close(None).await;
            response.status().as_u16()
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

/// Opens a WebSocket session at `path` (with its query) and waits for its welcome frame.
pub async fn connect_path(addr: impl std::fmt::Display, path: &str) -> WsClient {
    let (stream, _) =
        within("the WebSocket handshake", tokio_tungstenite::connect_async(format!("ws://{addr}{path}")))
            .await
            .expect("a WebSocket session");
    welcomed(stream).await
}

/// Removes a test's exchange and history stream from the main broker.
pub async fn delete_exchange_and_history(exchange: &str, stream: &str) {
    let service = service().await;
    let _ = service.channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await;
    let _ = service.channel.queue_delete(stream.into(), Default::default()).await;
}

/// As [`connect_to`], from a given loopback address (a second "client").
pub async fn connect_from(addr: SocketAddr, ip: std::net::IpAddr) -> WsClient {
    let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    socket.bind((ip, 0).into()).expect("bind a loopback address");
    let tcp = within("a TCP connection", socket.connect(addr)).await.expect("connect");
    let (stream, _) = within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), MaybeTlsStream::Plain(tcp)),
    )
    .await
    .expect("a WebSocket session");
    welcomed(stream).await
}

async fn welcomed(stream: WebSocketStream<MaybeTlsStream<TcpStream>>) -> WsClient {
    let mut client = WsClient { stream, session: String::new(), replica: String::new() };
    let welcome = client.next_frame().await;
    assert_eq!(welcome["type"], "welcome", "the first frame is the welcome: {welcome}");
    client.session = welcome["session"].as_str().expect("a session id").to_owned();
    client.replica = welcome["replica"].as_str().expect("a replica name").to_owned();
    client
}

pub struct WsClient {
    pub stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub session: String,
    pub replica: String,
}

impl WsClient {
    /// The name the app gives this session's queue.
    pub fn queue(&self) -> String {
        format!("fanout-chat.{}.{}", self.replica, self.session)
    }

    /// The next text frame as JSON; pings and pongs are skipped. Panics on close.
    pub async fn next_frame(&mut self) -> Value {
        self.next_frame_within(WAIT).await
    }

    /// [`Self::next_frame`], waiting up to `bound` instead of the tests' usual bound.
    pub async fn next_frame_within(&mut self, bound: Duration) -> Value {
        within_for(bound, "a WebSocket frame", async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return serde_json::from_str(&text).expect("frames are JSON");
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    other => panic!("expected a text frame, got {other:?}"),
                }
            }
        })
        .await
    }

    /// The next message envelope (a frame without `type`); notices are returned too, so a
    /// test sees anything unexpected.
    pub async fn next_message(&mut self) -> Value {
        let frame = self.next_frame().await;
        assert!(frame.get("type").is_none(), "expected a message envelope, got {frame}");
        frame
    }

    pub async fn send_text(&mut self, text: &str) {
        within("a WebSocket send", self.stream.send(Message::text(text))).await.expect("send a frame");
    }

    pub async fn send(&mut self, message: Message) {
        within("a WebSocket send", self.stream.send(message)).await.expect("send a frame");
    }

    /// Waits for the server's Close frame and returns its code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        within("the server to close the session", async {
            loop {
                match self.stream.next().await {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.to_string());
                    }
                    Some(Ok(Message::Close(None))) | None => return (1005, String::new()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => panic!("the session broke instead of closing: {e}"),
                }
            }
        })
        .await
    }

    pub async fn close(mut self) {
        let _ = within("a WebSocket close", self.stream.close(None)).await;
        // Drain until the server's close arrives, so the session has really ended.
        let _ =
            tokio::time::timeout(WAIT, async { while let Some(Ok(_)) = self.stream.next().await {} }).await;
    }
}

/// A connection of the test's own: "another service" on the same broker. Closed on drop.
pub struct Service {
    /// Held so the connection stays open as long as the channel is used.
    pub _connection: Connection,
    pub channel: Channel,
}

pub async fn service() -> Service {
    let connection = within(
        "a test connection to RabbitMQ",
        Connection::connect(&amqp_url(), ConnectionProperties::default()),
    )
    .await
    .expect("RabbitMQ at 127.0.0.1:5672 (start it with `rabbitmq-server -detached`)");
    let channel = connection.create_channel().await.expect("a channel");
    Service { _connection: connection, channel }
}

impl Service {
    /// Publishes to `exchange` as another service would, and waits for the broker's confirm:
    /// the message is then routed before anything the test publishes next (without confirm
    /// mode the "confirm" resolves at once, and a POST through the app could overtake it).
    pub async fn publish(&self, exchange: &str, body: &[u8], properties: BasicProperties) {
        // Selecting confirm mode again on a channel already in it is a no-op.
        self.channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
        let confirmation = self
            .channel
            .basic_publish(exchange.into(), "".into(), BasicPublishOptions::default(), body, properties)
            .await
            .expect("publish")
            .await
            .expect("confirmed");
        assert!(confirmation.is_ack(), "the broker confirmed the publish: {confirmation:?}");
    }
}

/// Whether a queue exists, asked from another connection. An exclusive queue of another
/// connection answers RESOURCE_LOCKED (405), a missing one NOT_FOUND (404); either closes
/// the asking channel, so each question uses a fresh one.
pub async fn queue_exists(name: &str) -> bool {
    let service = service().await;
    let declared = service
        .channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions { passive: true, ..Default::default() },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(_) => true,
        Err(e) => {
            let text = e.to_string();
            if text.contains("RESOURCE_LOCKED") || text.contains("RESOURCELOCKED") || text.contains("405") {
                true
            } else if text.contains("NOT_FOUND") || text.contains("NOTFOUND") || text.contains("404") {
                false
            } else {
                panic!("unexpected answer to a passive declare of {name}: {text}")
            }
        }
    }
}

/// Waits until the queue exists (`true`) or is gone (`false`).
pub async fn wait_for_queue(name: &str, exists: bool) {
    within(&format!("queue {name} to {}", if exists { "appear" } else { "disappear" }), async {
        while queue_exists(name).await != exists {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
}

/// Runs `rabbitmqctl -q --no-table-headers ARGS` against the local node: the broker's own view.
pub fn rabbitmqctl(args: &[&str]) -> String {
    rabbitmqctl_with(&[&["--no-table-headers"], args].concat())
}

/// Runs `rabbitmqctl -q ARGS`: for commands that change something, as an operator would.
pub fn rabbitmqctl_with(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl (it comes with rabbitmq-server)");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

/// The line of a `rabbitmqctl` listing that starts with `prefix`, asked again until it shows:
/// a listing taken while the broker is busy (thousands of queues coming and going) can come
/// back without it.
pub async fn broker_line(args: &[&str], prefix: &str) -> String {
    within(&format!("rabbitmqctl {args:?} to list {prefix}"), async {
        loop {
            if let Some(line) = rabbitmqctl(args).lines().find(|l| l.starts_with(prefix)) {
                return line.to_owned();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
}

/// One figure from `/metrics`.
pub async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = within("GET /metrics", async {
        app.http.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap()
    })
    .await;
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{name} missing from /metrics:\n{text}"))
        .parse()
        .unwrap()
}
