//! Redis failures under live streams: fail open, fail closed, and stream ends
//! that wait for Redis to come back.

mod common;
mod support;

use std::time::Duration;

use common::*;
use sse_resilience::SseResilienceLayer;
use support::{RedisProcess, state_of};

const TOKEN: &str = "id: 1\ndata: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 2\nevent: completed\ndata: {\"type\":\"completed\"}\n\n";

#[tokio::test]
async fn fail_closed_refuses_streams() {
    let mut redis_process = RedisProcess::start();
    let prefix = unique_prefix("fail_closed");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(300))
        .fail_closed(true);
    let server = TestServer::start(layer).await;
    redis_process.kill();

    let refused = server.get("/sse?stream_id=closed1").await;

    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.text().await.unwrap().contains("unavailable"));
    assert_eq!(server.scripted.calls(), 0);
}

#[tokio::test]
async fn end_written_after_redis_returns() {
    let redis_process = RedisProcess::start();
    let prefix = unique_prefix("end_after_outage");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(200))
        .stale_threshold(Duration::from_secs(2));
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=paused1").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    let private = redis_process.connect().await;
    eventually("stream claimed", || {
        let mut private = private.clone();
        let prefix = prefix.clone();
        async move { state_of(&mut private, &prefix, "paused1").await.as_deref() == Some("active") }
    })
    .await;

    // The terminal event arrives while Redis processes no command.
    redis_process.pause();
    stream.send(COMPLETED);
    drop(stream);
    let body = read_until(&mut response, |_| false).await;
    assert_eq!(body, format!("{TOKEN}{COMPLETED}").as_bytes());
    // Longer than eight attempts with backoff take, so only a retry window
    // that outlasts the outage records the end.
    tokio::time::sleep(Duration::from_secs(10)).await;
    redis_process.resume();

    eventually("completion written after the outage", || {
        let mut private = private.clone();
        let prefix = prefix.clone();
        async move { state_of(&mut private, &prefix, "paused1").await.as_deref() == Some("completed") }
    })
    .await;
    let replay = server.get("/sse?stream_id=paused1").await.text().await.unwrap();
    assert_eq!(replay, COMPLETED);
}
