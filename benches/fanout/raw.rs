//! The raw ceiling: no web server at all. The broker laid out as the app lays it out, with
//! lapin consumers in place of the app's sessions and the app's history stream on the exchange,
//! fed by the same lapin publisher as the app's AMQP runs. What the broker can do for this
//! design, measured in the same run as the app.

use std::{sync::atomic::Ordering::Relaxed, time::Instant};

use tokio_util::sync::CancellationToken;

use crate::{
    DRAIN_GRACE, STEP_TIMEOUT,
    broker::{delete_exchange, delete_queue},
    consumers::{connect_raw, follow_raw_history, open_raw_consumers},
    figures::{CpuSample, Memory, broker_rss},
    phase::{Delivery, PhaseSpec, run_phase},
    plan::Plan,
    publishers::{Publisher, amqp_publisher},
    scenario::{Opening, Setup, print_broker_growth},
    tables::print_opening,
};

pub async fn run_raw(plan: &Plan, run_id: &str, broker: Option<u32>) -> (Setup, Vec<Delivery>) {
    let exchange = format!("fanout-bench.{run_id}.n{}.raw", plan.sessions);
    let history = format!("{exchange}.history");
    let (publisher_connection, channel) =
        amqp_publisher(&format!("fanout-bench {run_id} raw publish"), &exchange).await;
    let connections = connect_raw(run_id).await;
    // The app's follower reads on its first consumer connection; so does this one.
    let stop_following = CancellationToken::new();
    let (follower, followed) = follow_raw_history(
        &publisher_connection,
        &connections[0],
        &exchange,
        &history,
        stop_following.clone(),
    )
    .await;

    let mut memory = Memory::default();
    memory.broker.before_kib = broker_rss(broker);
    let cpu = CpuSample::take(None, broker);
    let started = Instant::now();
    let (fleet, errors) = open_raw_consumers(&connections, &exchange, run_id, plan.sessions).await;
    let open = Opening {
        requested: plan.sessions,
        opened: fleet.receivers.len(),
        errors,
        secs: started.elapsed().as_secs_f64(),
        cpu: cpu.share(),
    };
    memory.broker.after_kib = broker_rss(broker);
    memory.broker.opened = open.opened;
    print_opening("raw", &open);
    print_broker_growth("raw", &memory);

    let publisher = Publisher::Amqp { channel, exchange: exchange.clone() };
    let mut runs = Vec::new();
    for (load, messages, rate) in plan.phases() {
        let spec = PhaseSpec { run: "raw", mode: None, load, messages, rate, drain: DRAIN_GRACE };
        runs.push(run_phase(spec, &fleet, &publisher, (None, broker)).await);
    }
    memory.broker_end_kib = broker_rss(broker);

    fleet.close().await;
    stop_following.cancel();
    let _ = tokio::time::timeout(STEP_TIMEOUT, follower).await;
    let published: u32 = runs.iter().map(|d| d.published + d.publish_failed).sum();
    println!(
        "  raw history stream: followed {} of the {published} messages published",
        followed.load(Relaxed)
    );
    for connection in &connections {
        let _ = tokio::time::timeout(STEP_TIMEOUT, connection.close(200, "bench done".into())).await;
    }
    delete_queue(&publisher_connection, &history).await;
    delete_exchange(&publisher_connection, &exchange).await;
    let _ = tokio::time::timeout(STEP_TIMEOUT, publisher_connection.close(200, "bench done".into())).await;
    (Setup { mode: None, open, memory, exit: None, warnings: Vec::new() }, runs)
}
