//! The Redis store: key names, scripts, and the commands the layer and the guardian send.

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, LazyLock},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use redis::{RedisError, Script, Value, aio::ConnectionLike};

use crate::terminal::Outcome;

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
static ORPHAN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("scripts/orphan.lua")));

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

    fn unexpected(what: impl Into<String>) -> Self {
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
}

/// The fields of a request that opens or resumes a stream.
#[derive(Debug)]
pub(crate) struct OpenRequest {
    pub id: Arc<str>,
    pub owner: String,
    pub last_event_id: String,
    pub claim: Arc<str>,
    pub instance: Arc<str>,
    pub stream_type: Arc<str>,
    pub metadata: String,
    pub live_ttl: Duration,
    pub stale_threshold: Duration,
    /// The layer keeps event logs: live streams, and ended ones asked with a
    /// Last-Event-ID, are followed instead of answered 409 or replayed.
    pub follow: bool,
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
}

/// One live stream in a refresh pipeline.
#[derive(Clone, Debug)]
pub(crate) struct RefreshEntry {
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub shard: u16,
}

/// The result of refreshing one stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefreshResult {
    Refreshed,
    Missing,
    NotOurs,
}

/// The storage operations of the layer. The Redis implementation is
/// [`RedisStore`]; the layer keeps it as a trait object so that its public
/// types do not carry the connection type.
pub(crate) trait Store: Send + Sync + 'static {
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>>;
    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>>;
    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>>;
    /// Refreshes `live` streams and updates the index: `added` and `live` get
    /// score `now`, `removed` leave it. One pipeline.
    fn refresh(
        &self,
        live: Vec<RefreshEntry>,
        added: Vec<RefreshEntry>,
        removed: Vec<RefreshEntry>,
        live_ttl: Duration,
    ) -> BoxFuture<Result<Vec<RefreshResult>, StoreError>>;
    /// Appends events to the logs of several streams. One pipeline.
    fn append(
        &self,
        batches: Vec<AppendBatch>,
        limits: LogLimits,
    ) -> BoxFuture<Result<Vec<i64>, StoreError>>;
    /// Reads the logs of several followers. One pipeline.
    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>>;
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

/// The store on a Redis connection (a `ConnectionManager`, or any clonable
/// `ConnectionLike`).
pub(crate) struct RedisStore<C> {
    conn: C,
    keys: Keys,
    timeout: Duration,
}

impl<C> RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(conn: C, keys: Keys, timeout: Duration) -> Self {
        Self {
            conn,
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

    /// Runs a pipeline that invokes scripts; loads the scripts and retries
    /// once when Redis replies NOSCRIPT (after a restart or SCRIPT FLUSH).
    pub(crate) async fn query_script_pipeline(
        &self,
        pipe: &redis::Pipeline,
        scripts: &[&Script],
    ) -> Result<Vec<Value>, StoreError> {
        let mut conn = self.conn.clone();
        match self.timed(pipe.query_async::<Vec<Value>>(&mut conn)).await {
            Err(error) if is_no_script(&error) => {
                for script in scripts {
                    self.timed(script.prepare_invoke().load_async(&mut conn))
                        .await?;
                }
                self.timed(pipe.query_async::<Vec<Value>>(&mut conn)).await
            }
            other => other,
        }
    }

    pub(crate) fn clone_store(&self) -> Self {
        Self {
            conn: self.conn.clone(),
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

impl<C> Store for RedisStore<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    fn open(&self, request: OpenRequest) -> BoxFuture<Result<OpenDecision, StoreError>> {
        let key = self.keys.stream(&request.id);
        let log_key = self.keys.log(&request.id);
        let mut conn = self.conn.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut invocation = OPEN.prepare_invoke();
            invocation
                .key(key)
                .key(log_key)
                .arg(now_ms())
                .arg(&request.owner)
                .arg(&request.last_event_id)
                .arg(&*request.claim)
                .arg(&*request.instance)
                .arg(&*request.stream_type)
                .arg(&request.metadata)
                .arg(millis(request.live_ttl))
                .arg(&*request.id)
                .arg(millis(request.stale_threshold))
                .arg(if request.follow { "1" } else { "0" });
            let reply: Vec<Value> =
                match tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(StoreError::timeout(timeout)),
                };
            parse_open_reply(reply)
        })
    }

    fn complete(&self, completion: Completion) -> BoxFuture<Result<CompleteResult, StoreError>> {
        let key = self.keys.stream(&completion.id);
        let log_key = self.keys.log(&completion.id);
        let mut conn = self.conn.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut invocation = COMPLETE.prepare_invoke();
            invocation
                .key(key)
                .key(log_key)
                .arg(&*completion.claim)
                .arg(completion.outcome.as_str())
                .arg(completion.event.as_ref())
                .arg(completion.event_id.as_deref().unwrap_or(""))
                .arg(completion.reason.unwrap_or(""))
                .arg(if completion.truncated { "1" } else { "0" })
                .arg(now_ms())
                .arg(millis(completion.ttl))
                .arg(completion.log_seq);
            let reply: i64 =
                match tokio::time::timeout(timeout, invocation.invoke_async(&mut conn)).await {
                    Ok(result) => result?,
                    Err(_) => return Err(StoreError::timeout(timeout)),
                };
            Ok(match reply {
                1 => CompleteResult::Recorded,
                0 => CompleteResult::AlreadyRecorded,
                _ => CompleteResult::NotOurs,
            })
        })
    }

    fn release(&self, id: Arc<str>, claim: Arc<str>) -> BoxFuture<Result<bool, StoreError>> {
        let key = self.keys.stream(&id);
        let log_key = self.keys.log(&id);
        let mut conn = self.conn.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let mut invocation = RELEASE.prepare_invoke();
            invocation.key(key).key(log_key).arg(&*claim);
            match tokio::time::timeout(timeout, invocation.invoke_async::<i64>(&mut conn)).await {
                Ok(result) => Ok(result? == 1),
                Err(_) => Err(StoreError::timeout(timeout)),
            }
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
            let mut pipe = redis::pipe();

            for entry in &live {
                let mut invocation = REFRESH.prepare_invoke();
                invocation
                    .key(store.keys.stream(&entry.id))
                    .key(store.keys.log(&entry.id))
                    .arg(now)
                    .arg(ttl_ms)
                    .arg(&*entry.claim);
                pipe.invoke_script(&invocation);
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
                pipe.add_command(zadd).ignore();
                pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
            }
            let mut gone: Vec<Vec<&str>> = vec![Vec::new(); usize::from(INDEX_SHARDS)];
            for entry in &removed {
                gone[usize::from(entry.shard)].push(&entry.id);
            }
            for (shard, ids) in gone.iter().enumerate() {
                if !ids.is_empty() {
                    pipe.cmd("ZREM")
                        .arg(store.keys.index(shard as u16))
                        .arg(ids.as_slice())
                        .ignore();
                }
            }
            if pipe.is_empty() {
                return Ok(Vec::new());
            }

            let replies = store.query_script_pipeline(&pipe, &[&REFRESH]).await?;
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
            let mut pipe = redis::pipe();
            for batch in &batches {
                let mut invocation = APPEND.prepare_invoke();
                invocation
                    .key(store.keys.stream(&batch.id))
                    .key(store.keys.log(&batch.id))
                    .arg(limits.max_events)
                    .arg(limits.max_bytes)
                    .arg(millis(limits.ttl))
                    .arg(&*batch.claim);
                for entry in &batch.entries {
                    invocation
                        .arg(entry.seq)
                        .arg(entry.event_id.as_deref().unwrap_or(""))
                        .arg(entry.event.as_ref())
                        .arg(if entry.terminal { "1" } else { "0" });
                }
                pipe.invoke_script(&invocation);
            }
            if pipe.is_empty() {
                return Ok(Vec::new());
            }
            let replies = store.query_script_pipeline(&pipe, &[&APPEND]).await?;
            replies
                .into_iter()
                .map(|reply| Ok(redis::from_redis_value::<i64>(reply)?))
                .collect()
        })
    }

    fn follow(&self, queries: Vec<FollowQuery>) -> BoxFuture<Result<Vec<FollowReply>, StoreError>> {
        let store = self.clone_store();
        Box::pin(async move {
            let mut pipe = redis::pipe();
            for query in &queries {
                let mut invocation = FOLLOW.prepare_invoke();
                invocation
                    .key(store.keys.stream(&query.id))
                    .key(store.keys.log(&query.id))
                    .arg(query.cursor)
                    .arg(query.seek.as_deref().unwrap_or(""))
                    .arg(query.max_entries);
                pipe.invoke_script(&invocation);
            }
            if pipe.is_empty() {
                return Ok(Vec::new());
            }
            let replies = store.query_script_pipeline(&pipe, &[&FOLLOW]).await?;
            replies.into_iter().map(parse_follow_reply).collect()
        })
    }
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
    /// Lists up to `limit` index entries per shard whose score is at or before `cutoff_ms`. One pipeline.
    pub(crate) async fn stale_candidates(
        &self,
        cutoff_ms: u64,
        limit: usize,
    ) -> Result<Vec<StaleCandidate>, StoreError> {
        let mut pipe = redis::pipe();
        for shard in 0..INDEX_SHARDS {
            pipe.cmd("ZRANGEBYSCORE")
                .arg(self.keys.index(shard))
                .arg("-inf")
                .arg(cutoff_ms)
                .arg("LIMIT")
                .arg(0)
                .arg(limit);
        }
        let mut conn = self.conn.clone();
        let replies: Vec<Vec<String>> = self.timed(pipe.query_async(&mut conn)).await?;
        Ok(replies
            .into_iter()
            .enumerate()
            .flat_map(|(shard, ids)| {
                ids.into_iter().map(move |id| StaleCandidate {
                    shard: shard as u16,
                    id,
                })
            })
            .collect())
    }

    /// Runs the orphan script for every candidate. One pipeline.
    pub(crate) async fn mark_orphans(
        &self,
        candidates: &[StaleCandidate],
        events: &[Bytes],
        event_id: &str,
        cutoff_ms: u64,
        completion_ttl: Duration,
    ) -> Result<Vec<OrphanResult>, StoreError> {
        let now = now_ms();
        let mut pipe = redis::pipe();
        for (candidate, event) in candidates.iter().zip(events) {
            let mut invocation = ORPHAN.prepare_invoke();
            invocation
                .key(self.keys.stream(&candidate.id))
                .key(self.keys.log(&candidate.id))
                .arg(cutoff_ms)
                .arg(event.as_ref())
                .arg(event_id)
                .arg(now)
                .arg(millis(completion_ttl));
            pipe.invoke_script(&invocation);
        }
        let replies = self.query_script_pipeline(&pipe, &[&ORPHAN]).await?;
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

    /// Removes index entries. One pipeline.
    pub(crate) async fn remove_from_index(
        &self,
        entries: &[StaleCandidate],
    ) -> Result<(), StoreError> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for entry in entries {
            pipe.cmd("ZREM")
                .arg(self.keys.index(entry.shard))
                .arg(&entry.id)
                .ignore();
        }
        let mut conn = self.conn.clone();
        self.timed(pipe.query_async::<()>(&mut conn)).await
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
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("abc"), shard_of("abc"));
        let mut seen = [false; INDEX_SHARDS as usize];
        for i in 0..1000 {
            seen[usize::from(shard_of(&format!("stream-{i}")))] = true;
        }
        assert!(seen.iter().all(|s| *s));
    }
}
