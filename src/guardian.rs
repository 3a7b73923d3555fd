//! The guardian: marks streams whose process stopped refreshing them as orphaned.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use redis::aio::ConnectionLike;
use tokio_util::sync::CancellationToken;

use crate::{
    MemoryStore,
    config::{
        DEFAULT_COMPLETION_TTL, DEFAULT_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT, DEFAULT_STALE_THRESHOLD,
        require_non_zero, worth_logging,
    },
    metrics,
    store::{BoxFuture, Keys, OrphanResult, RedisStore, StaleCandidate, StoreError, now_ms},
    tracker::{SYNTHETIC_EVENT_ID, synthetic_event},
};

/// Default interval between two sweeps of a guardian.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Default number of stale candidates a sweep takes from each index shard.
pub const DEFAULT_SWEEP_BATCH: usize = 1000;
/// Default event type of the terminal event recorded for an orphaned stream.
pub const DEFAULT_ORPHAN_EVENT_TYPE: &str = "failed";

/// A background task that finds live streams whose last refresh is older
/// than the stale threshold, and marks each one orphaned.
///
/// Marking is atomic per stream, so any number of guardians, in any number of
/// processes, handle each orphan exactly once. An orphaned stream gets a
/// synthetic terminal event (type `failed` by default, JSON data with
/// `"reason":"orphaned"`), so a returning client gets a definite end instead
/// of a stream that never finishes.
///
/// # Example
///
/// ```no_run
/// # async fn run(redis: redis::aio::ConnectionManager) {
/// use sse_resilience::StreamGuardian;
/// use tokio_util::sync::CancellationToken;
///
/// let token = CancellationToken::new();
/// let guardian = tokio::spawn(StreamGuardian::new(redis).run_with_token(token.clone()));
/// // ... serve ...
/// token.cancel();
/// guardian.await.unwrap();
/// # }
/// ```
#[derive(Clone)]
pub struct StreamGuardian {
    settings: Settings,
    connect: Arc<ConnectSweepStore>,
    store: Arc<dyn SweepStore>,
}

#[derive(Clone, Debug)]
struct Settings {
    sweep_interval: Duration,
    stale_threshold: Duration,
    completion_ttl: Duration,
    key_prefix: Arc<str>,
    orphan_event_type: Arc<str>,
    batch: usize,
    redis_timeout: Duration,
}

/// Builds the store of a guardian for its settings (the key prefix and time-out).
type ConnectSweepStore = dyn Fn(&Settings) -> Arc<dyn SweepStore> + Send + Sync;

/// Summary of one sweep.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Ids of the streams this sweep marked orphaned.
    pub orphaned: Vec<String>,
    /// Index entries removed because their stream had already ended or expired.
    pub dangling_removed: usize,
    /// Stale-looking index entries whose stream turned out to be fresh.
    pub fresh: usize,
}

impl StreamGuardian {
    /// Creates a guardian on a Redis connection, usually a
    /// [`redis::aio::ConnectionManager`], or a
    /// [`ReconnectingCluster`](crate::ReconnectingCluster) (or a plain
    /// [`redis::cluster_async::ClusterConnection`]) for a Redis Cluster.
    pub fn new<C>(redis: C) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let connect = Arc::new(move |settings: &Settings| -> Arc<dyn SweepStore> {
            Arc::new(RedisStore::new(
                redis.clone(),
                Keys::new(settings.key_prefix.clone()),
                settings.redis_timeout,
            ))
        });
        Self::with_connect(connect)
    }

    /// Creates a guardian on a [`MemoryStore`]. Give it a clone of the store
    /// of the layers it guards. The key prefix does not apply to a memory
    /// store.
    pub fn with_memory_store(store: MemoryStore) -> Self {
        Self::with_connect(Arc::new(move |_: &Settings| -> Arc<dyn SweepStore> {
            Arc::new(store.clone())
        }))
    }

    fn with_connect(connect: Arc<ConnectSweepStore>) -> Self {
        let settings = Settings {
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            stale_threshold: DEFAULT_STALE_THRESHOLD,
            completion_ttl: DEFAULT_COMPLETION_TTL,
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            orphan_event_type: DEFAULT_ORPHAN_EVENT_TYPE.into(),
            batch: DEFAULT_SWEEP_BATCH,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
        };
        let store = connect(&settings);
        Self {
            settings,
            connect,
            store,
        }
    }

    /// Sets the interval between two sweeps. Default: 30 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        require_non_zero("sweep_interval", interval);
        self.settings.sweep_interval = interval;
        self
    }

    /// Sets the age of the last refresh after which a live stream is
    /// orphaned. Default: 30 s. Use the layer's value.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn stale_threshold(mut self, threshold: Duration) -> Self {
        require_non_zero("stale_threshold", threshold);
        self.settings.stale_threshold = threshold;
        self
    }

    /// Sets how long an orphaned stream's terminal event is kept for replay.
    /// Default: 5 minutes.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn completion_ttl(mut self, ttl: Duration) -> Self {
        require_non_zero("completion_ttl", ttl);
        self.settings.completion_ttl = ttl;
        self
    }

    /// Sets the key prefix. Default: `sse:`. Use the layer's value.
    ///
    /// # Panics
    ///
    /// Panics when `prefix` contains `{` or `}`.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        assert!(
            !prefix.contains(['{', '}']),
            "invalid key prefix {prefix:?}: it must not contain braces"
        );
        self.settings.key_prefix = prefix.into();
        self.reconnect()
    }

    /// Sets the event type of the terminal event recorded for an orphaned
    /// stream. Default: `failed`.
    ///
    /// # Panics
    ///
    /// Panics when `event_type` is empty or contains CR or LF.
    pub fn orphan_event_type(mut self, event_type: &str) -> Self {
        assert!(
            !event_type.is_empty() && !event_type.contains(['\r', '\n']),
            "invalid orphan event type {event_type:?}: it must be non-empty without CR or LF"
        );
        self.settings.orphan_event_type = event_type.into();
        self
    }

    /// Sets how many stale candidates one sweep takes from each of the
    /// index shards. Default: 1000. The rest wait for the next sweep.
    pub fn batch_size(mut self, batch: usize) -> Self {
        self.settings.batch = batch.max(1);
        self
    }

    /// Sets the time-out of one Redis round trip. Default: 2 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        require_non_zero("redis_timeout", timeout);
        self.settings.redis_timeout = timeout;
        self.reconnect()
    }

    fn reconnect(mut self) -> Self {
        self.store = (self.connect)(&self.settings);
        self
    }

    /// Runs one sweep: three round trips to Redis whatever the number of
    /// streams. On a cluster each round trip is one pipeline per master, sent
    /// at once, and the first sweep also loads the slot map.
    pub async fn sweep(&self) -> Result<SweepReport, StoreError> {
        let settings = &self.settings;
        let cutoff = now_ms().saturating_sub(settings.stale_threshold.as_millis() as u64);

        let candidates = self
            .store
            .stale_candidates(cutoff, settings.batch)
            .await
            .inspect_err(|_| metrics::redis_error("sweep"))?;
        if candidates.is_empty() {
            return Ok(SweepReport::default());
        }

        let events: Vec<Bytes> = candidates
            .iter()
            .map(|c| synthetic_event(&settings.orphan_event_type, "orphaned", &c.id))
            .collect();
        let results = self
            .store
            .mark_orphans(candidates.clone(), events, cutoff, settings.completion_ttl)
            .await
            .inspect_err(|_| metrics::redis_error("sweep"))?;

        let mut report = SweepReport::default();
        let mut unindex = Vec::new();
        for (candidate, result) in candidates.into_iter().zip(results) {
            match result {
                OrphanResult::Marked => {
                    tracing::warn!(stream_id = %candidate.id, "stream marked orphaned: its refreshes stopped");
                    report.orphaned.push(candidate.id.clone());
                    unindex.push(candidate);
                }
                OrphanResult::Dangling => {
                    tracing::debug!(stream_id = %candidate.id, "removing a dangling index entry");
                    report.dangling_removed += 1;
                    unindex.push(candidate);
                }
                OrphanResult::Fresh => report.fresh += 1,
            }
        }
        metrics::streams_orphaned(report.orphaned.len());
        self.store
            .remove_from_index(unindex)
            .await
            .inspect_err(|_| metrics::redis_error("sweep"))?;
        Ok(report)
    }

    /// Sweeps every sweep interval until `shutdown` completes.
    pub async fn run_until<F>(self, shutdown: F)
    where
        F: Future<Output = ()>,
    {
        let mut ticker = tokio::time::interval(self.settings.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        metrics::describe_metrics();
        tracing::info!(
            interval_ms = self.settings.sweep_interval.as_millis() as u64,
            stale_threshold_ms = self.settings.stale_threshold.as_millis() as u64,
            prefix = %self.settings.key_prefix,
            "guardian started"
        );

        // Failed sweeps in a row. While Redis is down only the 1st, 2nd, 4th,
        // 8th and so on are logged.
        let mut failures: u64 = 0;
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = ticker.tick() => {}
            }
            let sweep = self.sweep();
            let result = tokio::select! {
                _ = &mut shutdown => break,
                result = sweep => result,
            };
            match result {
                Ok(report) => {
                    if failures > 0 {
                        tracing::info!(failed_before = failures, "guardian sweeps work again");
                        failures = 0;
                    }
                    if !report.orphaned.is_empty() || report.dangling_removed > 0 {
                        tracing::info!(
                            orphaned = report.orphaned.len(),
                            dangling_removed = report.dangling_removed,
                            "guardian sweep finished"
                        );
                    } else {
                        tracing::trace!("guardian sweep found nothing stale");
                    }
                }
                Err(error) => {
                    failures += 1;
                    if worth_logging(failures) {
                        tracing::warn!(
                            %error,
                            repeat = failures,
                            "guardian sweep failed; retrying next interval"
                        );
                    }
                }
            }
        }
        tracing::info!("guardian stopped");
    }

    /// Sweeps every sweep interval until `token` is cancelled.
    pub async fn run_with_token(self, token: CancellationToken) {
        self.run_until(token.cancelled_owned()).await;
    }
}

impl fmt::Debug for StreamGuardian {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamGuardian")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The store operations of a sweep, implemented by the Redis and the memory stores.
pub(crate) trait SweepStore: Send + Sync + 'static {
    fn stale_candidates(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<StaleCandidate>, StoreError>>;
    fn mark_orphans(
        &self,
        candidates: Vec<StaleCandidate>,
        events: Vec<Bytes>,
        cutoff_ms: u64,
        completion_ttl: Duration,
    ) -> BoxFuture<Result<Vec<OrphanResult>, StoreError>>;
    fn remove_from_index(&self, entries: Vec<StaleCandidate>) -> BoxFuture<Result<(), StoreError>>;
}

impl<C> SweepStore for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn stale_candidates(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<StaleCandidate>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move { store.stale_candidates(cutoff_ms, limit).await })
    }

    fn mark_orphans(
        &self,
        candidates: Vec<StaleCandidate>,
        events: Vec<Bytes>,
        cutoff_ms: u64,
        completion_ttl: Duration,
    ) -> BoxFuture<Result<Vec<OrphanResult>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            store
                .mark_orphans(
                    &candidates,
                    &events,
                    SYNTHETIC_EVENT_ID,
                    cutoff_ms,
                    completion_ttl,
                )
                .await
        })
    }

    fn remove_from_index(&self, entries: Vec<StaleCandidate>) -> BoxFuture<Result<(), StoreError>> {
        let store = self.clone_store();
        Box::pin(async move { store.remove_from_index(&entries).await })
    }
}
