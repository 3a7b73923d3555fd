//! Per-stream tracking shared by the body wrapper and the drain task: scans
//! the bytes, finds the terminal event and records the end of the stream.

use std::{
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use tokio::time::Instant;

use bytes::Bytes;
use http_body::Body;

use crate::{
    config::worth_logging,
    layer::Shared,
    log::LogWriter,
    parser::EventStreamParser,
    registry::LiveEntry,
    store::LogEntry,
    store::{CompleteResult, Completion},
    terminal::{Outcome, TRUNCATED_REASON, truncated_terminal_event},
};

/// Id of the synthetic terminal events the layer and the guardian record.
pub(crate) const SYNTHETIC_EVENT_ID: &str = "_end";

/// Reason of a failure the layer records on a stream's behalf.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum FailureReason {
    BodyError,
    NoTerminalEvent,
    ClientDisconnected,
    DrainTimeout,
    MaxLifetimeExceeded,
    IdleTimeout,
    Shutdown,
}

impl FailureReason {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            FailureReason::BodyError => "body_error",
            FailureReason::NoTerminalEvent => "no_terminal_event",
            FailureReason::ClientDisconnected => "client_disconnected",
            FailureReason::DrainTimeout => "drain_timeout",
            FailureReason::MaxLifetimeExceeded => "max_lifetime_exceeded",
            FailureReason::IdleTimeout => "idle_timeout",
            FailureReason::Shutdown => "shutdown",
        }
    }
}

/// Scanning and recording state of one claimed stream.
pub(crate) struct Tracker {
    shared: Arc<Shared>,
    entry: Option<LiveEntry>,
    parser: EventStreamParser,
    log: Option<LogState>,
    /// When the last event was dispatched, or the stream started.
    last_event_at: Instant,
}

/// Event log state of one stream.
struct LogState {
    writer: Arc<LogWriter>,
    id: Arc<str>,
    claim: Arc<str>,
    /// Number of events dispatched so far: the sequence number of the last one.
    seq: u64,
    assign_ids: bool,
}

/// An `id:` line the body inserts into the current chunk.
pub(crate) struct Insertion {
    /// Offset in the chunk where the line goes: the start of an event's empty line.
    pub offset: usize,
    pub line: Bytes,
}

impl Tracker {
    /// Creates the tracker of a claimed stream, or with `entry` `None` of a
    /// stream served untracked (Redis was unavailable): it then only finds
    /// event boundaries for heartbeats and records nothing.
    pub(crate) fn new(shared: Arc<Shared>, entry: Option<LiveEntry>) -> Self {
        let parser = EventStreamParser::new(shared.config.max_event_bytes);
        let log = match (&shared.log, &entry, &shared.config.event_log) {
            (Some(writer), Some(entry), Some(settings)) => Some(LogState {
                writer: writer.clone(),
                id: entry.id().clone(),
                claim: entry.claim().clone(),
                seq: 0,
                assign_ids: settings.assign_ids,
            }),
            _ => None,
        };
        if entry.is_some() {
            crate::metrics::stream_opened();
        }
        Self {
            shared,
            entry,
            parser,
            log,
            last_event_at: Instant::now(),
        }
    }

    /// Returns true once the end of the stream was handed to the recorder.
    pub(crate) fn is_finished(&self) -> bool {
        self.entry.is_none()
    }

    pub(crate) fn is_at_event_boundary(&self) -> bool {
        self.parser.is_at_event_boundary()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Returns when the stream's idle timeout runs out: its setting after the
    /// last dispatched event (or the start), `None` when it is off.
    pub(crate) fn idle_deadline(&self) -> Option<Instant> {
        let timeout = self.shared.config.idle_timeout?;
        self.last_event_at.checked_add(timeout)
    }

    /// Scans a chunk the inner body sent: logs its events, records the first
    /// terminal event, and returns the `id:` lines to insert when the layer
    /// assigns ids (empty otherwise).
    pub(crate) fn observe(&mut self, chunk: &Bytes) -> Vec<Insertion> {
        let rule = &self.shared.config.terminal_rule;
        let look_for_terminal = self.entry.is_some();
        let mut terminal = None;
        let mut insertions = Vec::new();
        let mut logged = Vec::new();
        let log = &mut self.log;
        let stream_id = self.entry.as_ref().map(|e| &**e.id()).unwrap_or_default();
        let mut dispatched = false;

        self.parser.feed(chunk, |event| {
            dispatched = true;
            let outcome = if look_for_terminal && terminal.is_none() {
                rule.classify(event)
            } else {
                None
            };
            let mut bytes = None;
            // The id is copied only for the log or a terminal event: most
            // events need neither, and the copy is an allocation.
            let mut event_id = if log.is_some() || outcome.is_some() {
                event.id().map(Arc::<str>::from)
            } else {
                None
            };

            if let Some(log) = log.as_mut() {
                log.seq += 1;
                if log.assign_ids && event_id.is_none() {
                    let line = Bytes::from(format!("id: {}\n", log.seq));
                    let raw = event.raw();
                    let split = raw.len().saturating_sub(event.empty_line().len());
                    let mut with_id = Vec::with_capacity(raw.len() + line.len());
                    with_id.extend_from_slice(&raw[..split]);
                    with_id.extend_from_slice(&line);
                    with_id.extend_from_slice(&raw[split..]);
                    insertions.push(Insertion {
                        offset: event.empty_line().start,
                        line,
                    });
                    event_id = Some(log.seq.to_string().into());
                    bytes = Some(Bytes::from(with_id));
                }
                if event.is_truncated()
                    && let Some(outcome) = outcome
                {
                    bytes = Some(truncated_terminal_event(
                        event.event_type(),
                        event_id.as_deref(),
                        outcome,
                        stream_id,
                    ));
                }
                let bytes = bytes.get_or_insert_with(|| bytes_of(chunk, event.raw()));
                // A truncated event would corrupt a replay: it is left out, and
                // followers see a gap in the sequence instead. A truncated
                // terminal event is logged as its replacement.
                if !event.is_truncated() || outcome.is_some() {
                    logged.push(LogEntry {
                        seq: log.seq,
                        event_id: event_id.clone(),
                        event: bytes.clone(),
                        terminal: outcome.is_some(),
                    });
                }
            }

            if let Some(outcome) = outcome {
                let bytes = match bytes {
                    Some(bytes) => bytes,
                    None if event.is_truncated() => truncated_terminal_event(
                        event.event_type(),
                        event_id.as_deref(),
                        outcome,
                        stream_id,
                    ),
                    None => bytes_of(chunk, event.raw()),
                };
                terminal = Some((outcome, bytes, event_id, event.is_truncated()));
            }
        });
        // The clock is read only when an idle timeout needs it.
        if dispatched && self.shared.config.idle_timeout.is_some() {
            self.last_event_at = Instant::now();
        }

        if let Some(log) = &self.log {
            for entry in logged {
                log.writer.push(&log.id, &log.claim, entry);
            }
        }

        if let Some((outcome, event, event_id, truncated)) = terminal {
            if truncated {
                tracing::warn!(
                    stream_id = %self.stream_id(),
                    limit = self.shared.config.max_event_bytes,
                    "terminal event is larger than max_event_bytes; it is recorded as truncated"
                );
            }
            self.record(
                outcome,
                event,
                event_id.map(|id| id.to_string()),
                truncated.then_some(TRUNCATED_REASON),
                truncated,
            );
        }
        insertions
    }

    /// Records a failure on the stream's behalf, unless its end is already recorded.
    pub(crate) fn fail(&mut self, reason: FailureReason) {
        if self.entry.is_none() {
            return;
        }
        if reason == FailureReason::Shutdown {
            self.shared.shutdown.failed.fetch_add(1, Ordering::SeqCst);
        }
        let event = synthetic_event("failed", reason.as_str(), self.stream_id());
        self.record(
            Outcome::Failed,
            event,
            Some(SYNTHETIC_EVENT_ID.to_owned()),
            Some(reason.as_str()),
            false,
        );
    }

    pub(crate) fn stream_id(&self) -> &str {
        self.entry.as_ref().map(|e| &**e.id()).unwrap_or_default()
    }

    fn record(
        &mut self,
        outcome: Outcome,
        event: Bytes,
        event_id: Option<String>,
        reason: Option<&'static str>,
        truncated: bool,
    ) {
        let Some(entry) = self.entry.take() else {
            return;
        };
        crate::metrics::stream_ended(outcome, reason);
        let completion = Completion {
            id: entry.id().clone(),
            claim: entry.claim().clone(),
            outcome,
            event,
            event_id,
            reason,
            truncated,
            ttl: self.shared.config.completion_ttl,
            log_seq: self.log.as_ref().map_or(0, |log| log.seq),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(write_completion(self.shared.clone(), completion, entry));
            }
            Err(_) => tracing::error!(
                stream_id = %completion.id,
                outcome = %completion.outcome,
                "no tokio runtime to record the end of the stream; it is left to the guardian"
            ),
        }
    }
}

/// Returns `part` as `Bytes`: a slice of `chunk` when it lies inside it, else a copy.
fn bytes_of(chunk: &Bytes, part: &[u8]) -> Bytes {
    let start = chunk.as_ptr() as usize;
    let part_start = part.as_ptr() as usize;
    if part_start >= start && part_start + part.len() <= start + chunk.len() && !part.is_empty() {
        chunk.slice_ref(part)
    } else {
        Bytes::copy_from_slice(part)
    }
}

/// Builds a synthetic terminal event: `event: <type>`, `id: _end`, and JSON
/// data `{"type":<type>,"reason":<reason>,"stream_id":<id>}`.
pub(crate) fn synthetic_event(event_type: &str, reason: &str, stream_id: &str) -> Bytes {
    let data = serde_json::json!({
        "type": event_type,
        "reason": reason,
        "stream_id": stream_id,
    });
    Bytes::from(format!(
        "event: {event_type}\nid: {SYNTHETIC_EVENT_ID}\ndata: {data}\n\n"
    ))
}

/// Wait before the second attempt of a completion write; it doubles after each failure.
const COMPLETION_FIRST_BACKOFF: Duration = Duration::from_millis(50);
const COMPLETION_MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Decrements the count of pending completions when a write ends.
struct PendingCompletion(Arc<Shared>);

impl Drop for PendingCompletion {
    fn drop(&mut self) {
        self.0.pending_completions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Writes a completion, retrying failures within the retry window, then
/// leaves the registry. The stream stays in the registry, and so keeps being
/// refreshed, while its end waits for Redis.
async fn write_completion(shared: Arc<Shared>, completion: Completion, entry: LiveEntry) {
    let pending = shared.pending_completions.fetch_add(1, Ordering::SeqCst) + 1;
    let _pending = PendingCompletion(shared.clone());
    if pending > shared.config.max_pending_completions {
        tracing::error!(
            stream_id = %completion.id,
            pending,
            limit = shared.config.max_pending_completions,
            "too many stream ends wait for redis; this one is left to the guardian"
        );
        entry.finish(false);
        return;
    }

    if let Some(log) = &shared.log {
        log.flushed(&completion.id, shared.config.redis_timeout * 2)
            .await;
    }
    let give_up_at = Instant::now() + shared.config.completion_retry_window;
    let mut backoff = COMPLETION_FIRST_BACKOFF;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        match shared.store.complete(completion.clone()).await {
            Ok(CompleteResult::Recorded) => {
                tracing::info!(
                    stream_id = %completion.id,
                    outcome = %completion.outcome,
                    reason = completion.reason.unwrap_or(""),
                    attempts = attempt,
                    "stream finished"
                );
                entry.finish(true);
                return;
            }
            Ok(CompleteResult::AlreadyRecorded) => {
                tracing::debug!(stream_id = %completion.id, "end of stream was already recorded");
                entry.finish(true);
                return;
            }
            Ok(CompleteResult::Missing) => {
                // Redis lost the hash (a restart without persistence): write the
                // registry entry again, then the end.
                if let Err(error) = entry.registry().register_one(entry.record().clone()).await {
                    tracing::warn!(stream_id = %completion.id, %error, "writing the missing registry entry failed");
                }
                if Instant::now() + backoff >= give_up_at {
                    tracing::error!(stream_id = %completion.id, "the end of the stream could not be recorded");
                    entry.finish(false);
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(COMPLETION_MAX_BACKOFF);
            }
            Ok(CompleteResult::NotOurs) => {
                tracing::warn!(
                    stream_id = %completion.id,
                    outcome = %completion.outcome,
                    "end of stream not recorded: the stream expired or was claimed again in redis"
                );
                entry.finish(false);
                return;
            }
            Err(error) if Instant::now() + backoff < give_up_at => {
                if worth_logging(attempt) {
                    tracing::warn!(
                        stream_id = %completion.id,
                        attempt,
                        %error,
                        "recording the end of the stream failed; retrying"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(COMPLETION_MAX_BACKOFF);
            }
            Err(error) => {
                tracing::error!(
                    stream_id = %completion.id,
                    attempts = attempt,
                    %error,
                    "recording the end of the stream failed until the retry window ended; it is left to the guardian"
                );
                entry.finish(false);
                return;
            }
        }
    }
}

/// Reads the rest of a body whose client went away, for at most `timeout`
/// and never past the stream's `lifetime_deadline`, so that its terminal
/// event is still recorded.
pub(crate) fn spawn_drain<B>(
    body: Pin<Box<B>>,
    tracker: Tracker,
    timeout: Duration,
    lifetime_deadline: Instant,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(drain(body, tracker, timeout, lifetime_deadline));
        }
        Err(_) => {
            let mut tracker = tracker;
            tracker.fail(FailureReason::ClientDisconnected);
        }
    }
}

async fn drain<B>(
    mut body: Pin<Box<B>>,
    mut tracker: Tracker,
    timeout: Duration,
    lifetime_deadline: Instant,
) where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Display,
{
    let stream_id = tracker.stream_id().to_owned();
    tracing::info!(stream_id = %stream_id, timeout_ms = timeout.as_millis() as u64, "response closed before the stream ended (client gone or shutdown); draining the stream");

    let drain_deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or(lifetime_deadline);
    let (deadline, reason) = if lifetime_deadline < drain_deadline {
        (lifetime_deadline, FailureReason::MaxLifetimeExceeded)
    } else {
        (drain_deadline, FailureReason::DrainTimeout)
    };
    let forced = tracker.shared.shutdown.force.clone();
    while !tracker.is_finished() {
        let (wait_until, wait_reason) = match tracker.idle_deadline() {
            Some(idle) if idle < deadline => (idle, FailureReason::IdleTimeout),
            _ => (deadline, reason),
        };
        let next = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx));
        let result = tokio::select! {
            result = tokio::time::timeout_at(wait_until, next) => result,
            _ = forced.cancelled() => {
                tracing::warn!(stream_id = %stream_id, "shutdown grace period over before a terminal event");
                tracker.fail(FailureReason::Shutdown);
                break;
            }
        };
        match result {
            Ok(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    tracker.observe(data);
                }
                // A body that always has a frame ready never reaches the
                // time-out above, and frames without an event are no progress.
                let now = Instant::now();
                let overdue = if now >= deadline {
                    Some(reason)
                } else if tracker.idle_deadline().is_some_and(|idle| now >= idle) {
                    Some(FailureReason::IdleTimeout)
                } else {
                    None
                };
                if let Some(overdue) = overdue {
                    tracing::warn!(
                        stream_id = %stream_id,
                        reason = overdue.as_str(),
                        "drain stopped before a terminal event"
                    );
                    tracker.fail(overdue);
                }
            }
            Ok(Some(Err(error))) => {
                tracing::warn!(stream_id = %stream_id, %error, "inner body failed while draining");
                tracker.fail(FailureReason::BodyError);
            }
            Ok(None) => tracker.fail(FailureReason::NoTerminalEvent),
            Err(_) => {
                tracing::warn!(
                    stream_id = %stream_id,
                    reason = wait_reason.as_str(),
                    "drain stopped before a terminal event"
                );
                tracker.fail(wait_reason);
            }
        }
    }
    tracing::debug!(stream_id = %stream_id, "drain finished");
}
