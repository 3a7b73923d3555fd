//! A plain hyper 1 server (with hyper-util) whose event streams are made
//! resilient by `SseResilienceLayer`, added through `tower::ServiceBuilder`.
//!
//! ```sh
//! cargo run --example hyper
//! curl -N 'http://127.0.0.1:3002/events/hyper-1?count=5'
//! curl -N 'http://127.0.0.1:3002/events/hyper-1'   # replayed from Redis
//! ```
//!
//! Environment: `ADDR` (default `127.0.0.1:3002`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`) and `RUST_LOG`. `GET /events/{id}` takes `count`
//! (token events before `completed`, default 5, at most 1,000) and `delay_ms`
//! (pause before each event, default 200, at most 60,000). Every other path
//! gets 404 without touching Redis.

use std::{convert::Infallible, future::Future, time::Duration};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
    service::TowerToHyperService,
};
use sse_resilience::{SseResilienceLayer, StreamGuardian, StreamIdSource};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

#[path = "support/redis.rs"]
mod redis_support;

/// The body of every response of the inner service.
pub type EventBody = UnsyncBoxBody<Bytes, Infallible>;

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

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3002".to_owned());
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
            "cannot listen on {addr}: {error}; set ADDR to a free address such as 127.0.0.1:3002"
        )
    })?;
    tracing::info!(%addr, "listening; try GET /events/hyper-1?count=5");
    serve(listener, layer, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;

    // Live streams get a `retry:` hint and their results are still recorded.
    let report = shutdown.shutdown(Duration::from_secs(10)).await;
    tracing::info!(?report, "stopped");
    stop_guardian.cancel();
    guardian.await?;
    Ok(())
}

/// Serves `listener` until `stop` completes, with `layer` in front of the
/// example's routes. Connections accepted before that keep being served by
/// their own tasks.
pub async fn serve(
    listener: TcpListener,
    layer: SseResilienceLayer,
    stop: impl Future<Output = ()>,
) {
    let layer = layer.stream_id_source(StreamIdSource::path_segment(EVENTS_PREFIX));
    let service = ServiceBuilder::new().layer(layer).service_fn(route);
    tokio::pin!(stop);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => return,
        };
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let connection = auto::Builder::new(TokioExecutor::new());
            if let Err(error) = connection
                .serve_connection(TokioIo::new(socket), service)
                .await
            {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// Handles a request: the inner service, a plain `async fn`.
async fn route(request: Request<Incoming>) -> Result<Response<EventBody>, Infallible> {
    let path = request.uri().path();
    let Some(id) = path.strip_prefix(EVENTS_PREFIX) else {
        return Ok(text(StatusCode::NOT_FOUND, "not found; try /events/{id}"));
    };
    if request.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "use GET"));
    }
    let count = query_number(request.uri().query(), "count")
        .unwrap_or(5)
        .min(1_000);
    let delay = query_number(request.uri().query(), "delay_ms")
        .unwrap_or(200)
        .min(60_000);
    tracing::info!(stream_id = id, count, delay_ms = delay, "generating");
    Ok(events(count, Duration::from_millis(delay)))
}

/// Builds an event-stream response: `count` token events, then `completed`,
/// each after `delay`.
fn events(count: u64, delay: Duration) -> Response<EventBody> {
    let frames = stream::iter(1..=count + 1).then(move |n| async move {
        tokio::time::sleep(delay).await;
        let event = if n <= count {
            format!("id: {n}\ndata: {{\"type\":\"token\",\"n\":{n}}}\n\n")
        } else {
            format!("id: {n}\nevent: completed\ndata: {{\"tokens\":{count}}}\n\n")
        };
        Ok::<_, Infallible>(Frame::data(Bytes::from(event)))
    });
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

fn text(status: StatusCode, message: &str) -> Response<EventBody> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{message}\n"))).boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn query_number(query: Option<&str>, name: &str) -> Option<u64> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
}
