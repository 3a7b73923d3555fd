//! The guardian against a real Redis: streams abandoned by a crashed server are
//! marked orphaned exactly once, live streams are left alone, dangling index
//! entries are removed, and the run loop stops and survives Redis outages. The
//! orphan cases run on the memory store too.

mod common;
mod support;

use std::{collections::HashMap, time::Duration};

use common::*;
use redis::aio::ConnectionManager;
use sse_resilience::{SseResilienceLayer, StreamGuardian, SweepReport};
use support::*;
use tokio_util::sync::CancellationToken;

const STALE: Duration = Duration::from_millis(500);
const TOKEN: &str = "data: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "event: completed\ndata: {\"type\":\"completed\"}\n\n";
/// Bound on sweep rounds, so a broken test fails instead of looping.
const MAX_ROUNDS: usize = 400;
/// Sweep rounds run after the last orphan was seen, to catch a second marking.
const EXTRA_ROUNDS: usize = 5;

async fn guardian(prefix: &str) -> StreamGuardian {
    StreamGuardian::new(redis().await)
        .key_prefix(prefix)
        .stale_threshold(STALE)
}

fn ids(stem: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{stem}{i}")).collect()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Adds `id` to its index shard with `score` and gives the shard a TTL.
async fn zadd_index(conn: &mut ConnectionManager, prefix: &str, id: &str, score: u64) {
    let key = index_key(prefix, id);
    let () = redis::cmd("ZADD")
        .arg(&key)
        .arg(score)
        .arg(id)
        .query_async(conn)
        .await
        .unwrap();
    let () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(60_000)
        .query_async(conn)
        .await
        .unwrap();
}

/// Writes a stream hash with `fields` and a TTL.
async fn write_hash(conn: &mut ConnectionManager, prefix: &str, id: &str, fields: &[(&str, &str)]) {
    let key = stream_key(prefix, id);
    let mut hset = redis::cmd("HSET");
    hset.arg(&key);
    for (name, value) in fields {
        hset.arg(*name).arg(*value);
    }
    let () = hset.query_async(conn).await.unwrap();
    let () = redis::cmd("PEXPIRE")
        .arg(&key)
        .arg(60_000)
        .query_async(conn)
        .await
        .unwrap();
}

/// Counts how often each id appears in the `orphaned` lists of `reports`.
fn count_orphaned<'a>(
    reports: impl IntoIterator<Item = &'a SweepReport>,
) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for report in reports {
        for id in &report.orphaned {
            *counts.entry(id.clone()).or_insert(0) += 1;
        }
    }
    counts
}

async fn all_orphaned(backend: &Backend, ids: &[String]) -> bool {
    for id in ids {
        if backend.state(id).await.as_deref() != Some("orphaned") {
            return false;
        }
    }
    true
}

/// Sweeps with every guardian concurrently, round after round, until every
/// id is orphaned, then a few rounds more. Returns every report.
async fn sweep_until_orphaned(
    guardians: &[StreamGuardian],
    backend: &Backend,
    ids: &[String],
) -> Vec<SweepReport> {
    let mut reports = Vec::new();
    let mut extra = None;
    for _ in 0..MAX_ROUNDS {
        let sweeps = guardians.iter().map(StreamGuardian::sweep);
        for result in futures_util::future::join_all(sweeps).await {
            reports.push(result.expect("sweep failed"));
        }
        match extra {
            None if all_orphaned(backend, ids).await => extra = Some(EXTRA_ROUNDS),
            Some(0) => return reports,
            Some(rounds) => extra = Some(rounds - 1),
            None => {}
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("streams were not all orphaned after {MAX_ROUNDS} sweep rounds");
}

/// Checks the replay of an orphaned stream through a fresh server.
async fn assert_orphan_replay(backend: &Backend, id: &str, event_type: &str) {
    let server = TestServer::start(backend.layer()).await;
    let replay = server.get(&format!("/sse?stream_id={id}")).await;
    assert_eq!(replay.status(), 200);
    let event = parse_synthetic(&replay.text().await.unwrap());
    assert_eq!(event.event_type, event_type);
    assert_eq!(event.id, "_end");
    assert_eq!(event.data["type"], event_type);
    assert_eq!(event.data["reason"], "orphaned");
    assert_eq!(event.data["stream_id"], id);
    assert_eq!(
        server.scripted.calls(),
        0,
        "the inner service was called for an orphaned stream"
    );
}

/// Returns a guardian on `backend` with the tests' stale threshold.
fn guardian_on(backend: &Backend) -> StreamGuardian {
    backend.guardian().stale_threshold(STALE)
}

backend_tests!(
    two_guardians_orphan_once,
    many_guardians_orphan_each_once,
    fresh_stream_not_orphaned,
    orphan_event_type_changes_replay,
);

async fn two_guardians_orphan_once(backend: Backend) {
    let id = "g1".to_owned();
    abandon_streams_on(&backend, std::slice::from_ref(&id), STALE).await;
    assert_eq!(backend.state(&id).await.as_deref(), Some("active"));

    let guardians = [guardian_on(&backend), guardian_on(&backend)];
    let reports = sweep_until_orphaned(&guardians, &backend, std::slice::from_ref(&id)).await;
    let counts = count_orphaned(&reports);
    assert_eq!(counts.get(&id), Some(&1), "orphaned counts: {counts:?}");
    assert_eq!(counts.len(), 1, "orphaned counts: {counts:?}");

    assert_eq!(backend.state(&id).await.as_deref(), Some("orphaned"));
    assert_eq!(
        backend.field(&id, "reason").await.as_deref(),
        Some("orphaned")
    );
    assert!(!is_indexed(&backend, &id).await, "{id} is still indexed");
    if let Backend::Redis { conn, prefix, .. } = &backend {
        let ttl = pttl(&mut conn.clone(), &stream_key(prefix, &id)).await;
        assert!(ttl > 0, "orphaned hash PTTL is {ttl}");
        assert!(
            ttl <= 300_000,
            "orphaned hash PTTL {ttl} ms exceeds the default completion TTL of 5 minutes"
        );
    }
    assert_orphan_replay(&backend, &id, "failed").await;
}

async fn many_guardians_orphan_each_once(backend: Backend) {
    let ids = ids("a", 40);
    abandon_streams_on(&backend, &ids, STALE).await;

    // Small batches on two guardians spread the candidates over several sweeps.
    let guardians = [
        guardian_on(&backend),
        guardian_on(&backend),
        guardian_on(&backend).batch_size(1),
        guardian_on(&backend).batch_size(2),
    ];
    let reports = sweep_until_orphaned(&guardians, &backend, &ids).await;
    let counts = count_orphaned(&reports);
    for id in &ids {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "stream {id} orphaned {:?} times",
            counts.get(id)
        );
    }
    assert_eq!(
        counts.len(),
        ids.len(),
        "unexpected ids orphaned: {counts:?}"
    );

    for id in &ids {
        assert!(
            !is_indexed(&backend, id).await,
            "stream {id} is still indexed"
        );
    }
}

async fn fresh_stream_not_orphaned(backend: Backend) {
    let layer = backend.layer().stale_threshold(STALE).without_heartbeats();
    let server = TestServer::start(layer).await;
    let mut response = server.get("/sse?stream_id=live1").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;

    let guardian = guardian_on(&backend);
    for _ in 0..30 {
        let report = guardian.sweep().await.unwrap();
        assert!(
            report.orphaned.is_empty(),
            "a live stream was orphaned: {report:?}"
        );
        assert_eq!(
            report.dangling_removed, 0,
            "a live stream's index entry was removed: {report:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(backend.state("live1").await.as_deref(), Some("active"));
    assert!(is_indexed(&backend, "live1").await);

    // The client still gets the rest of the stream.
    stream.send(COMPLETED);
    let rest = read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    assert_eq!(rest, COMPLETED.as_bytes());
    backend.wait_for_state("live1", "completed").await;
}

#[tokio::test]
async fn stale_index_fresh_hash_counted_fresh() {
    let prefix = unique_prefix("guardian_lagging_index");
    // A long threshold leaves about a second between refreshes to run the sweep in.
    let threshold = Duration::from_secs(3);
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(threshold)
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let _response = server.get("/sse?stream_id=lag1").await;
    let _stream = server.scripted.next_stream().await;
    let mut conn = redis().await;
    eventually("stream lag1 indexed", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { index_score(&mut conn, &prefix, "lag1").await.is_some() }
    })
    .await;

    // An index score older than the threshold, while the hash has a recent last_refresh.
    zadd_index(&mut conn, &prefix, "lag1", now_ms() - 60_000).await;
    let guardian = StreamGuardian::new(redis().await)
        .key_prefix(&prefix)
        .stale_threshold(threshold);
    let report = guardian.sweep().await.unwrap();
    assert_eq!(report.orphaned, Vec::<String>::new());
    assert_eq!(report.fresh, 1, "report: {report:?}");
    assert_eq!(report.dangling_removed, 0, "report: {report:?}");
    assert_eq!(
        state_of(&mut conn, &prefix, "lag1").await.as_deref(),
        Some("active")
    );
    assert!(
        index_score(&mut conn, &prefix, "lag1").await.is_some(),
        "a fresh stream lost its index entry"
    );
}

#[tokio::test]
async fn dangling_entries_removed() {
    let prefix = unique_prefix("guardian_dangling");
    let mut conn = redis().await;
    let old = now_ms() - 60_000;
    let old_text = old.to_string();

    // No hash at all.
    zadd_index(&mut conn, &prefix, "ghost", old).await;
    // Hashes of streams that already ended.
    for (id, state) in [
        ("done", "completed"),
        ("broke", "failed"),
        ("lost", "orphaned"),
    ] {
        write_hash(
            &mut conn,
            &prefix,
            id,
            &[
                ("id", id),
                ("state", state),
                ("claim", "c"),
                ("last_refresh", &old_text),
                ("terminal_event", "event: x\n\n"),
            ],
        )
        .await;
        zadd_index(&mut conn, &prefix, id, old).await;
    }

    let report = guardian(&prefix).await.sweep().await.unwrap();
    assert_eq!(report.orphaned, Vec::<String>::new());
    assert_eq!(report.dangling_removed, 4, "report: {report:?}");
    assert_eq!(report.fresh, 0, "report: {report:?}");
    for id in ["ghost", "done", "broke", "lost"] {
        assert_eq!(
            index_score(&mut conn, &prefix, id).await,
            None,
            "{id} is still indexed"
        );
    }
    assert_eq!(
        pttl(&mut conn, &stream_key(&prefix, "ghost")).await,
        -2,
        "a hash was created for ghost"
    );
    assert_eq!(
        state_of(&mut conn, &prefix, "done").await.as_deref(),
        Some("completed")
    );
    assert_eq!(
        state_of(&mut conn, &prefix, "broke").await.as_deref(),
        Some("failed")
    );

    let again = guardian(&prefix).await.sweep().await.unwrap();
    assert_eq!(again, SweepReport::default());
}

#[tokio::test]
async fn run_with_token_sweeps_and_stops() {
    let prefix = unique_prefix("guardian_run_token");
    abandon_streams(&prefix, &["rt1".to_owned()], STALE).await;

    let token = CancellationToken::new();
    let running = guardian(&prefix)
        .await
        .sweep_interval(Duration::from_millis(50));
    let handle = tokio::spawn(running.run_with_token(token.clone()));
    wait_for_state(&prefix, "rt1", "orphaned").await;
    wait_until_unindexed(&prefix, "rt1").await;
    assert!(
        !handle.is_finished(),
        "the guardian stopped before it was cancelled"
    );

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the guardian did not stop after cancel")
        .expect("the guardian task panicked");
}

#[tokio::test]
async fn run_until_stops_on_shutdown() {
    let prefix = unique_prefix("guardian_run_until");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = guardian(&prefix)
        .await
        .sweep_interval(Duration::from_millis(20));
    let handle = tokio::spawn(running.run_until(async move {
        let _ = stopped.await;
    }));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !handle.is_finished(),
        "the guardian stopped before shutdown"
    );

    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the guardian did not stop after shutdown")
        .expect("the guardian task panicked");
}

async fn orphan_event_type_changes_replay(backend: Backend) {
    let id = "et1".to_owned();
    abandon_streams_on(&backend, std::slice::from_ref(&id), STALE).await;

    let guardians = [guardian_on(&backend).orphan_event_type("error")];
    let reports = sweep_until_orphaned(&guardians, &backend, std::slice::from_ref(&id)).await;
    assert_eq!(count_orphaned(&reports).get(&id), Some(&1));
    assert_orphan_replay(&backend, &id, "error").await;
}

#[tokio::test]
#[should_panic(expected = "invalid orphan event type")]
async fn empty_orphan_event_type_rejected() {
    let _ = StreamGuardian::new(redis().await).orphan_event_type("");
}

#[tokio::test]
#[should_panic(expected = "invalid orphan event type")]
async fn multiline_orphan_event_type_rejected() {
    let _ = StreamGuardian::new(redis().await).orphan_event_type("error\ndata: x");
}

#[tokio::test]
#[should_panic(expected = "invalid key prefix")]
async fn braced_key_prefix_rejected() {
    let _ = StreamGuardian::new(redis().await).key_prefix("sse:{x}:");
}

#[tokio::test]
async fn unreachable_redis_sweep_errors() {
    let mut redis_process = RedisProcess::start();
    let port = redis_process.port;
    let prefix = unique_prefix("guardian_down");
    let guardian = StreamGuardian::new(redis_process.connect().await)
        .key_prefix(&prefix)
        .stale_threshold(STALE)
        .redis_timeout(Duration::from_millis(300));
    assert_eq!(guardian.sweep().await.unwrap(), SweepReport::default());

    redis_process.kill();
    let error = guardian
        .sweep()
        .await
        .expect_err("a sweep without Redis succeeded");
    assert!(!error.to_string().is_empty());

    let token = CancellationToken::new();
    let handle = tokio::spawn(
        guardian
            .clone()
            .sweep_interval(Duration::from_millis(20))
            .run_with_token(token.clone()),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !handle.is_finished(),
        "the guardian stopped while Redis was down"
    );

    // Redis comes back empty: the running guardian marks a stale stream written there.
    let restarted = RedisProcess::start_on(port);
    let mut conn = restarted.connect().await;
    let old = (now_ms() - 60_000).to_string();
    write_hash(
        &mut conn,
        &prefix,
        "back1",
        &[
            ("id", "back1"),
            ("state", "active"),
            ("claim", "c"),
            ("last_refresh", &old),
        ],
    )
    .await;
    zadd_index(&mut conn, &prefix, "back1", now_ms() - 60_000).await;
    eventually("the running guardian recovers and orphans back1", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { state_of(&mut conn, &prefix, "back1").await.as_deref() == Some("orphaned") }
    })
    .await;
    assert!(
        guardian.sweep().await.is_ok(),
        "sweep still fails after Redis came back"
    );

    token.cancel();
    tokio::time::timeout(Duration::from_secs(10), handle)
        .await
        .expect("the guardian did not stop after cancel")
        .expect("the guardian task panicked");
}
