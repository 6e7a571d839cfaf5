//! The built binary as an operator runs it: environment, signals, logs.

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::helpers::{AMQP_PORT, rabbitmqctl, unique_exchange, wait_for_queue, within};

const BIN: &str = env!("CARGO_BIN_EXE_fanout-chat");

/// The binary running with `vars`, its JSON log lines collected as they come.
pub struct Running {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    pub fn start(vars: &[(&str, &str)]) -> Self {
        let mut child = Command::new(BIN)
            .env_clear()
            .env("PORT", "0")
            .env("LOG_FORMAT", "json")
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            }));
        }
        Self { child, lines, readers }
    }

    /// Waits for a log line containing `needle` and returns it.
    pub async fn log_line(&self, needle: &str) -> String {
        within(&format!("a log line with {needle:?}"), async {
            loop {
                if let Some(line) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                    return line.clone();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    pub async fn addr(&self) -> String {
        let line = self.log_line("\"listening\"").await;
        let json: Value = serde_json::from_str(&line).expect("JSON log lines");
        let port = json["addr"].as_str().unwrap().rsplit(':').next().unwrap().to_owned();
        format!("127.0.0.1:{port}")
    }

    pub fn signal(&self, name: &str) {
        let status =
            Command::new("kill").args([&format!("-{name}"), &self.child.id().to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Waits for the exit, bounded, and for its output to be read to the end; returns the
    /// exit code.
    pub async fn exit(&mut self) -> i32 {
        let code = within("the process to exit", async {
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status.code().unwrap_or(-1);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        code
    }

    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // Only our own child, by its handle.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_bad_environment_value_exits_with_code_2_naming_the_variable() {
    for (var, value, expected) in [
        ("PORT", "abc", "expected a TCP port number"),
        ("NOTIFIER_RABBITMQ_TLS", "maybe", "expected true or false"),
        ("NOTIFIER_MAX_MESSAGE_BYTES", "-1", "expected a whole number"),
    ] {
        let mut running = Running::start(&[(var, value)]);
        let code = running.exit().await;
        assert_eq!(code, 2, "{var}={value}");
        let output = running.output();
        assert_eq!(output.lines().count(), 1, "one line: {output}");
        assert!(output.contains(var) && output.contains(expected), "{var}={value}: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_sessions_with_1001_removes_their_queues_and_exits_0() {
    let exchange = unique_exchange();
    let port = AMQP_PORT.to_string();
    let replica = format!("sigterm-{}", ulid::Ulid::new());
    let mut running = Running::start(&[
        ("NOTIFIER_RABBITMQ_HOST", "127.0.0.1"),
        ("NOTIFIER_RABBITMQ_PORT", port.as_str()),
        ("NOTIFIER_EXCHANGE", exchange.as_str()),
        ("HOSTNAME", replica.as_str()),
    ]);
    let addr = running.addr().await;
    running.log_line("connected to RabbitMQ").await;
    let (mut ws, _) =
        within("a session", tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))).await.unwrap();
    use futures_util::StreamExt;
    let welcome = within("the welcome", ws.next()).await.unwrap().unwrap();
    let welcome: Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    let queue = format!("fanout-chat.{replica}.{}", welcome["session"].as_str().unwrap());
    wait_for_queue(&queue, true).await;
    let session_line = running.log_line("session opened").await;
    let session_log: Value = serde_json::from_str(&session_line).unwrap();
    assert_eq!(session_log["span"]["replica"], replica.as_str(), "session log lines name the replica");
    assert_eq!(session_log["span"]["id"], welcome["session"], "and the session");
    let connections = || {
        rabbitmqctl(&["list_connections", "client_properties"])
            .lines()
            .filter(|l| l.contains(&replica))
            .count()
    };
    assert_eq!(connections(), 6, "publishing, the replica's own consumers, and four consumer connections");

    let signalled = Instant::now();
    running.signal("TERM");
    let close = within("the close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1001);
    let code = running.exit().await;
    let took = signalled.elapsed();
    assert_eq!(code, 0, "{}", running.output());
    assert!(took < Duration::from_secs(10), "exit within 10 s, took {took:?}");
    wait_for_queue(&queue, false).await;
    within("the broker to drop the app's connections", async {
        while connections() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    crate::helpers::delete_exchange_and_history(&exchange, &format!("{exchange}.history")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_never_appears_in_the_logs() {
    let password = "pw-that-must-not-leak-7f3a";
    let port = AMQP_PORT.to_string();
    let mut running = Running::start(&[
        ("NOTIFIER_RABBITMQ_HOST", "127.0.0.1"),
        ("NOTIFIER_RABBITMQ_PORT", port.as_str()),
        ("NOTIFIER_RABBITMQ_PASSWORD", password),
        ("RUST_LOG", "trace"),
    ]);
    let addr = running.addr().await;
    // Wrong credentials: the broker refuses, the app logs why and keeps retrying.
    running.log_line("cannot reach the broker").await;
    let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    running.signal("INT");
    let code = running.exit().await;
    assert_eq!(code, 0);
    let output = running.output();
    assert!(
        output.contains("ACCESS_REFUSED") || output.contains("access") || output.contains("auth"),
        "says why: {output}"
    );
    assert!(!output.contains(password), "the password leaked into the logs");
}
