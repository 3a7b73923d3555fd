//! The event log: every event of a stream appended to a Redis Stream, so a
//! client can resume after its last event on any instance.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    config::{require_non_zero, worth_logging},
    store::{AppendBatch, LogEntry, LogLimits, Store},
};

/// Default maximum number of events kept in one stream's log.
pub const DEFAULT_LOG_MAX_EVENTS: usize = 10_000;
/// Default maximum bytes of events kept in one stream's log.
pub const DEFAULT_LOG_MAX_BYTES: usize = 16 * 1024 * 1024;
/// Default interval at which followers of a stream poll its log.
pub const DEFAULT_FOLLOW_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Default maximum bytes of log appends waiting for Redis, per layer.
pub const DEFAULT_LOG_MAX_PENDING_BYTES: usize = 64 * 1024 * 1024;

/// Settings of the event log, turned on with
/// [`SseResilienceLayer::event_log`](crate::SseResilienceLayer::event_log).
///
/// With the log on, each event a stream sends is appended to the Redis Stream
/// `{prefix}{<id>}:log`. A request with `Last-Event-ID` (or the query
/// parameter `last_event_id`) then gets the events after that id, from any
/// instance, and a request for a live stream follows it instead of getting 409.
///
/// # Example
///
/// ```
/// use sse_resilience::EventLog;
///
/// let log = EventLog::new().max_events(1_000).assign_ids(true);
/// # let _ = log;
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct EventLog {
    pub(crate) max_events: usize,
    pub(crate) max_bytes: usize,
    pub(crate) assign_ids: bool,
    pub(crate) follow_poll_interval: Duration,
    pub(crate) max_pending_bytes: usize,
}

impl EventLog {
    /// Creates the settings with their defaults.
    pub fn new() -> Self {
        Self {
            max_events: DEFAULT_LOG_MAX_EVENTS,
            max_bytes: DEFAULT_LOG_MAX_BYTES,
            assign_ids: false,
            follow_poll_interval: DEFAULT_FOLLOW_POLL_INTERVAL,
            max_pending_bytes: DEFAULT_LOG_MAX_PENDING_BYTES,
        }
    }

    /// Sets the maximum number of events kept per stream; older ones are
    /// trimmed. Default: 10,000. Zero is taken as 1.
    pub fn max_events(mut self, events: usize) -> Self {
        self.max_events = events.max(1);
        self
    }

    /// Sets the maximum bytes of events kept per stream; older ones are
    /// trimmed. Default: 16 MiB. Zero is taken as 1.
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// Gives every event that has no `id:` line of its own the id `<n>`, its
    /// 1-based position in the stream, inserted before its blank line. Off by
    /// default, since it changes the bytes the client receives; without ids a
    /// client cannot resume.
    pub fn assign_ids(mut self, assign: bool) -> Self {
        self.assign_ids = assign;
        self
    }

    /// Sets how often followers poll a stream's log for new events. Default:
    /// 100 ms. One pipeline per interval serves all followers of the layer.
    ///
    /// # Panics
    ///
    /// Panics when the interval is zero.
    pub fn follow_poll_interval(mut self, interval: Duration) -> Self {
        require_non_zero("follow_poll_interval", interval);
        self.follow_poll_interval = interval;
        self
    }

    /// Sets the maximum bytes of appends that wait for Redis, for all streams
    /// of the layer together. Default: 64 MiB. Events past it are not logged,
    /// and a client that resumes across them gets a gap event; zero logs
    /// nothing.
    pub fn max_pending_bytes(mut self, bytes: usize) -> Self {
        self.max_pending_bytes = bytes;
        self
    }
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new()
    }
}

/// Batches the log appends of every stream of a layer: one pipeline per flush,
/// with one script call per stream that has new events.
pub(crate) struct LogWriter {
    store: Arc<dyn Store>,
    limits: LogLimits,
    max_pending_bytes: usize,
    state: Mutex<WriterState>,
    wake: Arc<Notify>,
    idle: Notify,
}

#[derive(Default)]
struct WriterState {
    pending: HashMap<Arc<str>, AppendBatch>,
    pending_bytes: usize,
    in_flight: bool,
    running: bool,
    dropped_since_warning: u64,
    /// Append pipelines that failed in a row, to rate-limit their warnings.
    failures: u64,
}

/// Wait before a failed append is retried.
const APPEND_RETRY_DELAY: Duration = Duration::from_millis(200);

impl LogWriter {
    pub(crate) fn new(store: Arc<dyn Store>, settings: &EventLog, ttl: Duration) -> Self {
        Self {
            store,
            limits: LogLimits {
                max_events: settings.max_events,
                max_bytes: settings.max_bytes,
                ttl,
            },
            max_pending_bytes: settings.max_pending_bytes,
            state: Mutex::new(WriterState::default()),
            wake: Arc::new(Notify::new()),
            idle: Notify::new(),
        }
    }

    /// Queues one event of a stream. Never waits for Redis; returns false when
    /// the pending bytes are over their bound and the event was dropped.
    pub(crate) fn push(self: &Arc<Self>, id: &Arc<str>, claim: &Arc<str>, entry: LogEntry) -> bool {
        let start = {
            let mut state = self.lock();
            if state.pending_bytes + entry.event.len() > self.max_pending_bytes {
                state.dropped_since_warning += 1;
                if state.dropped_since_warning == 1
                    || state.dropped_since_warning.is_multiple_of(1000)
                {
                    tracing::warn!(
                        stream_id = %id,
                        dropped = state.dropped_since_warning,
                        "event log appends are over their pending bound; events are not logged"
                    );
                }
                return false;
            }
            state.pending_bytes += entry.event.len();
            state
                .pending
                .entry(id.clone())
                .or_insert_with(|| AppendBatch {
                    id: id.clone(),
                    claim: claim.clone(),
                    entries: Vec::new(),
                })
                .entries
                .push(entry);
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            tokio::spawn(write_loop(Arc::downgrade(self), self.wake.clone()));
        }
        self.wake.notify_one();
        true
    }

    /// Waits until the queued appends of stream `id` were sent, or `timeout`
    /// passed. The end of a stream is recorded after this, so a follower that
    /// reads the end has already read every logged event.
    pub(crate) async fn flushed(&self, id: &str, timeout: Duration) {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                {
                    let state = self.lock();
                    if !state.pending.contains_key(id) && !state.in_flight {
                        return;
                    }
                }
                self.wake.notify_one();
                idle.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    /// Waits until every queued append was sent, or `timeout` passed.
    pub(crate) async fn drain(&self, timeout: Duration) {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                {
                    let state = self.lock();
                    if state.pending.is_empty() && !state.in_flight {
                        return;
                    }
                }
                self.wake.notify_one();
                idle.await;
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WriterState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends everything queued in one pipeline; failed batches go back to the front.
    async fn flush(&self) {
        let batches: Vec<AppendBatch> = {
            let mut state = self.lock();
            state.in_flight = true;
            state.pending.drain().map(|(_, batch)| batch).collect()
        };
        if batches.is_empty() {
            self.finish_flush(0);
            return;
        }
        let bytes: usize = batches
            .iter()
            .flat_map(|b| b.entries.iter())
            .map(|e| e.event.len())
            .sum();

        match self.store.append(batches.clone(), self.limits).await {
            Ok(results) => {
                let failed_before = std::mem::take(&mut self.lock().failures);
                if failed_before > 0 {
                    tracing::info!(failed_before, "appending to event logs works again");
                }
                for (batch, added) in batches.iter().zip(results) {
                    if added < 0 {
                        tracing::debug!(stream_id = %batch.id, "log append skipped: the stream is no longer held by this claim");
                    }
                }
                self.finish_flush(bytes);
            }
            Err(error) => {
                {
                    let mut state = self.lock();
                    state.failures += 1;
                    if worth_logging(state.failures) {
                        tracing::warn!(
                            %error,
                            streams = batches.len(),
                            repeat = state.failures,
                            "appending to event logs failed; retrying"
                        );
                    }
                    for mut batch in batches {
                        if let Some(newer) = state.pending.remove(&batch.id) {
                            batch.entries.extend(newer.entries);
                        }
                        state.pending.insert(batch.id.clone(), batch);
                    }
                    state.in_flight = false;
                }
                tokio::time::sleep(APPEND_RETRY_DELAY).await;
                self.wake.notify_one();
            }
        }
    }

    fn finish_flush(&self, sent_bytes: usize) {
        let mut state = self.lock();
        state.pending_bytes = state.pending_bytes.saturating_sub(sent_bytes);
        state.in_flight = false;
        if state.pending.is_empty() {
            state.dropped_since_warning = 0;
        }
        // Waiters check their own condition: a stream's appends may be done
        // while others are still queued.
        self.idle.notify_waiters();
    }
}

/// Clears the running flag when the writer task ends, also when its runtime
/// shuts down, so the next append starts a new task.
struct RunningFlag(Weak<LogWriter>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        if let Some(writer) = self.0.upgrade() {
            writer.lock().running = false;
        }
    }
}

async fn write_loop(writer: Weak<LogWriter>, wake: Arc<Notify>) {
    let _flag = RunningFlag(writer.clone());
    loop {
        // The time-out lets the task notice that its layer was dropped.
        let _ = tokio::time::timeout(Duration::from_secs(30), wake.notified()).await;
        let Some(writer) = writer.upgrade() else {
            break;
        };
        writer.flush().await;
    }
}
