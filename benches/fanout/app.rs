//! The app runs: `fanout-chat` started in one fan-out mode, N WebSocket sessions opened
//! against it, the phases published by HTTP and by AMQP, then stopped and its exchange and
//! history stream deleted.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    STEP_TIMEOUT,
    broker::{delete_exchange, delete_queue},
    figures::{CpuSample, Memory, broker_rss},
    phase::{Delivery, PhaseSpec, run_phase},
    plan::{Mode, Plan},
    procfs::status_kib,
    publishers::{Publisher, amqp_publisher},
    scenario::{Opening, Setup, print_broker_growth},
    server::Server,
    sessions::open_sessions,
    tables::{kib, print_opening},
};

/// The app started in `mode`, its N sessions, its phases (and in process mode the target
/// phase, paced by `raw_ceiling`, the raw burst's deliveries/s), then stopped and its exchange
/// and history stream deleted.
pub async fn run_app(
    plan: &Plan,
    mode: Mode,
    binary: &Path,
    run_id: &str,
    broker: Option<u32>,
    raw_ceiling: Option<f64>,
) -> (Setup, Vec<Delivery>) {
    let exchange = format!("fanout-bench.{run_id}.n{}.{}", plan.sessions, mode.prefix());
    let replica = format!("bench-{run_id}-n{}-{}", plan.sessions, mode.prefix());
    let server = Server::start(binary, &exchange, &replica, plan, mode).await;
    let pids = (Some(server.pid), broker);
    // Let start-up allocations and the broker link settle before calling it idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut memory = Memory::default();
    memory.app.before_kib = status_kib(server.pid, "VmRSS");
    memory.broker.before_kib = broker_rss(broker);

    let cpu = CpuSample::take(pids.0, pids.1);
    let started = Instant::now();
    let (fleet, errors) = open_sessions(&server, plan.sessions).await;
    let open = Opening {
        requested: plan.sessions,
        opened: fleet.receivers.len(),
        errors,
        secs: started.elapsed().as_secs_f64(),
        cpu: cpu.share(),
    };
    memory.app.after_kib = status_kib(server.pid, "VmRSS");
    memory.broker.after_kib = broker_rss(broker);
    memory.app.opened = open.opened;
    memory.broker.opened = open.opened;
    let what = format!("app ({} mode)", mode.name());
    print_opening(&what, &open);
    println!(
        "  {what}: app RSS idle {}, with {} sessions {} -> {} per session",
        kib(memory.app.before_kib),
        memory.app.opened,
        kib(memory.app.after_kib),
        memory.app.per_receiver_kib().map_or("-".into(), |k| format!("{k:.1} KiB"))
    );
    print_broker_growth(&what, &memory);

    let (publisher_connection, channel) =
        amqp_publisher(&format!("fanout-bench {run_id} {} publish", mode.prefix()), &exchange).await;
    let [http, amqp] = mode.runs();
    let publishers = [
        (http, Publisher::Http { client: reqwest::Client::new(), url: server.url("/messages") }),
        (amqp, Publisher::Amqp { channel, exchange: exchange.clone() }),
    ];
    let mut phases = plan.phases();
    if mode == Mode::Process {
        match plan.target_phase(raw_ceiling) {
            Some(target) => phases.push(target),
            None => println!("  no target phase: there is no raw burst to pace it by"),
        }
    }
    let mut runs = Vec::new();
    for (run, publisher) in &publishers {
        for &(load, messages, rate) in &phases {
            let spec = PhaseSpec { run, mode: Some(mode), load, messages, rate };
            runs.push(run_phase(spec, &fleet, publisher, pids).await);
        }
    }
    memory.app_peak_kib = status_kib(server.pid, "VmHWM");
    memory.broker_end_kib = broker_rss(broker);

    fleet.close().await;
    let warnings = server.warnings.lock().unwrap().clone();
    let exit = server.stop();
    // The app declared both; neither goes away with it.
    delete_queue(&publisher_connection, &format!("{exchange}.history")).await;
    delete_exchange(&publisher_connection, &exchange).await;
    let _ = tokio::time::timeout(STEP_TIMEOUT, publisher_connection.close(200, "bench done".into())).await;
    if !warnings.is_empty() {
        println!("  the app logged {} warning(s); first: {}", warnings.len(), warnings[0]);
    }
    (Setup { mode: Some(mode), open, memory, exit: Some(exit), warnings }, runs)
}
