//! The app under test: `fanout-chat` started by this tool on a free port with its own exchange
//! (natively, or under callgrind), waited for until ready, and stopped by SIGTERM to its PID.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{BROKER_PORT, CONSUMER_CONNECTIONS, SESSIONS_PER_CHANNEL, STEP_TIMEOUT, plan::Mode, plan::Plan};

pub struct Server {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
    /// WARN/ERROR lines it logged (the first few).
    pub warnings: Arc<Mutex<Vec<String>>>,
    /// How long to wait for it to start, and to stop after SIGTERM.
    pub patience: Duration,
    pub stop_limit: Duration,
}

/// How the app is started.
#[derive(Clone, Copy, Debug)]
pub enum Launch<'a> {
    Native,
    /// Under `valgrind --tool=callgrind`, its profiles written to this folder; several times
    /// slower, so every wait on it is longer. Instruction counting starts at once (so that
    /// `callgrind_control -z` and `-d` can bracket a window); its log goes to the same folder.
    Callgrind(&'a Path),
}

impl Launch<'_> {
    /// How long to wait for the app to start, and to get ready.
    pub fn patience(self) -> Duration {
        match self {
            Self::Native => STEP_TIMEOUT,
            Self::Callgrind(_) => STEP_TIMEOUT * 10,
        }
    }

    /// How long to wait for it to exit after SIGTERM (callgrind writes its profile then).
    pub fn stop_limit(self) -> Duration {
        match self {
            Self::Native => Duration::from_secs(20),
            Self::Callgrind(_) => Duration::from_secs(120),
        }
    }
}

/// Should the bench fail half-way, the server it started must not outlive it.
impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Server {
    /// Starts `fanout-chat` in `mode` on a free port with its own exchange (and so its own
    /// history stream, `<exchange>.history`) and waits until it is ready.
    pub async fn start(
        binary: &Path,
        exchange: &str,
        replica: &str,
        plan: &Plan,
        mode: Mode,
        launch: Launch<'_>,
    ) -> Self {
        let mut command = match launch {
            Launch::Native => Command::new(binary),
            Launch::Callgrind(dir) => {
                let mut command = Command::new("valgrind");
                command
                    .arg("--tool=callgrind")
                    .arg(format!("--callgrind-out-file={}/callgrind.out.%p", dir.display()))
                    .arg(format!("--log-file={}/valgrind.%p.log", dir.display()))
                    .arg(binary);
                command
            }
        };
        // The app at its defaults, which the raw run mirrors: no NOTIFIER_* setting of the
        // shell this runs in (a history stream of another name, another prefetch...) applies.
        for (name, _) in std::env::vars_os() {
            if name.to_str().is_some_and(|n| n.starts_with("NOTIFIER_")) {
                command.env_remove(name);
            }
        }
        command
            .env("PORT", "0")
            .env("LOG_FORMAT", "json")
            // Warnings only, except the one info line that says where it listens.
            .env("RUST_LOG", "warn,fanout_chat::app=info")
            .env("HOSTNAME", replica)
            .env("NOTIFIER_RABBITMQ_HOST", "127.0.0.1")
            .env("NOTIFIER_RABBITMQ_PORT", BROKER_PORT.to_string())
            .env("NOTIFIER_EXCHANGE", exchange)
            .env("NOTIFIER_MESSAGES_PER_CLIENT", "1000000")
            .env("NOTIFIER_MESSAGES_GLOBAL", "1000000")
            .env("NOTIFIER_MAX_SESSIONS_PER_CLIENT", "1000000")
            .env("NOTIFIER_SESSIONS_OPENED_PER_CLIENT", "1000000")
            .env("NOTIFIER_HISTORY_PER_CLIENT", "1000000")
            .env("NOTIFIER_MAX_SESSIONS", "1000000")
            .env("NOTIFIER_FANOUT_MODE", mode.name())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // The default channel layout holds 8,192 sessions; widen it only beyond that.
        let channels = plan.sessions.div_ceil(SESSIONS_PER_CHANNEL * CONSUMER_CONNECTIONS) + 1;
        if channels > 64 {
            command.env("NOTIFIER_CHANNELS_PER_CONNECTION", channels.min(2047).to_string());
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let pid = child.id();
        let stdout = child.stdout.take().expect("piped stdout");
        let warnings = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let seen = warnings.clone();
        // Reads the log to its end (so the pipe never fills): the port first, then warnings.
        std::thread::spawn(move || {
            let mut port_tx = Some(port_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(entry) = serde_json::from_str::<Value>(&line) else { continue };
                if entry["message"] == "listening"
                    && let Some(tx) = port_tx.take()
                {
                    let port = entry["addr"]
                        .as_str()
                        .and_then(|a| a.rsplit_once(':'))
                        .and_then(|p| p.1.parse().ok());
                    let _ = tx.send(port);
                } else if matches!(entry["level"].as_str(), Some("WARN" | "ERROR")) {
                    let mut seen = seen.lock().unwrap();
                    if seen.len() < 20 {
                        seen.push(line);
                    }
                }
            }
        });
        let patience = launch.patience();
        let port: u16 = match port_rx.recv_timeout(patience) {
            Ok(Some(port)) => port,
            _ => {
                let _ = child.kill();
                panic!("fanout-chat did not log its \"listening\" line within {patience:?}");
            }
        };
        let stop_limit = launch.stop_limit();
        let server = Self { child, pid, port, warnings, patience, stop_limit };
        server.wait_until_ready().await;
        // The /readyz polls answered 503 until then, which the app logs as errors.
        server.warnings.lock().unwrap().clear();
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub async fn wait_until_ready(&self) {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + self.patience;
        while Instant::now() < deadline {
            if let Ok(r) = http.get(self.url("/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "fanout-chat did not report ready within {:?} (is RabbitMQ at 127.0.0.1:5672 up?)",
            self.patience
        );
    }

    /// SIGTERM by PID, then waits for the exit (SIGKILL after 20 s, 120 s under callgrind). The
    /// exit, for the record.
    pub fn stop(mut self) -> String {
        let _ = Command::new("kill").args(["-TERM", &self.pid.to_string()]).status();
        let deadline = Instant::now() + self.stop_limit;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.to_string(),
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return format!("killed after {:?} without exiting", self.stop_limit);
                }
            }
        }
    }
}
