//! A tonic 0.14 server with a gRPC service (the standard health service from
//! `tonic-health`, reachable over gRPC and gRPC-Web) and an SSE route side by
//! side, with `SseResilienceLayer` added by `Server::builder().layer(..)`.
//!
//! ```sh
//! cargo run --example tonic
//! curl -N 'http://127.0.0.1:50051/events/tonic-1?count=5'
//! curl -N 'http://127.0.0.1:50051/events/tonic-1'   # replayed from Redis
//! grpcurl -plaintext 127.0.0.1:50051 grpc.health.v1.Health/Check
//! ```
//!
//! Environment: `ADDR` (default `127.0.0.1:50051`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and `RUST_LOG`. `GET /events/{id}` takes `count`
//! (token events before `completed`, default 5, at most 1,000) and `delay_ms`
//! (pause before each event, default 200, at most 60,000).
//!
//! The layer takes stream ids from the path segment after `/events/`, so gRPC
//! requests pass through it without touching Redis, and their responses
//! (trailers included) reach the client unchanged.

use std::{convert::Infallible, future::Future, time::Duration};

use axum::{
    extract::{Path, Query},
    response::sse::{Event, Sse},
    routing::get,
};
use futures_util::stream::{self, Stream, StreamExt};
use sse_resilience::{SseResilienceLayer, StreamGuardian, StreamIdSource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{service::Routes, transport::Server};
use tonic_web::GrpcWebLayer;
use tower::Layer;

#[path = "support/redis.rs"]
mod redis_support;

/// The path prefix of the event-stream route; the segment after it is the stream id.
pub const EVENTS_PREFIX: &str = "/events/";

#[allow(dead_code)]
#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sse_resilience=debug".into()),
        )
        .init();

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:50051".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let redis =
        redis_support::connect(&redis_url, "REDIS_URL", redis_support::CONNECT_TIMEOUT).await?;

    let stop_guardian = CancellationToken::new();
    let guardian =
        tokio::spawn(StreamGuardian::new(redis.clone()).run_with_token(stop_guardian.clone()));
    let layer = SseResilienceLayer::new(redis);
    let shutdown = layer.shutdown_handle();

    let listener = TcpListener::bind(&addr).await.map_err(|error| {
        format!(
            "cannot listen on {addr}: {error}; set ADDR to a free address such as 127.0.0.1:50051"
        )
    })?;
    tracing::info!(%addr, "listening; try GET /events/tonic-1?count=5 or grpc.health.v1.Health/Check");
    serve(listener, layer, async {
        let _ = tokio::signal::ctrl_c().await;
        // Live streams get a `retry:` hint and end; their results are still recorded.
        let report = shutdown.shutdown(Duration::from_secs(10)).await;
        tracing::info!(?report, "streams handed over");
    })
    .await?;

    stop_guardian.cancel();
    guardian.await?;
    Ok(())
}

/// Serves the example's routes on `listener`, behind `layer`, until `stop`
/// completes and the open connections close.
pub async fn serve(
    listener: TcpListener,
    layer: SseResilienceLayer,
    stop: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let layer = layer.stream_id_source(StreamIdSource::path_segment(EVENTS_PREFIX));
    Server::builder()
        // HTTP/1.1 serves EventSource clients and gRPC-Web; HTTP/2 serves gRPC.
        .accept_http1(true)
        .layer(layer)
        .add_routes(routes())
        .serve_with_incoming_shutdown(tonic::transport::server::TcpIncoming::from(listener), stop)
        .await
}

/// Returns the health service, with gRPC-Web, and the event-stream route.
///
/// `GrpcWebLayer` wraps the gRPC service only: on the whole server it would
/// reject with 400 every HTTP/1.1 request that is not gRPC-Web, EventSource
/// requests included.
pub fn routes() -> Routes {
    let (_reporter, health) = tonic_health::server::health_reporter();
    let grpc = Routes::new(GrpcWebLayer::new().layer(health));
    let router = grpc
        .into_axum_router()
        .route(&format!("{EVENTS_PREFIX}{{id}}"), get(events));
    Routes::from(router)
}

#[derive(serde::Deserialize)]
struct EventParams {
    count: Option<u64>,
    delay_ms: Option<u64>,
}

/// Streams `count` token events, then `completed`, each after `delay_ms`.
async fn events(
    Path(id): Path<String>,
    Query(params): Query<EventParams>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let count = params.count.unwrap_or(5).min(1_000);
    let delay = Duration::from_millis(params.delay_ms.unwrap_or(200).min(60_000));
    tracing::info!(stream_id = %id, count, delay_ms = delay.as_millis() as u64, "generating");
    let events = stream::iter(1..=count + 1).then(move |n| async move {
        tokio::time::sleep(delay).await;
        let event = if n <= count {
            Event::default()
                .id(n.to_string())
                .data(format!("{{\"type\":\"token\",\"n\":{n}}}"))
        } else {
            Event::default()
                .id(n.to_string())
                .event("completed")
                .data(format!("{{\"tokens\":{count}}}"))
        };
        Ok(event)
    });
    Sse::new(events)
}
