//! Load generator for fanout-chat against the real RabbitMQ at 127.0.0.1:5672.
//!
//! ```sh
//! cargo bench --bench fanout                  # full run (about 10 minutes), writes BENCHMARKS.md
//! cargo bench --bench fanout -- --quick       # while working: N = 1000, raw vs app, < 2 minutes
//! cargo bench --bench fanout -- --callgrind   # the app's instructions per delivery, N = 1000
//! cargo bench --bench fanout -- --sessions 100,1000 --messages 500 --rate 20 --mode process
//! ```
//!
//! `--quick` (see `quick.rs`) and `--callgrind` (see `callgrind.rs`) are for use while working:
//! one N, each phase once, the table printed, BENCHMARKS.md untouched. What follows is the full
//! run; a quick run is the same with one N, one mode and one publisher, and no target phase.
//!
//! `cargo bench` builds `target/release/fanout-chat` itself (a bench target gets the package's
//! binaries built, with the bench profile, which inherits release). For each number of sessions
//! N, one after the other on the same broker:
//!
//! 1. **raw**: no web server at all. The broker laid out as the app lays it out, with lapin
//!    clients in place of the app: N consumers, each with its own exclusive, auto-delete queue
//!    bound to a fanout exchange, laid out like the app's sessions (4 connections, 32 consumers
//!    per channel, per-consumer prefetch 8, manual ack of every delivery, `x-max-length` 1000
//!    drop-head), plus the history stream the app keeps on every exchange (a durable stream
//!    `<exchange>.history` bound to it, with the app's retention arguments, followed by one
//!    consumer that acks every delivery), fed by a lapin publisher in confirm mode. Every publish
//!    is written to the stream as well as to the N queues, as in the app. This is the broker's
//!    ceiling for this design: N session queues + the history stream.
//! 2. **app, per-session mode** (`NOTIFIER_FANOUT_MODE=session`, the default): `fanout-chat`
//!    started by this tool (`PORT=0`, its own exchange, raised limits, stopped by SIGTERM to its
//!    PID), N WebSocket sessions opened against it (each waits for its `welcome` frame), then the
//!    same messages twice: (a) `app-http`, by `POST /messages` from 16 keep-alive clients (256 in
//!    the burst and target phases), and (b) `app-amqp`, straight into the exchange by the same
//!    lapin publisher as the raw run, as another service would.
//! 3. **app, process mode** (`NOTIFIER_FANOUT_MODE=process`: one queue per process, the copies
//!    per session made in memory): the same, on a fresh start of the app with an exchange of its
//!    own, as `proc-http` and `proc-amqp`. `--mode session` or `--mode process` runs only one of
//!    the two.
//!
//! Each of those runs two phases: **steady** (M messages paced at a rate, for latency below
//! saturation) and **burst** (up to 900 messages as fast as the broker confirms them, for the
//! ceiling of deliveries per second). The process-mode runs add a third, **target**: paced at
//! 3 × the raw burst's deliveries/s of the same N (the issue's goal for that mode), for about
//! 6 s, to see whether the app sustains it with p99 under 100 ms and nothing lost. "vs raw"
//! compares every app run with the same raw run (the target phase with the raw burst).
//!
//! Every message's text is `<tag><seq> <unix_nanos>`: the phase (`r`aw, `h`ttp, `a`mqp; upper
//! case for the burst; `t` and `u` for the HTTP and AMQP target phases), its sequence number and
//! the send time on this process's clock. Every receiver (a WebSocket session or a raw consumer)
//! runs the same bookkeeping ([`Receiver::on_frame`]): latency from send to arrival, and per receiver the messages lost,
//! duplicated and out of order. "Out of order" is judged per publishing stream, where the order
//! is guaranteed: the AMQP publisher is one channel publishing in sequence (one stream), and each
//! of the K HTTP clients sends its next message only after the 202 of its previous one (K
//! streams, message `i` on stream `i % K`). "Lost" counts only messages the broker confirmed
//! (or the app answered 202 for).
//!
//! CPU time of the app, of the broker (the `beam.smp` listening on 5672, found read-only in
//! /proc), of this generator and of the rest of the machine is sampled over each window; shares
//! are in percent of one core (the machine has `cores × 100 %`).
//!
//! Memory: the app's RSS idle, with its N sessions open and at its peak, and the broker's RSS
//! (VmRSS of that `beam.smp`) right before and right after the N receivers opened — the raw
//! consumers' queues, or the app's sessions — so that each set reports what one session costs
//! the broker (in process mode, next to nothing: the sessions have no queues). RSS is what the
//! operating system sees: the Erlang VM keeps memory it freed (the previous run's queues) and
//! hands it out again before it grows, so a run that follows a larger one can read low.
//!
//! Every exchange, queue and stream is this run's own (`fanout-bench.<run>.n<N>.…`) and is
//! deleted when its part is done: exchanges and the durable history streams (raw's and each
//! app start's `<exchange>.history`) explicitly, session queues by auto-delete.
//!
//! Where things are, one idea a file:
//!
//! - `options.rs`, `plan.rs`: the command line; what each N publishes, the modes and loads.
//! - `raw.rs`: the raw ceiling. `app.rs`: the app runs, with `server.rs` starting and stopping
//!   the app. `scenario.rs`: one N, raw then the app once per mode.
//! - `phase.rs`: one measured phase, publish, wait, sum up.
//! - Receivers: `receivers.rs` (the bookkeeping every receiver shares), `sessions.rs` (the app's
//!   WebSocket sessions), `consumers.rs` (the raw run's AMQP consumers and history follower).
//! - Publishers: `publishers.rs` (HTTP and AMQP), `broker.rs` (connections, clean-up),
//!   `message.rs` (the clock and the message text).
//! - Figures: `figures.rs` (CPU shares, percentiles, RSS growth), `procfs.rs` (reading /proc).
//! - Report: `tables.rs` (tables and JSON lines), `verdicts.rs` (targets, generator checks),
//!   `report.rs` (BENCHMARKS.md).
//! - While working: `quick.rs` (raw and the app side by side), `callgrind.rs` (instructions).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark stops loudly where its own set-up is broken"
)]

mod app;
mod broker;
mod callgrind;
mod consumers;
mod figures;
mod message;
mod options;
mod phase;
mod plan;
mod procfs;
mod publishers;
mod quick;
mod raw;
mod receivers;
mod report;
mod scenario;
mod server;
mod sessions;
mod tables;
mod verdicts;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    message::now_ns,
    options::{Kind, Options, USAGE},
    plan::Plan,
    procfs::find_broker_pid,
    report::{machine, markdown},
    scenario::run_scenario,
    tables::{json_line, tables},
    verdicts::{generator_checks, targets},
};

// ---------------------------------------------------------------------------------------------
// Fixed parameters: the app's defaults, mirrored by the raw run.

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
pub const BROKER_PORT: u16 = 5672;
/// `NOTIFIER_CONSUMER_CONNECTIONS`, `NOTIFIER_SESSIONS_PER_CHANNEL`, `NOTIFIER_PREFETCH` and
/// `NOTIFIER_QUEUE_MAX_LENGTH` at their defaults.
pub const CONSUMER_CONNECTIONS: usize = 4;
pub const SESSIONS_PER_CHANNEL: usize = 32;
pub const PREFETCH: u16 = 8;
pub const QUEUE_MAX_LENGTH: i32 = 1000;
/// The history stream's defaults (`NOTIFIER_HISTORY_MAX_AGE`, `NOTIFIER_HISTORY_MAX_BYTES`, and
/// the segment size the app derives from it, a quarter) and the prefetch of the app's stream
/// follower: see src/bus/rabbit/stream.rs.
pub const HISTORY_MAX_AGE: &str = "7D";
pub const HISTORY_MAX_BYTES: i64 = 100_000_000;
pub const HISTORY_SEGMENT_BYTES: i64 = HISTORY_MAX_BYTES / 4;
pub const HISTORY_PREFETCH: u16 = 500;
/// Sessions (or raw consumers) being opened at once: a crowd arriving, not one by one.
pub const OPEN_CONCURRENCY: usize = 100;
/// Concurrent `POST /messages` clients, each a keep-alive connection and an ordered stream.
pub const HTTP_STREAMS: u32 = 16;
/// The same in the burst phase: as many as the AMQP publisher's window, so that the publisher
/// is not what limits the ceiling.
pub const HTTP_BURST_STREAMS: u32 = AMQP_IN_FLIGHT as u32;
/// Unconfirmed publishes the AMQP publisher may have outstanding.
pub const AMQP_IN_FLIGHT: usize = 256;
/// After the last publish, how long to wait for deliveries still on their way.
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Bound of any single broker, HTTP or WebSocket round trip.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() {
    let options = match Options::parse() {
        Ok(options) => options,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("fanout bench: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    now_ns();
    let started_at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into());
    let started = Instant::now();

    // `cargo bench` builds the package's binary with the bench profile (which inherits release)
    // into target/release/ before it runs this, and says where it is: no separate build step.
    let binary = PathBuf::from(env!("CARGO_BIN_EXE_fanout-chat"));
    assert!(binary.exists(), "{} is missing: run `cargo build --release`", binary.display());

    let machine = machine();
    let broker = find_broker_pid();
    println!(
        "fanout bench: {} | {} cores, {}, {} | RabbitMQ {} (beam.smp PID {}) | {}",
        options.command_line(),
        machine.cores,
        machine.memory,
        machine.cpu_model,
        machine.rabbitmq,
        broker.map_or("not found: broker CPU not measured".into(), |p| p.to_string()),
        binary.display()
    );
    // A short unique id for this run's exchanges, queues and replica names.
    let run_id = ulid::Ulid::new().to_string()[20..].to_ascii_lowercase();

    if options.kind == Kind::Callgrind {
        callgrind::run(&options, &binary, &run_id, broker).await;
        println!("the run took {:.0} s", started.elapsed().as_secs_f64());
        return;
    }

    let mut scenarios = Vec::new();
    for &n in &options.sessions {
        let plan = Plan::for_sessions(n, &options);
        let scenario = run_scenario(plan, &options, &binary, &run_id, broker).await;
        if options.kind == Kind::Full {
            for d in &scenario.runs {
                println!("{}", json_line(&scenario, d));
            }
        }
        scenarios.push(scenario);
    }

    let secs = started.elapsed().as_secs_f64();
    println!("\n{}", tables(&scenarios));
    if options.kind == Kind::Quick {
        println!("{}", generator_checks(&scenarios));
        for s in &scenarios {
            println!("{}", quick::side_by_side(s));
        }
        println!("BENCHMARKS.md left as it is (a quick run never writes it); the run took {secs:.0} s");
        return;
    }
    println!("{}", targets(&scenarios));
    println!("{}", generator_checks(&scenarios));
    if options.writes_report() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
        let text = markdown(&options, &machine, &scenarios, &started_at, secs);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        println!("wrote {} (the run took {secs:.0} s)", path.display());
    } else {
        println!("BENCHMARKS.md left as it is (--write to write it); the run took {secs:.0} s");
    }
}
