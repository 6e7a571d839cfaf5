//! One measured phase: publish M messages, wait until every receiver has every copy (or the
//! drain grace is over), and sum up what arrived, how late, and what it cost in CPU.

use std::{
    collections::BTreeMap,
    sync::atomic::Ordering::Relaxed,
    time::{Duration, Instant},
};

use crate::{
    figures::{CpuSample, CpuShare, PerDelivery, quantile_ms},
    message::now_ns,
    plan::{Load, Mode, PACE_TOLERANCE},
    publishers::{PublishStats, Publisher},
    receivers::Fleet,
    tables::print_delivery,
};

/// What a phase is: which run (of which mode), which load, its tag in the message texts, what
/// it publishes.
#[derive(Clone, Copy, Debug)]
pub struct PhaseSpec {
    pub run: &'static str,
    pub mode: Option<Mode>,
    pub load: Load,
    pub messages: u32,
    pub rate: f64,
    /// After the last publish, how long to wait for deliveries still on their way.
    pub drain: Duration,
}

impl PhaseSpec {
    /// The publisher's letter (`r`aw, `h`ttp, `a`mqp), upper case for the burst, `t` and `u`
    /// for the target phase: distinct for every phase a fleet sees.
    pub fn tag(&self) -> u8 {
        let letter = match self.run {
            "raw" => b'r',
            run if run.ends_with("-http") => b'h',
            _ => b'a',
        };
        match self.load {
            Load::Steady => letter,
            Load::Burst => letter.to_ascii_uppercase(),
            Load::Target if letter == b'h' => b't',
            Load::Target => b'u',
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Delivery {
    pub run: &'static str,
    /// The app's fan-out mode; `None` for raw.
    pub mode: Option<Mode>,
    pub load: Load,
    pub sessions: usize,
    pub messages: u32,
    pub rate: f64,
    pub published: u32,
    pub publish_failed: u32,
    pub publish_errors: BTreeMap<String, u32>,
    pub achieved_rate: f64,
    pub acked_p50_ms: f64,
    pub acked_p99_ms: f64,
    /// Receivers × published messages: what must arrive.
    pub expected: u64,
    /// First copies that arrived (including any of a failed publish that was routed anyway).
    pub delivered: u64,
    pub window_s: f64,
    pub deliveries_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Published messages a receiver never got.
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Frames of no message of this phase (a late one of the previous phase, say).
    pub stray: u64,
    /// Messages `gap` frames said were dropped.
    pub gap_missed: u64,
    pub other_frames: u64,
    pub closed_early: u64,
    pub cpu: CpuShare,
}

pub async fn run_phase(
    spec: PhaseSpec,
    fleet: &Fleet,
    publisher: &Publisher,
    pids: (Option<u32>, Option<u32>),
) -> Delivery {
    let streams = publisher.streams(spec.load, spec.messages);
    for receiver in &fleet.receivers {
        receiver.reset(spec.tag(), spec.messages, streams);
    }
    fleet.totals.delivered.store(0, Relaxed);
    fleet.totals.last_ns.store(0, Relaxed);
    let closed_before = fleet.totals.closed_early.load(Relaxed);
    let receivers = fleet.receivers.len() as u64;

    let cpu = CpuSample::take(pids.0, pids.1);
    let mut publishing = {
        let publisher = publisher.clone();
        tokio::spawn(async move { publisher.publish(spec.tag(), spec.load, spec.messages, spec.rate).await })
    };
    // Until every message has reached every receiver, or `spec.drain` after the publisher
    // finished. When some publishes failed (a 503 after the confirm timeout), those may or may
    // not arrive: then until every confirmed one has and nothing arrived for QUIET, so that
    // late copies do not spill into the next phase.
    const QUIET: Duration = Duration::from_secs(2);
    let mut stats: Option<PublishStats> = None;
    let mut deadline = None;
    loop {
        let delivered = fleet.totals.delivered.load(Relaxed);
        if delivered >= receivers * u64::from(spec.messages) {
            break;
        }
        if stats.is_none() && publishing.is_finished() {
            stats = Some((&mut publishing).await.expect("the publisher task"));
            deadline = Some(Instant::now() + spec.drain);
        }
        if let Some(s) = &stats
            && delivered >= receivers * u64::from(s.ok)
            && now_ns().saturating_sub(fleet.totals.last_ns.load(Relaxed)) > QUIET.as_nanos() as u64
        {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let cpu = cpu.share();
    let stats = match stats {
        Some(stats) => stats,
        None => publishing.await.expect("the publisher task"),
    };

    let mut d = Delivery {
        run: spec.run,
        mode: spec.mode,
        load: spec.load,
        sessions: fleet.receivers.len(),
        messages: spec.messages,
        rate: spec.rate,
        published: stats.ok,
        publish_failed: stats.failed,
        achieved_rate: stats.achieved_rate(),
        expected: receivers * u64::from(stats.ok),
        cpu,
        ..Delivery::default()
    };
    let mut acked_us = stats.acked_us;
    acked_us.sort_unstable();
    d.acked_p50_ms = quantile_ms(&acked_us, 0.5);
    d.acked_p99_ms = quantile_ms(&acked_us, 0.99);
    d.publish_errors = stats.errors;
    let mut latencies = Vec::with_capacity(d.expected as usize);
    for receiver in &fleet.receivers {
        let t = receiver.track.lock().unwrap();
        d.delivered += u64::from(t.received);
        // Confirmed but not seen.
        d.lost += stats.acked.iter().zip(&t.seen).map(|(a, s)| u64::from((a & !s).count_ones())).sum::<u64>();
        d.duplicated += u64::from(t.duplicated);
        d.reordered += u64::from(t.reordered);
        d.stray += u64::from(t.stray);
        d.gap_missed += t.gap_missed;
        d.other_frames += u64::from(t.other_frames);
        latencies.extend_from_slice(&t.latencies_us);
    }
    d.closed_early = fleet.totals.closed_early.load(Relaxed) - closed_before;
    latencies.sort_unstable();
    d.p50_ms = quantile_ms(&latencies, 0.5);
    d.p90_ms = quantile_ms(&latencies, 0.9);
    d.p99_ms = quantile_ms(&latencies, 0.99);
    d.max_ms = latencies.last().map_or(f64::NAN, |&us| f64::from(us) / 1000.0);
    let last = fleet.totals.last_ns.load(Relaxed);
    d.window_s = last.saturating_sub(stats.first_ns) as f64 / 1e9;
    d.deliveries_per_s = if d.window_s > 0.0 { d.delivered as f64 / d.window_s } else { 0.0 };
    print_delivery(&d);
    d
}

impl Delivery {
    /// CPU µs per copy delivered, of the app, the broker and the generator.
    pub fn cpu_per_delivery(&self) -> PerDelivery {
        self.cpu.per_delivery(self.delivered)
    }

    /// Copies delivered per second of publishing: the publisher's pace × the receivers, times
    /// the share of the copies that arrived. `deliveries_per_s` runs from the first publish to
    /// the last delivery, so it also counts the last message's latency as time and reads a little
    /// under the offered rate even when every copy arrives promptly; for a paced phase whose
    /// copies all arrived within a bounded p99, this is the rate sustained.
    pub fn sustained_per_s(&self) -> f64 {
        if self.expected == 0 {
            return 0.0;
        }
        let arrived = (self.delivered as f64 / self.expected as f64).min(1.0);
        self.achieved_rate * self.sessions as f64 * arrived
    }

    /// A paced phase published at its rate (within [`PACE_TOLERANCE`]) with no failure.
    pub fn kept_pace(&self) -> bool {
        self.publish_failed == 0 && (self.rate == 0.0 || self.achieved_rate >= PACE_TOLERANCE * self.rate)
    }
}
