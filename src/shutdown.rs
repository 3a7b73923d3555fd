//! Graceful shutdown: refuse new streams, send live clients elsewhere, and
//! leave no stream active in Redis.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::layer::Shared;

/// Shutdown state shared by a layer's services and bodies.
#[derive(Debug, Default)]
pub(crate) struct ShutdownSignal {
    /// Cancelled when the shutdown starts: new streams get 503 and live
    /// responses end at their next event boundary.
    pub begin: CancellationToken,
    /// Cancelled when the grace period is over: drains stop and their streams
    /// are recorded as failed with reason `shutdown`.
    pub force: CancellationToken,
    /// Set with `begin`, for a cheap check on every frame.
    pub begun: AtomicBool,
    /// Streams recorded as failed with reason `shutdown`.
    pub failed: AtomicUsize,
}

/// A handle that shuts a layer down gracefully, from
/// [`SseResilienceLayer::shutdown_handle`](crate::SseResilienceLayer::shutdown_handle).
///
/// # Example
///
/// ```no_run
/// # async fn run(layer: sse_resilience::SseResilienceLayer) {
/// use std::time::Duration;
///
/// let handle = layer.shutdown_handle();
/// // ... serve with `layer`, then on SIGTERM:
/// let report = handle.shutdown(Duration::from_secs(10)).await;
/// tracing::info!(?report, "streams handed over");
/// # }
/// ```
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

/// Summary of a graceful shutdown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Streams this layer was producing when the shutdown started. Followers
    /// (responses served from an event log) are not counted; they get the
    /// retry hint and end at once.
    pub live_at_start: usize,
    /// Of those, streams that ended on their own during the grace period:
    /// with a terminal event, with an error of their own, or with their claim
    /// released because no event-stream response came (the inner service
    /// returned another content type, or its request was dropped).
    pub finished: usize,
    /// Streams the layer ended as failed with reason `shutdown` after the grace
    /// period. Their records are written with retries; see `unrecorded`.
    pub failed: usize,
    /// Streams whose end had not reached Redis when the shutdown returned
    /// (Redis down or slow). Guardians mark them orphaned later.
    pub unrecorded: usize,
}

/// Extra time after the grace period for the last records to reach Redis.
const RECORD_WAIT: Duration = Duration::from_secs(5);
/// Interval at which the shutdown checks whether the live streams are gone.
const CHECK_INTERVAL: Duration = Duration::from_millis(10);

impl ShutdownHandle {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Returns true once a shutdown started.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.begin.is_cancelled()
    }

    /// Shuts the layer down and returns when no stream of it is live, or when
    /// the waits below run out.
    ///
    /// From the call on, new stream requests get 503 with `Retry-After`. Every
    /// live response gets a `retry:` hint at its next event boundary and ends,
    /// so its client reconnects, ideally to another instance, which can resume
    /// it from the event log. The inner bodies keep being read for up to
    /// `grace`, and those still unfinished then are recorded as failed with
    /// reason `shutdown`. The method then waits up to 5 s more for those
    /// records and up to 5 s more for pending log appends to reach Redis, so
    /// it returns at most `grace` plus 10 s after the call. Streams whose end
    /// has not reached Redis by then are counted in
    /// [`ShutdownReport::unrecorded`].
    pub async fn shutdown(&self, grace: Duration) -> ShutdownReport {
        let shared = &self.shared;
        let live_at_start = shared.registry.live_count();
        tracing::info!(
            live_streams = live_at_start,
            grace_ms = grace.as_millis() as u64,
            "shutting down: new streams are refused"
        );
        shared.shutdown.begun.store(true, Ordering::SeqCst);
        shared.shutdown.begin.cancel();

        let grace_over = Instant::now() + grace;
        wait_until_no_live_stream(shared, grace_over).await;
        shared.shutdown.force.cancel();
        wait_until_no_live_stream(shared, Instant::now() + RECORD_WAIT).await;
        if let Some(log) = &shared.log {
            log.drain(RECORD_WAIT).await;
        }
        shared.registry.flush_index().await;

        let failed = shared.shutdown.failed.load(Ordering::SeqCst);
        let still_live = shared.registry.live_count();
        if still_live > 0 {
            tracing::warn!(
                streams = still_live,
                "shutdown finished with streams whose end did not reach redis; guardians will mark them"
            );
        }
        let report = ShutdownReport {
            live_at_start,
            finished: live_at_start.saturating_sub(failed),
            failed,
            unrecorded: still_live,
        };
        tracing::info!(?report, "shutdown finished");
        report
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("shutting_down", &self.is_shutting_down())
            .finish()
    }
}

async fn wait_until_no_live_stream(shared: &Shared, deadline: Instant) {
    while shared.registry.live_count() > 0 && Instant::now() < deadline {
        tokio::time::sleep(CHECK_INTERVAL).await;
    }
}
