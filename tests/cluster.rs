//! The layer and the guardian on a local Redis Cluster of three masters with
//! one replica each, through real servers. The tests cover replay, conflicts,
//! draining, orphans, resume, TTLs and NOSCRIPT on every master. They also
//! count the commands of a refresh tick and of a sweep, on the cluster and on
//! a single server.

mod cluster_support;
mod common;
mod support;

use std::{
    collections::{HashMap, HashSet},
    convert::Infallible,
    sync::Arc,
    time::Duration,
};

use axum::{Router, body::Body, routing::get};
use bytes::Bytes;
use cluster_support::{
    LocalCluster, command_calls, field, indexed_count, keys_on_node, load_scripts, node_connection,
    parse_command_calls, pttl, reset_stats, shared_cluster,
};
use common::{TestServer, contains, eventually, read_until, unique_prefix};
use http::{Request, Response, header};
use redis::{
    aio::{ConnectionLike, MultiplexedConnection},
    cluster_async::ClusterConnection,
};
use sse_resilience::{EventLog, INDEX_SHARDS, SseResilienceLayer, StreamGuardian, SweepReport};
use support::{RedisProcess, parse_synthetic};
use tower::ServiceExt;

const TOKEN: &str = "data: {\"type\":\"token\"}\n\n";
const COMPLETED: &str =
    "id: 7\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";
/// Stale threshold of the orphan and NOSCRIPT tests: refreshes every 200 ms.
const STALE: Duration = Duration::from_millis(600);
/// Time given to the server to notice a closed client connection.
const DISCONNECT_GRACE: Duration = Duration::from_millis(300);

fn layer(conn: &ClusterConnection, prefix: &str) -> SseResilienceLayer {
    SseResilienceLayer::new(conn.clone())
        .key_prefix(prefix)
        .without_heartbeats()
}

/// Opens `/sse?stream_id={id}` and takes the inner stream it started.
async fn open(server: &TestServer, id: &str) -> (reqwest::Response, common::ScriptedStream) {
    let response = server.get(&format!("/sse?stream_id={id}")).await;
    assert_eq!(response.status(), 200, "opening stream {id}");
    let stream = server.scripted.next_stream().await;
    (response, stream)
}

/// Opens stream `id`, sends one token event and reads it on the client.
async fn open_with_token(
    server: &TestServer,
    id: &str,
) -> (reqwest::Response, common::ScriptedStream) {
    let (mut response, stream) = open(server, id).await;
    stream.send(TOKEN);
    let first = read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    assert_eq!(first, TOKEN.as_bytes(), "first event of stream {id}");
    (response, stream)
}

async fn read_to_end(response: &mut reqwest::Response) -> Vec<u8> {
    read_until(response, |_| false).await
}

/// Sends the terminal event on each open stream (opened for `ids`, in order),
/// reads each response to its end and waits until Redis records it completed.
async fn complete_all(
    conn: &ClusterConnection,
    prefix: &str,
    ids: &[String],
    open_streams: Vec<(reqwest::Response, common::ScriptedStream)>,
) {
    for (id, (mut response, stream)) in ids.iter().zip(open_streams) {
        stream.send(COMPLETED);
        drop(stream);
        read_to_end(&mut response).await;
        wait_for_state(conn, prefix, id, "completed").await;
    }
}

async fn get_with(server: &TestServer, path: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut request = server.client.get(server.url(path));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

async fn wait_for_state(conn: &ClusterConnection, prefix: &str, id: &str, expected: &str) {
    eventually(&format!("stream {id} reaches state {expected}"), || {
        let mut conn = conn.clone();
        let (prefix, id, expected) = (prefix.to_owned(), id.to_owned(), expected.to_owned());
        async move { field(&mut conn, &prefix, &id, "state").await.as_deref() == Some(&*expected) }
    })
    .await;
}

/// Returns every key under `prefix`, by master port.
async fn keys_by_master(cluster: &LocalCluster, prefix: &str) -> HashMap<u16, Vec<String>> {
    let mut keys = HashMap::new();
    for port in cluster.master_ports() {
        let mut conn = node_connection(port).await;
        keys.insert(port, keys_on_node(&mut conn, prefix).await);
    }
    keys
}

#[tokio::test]
async fn finished_stream_replays_without_inner_call() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_replay");
    let conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix)).await;

    let (mut response, stream) = open(&server, "r1").await;
    stream.send(TOKEN);
    stream.send(COMPLETED);
    drop(stream);
    let received = read_to_end(&mut response).await;
    assert_eq!(received, [TOKEN, COMPLETED].concat().as_bytes());
    wait_for_state(&conn, &prefix, "r1", "completed").await;

    let replay = server.get("/sse?stream_id=r1").await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.headers()["content-type"], "text/event-stream");
    assert_eq!(replay.text().await.unwrap(), COMPLETED);

    let done = get_with(&server, "/sse?stream_id=r1", &[("last-event-id", "7")]).await;
    assert_eq!(done.status(), 204);
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn status_read_on_every_master() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_status");
    let conn = cluster.connect().await;
    let layer = layer(&conn, &prefix);
    let status = layer
        .status_service()
        .stream_id_source(sse_resilience::StreamIdSource::path_segment("/status/"));
    let server =
        TestServer::start_with(layer, Router::new().route_service("/status/{id}", status)).await;

    // Ids whose slots spread over the three masters.
    let ids: Vec<String> = (0..12).map(|i| format!("st{i}")).collect();
    for id in &ids {
        server
            .get(&format!("/fixed?stream_id={id}"))
            .await
            .bytes()
            .await
            .unwrap();
    }
    for id in &ids {
        wait_for_state(&conn, &prefix, id, "completed").await;
        let response = server.get(&format!("/status/{id}")).await;
        assert_eq!(response.status(), 200, "status of {id}");
        let status: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(status["state"], "completed", "{status}");
        assert_eq!(status["terminal"]["id"], "2", "{status}");
    }
    let unknown = server.get("/status/never-opened").await;
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn live_id_conflicts_without_log() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_conflict");
    let conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix)).await;

    let (mut client, stream) = open_with_token(&server, "l1").await;
    let second = server.get("/sse?stream_id=l1").await;
    assert_eq!(second.status(), 409);
    let resume = get_with(&server, "/sse?stream_id=l1", &[("last-event-id", "1")]).await;
    assert_eq!(resume.status(), 409);

    stream.send(COMPLETED);
    drop(stream);
    read_to_end(&mut client).await;
    wait_for_state(&conn, &prefix, "l1", "completed").await;
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn invalid_id_never_reaches_redis() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_invalid");
    let conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix)).await;

    let too_long = "x".repeat(129);
    for id in ["bad%20id", "a%7Bb%7D", too_long.as_str()] {
        let response = server.get(&format!("/sse?stream_id={id}")).await;
        assert_eq!(response.status(), 400, "stream id {id:?}");
    }
    assert_eq!(server.scripted.calls(), 0);
    for (port, keys) in keys_by_master(&cluster, &prefix).await {
        assert!(keys.is_empty(), "master {port} has keys {keys:?}");
    }
}

#[tokio::test]
async fn dropped_client_gets_drained_end() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_drain");
    let mut conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix)).await;

    let (response, stream) = open_with_token(&server, "d1").await;
    drop(response);
    tokio::time::sleep(DISCONNECT_GRACE).await;
    assert!(
        !stream.is_dropped(),
        "the inner body was dropped instead of drained"
    );
    assert_eq!(
        field(&mut conn, &prefix, "d1", "state").await.as_deref(),
        Some("active")
    );

    stream.send(COMPLETED);
    wait_for_state(&conn, &prefix, "d1", "completed").await;
    assert_eq!(
        field(&mut conn, &prefix, "d1", "terminal_id")
            .await
            .as_deref(),
        Some("7")
    );
    eventually(
        "the drain drops the inner body after the terminal event",
        || {
            let dropped = stream.is_dropped();
            async move { dropped }
        },
    )
    .await;

    let replay = server.get("/sse?stream_id=d1").await;
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.text().await.unwrap(), COMPLETED);
    assert_eq!(server.scripted.calls(), 1);
}

/// Opens one stream per id on a server in its own runtime, and waits until
/// each is indexed and refreshed at least once. Then shuts that runtime down,
/// so the server, its cluster connection and its refresher stop like a
/// crashed process.
async fn abandon_streams(cluster: Arc<LocalCluster>, prefix: &str, ids: &[String]) {
    let prefix = prefix.to_owned();
    let ids = ids.to_vec();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("failed to build the runtime of the crashing server");
        let open_streams = runtime.block_on(async {
            let conn = cluster.connect().await;
            let layer = layer(&conn, &prefix).stale_threshold(STALE);
            let server = TestServer::start(layer).await;
            let mut open_streams = Vec::new();
            for id in &ids {
                open_streams.push(open_with_token(&server, id).await);
            }
            for id in &ids {
                eventually(&format!("stream {id} is indexed and refreshed"), || {
                    let mut conn = conn.clone();
                    let (prefix, id) = (prefix.clone(), id.clone());
                    async move {
                        let started = field(&mut conn, &prefix, &id, "started_at").await;
                        let refreshed = field(&mut conn, &prefix, &id, "last_refresh").await;
                        let score: Option<f64> = redis::cmd("ZSCORE")
                            .arg(support::index_key(&prefix, &id))
                            .arg(&id)
                            .query_async(&mut conn)
                            .await
                            .unwrap();
                        score.is_some() && started.is_some() && started != refreshed
                    }
                })
                .await;
            }
            (server, open_streams)
        });
        runtime.shutdown_background();
        drop(open_streams);
    })
    .await
    .expect("the crashing server panicked");
}

#[tokio::test]
async fn two_guardians_orphan_each_once() {
    const MAX_ROUNDS: usize = 400;
    const EXTRA_ROUNDS: usize = 5;
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_orphans");
    let ids: Vec<String> = (0..24).map(|i| format!("o{i}")).collect();
    abandon_streams(cluster.clone(), &prefix, &ids).await;

    let mut conn = cluster.connect().await;
    let guardians = [
        StreamGuardian::new(cluster.connect().await)
            .key_prefix(&prefix)
            .stale_threshold(STALE),
        StreamGuardian::new(cluster.connect().await)
            .key_prefix(&prefix)
            .stale_threshold(STALE),
    ];
    let mut reports: Vec<SweepReport> = Vec::new();
    let mut extra = None;
    for round in 0.. {
        assert!(
            round < MAX_ROUNDS,
            "streams were not all orphaned after {MAX_ROUNDS} sweep rounds"
        );
        let (first, second) = tokio::join!(guardians[0].sweep(), guardians[1].sweep());
        reports.push(first.expect("sweep of the first guardian failed"));
        reports.push(second.expect("sweep of the second guardian failed"));
        let mut all_orphaned = true;
        for id in &ids {
            all_orphaned &=
                field(&mut conn, &prefix, id, "state").await.as_deref() == Some("orphaned");
        }
        match extra {
            None if all_orphaned => extra = Some(EXTRA_ROUNDS),
            Some(0) => break,
            Some(rounds) => extra = Some(rounds - 1),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let mut counts: HashMap<&str, usize> = HashMap::new();
    for report in &reports {
        for id in &report.orphaned {
            *counts.entry(id.as_str()).or_default() += 1;
        }
    }
    for id in &ids {
        assert_eq!(counts.get(id.as_str()), Some(&1), "orphan reports of {id}");
    }
    assert_eq!(
        counts.len(),
        ids.len(),
        "reports name other ids: {counts:?}"
    );
    assert_eq!(indexed_count(&mut conn, &prefix).await, 0);

    let server = TestServer::start(layer(&conn, &prefix)).await;
    let replay = server.get("/sse?stream_id=o3").await;
    assert_eq!(replay.status(), 200);
    let event = parse_synthetic(&replay.text().await.unwrap());
    assert_eq!(event.event_type, "failed");
    assert_eq!(event.id, "_end");
    assert_eq!(event.data["reason"], "orphaned");
    assert_eq!(event.data["stream_id"], "o3");
    assert_eq!(server.scripted.calls(), 0);
}

/// Returns token event `n` with id `n`.
fn token(n: u32) -> String {
    format!("id: {n}\ndata: {{\"type\":\"token\",\"n\":{n}}}\n\n")
}

/// Returns a `completed` terminal event with id `n`.
fn completed(n: u32) -> String {
    format!("id: {n}\nevent: completed\ndata: {{\"type\":\"completed\"}}\n\n")
}

#[tokio::test]
async fn resume_on_other_instance() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_resume");
    let conn = cluster.connect().await;
    let log = EventLog::new().follow_poll_interval(Duration::from_millis(20));
    let server_a = TestServer::start(layer(&conn, &prefix).event_log(log.clone())).await;
    let server_b = TestServer::start(layer(&cluster.connect().await, &prefix).event_log(log)).await;
    // Two streams in different slots, so that the append and follow batches
    // of each layer can mix slots.
    let ids = ["x1", "x2"];
    assert_ne!(
        cluster_support::key_slot(cluster.ports[0], &format!("{prefix}{{x1}}")),
        cluster_support::key_slot(cluster.ports[0], &format!("{prefix}{{x2}}"))
    );
    let first_five: String = (1..=5).map(token).collect();

    let mut streams = Vec::new();
    for id in ids {
        let (mut first, stream) = open(&server_a, id).await;
        for n in 1..=5 {
            stream.send(token(n));
        }
        let received = read_until(&mut first, |bytes| contains(bytes, token(5).as_bytes())).await;
        assert_eq!(
            String::from_utf8_lossy(&received),
            first_five,
            "stream {id}"
        );
        streams.push(stream);
    }

    // A keeps producing while the clients are away.
    for stream in &streams {
        stream.send(token(6));
        stream.send(token(7));
    }
    let mut resumed = Vec::new();
    for id in ids {
        let path = format!("/sse?stream_id={id}");
        let response = get_with(&server_b, &path, &[("last-event-id", "5")]).await;
        assert_eq!(response.status(), 200, "stream {id}");
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        resumed.push(response);
    }
    for (id, response) in ids.iter().zip(&mut resumed) {
        let early = read_until(response, |bytes| contains(bytes, token(7).as_bytes())).await;
        assert_eq!(
            String::from_utf8_lossy(&early),
            token(6) + &token(7),
            "stream {id}"
        );
    }

    for stream in streams {
        stream.send(token(8));
        stream.send(completed(9));
    }
    for (id, response) in ids.iter().zip(&mut resumed) {
        let rest = read_to_end(response).await;
        assert_eq!(
            String::from_utf8_lossy(&rest),
            token(8) + &completed(9),
            "stream {id}"
        );
        wait_for_state(&conn, &prefix, id, "completed").await;
    }
    assert_eq!(server_a.scripted.calls(), ids.len());
    assert_eq!(server_b.scripted.calls(), 0);
}

#[tokio::test]
async fn every_key_has_ttl() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_ttl");
    let conn = cluster.connect().await;
    let log = EventLog::new().follow_poll_interval(Duration::from_millis(20));
    let layer = layer(&conn, &prefix).event_log(log).stale_threshold(STALE);
    let server = TestServer::start(layer).await;

    // Finished streams with logs, and live ones, spread over the masters.
    let mut live = Vec::new();
    for i in 0..12 {
        let id = format!("t{i}");
        let (mut response, stream) = open_with_token(&server, &id).await;
        if i % 2 == 0 {
            stream.send(COMPLETED);
            drop(stream);
            read_to_end(&mut response).await;
            wait_for_state(&conn, &prefix, &id, "completed").await;
        } else {
            live.push((response, stream));
        }
    }
    eventually("every live stream is indexed", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { indexed_count(&mut conn, &prefix).await == 6 }
    })
    .await;
    // A refresh tick renews the TTLs of all live streams in one batch.
    let opened_at = now_ms();
    for i in (1..12).step_by(2) {
        let id = format!("t{i}");
        eventually(&format!("live stream {id} is refreshed"), || {
            let mut conn = conn.clone();
            let (prefix, id) = (prefix.clone(), id.clone());
            async move {
                let refreshed = field(&mut conn, &prefix, &id, "last_refresh").await;
                refreshed.and_then(|ms| ms.parse::<u64>().ok()) > Some(opened_at)
            }
        })
        .await;
    }

    let keys = keys_by_master(&cluster, &prefix).await;
    let masters_with_keys = keys.values().filter(|keys| !keys.is_empty()).count();
    assert_eq!(masters_with_keys, keys.len(), "keys by master: {keys:?}");
    let mut total = 0;
    for (port, keys) in &keys {
        let mut node = node_connection(*port).await;
        for key in keys {
            let ttl = pttl(&mut node, key).await;
            assert!(ttl > 0, "key {key} on master {port} has PTTL {ttl}");
            total += 1;
        }
    }
    // Twelve hashes, twelve logs, and the shards of six live streams.
    assert!(total >= 25, "only {total} keys: {keys:?}");
    drop(live);
}

#[tokio::test]
async fn script_flush_recovers_on_every_master() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cluster_noscript");
    let mut conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix).stale_threshold(STALE)).await;

    let ids: Vec<String> = (0..12).map(|i| format!("n{i}")).collect();
    let mut open_streams = Vec::new();
    for id in &ids {
        open_streams.push(open_with_token(&server, id).await);
    }
    let keys = keys_by_master(&cluster, &prefix).await;
    for (port, keys) in &keys {
        assert!(
            keys.iter().any(|key| !key.contains("active:")),
            "master {port} holds no stream of this test: {keys:?}"
        );
    }

    let mut masters = cluster.masters().await;
    for master in &mut masters {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(master)
            .await
            .unwrap();
    }
    let flushed_at = now_ms();

    // Each master's refresh pipeline gets NOSCRIPT, loads the script there and retries.
    for id in &ids {
        eventually(&format!("stream {id} is refreshed after the flush"), || {
            let mut conn = conn.clone();
            let (prefix, id) = (prefix.clone(), id.clone());
            async move {
                let refreshed = field(&mut conn, &prefix, &id, "last_refresh").await;
                refreshed.and_then(|ms| ms.parse::<u64>().ok()) > Some(flushed_at)
            }
        })
        .await;
    }
    let refresh_sha = redis::Script::new(include_str!("../src/scripts/refresh.lua"))
        .get_hash()
        .to_owned();
    for master in &mut masters {
        let exists: Vec<bool> = redis::cmd("SCRIPT")
            .arg("EXISTS")
            .arg(&refresh_sha)
            .query_async(master)
            .await
            .unwrap();
        assert_eq!(exists, vec![true]);
    }

    // The complete and open scripts load again on their stream's master.
    complete_all(&conn, &prefix, &ids, open_streams).await;
    let (_response, _stream) = open_with_token(&server, "n-after").await;
    assert_eq!(
        field(&mut conn, &prefix, "n-after", "state")
            .await
            .as_deref(),
        Some("active")
    );
}

#[tokio::test]
async fn failover_keeps_streams_fresh() {
    // A cluster of its own, because a failover changes the topology.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(LocalCluster::start)
            .await
            .unwrap(),
    );
    let prefix = unique_prefix("cluster_failover");
    let mut conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix).stale_threshold(STALE)).await;

    let ids: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
    let mut open_streams = Vec::new();
    for id in &ids {
        open_streams.push(open_with_token(&server, id).await);
    }

    let replica = cluster.replica_ports()[0];
    let promoting = cluster.clone();
    tokio::task::spawn_blocking(move || promoting.fail_over_to(replica))
        .await
        .unwrap();
    // A new master may lack the scripts, so flush them on this one.
    let mut promoted = node_connection(replica).await;
    let () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut promoted)
        .await
        .unwrap();
    assert!(
        !keys_on_node(&mut promoted, &prefix).await.is_empty(),
        "the promoted master holds no stream of this test"
    );
    let promoted_at = now_ms();

    for id in &ids {
        eventually(
            &format!("stream {id} is refreshed after the failover"),
            || {
                let mut conn = conn.clone();
                let (prefix, id) = (prefix.clone(), id.clone());
                async move {
                    let refreshed = field(&mut conn, &prefix, &id, "last_refresh").await;
                    refreshed.and_then(|ms| ms.parse::<u64>().ok()) > Some(promoted_at)
                }
            },
        )
        .await;
    }
    complete_all(&conn, &prefix, &ids, open_streams).await;
    let (_response, _stream) = open_with_token(&server, "f-after").await;
    assert_eq!(
        field(&mut conn, &prefix, "f-after", "state")
            .await
            .as_deref(),
        Some("active")
    );
}

#[tokio::test]
async fn slot_migration_keeps_streams_fresh() {
    // A cluster of its own, because a slot migration changes the topology.
    let cluster = Arc::new(
        tokio::task::spawn_blocking(LocalCluster::start)
            .await
            .unwrap(),
    );
    let prefix = unique_prefix("cluster_migration");
    let mut conn = cluster.connect().await;
    let server = TestServer::start(layer(&conn, &prefix).stale_threshold(STALE)).await;

    let ids: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    let mut open_streams = Vec::new();
    for id in &ids {
        open_streams.push(open_with_token(&server, id).await);
    }
    // Wait for a refresh tick, so that the store has loaded its slot map.
    let opened_at = now_ms();
    eventually("stream m0 is refreshed", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let refreshed = field(&mut conn, &prefix, "m0", "last_refresh").await;
            refreshed.and_then(|ms| ms.parse::<u64>().ok()) > Some(opened_at)
        }
    })
    .await;

    // The store's slot map now sends m0's refresh to the old master, which
    // replies MOVED, with the other streams of that master in the same pipeline.
    let slot = cluster_support::key_slot(cluster.ports[0], &format!("{prefix}{{m0}}"));
    let source = cluster.slot_owner(slot);
    let target = *cluster
        .master_ports()
        .iter()
        .find(|&&port| port != source)
        .unwrap();
    let moving = cluster.clone();
    tokio::task::spawn_blocking(move || moving.move_slot(slot, target))
        .await
        .unwrap();
    assert_eq!(cluster.slot_owner(slot), target);
    let mut target_conn = node_connection(target).await;
    assert!(
        keys_on_node(&mut target_conn, &prefix)
            .await
            .contains(&format!("{prefix}{{m0}}")),
        "stream m0 did not move to master {target}"
    );
    let moved_at = now_ms();

    for id in &ids {
        eventually(&format!("stream {id} is refreshed after the move"), || {
            let mut conn = conn.clone();
            let (prefix, id) = (prefix.clone(), id.clone());
            async move {
                let refreshed = field(&mut conn, &prefix, &id, "last_refresh").await;
                refreshed.and_then(|ms| ms.parse::<u64>().ok()) > Some(moved_at)
            }
        })
        .await;
    }
    complete_all(&conn, &prefix, &ids, open_streams).await;
    assert_eq!(
        field(&mut conn, &prefix, "m0", "terminal_id")
            .await
            .as_deref(),
        Some("7")
    );
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Streams opened by the command-count tests.
const COUNTED_STREAMS: u64 = 1000;
/// Stale threshold of the command-count tests: a refresh tick every second.
const COUNTED_STALE: Duration = Duration::from_secs(3);
/// Commands the counters follow: what the store sends and what its scripts call.
const COUNTED: [&str; 9] = [
    "evalsha",
    "zadd",
    "zrem",
    "pexpire",
    "zrangebyscore",
    "hmget",
    "hset",
    "del",
    "cluster|slots",
];

/// Successful calls of the [`COUNTED`] commands, summed over nodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Calls(HashMap<&'static str, u64>);

impl Calls {
    fn of(&self, command: &str) -> u64 {
        self.0.get(command).copied().unwrap_or(0)
    }

    fn since(&self, before: &Calls) -> Calls {
        Calls(
            COUNTED
                .iter()
                .map(|&command| (command, self.of(command) - before.of(command)))
                .collect(),
        )
    }
}

async fn read_calls(nodes: &mut [MultiplexedConnection]) -> Calls {
    let mut calls = Calls::default();
    for node in nodes {
        let node_calls = command_calls(node).await;
        for command in COUNTED {
            *calls.0.entry(command).or_default() += node_calls.get(command).copied().unwrap_or(0);
        }
    }
    calls
}

/// Reads the counters until two reads 100 ms apart agree, so that no
/// pipeline is counted on one node and not yet on another.
async fn settled_calls(nodes: &mut [MultiplexedConnection]) -> Calls {
    let mut last = read_calls(nodes).await;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = read_calls(nodes).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the command counters never settled: {last:?}");
}

/// Returns an event-stream response whose body never ends.
async fn endless_stream() -> Response<Body> {
    let body = Body::from_stream(futures_util::stream::pending::<Result<Bytes, Infallible>>());
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(body)
        .unwrap()
}

/// Opens [`COUNTED_STREAMS`] streams on `conn`, keeps them live, and checks
/// the commands counted on `nodes` for the opening, one refresh tick and one
/// guardian sweep. `nodes` are every master behind `conn`.
async fn check_command_counts<C>(conn: C, mut nodes: Vec<MultiplexedConnection>, label: &str)
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    let n = COUNTED_STREAMS;
    let prefix = unique_prefix(label);
    for node in &mut nodes {
        load_scripts(node).await;
        reset_stats(node).await;
    }
    let layer = SseResilienceLayer::new(conn.clone())
        .key_prefix(&prefix)
        .stale_threshold(COUNTED_STALE)
        .without_heartbeats();
    let app = Router::new()
        .route("/sse", get(endless_stream))
        .layer(layer.clone());

    // Opening: every request claims its stream with one open script.
    let requests = (0..n).map(|i| {
        let request = Request::get(format!("/sse?stream_id=c{i}"))
            .body(Body::empty())
            .unwrap();
        app.clone().oneshot(request)
    });
    let responses = futures_util::future::join_all(requests).await;
    for response in &responses {
        let response = response.as_ref().unwrap();
        assert_eq!(response.status(), 200);
    }
    assert_eq!(layer.live_streams() as u64, n);
    let mut index_conn = conn.clone();
    for _ in 0..1000 {
        if indexed_count(&mut index_conn, &prefix).await == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(indexed_count(&mut index_conn, &prefix).await, n);
    let opened = settled_calls(&mut nodes).await;

    // A claim runs HMGET, DEL, HSET and PEXPIRE in the open script. A refresh
    // tick that falls in this phase runs the refresh script (HMGET, HSET, two
    // PEXPIRE) once per live stream. Only claims send DEL, so the refresh
    // script ran HSET − DEL times.
    let claims = opened.of("del");
    let refreshes = opened.of("hset") - claims;
    assert_eq!(claims, n, "claims while opening: {opened:?}");
    assert_eq!(
        opened.of("evalsha") - refreshes,
        n,
        "open scripts while opening: {opened:?}"
    );
    assert_eq!(opened.of("hmget"), opened.of("evalsha"), "{opened:?}");
    // Every ZADD of an index flush carries at least one new stream. A tick
    // adds at most one ZADD per shard, and refreshes at least one stream.
    assert!(
        opened.of("zadd") <= n + refreshes * u64::from(INDEX_SHARDS),
        "index ZADDs while opening: {opened:?}"
    );
    assert_eq!(opened.of("zrem"), 0, "{opened:?}");
    eprintln!("{label}: opening {n} streams: {opened:?}");

    // Refresh ticks: one EVALSHA per live stream and at most one ZADD per shard.
    for _ in 0..1000 {
        if read_calls(&mut nodes).await.of("evalsha") >= opened.of("evalsha") + n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ticked = settled_calls(&mut nodes).await.since(&opened);
    let ticks = ticked.of("evalsha") / n;
    assert!(ticks >= 1, "no refresh tick: {ticked:?}");
    assert_eq!(ticked.of("evalsha"), ticks * n, "{ticked:?}");
    assert_eq!(ticked.of("hset"), ticks * n, "{ticked:?}");
    assert!(
        ticked.of("zadd") <= ticks * u64::from(INDEX_SHARDS),
        "{ticked:?}"
    );
    assert_eq!(ticked.of("del"), 0, "{ticked:?}");
    assert_eq!(ticked.of("zrem"), 0, "{ticked:?}");
    assert_eq!(ticked.of("zrangebyscore"), 0, "{ticked:?}");
    eprintln!("{label}: {ticks} refresh tick(s) of {n} streams: {ticked:?}");

    // A sweep with nothing stale reads each index shard once, whatever n.
    let guardian = StreamGuardian::new(conn.clone()).key_prefix(&prefix);
    let before = settled_calls(&mut nodes).await;
    let report = guardian.sweep().await.expect("sweep failed");
    let swept = settled_calls(&mut nodes).await.since(&before);
    assert_eq!(report, SweepReport::default());
    assert_eq!(
        swept.of("zrangebyscore"),
        u64::from(INDEX_SHARDS),
        "{swept:?}"
    );
    // Refresh ticks may fall in the sweep, but the orphan script must not run.
    assert_eq!(swept.of("evalsha") % n, 0, "{swept:?}");
    assert_eq!(swept.of("zrem"), 0, "{swept:?}");
    eprintln!("{label}: one sweep: {swept:?}");

    assert_eq!(layer.live_streams() as u64, n);
    drop(responses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_counts_on_cluster() {
    // A cluster of its own, so that no other test adds to its counters.
    let cluster = tokio::task::spawn_blocking(LocalCluster::start)
        .await
        .unwrap();
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3);
    check_command_counts(cluster.connect().await, masters, "cluster_counts").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_counts_on_single_server() {
    let server = RedisProcess::start();
    let node = node_connection(server.port).await;
    check_command_counts(server.connect().await, vec![node], "single_counts").await;
}

#[test]
fn command_stats_parsed() {
    let info = "# Commandstats\r\n\
        cmdstat_evalsha:calls=12,usec=40,usec_per_call=3.33,rejected_calls=1,failed_calls=2\r\n\
        cmdstat_cluster|slots:calls=3,usec=9,usec_per_call=3.00,rejected_calls=0,failed_calls=0\r\n\
        cmdstat_info:calls=1,usec=5,usec_per_call=5.00\r\n";
    let calls = parse_command_calls(info);
    assert_eq!(calls.get("evalsha"), Some(&10));
    assert_eq!(calls.get("cluster|slots"), Some(&3));
    assert_eq!(calls.get("info"), Some(&1));
    assert_eq!(calls.len(), 3);
    assert!(parse_command_calls("# Commandstats\r\n").is_empty());
}

#[test]
fn stream_keys_share_a_slot() {
    // The layer's key layout: a stream's hash and log share the id as hash tag.
    let hash = redis::cluster_routing::Route::with_key(
        "sse:{abc}",
        redis::cluster_routing::SlotAddr::Master,
    );
    let log = redis::cluster_routing::Route::with_key(
        "sse:{abc}:log",
        redis::cluster_routing::SlotAddr::Master,
    );
    assert_eq!(hash, log);
    let shards: HashSet<_> = (0..INDEX_SHARDS)
        .map(|shard| {
            redis::cluster_routing::Route::with_key(
                format!("sse:active:{{{shard}}}"),
                redis::cluster_routing::SlotAddr::Master,
            )
        })
        .collect();
    assert_eq!(shards.len(), usize::from(INDEX_SHARDS));
}
