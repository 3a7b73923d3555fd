//! `Inspector` against real Redis: streams in every state made by a real
//! server, a crashed one and a guardian, on a single server and a cluster.

mod cluster_support;
mod common;
mod support;

use std::time::Duration;

use http::HeaderName;
use sse_resilience::{
    SseResilienceLayer, StreamGuardian,
    inspect::{Inspector, StreamState, StreamSummary},
};

use cluster_support::shared_cluster;
use common::{TestServer, contains, eventually, read_until, redis, unique_prefix};
use support::{RedisProcess, abandon_streams, wait_for_state};

/// Stale threshold of the abandoned streams: they look stale soon.
const STALE: Duration = Duration::from_millis(600);
/// Stale threshold of the streams that must stay live on a busy machine.
const LIVE_STALE: Duration = Duration::from_secs(5);
const FIXED_COMPLETED: &str =
    "id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";

fn find<'a>(streams: &'a [StreamSummary], id: &str) -> &'a StreamSummary {
    streams
        .iter()
        .find(|stream| stream.id == id)
        .unwrap_or_else(|| panic!("stream {id} is not listed: {streams:?}"))
}

/// Waits until the inspector lists stream `id` in `state`.
async fn wait_for_listed<C>(inspector: &Inspector<C>, id: &str, state: StreamState)
where
    C: redis::aio::ConnectionLike + Clone + Send + Sync + 'static,
{
    eventually(&format!("stream {id} is listed as {state}"), || async {
        let streams = inspector.list().await.unwrap();
        streams.iter().any(|s| s.id == id && s.state == state)
    })
    .await;
}

#[tokio::test]
async fn list_shows_every_state() {
    let prefix = unique_prefix("inspect_states");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(LIVE_STALE)
        .owner_header(HeaderName::from_static("x-user"))
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let inspector = Inspector::new(redis().await).key_prefix(&prefix);

    // Completed: the fixed route ends with `completed`.
    let done = server.get("/fixed?stream_id=done-1").await;
    assert!(done.text().await.unwrap().ends_with(FIXED_COMPLETED));
    wait_for_state(&prefix, "done-1", "completed").await;

    // Failed: the inner body fails.
    let failing = server.get("/sse?stream_id=fail-1").await;
    server.scripted.next_stream().await.fail();
    let _ = failing.bytes().await;
    wait_for_state(&prefix, "fail-1", "failed").await;

    // Live: a stream held open, with an owner.
    let mut live = server
        .client
        .get(server.url("/sse?stream_id=live-1"))
        .header("x-user", "alice")
        .send()
        .await
        .unwrap();
    let live_inner = server.scripted.next_stream().await;
    live_inner.send("data: {\"type\":\"token\"}\n\n");
    read_until(&mut live, |bytes| contains(bytes, b"\n\n")).await;

    // Stale, then orphaned: streams of a server that stopped refreshing them.
    let abandoned = vec!["gone-1".to_owned(), "gone-2".to_owned()];
    abandon_streams(&prefix, &abandoned, STALE).await;
    wait_for_listed(&inspector, "gone-2", StreamState::Stale).await;
    wait_for_listed(&inspector, "gone-1", StreamState::Stale).await;

    let streams = inspector.list().await.unwrap();
    assert_eq!(streams.len(), 5, "{streams:?}");
    let live_stream = find(&streams, "live-1");
    assert_eq!(live_stream.state, StreamState::Live);
    assert_eq!(live_stream.owner.as_deref(), Some("alice"));
    assert_eq!(live_stream.stream_type, "sse");
    assert!(live_stream.since_refresh.is_some());
    assert!(live_stream.finished_at_ms.is_none());
    let done_stream = find(&streams, "done-1");
    assert_eq!(done_stream.state, StreamState::Completed);
    assert_eq!(done_stream.owner, None);
    assert!(done_stream.finished_at_ms.is_some());
    assert!(done_stream.since_refresh.is_none());
    assert_eq!(done_stream.reason, None);
    let failed_stream = find(&streams, "fail-1");
    assert_eq!(failed_stream.state, StreamState::Failed);
    assert_eq!(failed_stream.reason.as_deref(), Some("body_error"));
    let ages: Vec<u64> = streams.iter().map(|s| s.started_at_ms).collect();
    assert!(
        ages.windows(2).all(|w| w[0] >= w[1]),
        "not newest first: {ages:?}"
    );

    let stats = inspector.stats().await.unwrap();
    assert_eq!(stats.live, 1);
    assert_eq!(stats.stale, 2);
    assert_eq!(stats.completed, 1);
    assert_eq!(stats.failed, 1);
    assert_eq!(stats.orphaned, 0);
    assert_eq!(stats.total(), 5);
    assert_eq!(stats.index_entries, 3);

    let report = StreamGuardian::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(STALE)
        .sweep()
        .await
        .unwrap();
    assert_eq!(report.orphaned.len(), 2);
    let streams = inspector.list().await.unwrap();
    let orphaned = find(&streams, "gone-1");
    assert_eq!(orphaned.state, StreamState::Orphaned);
    assert_eq!(orphaned.reason.as_deref(), Some("orphaned"));
    let stats = inspector.stats().await.unwrap();
    assert_eq!(stats.orphaned, 2);
    assert_eq!(stats.stale, 0);
    assert_eq!(stats.index_entries, 1);

    live_inner.send("event: completed\ndata: {}\n\n");
    drop(live_inner);
}

#[tokio::test]
async fn show_returns_terminal_event() {
    let prefix = unique_prefix("inspect_show");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let inspector = Inspector::new(redis().await).key_prefix(&prefix);

    server
        .get("/fixed?stream_id=done-2")
        .await
        .bytes()
        .await
        .unwrap();
    wait_for_state(&prefix, "done-2", "completed").await;
    let mut live = server.get("/sse?stream_id=live-2").await;
    let inner = server.scripted.next_stream().await;
    inner.send("data: 1\n\n");
    read_until(&mut live, |bytes| contains(bytes, b"\n\n")).await;

    let done = inspector
        .stream("done-2")
        .await
        .unwrap()
        .expect("done-2 not found");
    assert_eq!(done.summary.state, StreamState::Completed);
    assert_eq!(done.terminal_event.as_deref(), Some(FIXED_COMPLETED));
    assert_eq!(done.terminal_id.as_deref(), Some("2"));
    assert!(!done.truncated);
    assert_eq!(done.logged_events, 0);
    let expires_in = done.expires_in.expect("a finished stream has a TTL");
    assert!(expires_in <= sse_resilience::DEFAULT_COMPLETION_TTL);
    let metadata: serde_json::Value =
        serde_json::from_str(done.metadata.as_deref().unwrap()).unwrap();
    assert_eq!(metadata["path"], "/fixed");
    let json = done.to_json();
    assert_eq!(json["state"], "completed");
    assert_eq!(json["terminal_event"], FIXED_COMPLETED);

    let running = inspector
        .stream("live-2")
        .await
        .unwrap()
        .expect("live-2 not found");
    assert_eq!(running.summary.state, StreamState::Live);
    assert_eq!(running.terminal_event, None);
    assert_eq!(running.terminal_id, None);

    assert!(inspector.stream("missing-1").await.unwrap().is_none());
    assert!(inspector.stream("bad id").await.unwrap().is_none());
    assert!(inspector.stream("").await.unwrap().is_none());
    let other = Inspector::new(redis().await).key_prefix(&unique_prefix("inspect_other"));
    assert!(other.stream("done-2").await.unwrap().is_none());
    assert!(other.list().await.unwrap().is_empty());
    drop(inner);
}

#[tokio::test]
async fn glob_prefix_matches_only_itself() {
    let prefix = format!("{}[*]?", unique_prefix("inspect_glob"));
    let layer = SseResilienceLayer::new(redis().await).key_prefix(&prefix);
    let server = TestServer::start(layer).await;
    server
        .get("/fixed?stream_id=g-1")
        .await
        .bytes()
        .await
        .unwrap();
    wait_for_state(&prefix, "g-1", "completed").await;

    // `[*]?` read as a pattern would also match this prefix.
    let lookalike = prefix.replace("[*]?", "a");
    let listed = Inspector::new(redis().await)
        .key_prefix(&lookalike)
        .list()
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    let listed = Inspector::new(redis().await)
        .key_prefix(&prefix)
        .list()
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn stopped_redis_is_an_error() {
    let mut process = RedisProcess::start();
    let inspector =
        Inspector::new(process.connect().await).redis_timeout(Duration::from_millis(500));
    assert!(inspector.list().await.unwrap().is_empty());

    process.kill();

    let error = inspector
        .list()
        .await
        .expect_err("listing without Redis succeeded");
    assert!(!error.to_string().is_empty());
    assert!(inspector.stats().await.is_err());
    assert!(inspector.stream("any").await.is_err());
}

#[tokio::test]
async fn list_reads_every_master() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("inspect_cluster");
    let conn = cluster.connect().await;
    let server = TestServer::start(SseResilienceLayer::new(conn.clone()).key_prefix(&prefix)).await;
    let ids: Vec<String> = (0..12).map(|i| format!("c-{i}")).collect();
    for id in &ids {
        server
            .get(&format!("/fixed?stream_id={id}"))
            .await
            .bytes()
            .await
            .unwrap();
    }
    let inspector = Inspector::new(conn).key_prefix(&prefix);
    eventually("every cluster stream completes", || async {
        inspector.stats().await.unwrap().completed == 12
    })
    .await;

    let mut masters_with_streams = 0;
    for port in cluster.master_ports() {
        let mut node = cluster_support::node_connection(port).await;
        if !cluster_support::keys_on_node(&mut node, &prefix)
            .await
            .is_empty()
        {
            masters_with_streams += 1;
        }
    }
    assert!(masters_with_streams > 1, "every stream is on one master");
    let mut listed: Vec<String> = inspector
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    listed.sort();
    let mut expected = ids.clone();
    expected.sort();
    assert_eq!(listed, expected);
    let details = inspector
        .stream("c-7")
        .await
        .unwrap()
        .expect("c-7 not found");
    assert_eq!(details.terminal_event.as_deref(), Some(FIXED_COMPLETED));
}
