//! The command line: which Ns, which modes, which overrides, and whether BENCHMARKS.md is
//! written.

use crate::plan::{BURST_MAX, Mode};

#[derive(Clone, Debug)]
pub struct Options {
    pub sessions: Vec<usize>,
    /// Override the per-N defaults of [`Plan::for_sessions`].
    pub messages: Option<u32>,
    pub rate: Option<f64>,
    pub burst: Option<u32>,
    pub quick: bool,
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
  --quick                       smoke run: N = 10,100, 200 messages per phase (the target
                                phase keeps its own count); BENCHMARKS.md untouched
  --write                       write BENCHMARKS.md even with --quick
  --raw-only                    only the broker's ceiling (no app); BENCHMARKS.md untouched
Any other run (--sessions, --messages... included) overwrites BENCHMARKS.md.";

impl Options {
    pub fn parse() -> Result<Self, String> {
        // Cargo passes `--bench` to a harness-less bench target; it means nothing here.
        let args: Vec<String> = std::env::args().skip(1).filter(|a| a != "--bench").collect();
        let mut options = Options {
            sessions: vec![10, 100, 1000, 5000],
            messages: None,
            rate: None,
            burst: None,
            quick: false,
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
                "--quick" => options.quick = true,
                "--write" => options.write = true,
                "--raw-only" => options.raw_only = true,
                "--help" | "-h" => return Err(String::new()),
                other => return Err(format!("unknown option {other:?}")),
            }
        }
        if options.quick && !sessions_given {
            options.sessions = vec![10, 100];
        }
        Ok(options)
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

    /// Full runs write BENCHMARKS.md; smoke and raw-only runs only when told to.
    pub fn writes_report(&self) -> bool {
        self.write || !(self.quick || self.raw_only)
    }
}
