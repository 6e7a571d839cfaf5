//! The app as its own process (the built `fanout-chat` binary), so that its resident memory can
//! be read on its own, apart from the test's clients.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::helpers::{WAIT, WsClient, connect_path, unique_exchange, wait_until_ready, within};

/// One running app process. Killed (by its PID) when dropped.
pub struct AppProcess {
    child: Child,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    log: Arc<Mutex<String>>,
}

impl AppProcess {
    /// Starts the binary on RabbitMQ at 127.0.0.1:5672 with its own exchange, the shipped
    /// defaults and `env`, and waits until it is ready.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        let app = Self::spawn(env).await;
        wait_until_ready(&app.http, app.addr).await;
        app
    }

    /// As [`AppProcess::start`], without waiting for it to be ready (it may never be).
    pub async fn spawn(env: &[(&str, &str)]) -> Self {
        let exchange = unique_exchange();
        let mut command = Command::new(env!("CARGO_BIN_EXE_fanout-chat"));
        command
            .env_clear()
            .env("PORT", "0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info,lapin=warn")
            .env("NOTIFIER_RABBITMQ_HOST", "127.0.0.1")
            .env("NOTIFIER_EXCHANGE", &exchange)
            .env("HOSTNAME", format!("hostile-{}", &exchange[exchange.len() - 8..]))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let mut child = command.spawn().expect("the fanout-chat binary");
        let stdout = child.stdout.take().expect("its stdout");
        // The port is in the "listening" line; every line is kept, for tests that read the log.
        let (found, port) = std::sync::mpsc::channel();
        let log = Arc::new(Mutex::new(String::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                {
                    let mut kept = kept.lock().unwrap();
                    kept.push_str(&line);
                    kept.push('\n');
                }
                let Ok(event) = serde_json::from_str::<Value>(&line) else { continue };
                if event["message"] == "listening"
                    && let Some(addr) = event["addr"].as_str().and_then(|a| a.parse::<SocketAddr>().ok())
                {
                    let _ = found.send(addr.port());
                }
            }
        });
        let port = port.recv_timeout(WAIT).expect("the app to log the port it listens on");
        Self { child, addr: SocketAddr::from(([127, 0, 0, 1], port)), http: reqwest::Client::new(), log }
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Waits until the message `id` is the newest of the history window (its reader follows
    /// the stream, a moment behind the publish confirms).
    pub async fn wait_for_history(&self, id: &str) {
        within("the history window to catch up", async {
            loop {
                let page: Value =
                    self.http.get(self.url("/messages?limit=1")).send().await.unwrap().json().await.unwrap();
                if page["messages"][0]["id"] == id {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// One unlabelled figure from its `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = within("GET /metrics", async {
            self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
        })
        .await;
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
            .parse()
            .unwrap()
    }

    /// Its resident memory now, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).expect("its /proc");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    pub async fn post(&self, body: Value) -> Value {
        let response =
            within("POST /messages", self.http.post(self.url("/messages")).json(&body).send()).await.unwrap();
        assert_eq!(response.status(), 202, "POST /messages");
        response.json().await.unwrap()
    }

    pub async fn connect(&self, path: &str) -> WsClient {
        connect_path(self.addr, path).await
    }

    /// How long a message posted now takes to reach `session`, which must have nothing else
    /// pending.
    pub async fn round_trip(&self, session: &mut WsClient) -> Duration {
        let started = Instant::now();
        let posted = self.post(json!({ "text": "are you there?", "user": "probe" })).await;
        let received = session.next_message().await;
        assert_eq!(received["id"], posted["id"]);
        started.elapsed()
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A message text of `n` double quotes: each is two bytes as JSON (`\"`), the most any character
/// a browser may send grows by (control characters, six bytes as `\u0001`, are refused), so a
/// message at the 4,096-byte limit is about 8 KB on the wire and in every copy.
pub fn heavy_text(n: usize) -> String {
    "\"".repeat(n)
}

/// Posts `count` heavy messages, `at_once` at a time, and returns their envelopes (in the
/// order published only when `at_once` is 1).
pub async fn seed_heavy(app: &AppProcess, count: usize, at_once: usize) -> Vec<Value> {
    let mut posted = Vec::with_capacity(count);
    for chunk in (0..count).collect::<Vec<_>>().chunks(at_once) {
        let batch = futures_util::future::join_all(
            chunk.iter().map(|n| app.post(json!({ "text": format!("{n} {}", heavy_text(4000)) }))),
        )
        .await;
        posted.extend(batch);
    }
    posted
}

/// The most resident memory seen while `watch` runs, sampled every 50 ms.
pub async fn peak_rss_during<T>(app: &AppProcess, watch: impl Future<Output = T>) -> (u64, T) {
    let mut peak = app.rss_bytes();
    let mut watch = std::pin::pin!(watch);
    let mut ticks = tokio::time::interval(Duration::from_millis(50));
    loop {
        tokio::select! {
            done = &mut watch => return (peak.max(app.rss_bytes()), done),
            _ = ticks.tick() => peak = peak.max(app.rss_bytes()),
        }
    }
}
