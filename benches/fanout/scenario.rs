//! Everything measured at one N: the raw ceiling first, then the app once per fan-out mode,
//! each with the receivers it opened and what they cost.

use std::{collections::BTreeMap, path::Path};

use crate::{
    app::run_app,
    figures::{CpuShare, Memory, settle},
    options::Options,
    phase::Delivery,
    plan::{Load, Mode, Plan, describe_rate},
    raw::run_raw,
    tables::kib,
};

#[derive(Clone, Debug, Default)]
pub struct Opening {
    pub requested: usize,
    pub opened: usize,
    pub errors: BTreeMap<String, usize>,
    pub secs: f64,
    pub cpu: CpuShare,
}

impl Opening {
    pub fn describe(&self) -> String {
        format!("{}/{} in {:.1} s", self.opened, self.requested, self.secs)
    }
}

/// One set of receivers and what it cost: the raw consumers, or one start of the app in one
/// fan-out mode with its sessions.
#[derive(Clone, Debug, Default)]
pub struct Setup {
    /// `None`: the raw consumers.
    pub mode: Option<Mode>,
    pub open: Opening,
    pub memory: Memory,
    /// App starts only: the exit after SIGTERM, and the warnings it logged (the first few).
    pub exit: Option<String>,
    pub warnings: Vec<String>,
}

/// Everything measured at one N.
pub struct Scenario {
    pub plan: Plan,
    /// The raw consumers first, then one app start per mode, in the order they ran.
    pub setups: Vec<Setup>,
    /// Every phase, raw first.
    pub runs: Vec<Delivery>,
    /// CPU shares just before the scenario (after [`settle`]).
    pub background: CpuShare,
}

impl Scenario {
    pub fn find(&self, run: &str, load: Load) -> Option<&Delivery> {
        self.runs.iter().find(|d| d.run == run && d.load == load)
    }

    /// The raw run an app run is compared with: same load; for the target phase, the raw burst
    /// (the ceiling it is a multiple of).
    pub fn raw_for(&self, d: &Delivery) -> Option<&Delivery> {
        let load = if d.load == Load::Target { Load::Burst } else { d.load };
        self.find("raw", load)
    }

    pub fn setup(&self, mode: Option<Mode>) -> Option<&Setup> {
        self.setups.iter().find(|s| s.mode == mode)
    }

    pub fn apps(&self) -> impl Iterator<Item = &Setup> {
        self.setups.iter().filter(|s| s.mode.is_some())
    }
}

pub fn print_broker_growth(what: &str, memory: &Memory) {
    println!(
        "  {what}: broker RSS {} before, {} with {} open -> {} each",
        kib(memory.broker.before_kib),
        kib(memory.broker.after_kib),
        memory.broker.opened,
        memory.broker.per_receiver_kib().map_or("-".into(), |k| format!("{k:.1} KiB"))
    );
}

pub async fn run_scenario(
    plan: Plan,
    options: &Options,
    binary: &Path,
    run_id: &str,
    broker: Option<u32>,
) -> Scenario {
    println!(
        "\n== N = {} sessions: steady {} messages at {} (offered {} deliveries/s), burst {} messages",
        plan.sessions,
        plan.messages,
        describe_rate(plan.rate),
        if plan.rate == 0.0 { "max".into() } else { format!("{:.0}", plan.rate * plan.sessions as f64) },
        plan.burst,
    );

    // 1. The broker alone.
    let background = settle(broker, options.settle_limit()).await;
    let (raw, mut runs) = run_raw(&plan, run_id, broker).await;
    let raw_ceiling = runs.iter().find(|d| d.load == Load::Burst).map(|d| d.deliveries_per_s);
    let mut setups = vec![raw];

    // 2. The app, once per fan-out mode.
    for mode in options.modes() {
        settle(broker, options.settle_limit()).await;
        let vias = options.vias();
        let (setup, app_runs) = run_app(&plan, mode, &vias, binary, run_id, broker, raw_ceiling).await;
        setups.push(setup);
        runs.extend(app_runs);
    }
    Scenario { plan, setups, runs, background }
}
