//! Read-only views of the streams stored under one key prefix, for operator
//! tools such as the `sse-resilience` command.
//!
//! An [`Inspector`] finds streams by scanning for their hashes
//! (`{prefix}{<id>}`) with `SCAN`, on every master of a Redis Cluster, so it
//! finds finished streams as well as live ones. A scan walks every key of the
//! database in batches: it costs about one round trip per 1,000 keys (the
//! `COUNT` hint of `SCAN`), plus one pipeline per batch that contains stream
//! hashes. Nothing is written.
//!
//! # Example
//!
//! ```no_run
//! # async fn run(redis: redis::aio::ConnectionManager) -> Result<(), sse_resilience::StoreError> {
//! use sse_resilience::inspect::Inspector;
//!
//! let inspector = Inspector::new(redis).key_prefix("sse:");
//! for stream in inspector.list().await? {
//!     println!("{} {} {:?}", stream.id, stream.state, stream.age);
//! }
//! let stats = inspector.stats().await?;
//! println!("{} live, {} stale", stats.live, stats.stale);
//! # Ok(())
//! # }
//! ```

use std::{any::Any, fmt, future::Future, sync::Arc, time::Duration};

use redis::{
    Cmd, FromRedisValue, Pipeline, RedisError, Value,
    aio::ConnectionLike,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};
use serde_json::json;

use crate::{
    config::{
        DEFAULT_KEY_PREFIX, DEFAULT_REDIS_TIMEOUT, DEFAULT_STALE_THRESHOLD, require_non_zero,
    },
    request::validate_stream_id,
    store::{INDEX_SHARDS, Keys, SlotOwners, StoreError, now_ms},
};

/// The `COUNT` hint of each `SCAN` call: about how many keys one call examines.
const SCAN_COUNT: usize = 1000;

/// The hash fields read for every stream in a listing.
const SUMMARY_FIELDS: [&str; 10] = [
    "id",
    "state",
    "owner",
    "type",
    "instance",
    "started_at",
    "last_refresh",
    "stale_ms",
    "finished_at",
    "reason",
];

/// Reads the registry of streams under one key prefix.
///
/// Created on the same kind of connection as the layer: a
/// [`redis::aio::ConnectionManager`] for one Redis, or a
/// [`redis::cluster_async::ClusterConnection`] for a Redis Cluster.
#[derive(Clone)]
pub struct Inspector<C> {
    conn: C,
    cluster: Option<ClusterConnection>,
    keys: Keys,
    prefix: Arc<str>,
    stale_threshold: Duration,
    redis_timeout: Duration,
}

/// The state of a stream, with claimed streams split into live and stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum StreamState {
    /// Claimed, and refreshed within its stale threshold.
    Live,
    /// Claimed, but not refreshed for longer than its stale threshold: its
    /// process probably died, and a guardian will mark it orphaned.
    Stale,
    /// Marked orphaned by a guardian.
    Orphaned,
    /// Ended by a terminal event of the `completed` outcome.
    Completed,
    /// Ended as failed: a failing terminal event, a body error, a drain
    /// timeout, a shutdown or another reason stored in the `reason` field.
    Failed,
}

impl StreamState {
    /// Returns the state's name: `live`, `stale`, `orphaned`, `completed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamState::Live => "live",
            StreamState::Stale => "stale",
            StreamState::Orphaned => "orphaned",
            StreamState::Completed => "completed",
            StreamState::Failed => "failed",
        }
    }

    /// Returns true for a stream that has ended: orphaned, completed or failed.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            StreamState::Orphaned | StreamState::Completed | StreamState::Failed
        )
    }
}

impl fmt::Display for StreamState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One stream of a listing: its registry fields at the time of the read.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream id.
    pub id: String,
    /// The state, with `active` streams split into live and stale.
    pub state: StreamState,
    /// The owner, `None` for a stream without one.
    pub owner: Option<String>,
    /// The stream type the layer stored.
    pub stream_type: String,
    /// The instance id of the layer that claimed the stream.
    pub instance: String,
    /// Start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// Time since the start.
    pub age: Duration,
    /// Time since the last refresh; `None` for a finished stream.
    pub since_refresh: Option<Duration>,
    /// End time of a finished stream, milliseconds since the Unix epoch.
    pub finished_at_ms: Option<u64>,
    /// The reason a stream failed or was orphaned (`orphaned`, `shutdown`,
    /// `body_error`...); `None` when the service sent the terminal event.
    pub reason: Option<String>,
}

/// One stream with its stored terminal event, as `streams show` prints it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamDetails {
    /// The registry fields.
    pub summary: StreamSummary,
    /// The metadata JSON stored with the stream.
    pub metadata: Option<String>,
    /// The stored terminal event, as the client receives it on replay
    /// (invalid UTF-8 replaced); `None` while the stream runs.
    pub terminal_event: Option<String>,
    /// The id of the terminal event (`_end` for a synthetic one).
    pub terminal_id: Option<String>,
    /// True when the stored terminal event was cut at the layer's maximum event size.
    pub truncated: bool,
    /// Events in the stream's event log; 0 without a log.
    pub logged_events: u64,
    /// Time until the stream's keys expire.
    pub expires_in: Option<Duration>,
}

/// Counts of the streams under one key prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamStats {
    /// Streams claimed and refreshed in time.
    pub live: u64,
    /// Streams claimed but not refreshed in time.
    pub stale: u64,
    /// Streams marked orphaned.
    pub orphaned: u64,
    /// Streams that completed.
    pub completed: u64,
    /// Streams that failed.
    pub failed: u64,
    /// Entries of the active-stream index, over all shards. More entries than
    /// live and stale streams means dangling entries, which guardians remove.
    pub index_entries: u64,
}

impl StreamStats {
    /// Returns the number of streams of every state.
    pub fn total(&self) -> u64 {
        self.live + self.stale + self.orphaned + self.completed + self.failed
    }

    /// Returns the counts as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "live": self.live,
            "stale": self.stale,
            "orphaned": self.orphaned,
            "completed": self.completed,
            "failed": self.failed,
            "total": self.total(),
            "index_entries": self.index_entries,
        })
    }
}

impl StreamSummary {
    /// Returns the summary as a JSON object; durations are in milliseconds.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "id": self.id,
            "state": self.state.as_str(),
            "owner": self.owner,
            "type": self.stream_type,
            "instance": self.instance,
            "started_at_ms": self.started_at_ms,
            "age_ms": millis(self.age),
            "since_refresh_ms": self.since_refresh.map(millis),
            "finished_at_ms": self.finished_at_ms,
            "reason": self.reason,
        })
    }
}

impl StreamDetails {
    /// Returns the details as a JSON object: the summary's fields and the
    /// stored terminal event.
    pub fn to_json(&self) -> serde_json::Value {
        let mut value = self.summary.to_json();
        let object = value.as_object_mut().expect("a summary is a JSON object");
        object.insert("metadata".into(), json!(self.metadata));
        object.insert("terminal_event".into(), json!(self.terminal_event));
        object.insert("terminal_id".into(), json!(self.terminal_id));
        object.insert("truncated".into(), json!(self.truncated));
        object.insert("logged_events".into(), json!(self.logged_events));
        object.insert("expires_in_ms".into(), json!(self.expires_in.map(millis)));
        value
    }
}

impl<C> Inspector<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    /// Creates an inspector on a Redis connection.
    pub fn new(redis: C) -> Self {
        let cluster = (&redis as &dyn Any)
            .downcast_ref::<ClusterConnection>()
            .cloned();
        let prefix: Arc<str> = DEFAULT_KEY_PREFIX.into();
        Self {
            conn: redis,
            cluster,
            keys: Keys::new(prefix.clone()),
            prefix,
            stale_threshold: DEFAULT_STALE_THRESHOLD,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
        }
    }

    /// Sets the key prefix. Default: `sse:`. Use the layer's value.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        self.prefix = prefix.into();
        self.keys = Keys::new(self.prefix.clone());
        self
    }

    /// Sets the stale threshold applied to streams whose layer did not store
    /// its own. Default: 30 s. Streams store their layer's threshold, which
    /// takes precedence.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn stale_threshold(mut self, threshold: Duration) -> Self {
        require_non_zero("stale_threshold", threshold);
        self.stale_threshold = threshold;
        self
    }

    /// Sets the time-out of one Redis round trip. Default: 2 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        require_non_zero("redis_timeout", timeout);
        self.redis_timeout = timeout;
        self
    }

    /// Lists every stream under the key prefix, newest first.
    pub async fn list(&self) -> Result<Vec<StreamSummary>, StoreError> {
        let mut streams = Vec::new();
        for node in self.nodes().await? {
            self.scan_node(&node, &mut streams).await?;
        }
        streams.sort_by(|a, b| {
            b.started_at_ms
                .cmp(&a.started_at_ms)
                .then_with(|| a.id.cmp(&b.id))
        });
        Ok(streams)
    }

    /// Reads one stream with its stored terminal event. Returns `None` when
    /// no stream has this id, which includes every id the layer rejects.
    pub async fn stream(&self, id: &str) -> Result<Option<StreamDetails>, StoreError> {
        if validate_stream_id(id).is_err() {
            return Ok(None);
        }
        let key = self.keys.stream(id);
        let mut pipe = redis::pipe();
        pipe.cmd("HGETALL")
            .arg(&key)
            .cmd("XLEN")
            .arg(self.keys.log(id))
            .cmd("PTTL")
            .arg(&key);
        // Both keys share the id's hash tag, so the pipeline goes to one node.
        let node = match &self.cluster {
            None => Node::Single,
            Some(_) => Node::Master(Route::with_key(key.as_bytes(), SlotAddr::Master)),
        };
        let replies = self.pipeline_on(&node, &pipe).await?;
        let [fields, log_len, ttl]: [Value; 3] =
            replies.try_into().map_err(|replies: Vec<_>| {
                StoreError::unexpected(format!("{} replies to a pipeline of 3", replies.len()))
            })?;

        let fields: Vec<(String, Vec<u8>)> = redis::from_redis_value(fields)?;
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| -> Option<Vec<u8>> {
            fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.clone())
        };
        let text =
            |name: &str| field(name).map(|value| String::from_utf8_lossy(&value).into_owned());
        let summary_values: Vec<Option<String>> =
            SUMMARY_FIELDS.iter().map(|name| text(name)).collect();
        let Some(summary) = self.summary(id, summary_values, now_ms()) else {
            return Ok(None);
        };

        let log_len: u64 = redis::from_redis_value(log_len)?;
        let ttl: i64 = redis::from_redis_value(ttl)?;
        let terminal_event = if summary.state.is_finished() {
            text("terminal_event").filter(|event| !event.is_empty())
        } else {
            None
        };
        Ok(Some(StreamDetails {
            metadata: text("metadata").filter(|metadata| !metadata.is_empty()),
            terminal_id: terminal_event
                .as_ref()
                .and(text("terminal_id"))
                .filter(|id| !id.is_empty()),
            terminal_event,
            truncated: text("truncated").as_deref() == Some("1"),
            logged_events: log_len,
            expires_in: u64::try_from(ttl).ok().map(Duration::from_millis),
            summary,
        }))
    }

    /// Counts the streams under the key prefix by state, and the entries of
    /// the active-stream index.
    pub async fn stats(&self) -> Result<StreamStats, StoreError> {
        let mut stats = StreamStats::default();
        for stream in self.list().await? {
            let count = match stream.state {
                StreamState::Live => &mut stats.live,
                StreamState::Stale => &mut stats.stale,
                StreamState::Orphaned => &mut stats.orphaned,
                StreamState::Completed => &mut stats.completed,
                StreamState::Failed => &mut stats.failed,
            };
            *count += 1;
        }
        for shard in 0..INDEX_SHARDS {
            let key = self.keys.index(shard);
            let node = match &self.cluster {
                None => Node::Single,
                Some(_) => Node::Master(Route::with_key(key.as_bytes(), SlotAddr::Master)),
            };
            let entries: u64 = self.query_on(&node, redis::cmd("ZCARD").arg(&key)).await?;
            stats.index_entries += entries;
        }
        Ok(stats)
    }

    /// Returns the nodes to scan: the server, or every master of a cluster.
    async fn nodes(&self) -> Result<Vec<Node>, StoreError> {
        let Some(cluster) = &self.cluster else {
            return Ok(vec![Node::Single]);
        };
        let mut conn = cluster.clone();
        let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::RandomPrimary);
        let reply = self
            .timed(conn.route_command(redis::cmd("CLUSTER").arg("SLOTS").clone(), routing))
            .await?;
        let owners = SlotOwners::from_cluster_slots(reply)?;
        Ok(owners
            .master_routes()
            .into_iter()
            .map(Node::Master)
            .collect())
    }

    /// Scans one node for stream hashes and appends their summaries.
    async fn scan_node(&self, node: &Node, out: &mut Vec<StreamSummary>) -> Result<(), StoreError> {
        let pattern = format!("{}{{*}}", escape_glob(&self.prefix));
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .arg("TYPE")
                .arg("hash");
            let (next, keys): (u64, Vec<String>) = self.query_on(node, &scan).await?;
            let ids: Vec<&str> = keys
                .iter()
                .filter_map(|key| id_of_key(&self.prefix, key))
                .collect();
            if !ids.is_empty() {
                let mut pipe = redis::pipe();
                for id in &ids {
                    pipe.cmd("HMGET")
                        .arg(self.keys.stream(id))
                        .arg(&SUMMARY_FIELDS[..]);
                }
                let replies = self.pipeline_on(node, &pipe).await?;
                let now = now_ms();
                for (id, reply) in ids.iter().zip(replies) {
                    let values: Vec<Option<String>> = redis::from_redis_value(reply)?;
                    // A hash that expired between the scan and the read has no fields left.
                    if let Some(summary) = self.summary(id, values, now) {
                        out.push(summary);
                    }
                }
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Builds a summary from the values of [`SUMMARY_FIELDS`], in order.
    /// Returns `None` for a hash without a known state or whose `id` field
    /// names another stream (a key of another prefix that matched the scan).
    fn summary(&self, id: &str, values: Vec<Option<String>>, now: u64) -> Option<StreamSummary> {
        let [
            stored_id,
            state,
            owner,
            stream_type,
            instance,
            started_at,
            last_refresh,
            stale_ms,
            finished_at,
            reason,
        ]: [Option<String>; 10] = values.try_into().ok()?;
        if stored_id.as_deref().is_some_and(|stored| stored != id) {
            return None;
        }
        let number = |value: &Option<String>| value.as_deref().and_then(|v| v.parse::<u64>().ok());
        let started_at_ms = number(&started_at).unwrap_or(0);
        let last_refresh_ms = number(&last_refresh);
        let since_refresh = last_refresh_ms.map(|at| Duration::from_millis(now.saturating_sub(at)));
        let threshold = number(&stale_ms)
            .map(Duration::from_millis)
            .unwrap_or(self.stale_threshold);

        let state = match state.as_deref()? {
            "active" if since_refresh.is_some_and(|since| since > threshold) => StreamState::Stale,
            "active" => StreamState::Live,
            "orphaned" => StreamState::Orphaned,
            "completed" => StreamState::Completed,
            "failed" => StreamState::Failed,
            other => {
                tracing::debug!(
                    stream_id = id,
                    state = other,
                    "skipping a stream of unknown state"
                );
                return None;
            }
        };
        Some(StreamSummary {
            id: id.to_owned(),
            state,
            owner: owner.filter(|owner| !owner.is_empty()),
            stream_type: stream_type.unwrap_or_default(),
            instance: instance.unwrap_or_default(),
            started_at_ms,
            age: Duration::from_millis(now.saturating_sub(started_at_ms)),
            since_refresh: (!state.is_finished()).then_some(since_refresh).flatten(),
            finished_at_ms: number(&finished_at),
            reason: reason.filter(|reason| !reason.is_empty()),
        })
    }

    async fn query_on<T: FromRedisValue>(&self, node: &Node, cmd: &Cmd) -> Result<T, StoreError> {
        let value = match (node, &self.cluster) {
            (Node::Master(route), Some(cluster)) => {
                let mut conn = cluster.clone();
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(*route));
                self.timed(conn.route_command(cmd.clone(), routing)).await?
            }
            _ => {
                let mut conn = self.conn.clone();
                self.timed(cmd.query_async::<Value>(&mut conn)).await?
            }
        };
        Ok(redis::from_redis_value(value)?)
    }

    async fn pipeline_on(&self, node: &Node, pipe: &Pipeline) -> Result<Vec<Value>, StoreError> {
        match (node, &self.cluster) {
            (Node::Master(route), Some(cluster)) => {
                let mut conn = cluster.clone();
                let count = pipe.cmd_iter().count();
                let routing = SingleNodeRoutingInfo::SpecificNode(*route);
                self.timed(conn.route_pipeline(pipe.clone(), 0, count, routing))
                    .await
            }
            _ => {
                let mut conn = self.conn.clone();
                self.timed(pipe.query_async::<Vec<Value>>(&mut conn)).await
            }
        }
    }

    async fn timed<T>(
        &self,
        call: impl Future<Output = Result<T, RedisError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.redis_timeout, call).await {
            Ok(result) => result.map_err(StoreError::from),
            Err(_) => Err(StoreError::timeout(self.redis_timeout)),
        }
    }
}

impl<C> fmt::Debug for Inspector<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inspector")
            .field("key_prefix", &self.prefix)
            .field("cluster", &self.cluster.is_some())
            .field("stale_threshold", &self.stale_threshold)
            .field("redis_timeout", &self.redis_timeout)
            .finish_non_exhaustive()
    }
}

/// The target of a command: the single server, or one master of a cluster.
enum Node {
    Single,
    Master(Route),
}

/// Returns the stream id of a hash key `{prefix}{<id>}`, or `None` for a key
/// of another shape.
fn id_of_key<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let id = key
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    validate_stream_id(id).ok().map(|()| id)
}

/// Escapes the characters that are special in a Redis glob pattern.
fn escape_glob(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(escape_glob("sse:"), "sse:");
        assert_eq!(escape_glob("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[test]
    fn ids_come_from_hash_keys_only() {
        assert_eq!(id_of_key("sse:", "sse:{abc}"), Some("abc"));
        assert_eq!(id_of_key("sse:", "sse:{abc}:log"), None);
        assert_eq!(id_of_key("sse:", "sse:active:{3}"), None);
        assert_eq!(id_of_key("sse:", "other:{abc}"), None);
        assert_eq!(id_of_key("sse:", "sse:{a b}"), None);
        assert_eq!(id_of_key("sse:", "sse:{}"), None);
    }

    #[test]
    fn each_master_is_scanned_once() {
        let range = |first: i64, last: i64, port: i64| {
            Value::Array(vec![
                Value::Int(first),
                Value::Int(last),
                Value::Array(vec![
                    Value::BulkString(b"127.0.0.1".to_vec()),
                    Value::Int(port),
                ]),
            ])
        };
        let reply = Value::Array(vec![
            range(101, 200, 7001),
            range(0, 100, 7000),
            range(201, 16383, 7000),
        ]);
        let routes = SlotOwners::from_cluster_slots(reply)
            .unwrap()
            .master_routes();
        assert_eq!(
            routes,
            vec![
                Route::new(0, SlotAddr::Master),
                Route::new(101, SlotAddr::Master)
            ]
        );
    }
}
