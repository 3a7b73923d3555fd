//! The in-memory store: the operations of the Redis scripts on maps in this
//! process, for an app that runs as a single process, for tests and for
//! trying the crate without Redis.

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use bytes::Bytes;

use crate::{
    guardian::SweepStore,
    store::{
        AppendBatch, BoxFuture, CompleteResult, Completion, FollowEntry, FollowQuery, FollowReply,
        INDEX_SHARDS, LogLimits, OpenDecision, OpenRequest, OrphanResult, OwnerSlot, RefreshEntry,
        RefreshResult, StaleCandidate, Store, StoreError, StreamRecord, StreamSnapshot, now_ms,
        shard_of,
    },
    tracker::SYNTHETIC_EVENT_ID,
};

/// Interval between two scans that drop every expired entry. Between scans an
/// expired entry is dropped when an operation reads it.
const PURGE_INTERVAL: Duration = Duration::from_secs(1);

/// A store that keeps streams in the memory of this process, in place of
/// Redis.
///
/// It makes the same decisions as the Redis scripts: claims, the owner rule,
/// replays, the event log with its bounds, refreshes, orphan marking, and the
/// TTL of every entry. A layer and a guardian built on clones of one
/// `MemoryStore` share its streams, so the guardian marks the streams of a
/// layer that stopped refreshing them.
///
/// Use it for an app that runs as one process, for tests, and to try the
/// crate without Redis. Nothing is shared with other processes and nothing
/// survives a restart, so a client that reconnects to another instance or
/// after a restart gets a fresh stream.
///
/// Clones share one store; cloning is cheap. The key prefix of a layer or a
/// guardian does not apply: everything built on one store shares its streams.
/// Calls never fail and never wait for I/O. Each one locks the whole store
/// while its operation runs.
///
/// # Example
///
/// ```no_run
/// use sse_resilience::{MemoryStore, SseResilienceLayer, StreamGuardian};
/// use tokio_util::sync::CancellationToken;
///
/// # async fn run() {
/// let store = MemoryStore::new();
/// let shutdown = CancellationToken::new();
/// tokio::spawn(StreamGuardian::with_memory_store(store.clone()).run_with_token(shutdown.clone()));
/// let layer = SseResilienceLayer::with_memory_store(store);
/// # let _ = layer;
/// # }
/// ```
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

/// One event of a stream's log, as [`MemoryStore::event_log`] returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedEvent {
    /// Position of the event in its stream, from 1.
    pub seq: u64,
    /// The event's `id`, `None` when it had none.
    pub event_id: Option<String>,
    /// The event's bytes as the client received them.
    pub event: Bytes,
    /// True for the stream's terminal event.
    pub terminal: bool,
}

#[derive(Default)]
struct State {
    /// The registry entry of each stream: the Redis hash `{prefix}{<id>}`.
    streams: HashMap<Arc<str>, Expiring<Hash>>,
    /// The event log of each stream: the Redis Stream `{prefix}{<id>}:log`.
    logs: HashMap<Arc<str>, Expiring<Log>>,
    /// The active index, sharded as in Redis; a shard without members does not exist.
    index: HashMap<u16, Expiring<HashMap<Arc<str>, u64>>>,
    /// The live streams of each owner with a stream limit, scored by last
    /// refresh: the Redis sorted set `{prefix}owner:{<owner>}`.
    owners: HashMap<Arc<str>, Expiring<HashMap<Arc<str>, u64>>>,
    last_purge: Option<Instant>,
}

/// A value with the expiry time of its key; `None` is no TTL.
struct Expiring<T> {
    value: T,
    expires_at: Option<Instant>,
}

/// The fields of a stream's hash. The field names of the Redis hash are given
/// where they differ.
#[derive(Clone, Default)]
struct Hash {
    id: Arc<str>,
    state: &'static str,
    owner: String,
    /// `type`
    stream_type: Arc<str>,
    metadata: String,
    instance: Arc<str>,
    claim: Arc<str>,
    started_at: u64,
    last_refresh: u64,
    /// `stale_ms`
    stale_threshold_ms: u64,
    /// `terminal_event`, `terminal_id`, `reason`, `truncated` and `finished_at`.
    end: Option<End>,
    log_seq: Option<u64>,
    log_bytes: Option<u64>,
}

#[derive(Clone)]
struct End {
    event: Bytes,
    /// Empty when the event had no id.
    event_id: String,
    /// Empty for a terminal event sent by the service.
    reason: String,
    truncated: bool,
    finished_at: u64,
}

#[derive(Default)]
struct Log {
    entries: VecDeque<LoggedEvent>,
    /// Largest sequence number ever added, also after trimming emptied the log.
    last_seq: u64,
}

const ACTIVE: &str = "active";
const COMPLETED: &str = "completed";
const FAILED: &str = "failed";
const ORPHANED: &str = "orphaned";

impl MemoryStore {
    /// Creates an empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the ids of the streams the store holds, sorted, live and
    /// finished alike, until their entries expire.
    pub fn stream_ids(&self) -> Vec<String> {
        let mut state = self.lock();
        let mut ids: Vec<String> = state.streams.keys().map(|id| id.to_string()).collect();
        ids.retain(|id| state.hash(id).is_some());
        ids.sort();
        ids
    }

    /// Returns one field of a stream's registry entry, by the name of the
    /// field of the Redis hash: `id`, `state`, `owner`, `type`, `metadata`,
    /// `instance`, `claim`, `started_at`, `last_refresh`, `stale_ms`,
    /// `terminal_event`, `terminal_id`, `reason`, `truncated`, `finished_at`,
    /// `log_seq` or `log_bytes`. Numbers are decimal text, as in Redis.
    ///
    /// Returns `None` for an unknown stream and for a field the entry does
    /// not have, such as `terminal_event` before the stream ended.
    pub fn stream_field(&self, id: &str, field: &str) -> Option<Bytes> {
        let mut state = self.lock();
        let hash = state.hash(id)?;
        let text = |value: &str| Some(Bytes::copy_from_slice(value.as_bytes()));
        let number = |value: u64| Some(Bytes::from(value.to_string()));
        let end = hash.end.as_ref();
        match field {
            "id" => text(&hash.id),
            "state" => text(hash.state),
            "owner" => text(&hash.owner),
            "type" => text(&hash.stream_type),
            "metadata" => text(&hash.metadata),
            "instance" => text(&hash.instance),
            "claim" => text(&hash.claim),
            "started_at" => number(hash.started_at),
            "last_refresh" => number(hash.last_refresh),
            "stale_ms" => number(hash.stale_threshold_ms),
            "terminal_event" => end.map(|end| end.event.clone()),
            "terminal_id" => text(&end?.event_id),
            "reason" => text(&end?.reason),
            "truncated" => text(if end?.truncated { "1" } else { "0" }),
            "finished_at" => number(end?.finished_at),
            "log_seq" => number(hash.log_seq?),
            "log_bytes" => number(hash.log_bytes?),
            _ => None,
        }
    }

    /// Returns true when the stream has an entry in the active index, which
    /// is where guardians look for streams to orphan.
    pub fn is_indexed(&self, id: &str) -> bool {
        let mut state = self.lock();
        state
            .shard(shard_of(id))
            .is_some_and(|members| members.contains_key(id))
    }

    /// Returns the events in a stream's log, oldest first; empty when the
    /// stream has no log.
    pub fn event_log(&self, id: &str) -> Vec<LoggedEvent> {
        let mut state = self.lock();
        state
            .log(id)
            .map(|log| log.entries.iter().cloned().collect())
            .unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        state.purge_if_due(Instant::now());
        state
    }

    /// Runs `operation` on the locked store and returns its result as a
    /// ready future.
    fn run<T: Send + 'static>(
        &self,
        operation: impl FnOnce(&mut State) -> T,
    ) -> BoxFuture<Result<T, StoreError>> {
        let result = operation(&mut self.lock());
        Box::pin(std::future::ready(Ok(result)))
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_struct("MemoryStore")
            .field("streams", &state.streams.len())
            .field("logs", &state.logs.len())
            .finish()
    }
}

impl<T> Expiring<T> {
    fn new(value: T) -> Self {
        Self {
            value,
            expires_at: None,
        }
    }

    fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    fn expire_in(&mut self, ttl: Duration) {
        self.expires_at = Some(Instant::now() + ttl);
    }
}

impl State {
    /// Drops every expired entry, at most once per [`PURGE_INTERVAL`], so
    /// that finished streams no request reads again do not accumulate.
    fn purge_if_due(&mut self, now: Instant) {
        if self
            .last_purge
            .is_some_and(|last| now.duration_since(last) < PURGE_INTERVAL)
        {
            return;
        }
        self.last_purge = Some(now);
        self.streams.retain(|_, hash| !hash.is_expired(now));
        self.logs.retain(|_, log| !log.is_expired(now));
        self.index.retain(|_, shard| !shard.is_expired(now));
        self.owners.retain(|_, streams| !streams.is_expired(now));
    }

    /// Returns the live (not expired) hash of stream `id`.
    fn hash(&mut self, id: &str) -> Option<&mut Hash> {
        if self
            .streams
            .get(id)
            .is_some_and(|hash| hash.is_expired(Instant::now()))
        {
            self.streams.remove(id);
        }
        self.streams.get_mut(id).map(|hash| &mut hash.value)
    }

    fn hash_entry(&mut self, id: &str) -> Option<&mut Expiring<Hash>> {
        self.hash(id)?;
        self.streams.get_mut(id)
    }

    fn log(&mut self, id: &str) -> Option<&mut Log> {
        self.log_entry(id).map(|log| &mut log.value)
    }

    fn log_entry(&mut self, id: &str) -> Option<&mut Expiring<Log>> {
        if self
            .logs
            .get(id)
            .is_some_and(|log| log.is_expired(Instant::now()))
        {
            self.logs.remove(id);
        }
        self.logs.get_mut(id)
    }

    fn shard(&mut self, shard: u16) -> Option<&mut HashMap<Arc<str>, u64>> {
        if self
            .index
            .get(&shard)
            .is_some_and(|members| members.is_expired(Instant::now()))
        {
            self.index.remove(&shard);
        }
        self.index.get_mut(&shard).map(|members| &mut members.value)
    }

    /// Deletes the hash and the log of stream `id`.
    fn delete(&mut self, id: &str) {
        self.streams.remove(id);
        self.logs.remove(id);
    }

    /// Sets the TTL of the hash and the log of stream `id`, where they exist.
    fn expire_stream(&mut self, id: &str, ttl: Duration) {
        if let Some(hash) = self.hash_entry(id) {
            hash.expire_in(ttl);
        }
        self.expire_log(id, ttl);
    }

    fn expire_log(&mut self, id: &str, ttl: Duration) {
        if let Some(log) = self.log_entry(id) {
            log.expire_in(ttl);
        }
    }

    /// Writes a new registry entry for `record`, as the open and register
    /// scripts do.
    fn write_record(&mut self, record: &StreamRecord, started_at: u64, now: u64) {
        let hash = Hash {
            id: record.id.clone(),
            state: ACTIVE,
            owner: record.owner.clone(),
            stream_type: record.stream_type.clone(),
            metadata: record.metadata.clone(),
            instance: record.instance.clone(),
            claim: record.claim.clone(),
            started_at,
            last_refresh: now,
            stale_threshold_ms: millis(record.stale_threshold),
            ..Hash::default()
        };
        let mut entry = Expiring::new(hash);
        entry.expire_in(record.live_ttl);
        self.streams.insert(record.id.clone(), entry);
    }

    /// Decides what to do with a request, as the open script does.
    fn open(&mut self, request: &OpenRequest) -> OpenDecision {
        let record = &request.record;
        if let Some(hash) = self.hash(&record.id) {
            if !hash.owner.is_empty() && hash.owner != record.owner {
                return OpenDecision::NotFound;
            }
            if hash.state == ACTIVE {
                return if request.follow {
                    OpenDecision::Follow
                } else {
                    OpenDecision::Live
                };
            }
            if let Some(end) = &hash.end {
                let last_event_id = request.last_event_id.as_str();
                if !last_event_id.is_empty() && end.event_id == last_event_id {
                    return OpenDecision::Gone;
                }
                // Without its log (expired) the follower reports the gap, then the end.
                if request.follow && !last_event_id.is_empty() {
                    return OpenDecision::Follow;
                }
                return OpenDecision::Replay(end.event.clone());
            }
        }

        self.delete(&record.id);
        self.write_record(record, record.started_at, record.started_at);
        OpenDecision::Claimed
    }

    /// Writes the entry of a live stream whose entry is missing, as the
    /// register script does.
    fn register(&mut self, record: &StreamRecord, now: u64) -> bool {
        if self.hash(&record.id).is_some() {
            return false;
        }
        self.write_record(record, record.started_at, now);
        true
    }

    /// Records the end of a stream held under the completion's claim, once,
    /// as the complete script does.
    fn complete(&mut self, completion: &Completion, now: u64) -> CompleteResult {
        let Some(hash) = self.hash(&completion.id) else {
            return CompleteResult::Missing;
        };
        if hash.claim != completion.claim {
            return CompleteResult::NotOurs;
        }
        if hash.state == COMPLETED || hash.state == FAILED {
            return CompleteResult::AlreadyRecorded;
        }
        // An orphaned mark is replaced: the service's real ending is better than the guardian's guess.
        hash.state = match completion.outcome {
            crate::Outcome::Completed => COMPLETED,
            crate::Outcome::Failed => FAILED,
        };
        hash.end = Some(End {
            event: completion.event.clone(),
            event_id: completion.event_id.clone().unwrap_or_default(),
            reason: completion.reason.unwrap_or_default().to_owned(),
            truncated: completion.truncated,
            finished_at: now,
        });
        hash.log_seq = Some(completion.log_seq);
        self.expire_stream(&completion.id, completion.ttl);
        CompleteResult::Recorded
    }

    /// Deletes a claim that is still active, as the release script does.
    fn release(&mut self, id: &str, claim: &str) -> bool {
        let released = self
            .hash(id)
            .is_some_and(|hash| hash.state == ACTIVE && &*hash.claim == claim);
        if released {
            self.delete(id);
        }
        released
    }

    /// Marks one live stream as fresh, as the refresh script does.
    fn refresh_one(&mut self, entry: &RefreshEntry, now: u64, live_ttl: Duration) -> RefreshResult {
        let Some(hash) = self.hash(&entry.id) else {
            return RefreshResult::Missing;
        };
        if hash.state != ACTIVE || hash.claim != entry.claim {
            return RefreshResult::NotOurs;
        }
        hash.last_refresh = now;
        self.expire_stream(&entry.id, live_ttl);
        RefreshResult::Refreshed
    }

    /// Adds `entries` to their index shards with score `now` (ZADD), and gives
    /// each shard touched the TTL `ttl` (PEXPIRE).
    fn index_add<'a>(
        &mut self,
        entries: impl Iterator<Item = &'a RefreshEntry>,
        now: u64,
        ttl: Duration,
    ) {
        let mut touched = Vec::new();
        for entry in entries {
            self.shard(entry.shard);
            let shard = self
                .index
                .entry(entry.shard)
                .or_insert_with(|| Expiring::new(HashMap::new()));
            shard.value.insert(entry.id.clone(), now);
            touched.push(entry.shard);
        }
        for shard in touched {
            if let Some(members) = self.index.get_mut(&shard) {
                members.expire_in(ttl);
            }
        }
    }

    /// Returns the live streams of `owner`, an empty set when it has none.
    fn owner_streams(&mut self, owner: &Arc<str>) -> &mut Expiring<HashMap<Arc<str>, u64>> {
        if self
            .owners
            .get(owner)
            .is_some_and(|streams| streams.is_expired(Instant::now()))
        {
            self.owners.remove(owner);
        }
        self.owners
            .entry(owner.clone())
            .or_insert_with(|| Expiring::new(HashMap::new()))
    }

    /// Counts a stream among its owner's live streams, as the owner-slot
    /// script does: members not refreshed within the stale threshold are
    /// dropped first, and the stream is added unless the owner is at its limit.
    fn claim_owner_slot(&mut self, slot: &OwnerSlot, now: u64) -> bool {
        let oldest = now.saturating_sub(millis(slot.stale_threshold));
        let streams = self.owner_streams(&slot.owner);
        streams.value.retain(|_, refreshed| *refreshed > oldest);
        if !streams.value.contains_key(&slot.id) && streams.value.len() >= slot.max {
            return false;
        }
        streams.value.insert(slot.id.clone(), now);
        streams.expire_in(slot.ttl);
        true
    }

    /// Refreshes (ZADD and PEXPIRE) or removes (ZREM) streams in their
    /// owners' sets, as the refresh pipeline does.
    fn owner_changes(
        &mut self,
        refreshed: &[&RefreshEntry],
        removed: &[RefreshEntry],
        now: u64,
        ttl: Duration,
    ) {
        for entry in refreshed {
            if let Some(owner) = &entry.owner {
                let streams = self.owner_streams(owner);
                streams.value.insert(entry.id.clone(), now);
                streams.expire_in(ttl);
            }
        }
        for entry in removed {
            if let Some(owner) = &entry.owner {
                let streams = self.owner_streams(owner);
                streams.value.remove(&entry.id);
                if streams.value.is_empty() {
                    self.owners.remove(owner);
                }
            }
        }
    }

    /// Removes index entries (ZREM); a shard left empty is deleted, as Redis
    /// deletes an empty sorted set.
    fn index_remove(&mut self, shard: u16, id: &str) {
        if let Some(members) = self.shard(shard) {
            members.remove(id);
            if members.is_empty() {
                self.index.remove(&shard);
            }
        }
    }

    /// Appends events to a stream's log and trims the log to its bounds, as
    /// the append script does.
    fn append(&mut self, batch: &AppendBatch, limits: LogLimits) -> i64 {
        let Some(hash) = self.hash(&batch.id) else {
            return -1;
        };
        if hash.claim != batch.claim {
            return -1;
        }
        let mut bytes = hash.log_bytes.unwrap_or(0);

        self.log_entry(&batch.id);
        let log = &mut self
            .logs
            .entry(batch.id.clone())
            .or_insert_with(|| Expiring::new(Log::default()))
            .value;
        // Redis compares with its newest entry and would reject an id at or
        // below the largest one it ever added; both only skip retried entries.
        let mut last = log.entries.back().map_or(log.last_seq, |entry| entry.seq);
        let mut added = 0;
        for entry in &batch.entries {
            if entry.seq > last {
                log.entries.push_back(LoggedEvent {
                    seq: entry.seq,
                    event_id: entry
                        .event_id
                        .as_deref()
                        .filter(|id| !id.is_empty())
                        .map(str::to_owned),
                    event: entry.event.clone(),
                    terminal: entry.terminal,
                });
                added += 1;
                bytes += entry.event.len() as u64;
                last = entry.seq;
            }
        }
        log.last_seq = log.last_seq.max(last);

        while log.entries.len() > limits.max_events || bytes > limits.max_bytes as u64 {
            let Some(oldest) = log.entries.pop_front() else {
                break;
            };
            bytes = bytes.saturating_sub(oldest.event.len() as u64);
        }
        if let Some(hash) = self.hash(&batch.id) {
            hash.log_bytes = Some(bytes);
        }
        // An emptied log is kept, as Redis keeps an emptied stream key.
        self.expire_log(&batch.id, limits.ttl);
        added
    }

    /// Reads a stream's log for one follower, as the follow script does.
    fn follow(&mut self, query: &FollowQuery) -> FollowReply {
        let (state, terminal_event, log_seq) = match self.hash(&query.id) {
            None => (String::new(), None, 0),
            Some(hash) if hash.state == ACTIVE => (ACTIVE.to_owned(), None, 0),
            Some(hash) => (
                hash.state.to_owned(),
                hash.end
                    .as_ref()
                    .map(|end| end.event.clone())
                    .filter(|event| !event.is_empty()),
                hash.log_seq.unwrap_or(0),
            ),
        };
        let mut reply = FollowReply {
            state,
            terminal_event,
            found: None,
            first_seq: 0,
            log_seq,
            entries: Vec::new(),
        };
        let Some(log) = self.log(&query.id) else {
            if query.seek.is_some() {
                reply.found = Some(0);
            }
            return reply;
        };
        reply.first_seq = log.entries.front().map_or(0, |entry| entry.seq);

        let mut after = query.cursor;
        if let Some(seek) = query.seek.as_deref() {
            let found = log
                .entries
                .iter()
                .filter(|entry| entry.seq > query.cursor)
                .filter(|entry| entry.event_id.as_deref() == Some(seek))
                .map(|entry| entry.seq)
                .last();
            reply.found = Some(found.unwrap_or(0));
            match found {
                Some(seq) => after = seq,
                None => return reply,
            }
        }
        reply.entries = log
            .entries
            .iter()
            .filter(|entry| entry.seq > after)
            .take(query.max_entries)
            .map(|entry| FollowEntry {
                seq: entry.seq,
                event: entry.event.clone(),
                terminal: entry.terminal,
            })
            .collect();
        reply
    }

    /// Marks one stream orphaned when its last refresh is stale, as the
    /// orphan script does.
    fn mark_orphan(
        &mut self,
        id: &str,
        event: &Bytes,
        cutoff_ms: u64,
        now: u64,
        completion_ttl: Duration,
    ) -> OrphanResult {
        let Some(hash) = self.hash(id) else {
            return OrphanResult::Dangling;
        };
        if hash.state != ACTIVE {
            return OrphanResult::Dangling;
        }
        // The larger of the guardian's and the claiming layer's thresholds applies.
        let cutoff = cutoff_ms.min(now.saturating_sub(hash.stale_threshold_ms));
        if hash.last_refresh > cutoff {
            return OrphanResult::Fresh;
        }
        hash.state = ORPHANED;
        hash.end = Some(End {
            event: event.clone(),
            event_id: SYNTHETIC_EVENT_ID.to_owned(),
            reason: ORPHANED.to_owned(),
            truncated: false,
            finished_at: now,
        });
        self.expire_stream(id, completion_ttl);
        OrphanResult::Marked
    }
}

fn millis(duration: Duration) -> u64 {
    crate::store::millis(duration)
}

impl Store for MemoryStore {
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>> {
        self.run(|state| state.open(&request))
    }

    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>> {
        self.run(|state| state.complete(&completion, now_ms()))
    }

    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>> {
        self.run(|state| state.release(&id, &claim))
    }

    fn register(&self, records: Vec<Arc<StreamRecord>>) -> BoxFuture<Result<usize, StoreError>> {
        let now = now_ms();
        self.run(|state| {
            records
                .iter()
                .filter(|record| state.register(record, now))
                .count()
        })
    }

    fn refresh(
        &self,
        live: Vec<RefreshEntry>,
        added: Vec<RefreshEntry>,
        removed: Vec<RefreshEntry>,
        live_ttl: Duration,
    ) -> BoxFuture<Result<Vec<RefreshResult>, StoreError>> {
        let now = now_ms();
        self.run(|state| {
            let results = live
                .iter()
                .map(|entry| state.refresh_one(entry, now, live_ttl))
                .collect();
            // The Redis pipeline adds before it removes, so an id in both lists leaves the index.
            state.index_add(live.iter().chain(added.iter()), now, live_ttl);
            for entry in &removed {
                state.index_remove(entry.shard, &entry.id);
            }
            let refreshed: Vec<&RefreshEntry> = live.iter().chain(added.iter()).collect();
            state.owner_changes(&refreshed, &removed, now, live_ttl);
            results
        })
    }

    fn append(
        &self,
        batches: Vec<AppendBatch>,
        limits: LogLimits,
    ) -> BoxFuture<Result<Vec<i64>, StoreError>> {
        self.run(|state| {
            batches
                .iter()
                .map(|batch| state.append(batch, limits))
                .collect()
        })
    }

    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>> {
        self.run(|state| queries.iter().map(|query| state.follow(query)).collect())
    }

    fn claim_owner_slot(&self, slot: OwnerSlot) -> BoxFuture<Result<bool, StoreError>> {
        let now = now_ms();
        self.run(move |state| state.claim_owner_slot(&slot, now))
    }

    fn inspect(&self, id: Arc<str>) -> BoxFuture<Result<Option<StreamSnapshot>, StoreError>> {
        self.run(|state| {
            state.hash(&id).map(|hash| StreamSnapshot {
                state: hash.state.to_owned(),
                owner: hash.owner.clone(),
                stream_type: hash.stream_type.to_string(),
                started_at: hash.started_at,
                last_refresh: hash.last_refresh,
                terminal_event: hash.end.as_ref().map(|end| end.event.clone()),
                terminal_id: hash
                    .end
                    .as_ref()
                    .map(|end| end.event_id.clone())
                    .filter(|id| !id.is_empty()),
                truncated: hash.end.as_ref().is_some_and(|end| end.truncated),
            })
        })
    }
}

impl SweepStore for MemoryStore {
    fn stale_candidates(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> BoxFuture<Result<Vec<StaleCandidate>, StoreError>> {
        self.run(|state| {
            let mut candidates = Vec::new();
            for shard in 0..INDEX_SHARDS {
                let Some(members) = state.shard(shard) else {
                    continue;
                };
                // ZRANGEBYSCORE -inf cutoff LIMIT 0 limit: by score, then by member.
                let mut stale: Vec<(u64, &Arc<str>)> = members
                    .iter()
                    .filter(|(_, score)| **score <= cutoff_ms)
                    .map(|(id, score)| (*score, id))
                    .collect();
                stale.sort();
                candidates.extend(stale.into_iter().take(limit).map(|(_, id)| StaleCandidate {
                    shard,
                    id: id.to_string(),
                }));
            }
            candidates
        })
    }

    fn mark_orphans(
        &self,
        candidates: Vec<StaleCandidate>,
        events: Vec<Bytes>,
        cutoff_ms: u64,
        completion_ttl: Duration,
    ) -> BoxFuture<Result<Vec<OrphanResult>, StoreError>> {
        let now = now_ms();
        self.run(|state| {
            candidates
                .iter()
                .zip(&events)
                .map(|(candidate, event)| {
                    state.mark_orphan(&candidate.id, event, cutoff_ms, now, completion_ttl)
                })
                .collect()
        })
    }

    fn remove_from_index(&self, entries: Vec<StaleCandidate>) -> BoxFuture<Result<(), StoreError>> {
        self.run(|state| {
            for entry in &entries {
                state.index_remove(entry.shard, &entry.id);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{store::LogEntry, terminal::Outcome};

    const LIVE_TTL: Duration = Duration::from_secs(60);

    fn record(id: &str, claim: &str, owner: &str) -> Arc<StreamRecord> {
        Arc::new(StreamRecord {
            id: id.into(),
            claim: claim.into(),
            owner: owner.to_owned(),
            instance: "test".into(),
            stream_type: "sse".into(),
            metadata: "{}".to_owned(),
            started_at: now_ms(),
            live_ttl: LIVE_TTL,
            stale_threshold: Duration::from_millis(500),
            limited_owner: None,
        })
    }

    fn open(
        store: &MemoryStore,
        record: &Arc<StreamRecord>,
        last_event_id: &str,
        follow: bool,
    ) -> OpenDecision {
        store.lock().open(&OpenRequest {
            record: record.clone(),
            last_event_id: last_event_id.to_owned(),
            follow,
        })
    }

    fn completion(id: &str, claim: &str, outcome: Outcome, ttl: Duration) -> Completion {
        Completion {
            id: id.into(),
            claim: claim.into(),
            outcome,
            event: Bytes::from_static(b"id: 9\nevent: completed\ndata: x\n\n"),
            event_id: Some("9".to_owned()),
            reason: None,
            truncated: false,
            ttl,
            log_seq: 3,
        }
    }

    fn entry(id: &str, claim: &str) -> RefreshEntry {
        RefreshEntry {
            id: id.into(),
            claim: claim.into(),
            shard: shard_of(id),
            owner: None,
        }
    }

    fn append(store: &MemoryStore, id: &str, claim: &str, seqs: &[u64], limits: LogLimits) -> i64 {
        let batch = AppendBatch {
            id: id.into(),
            claim: claim.into(),
            entries: seqs
                .iter()
                .map(|&seq| LogEntry {
                    seq,
                    event_id: Some(seq.to_string().into()),
                    event: Bytes::from(format!("id: {seq}\ndata: x\n\n")),
                    terminal: false,
                })
                .collect(),
        };
        store.lock().append(&batch, limits)
    }

    fn field(store: &MemoryStore, id: &str, name: &str) -> Option<String> {
        store
            .stream_field(id, name)
            .map(|value| String::from_utf8_lossy(&value).into_owned())
    }

    fn limits(max_events: usize, max_bytes: usize) -> LogLimits {
        LogLimits {
            max_events,
            max_bytes,
            ttl: LIVE_TTL,
        }
    }

    #[test]
    fn open_claims_then_reports_live() {
        let store = MemoryStore::new();
        let first = record("s", "c1", "alice");
        assert_eq!(open(&store, &first, "", false), OpenDecision::Claimed);
        assert_eq!(field(&store, "s", "state").as_deref(), Some("active"));
        assert_eq!(field(&store, "s", "claim").as_deref(), Some("c1"));

        let second = record("s", "c2", "alice");
        assert_eq!(open(&store, &second, "", false), OpenDecision::Live);
        assert_eq!(open(&store, &second, "", true), OpenDecision::Follow);
        let stranger = record("s", "c3", "bob");
        assert_eq!(open(&store, &stranger, "", true), OpenDecision::NotFound);
        assert_eq!(field(&store, "s", "claim").as_deref(), Some("c1"));
    }

    #[test]
    fn finished_stream_replayed_once_per_rule() {
        let store = MemoryStore::new();
        let first = record("s", "c1", "");
        open(&store, &first, "", false);
        let done = completion("s", "c1", Outcome::Completed, LIVE_TTL);
        assert_eq!(
            store.lock().complete(&done, now_ms()),
            CompleteResult::Recorded
        );
        assert_eq!(
            store.lock().complete(&done, now_ms()),
            CompleteResult::AlreadyRecorded
        );
        let other = completion("s", "c2", Outcome::Failed, LIVE_TTL);
        assert_eq!(
            store.lock().complete(&other, now_ms()),
            CompleteResult::NotOurs
        );
        assert_eq!(field(&store, "s", "state").as_deref(), Some("completed"));
        assert_eq!(field(&store, "s", "log_seq").as_deref(), Some("3"));

        let again = record("s", "c2", "anyone");
        assert_eq!(
            open(&store, &again, "", false),
            OpenDecision::Replay(done.event.clone())
        );
        assert_eq!(open(&store, &again, "9", false), OpenDecision::Gone);
        assert_eq!(
            open(&store, &again, "8", false),
            OpenDecision::Replay(done.event.clone())
        );
        assert_eq!(open(&store, &again, "8", true), OpenDecision::Follow);

        let missing = completion("gone", "c1", Outcome::Completed, LIVE_TTL);
        assert_eq!(
            store.lock().complete(&missing, now_ms()),
            CompleteResult::Missing
        );
    }

    #[test]
    fn release_deletes_active_claim_only() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        append(&store, "s", "c1", &[1], limits(10, 1000));
        assert!(!store.lock().release("s", "c2"));
        assert!(store.lock().release("s", "c1"));
        assert!(store.stream_ids().is_empty());
        assert!(store.event_log("s").is_empty());
        assert!(!store.lock().release("s", "c1"));
    }

    #[test]
    fn completion_ttl_expires_stream() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        let done = completion("s", "c1", Outcome::Completed, Duration::from_millis(30));
        store.lock().complete(&done, now_ms());
        assert_eq!(store.stream_ids(), vec!["s".to_owned()]);
        std::thread::sleep(Duration::from_millis(60));
        assert!(store.stream_ids().is_empty());
        assert_eq!(field(&store, "s", "state"), None);
        assert_eq!(
            open(&store, &record("s", "c2", ""), "", false),
            OpenDecision::Claimed
        );
    }

    #[test]
    fn owner_slots_limit_and_free() {
        let store = MemoryStore::new();
        let slot = |id: &str| OwnerSlot {
            owner: "alice".into(),
            id: id.into(),
            max: 2,
            stale_threshold: Duration::from_secs(10),
            ttl: LIVE_TTL,
        };
        let now = now_ms();
        let mut state = store.lock();
        assert!(state.claim_owner_slot(&slot("a"), now));
        assert!(state.claim_owner_slot(&slot("b"), now));
        assert!(
            !state.claim_owner_slot(&slot("c"), now),
            "a third stream was counted"
        );
        assert!(
            state.claim_owner_slot(&slot("a"), now),
            "a counted stream was refused"
        );

        let mut ended = entry("a", "claim-a");
        ended.owner = Some("alice".into());
        state.owner_changes(&[], &[ended], now, LIVE_TTL);
        assert!(
            state.claim_owner_slot(&slot("c"), now),
            "an ended stream still counts"
        );

        let later = now + 10_001;
        let mut fresh = entry("c", "claim-c");
        fresh.owner = Some("alice".into());
        state.owner_changes(&[&fresh], &[], later, LIVE_TTL);
        assert!(
            state.claim_owner_slot(&slot("d"), later),
            "a stale stream still counts"
        );
        assert!(!state.claim_owner_slot(&slot("e"), later));
    }

    #[test]
    fn refresh_updates_entry_and_index() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        let results = store.lock().refresh_one(&entry("s", "c1"), 42, LIVE_TTL);
        assert_eq!(results, RefreshResult::Refreshed);
        assert_eq!(field(&store, "s", "last_refresh").as_deref(), Some("42"));
        assert_eq!(
            store.lock().refresh_one(&entry("s", "c2"), 43, LIVE_TTL),
            RefreshResult::NotOurs
        );
        assert_eq!(
            store.lock().refresh_one(&entry("t", "c1"), 43, LIVE_TTL),
            RefreshResult::Missing
        );

        store
            .lock()
            .index_add([entry("s", "c1")].iter(), 42, LIVE_TTL);
        assert!(store.is_indexed("s"));
        store.lock().index_remove(shard_of("s"), "s");
        assert!(!store.is_indexed("s"));
    }

    #[test]
    fn append_skips_repeats_and_trims() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        assert_eq!(append(&store, "s", "c2", &[1], limits(3, 1000)), -1);
        assert_eq!(append(&store, "s", "c1", &[1, 2], limits(3, 1000)), 2);
        assert_eq!(append(&store, "s", "c1", &[2, 3, 4], limits(3, 1000)), 2);
        let seqs: Vec<u64> = store.event_log("s").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3, 4]);

        // Each event is 15 bytes: two fit in 40 bytes, three do not.
        assert_eq!(append(&store, "s", "c1", &[5], limits(10, 40)), 1);
        let seqs: Vec<u64> = store.event_log("s").iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5]);
        assert_eq!(field(&store, "s", "log_bytes").as_deref(), Some("30"));
    }

    #[test]
    fn follow_seeks_last_event_id() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        append(&store, "s", "c1", &[1, 2, 3, 4], limits(10, 1000));
        let query = |cursor, seek: Option<&str>| FollowQuery {
            id: "s".into(),
            cursor,
            seek: seek.map(Into::into),
            max_entries: 2,
        };

        let reply = store.lock().follow(&query(0, Some("2")));
        assert_eq!(reply.state, "active");
        assert_eq!(reply.found, Some(2));
        assert_eq!(reply.first_seq, 1);
        let seqs: Vec<u64> = reply.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![3, 4]);

        let reply = store.lock().follow(&query(0, Some("nope")));
        assert_eq!(reply.found, Some(0));
        assert!(reply.entries.is_empty());

        let reply = store.lock().follow(&query(1, None));
        assert_eq!(reply.found, None);
        let seqs: Vec<u64> = reply.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![2, 3]);

        let done = completion("s", "c1", Outcome::Completed, LIVE_TTL);
        store.lock().complete(&done, now_ms());
        let reply = store.lock().follow(&query(4, None));
        assert_eq!(reply.state, "completed");
        assert_eq!(reply.terminal_event, Some(done.event));
        assert_eq!(reply.log_seq, 3);

        let reply = store.lock().follow(&FollowQuery {
            id: "unknown".into(),
            cursor: 0,
            seek: Some("1".into()),
            max_entries: 2,
        });
        assert_eq!(reply.state, "");
        assert_eq!(reply.found, Some(0));
    }

    #[test]
    fn orphan_marked_exactly_once() {
        let store = MemoryStore::new();
        open(&store, &record("s", "c1", ""), "", false);
        store
            .lock()
            .index_add([entry("s", "c1")].iter(), 1, LIVE_TTL);
        let now = now_ms();
        let event = Bytes::from_static(b"event: failed\n\n");

        // A refresh after the cutoff keeps the stream fresh.
        store.lock().refresh_one(&entry("s", "c1"), now, LIVE_TTL);
        let fresh = store
            .lock()
            .mark_orphan("s", &event, now - 1, now, LIVE_TTL);
        assert_eq!(fresh, OrphanResult::Fresh);

        store
            .lock()
            .refresh_one(&entry("s", "c1"), now - 10_000, LIVE_TTL);
        let results: Vec<OrphanResult> = (0..3)
            .map(|_| {
                store
                    .lock()
                    .mark_orphan("s", &event, now - 1000, now, LIVE_TTL)
            })
            .collect();
        assert_eq!(
            results,
            vec![
                OrphanResult::Marked,
                OrphanResult::Dangling,
                OrphanResult::Dangling
            ]
        );
        assert_eq!(field(&store, "s", "state").as_deref(), Some("orphaned"));
        assert_eq!(field(&store, "s", "terminal_id").as_deref(), Some("_end"));
        assert_eq!(field(&store, "s", "reason").as_deref(), Some("orphaned"));

        // The layer's real ending replaces the mark.
        let done = completion("s", "c1", Outcome::Completed, LIVE_TTL);
        assert_eq!(
            store.lock().complete(&done, now_ms()),
            CompleteResult::Recorded
        );
        assert_eq!(field(&store, "s", "state").as_deref(), Some("completed"));
    }

    #[test]
    fn layer_threshold_wins_when_longer() {
        let store = MemoryStore::new();
        // The layer stored a threshold of 500 ms.
        open(&store, &record("s", "c1", ""), "", false);
        let now = now_ms();
        store
            .lock()
            .refresh_one(&entry("s", "c1"), now - 300, LIVE_TTL);
        let event = Bytes::from_static(b"event: failed\n\n");
        // A guardian with a 100 ms threshold finds it stale; the layer's 500 ms do not.
        let result = store
            .lock()
            .mark_orphan("s", &event, now - 100, now, LIVE_TTL);
        assert_eq!(result, OrphanResult::Fresh);
    }

    #[tokio::test]
    async fn stale_candidates_by_score() {
        let store = MemoryStore::new();
        let ids: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
        for (score, id) in ids.iter().enumerate() {
            store
                .lock()
                .index_add([entry(id, "c")].iter(), score as u64, LIVE_TTL);
        }
        let candidates = store.stale_candidates(19, 1).await.unwrap();
        // One per shard at most, each the lowest score of its shard.
        let mut shards: Vec<u16> = candidates.iter().map(|c| c.shard).collect();
        shards.dedup();
        assert_eq!(shards.len(), candidates.len());
        for candidate in &candidates {
            let score: u64 = candidate.id[1..].parse().unwrap();
            assert!(score <= 19, "{candidate:?}");
            let lower = ids[..score as usize]
                .iter()
                .any(|id| shard_of(id) == candidate.shard);
            assert!(!lower, "{candidate:?} is not the oldest of its shard");
        }
        store.remove_from_index(candidates.clone()).await.unwrap();
        for candidate in &candidates {
            assert!(!store.is_indexed(&candidate.id));
        }
    }
}
