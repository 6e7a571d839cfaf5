//! The quick run's table, for use while working: per phase, the raw ceiling and the app side by
//! side, with what each delivery cost the app and the broker in CPU time.

use std::fmt::Write as _;

use crate::{
    phase::Delivery,
    plan::{Load, describe_rate},
    scenario::Scenario,
    tables::{ms, ratio},
};

/// One row per phase: raw and the app's one run at the same N and load.
pub fn side_by_side(s: &Scenario) -> String {
    let mut out = String::from(
        "| N | load | msgs × rate | deliveries/s raw → app | vs raw | p50 ms raw → app | p99 ms raw → app \
         | app CPU µs/delivery | broker CPU µs/delivery raw → app | generator CPU µs/delivery raw → app \
         | lost / dup / reorder app | other CPU raw → app |\n\
         |---:|---|---|---|---:|---|---|---:|---|---|---|---|\n",
    );
    let us = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for load in [Load::Steady, Load::Burst] {
        let Some(raw) = s.find("raw", load) else { continue };
        for app in s.runs.iter().filter(|d| d.mode.is_some() && d.load == load) {
            let (raw_cpu, app_cpu) = (raw.cpu_per_delivery(), app.cpu_per_delivery());
            let other = |d: &Delivery| {
                let pct = d.cpu.other.map_or("-".into(), |o| format!("{o:.0}%"));
                if d.cpu.disturbed() { pct + " ⚠" } else { pct }
            };
            let _ = writeln!(
                out,
                "| {} | {} {} | {} × {} | {:.0} → {:.0} | {:.2} | {} → {} | {} → {} | {} | {} → {} | {} → {} \
                 | {} / {} / {} | {} → {} |",
                s.plan.sessions,
                load.name(),
                app.run,
                app.messages,
                describe_rate(app.rate),
                raw.deliveries_per_s,
                app.deliveries_per_s,
                ratio(app, Some(raw)),
                ms(raw.p50_ms),
                ms(app.p50_ms),
                ms(raw.p99_ms),
                ms(app.p99_ms),
                us(app_cpu.app),
                us(raw_cpu.broker),
                us(app_cpu.broker),
                us(raw_cpu.generator),
                us(app_cpu.generator),
                app.lost,
                app.duplicated,
                app.reordered,
                other(raw),
                other(app),
            );
        }
    }
    out.push_str(
        "\nCPU µs per delivery: a process's CPU-seconds over the phase's window × 10⁶ / the copies \
         delivered in it (clock ticks of 10 ms). On two cores what the app spends is taken from the \
         broker: cut the app's. For a count that does not move with the machine's noise: --callgrind.\n",
    );
    out
}
