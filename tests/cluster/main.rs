//! On the project's own three-node RabbitMQ cluster (`scripts/cluster-broker start`: nodes on
//! 127.0.0.1:5681-5683): replicas on different nodes chat, and a node stopped under a replica's
//! sessions interrupts them, then restores them with every message confirmed meanwhile.
//! Run: `cargo test --test cluster` with the cluster up (the test command starts it).

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code, reason = "tests fail loudly")]

#[path = "../api/chaos.rs"]
mod chaos;
#[path = "../api/helpers.rs"]
mod helpers;
mod proxy;

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use helpers::{TestApp, WsClient, spawn_app_with, unique_exchange, within};
use proxy::RoundRobin;

/// The cluster's nodes: AMQP ports, in node order.
const NODES: [u16; 3] = [5681, 5682, 5683];

/// How long after a stopped node is started again its replica's sessions may take to be restored.
const RESTORE_BOUND: Duration = Duration::from_secs(20);

/// One test at a time: a test that stops a node would disturb the others.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Fails with what to do when the cluster is not running; never skips.
fn cluster_is_up() {
    let output = run_cluster_broker(&["status"]);
    assert!(
        output.status.success(),
        "the three-node cluster is not running; start it with `scripts/cluster-broker start`:\n{}",
        String::from_utf8_lossy(&output.stdout)
    );
}

fn run_cluster_broker(args: &[&str]) -> std::process::Output {
    Command::new("scripts/cluster-broker")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("scripts/cluster-broker")
}

fn cluster_broker(args: &[&str]) {
    let output = run_cluster_broker(args);
    assert!(
        output.status.success(),
        "scripts/cluster-broker {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A node stopped by a test, started again when the test ends, passed or not, so that a failed
/// test never leaves the cluster short for the next.
struct StoppedNode(String);

impl StoppedNode {
    fn stop(node: usize) -> Self {
        let node = node.to_string();
        cluster_broker(&["stop-node", &node]);
        Self(node)
    }

    /// Starts it again now, and checks that it came back.
    fn start(self) {
        cluster_broker(&["start-node", &self.0]);
        std::mem::forget(self);
    }
}

impl Drop for StoppedNode {
    fn drop(&mut self) {
        let _ = run_cluster_broker(&["start-node", &self.0]);
    }
}

/// A replica that reaches the cluster through `service` (a round-robin address), on `exchange`.
async fn replica_behind(service: &RoundRobin, exchange: &str) -> TestApp {
    replica_at(service.addr.port(), exchange).await
}

/// A replica whose broker address is 127.0.0.1:`port` (a node, or a proxy), on `exchange`.
async fn replica_at(port: u16, exchange: &str) -> TestApp {
    let mut config =
        helpers::test_config(helpers::BusKind::Memory).with_rabbitmq("127.0.0.1", port, exchange);
    config.replica = format!("cluster-{port}-{}", &ulid::Ulid::new().to_string()[16..]);
    spawn_app_with(config).await
}

fn service_for_the_cluster() -> impl std::future::Future<Output = RoundRobin> {
    RoundRobin::start(NODES.iter().map(|&port| SocketAddr::from(([127, 0, 0, 1], port))).collect())
}

/// Posts `text` to `app`, answering the status and, on 202, the envelope's text.
async fn try_post(app: &TestApp, text: &str) -> (u16, Option<String>) {
    let response = within(
        "POST /messages",
        app.http.post(app.url("/messages")).json(&serde_json::json!({ "text": text })).send(),
    )
    .await
    .unwrap();
    let status = response.status().as_u16();
    if status == 202 {
        let envelope: Value = response.json().await.unwrap();
        (status, envelope["text"].as_str().map(str::to_owned))
    } else {
        (status, None)
    }
}

/// A replica on node `node` (0-based) of the cluster, on `exchange`.
async fn replica_on(node: usize, exchange: &str) -> TestApp {
    replica_at(NODES[node], exchange).await
}

/// The text of a message frame; panics on anything else (a notice).
fn frame_text(frame: Value) -> String {
    frame["text"].as_str().unwrap_or_else(|| panic!("expected a message, got {frame}")).to_owned()
}

async fn texts(session: &mut WsClient, count: usize) -> Vec<String> {
    let mut texts = Vec::with_capacity(count);
    while texts.len() < count {
        let frame = session.next_frame().await;
        if let Some(text) = frame["text"].as_str() {
            texts.push(text.to_owned());
        }
    }
    texts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_different_nodes_chat_and_share_the_history() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    let first = replica_on(0, &exchange).await;
    let second = replica_on(1, &exchange).await;
    let mut on_first = first.connect().await;
    let mut on_second = second.connect().await;
    let a = first.post_text("posted on node 1").await;
    let b = second.post_text("posted on node 2").await;
    for session in [&mut on_first, &mut on_second] {
        assert_eq!(session.next_message().await, a);
        assert_eq!(session.next_message().await, b);
    }
    for app in [&first, &second] {
        let page = within("the history to hold both", async {
            loop {
                let page = app.history("").await;
                if page["messages"].as_array().is_some_and(|m| m.len() == 2) {
                    return page;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert_eq!(page["messages"], Value::Array(vec![a.clone(), b.clone()]));
    }
    second.stop_keeping_broker_state().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stopped_under_sessions_interrupts_them_and_they_get_everything_confirmed_meanwhile() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    // The sessions' replica is on node 3; the other one, on node 1, takes posts throughout.
    let stay = replica_on(0, &exchange).await;
    let lose = replica_on(2, &exchange).await;
    let mut sessions = vec![lose.connect().await, lose.connect().await];
    let before = stay.post_text("before the stop").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, before);
    }
    let node = StoppedNode::stop(3);
    for session in &mut sessions {
        let frame = session.next_frame().await;
        assert_eq!(frame["type"], "interrupted", "{frame}");
    }
    let mut confirmed = Vec::new();
    for n in 0..5 {
        confirmed.push(
            stay.post_text(&format!("while node 3 is down {n}")).await["text"].as_str().unwrap().to_owned(),
        );
    }
    let restarted = std::time::Instant::now();
    node.start();
    for session in &mut sessions {
        // The replica's next reconnect comes after its backoff (full jitter, growing with each
        // refused try while the node was down), then each session re-creates its queue: seen
        // 5 to 8 s after the node's start.
        let frame = session.next_frame_within(RESTORE_BOUND).await;
        assert_eq!(frame["type"], "restored", "{frame}");
        eprintln!("a session restored {:?} after node 3 was started again", restarted.elapsed());
        // What was confirmed meanwhile comes from the history window, whose reader is on the
        // replica's own connection to the same node: when that connection comes back after the
        // session's (each has its own backoff, and a connect to a node still starting can
        // hang until its timeout), the catch-up waits for it: it took over 10 s once in CI.
        let first = frame_text(session.next_frame_within(RESTORE_BOUND).await);
        let mut got = vec![first];
        got.extend(texts(session, confirmed.len() - 1).await);
        assert_eq!(got, confirmed, "every confirmed message, once, in order");
    }
    eprintln!("sessions restored and caught up {:?} after node 3 was started again", restarted.elapsed());
    let after = stay.post_text("after").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, after, "nothing repeated, live again");
    }
    lose.stop_keeping_broker_state().await;
    stay.stop().await;
}

/// What one session saw: the message texts, in order, and how long each interruption lasted.
#[derive(Debug, Default)]
struct Seen {
    texts: Vec<String>,
    interruptions: Vec<Duration>,
    gaps: Vec<Value>,
}

/// Reads `session` until it has `until` (a text), for at most `bound`.
async fn read_until(session: &mut WsClient, until: &str, seen: &mut Seen, bound: Duration) {
    let mut interrupted: Option<Instant> = None;
    let reading = async {
        loop {
            // The whole read is bounded below; a frame may take longer than the usual bound.
            let frame = session.next_frame_within(bound).await;
            match frame["type"].as_str() {
                Some("interrupted") => interrupted = Some(Instant::now()),
                Some("restored") => seen.interruptions.extend(interrupted.take().map(|at| at.elapsed())),
                Some("gap") => seen.gaps.push(frame.clone()),
                Some(_) => {}
                None => {
                    let text = frame["text"].as_str().unwrap().to_owned();
                    let done = text == until;
                    seen.texts.push(text);
                    if done {
                        return;
                    }
                }
            }
        }
    };
    if tokio::time::timeout(bound, reading).await.is_err() {
        panic!("the session did not get {until:?} within {bound:?}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_service_a_node_loss_restores_the_sessions_within_ten_seconds_with_everything_confirmed() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let service = service_for_the_cluster().await;
    let exchange = unique_exchange();
    let app = replica_behind(&service, &exchange).await;
    let mut sessions = vec![app.connect().await, app.connect().await];
    let before = app.post_text("before the stop").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, before);
    }
    // The replica's connections are spread over the three nodes: losing any one is felt.
    let stopped = Instant::now();
    let node = StoppedNode::stop(2);
    let mut confirmed = Vec::new();
    let mut refused = 0;
    let reached = within("a POST to be accepted again", async {
        loop {
            match try_post(&app, &format!("during the loss {}", confirmed.len() + refused)).await {
                (202, Some(text)) => {
                    confirmed.push(text);
                    if confirmed.len() == 3 {
                        return stopped.elapsed();
                    }
                }
                _ => refused += 1,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let last = confirmed.last().unwrap().clone();
    for session in &mut sessions {
        let mut seen = Seen::default();
        read_until(session, &last, &mut seen, helpers::WAIT).await;
        assert!(seen.gaps.is_empty(), "no gap: {:?}", seen.gaps);
        let from_the_loss: Vec<_> =
            seen.texts.iter().filter(|t| t.starts_with("during the loss")).cloned().collect();
        assert_eq!(from_the_loss, confirmed, "every confirmed message, once, in order");
    }
    let restored = stopped.elapsed();
    eprintln!(
        "node 2 stopped: POSTs accepted again after {reached:?} ({refused} refused), sessions caught up after {restored:?}"
    );
    assert!(restored < Duration::from_secs(10), "restored {restored:?} after the node stopped");
    node.start();
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_posts_delivers_every_accepted_message_to_every_session_once_in_order() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let service = service_for_the_cluster().await;
    let exchange = unique_exchange();
    let replicas = [replica_behind(&service, &exchange).await, replica_behind(&service, &exchange).await];
    let mut sessions = Vec::new();
    for replica in &replicas {
        for _ in 0..3 {
            sessions.push(replica.connect().await);
        }
    }
    const LAST: &str = "after the rolling restart";
    // Each session read as it goes, so interruptions are timed as a person would see them.
    let readers: Vec<_> = sessions
        .into_iter()
        .map(|mut session| {
            tokio::spawn(async move {
                let mut seen = Seen::default();
                read_until(&mut session, LAST, &mut seen, Duration::from_secs(120)).await;
                seen
            })
        })
        .collect();
    let stop = tokio_util::sync::CancellationToken::new();
    // About 50 POSTs a second, to either replica in turn, each after the previous answer.
    let publisher = {
        let stop = stop.clone();
        let targets: Vec<(String, reqwest::Client)> =
            replicas.iter().map(|r| (r.url("/messages"), r.http.clone())).collect();
        tokio::spawn(async move {
            let (mut accepted, mut refused) = (Vec::new(), Vec::new());
            let mut ticks = tokio::time::interval(Duration::from_millis(20));
            let mut n = 0usize;
            while !stop.is_cancelled() {
                ticks.tick().await;
                let (url, http) = &targets[n % targets.len()];
                let text = format!("rolling {n}");
                n += 1;
                let sent = http.post(url).json(&serde_json::json!({ "text": text })).send();
                match tokio::time::timeout(Duration::from_secs(10), sent).await {
                    Ok(Ok(response)) if response.status() == 202 => accepted.push(text),
                    _ => refused.push(text),
                }
            }
            (accepted, refused)
        })
    };
    for node in ["1", "2", "3"] {
        cluster_broker(&["restart-node", node]);
    }
    stop.cancel();
    let (accepted, refused) = publisher.await.unwrap();
    // The last restart may still be rebuilding a replica's link (503 meanwhile, as documented).
    replicas[0].wait_until_ready().await;
    replicas[0].post_text(LAST).await;
    let mut longest = Duration::ZERO;
    for reader in readers {
        let seen = reader.await.unwrap();
        assert!(seen.gaps.is_empty(), "no gap: {:?}", seen.gaps);
        let got: Vec<_> = seen.texts.iter().filter(|t| t.starts_with("rolling ")).cloned().collect();
        let mut unique = got.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "no message twice");
        // A 503 cannot prove the message was not routed (its confirm was lost with the node):
        // those may arrive. Every accepted one must, once, in order.
        let accepted_got: Vec<_> = got.iter().filter(|t| accepted.contains(t)).cloned().collect();
        assert_eq!(accepted_got, accepted, "every accepted message, once, in order");
        assert!(got.iter().all(|t| accepted.contains(t) || refused.contains(t)), "only what was posted");
        longest = longest.max(seen.interruptions.iter().copied().max().unwrap_or_default());
    }
    let total = accepted.len() + refused.len();
    eprintln!(
        "rolling restart: {} of {total} POSTs accepted, {} refused ({:.1} %); longest interruption of a session {longest:?}",
        accepted.len(),
        refused.len(),
        100.0 * refused.len() as f64 / total.max(1) as f64
    );
    assert!(refused.is_empty(), "no POST refused: a publish rides through its node's restart: {refused:?}");
    for replica in replicas {
        replica.stop_keeping_broker_state().await;
    }
}

/// The node (1-3) that leads the stream `name`, as the cluster says.
fn stream_leader(name: &str) -> usize {
    let node = format!("fanout-cluster-1@{}", hostname());
    let output = Command::new("rabbitmqctl")
        .args(["-n", &node, "-q", "--no-table-headers", "list_queues", "name", "leader"])
        .output()
        .expect("rabbitmqctl");
    let listing = String::from_utf8_lossy(&output.stdout).into_owned();
    listing
        .lines()
        .find_map(|line| {
            let (queue, leader) = line.split_once('\t')?;
            (queue == name)
                .then(|| leader.trim().strip_prefix("fanout-cluster-")?.split('@').next()?.parse().ok())?
        })
        .unwrap_or_else(|| panic!("no leader for {name} in:\n{listing}"))
}

fn hostname() -> String {
    let output = Command::new("hostname").output().expect("hostname");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_history_streams_leader_stops_history_and_resuming_keep_answering_with_nothing_lost() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    let first = replica_on(0, &exchange).await;
    let mut posted = Vec::new();
    for n in 0..20 {
        posted.push(first.post_text(&format!("kept {n}")).await);
    }
    let leader = stream_leader(&format!("{exchange}.history"));
    // A replica on a node that is not the leader (nor, if it can be helped, node 1).
    let node = [1, 2, 0].into_iter().find(|&i| i + 1 != leader).unwrap();
    let reader = replica_on(node, &exchange).await;
    let last = posted.last().unwrap().clone();
    within("the reader's window to hold the history", async {
        loop {
            if reader.history("?limit=1").await["messages"][0] == last {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let node = StoppedNode::stop(leader);
    let stopped = Instant::now();
    // The window is in the reader's memory: history answers at once, whole.
    let started = Instant::now();
    let page = reader.history("?limit=50").await;
    assert!(started.elapsed() < Duration::from_secs(1), "a page took {:?}", started.elapsed());
    assert_eq!(page["messages"], Value::Array(posted.clone()), "nothing lost or repeated");
    // A browser resuming on the reader gets what it missed, once, in order. (Should the stream
    // have no leader yet when its reader follows on, the reader rebuilds its link: not ready,
    // briefly, and a session opened then is refused 503; the browser retries.)
    reader.wait_until_ready().await;
    let mut resumed = reader.connect_since(posted[4]["id"].as_str().unwrap()).await;
    for message in &posted[5..] {
        assert_eq!(&resumed.next_message().await, message);
    }
    // And the chat goes on through the new leader.
    within("a POST to be accepted with the leader gone", async {
        loop {
            let (status, _) = try_post(&reader, "after the leader stopped").await;
            if status == 202 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    let frame = within("the new message to arrive", async {
        loop {
            let frame = resumed.next_frame().await;
            if frame["text"].is_string() {
                return frame;
            }
        }
    })
    .await;
    assert_eq!(frame["text"], "after the leader stopped");
    eprintln!("stream leader (node {leader}) stopped: chat went on after {:?}", stopped.elapsed());
    node.start();
    reader.stop_keeping_broker_state().await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_its_node_loses_and_repeats_nothing_once_the_network_heals() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let exchange = unique_exchange();
    // The partition: a chaos proxy between one replica and node 2, which keeps running.
    let network = chaos::ChaosProxy::start(SocketAddr::from(([127, 0, 0, 1], NODES[1]))).await;
    let stay = replica_on(0, &exchange).await;
    let cut_off = replica_at(network.port(), &exchange).await;
    let mut sessions = vec![cut_off.connect().await, cut_off.connect().await];
    let before = stay.post_text("before the cut").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, before);
    }
    network.cut().await;
    for session in &mut sessions {
        let frame = session.next_frame().await;
        assert_eq!(frame["type"], "interrupted", "{frame}");
    }
    let mut confirmed = Vec::new();
    for n in 0..5 {
        confirmed
            .push(stay.post_text(&format!("during the cut {n}")).await["text"].as_str().unwrap().to_owned());
    }
    network.restore().await;
    for session in &mut sessions {
        let mut seen = Seen::default();
        read_until(session, confirmed.last().unwrap(), &mut seen, Duration::from_secs(30)).await;
        assert!(seen.gaps.is_empty(), "no gap: {:?}", seen.gaps);
        let during: Vec<_> = seen.texts.iter().filter(|t| t.starts_with("during the cut")).cloned().collect();
        assert_eq!(during, confirmed, "every message confirmed during the cut, once, in order");
    }
    let after = stay.post_text("after the heal").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, after, "live again, nothing repeated");
    }
    cut_off.stop_keeping_broker_state().await;
    stay.stop().await;
}

/// The three nodes, named directly in `NOTIFIER_RABBITMQ_HOST`.
fn all_nodes() -> String {
    NODES.iter().map(|port| format!("127.0.0.1:{port}")).collect::<Vec<_>>().join(",")
}

/// A replica that names the three nodes itself (no Service in front), with `consumers`
/// consumer connections.
async fn replica_naming_the_nodes(exchange: &str, consumers: usize) -> TestApp {
    let mut config =
        helpers::test_config(helpers::BusKind::Memory).with_rabbitmq(&all_nodes(), NODES[0], exchange);
    config.replica = format!("cluster-all-{}", &ulid::Ulid::new().to_string()[16..]);
    config.rabbitmq.as_mut().unwrap().consumer_connections = consumers;
    spawn_app_with(config).await
}

/// `rabbitmqctl` on node 1, whose answers cover the whole cluster.
fn rabbitmqctl(args: &[&str]) -> String {
    let node = format!("fanout-cluster-1@{}", hostname());
    let output =
        Command::new("rabbitmqctl").args(["-n", &node, "-q"]).args(args).output().expect("rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The node (1-3) of the number in a node name such as `fanout-cluster-2@host`.
fn node_in(text: &str) -> Option<usize> {
    let at = text.find("fanout-cluster-")? + "fanout-cluster-".len();
    text[at..].chars().next()?.to_digit(10).map(|d| d as usize)
}

/// The node each of `replica`'s consumer connections is on, by the port it connected to.
fn consumer_connection_nodes(replica: &str) -> Vec<usize> {
    rabbitmqctl(&["list_connections", "port", "client_properties"])
        .lines()
        .filter(|l| l.contains(&format!("fanout-chat {replica} consume-")))
        .map(|l| {
            let port: u16 = l.split('\t').next().unwrap().trim().parse().unwrap();
            NODES.iter().position(|&p| p == port).unwrap() + 1
        })
        .collect()
}

/// The node (1-3) the queue `queue` lives on: an exclusive queue is on its connection's node.
fn queue_node(queue: &str) -> usize {
    let listing = rabbitmqctl(&["list_queues", "name", "pid"]);
    let line = listing
        .lines()
        .find(|l| l.split('\t').next() == Some(queue))
        .unwrap_or_else(|| panic!("queue {queue} not found: {listing}"));
    node_in(line).unwrap_or_else(|| panic!("no node in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn naming_three_nodes_spreads_three_consumer_connections_one_per_node() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let app = replica_naming_the_nodes(&unique_exchange(), 3).await;
    let mut nodes = consumer_connection_nodes(&app.config.replica);
    nodes.sort_unstable();
    assert_eq!(nodes, vec![1, 2, 3], "one consumer connection per node");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_loss_interrupts_only_the_sessions_on_it_and_they_move_to_another_node_within_ten_seconds() {
    let _alone = ONE_AT_A_TIME.lock().await;
    cluster_is_up();
    let app = replica_naming_the_nodes(&unique_exchange(), 3).await;
    let mut sessions = Vec::new();
    for _ in 0..6 {
        sessions.push(app.connect().await);
    }
    let before = app.post_text("before the stop").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, before);
    }
    let nodes: Vec<usize> = sessions.iter().map(|s| queue_node(&s.queue())).collect();
    let lost = nodes[0];
    let on_lost = nodes.iter().filter(|&&n| n == lost).count();
    assert!(on_lost < sessions.len(), "the sessions are spread over the nodes: {nodes:?}");

    let stopped = Instant::now();
    let node = StoppedNode::stop(lost);
    // Accepted while the node is down, whichever node the replica published on.
    let during = app.post_text("while a node is down").await;
    let during = during["text"].as_str().unwrap().to_owned();
    let mut interrupted = Vec::new();
    for (session, node_of) in sessions.iter_mut().zip(&nodes) {
        let mut seen = Seen::default();
        read_until(session, &during, &mut seen, Duration::from_secs(10)).await;
        assert!(seen.gaps.is_empty(), "no gap: {:?}", seen.gaps);
        assert_eq!(seen.texts, vec![during.clone()], "the message sent meanwhile, once");
        if !seen.interruptions.is_empty() {
            interrupted.push(*node_of);
        }
    }
    let restored = stopped.elapsed();
    eprintln!(
        "node {lost} stopped: {} of {} sessions interrupted (those on it: {on_lost}); \
         all had the message sent meanwhile {restored:?} after the stop",
        interrupted.len(),
        sessions.len()
    );
    assert_eq!(
        interrupted,
        vec![lost; on_lost],
        "only the sessions on node {lost} were interrupted: nodes {nodes:?}"
    );
    assert!(restored < Duration::from_secs(10), "restored {restored:?} after the stop");
    node.start();
    let after = app.post_text("after the node is back").await;
    for session in &mut sessions {
        assert_eq!(session.next_message().await, after, "nothing repeated, live again");
    }
    app.stop().await;
}
