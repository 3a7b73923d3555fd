//! A Redis Cluster connection that replaces itself when it stops responding.

use std::{
    future::Future,
    io,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use redis::{
    Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value, aio::ConnectionLike,
    cluster::ClusterClient, cluster_async::ClusterConnection,
};

/// Default time a command may take before it counts as timed out. 2 s.
pub const DEFAULT_CLUSTER_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// Default number of timed-out commands in a row that make a
/// [`ReconnectingCluster`] open a new connection. 3.
pub const DEFAULT_RECONNECT_AFTER_TIMEOUTS: u32 = 3;
/// Default shortest time between two reconnections. 1 s.
pub const DEFAULT_MIN_RECONNECT_INTERVAL: Duration = Duration::from_secs(1);
/// Default time-out of opening a new cluster connection. 5 s.
pub const DEFAULT_RECONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A command dropped after waiting this long counts as timed out: the caller
/// gave up on it, usually through its own time-out. A time-out error from
/// redis-rs (its response time-out) counts too.
const ABANDONED_AFTER: Duration = Duration::from_millis(250);

/// A Redis Cluster connection that opens a new [`ClusterConnection`] from its
/// [`ClusterClient`] when commands keep timing out.
///
/// A `ClusterConnection` of redis-rs 1.8 that has commands in flight when a
/// master process dies can hang in its slot-map refresh: every later command
/// on it times out, even after a replica took the dead master's slots. This
/// type counts timed-out commands, and after
/// [`reconnect_after_timeouts`](ReconnectingClusterBuilder::reconnect_after_timeouts)
/// of them in a row (any reply resets the count) it opens a new connection
/// in the background and sends later commands there.
///
/// Pass it wherever a `ClusterConnection` is accepted:
/// [`SseResilienceLayer::new`](crate::SseResilienceLayer::new) and
/// [`StreamGuardian::new`](crate::StreamGuardian::new) route its commands by
/// node in the same way. Clones share one connection.
///
/// # Example
///
/// ```no_run
/// use sse_resilience::{ReconnectingCluster, SseResilienceLayer, StreamGuardian};
///
/// # async fn run() -> redis::RedisResult<()> {
/// let client = redis::cluster::ClusterClient::new(vec![
///     "redis://127.0.0.1:7000",
///     "redis://127.0.0.1:7001",
///     "redis://127.0.0.1:7002",
/// ])?;
/// let redis = ReconnectingCluster::connect(client).await?;
/// let layer = SseResilienceLayer::new(redis.clone());
/// let guardian = StreamGuardian::new(redis);
/// # let _ = (layer, guardian);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ReconnectingCluster {
    link: Arc<ClusterLink>,
}

impl ReconnectingCluster {
    /// Connects to the cluster with the default settings.
    ///
    /// # Errors
    ///
    /// Returns the error of the first connection, or a time-out error after
    /// [`DEFAULT_RECONNECT_TIMEOUT`].
    pub async fn connect(client: ClusterClient) -> RedisResult<Self> {
        Self::builder(client).connect().await
    }

    /// Starts a builder for the settings of the connection.
    pub fn builder(client: ClusterClient) -> ReconnectingClusterBuilder {
        ReconnectingClusterBuilder {
            client,
            settings: Settings::default(),
        }
    }

    /// Returns how many times a new connection replaced a hung one.
    pub fn reconnects(&self) -> u64 {
        self.link.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn link(&self) -> Arc<ClusterLink> {
        self.link.clone()
    }
}

impl std::fmt::Debug for ReconnectingCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingCluster")
            .field("settings", &self.link.settings)
            .field("reconnects", &self.reconnects())
            .finish_non_exhaustive()
    }
}

impl ConnectionLike for ReconnectingCluster {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let cmd = cmd.clone();
        Box::pin(
            self.link
                .run(|mut conn| async move { conn.req_packed_command(&cmd).await }),
        )
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let pipeline = pipeline.clone();
        Box::pin(self.link.run(move |mut conn| async move {
            conn.req_packed_commands(&pipeline, offset, count).await
        }))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Settings of a [`ReconnectingCluster`], set before it connects.
#[derive(Debug)]
#[must_use]
pub struct ReconnectingClusterBuilder {
    client: ClusterClient,
    settings: Settings,
}

impl ReconnectingClusterBuilder {
    /// Sets how long a command may take before it counts as timed out and
    /// fails with an I/O error of kind `TimedOut`. Default: 2 s.
    ///
    /// A command that its caller drops after waiting 250 ms or more counts as
    /// timed out too, so a caller's shorter time-out also counts.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "command_timeout must not be zero");
        self.settings.command_timeout = timeout;
        self
    }

    /// Sets how many timed-out commands in a row make the connection open a
    /// new one. Default: 3.
    ///
    /// # Panics
    ///
    /// Panics when the count is zero.
    pub fn reconnect_after_timeouts(mut self, count: u32) -> Self {
        assert!(count > 0, "reconnect_after_timeouts must not be zero");
        self.settings.reconnect_after = count;
        self
    }

    /// Sets the shortest time between two reconnections. Default: 1 s.
    pub fn min_reconnect_interval(mut self, interval: Duration) -> Self {
        self.settings.min_interval = interval;
        self
    }

    /// Sets how long opening a connection may take. Default: 5 s.
    ///
    /// # Panics
    ///
    /// Panics when the duration is zero.
    pub fn reconnect_timeout(mut self, timeout: Duration) -> Self {
        assert!(!timeout.is_zero(), "reconnect_timeout must not be zero");
        self.settings.connect_timeout = timeout;
        self
    }

    /// Opens the first connection.
    ///
    /// # Errors
    ///
    /// Returns the connection error, or a time-out error after the
    /// [`reconnect_timeout`](Self::reconnect_timeout).
    pub async fn connect(self) -> RedisResult<ReconnectingCluster> {
        let conn = open(&self.client, self.settings.connect_timeout).await?;
        Ok(ReconnectingCluster {
            link: Arc::new(ClusterLink {
                conn: Mutex::new(conn),
                reconnect: Some(Reconnect {
                    client: self.client,
                    timeouts: AtomicU32::new(0),
                    running: AtomicBool::new(false),
                    last: Mutex::new(None),
                }),
                reconnects: AtomicU64::new(0),
                settings: self.settings,
            }),
        })
    }
}

#[derive(Debug, Clone, Copy)]
struct Settings {
    command_timeout: Duration,
    reconnect_after: u32,
    min_interval: Duration,
    connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            command_timeout: DEFAULT_CLUSTER_COMMAND_TIMEOUT,
            reconnect_after: DEFAULT_RECONNECT_AFTER_TIMEOUTS,
            min_interval: DEFAULT_MIN_RECONNECT_INTERVAL,
            connect_timeout: DEFAULT_RECONNECT_TIMEOUT,
        }
    }
}

/// The connection the store sends cluster commands on: either a
/// `ClusterConnection` given as it is, or the replaceable connection of a
/// [`ReconnectingCluster`].
pub(crate) struct ClusterLink {
    conn: Mutex<ClusterConnection>,
    /// `None` for a connection given as it is: it is never replaced.
    reconnect: Option<Reconnect>,
    reconnects: AtomicU64,
    settings: Settings,
}

struct Reconnect {
    client: ClusterClient,
    /// Timed-out commands since the last reply.
    timeouts: AtomicU32,
    /// A reconnection is under way.
    running: AtomicBool,
    /// When the last reconnection ended.
    last: Mutex<Option<Instant>>,
}

impl ClusterLink {
    /// Wraps a connection that is never replaced.
    pub(crate) fn fixed(conn: ClusterConnection) -> Arc<Self> {
        Arc::new(Self {
            conn: Mutex::new(conn),
            reconnect: None,
            reconnects: AtomicU64::new(0),
            settings: Settings::default(),
        })
    }

    fn current(&self) -> ClusterConnection {
        lock(&self.conn).clone()
    }

    /// Runs one request on the current connection. On a replaceable
    /// connection the request gets the command time-out, and time-outs are
    /// counted.
    pub(crate) fn run<T, F, Fut>(
        self: &Arc<Self>,
        request: F,
    ) -> impl Future<Output = RedisResult<T>> + Send + 'static
    where
        F: FnOnce(ClusterConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>> + Send + 'static,
        T: Send + 'static,
    {
        let link = self.clone();
        let request = request(self.current());
        async move {
            if link.reconnect.is_none() {
                return request.await;
            }
            let mut attempt = Attempt {
                link: link.clone(),
                started: Instant::now(),
                settled: false,
            };
            let result = tokio::time::timeout(link.settings.command_timeout, request).await;
            attempt.settled = true;
            match result {
                Ok(Err(error)) if error.is_timeout() => {
                    link.timed_out();
                    Err(error)
                }
                Ok(reply) => {
                    link.answered();
                    reply
                }
                Err(_) => {
                    link.timed_out();
                    Err(RedisError::from(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "redis cluster command timed out after {:?}",
                            link.settings.command_timeout
                        ),
                    )))
                }
            }
        }
    }

    fn answered(&self) {
        if let Some(reconnect) = &self.reconnect {
            reconnect.timeouts.store(0, Ordering::Relaxed);
        }
    }

    fn timed_out(self: &Arc<Self>) {
        let Some(reconnect) = &self.reconnect else {
            return;
        };
        let timeouts = reconnect.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if timeouts < self.settings.reconnect_after {
            return;
        }
        let recent =
            lock(&reconnect.last).is_some_and(|last| last.elapsed() < self.settings.min_interval);
        if recent || reconnect.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            reconnect.running.store(false, Ordering::Release);
            return;
        };
        let link = self.clone();
        runtime.spawn(async move { link.replace_connection(timeouts).await });
    }

    async fn replace_connection(&self, timeouts: u32) {
        let Some(reconnect) = &self.reconnect else {
            return;
        };
        tracing::warn!(
            timeouts,
            "redis cluster commands keep timing out; opening a new cluster connection"
        );
        match open(&reconnect.client, self.settings.connect_timeout).await {
            Ok(conn) => {
                *lock(&self.conn) = conn;
                reconnect.timeouts.store(0, Ordering::Relaxed);
                let count = self.reconnects.fetch_add(1, Ordering::Relaxed) + 1;
                tracing::info!(reconnects = count, "new redis cluster connection in use");
            }
            Err(error) => {
                tracing::warn!(%error, "opening a new redis cluster connection failed");
            }
        }
        *lock(&reconnect.last) = Some(Instant::now());
        reconnect.running.store(false, Ordering::Release);
    }
}

/// One request in flight on a replaceable connection. Dropped before it
/// settled, after waiting [`ABANDONED_AFTER`] or more, it counts as timed out.
struct Attempt {
    link: Arc<ClusterLink>,
    started: Instant,
    settled: bool,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if !self.settled && self.started.elapsed() >= ABANDONED_AFTER {
            self.link.timed_out();
        }
    }
}

async fn open(client: &ClusterClient, timeout: Duration) -> RedisResult<ClusterConnection> {
    match tokio::time::timeout(timeout, client.get_async_connection()).await {
        Ok(result) => result,
        Err(_) => Err(RedisError::from(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("opening a redis cluster connection timed out after {timeout:?}"),
        ))),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
