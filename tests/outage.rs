//! Redis failures under live streams: fail open, fail closed, and stream ends
//! that wait for Redis to come back.

mod common;
mod support;

use std::time::Duration;

use common::*;
use redis::aio::ConnectionManager;
use sse_resilience::SseResilienceLayer;
use support::{RedisProcess, state_of};

const TOKEN: &str = "id: 1\ndata: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 2\nevent: completed\ndata: {\"type\":\"completed\"}\n\n";

/// Waits until stream `id` has `state` on the server behind `conn`.
async fn wait_for_state_on(conn: &ConnectionManager, prefix: &str, id: &str, state: &str) {
    eventually(&format!("stream {id} reaches state {state}"), || {
        let mut conn = conn.clone();
        let (prefix, id) = (prefix.to_owned(), id.to_owned());
        async move { state_of(&mut conn, &prefix, &id).await.as_deref() == Some(state) }
    })
    .await;
}

#[tokio::test]
async fn fail_closed_refuses_streams() {
    let mut redis_process = RedisProcess::start();
    let prefix = unique_prefix("fail_closed");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(300))
        .fail_closed(true);
    let observer = layer.clone();
    let server = TestServer::start(layer).await;
    redis_process.kill();

    let refused = server.get("/sse?stream_id=closed1").await;

    assert_eq!(refused.status(), 503);
    assert!(refused.headers().contains_key("retry-after"));
    assert!(refused.text().await.unwrap().contains("unavailable"));
    assert_eq!(server.scripted.calls(), 0);
    assert!(observer.redis_errors() >= 1);
}

#[tokio::test]
async fn end_written_after_redis_returns() {
    let redis_process = RedisProcess::start();
    let prefix = unique_prefix("end_after_outage");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(200))
        .stale_threshold(Duration::from_secs(2));
    let observer = layer.clone();
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=paused1").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    let private = redis_process.connect().await;
    wait_for_state_on(&private, &prefix, "paused1", "active").await;

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

    wait_for_state_on(&private, &prefix, "paused1", "completed").await;
    assert!(
        observer.redis_errors() >= 1,
        "the outage produced no counted error"
    );
    let replay = server
        .get("/sse?stream_id=paused1")
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(replay, COMPLETED);
}

#[tokio::test]
async fn registry_back_after_restart() {
    let mut redis_process = RedisProcess::start();
    let port = redis_process.port;
    let prefix = unique_prefix("restart");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(300))
        .stale_threshold(Duration::from_millis(600));
    let server = TestServer::start(layer).await;

    let ids: Vec<String> = (0..20).map(|i| format!("restart-{i}")).collect();
    let mut responses = Vec::new();
    let mut streams = Vec::new();
    for id in &ids {
        responses.push(server.get(&format!("/sse?stream_id={id}")).await);
        let stream = server.scripted.next_stream().await;
        stream.send(TOKEN);
        streams.push(stream);
    }
    let private = redis_process.connect().await;
    for id in &ids {
        wait_for_state_on(&private, &prefix, id, "active").await;
    }

    // A restart without persistence loses every key.
    redis_process.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let restarted = RedisProcess::start_on(port);
    let fresh = restarted.connect().await;
    for id in &ids {
        wait_for_state_on(&fresh, &prefix, id, "active").await;
    }

    for stream in &streams {
        stream.send(COMPLETED);
    }
    drop(streams);
    for mut response in responses {
        let body = read_until(&mut response, |_| false).await;
        assert_eq!(body, format!("{TOKEN}{COMPLETED}").as_bytes());
    }
    for id in &ids {
        wait_for_state_on(&fresh, &prefix, id, "completed").await;
    }
}
