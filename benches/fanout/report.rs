//! BENCHMARKS.md: the machine and the build it ran on, the method in words, the tables, the
//! verdicts and the JSON lines.

use std::{fmt::Write as _, time::Duration};

use crate::{
    options::Options,
    plan::mode_label,
    procfs::run_bounded,
    scenario::Scenario,
    tables::{json_line, tables},
    verdicts::{generator_checks, targets},
};

pub struct Machine {
    pub cores: usize,
    pub memory: String,
    pub cpu_model: String,
    pub kernel: String,
    pub rabbitmq: String,
    pub rustc: String,
    pub commit: String,
}

pub fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let cores = if cores > 0 { cores } else { std::thread::available_parallelism().map_or(0, |n| n.get()) };
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().find(|l| l.starts_with("MemTotal:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or("unknown".into(), |k| format!("{:.1} GiB", k / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or("unknown".into(), |k| k.trim().to_owned());
    let limit = Duration::from_secs(20);
    let rabbitmq = run_bounded("rabbitmqctl", &["-q", "version"], limit)
        .map_or("unknown (rabbitmqctl -q version failed)".into(), |v| v.trim().to_owned());
    let rustc = run_bounded("rustc", &["--version"], limit).map_or("unknown".into(), |v| v.trim().to_owned());
    let dir = env!("CARGO_MANIFEST_DIR");
    // Read-only git: the commit, and how many of the files the binary is built from differ from
    // it (`--no-optional-locks`: no index refresh).
    let commit = run_bounded("git", &["-C", dir, "rev-parse", "--short", "HEAD"], limit)
        .map_or("unknown".into(), |c| c.trim().to_owned());
    let status = ["--no-optional-locks", "status", "--porcelain", "--untracked-files=no", "--"];
    let built_from = ["src", "Cargo.toml", "Cargo.lock", "templates", "static"];
    let args: Vec<&str> = ["-C", dir].iter().chain(&status).chain(&built_from).copied().collect();
    let changed = run_bounded("git", &args, limit).map_or(0, |s| s.lines().count());
    let commit = if changed > 0 {
        format!("{commit} with {changed} uncommitted changes in src/, Cargo.*, templates/ or static/")
    } else {
        commit
    };
    Machine { cores, memory, cpu_model, kernel, rabbitmq, rustc, commit }
}

pub fn markdown(options: &Options, m: &Machine, scenarios: &[Scenario], started: &str, secs: f64) -> String {
    let mut out = String::from("# Benchmarks\n\n");
    out.push_str(
        "Written by `cargo bench --bench fanout` (`benches/fanout/`); each full run overwrites this file.\n\n",
    );
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| date | {started} (the run took {secs:.0} s) |");
    let _ = writeln!(out, "| command | `{}` |", options.command_line());
    let _ = writeln!(out, "| fan-out modes | {} |", options.modes_label());
    let _ = writeln!(
        out,
        "| machine | {} cores, {} memory, {} (Linux {}) |",
        m.cores, m.memory, m.cpu_model, m.kernel
    );
    let _ = writeln!(out, "| broker | RabbitMQ {} on the same machine (127.0.0.1:5672) |", m.rabbitmq);
    let _ = writeln!(out, "| app | `target/release/fanout-chat`, commit {}; {} |", m.commit, m.rustc);
    out.push_str("\n## Delivery\n\n");
    out.push_str(
        "Per N, each phase runs up to five times on the same broker. **raw**: no web server, the broker \
         laid out as the app lays it out — N lapin consumers like the app's sessions (4 connections, 32 per \
         channel, prefetch 8, manual acks, each its own queue with x-max-length 1000 drop-head) plus the \
         app's history stream on the exchange (a durable stream `<exchange>.history`, 7 days / 100 MB in \
         25 MB segments, followed by one consumer with prefetch 500 that acks every delivery, so every \
         publish is also written to the stream and read back once) — fed by a lapin publisher in confirm \
         mode. This is the broker's ceiling for this design: N session queues + the history stream. Then \
         the app, started once per fan-out mode, each start with its own exchange, stream and sessions: \
         in the default per-session mode (a queue per session) **app-http** (`POST /messages` from 16 \
         keep-alive clients, 256 in the burst and target phases, each sending after its previous 202) and \
         **app-amqp** (the same lapin publisher straight into the app's exchange, as another service \
         would); in process mode (`NOTIFIER_FANOUT_MODE=process`: one queue per process, copies made in \
         memory) the same as **proc-http** and **proc-amqp**. \
         **steady**: M messages paced at the rate shown (5,000 deliveries/s offered by default), for latency \
         below saturation. **burst**: messages published as fast as the broker confirms them, for the \
         ceiling (at most 900, so a session queue can never reach x-max-length and drop). **target** \
         (process mode only): paced at 3 × the raw burst's deliveries/s at the same N, for about 6 s, the \
         issue's goal for that mode. \
         Latency is from the send to the arrival of each copy in each session; deliveries/s counts every \
         copy over the window from the first publish to the last delivery. *vs raw* is the app's \
         deliveries/s over the same raw run's at the same load (for the target phase, over the raw burst); \
         *p99 − raw* the difference of the p99s. CPU is in % of one core over the window (the machine has \
         cores × 100 %); *other* is every other process on the machine. *CPU µs per delivery* is a \
         process's CPU-seconds over the same window × 10⁶ / the copies delivered in it, for the app and \
         for the broker: on two cores every microsecond the app spends is taken from the broker, so this \
         is the app's figure to cut, and it moves less than deliveries/s when other processes take \
         turns on the cores (read in 10 ms clock ticks; the broker's includes any other client's work).\n\n",
    );
    out.push_str(&tables(scenarios));
    out.push_str(
        "\nMemory is RSS. The app's: idle (its broker link up, no session), with the N sessions open, and \
         its peak. The broker's (the `beam.smp` on port 5672): right before and right after the N \
         receivers opened — raw consumers with their queues, or the app's sessions — so *broker per \
         session* is what one session queue costs the broker (raw, per-session mode) and, in process \
         mode, what a session costs it without one; and again after the phases. The Erlang VM reuses \
         memory it freed (the previous run's queues) before it grows, so a run that follows a larger one \
         can read low.\n",
    );
    out.push_str("\n## Targets\n\n");
    out.push_str(&targets(scenarios));
    out.push_str(
        "\nThroughput is judged on the burst phase (the ceiling), latency on the steady phase. Burst figures \
         move from run to run: on the 2-core machine this tool was written on, over five runs the app-to-raw \
         burst ratio at N=1000 ranged from 0.48 to 1.05 (usually 0.5–0.8), and p99 − raw at N=100 from +4 to \
         +7.5 ms (measured before the raw run had the history stream). Judge the targets over a few runs. \
         The process-mode target is judged on its target phase: the publisher kept the offered pace \
         (3 × the raw ceiling), every copy arrived (nothing lost, no session cut) and p99 < 100 ms; \
         *sustained* is copies delivered per second of publishing, which the window figure (up to the \
         last delivery) reads a little under.\n",
    );
    out.push_str("\n## Is the generator the bottleneck?\n\n");
    out.push_str(&generator_checks(scenarios));
    let background: Vec<String> = scenarios
        .iter()
        .map(|s| {
            let b = s.background;
            format!(
                "N={}: broker {:.0} %, other {:.0} %",
                s.plan.sessions,
                b.broker.unwrap_or(0.0),
                b.other.unwrap_or(0.0)
            )
        })
        .collect();
    let _ = writeln!(
        out,
        "- Broker and cores are shared with whatever else runs on the machine. Before each scenario the tool \
         waits (up to 20 s) for them to calm down; what was left then: {}.",
        background.join("; ")
    );
    let warnings: usize = scenarios.iter().flat_map(Scenario::apps).map(|a| a.warnings.len()).sum();
    let exits: Vec<String> = scenarios
        .iter()
        .flat_map(|s| {
            s.apps().map(|a| {
                let exit = a.exit.as_deref().unwrap_or("-");
                format!("N={} {}: {exit}", s.plan.sessions, mode_label(a.mode))
            })
        })
        .collect();
    let _ =
        writeln!(out, "\nApp warnings logged: {warnings}. App exits after SIGTERM: {}.", exits.join("; "));
    out.push_str("\n## JSON lines\n\n```json\n");
    for s in scenarios {
        for d in &s.runs {
            let _ = writeln!(out, "{}", json_line(s, d));
        }
    }
    out.push_str("```\n");
    out
}
