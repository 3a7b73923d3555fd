#![forbid(unsafe_code)]
#![deny(missing_docs)]
//! Server-Sent Events streams that survive dropped clients, crashed servers
//! and restarts, for any tower service, with Redis as the shared memory of
//! every app instance.
//!
//! [`SseResilienceLayer`] wraps a service that responds with `text/event-stream`.
//! For each stream request it makes one Redis round trip:
//!
//! - a finished stream gets its terminal event from Redis, and
//!   the inner service is not called (204 when the client's `Last-Event-ID`
//!   already is that event's id; 404 for a request of another owner);
//! - a stream that is live on another connection gets 409;
//! - otherwise the stream is claimed and the inner service is called.
//!
//! While the body streams, the layer forwards every frame unchanged, sends a
//! heartbeat comment at an event boundary when the stream is idle, keeps the
//! stream's registry entry fresh (one pipeline per tick for all streams of the
//! process), and records the terminal event once. When the client goes away
//! early, the inner body is drained so the result is still recorded.
//! [`StreamGuardian`] marks streams whose process died as orphaned, so that a
//! returning client gets a definite end.
//!
//! An app that runs as a single process can use a [`MemoryStore`] in place of
//! Redis. [`SseResilienceLayer::status_service`] returns a stream's state and
//! terminal event as JSON, and the [`metrics`] module names the counters and
//! the gauge recorded through the `metrics` facade.
//!
//! # Example
//!
//! ```no_run
//! use std::convert::Infallible;
//!
//! use axum::{Router, response::sse::{Event, Sse}, routing::get};
//! use futures_util::stream::{self, Stream};
//! use sse_resilience::{SseResilienceLayer, StreamGuardian, StreamIdSource};
//! use tokio_util::sync::CancellationToken;
//!
//! async fn answer() -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     Sse::new(stream::iter([
//!         Ok(Event::default().id("1").data(r#"{"type":"token","text":"Hi"}"#)),
//!         Ok(Event::default().id("2").event("completed").data(r#"{"text":"Hi"}"#)),
//!     ]))
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let client = redis::Client::open("redis://127.0.0.1:6379")?;
//!     let redis = redis::aio::ConnectionManager::new(client).await?;
//!
//!     // The guardian runs beside the app and stops with the token.
//!     let shutdown = CancellationToken::new();
//!     tokio::spawn(StreamGuardian::new(redis.clone()).run_with_token(shutdown.clone()));
//!
//!     let app = Router::new()
//!         .route("/answer/{id}", get(answer))
//!         .layer(
//!             SseResilienceLayer::new(redis)
//!                 .stream_id_source(StreamIdSource::path_segment("/answer/")),
//!         );
//!
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//!     axum::serve(listener, app).await?;
//!     shutdown.cancel();
//!     Ok(())
//! }
//! ```
//!
//! # Redis keys
//!
//! All keys start with the key prefix (`sse:` by default) and all have a TTL:
//!
//! - `{prefix}{<stream id>}`: a hash per stream with its registry fields
//!   (state, owner, type, metadata, instance, start and last refresh) and,
//!   once finished, its terminal event. The braces make the id the Redis
//!   Cluster hash tag of every key of the stream.
//! - `{prefix}active:{<0..15>}`: the active-stream index, sorted sets scored
//!   by last refresh, sharded over [`INDEX_SHARDS`] keys.
//!
//! # Browser client
//!
//! [`client::JS`] is a dependency-free ES module for pages: it requests a
//! stream's recovery status before connecting, reconnects with backoff,
//! resumes after the last event id and stops at the terminal event.

mod body;
pub mod client;
mod cluster;
mod config;
mod follow;
mod future;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod guardian;
pub mod inspect;
mod layer;
mod log;
mod memory;
pub mod metrics;
pub mod parser;
mod registry;
mod request;
mod service;
mod shutdown;
mod status;
mod store;
mod terminal;
mod tracker;

pub use body::ResilientBody;
pub use cluster::{
    DEFAULT_CLUSTER_COMMAND_TIMEOUT, DEFAULT_MIN_RECONNECT_INTERVAL,
    DEFAULT_RECONNECT_AFTER_TIMEOUTS, DEFAULT_RECONNECT_TIMEOUT, ReconnectingCluster,
    ReconnectingClusterBuilder,
};
pub use config::{
    DEFAULT_COMPLETION_TTL, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HEARTBEAT_COMMENT,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_KEY_PREFIX, DEFAULT_MAX_STREAM_LIFETIME,
    DEFAULT_OWNER_LIMIT_RETRY, DEFAULT_REDIS_TIMEOUT, DEFAULT_SHUTDOWN_RETRY,
    DEFAULT_STALE_THRESHOLD, DEFAULT_STREAM_TYPE,
};
pub use future::ResponseFuture;
pub use guardian::{
    DEFAULT_ORPHAN_EVENT_TYPE, DEFAULT_SWEEP_BATCH, DEFAULT_SWEEP_INTERVAL, StreamGuardian,
    SweepReport,
};
pub use layer::SseResilienceLayer;
pub use log::{
    DEFAULT_FOLLOW_POLL_INTERVAL, DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_MAX_EVENTS,
    DEFAULT_LOG_MAX_PENDING_BYTES, EventLog,
};
pub use memory::{LoggedEvent, MemoryStore};
pub use parser::EventStreamParser;
pub use request::{
    InvalidId, MAX_OWNER_LEN, MAX_STREAM_ID_LEN, OwnerSource, StreamId, StreamIdSource,
    StreamMetadata, StreamOwner, generate_stream_id, validate_stream_id,
};
pub use service::{STREAM_ID_HEADER, SseResilience};
pub use shutdown::{ShutdownHandle, ShutdownReport};
pub use status::{StatusFuture, StreamStatusService};
pub use store::{INDEX_SHARDS, StoreError};
pub use terminal::{Outcome, TerminalRule};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
