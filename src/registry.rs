//! The process's live streams, refreshed in Redis in batches.
//!
//! Every live stream of a layer is entered here. One task per layer sends a
//! single pipeline per tick that refreshes all of them, and flushes index
//! additions and removals as they come, so no stream costs a round trip of its
//! own after it was opened.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use tokio::sync::Notify;

use crate::{
    config::worth_logging,
    store::{RefreshEntry, RefreshResult, Store, StoreError, StreamRecord},
};

/// The live streams of one layer.
pub(crate) struct Registry {
    store: Arc<dyn Store>,
    refresh_interval: Duration,
    live_ttl: Duration,
    state: Mutex<State>,
    wake: Arc<Notify>,
    /// Refresh pipelines that failed in a row, to rate-limit their warnings.
    failures: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct State {
    live: HashMap<Arc<str>, Arc<StreamRecord>>,
    added: Vec<RefreshEntry>,
    removed: Vec<RefreshEntry>,
    refresher_running: bool,
}

/// A stream's entry in the registry. [`LiveEntry::finish`] leaves it. Dropping
/// the entry without `finish` keeps the index entry, so a guardian can still
/// mark the stream.
pub(crate) struct LiveEntry {
    registry: Arc<Registry>,
    record: Arc<StreamRecord>,
    active: bool,
}

impl Registry {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        refresh_interval: Duration,
        live_ttl: Duration,
    ) -> Self {
        Self {
            store,
            refresh_interval,
            live_ttl,
            state: Mutex::new(State::default()),
            wake: Arc::new(Notify::new()),
            failures: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Enters a stream that was just claimed in Redis, and starts the refresh
    /// task on the current runtime if it is not running.
    pub(crate) fn enter(self: &Arc<Self>, record: Arc<StreamRecord>) -> LiveEntry {
        let start = {
            let mut state = self.lock();
            if state
                .live
                .insert(record.id.clone(), record.clone())
                .is_none()
            {
                crate::metrics::live_changed(1.0);
            }
            state.added.push(RefreshEntry::of(&record));
            !std::mem::replace(&mut state.refresher_running, true)
        };
        if start {
            tokio::spawn(refresh_loop(Arc::downgrade(self), self.wake.clone()));
        }
        self.wake.notify_one();
        LiveEntry {
            registry: self.clone(),
            record,
            active: true,
        }
    }

    /// Number of live streams of this layer.
    pub(crate) fn live_count(&self) -> usize {
        self.lock().live.len()
    }

    fn leave(&self, left: &StreamRecord, remove_from_index: bool) {
        let mut state = self.lock();
        if state
            .live
            .get(&left.id)
            .is_some_and(|record| record.claim == left.claim)
        {
            state.live.remove(&left.id);
            crate::metrics::live_changed(-1.0);
        }
        if remove_from_index {
            state.removed.push(RefreshEntry::of(left));
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Writes again the registry entries of live streams that Redis lost (a
    /// restart without persistence, say); the tick already re-added them to
    /// the index.
    async fn register_again(&self, ids: Vec<Arc<str>>) {
        let records: Vec<Arc<StreamRecord>> = {
            let state = self.lock();
            ids.iter()
                .filter_map(|id| state.live.get(id).cloned())
                .collect()
        };
        match self.store.register(records.clone()).await {
            Ok(written) => tracing::warn!(
                streams = written,
                "live streams were missing from redis; their registry entries were written again"
            ),
            Err(error) => tracing::warn!(
                %error,
                streams = records.len(),
                "writing missing registry entries failed; retrying next tick"
            ),
        }
    }

    /// Writes the registry entry of one live stream again when it is missing.
    pub(crate) async fn register_one(
        &self,
        record: Arc<StreamRecord>,
    ) -> Result<usize, StoreError> {
        self.store.register(vec![record]).await
    }

    /// Sends the pending index changes now.
    pub(crate) async fn flush_index(&self) {
        self.flush(false).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends one pipeline: refreshes of every live stream when `tick` is
    /// true, and the pending index changes.
    async fn flush(&self, tick: bool) {
        let (live, added, removed) = {
            let mut state = self.lock();
            let live: Vec<RefreshEntry> = if tick {
                state
                    .live
                    .values()
                    .map(|record| RefreshEntry::of(record))
                    .collect()
            } else {
                Vec::new()
            };
            (
                live,
                std::mem::take(&mut state.added),
                std::mem::take(&mut state.removed),
            )
        };
        if live.is_empty() && added.is_empty() && removed.is_empty() {
            return;
        }

        let count = live.len();
        match self
            .store
            .refresh(live.clone(), added.clone(), removed.clone(), self.live_ttl)
            .await
        {
            Ok(results) => {
                let mut missing = Vec::new();
                for (entry, result) in live.iter().zip(results) {
                    match result {
                        RefreshResult::Refreshed => {}
                        RefreshResult::Missing => missing.push(entry.id.clone()),
                        RefreshResult::NotOurs => tracing::debug!(
                            stream_id = %entry.id,
                            "live stream was finished or orphaned in redis; refresh skipped"
                        ),
                    }
                }
                let failed_before = self.failures.swap(0, std::sync::atomic::Ordering::Relaxed);
                if failed_before > 0 {
                    tracing::info!(failed_before, "refreshing live streams works again");
                }
                tracing::trace!(streams = count, "refreshed live streams");
                if !missing.is_empty() {
                    self.register_again(missing).await;
                }
            }
            Err(error) => {
                let repeat = self
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if worth_logging(repeat) {
                    tracing::warn!(%error, streams = count, repeat, "refreshing live streams failed; retrying next tick");
                }
                // Index changes are kept for the next attempt.
                let mut state = self.lock();
                state.added.extend(added);
                state.removed.extend(removed);
            }
        }
    }
}

impl LiveEntry {
    pub(crate) fn id(&self) -> &Arc<str> {
        &self.record.id
    }

    pub(crate) fn claim(&self) -> &Arc<str> {
        &self.record.claim
    }

    pub(crate) fn record(&self) -> &Arc<StreamRecord> {
        &self.record
    }

    pub(crate) fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Leaves the registry. `ended_in_redis` is true when the stream's hash
    /// no longer has state `active` (recorded or released), in which case its
    /// index entry is removed too.
    pub(crate) fn finish(mut self, ended_in_redis: bool) {
        self.active = false;
        self.registry.leave(&self.record, ended_in_redis);
    }
}

impl Drop for LiveEntry {
    fn drop(&mut self) {
        if self.active {
            self.registry.leave(&self.record, false);
        }
    }
}

/// Clears the running flag when the refresh task ends, also when its runtime
/// shuts down, so the next stream starts a new task.
struct RunningFlag(Weak<Registry>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        if let Some(registry) = self.0.upgrade() {
            registry.lock().refresher_running = false;
        }
    }
}

async fn refresh_loop(registry: Weak<Registry>, wake: Arc<Notify>) {
    let _flag = RunningFlag(registry.clone());
    let Some(interval) = registry.upgrade().map(|r| r.refresh_interval) else {
        return;
    };
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    tracing::debug!(
        interval_ms = interval.as_millis() as u64,
        "registry refresh task started"
    );

    loop {
        let tick = tokio::select! {
            _ = ticker.tick() => true,
            _ = wake.notified() => false,
        };
        let Some(registry) = registry.upgrade() else {
            break;
        };
        registry.flush(tick).await;
    }
    tracing::debug!("registry refresh task stopped: the layer was dropped");
}
