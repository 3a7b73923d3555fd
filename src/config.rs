//! The layer's settings and their defaults.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    log::EventLog,
    request::{OwnerSource, StreamIdSource},
    terminal::TerminalRule,
};

/// Default interval of idle time after which a heartbeat comment is sent.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Default text of the heartbeat comment.
pub const DEFAULT_HEARTBEAT_COMMENT: &str = "heartbeat";
/// Default age of the last refresh after which a live stream counts as stale.
pub const DEFAULT_STALE_THRESHOLD: Duration = Duration::from_secs(30);
/// Default maximum lifetime of one stream.
pub const DEFAULT_MAX_STREAM_LIFETIME: Duration = Duration::from_secs(60 * 60);
/// Default time a finished stream's terminal event is kept for replay.
pub const DEFAULT_COMPLETION_TTL: Duration = Duration::from_secs(5 * 60);
/// Default time the inner body is drained after the client went away.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default key prefix of every Redis key the layer writes.
pub const DEFAULT_KEY_PREFIX: &str = "sse:";
/// Default time-out of one Redis call made by the layer.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// Default reconnection delay suggested to clients during a shutdown.
pub const DEFAULT_SHUTDOWN_RETRY: Duration = Duration::from_secs(1);
/// Default time during which the end of a stream is retried while Redis fails.
pub const DEFAULT_COMPLETION_RETRY_WINDOW: Duration = Duration::from_secs(5 * 60);
/// Default maximum number of stream ends waiting for Redis, per layer.
pub const DEFAULT_MAX_PENDING_COMPLETIONS: usize = 10_000;
/// Default stream type stored in the registry.
pub const DEFAULT_STREAM_TYPE: &str = "sse";
/// Default `Retry-After` of a 429 sent when an owner has too many live streams.
pub const DEFAULT_OWNER_LIMIT_RETRY: Duration = Duration::from_secs(5);

/// Settings shared by the layer, its services and its bodies.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub heartbeat_interval: Option<Duration>,
    pub heartbeat_frame: Bytes,
    pub stale_threshold: Duration,
    pub max_stream_lifetime: Duration,
    pub completion_ttl: Duration,
    pub drain_timeout: Duration,
    pub terminal_rule: TerminalRule,
    pub id_source: StreamIdSource,
    pub owner_source: OwnerSource,
    pub key_prefix: Arc<str>,
    pub stream_type: Arc<str>,
    pub instance_id: Arc<str>,
    pub redis_timeout: Duration,
    pub max_event_bytes: usize,
    pub event_log: Option<EventLog>,
    pub shutdown_retry: Duration,
    pub completion_retry_window: Duration,
    pub max_pending_completions: usize,
    pub fail_closed: bool,
    /// Maximum live streams per owner, counted across instances; `None` is no limit.
    pub max_streams_per_owner: Option<usize>,
    pub owner_limit_retry: Duration,
    /// Time without a dispatched event after which a stream is ended; `None` is off.
    pub idle_timeout: Option<Duration>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat_interval: Some(DEFAULT_HEARTBEAT_INTERVAL),
            heartbeat_frame: heartbeat_frame(DEFAULT_HEARTBEAT_COMMENT),
            stale_threshold: DEFAULT_STALE_THRESHOLD,
            max_stream_lifetime: DEFAULT_MAX_STREAM_LIFETIME,
            completion_ttl: DEFAULT_COMPLETION_TTL,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            terminal_rule: TerminalRule::default(),
            id_source: StreamIdSource::default(),
            owner_source: OwnerSource::default(),
            key_prefix: DEFAULT_KEY_PREFIX.into(),
            stream_type: DEFAULT_STREAM_TYPE.into(),
            instance_id: default_instance_id().into(),
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            max_event_bytes: crate::parser::DEFAULT_MAX_EVENT_BYTES,
            event_log: None,
            shutdown_retry: DEFAULT_SHUTDOWN_RETRY,
            completion_retry_window: DEFAULT_COMPLETION_RETRY_WINDOW,
            max_pending_completions: DEFAULT_MAX_PENDING_COMPLETIONS,
            fail_closed: false,
            max_streams_per_owner: None,
            owner_limit_retry: DEFAULT_OWNER_LIMIT_RETRY,
            idle_timeout: None,
        }
    }
}

impl Config {
    /// Interval between two refreshes of the live streams: a third of the
    /// stale threshold, so two refreshes may fail before a stream looks stale.
    pub(crate) fn refresh_interval(&self) -> Duration {
        (self.stale_threshold / 3).max(Duration::from_millis(10))
    }

    /// TTL of a live stream's hash, renewed at every refresh: ten stale
    /// thresholds, which leaves guardians time to mark it orphaned first.
    pub(crate) fn live_ttl(&self) -> Duration {
        self.stale_threshold.saturating_mul(10)
    }
}

/// Panics with a clear message when a duration setting is zero.
#[track_caller]
pub(crate) fn require_non_zero(setting: &str, value: Duration) {
    assert!(
        !value.is_zero(),
        "invalid {setting}: it must be greater than zero"
    );
}

/// Returns true for the repeats of an error worth a log line: the 1st, 2nd,
/// 4th, 8th and so on, so an outage of any length logs a few lines.
pub(crate) fn worth_logging(repeat: u64) -> bool {
    repeat.is_power_of_two()
}

/// Builds the `retry:` hint sent to live clients during a shutdown.
pub(crate) fn retry_frame(delay: Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", delay.as_millis()))
}

/// Builds the bytes of one heartbeat: a comment line and a blank line.
pub(crate) fn heartbeat_frame(comment: &str) -> Bytes {
    let mut frame = String::with_capacity(comment.len() + 3);
    frame.push(':');
    frame.push_str(comment);
    frame.push_str("\n\n");
    Bytes::from(frame)
}

fn default_instance_id() -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{}-{}", std::process::id(), &random[..12])
}
