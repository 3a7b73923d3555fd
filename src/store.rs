//! The Redis store: key names, scripts, and the commands the layer and the guardian send.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    future::Future,
    pin::Pin,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use redis::{
    Cmd, Pipeline, RedisError, RedisFuture, Script, Value,
    aio::ConnectionLike,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};

use crate::{
    cluster::{ClusterLink, ReconnectingCluster},
    terminal::Outcome,
};

/// Number of sorted-set keys the active-stream index is sharded over.
///
/// Part of the Redis data layout: every instance and guardian sharing a key
/// prefix must use the same value.
pub const INDEX_SHARDS: u16 = 16;

static OPEN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/open.lua")));
static REFRESH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/refresh.lua")));
static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/complete.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/release.lua")));
static APPEND: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/append.lua")));
static FOLLOW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/follow.lua")));
static REGISTER: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/register.lua")));
static ORPHAN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/orphan.lua")));
static OWNER_SLOT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("scripts/owner_slot.lua")));

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// An error from the store: a Redis command failed or timed out.
#[derive(Debug)]
pub struct StoreError {
    kind: StoreErrorKind,
}

#[derive(Debug)]
enum StoreErrorKind {
    Redis(RedisError),
    Timeout(Duration),
    UnexpectedReply(String),
}

impl StoreError {
    pub(crate) fn timeout(after: Duration) -> Self {
        Self {
            kind: StoreErrorKind::Timeout(after),
        }
    }

    pub(crate) fn unexpected(what: impl Into<String>) -> Self {
        Self {
            kind: StoreErrorKind::UnexpectedReply(what.into()),
        }
    }

    /// Returns true when the error is a time-out rather than an error reply or
    /// a connection failure.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, StoreErrorKind::Timeout(_))
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            StoreErrorKind::Redis(error) => write!(f, "redis command failed: {error}"),
            StoreErrorKind::Timeout(after) => write!(f, "redis command timed out after {after:?}"),
            StoreErrorKind::UnexpectedReply(what) => {
                write!(f, "unexpected reply from redis: {what}")
            }
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            StoreErrorKind::Redis(error) => Some(error),
            _ => None,
        }
    }
}

impl From<redis::ParsingError> for StoreError {
    fn from(error: redis::ParsingError) -> Self {
        Self::unexpected(error.to_string())
    }
}

impl From<RedisError> for StoreError {
    fn from(error: RedisError) -> Self {
        Self {
            kind: StoreErrorKind::Redis(error),
        }
    }
}

/// Decision of the open script for one request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum OpenDecision {
    Replay(Bytes),
    Gone,
    NotFound,
    Live,
    Follow,
    Claimed,
    /// The owner already has the maximum number of live streams; the claim
    /// was given up.
    OwnerLimitReached,
}

/// The fields of a request that opens or resumes a stream.
#[derive(Debug)]
pub(crate) struct OpenRequest {
    pub record: Arc<StreamRecord>,
    pub last_event_id: String,
    /// The layer keeps event logs: live streams, and ended ones asked with a
    /// Last-Event-ID, are followed instead of getting 409 or a replay.
    pub follow: bool,
}

/// The registry fields of a stream, kept while it is live so that its entry
/// can be written again when Redis lost it.
#[derive(Debug)]
pub(crate) struct StreamRecord {
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub owner: String,
    pub instance: Arc<str>,
    pub stream_type: Arc<str>,
    pub metadata: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at: u64,
    pub live_ttl: Duration,
    pub stale_threshold: Duration,
    /// The owner whose live streams count this one, set only when the layer
    /// limits the streams per owner and the stream has an owner.
    pub limited_owner: Option<Arc<str>>,
}

/// A request to count a stream among the live streams of its owner.
#[derive(Clone, Debug)]
pub(crate) struct OwnerSlot {
    pub owner: Arc<str>,
    pub id: Arc<str>,
    /// Maximum number of live streams of the owner.
    pub max: usize,
    /// Streams not refreshed within this time no longer count.
    pub stale_threshold: Duration,
    /// TTL of the owner's set, renewed with each stream added or refreshed.
    pub ttl: Duration,
}

/// The end of a stream, to be written once.
#[derive(Clone, Debug)]
pub(crate) struct Completion {
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub outcome: Outcome,
    pub event: Bytes,
    pub event_id: Option<String>,
    pub reason: Option<&'static str>,
    pub truncated: bool,
    pub ttl: Duration,
    /// Sequence number of the stream's last logged event, 0 without a log.
    pub log_seq: u64,
}

/// Result of the complete script.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CompleteResult {
    Recorded,
    AlreadyRecorded,
    NotOurs,
    /// The stream's hash is gone (expired, or lost in a restart).
    Missing,
}

/// One live stream in a refresh pipeline.
#[derive(Clone, Debug)]
pub(crate) struct RefreshEntry {
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub shard: u16,
    /// The owner whose live streams count this one (see [`StreamRecord::limited_owner`]).
    pub owner: Option<Arc<str>>,
}

impl RefreshEntry {
    pub(crate) fn of(record: &StreamRecord) -> Self {
        Self {
            shard: shard_of(&record.id),
            id: record.id.clone(),
            claim: record.claim.clone(),
            owner: record.limited_owner.clone(),
        }
    }
}

/// The result of refreshing one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefreshResult {
    Refreshed,
    Missing,
    NotOurs,
}

/// The fields of a stream that its recovery status shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct StreamSnapshot {
    pub state: String,
    /// Owner of the stream, empty when it has none.
    pub owner: String,
    pub stream_type: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at: u64,
    /// Time of the last refresh, milliseconds since the Unix epoch.
    pub last_refresh: u64,
    /// The recorded terminal event once the stream ended.
    pub terminal_event: Option<Bytes>,
    /// Id of the terminal event, `None` when it had none.
    pub terminal_id: Option<String>,
    /// The terminal event bytes were cut at the layer's `max_event_bytes`.
    pub truncated: bool,
}

/// The storage operations of the layer. The implementations are
/// [`RedisStore`] and [`MemoryStore`](crate::MemoryStore); the layer keeps
/// one as a trait object so that its public types do not carry the
/// connection type.
pub(crate) trait Store: Send + Sync + 'static {
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>>;
    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>>;
    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>>;
    /// Writes the registry entries of live streams whose hash is missing. One
    /// batch. Returns how many were written.
    fn register(&self, records: Vec<Arc<StreamRecord>>) -> BoxFuture<Result<usize, StoreError>>;
    /// Refreshes `live` streams and updates the index: `added` and `live` get
    /// score `now`, `removed` leave it. Entries with an owner get the same
    /// changes in their owner's set of live streams (see
    /// [`Store::claim_owner_slot`]), whose TTL is renewed to `live_ttl`. One
    /// [`Batch`]: a pipeline, or one pipeline per master on a cluster.
    fn refresh(
        &self,
        live: Vec<RefreshEntry>,
        added: Vec<RefreshEntry>,
        removed: Vec<RefreshEntry>,
        live_ttl: Duration,
    ) -> BoxFuture<Result<Vec<RefreshResult>, StoreError>>;
    /// Appends events to the logs of several streams. One batch.
    fn append(
        &self,
        batches: Vec<AppendBatch>,
        limits: LogLimits,
    ) -> BoxFuture<Result<Vec<i64>, StoreError>>;
    /// Reads the logs of several followers. One batch.
    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>>;
    /// Reads the status fields of one stream without changing anything;
    /// `None` when the stream is unknown or expired. One command on the
    /// stream's own hash.
    fn inspect(&self, id: Arc<str>) -> BoxFuture<Result<Option<StreamSnapshot>, StoreError>>;
    /// Counts stream `slot.id` among the live streams of `slot.owner`, shared
    /// by every instance. Members not refreshed within `slot.stale_threshold`
    /// are dropped first. Returns true when the stream was added or already
    /// counted, false when the owner already has `slot.max` live streams.
    /// One round trip, atomic per owner.
    fn claim_owner_slot(&self, slot: OwnerSlot) -> BoxFuture<Result<bool, StoreError>>;
}

/// A store that counts the failed calls of the store it wraps.
pub(crate) struct CountingStore {
    inner: Arc<dyn Store>,
    errors: Arc<AtomicU64>,
}

impl CountingStore {
    pub(crate) fn new(inner: Arc<dyn Store>, errors: Arc<AtomicU64>) -> Self {
        Self { inner, errors }
    }

    /// Counts a failure of `call`, the store operation `operation`, in the
    /// layer's counter and in the `metrics` facade.
    fn count<T: Send + 'static>(
        &self,
        operation: &'static str,
        call: BoxFuture<Result<T, StoreError>>,
    ) -> BoxFuture<Result<T, StoreError>> {
        let errors = self.errors.clone();
        Box::pin(async move {
            let result = call.await;
            if result.is_err() {
                errors.fetch_add(1, Ordering::Relaxed);
                crate::metrics::redis_error(operation);
            }
            result
        })
    }
}

impl Store for CountingStore {
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>> {
        self.count("open", self.inner.open(request))
    }

    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>> {
        self.count("complete", self.inner.complete(completion))
    }

    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>> {
        self.count("release", self.inner.release(id, claim))
    }

    fn register(&self, records: Vec<Arc<StreamRecord>>) -> BoxFuture<Result<usize, StoreError>> {
        self.count("register", self.inner.register(records))
    }

    fn refresh(
        &self,
        live: Vec<RefreshEntry>,
        added: Vec<RefreshEntry>,
        removed: Vec<RefreshEntry>,
        live_ttl: Duration,
    ) -> BoxFuture<Result<Vec<RefreshResult>, StoreError>> {
        self.count(
            "refresh",
            self.inner.refresh(live, added, removed, live_ttl),
        )
    }

    fn append(
        &self,
        batches: Vec<AppendBatch>,
        limits: LogLimits,
    ) -> BoxFuture<Result<Vec<i64>, StoreError>> {
        self.count("append", self.inner.append(batches, limits))
    }

    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>> {
        self.count("follow", self.inner.follow(queries))
    }

    fn inspect(&self, id: Arc<str>) -> BoxFuture<Result<Option<StreamSnapshot>, StoreError>> {
        self.count("inspect", self.inner.inspect(id))
    }

    fn claim_owner_slot(&self, slot: OwnerSlot) -> BoxFuture<Result<bool, StoreError>> {
        self.count("claim_owner_slot", self.inner.claim_owner_slot(slot))
    }
}

/// Events of one stream to append to its log.
#[derive(Clone, Debug)]
pub(crate) struct AppendBatch {
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub entries: Vec<LogEntry>,
}

/// One event in a log.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    pub seq: u64,
    pub event_id: Option<Arc<str>>,
    pub event: Bytes,
    pub terminal: bool,
}

/// Bounds of every log of a layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogLimits {
    pub max_events: usize,
    pub max_bytes: usize,
    pub ttl: Duration,
}

/// One follower's read of a log.
#[derive(Clone, Debug)]
pub(crate) struct FollowQuery {
    pub id: Arc<str>,
    pub cursor: u64,
    pub seek: Option<Arc<str>>,
    pub max_entries: usize,
}

/// A log read for one follower.
#[derive(Clone, Debug, Default)]
pub(crate) struct FollowReply {
    /// State of the stream's hash, empty when the hash is gone.
    pub state: String,
    /// The recorded terminal event once the stream ended.
    pub terminal_event: Option<Bytes>,
    /// Sequence number of the entry with the asked id: `Some(0)` when it is
    /// not in the log, `None` when no id was asked.
    pub found: Option<u64>,
    /// Oldest sequence number in the log, 0 when it is empty.
    pub first_seq: u64,
    /// Sequence number of the stream's last event once it ended, else 0.
    pub log_seq: u64,
    pub entries: Vec<FollowEntry>,
}

/// One log entry read by a follower.
#[derive(Clone, Debug)]
pub(crate) struct FollowEntry {
    pub seq: u64,
    pub event: Bytes,
    pub terminal: bool,
}

/// Key names of one key prefix.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    prefix: Arc<str>,
}

impl Keys {
    pub(crate) fn new(prefix: Arc<str>) -> Self {
        Self { prefix }
    }

    /// Returns the key of a stream's hash: `{prefix}{<id>}`. The braces make
    /// the id the Redis Cluster hash tag.
    pub(crate) fn stream(&self, id: &str) -> String {
        format!("{}{{{}}}", self.prefix, id)
    }

    /// Returns the key of a stream's event log: `{prefix}{<id>}:log`.
    pub(crate) fn log(&self, id: &str) -> String {
        format!("{}{{{}}}:log", self.prefix, id)
    }

    /// Returns the key of one active-index shard: `{prefix}active:{<shard>}`.
    pub(crate) fn index(&self, shard: u16) -> String {
        format!("{}active:{{{}}}", self.prefix, shard)
    }

    /// Returns the key of an owner's set of live streams:
    /// `{prefix}owner:{<owner>}`, with the owner percent-encoded so that it
    /// cannot close the hash tag or form a glob pattern.
    pub(crate) fn owner(&self, owner: &str) -> String {
        format!("{}owner:{{{}}}", self.prefix, encode_owner(owner))
    }
}

/// Returns the index shard of a stream id (FNV-1a, stable across processes and versions).
pub(crate) fn shard_of(id: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(INDEX_SHARDS)) as u16
}

/// Returns the current time in milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

pub(crate) fn millis(duration: Duration) -> u64 {
    duration.as_millis().clamp(1, u128::from(u64::MAX)) as u64
}

/// The store on a Redis connection (a `ConnectionManager`, any clonable
/// `ConnectionLike`, or a `redis::cluster_async::ClusterConnection`).
pub(crate) struct RedisStore<C> {
    conn: C,
    /// Set when `conn` is a cluster connection: batches then go out as one
    /// pipeline per master.
    cluster: Option<ClusterRouter>,
    keys: Keys,
    timeout: Duration,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(conn: C, keys: Keys, timeout: Duration) -> Self {
        // NOTE: only `ClusterConnection` with its default node connection type is
        // recognised. Another cluster connection type, or a wrapper around one,
        // is treated as a single server, and its pipelines that mix slots fail
        // with CROSSSLOT in redis-rs.
        let any = &conn as &dyn Any;
        let link = match any.downcast_ref::<ReconnectingCluster>() {
            Some(reconnecting) => Some(reconnecting.link()),
            None => any
                .downcast_ref::<ClusterConnection>()
                .map(|cluster| ClusterLink::fixed(cluster.clone())),
        };
        let cluster = link.map(ClusterRouter::new);
        Self {
            conn,
            cluster,
            keys,
            timeout,
        }
    }

    /// Runs `fut` with the store's time-out.
    pub(crate) async fn timed<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::timeout(self.timeout)),
        }
    }

    /// Sends `batch` and returns the replies of its commands that were not
    /// added as ignored, in the order they were added.
    ///
    /// On a single server the batch is one pipeline. On a cluster it is one
    /// pipeline per master, all sent at once.
    pub(crate) async fn run_batch(
        &self,
        batch: &Batch,
        scripts: &[&Script],
    ) -> Result<Vec<Value>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let replies = match &self.cluster {
            None => {
                let all: Vec<usize> = (0..batch.len()).collect();
                let mut conn = self.conn.clone();
                self.query_script_pipeline(&mut conn, &batch.pipeline(&all), scripts)
                    .await?
            }
            Some(cluster) => self.run_on_cluster(cluster, batch, scripts).await?,
        };
        if replies.len() != batch.len() {
            return Err(StoreError::unexpected(format!(
                "{} replies to a pipeline of {} commands",
                replies.len(),
                batch.len()
            )));
        }
        Ok(batch.drop_ignored_replies(replies))
    }

    /// Runs a pipeline that invokes scripts on `conn`. When Redis replies
    /// NOSCRIPT (after a restart, a SCRIPT FLUSH or a failover), loads the
    /// scripts through `conn` and retries once.
    async fn query_script_pipeline<K>(
        &self,
        conn: &mut K,
        pipe: &Pipeline,
        scripts: &[&Script],
    ) -> Result<Vec<Value>, StoreError>
    where
        K: ConnectionLike + Send,
    {
        match self.timed(pipe.query_async::<Vec<Value>>(conn)).await {
            Err(error) if is_no_script(&error) => {
                for script in scripts {
                    self.timed(script.prepare_invoke().load_async(conn)).await?;
                }
                self.timed(pipe.query_async::<Vec<Value>>(conn)).await
            }
            other => other,
        }
    }

    /// Sends one script command on stream `id`. When Redis replies NOSCRIPT,
    /// loads the script on the node that replied and retries once.
    ///
    /// On a cluster the command goes to the master of the stream's slot like
    /// any keyed command. Only the script load differs from redis-rs's
    /// `Script::invoke_async`, which sends SCRIPT LOAD to every node and fails
    /// when one of them is down.
    async fn run_script_command(
        &self,
        id: &str,
        cmd: Cmd,
        script: &Script,
    ) -> Result<Value, StoreError> {
        self.run_script_on_key(&self.keys.stream(id), cmd, script)
            .await
    }

    /// Sends one script command whose keys share the hash slot of `key`, as
    /// [`RedisStore::run_script_command`] does.
    async fn run_script_on_key(
        &self,
        key: &str,
        cmd: Cmd,
        script: &Script,
    ) -> Result<Value, StoreError> {
        match &self.cluster {
            None => {
                let mut conn = self.conn.clone();
                self.query_script_command(&mut conn, &cmd, script).await
            }
            Some(cluster) => {
                let slot = key_slot(key.as_bytes());
                let mut node = NodeConnection {
                    link: cluster.link.clone(),
                    route: Route::new(slot, SlotAddr::Master),
                };
                self.query_script_command(&mut node, &cmd, script).await
            }
        }
    }

    async fn query_script_command<K>(
        &self,
        conn: &mut K,
        cmd: &Cmd,
        script: &Script,
    ) -> Result<Value, StoreError>
    where
        K: ConnectionLike + Send,
    {
        match self.timed(cmd.query_async::<Value>(conn)).await {
            Err(error) if is_no_script(&error) => {
                self.timed(script.prepare_invoke().load_async(conn)).await?;
                self.timed(cmd.query_async::<Value>(conn)).await
            }
            other => other,
        }
    }

    /// Sends the commands of `batch` as one pipeline per master, concurrently,
    /// and returns every reply in batch order.
    ///
    /// A failed pipeline makes the store reload the slot map, and its
    /// commands are grouped and sent once more.
    ///
    /// A command can run more than once: here, and in redis-rs, which resends
    /// a whole pipeline to the node named by a MOVED or ASK reply to any of
    /// its commands. Repeating the refresh, append and follow scripts or the
    /// index commands changes nothing more in Redis. A repeated orphan script
    /// returns -1 (not active), so the sweep reports that stream as dangling
    /// instead of orphaned, although Redis marks it once.
    async fn run_on_cluster(
        &self,
        cluster: &ClusterRouter,
        batch: &Batch,
        scripts: &[&Script],
    ) -> Result<Vec<Value>, StoreError> {
        let mut replies: Vec<Option<Value>> = (0..batch.len()).map(|_| None).collect();
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        let mut retried = false;
        loop {
            let owners = cluster.slot_owners(self).await?;
            let groups = owners.group(batch, &pending);
            let results = join_all(groups.iter().map(|group| {
                let pipe = batch.pipeline(&group.commands);
                let mut node = NodeConnection {
                    link: cluster.link.clone(),
                    route: group.route,
                };
                async move { self.query_script_pipeline(&mut node, &pipe, scripts).await }
            }))
            .await;

            let mut failed = Vec::new();
            let mut first_error = None;
            for (group, result) in groups.into_iter().zip(results) {
                match result {
                    Ok(values) if values.len() == group.commands.len() => {
                        for (index, value) in group.commands.into_iter().zip(values) {
                            replies[index] = Some(value);
                        }
                    }
                    Ok(values) => {
                        return Err(StoreError::unexpected(format!(
                            "{} replies to a pipeline of {} commands",
                            values.len(),
                            group.commands.len()
                        )));
                    }
                    Err(error) => {
                        failed.extend(group.commands);
                        first_error.get_or_insert(error);
                    }
                }
            }
            let Some(error) = first_error else {
                break;
            };

            // The slot map may be out of date after a failover or a resharding.
            cluster.forget_slot_owners();
            if retried || error.is_timeout() {
                return Err(error);
            }
            tracing::debug!(
                %error,
                commands = failed.len(),
                "cluster pipeline failed; reloading the slot map and retrying once"
            );
            retried = true;
            pending = failed;
        }
        replies
            .into_iter()
            .map(|reply| reply.ok_or_else(|| StoreError::unexpected("a pipeline reply is missing")))
            .collect()
    }

    pub(crate) fn clone_store(&self) -> Self {
        Self {
            conn: self.conn.clone(),
            cluster: self.cluster.clone(),
            keys: self.keys.clone(),
            timeout: self.timeout,
        }
    }
}

fn is_no_script(error: &StoreError) -> bool {
    match &error.kind {
        StoreErrorKind::Redis(error) => {
            error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
        }
        _ => false,
    }
}

/// Commands sent together in one round trip: one pipeline on a single
/// server, one pipeline per master on a cluster.
///
/// Every command touches keys of one hash slot, given when it is added.
#[derive(Default)]
pub(crate) struct Batch {
    commands: Vec<BatchCommand>,
}

struct BatchCommand {
    cmd: Cmd,
    slot: u16,
    keep_reply: bool,
}

impl Batch {
    fn len(&self) -> usize {
        self.commands.len()
    }

    fn is_empty(&self) -> bool {
        self.commands.is_empty()
    }

    /// Adds an EVALSHA of `script` with the hash and the log of stream `id` as
    /// its two keys, and returns it so the caller can add the arguments.
    fn add_script(&mut self, script: &Script, keys: &Keys, id: &str) -> &mut Cmd {
        self.push(&keys.stream(id), script_command(script, keys, id), true)
    }

    /// Adds a command on `key` whose reply is returned.
    fn add(&mut self, key: &str, cmd: Cmd) {
        self.push(key, cmd, true);
    }

    /// Adds a command on `key` whose reply is dropped.
    fn add_ignored(&mut self, key: &str, cmd: Cmd) {
        self.push(key, cmd, false);
    }

    fn push(&mut self, key: &str, cmd: Cmd, keep_reply: bool) -> &mut Cmd {
        self.commands.push(BatchCommand {
            cmd,
            slot: key_slot(key.as_bytes()),
            keep_reply,
        });
        &mut self
            .commands
            .last_mut()
            .expect("a command was just added")
            .cmd
    }

    /// Returns a pipeline of the commands at `indexes`, in that order.
    fn pipeline(&self, indexes: &[usize]) -> Pipeline {
        let mut pipe = redis::pipe();
        for &index in indexes {
            pipe.add_command(self.commands[index].cmd.clone());
        }
        pipe
    }

    /// Drops the replies of ignored commands from `replies`, one per command.
    fn drop_ignored_replies(&self, replies: Vec<Value>) -> Vec<Value> {
        replies
            .into_iter()
            .zip(&self.commands)
            .filter(|(_, command)| command.keep_reply)
            .map(|(reply, _)| reply)
            .collect()
    }
}

/// Returns an EVALSHA of `script` with the hash and the log of stream `id` as
/// its two keys. Both keys have the id as hash tag, so they share one slot.
/// Adds the arguments shared by the open and register scripts (ARGV 1 to 10).
fn record_args<'a>(
    cmd: &'a mut Cmd,
    record: &StreamRecord,
    now: u64,
    last_event_id: &str,
) -> &'a mut Cmd {
    cmd.arg(now)
        .arg(&record.owner)
        .arg(last_event_id)
        .arg(&*record.claim)
        .arg(&*record.instance)
        .arg(&*record.stream_type)
        .arg(&record.metadata)
        .arg(millis(record.live_ttl))
        .arg(&*record.id)
        .arg(millis(record.stale_threshold))
}

fn script_command(script: &Script, keys: &Keys, id: &str) -> Cmd {
    let mut cmd = redis::cmd("EVALSHA");
    cmd.arg(script.get_hash())
        .arg(2)
        .arg(keys.stream(id))
        .arg(keys.log(id));
    cmd
}

/// Number of hash slots of a Redis Cluster.
const CLUSTER_SLOTS: u16 = 16384;

/// Returns the Redis Cluster hash slot of `key`: CRC16 (XMODEM) of its hash
/// tag, or of the whole key when it has none, modulo 16384 (the key
/// distribution model of the Redis Cluster specification).
fn key_slot(key: &[u8]) -> u16 {
    let mut hashed = key;
    if let Some(open) = key.iter().position(|&byte| byte == b'{') {
        let rest = &key[open + 1..];
        if let Some(close) = rest.iter().position(|&byte| byte == b'}')
            && close > 0
        {
            hashed = &rest[..close];
        }
    }
    crc16_xmodem(hashed) % CLUSTER_SLOTS
}

fn crc16_xmodem(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The cluster side of a store: the connection, and the slot map used to
/// group commands by master, shared by every clone of the store.
#[derive(Clone)]
struct ClusterRouter {
    link: Arc<ClusterLink>,
    owners: Arc<Mutex<Option<Arc<SlotOwners>>>>,
}

impl ClusterRouter {
    fn new(link: Arc<ClusterLink>) -> Self {
        Self {
            link,
            owners: Arc::new(Mutex::new(None)),
        }
    }

    /// Returns the slot map, loaded with CLUSTER SLOTS on first use and after
    /// [`ClusterRouter::forget_slot_owners`].
    async fn slot_owners<C>(&self, store: &RedisStore<C>) -> Result<Arc<SlotOwners>, StoreError>
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        if let Some(owners) = self.lock().clone() {
            return Ok(owners);
        }
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let slots = redis::cmd("CLUSTER").arg("SLOTS").clone();
        let reply = store
            .timed(
                self.link
                    .run(|mut conn| async move { conn.route_command(slots, routing).await }),
            )
            .await?;
        let owners = Arc::new(SlotOwners::from_cluster_slots(reply)?);
        *self.lock() = Some(owners.clone());
        Ok(owners)
    }

    fn forget_slot_owners(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<SlotOwners>>> {
        self.owners
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The master of every hash slot, as an index into the list of masters.
#[derive(Debug)]
pub(crate) struct SlotOwners {
    /// One entry per slot; [`SlotOwners::UNASSIGNED`] for a slot no master serves.
    masters: Vec<u16>,
}

/// The commands of a batch that go to one master in one pipeline.
#[derive(Debug, PartialEq, Eq)]
struct NodeGroup {
    /// Route to the master of one of the group's slots, which receives the pipeline.
    route: Route,
    /// Indexes of the commands in the batch, in batch order.
    commands: Vec<usize>,
}

impl SlotOwners {
    const UNASSIGNED: u16 = u16::MAX;

    /// Parses a CLUSTER SLOTS reply: one entry per slot range, each with the
    /// first slot, the last slot and the master's address.
    pub(crate) fn from_cluster_slots(reply: Value) -> Result<Self, StoreError> {
        let ranges: Vec<Vec<Value>> = redis::from_redis_value(reply)?;
        let mut masters = vec![Self::UNASSIGNED; usize::from(CLUSTER_SLOTS)];
        let mut addresses: HashMap<(String, u16), u16> = HashMap::new();
        for range in ranges {
            let mut fields = range.into_iter();
            let (Some(first), Some(last), Some(master)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(StoreError::unexpected(
                    "CLUSTER SLOTS entry without slots and a master",
                ));
            };
            let first: u16 = redis::from_redis_value(first)?;
            let last: u16 = redis::from_redis_value(last)?;
            let master: Vec<Value> = redis::from_redis_value(master)?;
            let mut master = master.into_iter();
            let (Some(host), Some(port)) = (master.next(), master.next()) else {
                return Err(StoreError::unexpected(
                    "CLUSTER SLOTS master without a host and a port",
                ));
            };
            let address = (
                redis::from_redis_value::<String>(host)?,
                redis::from_redis_value::<u16>(port)?,
            );
            if first > last || last >= CLUSTER_SLOTS {
                return Err(StoreError::unexpected(format!(
                    "CLUSTER SLOTS range {first}-{last} is not within 0-{}",
                    CLUSTER_SLOTS - 1
                )));
            }
            let next_index = addresses.len() as u16;
            let index = *addresses.entry(address).or_insert(next_index);
            masters[usize::from(first)..=usize::from(last)].fill(index);
        }
        Ok(Self { masters })
    }

    /// Returns one route per master: to the lowest slot it serves.
    pub(crate) fn master_routes(&self) -> Vec<Route> {
        let mut seen = std::collections::HashSet::new();
        (0..CLUSTER_SLOTS)
            .filter(|&slot| {
                let master = self.masters[usize::from(slot)];
                master != Self::UNASSIGNED && seen.insert(master)
            })
            .map(|slot| Route::new(slot, SlotAddr::Master))
            .collect()
    }

    /// Groups the commands at `indexes` by the master of their slot. A slot
    /// that no master serves gets a group of its own, routed by redis-rs.
    fn group(&self, batch: &Batch, indexes: &[usize]) -> Vec<NodeGroup> {
        let mut groups: Vec<NodeGroup> = Vec::new();
        let mut group_of: HashMap<(u16, u16), usize> = HashMap::new();
        for &index in indexes {
            let slot = batch.commands[index].slot;
            let master = self.masters[usize::from(slot)];
            let key = if master == Self::UNASSIGNED {
                (master, slot)
            } else {
                (master, 0)
            };
            let position = *group_of.entry(key).or_insert_with(|| {
                groups.push(NodeGroup {
                    route: Route::new(slot, SlotAddr::Master),
                    commands: Vec::new(),
                });
                groups.len() - 1
            });
            groups[position].commands.push(index);
        }
        groups
    }
}

/// A cluster connection that sends every command and pipeline to the master
/// of one slot, so that a pipeline may mix slots of that master.
struct NodeConnection {
    link: Arc<ClusterLink>,
    route: Route,
}

impl ConnectionLike for NodeConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(self.route));
        let cmd = cmd.clone();
        Box::pin(
            self.link
                .run(|mut conn| async move { conn.route_command(cmd, routing).await }),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let routing = SingleNodeRoutingInfo::SpecificNode(self.route);
        let pipeline = pipeline.clone();
        Box::pin(self.link.run(move |mut conn| async move {
            conn.route_pipeline(pipeline, offset, count, routing).await
        }))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Polls all `futures` at once and returns their outputs in order.
async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (future, output) in futures.iter_mut().zip(outputs.iter_mut()) {
            if output.is_none() {
                match future.as_mut().poll(cx) {
                    Poll::Ready(value) => *output = Some(value),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs
        .into_iter()
        .map(|output| output.expect("every future is ready"))
        .collect()
}

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let record = &request.record;
            let mut cmd = script_command(&OPEN, &store.keys, &record.id);
            record_args(&mut cmd, record, record.started_at, &request.last_event_id)
                .arg(if request.follow { "1" } else { "0" });
            let reply = store.run_script_command(&record.id, cmd, &OPEN).await?;
            parse_open_reply(redis::from_redis_value(reply)?)
        })
    }

    fn register(&self, records: Vec<Arc<StreamRecord>>) -> BoxFuture<Result<usize, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let now = now_ms();
            let mut batch = Batch::default();
            for record in &records {
                let cmd = batch.add_script(&REGISTER, &store.keys, &record.id);
                record_args(cmd, record, now, "").arg(record.started_at);
            }
            let replies = store.run_batch(&batch, &[&REGISTER]).await?;
            let mut written = 0;
            for reply in replies {
                if redis::from_redis_value::<i64>(reply)? == 1 {
                    written += 1;
                }
            }
            Ok(written)
        })
    }

    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let mut cmd = script_command(&COMPLETE, &store.keys, &completion.id);
            cmd.arg(&*completion.claim)
                .arg(completion.outcome.as_str())
                .arg(completion.event.as_ref())
                .arg(completion.event_id.as_deref().unwrap_or(""))
                .arg(completion.reason.unwrap_or(""))
                .arg(if completion.truncated { "1" } else { "0" })
                .arg(now_ms())
                .arg(millis(completion.ttl))
                .arg(completion.log_seq);
            let reply = store
                .run_script_command(&completion.id, cmd, &COMPLETE)
                .await?;
            Ok(match redis::from_redis_value::<i64>(reply)? {
                1 => CompleteResult::Recorded,
                0 => CompleteResult::AlreadyRecorded,
                -2 => CompleteResult::Missing,
                _ => CompleteResult::NotOurs,
            })
        })
    }

    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let mut cmd = script_command(&RELEASE, &store.keys, &id);
            cmd.arg(&*claim);
            let reply = store.run_script_command(&id, cmd, &RELEASE).await?;
            Ok(redis::from_redis_value::<i64>(reply)? == 1)
        })
    }

    fn refresh(
        &self,
        live: Vec<RefreshEntry>,
        added: Vec<RefreshEntry>,
        removed: Vec<RefreshEntry>,
        live_ttl: Duration,
    ) -> BoxFuture<Result<Vec<RefreshResult>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let now = now_ms();
            let ttl_ms = millis(live_ttl);
            let mut batch = Batch::default();

            for entry in &live {
                batch
                    .add_script(&REFRESH, &store.keys, &entry.id)
                    .arg(now)
                    .arg(ttl_ms)
                    .arg(&*entry.claim);
            }

            // One ZADD per shard for every stream that is live or new, one ZREM per shard for the rest.
            let mut members: Vec<Vec<&str>> = vec![Vec::new(); usize::from(INDEX_SHARDS)];
            for entry in live.iter().chain(added.iter()) {
                members[usize::from(entry.shard)].push(&entry.id);
            }
            for (shard, ids) in members.iter().enumerate() {
                if ids.is_empty() {
                    continue;
                }
                let key = store.keys.index(shard as u16);
                let mut zadd = redis::cmd("ZADD");
                zadd.arg(&key);
                for id in ids {
                    zadd.arg(now).arg(*id);
                }
                batch.add_ignored(&key, zadd);
                let mut pexpire = redis::cmd("PEXPIRE");
                pexpire.arg(&key).arg(ttl_ms);
                batch.add_ignored(&key, pexpire);
            }
            let mut gone: Vec<Vec<&str>> = vec![Vec::new(); usize::from(INDEX_SHARDS)];
            for entry in &removed {
                gone[usize::from(entry.shard)].push(&entry.id);
            }
            for (shard, ids) in gone.iter().enumerate() {
                if !ids.is_empty() {
                    let key = store.keys.index(shard as u16);
                    let mut zrem = redis::cmd("ZREM");
                    zrem.arg(&key).arg(ids.as_slice());
                    batch.add_ignored(&key, zrem);
                }
            }
            add_owner_changes(
                &mut batch,
                &store.keys,
                &live,
                &added,
                &removed,
                now,
                ttl_ms,
            );

            let replies = store.run_batch(&batch, &[&REFRESH]).await?;
            if replies.len() != live.len() {
                return Err(StoreError::unexpected(format!(
                    "{} refresh replies for {} streams",
                    replies.len(),
                    live.len()
                )));
            }
            replies
                .into_iter()
                .map(|reply| {
                    Ok(match redis::from_redis_value::<i64>(reply)? {
                        1 => RefreshResult::Refreshed,
                        0 => RefreshResult::Missing,
                        _ => RefreshResult::NotOurs,
                    })
                })
                .collect()
        })
    }

    fn append(
        &self,
        batches: Vec<AppendBatch>,
        limits: LogLimits,
    ) -> BoxFuture<Result<Vec<i64>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let mut batch = Batch::default();
            for append in &batches {
                let cmd = batch
                    .add_script(&APPEND, &store.keys, &append.id)
                    .arg(limits.max_events)
                    .arg(limits.max_bytes)
                    .arg(millis(limits.ttl))
                    .arg(&*append.claim);
                for entry in &append.entries {
                    cmd.arg(entry.seq)
                        .arg(entry.event_id.as_deref().unwrap_or(""))
                        .arg(entry.event.as_ref())
                        .arg(if entry.terminal { "1" } else { "0" });
                }
            }
            let replies = store.run_batch(&batch, &[&APPEND]).await?;
            replies
                .into_iter()
                .map(|reply| Ok(redis::from_redis_value::<i64>(reply)?))
                .collect()
        })
    }

    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let mut batch = Batch::default();
            for query in &queries {
                batch
                    .add_script(&FOLLOW, &store.keys, &query.id)
                    .arg(query.cursor)
                    .arg(query.seek.as_deref().unwrap_or(""))
                    .arg(query.max_entries);
            }
            let replies = store.run_batch(&batch, &[&FOLLOW]).await?;
            replies.into_iter().map(parse_follow_reply).collect()
        })
    }

    fn inspect(&self, id: Arc<str>) -> BoxFuture<Result<Option<StreamSnapshot>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            // One key, so one slot: a cluster connection routes it to that slot's master.
            let mut hmget = redis::cmd("HMGET");
            hmget.arg(store.keys.stream(&id)).arg(&SNAPSHOT_FIELDS[..]);
            let mut conn = store.conn.clone();
            let values: Vec<Option<Vec<u8>>> = store.timed(hmget.query_async(&mut conn)).await?;
            parse_snapshot(values)
        })
    }

    fn claim_owner_slot(&self, slot: OwnerSlot) -> BoxFuture<Result<bool, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let key = store.keys.owner(&slot.owner);
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(OWNER_SLOT.get_hash())
                .arg(1)
                .arg(&key)
                .arg(now_ms())
                .arg(millis(slot.stale_threshold))
                .arg(slot.max)
                .arg(&*slot.id)
                .arg(millis(slot.ttl));
            let reply = store.run_script_on_key(&key, cmd, &OWNER_SLOT).await?;
            Ok(redis::from_redis_value::<i64>(reply)? == 1)
        })
    }
}

/// The hash fields a [`StreamSnapshot`] is read from, in the order
/// [`parse_snapshot`] expects them.
const SNAPSHOT_FIELDS: [&str; 8] = [
    "state",
    "owner",
    "type",
    "started_at",
    "last_refresh",
    "terminal_event",
    "terminal_id",
    "truncated",
];

fn parse_snapshot(values: Vec<Option<Vec<u8>>>) -> Result<Option<StreamSnapshot>, StoreError> {
    if values.len() != SNAPSHOT_FIELDS.len() {
        return Err(StoreError::unexpected(format!(
            "HMGET returned {} values for {} fields",
            values.len(),
            SNAPSHOT_FIELDS.len()
        )));
    }
    let mut values = values.into_iter();
    let mut next = || values.next().flatten();
    let text = |value: Option<Vec<u8>>| value.map(|v| String::from_utf8_lossy(&v).into_owned());
    let number = |value: Option<Vec<u8>>| -> u64 {
        value
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0)
    };
    let Some(state) = text(next()) else {
        return Ok(None);
    };
    Ok(Some(StreamSnapshot {
        state,
        owner: text(next()).unwrap_or_default(),
        stream_type: text(next()).unwrap_or_default(),
        started_at: number(next()),
        last_refresh: number(next()),
        terminal_event: next().map(Bytes::from),
        terminal_id: text(next()).filter(|id| !id.is_empty()),
        truncated: next().is_some_and(|v| v == b"1"),
    }))
}

/// Adds to `batch` one ZADD (and PEXPIRE) per owner for the streams that are
/// live or new, and one ZREM per owner for the removed ones, so the owners'
/// sets of live streams are refreshed with the index.
fn add_owner_changes(
    batch: &mut Batch,
    keys: &Keys,
    live: &[RefreshEntry],
    added: &[RefreshEntry],
    removed: &[RefreshEntry],
    now: u64,
    ttl_ms: u64,
) {
    let mut refreshed: HashMap<&str, Vec<&str>> = HashMap::new();
    for entry in live.iter().chain(added) {
        if let Some(owner) = &entry.owner {
            refreshed.entry(owner).or_default().push(&entry.id);
        }
    }
    for (owner, ids) in refreshed {
        let key = keys.owner(owner);
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&key);
        for id in ids {
            zadd.arg(now).arg(id);
        }
        batch.add_ignored(&key, zadd);
        let mut pexpire = redis::cmd("PEXPIRE");
        pexpire.arg(&key).arg(ttl_ms);
        batch.add_ignored(&key, pexpire);
    }

    let mut gone: HashMap<&str, Vec<&str>> = HashMap::new();
    for entry in removed {
        if let Some(owner) = &entry.owner {
            gone.entry(owner).or_default().push(&entry.id);
        }
    }
    for (owner, ids) in gone {
        let key = keys.owner(owner);
        let mut zrem = redis::cmd("ZREM");
        zrem.arg(&key).arg(ids.as_slice());
        batch.add_ignored(&key, zrem);
    }
}

/// Percent-encodes every byte of `owner` outside `A-Z a-z 0-9 . _ ~ - @`, so
/// that two owners never share a key and no owner puts `{`, `}`, `*`, `?`,
/// `[` or `]` into one.
fn encode_owner(owner: &str) -> String {
    let mut encoded = String::with_capacity(owner.len());
    for byte in owner.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'~' | b'-' | b'@') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn parse_follow_reply(reply: Value) -> Result<FollowReply, StoreError> {
    let values: Vec<Value> = redis::from_redis_value(reply)?;
    if values.len() < 5 || !(values.len() - 5).is_multiple_of(3) {
        return Err(StoreError::unexpected(format!(
            "follow script returned {} values",
            values.len()
        )));
    }
    let mut values = values.into_iter();
    let mut next = || values.next().unwrap_or(Value::Nil);
    let state: String = redis::from_redis_value(next())?;
    let terminal_event: Vec<u8> = redis::from_redis_value(next())?;
    let found: i64 = redis::from_redis_value(next())?;
    let first_seq: u64 = redis::from_redis_value(next())?;
    let log_seq: u64 = redis::from_redis_value(next())?;
    let mut reply = FollowReply {
        state,
        terminal_event: (!terminal_event.is_empty()).then(|| Bytes::from(terminal_event)),
        found: u64::try_from(found).ok(),
        first_seq,
        log_seq,
        entries: Vec::new(),
    };
    loop {
        let seq = next();
        if seq == Value::Nil {
            break;
        }
        let seq: u64 = redis::from_redis_value(seq)?;
        let event: Vec<u8> = redis::from_redis_value(next())?;
        let terminal: String = redis::from_redis_value(next())?;
        reply.entries.push(FollowEntry {
            seq,
            event: Bytes::from(event),
            terminal: terminal == "1",
        });
    }
    Ok(reply)
}

fn parse_open_reply(reply: Vec<Value>) -> Result<OpenDecision, StoreError> {
    let mut parts = reply.into_iter();
    let tag: String = match parts.next() {
        Some(value) => redis::from_redis_value(value)?,
        None => return Err(StoreError::unexpected("empty reply to the open script")),
    };
    Ok(match tag.as_str() {
        "replay" => {
            let bytes: Vec<u8> = match parts.next() {
                Some(value) => redis::from_redis_value(value)?,
                None => return Err(StoreError::unexpected("replay without an event")),
            };
            OpenDecision::Replay(Bytes::from(bytes))
        }
        "gone" => OpenDecision::Gone,
        "not_found" => OpenDecision::NotFound,
        "live" => OpenDecision::Live,
        "follow" => OpenDecision::Follow,
        "claimed" => OpenDecision::Claimed,
        other => {
            return Err(StoreError::unexpected(format!(
                "open script returned {other:?}"
            )));
        }
    })
}

/// One stale candidate found by a guardian sweep.
#[derive(Debug, Clone)]
pub(crate) struct StaleCandidate {
    pub shard: u16,
    pub id: String,
}

/// Result of the orphan script for one candidate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OrphanResult {
    Marked,
    Fresh,
    Dangling,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Lists up to `limit` index entries per shard whose score is at or
    /// before `cutoff_ms`. One batch of one command per shard.
    pub(crate) async fn stale_candidates(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<StaleCandidate>, StoreError> {
        let mut batch = Batch::default();
        for shard in 0..INDEX_SHARDS {
            let key = self.keys.index(shard);
            let mut range = redis::cmd("ZRANGEBYSCORE");
            range
                .arg(&key)
                .arg("-inf")
                .arg(cutoff_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
            batch.add(&key, range);
        }
        let replies = self.run_batch(&batch, &[]).await?;
        let mut candidates = Vec::new();
        for (shard, reply) in (0..INDEX_SHARDS).zip(replies) {
            let ids: Vec<String> = redis::from_redis_value(reply)?;
            candidates.extend(ids.into_iter().map(|id| StaleCandidate { shard, id }));
        }
        Ok(candidates)
    }

    /// Runs the orphan script for every candidate. One batch.
    pub(crate) async fn mark_orphans(
        &self,
        candidates: &[StaleCandidate],
        events: &[Bytes],
        event_id: &str,
        cutoff_ms: u64,
        completion_ttl: Duration,
    ) -> Result<Vec<OrphanResult>, StoreError> {
        let now = now_ms();
        let mut batch = Batch::default();
        for (candidate, event) in candidates.iter().zip(events) {
            batch
                .add_script(&ORPHAN, &self.keys, &candidate.id)
                .arg(cutoff_ms)
                .arg(event.as_ref())
                .arg(event_id)
                .arg(now)
                .arg(millis(completion_ttl));
        }
        let replies = self.run_batch(&batch, &[&ORPHAN]).await?;
        replies
            .into_iter()
            .map(|reply| {
                Ok(match redis::from_redis_value::<i64>(reply)? {
                    1 => OrphanResult::Marked,
                    0 => OrphanResult::Fresh,
                    _ => OrphanResult::Dangling,
                })
            })
            .collect()
    }

    /// Removes index entries. One batch of at most one ZREM per shard.
    pub(crate) async fn remove_from_index(
        &self,
        entries: &[StaleCandidate],
    ) -> Result<(), StoreError> {
        let mut members: Vec<Vec<&str>> = vec![Vec::new(); usize::from(INDEX_SHARDS)];
        for entry in entries {
            members[usize::from(entry.shard)].push(&entry.id);
        }
        let mut batch = Batch::default();
        for (shard, ids) in (0..INDEX_SHARDS).zip(&members) {
            if !ids.is_empty() {
                let key = self.keys.index(shard);
                let mut zrem = redis::cmd("ZREM");
                zrem.arg(&key).arg(ids.as_slice());
                batch.add_ignored(&key, zrem);
            }
        }
        self.run_batch(&batch, &[]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_id_hash_tag() {
        let keys = Keys::new("sse:".into());
        assert_eq!(keys.stream("abc"), "sse:{abc}");
        assert_eq!(keys.index(3), "sse:active:{3}");
    }

    #[test]
    fn owner_keys_encoded() {
        let keys = Keys::new("sse:".into());
        assert_eq!(keys.owner("user-1"), "sse:owner:{user-1}");
        assert_eq!(keys.owner("a@b.example"), "sse:owner:{a@b.example}");
        assert_eq!(keys.owner("a}b{c"), "sse:owner:{a%7Db%7Bc}");
        assert_eq!(keys.owner("*?[]%"), "sse:owner:{%2A%3F%5B%5D%25}");
        // Distinct owners never share a key, also when one looks encoded.
        assert_ne!(keys.owner("%41"), keys.owner("A"));
    }

    #[test]
    fn key_slot_matches_redis_rs() {
        // CRC16 test vector of the Redis Cluster specification: 0x31C3 % 16384.
        assert_eq!(key_slot(b"123456789"), 12739);
        let keys: [&[u8]; 9] = [
            b"foo",
            b"sse:{abc}",
            b"sse:{abc}:log",
            b"sse:active:{7}",
            b"{}",
            b"a{}b{c}",
            b"a{b",
            b"{b}}{c}",
            b"",
        ];
        for key in keys {
            assert_eq!(
                Route::new(key_slot(key), SlotAddr::Master),
                Route::with_key(key, SlotAddr::Master),
                "slot of {:?}",
                String::from_utf8_lossy(key)
            );
        }
        let keys = Keys::new("sse:".into());
        assert_eq!(
            key_slot(keys.stream("abc").as_bytes()),
            key_slot(keys.log("abc").as_bytes())
        );
    }

    fn slots_reply(ranges: &[(u16, u16, &str, u16)]) -> Value {
        Value::Array(
            ranges
                .iter()
                .map(|&(first, last, host, port)| {
                    Value::Array(vec![
                        Value::Int(i64::from(first)),
                        Value::Int(i64::from(last)),
                        Value::Array(vec![
                            Value::BulkString(host.as_bytes().to_vec()),
                            Value::Int(i64::from(port)),
                            Value::BulkString(b"node-id".to_vec()),
                        ]),
                    ])
                })
                .collect(),
        )
    }

    #[test]
    fn batch_groups_by_master() {
        let reply = slots_reply(&[
            (0, 5460, "127.0.0.1", 7000),
            (5461, 10922, "127.0.0.1", 7001),
            (10923, 12000, "127.0.0.1", 7002),
            (12001, 16383, "127.0.0.1", 7000),
        ]);
        let owners = SlotOwners::from_cluster_slots(reply).unwrap();
        let mut batch = Batch::default();
        // Slots 12182 (7000, second range), 1584 (7000), 5649 (7001), 13907 (7000).
        for key in ["foo", "sse:{3}", "sse:{2}", "sse:{0}"] {
            batch.add(key, redis::cmd("GET"));
        }
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"sse:{3}"), 1584);
        assert_eq!(key_slot(b"sse:{2}"), 5649);
        assert_eq!(key_slot(b"sse:{0}"), 13907);
        let groups = owners.group(&batch, &[0, 1, 2, 3]);
        assert_eq!(
            groups,
            vec![
                NodeGroup {
                    route: Route::new(12182, SlotAddr::Master),
                    commands: vec![0, 1, 3],
                },
                NodeGroup {
                    route: Route::new(5649, SlotAddr::Master),
                    commands: vec![2],
                },
            ]
        );
        assert_eq!(owners.group(&batch, &[2]).len(), 1);
        assert!(owners.group(&batch, &[]).is_empty());
    }

    #[test]
    fn unserved_slots_get_own_groups() {
        let owners =
            SlotOwners::from_cluster_slots(slots_reply(&[(0, 100, "127.0.0.1", 7000)])).unwrap();
        let mut batch = Batch::default();
        batch.add("foo", redis::cmd("GET"));
        batch.add("123456789", redis::cmd("GET"));
        batch.add("{123456789}x", redis::cmd("GET"));
        let groups = owners.group(&batch, &[0, 1, 2]);
        assert_eq!(groups.len(), 2);
        assert_eq!(groups[0].commands, vec![0]);
        assert_eq!(groups[1].commands, vec![1, 2]);
    }

    #[test]
    fn bad_cluster_slots_rejected() {
        let out_of_range = slots_reply(&[(0, 16384, "127.0.0.1", 7000)]);
        assert!(SlotOwners::from_cluster_slots(out_of_range).is_err());
        let reversed = slots_reply(&[(10, 5, "127.0.0.1", 7000)]);
        assert!(SlotOwners::from_cluster_slots(reversed).is_err());
        let no_master = Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(5)])]);
        assert!(SlotOwners::from_cluster_slots(no_master).is_err());
        assert!(SlotOwners::from_cluster_slots(Value::Int(1)).is_err());
    }

    #[test]
    fn batch_drops_ignored_replies() {
        let mut batch = Batch::default();
        batch.add("a", redis::cmd("GET"));
        batch.add_ignored("b", redis::cmd("PEXPIRE"));
        batch.add("c", redis::cmd("GET"));
        let kept = batch.drop_ignored_replies(vec![Value::Int(1), Value::Int(2), Value::Int(3)]);
        assert_eq!(kept, vec![Value::Int(1), Value::Int(3)]);
        assert_eq!(batch.pipeline(&[2, 0]).cmd_iter().count(), 2);
    }

    #[tokio::test]
    async fn join_all_keeps_order() {
        let outputs = join_all((0..5u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(10 * (5 - i))).await;
            i
        }))
        .await;
        assert_eq!(outputs, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("abc"), shard_of("abc"));
        let mut seen = [false; INDEX_SHARDS as usize];
        for i in 0..1000 {
            seen[usize::from(shard_of(&format!("stream-{i}")))] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
