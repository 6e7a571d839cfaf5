//! The figures: CPU over a window (app, broker, generator, the rest of the machine), as shares
//! and per delivery; latency percentiles; and RSS growth as receivers open.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::procfs::{clock_ticks, cpu_ticks, machine_busy_ticks, status_kib};

/// Above this share of one core for other processes, a run is flagged as disturbed.
pub const DISTURBED_PCT: f64 = 25.0;

/// CPU shares over a window, in percent of one core (the machine has cores × 100 %).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuShare {
    pub app: Option<f64>,
    pub broker: Option<f64>,
    pub generator: f64,
    /// Every other process on the machine (other tests, builds...): the machine's busy time
    /// minus the three above.
    pub other: Option<f64>,
    /// The CPU-seconds behind `app`, `broker` and `generator` (user + system, all threads).
    pub app_secs: Option<f64>,
    pub broker_secs: Option<f64>,
    pub generator_secs: f64,
}

impl CpuShare {
    /// Other processes took a noticeable share of the machine during the window: the figures
    /// of that run are not this app's alone.
    pub fn disturbed(&self) -> bool {
        self.other.is_some_and(|o| o > DISTURBED_PCT)
    }

    pub fn describe(&self) -> String {
        let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}%"));
        format!("{} / {} / {:.0}% / {}", pct(self.app), pct(self.broker), self.generator, pct(self.other))
    }

    pub fn to_json(self) -> Value {
        let round = |v: f64| (v * 10.0).round() / 10.0;
        json!({
            "app": self.app.map(round),
            "broker": self.broker.map(round),
            "generator": round(self.generator),
            "other": self.other.map(round),
        })
    }

    /// CPU time per delivery over the same window: see [`PerDelivery`].
    pub fn per_delivery(&self, deliveries: u64) -> PerDelivery {
        let us = |secs: Option<f64>| secs.filter(|_| deliveries > 0).map(|s| s * 1e6 / deliveries as f64);
        PerDelivery {
            app: us(self.app_secs),
            broker: us(self.broker_secs),
            generator: us(Some(self.generator_secs)),
        }
    }
}

/// CPU microseconds per delivery: a process's CPU-seconds over a phase's window × 10⁶ / the
/// copies delivered in it. On a machine where app and broker share the cores, every
/// microsecond the app spends is taken from the broker, so this is the app's figure to cut; it
/// also moves less than deliveries/s when other processes take turns on the cores. Read from
/// /proc in clock ticks (10 ms): a window of a few CPU-seconds reads within a few tenths of a
/// percent. The broker's includes whatever other clients of the same broker made it do.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerDelivery {
    pub app: Option<f64>,
    pub broker: Option<f64>,
    pub generator: Option<f64>,
}

impl PerDelivery {
    /// `app / broker`, e.g. `12.4 / 31.0`.
    pub fn describe(&self) -> String {
        let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
        format!("{} / {}", us(self.app), us(self.broker))
    }

    pub fn to_json(self) -> Value {
        let round = |v: f64| (v * 100.0).round() / 100.0;
        json!({
            "app": self.app.map(round),
            "broker": self.broker.map(round),
            "generator": self.generator.map(round),
        })
    }
}

/// A CPU-time reading of the app (when there is one), the broker, this generator and the
/// whole machine.
pub struct CpuSample {
    pub at: Instant,
    pub app: Option<(u32, u64)>,
    pub broker: Option<(u32, u64)>,
    pub generator: u64,
    pub machine: Option<u64>,
}

impl CpuSample {
    pub fn take(app: Option<u32>, broker: Option<u32>) -> Self {
        let read = |pid: Option<u32>| pid.and_then(|p| Some((p, cpu_ticks(Some(p))?)));
        Self {
            at: Instant::now(),
            app: read(app),
            broker: read(broker),
            generator: cpu_ticks(None).unwrap_or(0),
            machine: machine_busy_ticks(),
        }
    }

    /// Shares from this sample to a fresh one.
    pub fn share(&self) -> CpuShare {
        let end = Self::take(self.app.map(|a| a.0), self.broker.map(|b| b.0));
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let cpu_secs = |ticks: u64| ticks as f64 / clock_ticks();
        let pct = |cpu_secs: f64| cpu_secs / secs * 100.0;
        let diff = |a: Option<(u32, u64)>, b: Option<(u32, u64)>| Some(cpu_secs(b?.1.saturating_sub(a?.1)));
        let (app_secs, broker_secs) = (diff(self.app, end.app), diff(self.broker, end.broker));
        let generator_secs = cpu_secs(end.generator.saturating_sub(self.generator));
        let (app, broker, generator) = (app_secs.map(pct), broker_secs.map(pct), pct(generator_secs));
        let machine = end.machine.zip(self.machine).map(|(b, a)| pct(cpu_secs(b.saturating_sub(a))));
        let other = machine.map(|m| (m - app.unwrap_or(0.0) - broker.unwrap_or(0.0) - generator).max(0.0));
        CpuShare { app, broker, generator, other, app_secs, broker_secs, generator_secs }
    }
}

/// Waits (at most `limit`) until the machine is nearly idle: the queues deleted by the previous
/// run gone from the broker, and no other test or build hogging the cores. Returns the shares
/// over the last half second, for the record.
pub async fn settle(broker: Option<u32>, limit: Duration) -> CpuShare {
    let deadline = Instant::now() + limit;
    loop {
        let sample = CpuSample::take(None, broker);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let share = sample.share();
        let quiet = share.broker.unwrap_or(0.0) < 10.0 && share.other.unwrap_or(0.0) < 15.0;
        if quiet || Instant::now() >= deadline {
            return share;
        }
    }
}

/// The `q` quantile of sorted microseconds, in milliseconds.
pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    f64::from(sorted_us[rank - 1]) / 1000.0
}

/// A process's RSS right before and right after N receivers opened.
#[derive(Clone, Copy, Debug, Default)]
pub struct Growth {
    pub before_kib: Option<u64>,
    pub after_kib: Option<u64>,
    pub opened: usize,
}

impl Growth {
    /// What one receiver added, in KiB.
    pub fn per_receiver_kib(&self) -> Option<f64> {
        let (before, after) = (self.before_kib?, self.after_kib?);
        (self.opened > 0).then(|| (after as f64 - before as f64) / self.opened as f64)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Memory {
    /// The app's RSS idle (before its sessions) and with its N sessions; nothing for raw.
    pub app: Growth,
    /// The app's peak RSS (VmHWM), after the phases.
    pub app_peak_kib: Option<u64>,
    /// The broker's RSS right before and right after the receivers opened: their queues (raw,
    /// per-session mode) or whatever process mode adds per session (nearly nothing).
    pub broker: Growth,
    /// The broker's RSS after the phases, before the receivers closed.
    pub broker_end_kib: Option<u64>,
}

/// The broker's RSS now, in KiB.
pub fn broker_rss(broker: Option<u32>) -> Option<u64> {
    broker.and_then(|pid| status_kib(pid, "VmRSS"))
}
