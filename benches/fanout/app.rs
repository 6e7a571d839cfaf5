//! The app runs: `fanout-chat` started in one fan-out mode, N WebSocket sessions opened
//! against it, the phases published by HTTP and by AMQP (a quick run: by one of them), then
//! stopped and its exchange and history stream deleted.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use lapin::{Channel, Connection};

use crate::{
    DRAIN_GRACE, STEP_TIMEOUT,
    broker::{delete_exchange, delete_queue},
    figures::{CpuSample, Memory, broker_rss},
    phase::{Delivery, PhaseSpec, run_phase},
    plan::{Mode, Plan, Via},
    procfs::status_kib,
    publishers::{Publisher, amqp_publisher},
    receivers::Fleet,
    scenario::{Opening, Setup, print_broker_growth},
    server::{Launch, Server},
    sessions::open_sessions,
    tables::{kib, print_opening},
};

/// The app started in one mode, its N sessions open, a publisher connection on its exchange.
pub struct AppRun {
    pub mode: Mode,
    /// Its `HOSTNAME`: the replica's name in its queue names and logs.
    pub replica: String,
    pub server: Server,
    pub fleet: Fleet,
    pub open: Opening,
    pub memory: Memory,
    exchange: String,
    publisher_connection: Connection,
    channel: Channel,
}

impl AppRun {
    /// Starts the app with an exchange of its own, reads its idle RSS, opens the N sessions
    /// (the crowd's CPU and the RSS they add) and connects the AMQP publisher.
    pub async fn start(
        plan: &Plan,
        mode: Mode,
        binary: &Path,
        run_id: &str,
        broker: Option<u32>,
        launch: Launch<'_>,
    ) -> Self {
        let exchange = format!("fanout-bench.{run_id}.n{}.{}", plan.sessions, mode.prefix());
        let replica = format!("bench-{run_id}-n{}-{}", plan.sessions, mode.prefix());
        let server = Server::start(binary, &exchange, &replica, plan, mode, launch).await;
        // Let start-up allocations and the broker link settle before calling it idle.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut memory = Memory::default();
        memory.app.before_kib = status_kib(server.pid, "VmRSS");
        memory.broker.before_kib = broker_rss(broker);

        let cpu = CpuSample::take(Some(server.pid), broker);
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
        Self { mode, replica, server, fleet, open, memory, exchange, publisher_connection, channel }
    }

    pub fn publisher(&self, via: Via) -> Publisher {
        match via {
            Via::Http => {
                Publisher::Http { client: reqwest::Client::new(), url: self.server.url("/messages") }
            }
            Via::Amqp => Publisher::Amqp { channel: self.channel.clone(), exchange: self.exchange.clone() },
        }
    }

    /// Reads the peaks, closes the sessions, stops the app and deletes what it declared.
    pub async fn stop(mut self, broker: Option<u32>) -> Setup {
        self.memory.app_peak_kib = status_kib(self.server.pid, "VmHWM");
        self.memory.broker_end_kib = broker_rss(broker);
        self.fleet.close().await;
        let warnings = self.server.warnings.lock().unwrap().clone();
        let exit = self.server.stop();
        // The app declared both; neither goes away with it.
        delete_queue(&self.publisher_connection, &format!("{}.history", self.exchange)).await;
        delete_exchange(&self.publisher_connection, &self.exchange).await;
        let closed = self.publisher_connection.close(200, "bench done".into());
        let _ = tokio::time::timeout(STEP_TIMEOUT, closed).await;
        if !warnings.is_empty() {
            println!("  the app logged {} warning(s); first: {}", warnings.len(), warnings[0]);
        }
        Setup { mode: Some(self.mode), open: self.open, memory: self.memory, exit: Some(exit), warnings }
    }
}

/// The app started in `mode`, its N sessions, its phases by each of `vias` (and in process mode,
/// when the plan has it, the target phase, paced by `raw_ceiling`, the raw burst's
/// deliveries/s), then stopped.
pub async fn run_app(
    plan: &Plan,
    mode: Mode,
    vias: &[Via],
    binary: &Path,
    run_id: &str,
    broker: Option<u32>,
    raw_ceiling: Option<f64>,
) -> (Setup, Vec<Delivery>) {
    let app = AppRun::start(plan, mode, binary, run_id, broker, Launch::Native).await;
    let pids = (Some(app.server.pid), broker);
    let mut phases = plan.phases();
    if mode == Mode::Process && plan.target {
        match plan.target_phase(raw_ceiling) {
            Some(target) => phases.push(target),
            None => println!("  no target phase: there is no raw burst to pace it by"),
        }
    }
    let mut runs = Vec::new();
    for &via in vias {
        let publisher = app.publisher(via);
        for &(load, messages, rate) in &phases {
            let spec =
                PhaseSpec { run: mode.run(via), mode: Some(mode), load, messages, rate, drain: DRAIN_GRACE };
            runs.push(run_phase(spec, &app.fleet, &publisher, pids).await);
        }
    }
    (app.stop(broker).await, runs)
}
