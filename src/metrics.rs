//! Counters and a gauge of the layer and the guardian, recorded through the
//! `metrics` facade: they go to whichever recorder the app installed, and
//! cost next to nothing when it installed none.

use metrics::{Unit, counter, describe_counter, describe_gauge, gauge};

use crate::terminal::Outcome;

/// Streams claimed by a layer of this process whose response is an event stream.
pub const STREAMS_OPENED: &str = "sse_resilience_streams_opened_total";
/// Streams this process is serving now.
pub const STREAMS_LIVE: &str = "sse_resilience_streams_live";
/// Streams whose end a layer of this process found to be `completed`.
pub const STREAMS_COMPLETED: &str = "sse_resilience_streams_completed_total";
/// Streams whose end a layer of this process found to be `failed`, by reason.
pub const STREAMS_FAILED: &str = "sse_resilience_streams_failed_total";
/// Streams the guardians of this process marked orphaned.
pub const STREAMS_ORPHANED: &str = "sse_resilience_streams_orphaned_total";
/// Terminal events replayed to returning clients.
pub const REPLAYS_SERVED: &str = "sse_resilience_replays_served_total";
/// Heartbeat comments sent.
pub const HEARTBEATS_SENT: &str = "sse_resilience_heartbeats_sent_total";
/// Store calls that failed or timed out, by operation.
pub const REDIS_ERRORS: &str = "sse_resilience_redis_errors_total";

/// Value of the `reason` label of [`STREAMS_FAILED`] when the service itself
/// sent the failed terminal event.
const REASON_TERMINAL_EVENT: &str = "terminal_event";

/// Registers the description and unit of every metric of the crate with the
/// installed recorder.
///
/// Layers call it when they start serving and guardians when they start
/// running. Call it again after installing a recorder later than that, so
/// that the recorder has the descriptions too (Prometheus `# HELP` lines).
pub fn describe_metrics() {
    describe_counter!(
        STREAMS_OPENED,
        Unit::Count,
        "Streams claimed by this process whose response is an event stream"
    );
    describe_gauge!(
        STREAMS_LIVE,
        Unit::Count,
        "Streams this process is serving now, including drains after a client left"
    );
    describe_counter!(
        STREAMS_COMPLETED,
        Unit::Count,
        "Streams that ended with a completed terminal event"
    );
    describe_counter!(
        STREAMS_FAILED,
        Unit::Count,
        "Streams that ended as failed, by reason"
    );
    describe_counter!(
        STREAMS_ORPHANED,
        Unit::Count,
        "Streams the guardians of this process marked orphaned"
    );
    describe_counter!(
        REPLAYS_SERVED,
        Unit::Count,
        "Terminal events replayed to returning clients"
    );
    describe_counter!(HEARTBEATS_SENT, Unit::Count, "Heartbeat comments sent");
    describe_counter!(
        REDIS_ERRORS,
        Unit::Count,
        "Store calls that failed or timed out, by operation"
    );
}

pub(crate) fn stream_opened() {
    counter!(STREAMS_OPENED).increment(1);
}

/// Adds `delta` (1 or -1) to the live streams gauge.
pub(crate) fn live_changed(delta: f64) {
    gauge!(STREAMS_LIVE).increment(delta);
}

/// Counts the end of a stream; `reason` is `None` when the service sent the
/// terminal event.
pub(crate) fn stream_ended(outcome: Outcome, reason: Option<&'static str>) {
    match outcome {
        Outcome::Completed => counter!(STREAMS_COMPLETED).increment(1),
        Outcome::Failed => {
            let reason = reason.unwrap_or(REASON_TERMINAL_EVENT);
            counter!(STREAMS_FAILED, "reason" => reason).increment(1);
        }
    }
}

pub(crate) fn streams_orphaned(count: usize) {
    if count > 0 {
        counter!(STREAMS_ORPHANED).increment(count as u64);
    }
}

pub(crate) fn replay_served() {
    counter!(REPLAYS_SERVED).increment(1);
}

pub(crate) fn heartbeat_sent() {
    counter!(HEARTBEATS_SENT).increment(1);
}

/// Counts a failed or timed-out store call; `operation` is the store method.
pub(crate) fn redis_error(operation: &'static str) {
    counter!(REDIS_ERRORS, "operation" => operation).increment(1);
}
