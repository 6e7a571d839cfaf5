//! History read from the stream on demand: `GET /messages` pages older than the window, and
//! replays for sessions resuming from before the window. Reads are bounded (a few at once,
//! each with a wait), so a flood of requests for old history cannot pile up consumers.

use std::time::Duration;

use super::{RabbitBus, stream};
use crate::bus::{
    BusError, Frame,
    history::{self, Older},
    keep_newest_within,
};

/// How long a request for history waits for the window to be filled at start-up, before it is
/// answered 503.
pub const HISTORY_FILL_WAIT: Duration = Duration::from_secs(5);
/// Reads of the history stream on demand that may run at once, per process.
pub(super) const STREAM_READS: usize = 8;
/// Most bytes of messages from before the window that one resuming session is sent (the
/// newest of them; a gap notice says more were missed).
pub(super) const REPLAY_MAX_BYTES: usize = 256 * 1024;
const REPLAY_MAX_KIB: u32 = (REPLAY_MAX_BYTES / 1024) as u32;
/// The process-wide budget of such replays not yet sent, in KiB (32 MiB: 128 sessions at once).
pub(super) const REPLAY_BUDGET_KIB: usize = 32 * 1024;
/// How long a read of the stream waits for its turn before it is answered 503.
const STREAM_READ_WAIT: Duration = Duration::from_secs(2);

impl RabbitBus {
    /// See [`super::Bus::history_page`]: the window first, the stream for what is older.
    pub async fn history_page(
        &self,
        limit: usize,
        before: Option<&str>,
        max_bytes: usize,
    ) -> Result<(Vec<Frame>, bool), BusError> {
        let history = &self.0.history;
        if history.capacity() == 0 {
            return Ok((Vec::new(), false));
        }
        self.history_filled(HISTORY_FILL_WAIT).await?;
        // Where the stream must be read from (exclusive end), and what the window gave.
        let (newer, read_before) = match history.page(limit, before) {
            Some(page) if page.entries.len() >= limit || page.more_in_window => {
                let mut frames = page.entries.into_iter().map(|e| e.frame).collect();
                keep_newest_within(&mut frames, max_bytes);
                return Ok((frames, true));
            }
            Some(page) => {
                let oldest = page.entries.first().cloned().or_else(|| history.oldest());
                let before = oldest.and_then(|e| e.offset);
                (page.entries, before)
            }
            None => {
                // Older than the window, or unknown.
                let Some(id) = before else { return Ok((Vec::new(), false)) };
                let Some(until) = history.oldest().and_then(|e| e.offset) else {
                    return Ok((Vec::new(), false));
                };
                let _reading = self.stream_read().await?;
                let link = self.current_link()?;
                let stream = &self.0.config.history.name;
                let located = stream::locate(&link.connections[1], stream, self.0.max_frame_bytes, id, until)
                    .await
                    .map_err(BusError::Broker)?;
                (Vec::new(), located)
            }
        };
        let mut frames = Vec::with_capacity(limit);
        let mut more = false;
        let newer_bytes: usize = newer.iter().map(|e| e.frame.text().len()).sum();
        if newer_bytes >= max_bytes {
            // The window's part fills the page: what is older waits for the next one.
            let mut newer = newer.into_iter().map(|e| e.frame).collect();
            keep_newest_within(&mut newer, max_bytes);
            return Ok((newer, true));
        }
        if let Some(offset) = read_before {
            match self.read_older(offset, limit - newer.len(), max_bytes - newer_bytes).await {
                Ok((older, older_exist, left_out)) => {
                    more = older_exist || left_out;
                    frames.extend(older.into_iter().map(|e| e.frame));
                }
                // The window's part is still worth having (the stream can be without a leader
                // for a few seconds, while the cluster elects one): what is older may come with
                // the next page.
                Err(e) if !newer.is_empty() => {
                    tracing::warn!(error = %e, "cannot read older history from the stream; answering the window's part");
                    more = true;
                }
                Err(e) => return Err(e),
            }
        }
        frames.extend(newer.into_iter().map(|e| e.frame));
        Ok((frames, more))
    }

    /// Up to `wanted` messages before the stream offset `before`, at most `budget` bytes; see
    /// [`stream::read_before`].
    async fn read_older(
        &self,
        before: u64,
        wanted: usize,
        budget: usize,
    ) -> Result<(Vec<history::NewEntry>, bool, bool), BusError> {
        let _reading = self.stream_read().await?;
        let link = self.current_link()?;
        let stream = &self.0.config.history.name;
        stream::read_before(&link.connections[1], stream, self.0.max_frame_bytes, before, wanted, budget)
            .await
            .map_err(BusError::Broker)
    }

    /// Waits (at most `bound`) until the window holds the stream's end as it was at start-up:
    /// before that, history looks shorter than it is, and a resuming session would be told of
    /// a gap that does not exist.
    pub async fn history_filled(&self, bound: Duration) -> Result<(), BusError> {
        let mut filled = self.0.history_filled.subscribe();
        match tokio::time::timeout(bound, filled.wait_for(|filled| *filled)).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(BusError::Unavailable("the history is still loading from the broker".into())),
        }
    }

    /// A place among the [`STREAM_READS`] reads of the stream allowed at once.
    async fn stream_read(&self) -> Result<tokio::sync::SemaphorePermit<'_>, BusError> {
        match tokio::time::timeout(STREAM_READ_WAIT, self.0.stream_reads.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(BusError::Unavailable("too many reads of the history stream at once".into())),
        }
    }

    /// For a session resuming after `since`, which is older than the window: the messages
    /// after it up to the window, read from the stream (at most a window's worth: a browser
    /// away for longer gets the newest part, and a gap notice), and where the window part
    /// starts. The start as it was when the stream cannot help.
    ///
    /// At most [`REPLAY_MAX_BYTES`] of them (the newest), and only while the process's replay
    /// budget has room: what a session has not yet been sent is held in memory.
    pub async fn replay_before_window(&self, since: &str, start: history::Start) -> (Older, history::Start) {
        let history = &self.0.history;
        let none = || Older::default();
        let Some(window_start) = history.oldest().and_then(|e| e.offset) else { return (none(), start) };
        let Ok(link) = self.current_link() else { return (none(), start) };
        let Ok(mut budget) = self.0.replay_budget.clone().try_acquire_many_owned(REPLAY_MAX_KIB) else {
            tracing::debug!("the replay budget is spent; a resuming session replays the window only");
            return (none(), start);
        };
        let Ok(_reading) = self.stream_read().await else {
            tracing::warn!("too many history reads at once; a resuming session replays the window only");
            return (none(), start);
        };
        let stream = &self.0.config.history.name;
        let max = self.0.max_frame_bytes;
        let located = match stream::locate(&link.connections[1], stream, max, since, window_start).await {
            Ok(Some(offset)) if offset < window_start => offset,
            Ok(_) => return (none(), start),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the history stream for a resuming session");
                return (none(), start);
            }
        };
        let missed = window_start - located - 1;
        let wanted = usize::try_from(missed).unwrap_or(usize::MAX).min(history.capacity());
        match stream::read_before(&link.connections[1], stream, max, window_start, wanted, REPLAY_MAX_BYTES)
            .await
        {
            Ok((entries, _, left_out)) => {
                let gap = (missed > wanted as u64 || left_out).then_some(
                    "more messages were missed than are replayed; replay starts with the most recent of them",
                );
                let held_kib: usize =
                    entries.iter().map(|e| e.frame.text().len()).sum::<usize>().div_ceil(1024);
                drop(budget.split((REPLAY_MAX_KIB as usize).saturating_sub(held_kib)));
                (Older { entries, budget: Some(budget) }, history::Start { seq: start.seq, gap })
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the history stream for a resuming session");
                (none(), start)
            }
        }
    }
}
