//! Stream lifecycle against a real Redis and a real server: client drops,
//! draining, failures recorded on the stream's behalf, registry refreshes, key
//! TTLs, and serving while Redis is down. The drain and failure cases run on
//! the memory store too.

mod common;
mod support;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use redis::aio::{ConnectionLike, ConnectionManager};
use sse_resilience::{SseResilienceLayer, StreamGuardian};
use support::*;

const TOKEN: &str = "data: {\"type\":\"token\"}\n\n";
const COMPLETED: &str =
    "id: 7\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";

/// Time given to the server to notice a closed client connection.
const DISCONNECT_GRACE: Duration = Duration::from_millis(300);

async fn base_layer(prefix: &str) -> SseResilienceLayer {
    SseResilienceLayer::new(redis().await)
        .key_prefix(prefix)
        .without_heartbeats()
}

/// Opens stream `id`, sends one token event and reads it on the client.
async fn open_with_token(server: &TestServer, id: &str) -> (reqwest::Response, ScriptedStream) {
    let mut response = server.get(&format!("/sse?stream_id={id}")).await;
    assert_eq!(response.status(), 200);
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    let first = read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    assert_eq!(first, TOKEN.as_bytes());
    (response, stream)
}

async fn wait_until_dropped(stream: &ScriptedStream, description: &str) {
    eventually(description, || {
        let dropped = stream.is_dropped();
        async move { dropped }
    })
    .await;
}

async fn field(prefix: &str, id: &str, name: &str) -> Option<String> {
    let mut conn = redis().await;
    stream_field(&mut conn, prefix, id, name).await
}

async fn field_u64(conn: &mut ConnectionManager, prefix: &str, id: &str, name: &str) -> u64 {
    stream_field(conn, prefix, id, name)
        .await
        .unwrap_or_else(|| panic!("stream {id} has no field {name}"))
        .parse()
        .unwrap_or_else(|e| panic!("field {name} of stream {id} is not a number: {e}"))
}

/// Requests the replay of stream `id` and parses it as a synthetic event.
async fn synthetic_replay(server: &TestServer, id: &str) -> SyntheticEvent {
    let replay = server.get(&format!("/sse?stream_id={id}")).await;
    assert_eq!(replay.status(), 200);
    let content_type = replay.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(content_type, "text/event-stream");
    parse_synthetic(&replay.text().await.unwrap())
}

backend_tests!(
    client_drop_drains_to_completion,
    request_while_draining_conflicts,
    zero_drain_timeout_fails_at_once,
    drain_timeout_fails_stream,
    inner_body_error_fails_stream,
    missing_terminal_event_fails_stream,
);

async fn client_drop_drains_to_completion(backend: Backend) {
    let server = TestServer::start(backend.layer().without_heartbeats()).await;

    let (response, stream) = open_with_token(&server, "d1").await;
    drop(response);
    tokio::time::sleep(DISCONNECT_GRACE).await;
    assert!(
        !stream.is_dropped(),
        "the inner body was dropped instead of drained"
    );
    assert_eq!(backend.state("d1").await.as_deref(), Some("active"));

    stream.send(COMPLETED);
    backend.wait_for_state("d1", "completed").await;
    assert_eq!(
        backend.field("d1", "terminal_id").await.as_deref(),
        Some("7")
    );
    assert_eq!(backend.field("d1", "reason").await.as_deref(), Some(""));
    wait_until_dropped(&stream, "the drain stops after the terminal event").await;

    let replay = server.get("/sse?stream_id=d1").await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.text().await.unwrap(), COMPLETED);
    assert_eq!(server.scripted.calls(), 1);
}

async fn request_while_draining_conflicts(backend: Backend) {
    let server = TestServer::start(backend.layer().without_heartbeats()).await;

    let (response, stream) = open_with_token(&server, "c1").await;
    drop(response);
    tokio::time::sleep(DISCONNECT_GRACE).await;
    assert!(!stream.is_dropped());

    let second = server.get("/sse?stream_id=c1").await;
    assert_eq!(second.status(), 409);
    assert!(
        second
            .text()
            .await
            .unwrap()
            .contains("live on another connection")
    );
    let resumed = server
        .client
        .get(server.url("/sse?stream_id=c1"))
        .header("last-event-id", "7")
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 409);
    assert_eq!(server.scripted.calls(), 1);

    // Once the drain records the end, requests for the same id get the replay from Redis.
    stream.send(COMPLETED);
    backend.wait_for_state("c1", "completed").await;
    let replay = server.get("/sse?stream_id=c1").await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.text().await.unwrap(), COMPLETED);
    assert_eq!(server.scripted.calls(), 1);
}

async fn zero_drain_timeout_fails_at_once(backend: Backend) {
    let layer = backend
        .layer()
        .without_heartbeats()
        .drain_timeout(Duration::ZERO);
    let server = TestServer::start(layer).await;

    let (response, stream) = open_with_token(&server, "z1").await;
    drop(response);
    wait_until_dropped(&stream, "the inner body is dropped with the client").await;
    backend.wait_for_state("z1", "failed").await;
    assert_eq!(
        backend.field("z1", "reason").await.as_deref(),
        Some("client_disconnected")
    );
    assert_eq!(
        backend.field("z1", "terminal_id").await.as_deref(),
        Some("_end")
    );

    let event = synthetic_replay(&server, "z1").await;
    assert_eq!(event.event_type, "failed");
    assert_eq!(event.id, "_end");
    assert_eq!(event.data["type"], "failed");
    assert_eq!(event.data["reason"], "client_disconnected");
    assert_eq!(event.data["stream_id"], "z1");

    let no_content = server
        .client
        .get(server.url("/sse?stream_id=z1"))
        .header("last-event-id", "_end")
        .send()
        .await
        .unwrap();
    assert_eq!(no_content.status(), 204);
    assert!(no_content.bytes().await.unwrap().is_empty());

    // Another Last-Event-ID still gets the terminal event.
    let other = server
        .client
        .get(server.url("/sse?stream_id=z1"))
        .header("last-event-id", "_end2")
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(
        parse_synthetic(&other.text().await.unwrap()).data["reason"],
        "client_disconnected"
    );
    assert_eq!(server.scripted.calls(), 1);
}

async fn drain_timeout_fails_stream(backend: Backend) {
    let layer = backend
        .layer()
        .without_heartbeats()
        .drain_timeout(Duration::from_millis(300));
    let server = TestServer::start(layer).await;

    let (response, stream) = open_with_token(&server, "t1").await;
    drop(response);
    backend.wait_for_state("t1", "failed").await;
    assert_eq!(
        backend.field("t1", "reason").await.as_deref(),
        Some("drain_timeout")
    );
    wait_until_dropped(&stream, "the inner body is dropped after the drain timeout").await;

    let event = synthetic_replay(&server, "t1").await;
    assert_eq!(event.event_type, "failed");
    assert_eq!(event.id, "_end");
    assert_eq!(event.data["reason"], "drain_timeout");
}

async fn inner_body_error_fails_stream(backend: Backend) {
    let server = TestServer::start(backend.layer().without_heartbeats()).await;

    let (mut response, stream) = open_with_token(&server, "e1").await;
    stream.fail();
    let end = tokio::time::timeout(Duration::from_secs(20), response.chunk())
        .await
        .expect("the response did not end after the inner body failed");
    match end {
        Err(_) => {}
        Ok(None) => {} // a truncated body is accepted as well
        Ok(Some(chunk)) => panic!("unexpected bytes after the inner body failed: {chunk:?}"),
    }

    backend.wait_for_state("e1", "failed").await;
    assert_eq!(
        backend.field("e1", "reason").await.as_deref(),
        Some("body_error")
    );
    wait_until_dropped(&stream, "the failed inner body is dropped").await;

    let event = synthetic_replay(&server, "e1").await;
    assert_eq!(event.data["reason"], "body_error");
    assert_eq!(server.scripted.calls(), 1);
}

async fn missing_terminal_event_fails_stream(backend: Backend) {
    let server = TestServer::start(backend.layer().without_heartbeats()).await;

    let (mut response, stream) = open_with_token(&server, "n1").await;
    drop(stream);
    let rest = read_until(&mut response, |_| false).await;
    assert!(
        rest.is_empty(),
        "unexpected bytes after the inner body ended: {rest:?}"
    );

    backend.wait_for_state("n1", "failed").await;
    assert_eq!(
        backend.field("n1", "reason").await.as_deref(),
        Some("no_terminal_event")
    );
    let event = synthetic_replay(&server, "n1").await;
    assert_eq!(event.event_type, "failed");
    assert_eq!(event.data["reason"], "no_terminal_event");
}

#[tokio::test]
async fn max_lifetime_ends_stream() {
    let prefix = unique_prefix("max_lifetime");
    let layer = base_layer(&prefix)
        .await
        .max_stream_lifetime(Duration::from_millis(300));
    let server = TestServer::start(layer).await;

    let (mut response, stream) = open_with_token(&server, "m1").await;
    let rest = read_until(&mut response, |_| false).await;
    assert!(
        rest.is_empty(),
        "unexpected bytes before the lifetime ended: {rest:?}"
    );

    wait_for_state(&prefix, "m1", "failed").await;
    assert_eq!(
        field(&prefix, "m1", "reason").await.as_deref(),
        Some("max_lifetime_exceeded")
    );
    wait_until_dropped(
        &stream,
        "the inner body is dropped at the end of its lifetime",
    )
    .await;
    let event = synthetic_replay(&server, "m1").await;
    assert_eq!(event.data["reason"], "max_lifetime_exceeded");
}

#[tokio::test]
async fn registry_refreshes_live_and_draining() {
    let prefix = unique_prefix("refresh");
    let completion_ttl = Duration::from_secs(2);
    let layer = base_layer(&prefix)
        .await
        .stale_threshold(Duration::from_millis(600))
        .completion_ttl(completion_ttl);
    let server = TestServer::start(layer).await;
    let mut conn = redis().await;

    let (response, stream) = open_with_token(&server, "r1").await;
    let started = field_u64(&mut conn, &prefix, "r1", "started_at").await;
    eventually("the first refresh", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let refreshed = stream_field(&mut conn, &prefix, "r1", "last_refresh").await;
            refreshed.is_some_and(|value| value != started.to_string())
        }
    })
    .await;
    let live_ttl = pttl(&mut conn, &stream_key(&prefix, "r1")).await;
    assert!(live_ttl > 0, "live hash PTTL is {live_ttl}");
    assert!(
        live_ttl <= 6000,
        "live hash PTTL {live_ttl} ms exceeds the live TTL of 6000 ms"
    );
    let index_ttl = pttl(&mut conn, &index_key(&prefix, "r1")).await;
    assert!(index_ttl > 0, "index shard PTTL is {index_ttl}");

    // Live: the hash and the index score both advance.
    let refresh_live = field_u64(&mut conn, &prefix, "r1", "last_refresh").await;
    let score_live = index_score(&mut conn, &prefix, "r1")
        .await
        .expect("live stream not indexed");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let refresh_later = field_u64(&mut conn, &prefix, "r1", "last_refresh").await;
    let score_later = index_score(&mut conn, &prefix, "r1")
        .await
        .expect("live stream left the index");
    assert!(
        refresh_later > refresh_live,
        "last_refresh stayed at {refresh_live} while live"
    );
    assert!(
        score_later > score_live,
        "index score stayed at {score_live} while live"
    );

    // Draining: the client is gone but the stream is still refreshed.
    drop(response);
    tokio::time::sleep(DISCONNECT_GRACE).await;
    assert!(!stream.is_dropped());
    let refresh_draining = field_u64(&mut conn, &prefix, "r1", "last_refresh").await;
    let score_draining = index_score(&mut conn, &prefix, "r1")
        .await
        .expect("draining stream left the index");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let refresh_drained = field_u64(&mut conn, &prefix, "r1", "last_refresh").await;
    let score_drained = index_score(&mut conn, &prefix, "r1")
        .await
        .expect("draining stream left the index");
    assert!(
        refresh_drained > refresh_draining,
        "last_refresh stayed at {refresh_draining} while draining"
    );
    assert!(
        score_drained > score_draining,
        "index score stayed at {score_draining} while draining"
    );
    assert_eq!(
        state_of(&mut conn, &prefix, "r1").await.as_deref(),
        Some("active")
    );

    // Finished: out of the index, kept only for the completion TTL.
    stream.send(COMPLETED);
    wait_for_state(&prefix, "r1", "completed").await;
    let finished_ttl = pttl(&mut conn, &stream_key(&prefix, "r1")).await;
    let max_ttl = completion_ttl.as_millis() as i64;
    assert!(finished_ttl > 0, "finished hash PTTL is {finished_ttl}");
    assert!(
        finished_ttl <= max_ttl,
        "finished hash PTTL {finished_ttl} ms exceeds the completion TTL of {max_ttl} ms"
    );
    wait_until_unindexed(&prefix, "r1").await;
}

/// A connection that counts the single commands and pipelines sent through it.
#[derive(Clone)]
struct CountingConnection {
    inner: ConnectionManager,
    commands: Arc<AtomicUsize>,
    pipelines: Arc<AtomicUsize>,
}

impl CountingConnection {
    fn new(inner: ConnectionManager) -> Self {
        Self {
            inner,
            commands: Arc::default(),
            pipelines: Arc::default(),
        }
    }

    fn counts(&self) -> (usize, usize) {
        (
            self.commands.load(Ordering::SeqCst),
            self.pipelines.load(Ordering::SeqCst),
        )
    }
}

impl ConnectionLike for CountingConnection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        self.commands.fetch_add(1, Ordering::SeqCst);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.pipelines.fetch_add(1, Ordering::SeqCst);
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[tokio::test]
async fn refreshes_batched_in_one_pipeline() {
    const STREAMS: usize = 50;
    let prefix = unique_prefix("batched");
    let counting = CountingConnection::new(redis().await);
    let stale_threshold = Duration::from_millis(600);
    let refresh_interval = stale_threshold / 3;
    let layer = SseResilienceLayer::new(counting.clone())
        .key_prefix(&prefix)
        .stale_threshold(stale_threshold)
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let mut conn = redis().await;

    let ids: Vec<String> = (0..STREAMS).map(|i| format!("b{i}")).collect();
    let mut open_streams = Vec::new();
    for id in &ids {
        let response = server.get(&format!("/sse?stream_id={id}")).await;
        assert_eq!(response.status(), 200);
        open_streams.push((response, server.scripted.next_stream().await));
    }
    // Wait for one refresh of every stream, so script loading is over before the window.
    for id in &ids {
        let started = field_u64(&mut conn, &prefix, id, "started_at").await;
        eventually(&format!("stream {id} refreshed"), || {
            let mut conn = conn.clone();
            let (prefix, id) = (prefix.clone(), id.clone());
            async move {
                let indexed = index_score(&mut conn, &prefix, &id).await.is_some();
                let refreshed = stream_field(&mut conn, &prefix, &id, "last_refresh").await;
                indexed && refreshed.is_some_and(|value| value != started.to_string())
            }
        })
        .await;
    }

    let mut before = Vec::new();
    for id in &ids {
        before.push(field_u64(&mut conn, &prefix, id, "last_refresh").await);
    }
    let ticks = 3;
    let (commands_before, pipelines_before) = counting.counts();
    tokio::time::sleep(refresh_interval * ticks).await;
    let (commands_after, pipelines_after) = counting.counts();

    let pipelines = pipelines_after - pipelines_before;
    assert_eq!(
        commands_after - commands_before,
        0,
        "single commands were sent during the window"
    );
    assert!(
        pipelines >= 1,
        "no refresh pipeline was sent in {ticks} ticks"
    );
    assert!(
        pipelines <= ticks as usize + 2,
        "{pipelines} pipelines sent in {ticks} ticks for {STREAMS} streams"
    );
    for (id, before) in ids.iter().zip(before) {
        let after = field_u64(&mut conn, &prefix, id, "last_refresh").await;
        assert!(
            after > before,
            "stream {id} was not refreshed during the window"
        );
    }
    assert_eq!(open_streams.len(), STREAMS);
}

#[tokio::test]
async fn every_key_has_ttl() {
    let prefix = unique_prefix("ttl");
    let stale_threshold = Duration::from_millis(600);
    abandon_streams(&prefix, &["o1".to_owned()], stale_threshold).await;

    let layer = base_layer(&prefix).await.stale_threshold(stale_threshold);
    let server = TestServer::start(layer).await;
    let mut conn = redis().await;

    // Completed.
    let completed = server
        .get("/fixed?stream_id=c1")
        .await
        .text()
        .await
        .unwrap();
    assert!(completed.contains("event: completed"));
    wait_for_state(&prefix, "c1", "completed").await;

    // Failed: the inner body ends without a terminal event.
    let (mut failed, stream) = open_with_token(&server, "f1").await;
    drop(stream);
    read_until(&mut failed, |_| false).await;
    wait_for_state(&prefix, "f1", "failed").await;

    // Live.
    let (_live, _live_stream) = open_with_token(&server, "l1").await;

    // Released: responses that are not event streams give their claim up.
    let released = server
        .get("/sse?stream_id=r1&content_type=application/json")
        .await;
    assert_eq!(released.status(), 200);
    drop(server.scripted.next_stream().await);
    released.bytes().await.unwrap();
    let json = server.get("/json?stream_id=j1").await;
    assert_eq!(json.status(), 200);
    json.bytes().await.unwrap();

    // Orphaned by a guardian.
    let guardian = StreamGuardian::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(stale_threshold);
    eventually("stream o1 is orphaned", || {
        let guardian = guardian.clone();
        async move {
            guardian
                .sweep()
                .await
                .unwrap()
                .orphaned
                .contains(&"o1".to_owned())
        }
    })
    .await;

    for id in ["c1", "f1", "r1", "j1", "o1"] {
        wait_until_unindexed(&prefix, id).await;
    }
    for id in ["r1", "j1"] {
        assert_eq!(
            pttl(&mut conn, &stream_key(&prefix, id)).await,
            -2,
            "released stream {id} still has a hash"
        );
    }

    let keys = keys_under(&mut conn, &prefix).await;
    for id in ["c1", "f1", "l1", "o1"] {
        let key = stream_key(&prefix, id);
        assert!(keys.contains(&key), "missing hash {key} in {keys:?}");
    }
    assert!(
        keys.contains(&index_key(&prefix, "l1")),
        "missing the index shard of l1 in {keys:?}"
    );
    for key in &keys {
        let ttl = pttl(&mut conn, key).await;
        assert!(ttl > 0, "key {key} has PTTL {ttl}");
    }
}

#[tokio::test]
async fn redis_down_fails_open() {
    let mut redis_process = RedisProcess::start();
    let prefix = unique_prefix("redis_down");
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .redis_timeout(Duration::from_millis(500))
        .without_heartbeats();
    let server = TestServer::start(layer).await;

    // While Redis is up the stream is tracked.
    let up = server
        .get("/fixed?stream_id=u1")
        .await
        .text()
        .await
        .unwrap();
    assert!(up.contains("event: completed"));
    let private = redis_process.connect().await;
    eventually("stream u1 recorded on the private server", || {
        let mut private = private.clone();
        let prefix = prefix.clone();
        async move { state_of(&mut private, &prefix, "u1").await.as_deref() == Some("completed") }
    })
    .await;

    redis_process.kill();

    let mut response = server.get("/sse?stream_id=down1").await;
    assert_eq!(response.status(), 200);
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    stream.send(COMPLETED);
    drop(stream);
    let body = read_until(&mut response, |_| false).await;
    assert_eq!(body, format!("{TOKEN}{COMPLETED}").as_bytes());

    let fixed = server.get("/fixed?stream_id=down2").await;
    assert_eq!(fixed.status(), 200);
    assert!(fixed.text().await.unwrap().contains("event: completed"));
    assert_eq!(server.scripted.calls(), 3);
}

/// A connection that delays every single-command reply while `delay` is set,
/// after Redis has run the command.
#[derive(Clone)]
struct SlowReplies {
    inner: ConnectionManager,
    delay: Arc<std::sync::atomic::AtomicBool>,
}

impl ConnectionLike for SlowReplies {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        let delay = self.delay.load(Ordering::SeqCst);
        Box::pin(async move {
            let reply = self.inner.req_packed_command(cmd).await;
            if delay {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

#[tokio::test]
async fn client_drop_during_open_releases_claim() {
    let prefix = unique_prefix("drop_during_open");
    let delay = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let slow = SlowReplies {
        inner: redis().await,
        delay: delay.clone(),
    };
    let layer = SseResilienceLayer::new(slow)
        .key_prefix(&prefix)
        .stale_threshold(Duration::from_secs(2))
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let mut conn = redis().await;

    // The client gives up while the reply to the open script is delayed.
    let result = server
        .client
        .get(server.url("/sse?stream_id=o1"))
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(
        result.is_err(),
        "the request was answered before the open reply arrived"
    );
    assert_eq!(
        state_of(&mut conn, &prefix, "o1").await.as_deref(),
        Some("active")
    );
    delay.store(false, Ordering::SeqCst);

    // The claim must be released, or indexed so that a guardian can mark it.
    let mut recoverable = false;
    for _ in 0..100 {
        let exists = pttl(&mut conn, &stream_key(&prefix, "o1")).await != -2;
        let indexed = index_score(&mut conn, &prefix, "o1").await.is_some();
        if !exists || indexed {
            recoverable = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ttl = pttl(&mut conn, &stream_key(&prefix, "o1")).await;
    assert!(
        recoverable,
        "stream o1 stays active with no index entry for its PTTL of {ttl} ms, so no guardian finds it"
    );
    assert_eq!(server.scripted.calls(), 0);
    let again = server.get("/sse?stream_id=o1").await;
    assert_ne!(
        again.status(),
        409,
        "a stream nobody serves is reported live"
    );
}

#[tokio::test]
async fn max_lifetime_caps_draining_stream() {
    let prefix = unique_prefix("lifetime_drain");
    // The default drain timeout (5 minutes) is far longer than the lifetime.
    let layer = base_layer(&prefix)
        .await
        .max_stream_lifetime(Duration::from_millis(400));
    let server = TestServer::start(layer).await;

    let (response, stream) = open_with_token(&server, "ld1").await;
    drop(response);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut conn = redis().await;
    let state = state_of(&mut conn, &prefix, "ld1").await;
    assert_eq!(
        state.as_deref(),
        Some("failed"),
        "a draining stream outlived its maximum lifetime"
    );
    let reason = stream_field(&mut conn, &prefix, "ld1", "reason").await;
    assert_eq!(reason.as_deref(), Some("max_lifetime_exceeded"));
    assert!(
        stream.is_dropped(),
        "the inner body is still read after the maximum lifetime"
    );
}
