//! Graceful shutdown of a layer through a real server and a real Redis: the
//! reconnect hint, 503 for new streams, draining in the grace period and the
//! states left in Redis. The live stream and follower cases run on the memory
//! store too.

mod common;
mod resume_support;
mod support;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use resume_support::*;
use sse_resilience::{EventLog, SseResilienceLayer, StreamIdSource};
use support::parse_synthetic;

const RETRY_HINT: &[u8] = b"retry: 1000\n\n";

fn quiet_log_layer(prefix: &str, conn: &redis::aio::ConnectionManager) -> SseResilienceLayer {
    quiet_layer_on(SseResilienceLayer::new(conn.clone()).key_prefix(prefix))
}

/// Turns heartbeats off and the event log on, with fast followers.
fn quiet_layer_on(layer: SseResilienceLayer) -> SseResilienceLayer {
    layer
        .without_heartbeats()
        .event_log(EventLog::new().follow_poll_interval(Duration::from_millis(20)))
}

/// Sends a frame without panicking when the layer already dropped the inner body.
fn send_if_open(stream: &ScriptedStream, frame: Vec<u8>) {
    let _ = stream.tx.send(Ok(Bytes::from(frame)));
}

backend_tests!(shutdown_during_live_streams, shutdown_ends_followers);

async fn shutdown_during_live_streams(backend: Backend) {
    const STREAMS: usize = 20;
    let layer = quiet_layer_on(backend.layer());
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    let mut clients = Vec::new();
    let mut streams = Vec::new();
    for number in 0..STREAMS {
        let id = format!("sd-{number}");
        let mut client = server.get(&format!("/sse?stream_id={id}")).await;
        assert_eq!(client.status(), 200, "opening {id}");
        let stream = server.scripted.next_stream().await;
        stream.send(token(1));
        let first = read_until(&mut client, |bytes| contains(bytes, &token(1))).await;
        clients.push((id, client, first));
        streams.push(stream);
    }

    let shutdown = tokio::spawn(async move { handle.shutdown(Duration::from_millis(800)).await });

    // The first half sends its terminal event during the grace period, the rest never does.
    let unfinished = streams.split_off(STREAMS / 2);
    let finishing = streams;
    let finisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for stream in &finishing {
            send_if_open(stream, completed(2));
        }
        finishing
    });

    for (id, client, first) in &mut clients {
        let mut received = std::mem::take(first);
        received.extend(read_to_end(client).await);
        assert!(
            received.ends_with(RETRY_HINT),
            "{id} did not end with the retry hint: {}",
            show(&received)
        );
        let before_hint = &received[..received.len() - RETRY_HINT.len()];
        assert!(
            before_hint.starts_with(&token(1)),
            "{id} received {}",
            show(&received)
        );
        assert!(
            ends_at_event_boundary(before_hint),
            "{id} got the hint inside an event: {}",
            show(&received)
        );
    }

    // New stream requests are rejected while shutting down.
    let late = server.get("/sse?stream_id=late").await;
    assert_eq!(late.status(), 503);
    let retry_after = late
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    assert!(retry_after.is_some(), "503 without Retry-After");
    let retry_after = retry_after.unwrap();
    assert!(
        retry_after.parse::<u64>().is_ok(),
        "Retry-After is not whole seconds: {retry_after:?}"
    );
    assert!(
        content_type(&late).starts_with("text/plain"),
        "503 content type {:?}",
        content_type(&late)
    );
    assert!(!late.text().await.unwrap().is_empty(), "503 without a body");
    let event_source = get_with(
        &server,
        "/sse?stream_id=late-es",
        &[("accept", "text/event-stream")],
    )
    .await;
    assert_eq!(event_source.status(), 503);
    assert!(
        event_source.headers().contains_key("retry-after"),
        "503 of an EventSource request without Retry-After"
    );
    let resume = get_with(&server, "/sse?stream_id=sd-0", &[("last-event-id", "1")]).await;
    assert_eq!(resume.status(), 503);

    let report = shutdown.await.expect("shutdown panicked");
    let finishing = finisher.await.expect("the finisher panicked");
    assert_eq!(report.live_at_start, STREAMS);
    assert_eq!(report.finished, STREAMS / 2);
    assert_eq!(report.failed, STREAMS / 2);

    // Nothing of the layer is left active once shutdown returned.
    let ids = backend.stream_ids().await;
    assert_eq!(ids.len(), STREAMS, "stream hashes {ids:?}");
    for id in &ids {
        let state = backend.field(id, "state").await;
        assert_ne!(state.as_deref(), Some("active"), "{id} is still active");
    }
    for number in 0..STREAMS {
        let id = format!("sd-{number}");
        let state = backend.field(&id, "state").await;
        let reason = backend.field(&id, "reason").await;
        if number < STREAMS / 2 {
            assert_eq!(state.as_deref(), Some("completed"), "{id}");
        } else {
            assert_eq!(state.as_deref(), Some("failed"), "{id}");
            assert_eq!(reason.as_deref(), Some("shutdown"), "{id}");
        }
    }
    for stream in &unfinished {
        assert!(
            stream.is_dropped(),
            "an unfinished inner body was kept after the grace period"
        );
    }

    // The finished streams' terminals were logged while draining.
    wait_for_terminal_logged_on(&backend, "sd-0").await;

    // Another instance replays both outcomes.
    let other = TestServer::start(quiet_layer_on(backend.layer())).await;
    let failed = other.get("/sse?stream_id=sd-19").await;
    assert_eq!(failed.status(), 200);
    let event = parse_synthetic(&failed.text().await.unwrap());
    assert_eq!(event.event_type, "failed");
    assert_eq!(event.data["reason"], "shutdown");
    assert_eq!(event.data["stream_id"], "sd-19");
    let done = other.get("/sse?stream_id=sd-0").await;
    assert_eq!(done.status(), 200);
    let replayed = done.bytes().await.unwrap();
    assert!(replayed == completed(2), "replay {}", show(&replayed));

    // A resume after the last logged event gets the recorded end.
    let mut resumed_failed =
        get_with(&other, "/sse?stream_id=sd-19", &[("last-event-id", "1")]).await;
    assert_eq!(resumed_failed.status(), 200);
    let resumed = read_to_end(&mut resumed_failed).await;
    let event = parse_synthetic(&String::from_utf8(resumed).unwrap());
    assert_eq!(event.data["reason"], "shutdown");
    let mut resumed_done = get_with(&other, "/sse?stream_id=sd-0", &[("last-event-id", "1")]).await;
    assert_eq!(resumed_done.status(), 200);
    let resumed = read_to_end(&mut resumed_done).await;
    assert!(resumed == completed(2), "resume of sd-0 {}", show(&resumed));
    assert_eq!(other.scripted.calls(), 0);
    drop(finishing);
}

#[tokio::test]
async fn shutdown_hint_waits_for_boundary() {
    let prefix = unique_prefix("shutdown_boundary");
    let conn = redis().await;
    let layer = quiet_log_layer(&prefix, &conn);
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    let mut client = server.get("/sse?stream_id=b1").await;
    assert_eq!(client.status(), 200);
    let stream = server.scripted.next_stream().await;
    let partial: &[u8] = b"data: {\"a\":";
    stream.send(token(1));
    stream.send(partial);
    let mut received = read_until(&mut client, |bytes| contains(bytes, partial)).await;

    let shutdown = tokio::spawn(async move { handle.shutdown(Duration::from_secs(3)).await });
    // Time for the shutdown to reach the stream while it is inside an event.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stream.send(&b"1}\n\n"[..]);
    received.extend(read_to_end(&mut client).await);

    assert!(
        received.ends_with(RETRY_HINT),
        "no retry hint at the end: {}",
        show(&received)
    );
    let before_hint = &received[..received.len() - RETRY_HINT.len()];
    assert!(
        ends_at_event_boundary(before_hint),
        "hint inserted inside an event: {}",
        show(&received)
    );
    let mut expected = token(1);
    expected.extend_from_slice(partial);
    expected.extend_from_slice(b"1}\n\n");
    assert!(
        before_hint == expected,
        "bytes before the hint {}",
        show(before_hint)
    );

    // The inner body is still drained, so its terminal is recorded.
    send_if_open(&stream, completed(3));
    let report = shutdown.await.expect("shutdown panicked");
    assert_eq!(report.live_at_start, 1);
    assert_eq!(report.finished, 1);
    assert_eq!(report.failed, 0);
    let state = stream_field(&mut conn.clone(), &prefix, "b1", "state").await;
    assert_eq!(state.as_deref(), Some("completed"));
}

#[tokio::test]
async fn shutdown_ends_unfinished_event() {
    let prefix = unique_prefix("shutdown_stuck");
    let conn = redis().await;
    let layer = quiet_log_layer(&prefix, &conn);
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    let mut client = server.get("/sse?stream_id=u1").await;
    assert_eq!(client.status(), 200);
    let stream = server.scripted.next_stream().await;
    let partial: &[u8] = b"data: {\"a\":";
    stream.send(token(1));
    stream.send(partial);
    let mut received = read_until(&mut client, |bytes| contains(bytes, partial)).await;

    // The event never ends, so no hint can be inserted before the grace period ends.
    let report = handle.shutdown(Duration::from_millis(300)).await;
    received.extend(read_to_end(&mut client).await);

    let parsed = parse_events(&received);
    assert_eq!(parsed.len(), 1, "client dispatched {}", show(&received));
    assert!(
        parsed[0].raw == token(1),
        "first event {}",
        show(&parsed[0].raw)
    );
    assert_eq!(report.live_at_start, 1);
    assert_eq!(report.finished, 0);
    assert_eq!(report.failed, 1);
    let mut conn = conn.clone();
    let state = stream_field(&mut conn, &prefix, "u1", "state").await;
    assert_eq!(state.as_deref(), Some("failed"));
    let reason = stream_field(&mut conn, &prefix, "u1", "reason").await;
    assert_eq!(reason.as_deref(), Some("shutdown"));
}

async fn shutdown_ends_followers(backend: Backend) {
    let layer = quiet_layer_on(backend.layer());
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    let mut client = server.get("/sse?stream_id=f1").await;
    assert_eq!(client.status(), 200);
    let stream = server.scripted.next_stream().await;
    stream.send(token(1));
    read_until(&mut client, |bytes| contains(bytes, &token(1))).await;
    wait_for_logged_on(&backend, "f1", "1").await;
    let mut follower = server.get("/sse?stream_id=f1").await;
    assert_eq!(follower.status(), 200);
    read_until(&mut follower, |bytes| contains(bytes, &token(1))).await;

    let shutdown = tokio::spawn(async move { handle.shutdown(Duration::from_secs(3)).await });
    let followed = read_to_end(&mut follower).await;
    let produced = read_to_end(&mut client).await;
    assert!(
        followed.ends_with(RETRY_HINT),
        "follower did not end with the retry hint: {}",
        show(&followed)
    );
    assert!(
        produced.ends_with(RETRY_HINT),
        "client did not end with the retry hint: {}",
        show(&produced)
    );

    send_if_open(&stream, completed(2));
    let report = shutdown.await.expect("shutdown panicked");
    assert_eq!(report.failed, 0);
    let state = backend.state("f1").await;
    assert_eq!(state.as_deref(), Some("completed"));
}

#[tokio::test]
async fn shutdown_without_streams_returns() {
    let prefix = unique_prefix("shutdown_idle");
    let conn = redis().await;
    let layer = quiet_log_layer(&prefix, &conn);
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    // A finished stream is not live.
    let fixed = server.get("/fixed?stream_id=done").await;
    assert_eq!(fixed.status(), 200);
    fixed.bytes().await.unwrap();
    wait_for_state(&conn, &prefix, "done", "completed").await;

    // A long grace period: shutdown must not wait for it with nothing live.
    let report = tokio::time::timeout(
        Duration::from_secs(10),
        handle.shutdown(Duration::from_secs(60)),
    )
    .await
    .expect("shutdown without live streams waited for the grace period");
    assert_eq!(report.live_at_start, 0);
    assert_eq!(report.finished, 0);
    assert_eq!(report.failed, 0);

    let late = server.get("/sse?stream_id=late").await;
    assert_eq!(late.status(), 503);
}

#[tokio::test]
async fn unused_layer_shutdown_returns() {
    let prefix = unique_prefix("shutdown_unused");
    let conn = redis().await;
    let layer = quiet_log_layer(&prefix, &conn);

    let report = tokio::time::timeout(
        Duration::from_secs(10),
        layer.shutdown_handle().shutdown(Duration::from_secs(60)),
    )
    .await
    .expect("shutdown of an unused layer waited for the grace period");
    assert_eq!(report.live_at_start, 0);
    assert_eq!(report.finished, 0);
    assert_eq!(report.failed, 0);
}

#[tokio::test]
async fn shutdown_spares_json_route() {
    let prefix = unique_prefix("shutdown_json");
    let conn = redis().await;
    let layer = quiet_log_layer(&prefix, &conn);
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    handle.shutdown(Duration::from_millis(100)).await;
    let stream_request = server.get("/sse?stream_id=s1").await;
    assert_eq!(stream_request.status(), 503);

    let json = server.get("/json").await;
    assert_eq!(json.status(), 200);
    assert_eq!(content_type(&json), "application/json");
}

#[tokio::test]
async fn shutdown_spares_other_paths() {
    let prefix = unique_prefix("shutdown_paths");
    let conn = redis().await;
    let layer =
        quiet_log_layer(&prefix, &conn).stream_id_source(StreamIdSource::path_segment("/stream/"));
    let handle = layer.shutdown_handle();
    let server = TestServer::start(layer).await;

    handle.shutdown(Duration::from_millis(100)).await;

    // Paths outside the stream prefix are not stream requests.
    let json = server.get("/json").await;
    assert_eq!(json.status(), 200);
    assert_eq!(content_type(&json), "application/json");
    assert_eq!(server.scripted.calls(), 1);
}
