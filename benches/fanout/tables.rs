//! The tables: the lines printed as each phase ends, the Markdown tables of BENCHMARKS.md, and
//! one JSON line per run.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::{
    phase::Delivery,
    plan::{Load, Mode, RUNS, describe_rate, mode_label},
    scenario::{Opening, Scenario},
    verdicts::target_check,
};

pub fn kib(v: Option<u64>) -> String {
    v.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

pub fn ms(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.1}")
    }
}

pub fn print_opening(what: &str, open: &Opening) {
    println!("  {what}: opened {} (CPU app/broker/gen/other {})", open.describe(), open.cpu.describe());
    for (error, count) in &open.errors {
        println!("    {count} failed: {error}");
    }
}

pub fn print_delivery(d: &Delivery) {
    println!(
        "  {:<9} {:<6} {}/{} delivered, {:.0}/s; latency p50 {} p90 {} p99 {} max {} ms; \
         lost {} dup {} out-of-order {}; published {:.0}/s; CPU app/broker/gen/other {}; \
         CPU µs per delivery app/broker {}",
        d.run,
        d.load.name(),
        d.delivered,
        d.expected,
        d.deliveries_per_s,
        ms(d.p50_ms),
        ms(d.p90_ms),
        ms(d.p99_ms),
        ms(d.max_ms),
        d.lost,
        d.duplicated,
        d.reordered,
        d.achieved_rate,
        d.cpu.describe(),
        d.cpu_per_delivery().describe()
    );
    for (error, count) in &d.publish_errors {
        println!("    {count} publishes failed: {error}");
    }
    if d.stray + d.gap_missed + d.other_frames + d.closed_early > 0 {
        println!(
            "    stray frames {}, gap-reported missed {}, other notices {}, closed early {}",
            d.stray, d.gap_missed, d.other_frames, d.closed_early
        );
    }
}

pub fn ratio(app: &Delivery, raw: Option<&Delivery>) -> f64 {
    match raw {
        Some(raw) if raw.deliveries_per_s > 0.0 => app.deliveries_per_s / raw.deliveries_per_s,
        _ => f64::NAN,
    }
}

pub fn p99_minus_raw(app: &Delivery, raw: Option<&Delivery>) -> f64 {
    raw.map_or(f64::NAN, |raw| app.p99_ms - raw.p99_ms)
}

/// A float for JSON: rounded, and `null` when not a number.
pub fn num(v: f64, decimals: i32) -> Value {
    let scale = 10f64.powi(decimals);
    if v.is_finite() { json!((v * scale).round() / scale) } else { Value::Null }
}

/// One JSON line per run, for scripts. `mode` is the app's fan-out mode, `null` for raw.
/// `broker_rss_kib`: the broker's RSS right before and right after this run's receivers opened
/// (raw: its N queues), after the phases (`end`), and what each receiver added.
pub fn json_line(s: &Scenario, d: &Delivery) -> Value {
    let setup = s.setup(d.mode);
    let open = setup.map(|x| &x.open);
    let memory = setup.map(|x| &x.memory);
    let mut line = json!({
        "bench": "fanout",
        "run": d.run,
        "load": d.load.name(),
        "mode": d.mode.map(Mode::name),
        "sessions": s.plan.sessions,
        "opened": open.map(|o| o.opened),
        "open_secs": open.map(|o| num(o.secs, 2)),
        "open_cpu_pct": open.map(|o| o.cpu.to_json()),
        "messages": d.messages,
        "rate": num(d.rate, 3),
        "published": d.published,
        "publish_failed": d.publish_failed,
        "published_per_s": num(d.achieved_rate, 0),
        "publish_ack_ms": { "p50": num(d.acked_p50_ms, 3), "p99": num(d.acked_p99_ms, 3) },
        "expected": d.expected,
        "delivered": d.delivered,
        "deliveries_per_s": num(d.deliveries_per_s, 0),
        "latency_ms": {
            "p50": num(d.p50_ms, 3), "p90": num(d.p90_ms, 3), "p99": num(d.p99_ms, 3), "max": num(d.max_ms, 3)
        },
        "lost": d.lost,
        "duplicated": d.duplicated,
        "out_of_order": d.reordered,
        "stray": d.stray,
        "gap_missed": d.gap_missed,
        "closed_early": d.closed_early,
        "cpu_pct": d.cpu.to_json(),
        "cpu_us_per_delivery": d.cpu_per_delivery().to_json(),
        "broker_rss_kib": memory.map(|m| json!({
            "before": m.broker.before_kib,
            "open": m.broker.after_kib,
            "end": m.broker_end_kib,
            "per_session": m.broker.per_receiver_kib().map(|k| num(k, 1)),
        })),
    });
    if d.mode.is_some() {
        let raw = s.raw_for(d);
        line["vs_raw"] = json!({
            "deliveries_ratio": num(ratio(d, raw), 3),
            "p99_minus_raw_ms": num(p99_minus_raw(d, raw), 3),
        });
        line["rss_kib"] = json!({
            "idle": memory.and_then(|m| m.app.before_kib),
            "open": memory.and_then(|m| m.app.after_kib),
            "peak": memory.and_then(|m| m.app_peak_kib),
            "per_session": memory.and_then(|m| m.app.per_receiver_kib()).map(|k| num(k, 1)),
        });
    }
    if let Some(t) = target_check(s, d) {
        line["target"] = json!({
            "goal_deliveries_per_s": num(t.goal, 0),
            "sustained_deliveries_per_s": num(t.sustained, 0),
            "kept_pace": t.kept_pace,
            "complete": t.complete,
            "met": t.met,
        });
    }
    line
}

/// KiB per receiver, e.g. `16.5 KiB`.
pub fn kib_each(v: Option<f64>) -> String {
    v.map_or("-".into(), |k| format!("{k:.1} KiB"))
}

/// The report as Markdown tables, printed and written to BENCHMARKS.md.
pub fn tables(scenarios: &[Scenario]) -> String {
    let mut out = String::new();
    out.push_str(
        "| N | load | run | mode | msgs × rate | delivered | deliveries/s | vs raw | p50 ms | p90 ms | p99 ms \
         | max ms | p99 − raw | lost / dup / reorder | CPU app / broker / gen / other \
         | CPU µs per delivery app / broker |\n",
    );
    out.push_str("|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|\n");
    for s in scenarios {
        for load in [Load::Steady, Load::Burst, Load::Target] {
            for run in RUNS {
                let Some(d) = s.find(run, load) else { continue };
                let is_app = d.mode.is_some();
                let raw = s.raw_for(d);
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} × {} | {}/{} | {:.0} | {} | {} | {} | {} | {} | {} | {} / {} / {} | {} | {} |",
                    s.plan.sessions,
                    load.name(),
                    d.run,
                    mode_label(d.mode),
                    d.messages,
                    describe_rate(d.rate),
                    d.delivered,
                    d.expected,
                    d.deliveries_per_s,
                    if is_app { format!("{:.2}", ratio(d, raw)) } else { "1".into() },
                    ms(d.p50_ms),
                    ms(d.p90_ms),
                    ms(d.p99_ms),
                    ms(d.max_ms),
                    // Burst latency is queueing (how long the backlog took to drain): no comparison.
                    if is_app && load == Load::Steady {
                        format!("{:+.2} ms", p99_minus_raw(d, raw))
                    } else {
                        String::new()
                    },
                    d.lost,
                    d.duplicated,
                    d.reordered,
                    d.cpu.describe() + if d.cpu.disturbed() { " ⚠" } else { "" },
                    d.cpu_per_delivery().describe(),
                );
            }
        }
    }
    out.push_str(
        "\n| N | mode | app idle RSS | app RSS with N sessions | app per session | app peak RSS \
         | broker RSS before → with N open | broker per session | broker RSS after the phases | opened \
         | CPU app / broker / gen / other while opening |\n",
    );
    out.push_str("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for s in scenarios {
        for setup in &s.setups {
            let m = &setup.memory;
            let app = |v: String| if setup.mode.is_some() { v } else { "-".into() };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} → {} | {} | {} | {} | {} |",
                s.plan.sessions,
                mode_label(setup.mode),
                app(kib(m.app.before_kib)),
                app(kib(m.app.after_kib)),
                app(kib_each(m.app.per_receiver_kib())),
                app(kib(m.app_peak_kib)),
                kib(m.broker.before_kib),
                kib(m.broker.after_kib),
                kib_each(m.broker.per_receiver_kib()),
                kib(m.broker_end_kib),
                setup.open.describe(),
                setup.open.cpu.describe(),
            );
        }
    }
    out
}
