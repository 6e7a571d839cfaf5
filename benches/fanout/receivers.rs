//! The bookkeeping every receiver shares, a WebSocket session of the app or a raw consumer:
//! latency from send to arrival, and per receiver the messages lost, duplicated and out of
//! order. How a receiver gets its frames is in `sessions.rs` (WebSocket) and `consumers.rs`
//! (AMQP).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    STEP_TIMEOUT,
    message::{envelope_text, parse_message_text},
};

/// What one receiver saw of the current phase.
#[derive(Default)]
pub struct Track {
    /// The phase's tag; frames of another phase are counted as stray.
    pub tag: u8,
    pub expected: u32,
    /// Publishing streams of the phase: message `seq` belongs to stream `seq % streams`.
    pub streams: u32,
    /// One bit per message of the phase.
    pub seen: Vec<u64>,
    /// Highest sequence number seen so far, per stream.
    pub highest: Vec<Option<u32>>,
    pub received: u32,
    pub duplicated: u32,
    pub reordered: u32,
    pub stray: u32,
    /// `gap` frames, and how many messages they said were dropped.
    pub gap_frames: u32,
    pub gap_missed: u64,
    /// Other typed frames (`interrupted`, `restored`, `error`...).
    pub other_frames: u32,
    pub latencies_us: Vec<u32>,
}

/// Counters shared by all receivers of a run.
#[derive(Default)]
pub struct Totals {
    /// Messages of the current phase delivered (first copies only).
    pub delivered: AtomicU64,
    /// Arrival time of the latest of those.
    pub last_ns: AtomicU64,
    /// Receivers whose connection ended while they should have been open.
    pub closed_early: AtomicU64,
}

pub struct Receiver {
    pub track: Mutex<Track>,
    pub totals: Arc<Totals>,
}

impl Receiver {
    pub fn new(totals: Arc<Totals>) -> Arc<Self> {
        Arc::new(Self { track: Mutex::new(Track::default()), totals })
    }

    /// One text frame (WebSocket) or message body (raw consumer), arrived at `arrived_ns`.
    pub fn on_frame(&self, frame: &str, arrived_ns: u64) {
        let mut t = self.track.lock().unwrap();
        let Some(text) = envelope_text(frame) else {
            // A typed frame: {"type":"gap","missed":N}, or a notice.
            if frame.contains("\"type\":\"gap\"") {
                t.gap_frames += 1;
                let missed = serde_json::from_str::<Value>(frame).ok().and_then(|v| v["missed"].as_u64());
                t.gap_missed += missed.unwrap_or(0);
            } else {
                t.other_frames += 1;
            }
            return;
        };
        let Some((tag, seq, sent_ns)) = parse_message_text(text) else {
            t.stray += 1;
            return;
        };
        if tag != t.tag || seq >= t.expected {
            t.stray += 1;
            return;
        }
        let (word, bit) = (seq as usize / 64, 1u64 << (seq % 64));
        if t.seen[word] & bit != 0 {
            t.duplicated += 1;
            return;
        }
        t.seen[word] |= bit;
        t.received += 1;
        let stream = (seq % t.streams) as usize;
        match t.highest[stream] {
            Some(highest) if seq < highest => t.reordered += 1,
            _ => t.highest[stream] = Some(seq),
        }
        let latency_us = arrived_ns.saturating_sub(sent_ns) / 1000;
        t.latencies_us.push(u32::try_from(latency_us).unwrap_or(u32::MAX));
        drop(t);
        self.totals.delivered.fetch_add(1, Relaxed);
        self.totals.last_ns.fetch_max(arrived_ns, Relaxed);
    }

    pub fn reset(&self, tag: u8, expected: u32, streams: u32) {
        let mut t = self.track.lock().unwrap();
        *t = Track {
            tag,
            expected,
            streams: streams.max(1),
            seen: vec![0; (expected as usize).div_ceil(64)],
            highest: vec![None; streams.max(1) as usize],
            latencies_us: Vec::with_capacity(expected as usize),
            ..Track::default()
        };
    }
}

/// Everything that receives in one run: the receivers and their shared counters.
pub struct Fleet {
    pub receivers: Vec<Arc<Receiver>>,
    pub totals: Arc<Totals>,
    pub tasks: Vec<JoinHandle<()>>,
    pub cancel: CancellationToken,
}

/// A receiver that opened, with its reader task, or why it did not.
pub type Opened = Result<(Arc<Receiver>, JoinHandle<()>), String>;

impl Fleet {
    /// The receivers that opened, and a count of each reason the others did not.
    pub fn gather(
        opened: Vec<Opened>,
        totals: Arc<Totals>,
        cancel: CancellationToken,
    ) -> (Self, BTreeMap<String, usize>) {
        let mut fleet = Fleet { receivers: Vec::new(), totals, tasks: Vec::new(), cancel };
        let mut errors = BTreeMap::new();
        for result in opened {
            match result {
                Ok((receiver, task)) => {
                    fleet.receivers.push(receiver);
                    fleet.tasks.push(task);
                }
                Err(e) => *errors.entry(e).or_insert(0) += 1,
            }
        }
        (fleet, errors)
    }

    /// Ends every receiver task (a WebSocket session sends its Close), bounded.
    pub async fn close(self) {
        self.cancel.cancel();
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(STEP_TIMEOUT, all).await.is_err() {
            eprintln!("  warning: some receivers did not finish closing within {STEP_TIMEOUT:?}");
        }
    }
}
