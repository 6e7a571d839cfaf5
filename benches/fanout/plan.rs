//! What a run publishes: the plan per N (steady, burst and target phases), the app's fan-out
//! modes, the loads, and the names of the runs.

use crate::options::{Kind, Options};

/// The burst phase stays under the session queues' `x-max-length`: however far delivery falls
/// behind, no queue can hold more than this many of the phase's messages, so drop-head never
/// fires and any loss is a real one.
pub const BURST_MAX: u32 = 900;

/// Offered load of the steady phase by default, in deliveries per second (rate × N): about a
/// third of what the app sustained on the 2-core machine this was written on (raw about
/// 17,000–25,000/s, the app about 8,000–16,000/s, see BENCHMARKS.md), so latency is measured
/// below saturation at every N.
pub const STEADY_DELIVERIES_PER_SEC: f64 = 5000.0;

/// The goal for process mode at N = 1,000: at least 3 × the deliveries/s of the
/// per-session raw ceiling measured in the same run, with p99 under 100 ms and nothing lost.
pub const TARGET_FACTOR: f64 = 3.0;
pub const TARGET_P99_MS: f64 = 100.0;
/// The target phase publishes for about this long ("sustained": many times the p99 it is
/// judged by), and at least [`TARGET_MIN_MESSAGES`] messages.
pub const TARGET_SECS: f64 = 6.0;
pub const TARGET_MIN_MESSAGES: u32 = 50;
/// A paced publisher that kept up reads a hair under its rate (each send is due on a
/// millisecond timer, so the last can be a little late): below this share of the offered rate,
/// it did not keep up.
pub const PACE_TOLERANCE: f64 = 0.98;

/// A quick run's steady phase publishes for about this long (at least
/// [`QUICK_STEADY_MIN_MESSAGES`]), and its burst about this many deliveries (N × messages).
const QUICK_STEADY_SECS: f64 = 4.0;
const QUICK_STEADY_MIN_MESSAGES: u32 = 8;
const QUICK_BURST_DELIVERIES: usize = 100_000;
const QUICK_BURST_MIN_MESSAGES: u32 = 20;

/// What one scenario publishes.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    pub sessions: usize,
    /// The steady phase: `messages` at `rate` per second (0: unpaced).
    pub messages: u32,
    pub rate: f64,
    /// The burst phase: this many, unpaced (0: no burst phase).
    pub burst: u32,
    /// Process mode adds its target phase (full runs only).
    pub target: bool,
}

impl Plan {
    /// Defaults: see [`STEADY_DELIVERIES_PER_SEC`] and [`BURST_MAX`]. Message counts keep the
    /// whole default run around 10 minutes (each phase runs five times: raw, app-http, app-amqp,
    /// proc-http, proc-amqp; the process-mode runs add their target phase), and a quick run
    /// (each phase twice: raw, the app) under two minutes. A callgrind run makes only the quick
    /// run's burst (at N = 1000, 100,000 deliveries: about 30 s for the app under callgrind).
    pub fn for_sessions(sessions: usize, options: &Options) -> Self {
        let rate = (STEADY_DELIVERIES_PER_SEC / sessions as f64).clamp(1.0, 500.0).round();
        let quick_steady = ((rate * QUICK_STEADY_SECS).ceil() as u32).max(QUICK_STEADY_MIN_MESSAGES);
        let quick_burst = u32::try_from(QUICK_BURST_DELIVERIES / sessions).unwrap_or(BURST_MAX);
        let (messages, burst) = match (options.kind, sessions) {
            (Kind::Quick | Kind::Callgrind, _) => {
                (quick_steady, quick_burst.clamp(QUICK_BURST_MIN_MESSAGES, BURST_MAX))
            }
            (Kind::Full, 0..=10) => (2000, BURST_MAX),
            (Kind::Full, 11..=100) => (1000, BURST_MAX),
            (Kind::Full, 101..=1000) => (100, 100),
            (Kind::Full, _) => (30, 30),
        };
        Self {
            sessions,
            messages: options.messages.unwrap_or(messages),
            rate: options.rate.unwrap_or(rate),
            burst: options.burst.unwrap_or(burst),
            target: options.kind == Kind::Full,
        }
    }

    /// The phases to run, as (load, messages, rate).
    pub fn phases(&self) -> Vec<(Load, u32, f64)> {
        let mut phases = vec![(Load::Steady, self.messages, self.rate)];
        if self.burst > 0 {
            phases.push((Load::Burst, self.burst, 0.0));
        }
        phases
    }

    /// The target phase, as (load, messages, rate): [`TARGET_FACTOR`] × the raw ceiling
    /// (deliveries/s of the raw burst at this N) shared among the N sessions, for about
    /// [`TARGET_SECS`]. `None` without a raw ceiling to pace it by (no burst phase).
    pub fn target_phase(&self, raw_ceiling: Option<f64>) -> Option<(Load, u32, f64)> {
        let raw_ceiling = raw_ceiling.filter(|d| *d > 0.0)?;
        let rate = TARGET_FACTOR * raw_ceiling / self.sessions as f64;
        let messages = ((rate * TARGET_SECS).ceil() as u32).max(TARGET_MIN_MESSAGES);
        Some((Load::Target, messages, rate))
    }
}

/// Where the app copies each message to its sessions (`NOTIFIER_FANOUT_MODE`); a full run
/// starts the app once in each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The broker copies it into every session's own queue (the default).
    Session,
    /// One queue per process; the app copies it to its sessions in memory.
    Process,
}

impl Mode {
    pub const ALL: [Self; 2] = [Self::Session, Self::Process];

    /// The value of `NOTIFIER_FANOUT_MODE`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Process => "process",
        }
    }

    /// `--mode`: the name, or `per-session`, the name this tool used before process mode.
    pub fn accepts(self, arg: &str) -> bool {
        arg == self.name() || (self == Self::Session && arg == "per-session")
    }

    /// The name of its run by `via`.
    pub fn run(self, via: Via) -> &'static str {
        match (self, via) {
            (Self::Session, Via::Http) => "app-http",
            (Self::Session, Via::Amqp) => "app-amqp",
            (Self::Process, Via::Http) => "proc-http",
            (Self::Process, Via::Amqp) => "proc-amqp",
        }
    }

    /// The names of its runs: by HTTP, by AMQP.
    pub fn runs(self) -> [&'static str; 2] {
        Via::ALL.map(|via| self.run(via))
    }

    /// In its exchange's and replica's names.
    pub fn prefix(self) -> &'static str {
        match self {
            Self::Session => "app",
            Self::Process => "proc",
        }
    }
}

/// How the app runs get their messages to the app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `POST /messages`, as a browser does.
    Http,
    /// Straight into the app's exchange, by the raw run's publisher, as another service would.
    Amqp,
}

impl Via {
    pub const ALL: [Self; 2] = [Self::Http, Self::Amqp];

    pub fn name(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Amqp => "amqp",
        }
    }
}

/// Every run, in the order of the tables.
pub const RUNS: [&str; 5] = ["raw", "app-http", "app-amqp", "proc-http", "proc-amqp"];

/// The mode a run's app was in; `None` for raw.
pub fn mode_label(mode: Option<Mode>) -> &'static str {
    mode.map_or("raw", Mode::name)
}

/// How a phase publishes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Load {
    /// Paced at the plan's rate: latency below saturation.
    #[default]
    Steady,
    /// As fast as the broker confirms (AMQP: 256 unconfirmed at most; HTTP: 256 clients each
    /// waiting for its 202): deliveries/s is the ceiling.
    Burst,
    /// Process mode only: paced at [`TARGET_FACTOR`] × the raw ceiling (see
    /// [`Plan::target_phase`]), with the burst's 256 unconfirmed or 256 clients so that the
    /// publisher can keep that pace: is the goal for that mode sustained?
    Target,
}

impl Load {
    pub fn name(self) -> &'static str {
        match self {
            Self::Steady => "steady",
            Self::Burst => "burst",
            Self::Target => "target",
        }
    }
}

pub fn describe_rate(rate: f64) -> String {
    if rate == 0.0 {
        "max".into()
    } else if rate.fract() == 0.0 {
        format!("{rate}/s")
    } else {
        // The target phase's rate, derived from a measurement.
        format!("{rate:.1}/s")
    }
}
