//! Budgets, not hopes: what clients that ask and never read can make the process hold. Each
//! test seeds the app (its own process) with large messages, has a hostile client do its worst
//! within the shipped limits, and checks the app's resident memory and that a normal session's
//! POST-to-receive stays quick meanwhile.

use std::time::Duration;

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::{
    helpers::within,
    process::{AppProcess, peak_rss_during, seed_heavy},
};

/// The pod's memory request is 128 Mi: what one hostile client may take the process to.
const RSS_BOUND: u64 = 128 << 20;
/// What a person would call instant, on a loaded two-core machine.
const ROUND_TRIP_BOUND: Duration = Duration::from_millis(100);
/// The most bytes of messages one page of history holds (the README's "Limits and abuse").
const PAGE_MAX_BYTES: usize = 1 << 20;

/// The seeding posts fast from one address; the tests are about memory, not rates.
const SEEDING: [(&str, &str); 1] = [("NOTIFIER_MESSAGES_PER_CLIENT", "1000000")];

/// Ten POST-to-receive round trips on a normal session; the slowest.
async fn slowest_round_trip(app: &AppProcess) -> Duration {
    let mut session = app.connect("/ws").await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        slowest = slowest.max(app.round_trip(&mut session).await);
    }
    session.close().await;
    slowest
}

/// Reports the figures, then checks them: resident memory under [`RSS_BOUND`] at its peak, and a
/// normal session's round trip under [`ROUND_TRIP_BOUND`].
fn within_budgets(before: u64, peak: u64, slowest: Duration) {
    println!("RSS {:.1} MiB before, peak {:.1} MiB; slowest round trip {slowest:?}", mib(before), mib(peak));
    assert!(peak < RSS_BOUND, "peak RSS {:.1} MiB (from {:.1} MiB)", mib(peak), mib(before));
    assert!(slowest < ROUND_TRIP_BOUND, "a normal session waited {slowest:?}");
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_history_is_at_most_a_mebibyte_and_the_next_one_carries_on_where_it_stopped() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let app = AppProcess::start(&SEEDING).await;
    // One at a time: the order of the history is the order posted.
    let posted = seed_heavy(&app, 200, 1).await;
    let newest = posted.last().unwrap()["id"].as_str().unwrap().to_owned();
    app.wait_for_history(&newest).await;
    let get = |query: String| {
        let app = &app;
        async move {
            let response =
                within("GET /messages", app.http.get(app.url(&format!("/messages{query}"))).send())
                    .await
                    .unwrap();
            assert_eq!(response.status(), 200);
            let body = response.bytes().await.unwrap();
            assert!(body.len() <= PAGE_MAX_BYTES + 1024, "a page of {} bytes", body.len());
            serde_json::from_slice::<Value>(&body).unwrap()
        }
    };
    let first = get("?limit=500".into()).await;
    let first_ids: Vec<String> =
        first["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert!(first_ids.len() < 200, "cut short by bytes: {} messages", first_ids.len());
    assert_eq!(first_ids.last(), Some(&newest), "the page ends with the newest message");
    assert_eq!(first["has_more"], true, "and says there is more");
    let second = get(format!("?limit=500&before={}", first_ids[0])).await;
    let mut all: Vec<String> =
        second["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    all.extend(first_ids);
    let expected: Vec<String> = posted.iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(all, expected[expected.len() - all.len()..], "no gap and no repeat between the pages");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_clients_asking_for_big_pages_and_never_reading_them_do_not_pin_memory() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let app = AppProcess::start(&SEEDING).await;
    seed_heavy(&app, 500, 8).await;
    let before = app.rss_bytes();
    let (peak, (slowest, _hostile)) = peak_rss_during(&app, async {
        let mut hostile = Vec::new();
        let mut statuses = Vec::new();
        for _ in 0..40 {
            let mut socket = within("a connection", TcpStream::connect(app.addr)).await.unwrap();
            let request = format!("GET /messages?limit=500 HTTP/1.1\r\nHost: {}\r\n\r\n", app.addr);
            socket.write_all(request.as_bytes()).await.unwrap();
            hostile.push(socket);
        }
        // Each answer's status line only, so its page was built; then nothing more is read.
        for socket in &mut hostile {
            let mut status = [0u8; 12];
            within("a status line", socket.read_exact(&mut status)).await.unwrap();
            statuses.push(String::from_utf8_lossy(&status[9..12]).into_owned());
        }
        assert!(statuses.iter().all(|s| s == "200" || s == "503"), "{statuses:?}");
        (slowest_round_trip(&app).await, hostile)
    })
    .await;
    within_budgets(before, peak, slowest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_resuming_from_before_the_window_and_never_reading_do_not_pin_memory() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let app = AppProcess::start(&SEEDING).await;
    // The window keeps 1,000 (the default): 500 more are in the stream only.
    let posted = seed_heavy(&app, 1500, 8).await;
    let oldest = posted.iter().map(|m| m["id"].as_str().unwrap().to_owned()).min().unwrap();
    let newest = posted.iter().map(|m| m["id"].as_str().unwrap().to_owned()).max().unwrap();
    app.wait_for_history(&newest).await;
    let since = format!("/ws?since={oldest}");
    // A session that reads is told that not everything is replayed, then gets the rest.
    let mut reader = app.connect(&since).await;
    let notice = reader.next_frame().await;
    assert_eq!(notice["type"], "gap", "{notice}");
    assert!(notice["reason"].as_str().unwrap().contains("more messages were missed"), "{notice}");
    reader.close().await;
    let before = app.rss_bytes();
    let (peak, (slowest, _hostile)) = peak_rss_during(&app, async {
        let mut hostile = Vec::new();
        for _ in 0..30 {
            hostile.push(app.connect(&since).await); // Welcomed, then never read again.
        }
        (slowest_round_trip(&app).await, hostile)
    })
    .await;
    within_budgets(before, peak, slowest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_stalled_sessions_under_a_flood_of_large_messages_do_not_pin_memory() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    let app = AppProcess::start(&SEEDING).await;
    let mut stalled = Vec::new();
    for _ in 0..200 {
        stalled.push(app.connect("/ws").await); // Welcomed, then never read again.
    }
    let before = app.rss_bytes();
    let (peak, slowest) = peak_rss_during(&app, async {
        seed_heavy(&app, 200, 8).await;
        slowest_round_trip(&app).await
    })
    .await;
    within_budgets(before, peak, slowest);
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_stalled_sessions_budget_a_session_that_stopped_reading_is_closed_at_once() {
    let _alone = crate::ONE_AT_A_TIME.lock().await;
    // Room for three stalled sessions (8 × 25 KB frames and a 64 KiB buffer each).
    let env = [SEEDING[0], ("NOTIFIER_WS_STALLED_BYTES", "1048576")];
    let app = AppProcess::start(&env).await;
    let mut reader = app.connect("/ws").await;
    let mut stalled = Vec::new();
    for _ in 0..10 {
        stalled.push(app.connect("/ws").await); // Welcomed, then never read again.
    }
    // More than the sockets' kernel buffers take, so each of the ten stalls.
    let flood = async {
        seed_heavy(&app, 500, 8).await;
    };
    let read = async {
        for _ in 0..500 {
            reader.next_message().await;
        }
    };
    within("the flood, read by the reading session", async { tokio::join!(flood, read) }).await;
    within("seven of the stalled sessions to be closed", async {
        while app.metric("fanout_chat_slow_sessions_closed_total").await < 7.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert_eq!(
        app.metric("fanout_chat_slow_sessions_closed_total").await,
        7.0,
        "the three with a place wait"
    );
    assert!(app.round_trip(&mut reader).await < ROUND_TRIP_BOUND, "the reading session is served");
    drop(stalled);
}
