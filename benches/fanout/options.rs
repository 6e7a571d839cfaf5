//! The command line: which kind of run, which Ns, which modes, which overrides, and whether
//! BENCHMARKS.md is written.

use std::time::Duration;

use crate::plan::{BURST_MAX, Mode, Via};

/// What a run is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Every N, every mode, both publishers: BENCHMARKS.md (about 10 minutes).
    Full,
    /// For use while working: one N, raw and the app side by side, each phase once (under two
    /// minutes). Prints its table; BENCHMARKS.md untouched.
    Quick,
    /// The quick run's app burst under callgrind: the app's instructions per delivery, a count
    /// the machine's noise does not move.
    Callgrind,
}

/// The one N of a quick run and of a callgrind run.
pub const QUICK_SESSIONS: usize = 1000;

#[derive(Clone, Debug)]
pub struct Options {
    pub kind: Kind,
    pub sessions: Vec<usize>,
    /// Override the per-N defaults of [`Plan::for_sessions`].
    pub messages: Option<u32>,
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    /// Quick and callgrind runs: the app's one publisher (default AMQP, the raw run's own).
    pub via: Option<Via>,
    pub write: bool,
    /// Only the broker's ceiling: no app.
    pub raw_only: bool,
    /// `None`: both fan-out modes, one app start each.
    pub mode: Option<Mode>,
    /// The arguments as given, for the record.
    pub args: Vec<String>,
}

pub const USAGE: &str = "\
usage: cargo bench --bench fanout -- [options]
  --sessions 10,100,1000,5000   numbers of sessions, one scenario each
  --messages M                  messages of the steady phase (default by N: 2000 up to 10
                                sessions, 1000 up to 100, 100 up to 1000, 30 above)
  --rate R                      messages per second of the steady phase (default: 5000 / N
                                deliveries, i.e. 500/s at N=10 ... 1/s at N=5000); 0 = unpaced
  --burst B                     messages of the burst phase, published as fast as the broker
                                confirms them (default 900 up to 100 sessions, 100 up to 1000,
                                30 above; at most 900, under the queues' x-max-length; 0 skips it)
  --mode session|process        only that NOTIFIER_FANOUT_MODE (default: both, the app started
                                once in each; per-session is accepted for session)
  --raw-only                    only the broker's ceiling (no app); BENCHMARKS.md untouched
  --write                       write BENCHMARKS.md even with --raw-only
Any other run (--sessions, --messages... included) overwrites BENCHMARKS.md.

For use while working (BENCHMARKS.md untouched):
  --quick                       one N, each phase once: raw, then the app in one mode (default
                                session) by one publisher (steady about 4 s, burst about
                                100,000 deliveries); prints raw vs app with CPU µs per
                                delivery; under 2 minutes
  --callgrind                   the quick run's app burst alone, under valgrind --tool=callgrind:
                                the app's instructions per delivery (Ir), which the machine's
                                noise does not move; about a minute
  --n N                         their one number of sessions (default 1000)
  --via amqp|http               their app publisher (default amqp: the raw run's publisher, so
                                only the app differs; http: POST /messages)";

impl Options {
    pub fn parse() -> Result<Self, String> {
        // Cargo passes `--bench` to a harness-less bench target; it means nothing here.
        let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        let mut options = Options {
            kind: Kind::Full,
            sessions: vec![10, 100, 1000, 5000],
            messages: None,
            rate: None,
            burst: None,
            via: None,
            write: false,
            raw_only: false,
            mode: None,
            args: args.clone(),
        };
        let mut sessions_given = false;
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            // Both `--name value` and `--name=value`.
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (arg.as_str(), None),
            };
            let mut value =
                || inline.clone().or_else(|| it.next().cloned()).ok_or(format!("{name} needs a value"));
            match name {
                "--sessions" => {
                    options.sessions = value()?
                        .split(',')
                        .map(|s| s.trim().parse::<usize>().ok().filter(|&n| n > 0))
                        .collect::<Option<Vec<_>>>()
                        .ok_or("--sessions expects a comma-separated list of positive numbers")?;
                    sessions_given = true;
                }
                "--messages" => {
                    let m = value()?.parse::<u32>().ok().filter(|&m| m > 0);
                    options.messages = Some(m.ok_or("--messages expects a positive number")?);
                }
                "--rate" => {
                    let r = value()?.parse::<f64>().ok().filter(|r| r.is_finite() && *r >= 0.0);
                    options.rate = Some(r.ok_or("--rate expects messages per second (0: unpaced)")?);
                }
                "--burst" => {
                    let b = value()?.parse::<u32>().ok().filter(|&b| b <= BURST_MAX);
                    options.burst = Some(b.ok_or(format!("--burst expects a number from 0 to {BURST_MAX}"))?);
                }
                "--mode" => {
                    let mode = value()?;
                    let mode = Mode::ALL.into_iter().find(|m| m.accepts(&mode));
                    options.mode = Some(mode.ok_or("--mode expects session or process")?);
                }
                "--n" => {
                    let n = value()?.parse::<usize>().ok().filter(|&n| n > 0);
                    options.sessions = vec![n.ok_or("--n expects a positive number")?];
                    sessions_given = true;
                }
                "--via" => {
                    let via = value()?;
                    let via = Via::ALL.into_iter().find(|v| v.name() == via);
                    options.via = Some(via.ok_or("--via expects amqp or http")?);
                }
                "--quick" => options.kind = Kind::Quick,
                "--callgrind" => options.kind = Kind::Callgrind,
                "--write" => options.write = true,
                "--raw-only" => options.raw_only = true,
                "--help" | "-h" => return Err(String::new()),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if options.kind != Kind::Full {
            if args.iter().any(|a| a == "--quick") && args.iter().any(|a| a == "--callgrind") {
                return Err("--quick or --callgrind, not both".into());
            }
            if options.write || options.raw_only {
                return Err("--quick and --callgrind leave BENCHMARKS.md alone and run the app".into());
            }
            if !sessions_given {
                options.sessions = vec![QUICK_SESSIONS];
            }
            if options.sessions.len() != 1 {
                return Err("--quick and --callgrind run one N: --n N".into());
            }
            // One app start: the mode asked for, or the default one.
            options.mode = Some(options.mode.unwrap_or(Mode::Session));
        } else if options.via.is_some() {
            return Err("--via is for --quick and --callgrind; a full run uses both publishers".into());
        }
        Ok(options)
    }

    /// The app's publishers, in this order: both in a full run, one in a quick run.
    pub fn vias(&self) -> Vec<Via> {
        match (self.kind, self.via) {
            (Kind::Full, _) => Via::ALL.to_vec(),
            (_, via) => vec![via.unwrap_or(Via::Amqp)],
        }
    }

    /// How long to wait for the broker and the machine to calm down before each part.
    pub fn settle_limit(&self) -> Duration {
        match self.kind {
            Kind::Full => Duration::from_secs(20),
            Kind::Quick | Kind::Callgrind => Duration::from_secs(8),
        }
    }

    /// The fan-out modes to start the app in, in this order.
    pub fn modes(&self) -> Vec<Mode> {
        match self.mode {
            _ if self.raw_only => Vec::new(),
            Some(mode) => vec![mode],
            None => Mode::ALL.to_vec(),
        }
    }

    pub fn modes_label(&self) -> String {
        match self.mode {
            _ if self.raw_only => "none (raw only)".into(),
            Some(mode) => format!("{} only", mode.name()),
            None => "both: session, then process".into(),
        }
    }

    pub fn command_line(&self) -> String {
        let mut line = "cargo bench --bench fanout".to_owned();
        if !self.args.is_empty() {
            line.push_str(" -- ");
            line.push_str(&self.args.join(" "));
        }
        line
    }

    /// Full runs write BENCHMARKS.md; raw-only runs only when told to; quick and callgrind
    /// runs never.
    pub fn writes_report(&self) -> bool {
        self.kind == Kind::Full && (self.write || !self.raw_only)
    }
}
