//! The layer and its builder.

use std::{
    fmt,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http::HeaderName;
use redis::aio::ConnectionLike;
use tower_layer::Layer;

use bytes::Bytes;

use crate::{
    MemoryStore,
    config::{Config, heartbeat_frame, require_non_zero, retry_frame},
    follow::FollowPoller,
    log::{EventLog, LogWriter},
    registry::Registry,
    request::{OwnerSource, StreamIdSource},
    service::SseResilience,
    shutdown::{ShutdownHandle, ShutdownSignal},
    status::StreamStatusService,
    store::{CountingStore, Keys, RedisStore, Store},
    terminal::TerminalRule,
};

/// A tower layer that makes `text/event-stream` responses resilient.
///
/// For every stream request it checks Redis once. A finished stream gets its
/// stored terminal event without a call to the inner service, and a stream
/// live elsewhere gets 409. Otherwise the stream is claimed and the inner
/// service is called. The response body is then watched: heartbeats
/// go out when it is idle, its terminal event is recorded, and a client that
/// drops early does not lose the result. See the crate documentation for the
/// whole picture and an example.
///
/// Every setting has a default; the builder methods document it.
#[derive(Clone)]
pub struct SseResilienceLayer {
    config: Config,
    store: Arc<dyn Store>,
    connect: Arc<ConnectStore>,
    shared: Arc<OnceLock<Arc<Shared>>>,
}

/// Builds the store of a layer for its settings (the key prefix and time-out).
type ConnectStore = dyn Fn(&Config) -> Arc<dyn Store> + Send + Sync;

/// State shared by every service and body of one layer.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) store: Arc<dyn Store>,
    /// Redis calls of this layer that failed or timed out.
    pub(crate) redis_errors: Arc<AtomicU64>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) log: Option<Arc<LogWriter>>,
    pub(crate) follow: Option<Arc<FollowPoller>>,
    pub(crate) shutdown: ShutdownSignal,
    pub(crate) retry_frame: Bytes,
    /// Stream ends being written or retried now.
    pub(crate) pending_completions: std::sync::atomic::AtomicUsize,
}

impl SseResilienceLayer {
    /// Creates the layer on a Redis connection: a
    /// [`redis::aio::ConnectionManager`] for one Redis, or a
    /// [`ReconnectingCluster`](crate::ReconnectingCluster) (or a plain
    /// [`redis::cluster_async::ClusterConnection`]) for a Redis Cluster.
    ///
    /// Any clonable [`ConnectionLike`] works: clones must share one
    /// connection or pool, as `ConnectionManager` clones do.
    pub fn new<C>(redis: C) -> Self
    where
        C: ConnectionLike + Clone + Send + Sync + 'static,
    {
        let connect = Arc::new(move |config: &Config| -> Arc<dyn Store> {
            Arc::new(RedisStore::new(
                redis.clone(),
                Keys::new(config.key_prefix.clone()),
                config.redis_timeout,
            ))
        });
        Self::with_connect(connect)
    }

    /// Creates the layer on a [`MemoryStore`] instead of Redis, for an app
    /// that runs as a single process. Build the app's
    /// [`StreamGuardian`](crate::StreamGuardian) on a clone of the same store.
    ///
    /// Everything else works as on Redis within the process: replays, 409,
    /// drains, the event log, resume and follow. The key prefix and the Redis
    /// time-out do not apply.
    pub fn with_memory_store(store: MemoryStore) -> Self {
        Self::with_connect(Arc::new(move |_: &Config| -> Arc<dyn Store> {
            Arc::new(store.clone())
        }))
    }

    fn with_connect(connect: Arc<ConnectStore>) -> Self {
        let config = Config::default();
        let store = connect(&config);
        Self {
            config,
            store,
            connect,
            shared: Arc::new(OnceLock::new()),
        }
    }

    /// Sets the idle time after which a heartbeat comment is sent. Default: 15 s.
    ///
    /// A heartbeat goes out only at an event boundary, never inside an event.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        require_non_zero("heartbeat_interval", interval);
        self.config.heartbeat_interval = Some(interval);
        self.changed()
    }

    /// Sets the text of the heartbeat comment. Default: `heartbeat`, sent as
    /// `:heartbeat` and a blank line.
    ///
    /// # Panics
    ///
    /// Panics when `comment` contains CR or LF, which would end the comment line.
    pub fn heartbeat_comment(mut self, comment: &str) -> Self {
        assert!(
            !comment.contains(['\r', '\n']),
            "invalid heartbeat comment {comment:?}: it must not contain CR or LF"
        );
        self.config.heartbeat_frame = heartbeat_frame(comment);
        self.changed()
    }

    /// Turns heartbeats off. They are on by default.
    pub fn without_heartbeats(mut self) -> Self {
        self.config.heartbeat_interval = None;
        self.changed()
    }

    /// Sets the age of the last refresh after which a guardian may mark a live
    /// stream orphaned. Default: 30 s. Live streams are refreshed every third
    /// of it, and their hash expires after ten times it without a refresh.
    ///
    /// Use the same value for the [`StreamGuardian`](crate::StreamGuardian).
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn stale_threshold(mut self, threshold: Duration) -> Self {
        require_non_zero("stale_threshold", threshold);
        self.config.stale_threshold = threshold;
        self.changed()
    }

    /// Sets the maximum lifetime of a stream; a stream still open after it is
    /// ended and recorded as failed with reason `max_lifetime_exceeded`.
    /// Default: 1 hour.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn max_stream_lifetime(mut self, lifetime: Duration) -> Self {
        require_non_zero("max_stream_lifetime", lifetime);
        self.config.max_stream_lifetime = lifetime;
        self.changed()
    }

    /// Sets how long a finished stream's terminal event is kept for replay.
    /// Default: 5 minutes. After it the id may be used for a new stream.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn completion_ttl(mut self, ttl: Duration) -> Self {
        require_non_zero("completion_ttl", ttl);
        self.config.completion_ttl = ttl;
        self.changed()
    }

    /// Sets how long the inner body is read after the client went away, so
    /// that its terminal event is still recorded. Default: 5 minutes. Zero
    /// stops at once and records the stream as failed with reason
    /// `client_disconnected`; past the timeout the reason is `drain_timeout`.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self.changed()
    }

    /// Sets the rule that recognizes terminal events. Default:
    /// [`TerminalRule::default`].
    pub fn terminal_rule(mut self, rule: TerminalRule) -> Self {
        self.config.terminal_rule = rule;
        self.changed()
    }

    /// Sets where the stream id is read. Default: the query parameter `stream_id`.
    pub fn stream_id_source(mut self, source: StreamIdSource) -> Self {
        self.config.id_source = source;
        self.changed()
    }

    /// Sets where the owner of a request is read. Default: no owner.
    pub fn owner_source(mut self, source: OwnerSource) -> Self {
        self.config.owner_source = source;
        self.changed()
    }

    /// Reads the owner from the request header `name`; shorthand for
    /// `owner_source(OwnerSource::Header(name))`.
    pub fn owner_header(self, name: HeaderName) -> Self {
        self.owner_source(OwnerSource::Header(name))
    }

    /// Sets the prefix of every Redis key the layer writes. Default: `sse:`.
    ///
    /// # Panics
    ///
    /// Panics when `prefix` contains `{` or `}`: the stream id must be the
    /// only Redis Cluster hash tag in a key.
    pub fn key_prefix(mut self, prefix: &str) -> Self {
        assert!(
            !prefix.contains(['{', '}']),
            "invalid key prefix {prefix:?}: it must not contain braces"
        );
        self.config.key_prefix = prefix.into();
        self.changed()
    }

    /// Sets the stream type stored in the registry. Default: `sse`.
    pub fn stream_type(mut self, stream_type: &str) -> Self {
        self.config.stream_type = stream_type.into();
        self.changed()
    }

    /// Sets the id of this app instance stored with its streams. Default: the
    /// process id and a random suffix.
    pub fn instance_id(mut self, instance_id: &str) -> Self {
        self.config.instance_id = instance_id.into();
        self.changed()
    }

    /// Sets the time-out of one Redis call. Default: 2 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn redis_timeout(mut self, timeout: Duration) -> Self {
        require_non_zero("redis_timeout", timeout);
        self.config.redis_timeout = timeout;
        self.changed()
    }

    /// Sets how many bytes of one event are kept while looking for the
    /// terminal event, and so the largest terminal event stored whole and
    /// the largest event logged. Default: 1 MiB.
    ///
    /// A larger terminal event still ends the stream. Replays and followers
    /// then get an event of the same type and id whose data is
    /// `{"type":<outcome>,"reason":"truncated","stream_id":<id>}`, and the
    /// stream's hash has `truncated` set to `1`.
    pub fn max_event_bytes(mut self, bytes: usize) -> Self {
        self.config.max_event_bytes = bytes;
        self.changed()
    }

    /// Turns the event log on: every event is appended to a Redis Stream per
    /// stream, a request with `Last-Event-ID` resumes after that event on any
    /// instance, and a request for a live stream follows it instead of getting
    /// 409. Off by default. See [`EventLog`] for its settings.
    pub fn event_log(mut self, settings: EventLog) -> Self {
        self.config.event_log = Some(settings);
        self.changed()
    }

    /// Sets the reconnection delay suggested to clients during a shutdown: the
    /// `retry:` hint of live responses and the `Retry-After` of refused
    /// requests (rounded up to whole seconds). Default: 1 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn shutdown_retry(mut self, delay: Duration) -> Self {
        require_non_zero("shutdown_retry", delay);
        self.config.shutdown_retry = delay;
        self.changed()
    }

    /// Sets how long the end of a stream is retried while Redis fails, with a
    /// backoff of up to 5 s between attempts. Default: 5 minutes. An end not
    /// written by then is left to the guardians, which mark the stream
    /// orphaned.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn completion_retry_window(mut self, window: Duration) -> Self {
        require_non_zero("completion_retry_window", window);
        self.config.completion_retry_window = window;
        self.changed()
    }

    /// Sets how many stream ends may wait for Redis at once, for the whole
    /// layer. Default: 10,000. Past it, a new end is not retried: it is left
    /// to the guardians, and an error is logged.
    pub fn max_pending_completions(mut self, max: usize) -> Self {
        self.config.max_pending_completions = max;
        self.changed()
    }

    /// Responds to stream requests with 503 and `Retry-After` when Redis fails
    /// or times out, instead of serving the stream untracked (fail open, the
    /// default). Responses that are not streams are not affected.
    pub fn fail_closed(mut self, fail_closed: bool) -> Self {
        self.config.fail_closed = fail_closed;
        self.changed()
    }

    /// Limits the live streams of one owner, counted in Redis across every
    /// instance that shares the key prefix. Off by default.
    ///
    /// A request that would start one more stream gets 429 with
    /// `Retry-After` (see [`owner_limit_retry`](Self::owner_limit_retry)).
    /// Replays, resumes and followers are not counted, and neither are
    /// streams without an owner. A stream counts from its claim until its end
    /// is recorded. The stream of a process that died stops counting one
    /// stale threshold after its last refresh. The check costs one more Redis
    /// round trip when a stream is claimed.
    ///
    /// # Panics
    ///
    /// Panics when `max` is zero.
    pub fn max_streams_per_owner(mut self, max: usize) -> Self {
        assert!(
            max > 0,
            "invalid max_streams_per_owner: it must be greater than zero"
        );
        self.config.max_streams_per_owner = Some(max);
        self.changed()
    }

    /// Sets the `Retry-After` of the 429 sent when an owner has too many live
    /// streams, rounded up to whole seconds. Default: 5 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn owner_limit_retry(mut self, delay: Duration) -> Self {
        require_non_zero("owner_limit_retry", delay);
        self.config.owner_limit_retry = delay;
        self.changed()
    }

    /// Ends a stream whose inner body dispatched no event for `timeout`, and
    /// records it as failed with reason `idle_timeout`. Off by default.
    ///
    /// Only a complete event that a client would dispatch counts as progress.
    /// Comment lines do not (the layer's heartbeats, and keep-alive comments
    /// such as axum's `KeepAlive` sends), nor do lines of an event that is
    /// not finished yet. The timeout also applies while a drain reads the
    /// body of a client that left.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        require_non_zero("idle_timeout", timeout);
        self.config.idle_timeout = Some(timeout);
        self.changed()
    }

    /// Returns the handle that shuts this layer down gracefully.
    ///
    /// Take it after the last builder call: a builder call afterwards starts
    /// a new layer state that this handle does not control.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle::new(self.shared())
    }

    /// Returns a service that responds with the recovery status of a stream as
    /// JSON, with this layer's store, stream id source and owner rule. See
    /// [`StreamStatusService`] for the responses.
    ///
    /// Take it after the last builder call, as the shutdown handle.
    pub fn status_service(&self) -> StreamStatusService {
        let shared = self.shared();
        StreamStatusService::new(
            shared.store.clone(),
            self.config.id_source.clone(),
            self.config.owner_source.clone(),
        )
    }

    /// Returns the number of Redis calls of this layer that failed or timed
    /// out since it started serving: opens, refresh pipelines, log appends,
    /// follower reads and each attempt to record an end.
    pub fn redis_errors(&self) -> u64 {
        self.shared
            .get()
            .map_or(0, |shared| shared.redis_errors.load(Ordering::Relaxed))
    }

    /// Returns the number of streams of this layer that are live now.
    pub fn live_streams(&self) -> usize {
        self.shared
            .get()
            .map_or(0, |shared| shared.registry.live_count())
    }

    /// Starts a fresh shared state, since the settings changed.
    fn changed(mut self) -> Self {
        self.store = (self.connect)(&self.config);
        self.shared = Arc::new(OnceLock::new());
        self
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared
            .get_or_init(|| {
                crate::metrics::describe_metrics();
                let redis_errors = Arc::new(AtomicU64::new(0));
                let store: Arc<dyn Store> =
                    Arc::new(CountingStore::new(self.store.clone(), redis_errors.clone()));
                let registry = Arc::new(Registry::new(
                    store.clone(),
                    self.config.refresh_interval(),
                    self.config.live_ttl(),
                ));
                let log = self.config.event_log.as_ref().map(|settings| {
                    Arc::new(LogWriter::new(
                        store.clone(),
                        settings,
                        self.config.live_ttl(),
                    ))
                });
                let follow = self.config.event_log.as_ref().map(|settings| {
                    Arc::new(FollowPoller::new(
                        store.clone(),
                        settings.follow_poll_interval,
                    ))
                });
                Arc::new(Shared {
                    config: self.config.clone(),
                    store,
                    redis_errors,
                    registry,
                    log,
                    follow,
                    shutdown: ShutdownSignal::default(),
                    retry_frame: retry_frame(self.config.shutdown_retry),
                    pending_completions: std::sync::atomic::AtomicUsize::new(0),
                })
            })
            .clone()
    }
}

impl<S> Layer<S> for SseResilienceLayer {
    type Service = SseResilience<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SseResilience::new(inner, self.shared())
    }
}

impl fmt::Debug for SseResilienceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseResilienceLayer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
