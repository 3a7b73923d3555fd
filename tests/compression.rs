//! Proxy-safe headers, and tower-http's `CompressionLayer` placed outside and
//! inside the layer, through a real axum server, client and Redis.

mod common;

use std::{
    io::Read,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderValue, Response, header},
    routing::get,
};
use bytes::Bytes;
use futures_util::StreamExt;
use sse_resilience::SseResilienceLayer;
use tokio::sync::mpsc;
use tower_http::compression::{CompressionLayer, predicate::SizeAbove};

use common::{
    Scripted, TestServer, contains, eventually, keys_under, read_until, redis, stream_field,
    unique_prefix,
};

type Senders = Arc<Mutex<Vec<mpsc::UnboundedSender<Result<Bytes, std::io::Error>>>>>;

/// Builds the inner routes: event streams whose bodies the test writes through
/// the collected senders, and a JSON response large enough to be compressed.
fn routes(senders: Senders) -> Router {
    Router::new()
        .route("/sse", get(stream_handler))
        .route("/sse-cached", get(cached_stream_handler))
        .route("/json", get(json_handler))
        .with_state(senders)
}

async fn stream_handler(State(senders): State<Senders>) -> Response<Body> {
    let (tx, rx) = mpsc::unbounded_channel();
    senders.lock().unwrap().push(tx);
    // Fused: tower-http 0.6's compression polls its inner body again after its end.
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
    .fuse();
    let mut response = Response::new(Body::from_stream(body));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// Returns an event stream with the service's own caching and buffering headers.
async fn cached_stream_handler() -> Response<Body> {
    let mut response = Response::new(Body::from("event: completed\ndata: {}\n\n"));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=5"),
    );
    headers.insert("x-accel-buffering", HeaderValue::from_static("yes"));
    response
}

async fn json_handler() -> Response<Body> {
    let mut response = Response::new(Body::from(format!("[{}0]", "0,".repeat(500))));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Waits for the inner service's next stream.
async fn next_sender(senders: &Senders) -> mpsc::UnboundedSender<Result<Bytes, std::io::Error>> {
    let mut found = None;
    eventually("the inner service is called", || {
        found = senders.lock().unwrap().pop();
        std::future::ready(found.is_some())
    })
    .await;
    found.unwrap()
}

async fn get_gzip(server: &TestServer, path: &str) -> reqwest::Response {
    server
        .client
        .get(server.url(path))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn own_cache_headers_are_kept() {
    let prefix = unique_prefix("own_cache_headers");
    let layer = SseResilienceLayer::new(redis().await).key_prefix(&prefix);
    let app = routes(Senders::default()).layer(layer);
    let server = TestServer::serve(app, Scripted::default()).await;

    let response = server.get("/sse-cached?stream_id=c-1").await;

    assert_eq!(response.headers()["cache-control"], "private, max-age=5");
    assert_eq!(response.headers()["x-accel-buffering"], "yes");
    assert_eq!(
        response.headers().get_all("cache-control").iter().count(),
        1
    );
}

#[tokio::test]
async fn compression_outside_leaves_events_live() {
    let prefix = unique_prefix("compression_outside");
    let senders = Senders::default();
    // As the README recommends: the compression layer outermost, with its default
    // predicate, which never compresses `text/event-stream`.
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .heartbeat_interval(Duration::from_millis(50));
    let app = routes(senders.clone())
        .layer(layer)
        .layer(CompressionLayer::new());
    let server = TestServer::serve(app, Scripted::default()).await;

    let json = get_gzip(&server, "/json").await;
    assert_eq!(json.headers()["content-encoding"], "gzip");

    let mut response = get_gzip(&server, "/sse?stream_id=z-1").await;
    assert!(response.headers().get("content-encoding").is_none());
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let inner = next_sender(&senders).await;
    inner
        .send(Ok(Bytes::from_static(b"id: 1\ndata: token\n\n")))
        .unwrap();
    // The first event reaches the client while the stream is still open.
    let bytes = read_until(&mut response, |bytes| contains(bytes, b"data: token\n\n")).await;
    assert!(bytes.starts_with(b"id: 1\n"), "bytes {bytes:?}");
    let bytes = read_until(&mut response, |bytes| contains(bytes, b":heartbeat\n\n")).await;
    assert!(!bytes.is_empty());
    inner
        .send(Ok(Bytes::from_static(b"event: completed\ndata: {}\n\n")))
        .unwrap();
    drop(inner);
    response.bytes().await.unwrap();

    let mut conn = redis().await;
    eventually("stream z-1 completes", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            stream_field(&mut conn, &prefix, "z-1", "state")
                .await
                .as_deref()
                == Some("completed")
        }
    })
    .await;
    let replay = get_gzip(&server, "/sse?stream_id=z-1").await;
    assert!(replay.headers().get("content-encoding").is_none());
    assert_eq!(
        replay.text().await.unwrap(),
        "event: completed\ndata: {}\n\n"
    );
    assert!(keys_under(&mut conn, &prefix).await.len() == 1);
}

#[tokio::test]
async fn compressed_stream_passes_through_untracked() {
    let prefix = unique_prefix("compression_inside");
    let senders = Senders::default();
    // The wrong place: compression inside the layer, set to compress events.
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .heartbeat_interval(Duration::from_millis(20));
    let app = routes(senders.clone())
        .layer(CompressionLayer::new().compress_when(SizeAbove::new(0)))
        .layer(layer);
    let server = TestServer::serve(app, Scripted::default()).await;

    let response = get_gzip(&server, "/sse?stream_id=z-2").await;
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    let inner = next_sender(&senders).await;
    let events = "id: 1\ndata: token\n\nevent: completed\ndata: {}\n\n";
    inner
        .send(Ok(Bytes::from_static(&events.as_bytes()[..19])))
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    inner
        .send(Ok(Bytes::from_static(&events.as_bytes()[19..])))
        .unwrap();
    drop(inner);
    let compressed = response.bytes().await.unwrap();

    // No heartbeat went into the compressed bytes, and nothing is recorded.
    let mut decoded = String::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_string(&mut decoded)
        .expect("the body is not valid gzip");
    assert_eq!(decoded, events);
    let conn = redis().await;
    eventually("the claim of z-2 is released", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { keys_under(&mut conn, &prefix).await.is_empty() }
    })
    .await;
}
