//! Requests at the edges: methods without a body, deeper paths, the id
//! extension, settings that are rejected, guardians with another threshold,
//! and heartbeats while Redis is down.

mod common;
mod support;

use std::time::Duration;

use axum::{Extension, Router, routing::get};
use common::*;
use sse_resilience::{SseResilienceLayer, StreamGuardian, StreamId, StreamIdSource};
use support::{RedisProcess, state_of};

#[tokio::test]
async fn head_request_not_claimed() {
    let prefix = unique_prefix("head_request");
    let server =
        TestServer::start(SseResilienceLayer::new(redis().await).key_prefix(&prefix)).await;

    let response = server
        .client
        .head(server.url("/fixed?stream_id=h1"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let mut conn = redis().await;
    assert!(keys_under(&mut conn, &prefix).await.is_empty());
}

#[tokio::test]
async fn deeper_path_not_a_stream() {
    let prefix = unique_prefix("deeper_path");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stream_id_source(StreamIdSource::path_segment("/s/"));
    let app = Router::new()
        .route("/s/{id}", get(|| async { "stream" }))
        .route("/s/{id}/info", get(|| async { "info" }))
        .layer(layer);
    let server = TestServer::serve(app, Scripted::default()).await;

    let info = server.get("/s/abc/info").await;
    assert_eq!(info.status(), 200);
    assert_eq!(info.text().await.unwrap(), "info");

    // A `+` in a path is a literal character, not a space.
    let plus = server.get("/s/a+b").await;
    assert_eq!(plus.status(), 400);
    assert!(plus.text().await.unwrap().contains("'+'"));

    let mut conn = redis().await;
    assert!(keys_under(&mut conn, &prefix).await.is_empty());
}

#[tokio::test]
async fn inner_service_sees_stream_id() {
    let prefix = unique_prefix("stream_id_extension");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stream_id_source(StreamIdSource::path_segment("/s/"));
    let handler = |Extension(id): Extension<StreamId>| async move { id.as_str().to_owned() };
    let app = Router::new()
        .route("/s/{id}", get(handler))
        .route("/s/", get(handler))
        .layer(layer);
    let server = TestServer::serve(app, Scripted::default()).await;

    assert_eq!(
        server.get("/s/given-1").await.text().await.unwrap(),
        "given-1"
    );
    // Only a request that accepts an event stream gets a generated id.
    let generated = server
        .client
        .get(server.url("/s/"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(generated.len(), 32);
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[tokio::test]
#[should_panic(expected = "invalid heartbeat_interval")]
async fn zero_heartbeat_interval_rejected() {
    let _ = SseResilienceLayer::new(redis().await).heartbeat_interval(Duration::ZERO);
}

#[tokio::test]
#[should_panic(expected = "invalid stale_threshold")]
async fn zero_stale_threshold_rejected() {
    let _ = SseResilienceLayer::new(redis().await).stale_threshold(Duration::ZERO);
}

#[tokio::test]
#[should_panic(expected = "invalid sweep_interval")]
async fn zero_sweep_interval_rejected() {
    let _ = StreamGuardian::new(redis().await).sweep_interval(Duration::ZERO);
}

#[tokio::test]
async fn shorter_guardian_threshold_keeps_stream() {
    let prefix = unique_prefix("guardian_threshold");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(Duration::from_secs(30));
    let server = TestServer::start(layer).await;
    let _response = server.get("/sse?stream_id=live1").await;
    let _stream = server.scripted.next_stream().await;

    let mut conn = redis().await;
    eventually("stream indexed", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            support::index_score(&mut conn, &prefix, "live1")
                .await
                .is_some()
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    let guardian = StreamGuardian::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(Duration::from_millis(100));
    let report = guardian.sweep().await.unwrap();

    assert!(report.orphaned.is_empty());
    assert_eq!(report.fresh, 1);
    assert_eq!(
        state_of(&mut conn, &prefix, "live1").await.as_deref(),
        Some("active")
    );
}

#[tokio::test]
async fn heartbeats_while_redis_down() {
    let mut redis_process = RedisProcess::start();
    let prefix = unique_prefix("down_heartbeats");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(300))
        .heartbeat_interval(Duration::from_millis(50));
    let server = TestServer::start(layer).await;
    redis_process.kill();

    let mut response = server.get("/sse?stream_id=down-hb").await;
    assert_eq!(response.status(), 200);
    let _stream = server.scripted.next_stream().await;
    let body = read_until(&mut response, |bytes| contains(bytes, b":heartbeat\n\n")).await;

    assert!(contains(&body, b":heartbeat\n\n"));
}
