//! The callgrind run: the app alone under `valgrind --tool=callgrind`, N sessions open, the quick
//! run's burst, and the app's instructions (Ir) over exactly that window, bracketed by
//! `callgrind_control --zero` before the first publish and `--dump` after the last
//! delivery, so that start-up and the opening of the sessions are not counted. Instructions per
//! delivery do not depend on what else the machine is doing: a change can be judged on one run.
//! The app runs several times slower under callgrind (about 3,000 deliveries/s instead of
//! 20,000 on the machine this was written on, and longer to start), hence the long waits.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{
    app::AppRun,
    figures::settle,
    options::Options,
    phase::{PhaseSpec, run_phase},
    plan::{Load, Mode, Plan},
    procfs::run_bounded,
    server::Launch,
};

/// After the last publish (confirmed by the broker at once), how long the slowed app may take
/// to deliver the burst.
const CALLGRIND_DRAIN: Duration = Duration::from_secs(600);

pub async fn run(options: &Options, binary: &Path, run_id: &str, broker: Option<u32>) {
    let for_tools = Duration::from_secs(10);
    for tool in ["valgrind", "callgrind_control"] {
        assert!(
            run_bounded(tool, &["--version"], for_tools).is_some(),
            "--callgrind needs {tool} (valgrind's callgrind tool) on the PATH"
        );
    }
    let plan = Plan::for_sessions(options.sessions[0], options);
    let mode = options.mode.unwrap_or(Mode::Session);
    let via = options.vias()[0];
    // Next to the binary's target/release/: target/fanout-callgrind/.
    let dir = binary.parent().and_then(Path::parent).unwrap_or(Path::new(".")).join("fanout-callgrind");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    println!(
        "\n== callgrind: N = {} sessions, {} mode, one burst of {} messages by {} ({} deliveries)",
        plan.sessions,
        mode.name(),
        plan.burst,
        via.name(),
        plan.sessions as u64 * u64::from(plan.burst)
    );

    settle(broker, options.settle_limit()).await;
    let app = AppRun::start(&plan, mode, binary, run_id, broker, Launch::Callgrind(&dir)).await;
    let pid = app.server.pid;
    let publisher = app.publisher(via);
    // The app is idle here: the window starts with the first publish.
    control(pid, &app.replica, "--zero");
    let spec = PhaseSpec {
        run: mode.run(via),
        mode: Some(mode),
        load: Load::Burst,
        messages: plan.burst,
        rate: 0.0,
        drain: CALLGRIND_DRAIN,
    };
    let d = run_phase(spec, &app.fleet, &publisher, (Some(pid), broker)).await;
    control(pid, &app.replica, "--dump");
    let dump = latest_dump(&dir, pid);
    let setup = app.stop(broker).await;

    let instructions = dump.as_deref().and_then(totals);
    println!("\n| N | mode | via | messages | deliveries | app instructions (Ir) | Ir per delivery |");
    println!("|---:|---|---|---:|---:|---:|---:|");
    let per_delivery = instructions
        .filter(|_| d.delivered > 0)
        .map_or("-".into(), |ir| format!("{:.0}", ir as f64 / d.delivered as f64));
    println!(
        "| {} | {} | {} | {} | {}/{} | {} | {per_delivery} |",
        plan.sessions,
        mode.name(),
        via.name(),
        d.published,
        d.delivered,
        d.expected,
        instructions.map_or("not read".into(), |ir| ir.to_string()),
    );
    if d.delivered < d.expected || d.lost + d.closed_early > 0 {
        println!(
            "\nwarning: not every copy arrived ({} lost, {} sessions closed early): the count is for the \
             {} deliveries made",
            d.lost, d.closed_early, d.delivered
        );
    }
    match &dump {
        Some(path) => println!(
            "\nThe window's profile: {} (callgrind_annotate {0}). App exit: {}.",
            path.display(),
            setup.exit.as_deref().unwrap_or("-")
        ),
        None => println!("\nno callgrind dump of PID {pid} found in {}", dir.display()),
    }
}

/// `callgrind_control <flag> PID`: `--zero` zeroes the counters, `--dump` writes them to a new
/// file. Valgrind names its control pipes after the `HOSTNAME` the app was given (`host`), and
/// `callgrind_control` finds them only under that name.
fn control(pid: u32, host: &str, flag: &str) {
    let output = Command::new("callgrind_control")
        .args([flag, &pid.to_string()])
        .env("HOSTNAME", host)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("callgrind_control {flag} {pid}: {e}"));
    let said = String::from_utf8_lossy(&output.stdout);
    // It exits with 0 whatever happened; "OK." is its answer when the app took the command.
    assert!(said.contains("OK."), "callgrind_control {flag} {pid} did not answer OK: {said}");
}

/// The newest dump of `pid`: `callgrind.out.<pid>.<part>`, the highest part.
fn latest_dump(dir: &Path, pid: u32) -> Option<PathBuf> {
    let prefix = format!("callgrind.out.{pid}.");
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| {
            let path = e.ok()?.path();
            let part = path.file_name()?.to_str()?.strip_prefix(&prefix)?.parse::<u32>().ok()?;
            Some((part, path))
        })
        .max_by_key(|(part, _)| *part)
        .map(|(_, path)| path)
}

/// The `totals:` line of a callgrind dump: the instructions (Ir) since the counters were zeroed.
fn totals(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().rev().find(|l| l.starts_with("totals:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
