//! Redis failures under hundreds of live streams: a stopped server, a server
//! restarted without persistence, and a Redis Cluster master killed until its
//! replica takes over. Every test starts its own Redis processes.

mod cluster_support;
mod common;
mod support;

use std::{
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use cluster_support::{LocalCluster, keys_on_node, node_connection};
use common::{ScriptedStream, TestServer, unique_prefix};
use redis::{
    RedisError,
    aio::{ConnectionLike, MultiplexedConnection},
    cluster::ClusterClientBuilder,
};
use sse_resilience::{ReconnectingCluster, SseResilienceLayer, StreamGuardian};
use support::{RedisProcess, index_score};
use tokio_util::sync::CancellationToken;

/// Length of the single-server outages.
const OUTAGE: Duration = Duration::from_secs(10);
/// Time between two events of a live stream.
const EVENT_GAP: Duration = Duration::from_millis(500);
/// Stale threshold of the single-server tests: a refresh tick every 500 ms,
/// and a 15 s TTL on live hashes, longer than the outage.
const SINGLE_STALE: Duration = Duration::from_millis(1500);
/// Stale threshold of the cluster test: a refresh tick every 6 s. The master
/// is killed right after a tick, so streams on it go without a refresh for
/// the failover and at most one more tick. A failover took about 6 s in
/// trial runs of this test with the cluster's node timeout of 3 s.
const CLUSTER_STALE: Duration = Duration::from_secs(18);
/// Bound of every wait. It only keeps a broken test from hanging. It bounds
/// time rather than rounds, since one round may wait seconds on a stuck
/// Redis call.
const WAIT_LIMIT: Duration = Duration::from_secs(30);

/// Waits until `check` returns true, polling every 20 ms, for at most
/// [`WAIT_LIMIT`].
async fn wait_until<F, Fut>(condition: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let polling = async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    if tokio::time::timeout(WAIT_LIMIT, polling).await.is_err() {
        panic!("condition not met within {WAIT_LIMIT:?}: {condition}");
    }
}

fn token(n: u32) -> String {
    format!("id: {n}\ndata: {{\"type\":\"token\",\"n\":{n}}}\n\n")
}

/// Returns a `completed` event that names its stream, so that a stored
/// terminal event shows which stream it came from.
fn completed(id: &str, n: u32) -> String {
    format!("id: {n}\nevent: completed\ndata: {{\"type\":\"completed\",\"stream\":\"{id}\"}}\n\n")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// What the client task of one response has read so far.
#[derive(Default)]
struct Received {
    bytes: Vec<u8>,
    /// `Some(Ok)` once the body ended cleanly, `Some(Err)` when reading failed.
    end: Option<Result<(), String>>,
}

/// One stream of the load: its inner body, the bytes it sent, and what its
/// client read.
struct LoadStream {
    id: String,
    inner: Option<ScriptedStream>,
    sent: Vec<u8>,
    /// Number of the last event sent, also its `id:`.
    events: u32,
    /// The terminal event, once sent.
    terminal: Option<String>,
    received: Arc<Mutex<Received>>,
}

impl LoadStream {
    fn send_token(&mut self) {
        self.events += 1;
        self.send(token(self.events));
    }

    /// Sends the terminal event and ends the inner body.
    fn finish(&mut self) {
        self.events += 1;
        let terminal = completed(&self.id, self.events);
        self.send(terminal.clone());
        self.terminal = Some(terminal);
        self.inner = None;
    }

    fn send(&mut self, event: String) {
        let inner = self.inner.as_ref().expect("the stream already finished");
        inner.send(event.clone());
        self.sent.extend_from_slice(event.as_bytes());
    }

    fn is_live(&self) -> bool {
        self.inner.is_some()
    }
}

/// Reads `response` to its end in a task of its own, so that hundreds of
/// responses are drained at once.
fn spawn_reader(mut response: reqwest::Response) -> Arc<Mutex<Received>> {
    let received = Arc::new(Mutex::new(Received::default()));
    let sink = received.clone();
    tokio::spawn(async move {
        let end = loop {
            match response.chunk().await {
                Ok(Some(chunk)) => sink.lock().unwrap().bytes.extend_from_slice(&chunk),
                Ok(None) => break Ok(()),
                Err(error) => break Err(error.to_string()),
            }
        };
        sink.lock().unwrap().end = Some(end);
    });
    received
}

/// Opens one stream per id, one after the other, and sends a first token
/// event on each.
async fn open_load(server: &TestServer, ids: &[String]) -> Vec<LoadStream> {
    let mut streams = Vec::with_capacity(ids.len());
    for id in ids {
        let response = server.get(&format!("/sse?stream_id={id}")).await;
        assert_eq!(response.status(), 200, "opening stream {id}");
        let inner = server.scripted.next_stream().await;
        assert_eq!(inner.stream_id.as_deref(), Some(id.as_str()));
        let mut stream = LoadStream {
            id: id.clone(),
            inner: Some(inner),
            sent: Vec::new(),
            events: 0,
            terminal: None,
            received: spawn_reader(response),
        };
        stream.send_token();
        streams.push(stream);
    }
    streams
}

/// Waits until every client read all the bytes its inner body sent and every
/// finished stream's client saw the end, then checks each client.
async fn check_clients(streams: &[LoadStream]) {
    wait_until(
        "every client reads what its inner body sent",
        || async move {
            streams.iter().all(|stream| {
                let received = stream.received.lock().unwrap();
                received.bytes.len() >= stream.sent.len()
                    && (stream.is_live() || received.end.is_some())
            })
        },
    )
    .await;
    for stream in streams {
        let received = stream.received.lock().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&received.bytes),
            String::from_utf8_lossy(&stream.sent),
            "bytes read by the client of stream {}",
            stream.id
        );
        let expected_end = if stream.is_live() { None } else { Some(Ok(())) };
        assert_eq!(
            received.end, expected_end,
            "end of the response of stream {}",
            stream.id
        );
    }
}

/// Reads hash field `field` of every stream in `ids`, all at once.
async fn read_field<C>(
    conn: &C,
    prefix: &str,
    ids: &[&str],
    field: &str,
) -> Result<Vec<Option<String>>, RedisError>
where
    C: ConnectionLike + Clone,
{
    let reads = ids.iter().map(|id| {
        let mut conn = conn.clone();
        let key = format!("{prefix}{{{id}}}");
        async move {
            redis::cmd("HGET")
                .arg(key)
                .arg(field)
                .query_async::<Option<String>>(&mut conn)
                .await
        }
    });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .collect()
}

fn live_ids(streams: &[LoadStream]) -> Vec<&str> {
    streams
        .iter()
        .filter(|s| s.is_live())
        .map(|s| s.id.as_str())
        .collect()
}

fn finished_ids(streams: &[LoadStream]) -> Vec<&str> {
    streams
        .iter()
        .filter(|s| !s.is_live())
        .map(|s| s.id.as_str())
        .collect()
}

/// Waits until every stream in `ids` has state `state`.
async fn wait_for_states<C>(conn: &C, prefix: &str, ids: &[&str], state: &str)
where
    C: ConnectionLike + Clone,
{
    wait_until(
        &format!("{} streams reach state {state}", ids.len()),
        || {
            let conn = conn.clone();
            async move {
                read_field(&conn, prefix, ids, "state")
                    .await
                    .is_ok_and(|states| states.iter().all(|s| s.as_deref() == Some(state)))
            }
        },
    )
    .await;
}

/// Waits until every stream in `ids` has a `last_refresh` after `after_ms`.
async fn wait_for_refresh<C>(conn: &C, prefix: &str, ids: &[&str], after_ms: u64)
where
    C: ConnectionLike + Clone,
{
    wait_until(
        &format!("{} streams are refreshed again", ids.len()),
        || {
            let conn = conn.clone();
            async move {
                read_field(&conn, prefix, ids, "last_refresh")
                    .await
                    .is_ok_and(|values| {
                        values.iter().all(|value| {
                            value.as_deref().and_then(|ms| ms.parse::<u64>().ok()) > Some(after_ms)
                        })
                    })
            }
        },
    )
    .await;
}

/// Checks that every finished stream in `streams` is `completed` in Redis with
/// its own terminal event stored.
async fn check_recorded<C>(conn: &C, prefix: &str, streams: &[LoadStream])
where
    C: ConnectionLike + Clone,
{
    let finished: Vec<&LoadStream> = streams.iter().filter(|s| !s.is_live()).collect();
    let ids: Vec<&str> = finished.iter().map(|s| s.id.as_str()).collect();
    wait_for_states(conn, prefix, &ids, "completed").await;
    let stored = read_field(conn, prefix, &ids, "terminal_event")
        .await
        .expect("reading the terminal events failed");
    let stored_ids = read_field(conn, prefix, &ids, "terminal_id")
        .await
        .expect("reading the terminal event ids failed");
    for ((stream, event), event_id) in finished.iter().zip(stored).zip(stored_ids) {
        assert_eq!(
            event.as_deref(),
            stream.terminal.as_deref(),
            "terminal event of stream {}",
            stream.id
        );
        assert_eq!(
            event_id,
            Some(stream.events.to_string()),
            "terminal event id of stream {}",
            stream.id
        );
    }
}

/// Sends one token event on every live stream every [`EVENT_GAP`] for
/// `rounds` rounds, and finishes every other stream (even positions) after
/// `finish_after` rounds.
async fn send_rounds(streams: &mut [LoadStream], rounds: u32, finish_after: u32) {
    for round in 1..=rounds {
        tokio::time::sleep(EVENT_GAP).await;
        if round == finish_after {
            for stream in streams.iter_mut().step_by(2) {
                stream.finish();
            }
        }
        for stream in streams.iter_mut().filter(|s| s.is_live()) {
            stream.send_token();
        }
    }
}

fn single_server_layer(conn: redis::aio::ConnectionManager, prefix: &str) -> SseResilienceLayer {
    SseResilienceLayer::new(conn)
        .key_prefix(prefix)
        .redis_timeout(Duration::from_millis(300))
        .stale_threshold(SINGLE_STALE)
        .without_heartbeats()
}

/// Waits until the client of a stream served untracked read its end, and
/// checks that it read `expected` and ended cleanly.
async fn check_untracked(read: &Arc<Mutex<Received>>, expected: &str) {
    wait_until(
        "the untracked stream's client reads its end",
        || async move { read.lock().unwrap().end.is_some() },
    )
    .await;
    let read = read.lock().unwrap();
    assert_eq!(read.end, Some(Ok(())));
    assert_eq!(String::from_utf8_lossy(&read.bytes), expected);
}

/// Opens `count` streams, waits until all are active in Redis and checks
/// that the layer counts them.
async fn start_load(
    server: &TestServer,
    layer: &SseResilienceLayer,
    check: &redis::aio::ConnectionManager,
    prefix: &str,
    name: &str,
    count: usize,
) -> Vec<LoadStream> {
    let ids: Vec<String> = (0..count).map(|i| format!("{name}-{i}")).collect();
    let streams = open_load(server, &ids).await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_states(check, prefix, &all, "active").await;
    assert_eq!(layer.live_streams(), count);
    check_clients(&streams).await;
    streams
}

/// Finishes every live stream and checks that the clients get every byte and
/// that Redis records each end.
async fn finish_the_rest<C>(
    streams: &mut [LoadStream],
    layer: &SseResilienceLayer,
    conn: &C,
    prefix: &str,
) where
    C: ConnectionLike + Clone,
{
    for stream in streams.iter_mut().filter(|s| s.is_live()) {
        stream.finish();
    }
    check_clients(streams).await;
    check_recorded(conn, prefix, streams).await;
    wait_until("the layer has no live stream left", || async move {
        layer.live_streams() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_redis_stopped_under_load() {
    let redis_process = RedisProcess::start();
    let prefix = unique_prefix("stopped_load");
    let layer = single_server_layer(redis_process.connect().await, &prefix);
    let server = TestServer::start(layer.clone()).await;
    let check = redis_process.connect().await;
    let mut streams = start_load(&server, &layer, &check, &prefix, "stop", 500).await;

    // SIGSTOP: connections stay open and Redis processes no command.
    redis_process.pause();

    // A stream opened now is served untracked once the open times out.
    let untracked = server.get("/sse?stream_id=during-pause").await;
    assert_eq!(untracked.status(), 200);
    let untracked_inner = server.scripted.next_stream().await;
    let untracked_read = spawn_reader(untracked);
    untracked_inner.send(completed("during-pause", 1));
    drop(untracked_inner);

    let rounds = (OUTAGE.as_millis() / EVENT_GAP.as_millis()) as u32;
    send_rounds(&mut streams, rounds, rounds / 2).await;

    // Still stopped: bytes never waited for Redis.
    check_clients(&streams).await;
    check_untracked(&untracked_read, &completed("during-pause", 1)).await;

    redis_process.resume();
    let resumed_at = now_ms();

    let live = live_ids(&streams);
    wait_for_refresh(&check, &prefix, &live, resumed_at).await;
    let states = read_field(&check, &prefix, &live, "state").await.unwrap();
    for (id, state) in live.iter().zip(states) {
        assert_eq!(
            state.as_deref(),
            Some("active"),
            "state of live stream {id}"
        );
    }
    assert_eq!(finished_ids(&streams).len(), 250);
    check_recorded(&check, &prefix, &streams).await;

    // The open that timed out ran once Redis went on, and its claim was
    // released, so a new request for the id starts the stream again.
    wait_until("the untracked stream leaves no hash", || {
        let mut check = check.clone();
        let prefix = prefix.clone();
        async move {
            support::state_of(&mut check, &prefix, "during-pause")
                .await
                .is_none()
        }
    })
    .await;
    let calls = server.scripted.calls();
    let again = server.get("/sse?stream_id=during-pause").await;
    assert_eq!(again.status(), 200);
    assert_eq!(server.scripted.calls(), calls + 1);
    let again_inner = server.scripted.next_stream().await;
    let again_read = spawn_reader(again);
    again_inner.send(completed("during-pause", 1));
    drop(again_inner);
    check_untracked(&again_read, &completed("during-pause", 1)).await;

    finish_the_rest(&mut streams, &layer, &check, &prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_redis_restarted_under_load() {
    let mut redis_process = RedisProcess::start();
    let port = redis_process.port;
    let prefix = unique_prefix("restarted_load");
    let layer = single_server_layer(redis_process.connect().await, &prefix);
    let server = TestServer::start(layer.clone()).await;
    let check = redis_process.connect().await;
    let mut streams = start_load(&server, &layer, &check, &prefix, "restart", 200).await;

    // A restart without persistence loses every key and every loaded script.
    redis_process.kill();

    // An invalid id is rejected without Redis.
    let invalid = server.get("/sse?stream_id=bad%20id").await;
    assert_eq!(invalid.status(), 400);

    // A stream opened while Redis is down is served untracked.
    let untracked = server.get("/sse?stream_id=while-down").await;
    assert_eq!(untracked.status(), 200);
    let untracked_inner = server.scripted.next_stream().await;
    let untracked_read = spawn_reader(untracked);
    untracked_inner.send(completed("while-down", 1));
    drop(untracked_inner);

    let rounds = (OUTAGE.as_millis() / EVENT_GAP.as_millis()) as u32;
    send_rounds(&mut streams, rounds, rounds / 2).await;
    check_clients(&streams).await;

    let restarted = tokio::task::spawn_blocking(move || RedisProcess::start_on(port))
        .await
        .unwrap();
    let restarted_at = now_ms();
    let check = restarted.connect().await;

    let live = live_ids(&streams);
    wait_for_states(&check, &prefix, &live, "active").await;
    wait_for_refresh(&check, &prefix, &live, restarted_at).await;
    for id in &live {
        let mut conn = check.clone();
        assert!(
            index_score(&mut conn, &prefix, id).await.is_some(),
            "live stream {id} is not in the active index after the restart"
        );
    }
    assert_eq!(finished_ids(&streams).len(), 100);
    check_recorded(&check, &prefix, &streams).await;

    check_untracked(&untracked_read, &completed("while-down", 1)).await;
    let mut conn = check.clone();
    assert_eq!(
        support::state_of(&mut conn, &prefix, "while-down").await,
        None
    );

    finish_the_rest(&mut streams, &layer, &check, &prefix).await;
}

/// Opens a cluster connection meant to follow a failover. Its connection and
/// response time-outs are short and its retries few and quick, so a command
/// for a dead master fails within the layer's Redis time-out. The redis-rs
/// 1.8.2 defaults wait at least 1.28 s before each of 16 retries.
async fn failover_connection(cluster: &LocalCluster) -> ReconnectingCluster {
    let client = ClusterClientBuilder::new(cluster.urls())
        .connection_timeout(Duration::from_millis(500))
        .response_timeout(Duration::from_secs(1))
        .retries(4)
        .min_retry_wait(50)
        .max_retry_wait(500)
        .build()
        .expect("invalid cluster client settings");
    ReconnectingCluster::connect(client)
        .await
        .expect("failed to connect to the local cluster")
}

/// Returns the lines of CLUSTER NODES on one node.
async fn cluster_nodes(conn: &mut MultiplexedConnection) -> Result<String, RedisError> {
    redis::cmd("CLUSTER").arg("NODES").query_async(conn).await
}

/// Waits until a node replicates master `master` in sync and every node
/// lists it as that master's replica, and returns its client port. A master
/// votes in a failover only for a replica it lists.
async fn replica_of(cluster: &LocalCluster, master: u16) -> u16 {
    let mut master_conn = node_connection(master).await;
    let master_id: String = redis::cmd("CLUSTER")
        .arg("MYID")
        .query_async(&mut master_conn)
        .await
        .unwrap();
    let mut last = String::new();
    for _ in 0..1000 {
        match listed_replica(cluster, master, &master_id).await {
            Ok(port) => return port,
            Err(reason) => last = reason,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("master {master} never got a listed replica in sync: {last}");
}

async fn listed_replica(
    cluster: &LocalCluster,
    master: u16,
    master_id: &str,
) -> Result<u16, String> {
    let mut replica = None;
    for &port in cluster.ports.iter().filter(|&&port| port != master) {
        let mut conn = node_connection(port).await;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .map_err(|e| format!("INFO replication on {port}: {e}"))?;
        if info.contains(&format!("master_port:{master}\r\n"))
            && info.contains("master_link_status:up")
        {
            replica = Some(port);
        }
    }
    let replica = replica.ok_or_else(|| format!("no replica of {master} is in sync"))?;
    for &port in &cluster.ports {
        let mut conn = node_connection(port).await;
        let nodes = cluster_nodes(&mut conn)
            .await
            .map_err(|e| format!("CLUSTER NODES on {port}: {e}"))?;
        let listed = nodes.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            fields.len() > 3
                && port_of(fields[1]) == replica
                && fields[2].split(',').any(|flag| flag == "slave")
                && fields[3] == master_id
        });
        if !listed {
            return Err(format!(
                "node {port} does not list {replica} as a replica of {master}"
            ));
        }
    }
    Ok(replica)
}

/// Returns the client port of a CLUSTER NODES address `ip:port@cport`.
fn port_of(address: &str) -> u16 {
    let (_, rest) = address.split_once(':').expect("address without a port");
    let port = rest.split(['@', ',']).next().unwrap();
    port.parse()
        .expect("invalid port in a CLUSTER NODES address")
}

/// Returns true when node `observer` reports `cluster_state:ok` and lists
/// node `port` as a master.
async fn promoted(observer: u16, port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{observer}")) else {
        return false;
    };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
        return false;
    };
    let Ok(info) = redis::cmd("CLUSTER")
        .arg("INFO")
        .query_async::<String>(&mut conn)
        .await
    else {
        return false;
    };
    let Ok(nodes) = cluster_nodes(&mut conn).await else {
        return false;
    };
    info.contains("cluster_state:ok")
        && nodes.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            fields.len() > 2
                && port_of(fields[1]) == port
                && fields[2].split(',').any(|flag| flag == "master")
        })
}

/// Sends SIGKILL to the redis-server on `port`, a child of this test process.
async fn kill_node(port: u16) {
    let mut conn = node_connection(port).await;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .unwrap();
    let pid = info
        .lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .expect("INFO server has no process_id")
        .trim()
        .to_owned();
    let status = Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("failed to run kill");
    assert!(status.success(), "kill -KILL {pid} failed");
}

/// A guardian that sweeps every 250 ms in a task and collects the ids of the
/// streams its sweeps mark orphaned.
struct SweepWatch {
    orphaned: Arc<Mutex<Vec<String>>>,
    successful_sweeps: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl SweepWatch {
    fn start(guardian: StreamGuardian) -> Self {
        let orphaned = Arc::new(Mutex::new(Vec::new()));
        let successful_sweeps = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (orphaned, successful_sweeps, stop) =
                (orphaned.clone(), successful_sweeps.clone(), stop.clone());
            async move {
                while !stop.is_cancelled() {
                    if let Ok(report) = guardian.sweep().await {
                        orphaned.lock().unwrap().extend(report.orphaned);
                        successful_sweeps.fetch_add(1, Ordering::SeqCst);
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    }
                }
            }
        });
        Self {
            orphaned,
            successful_sweeps,
            stop,
            task,
        }
    }

    fn successful_sweeps(&self) -> usize {
        self.successful_sweeps.load(Ordering::SeqCst)
    }

    async fn stop(self) -> Vec<String> {
        self.stop.cancel();
        self.task.await.unwrap();
        self.orphaned.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_master_killed_under_load() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    // A cluster of its own, since one of its masters is killed.
    let cluster = tokio::task::spawn_blocking(LocalCluster::start)
        .await
        .unwrap();
    let prefix = unique_prefix("cluster_killed");
    let conn = failover_connection(&cluster).await;
    let layer = SseResilienceLayer::new(conn.clone())
        .key_prefix(&prefix)
        .stale_threshold(CLUSTER_STALE)
        .without_heartbeats();
    let server = TestServer::start(layer.clone()).await;
    let watch = SweepWatch::start(
        StreamGuardian::new(failover_connection(&cluster).await)
            .key_prefix(&prefix)
            .stale_threshold(CLUSTER_STALE),
    );

    let ids: Vec<String> = (0..200).map(|i| format!("c{i}")).collect();
    let mut streams = open_load(&server, &ids).await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_for_states(&conn, &prefix, &all, "active").await;
    assert_eq!(layer.live_streams(), 200);
    check_clients(&streams).await;

    // The victim is the master of c0.
    let victim = cluster.slot_owner(cluster_support::key_slot(
        cluster.ports[0],
        &format!("{prefix}{{c0}}"),
    ));
    let replica = replica_of(&cluster, victim).await;
    let mut victim_conn = node_connection(victim).await;
    let on_victim: Vec<String> = keys_on_node(&mut victim_conn, &prefix)
        .await
        .into_iter()
        .filter(|key| !key.contains("active:"))
        .collect();
    let observer = *cluster
        .master_ports()
        .iter()
        .find(|&&port| port != victim)
        .unwrap();

    // Kill the victim right after a refresh tick. WAIT returns once its
    // replica has every write so far, since replication is asynchronous.
    let claimed_at = now_ms();
    wait_for_refresh(&conn, &prefix, &["c0"], claimed_at).await;
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut victim_conn)
        .await
        .unwrap();
    assert_eq!(acked, 1, "the replica of master {victim} is not in sync");
    kill_node(victim).await;

    // Half of the streams end while the victim's slots have no master.
    for stream in streams.iter_mut().step_by(2) {
        stream.finish();
    }
    let finished_on_victim = streams
        .iter()
        .filter(|s| !s.is_live() && on_victim.contains(&format!("{prefix}{{{}}}", s.id)))
        .count();
    assert!(
        finished_on_victim > 0,
        "no stream that ends during the failover lives on master {victim}"
    );

    let mut rounds = 0;
    while !promoted(observer, replica).await {
        rounds += 1;
        assert!(
            rounds <= 60,
            "replica {replica} was not promoted after {rounds} rounds"
        );
        tokio::time::sleep(EVENT_GAP).await;
        for stream in streams.iter_mut().filter(|s| s.is_live()) {
            stream.send_token();
        }
    }
    let promoted_at = now_ms();
    let sweeps_before = watch.successful_sweeps();
    check_clients(&streams).await;

    let live = live_ids(&streams);
    wait_for_refresh(&conn, &prefix, &live, promoted_at).await;
    check_recorded(&conn, &prefix, &streams).await;
    finish_the_rest(&mut streams, &layer, &conn, &prefix).await;

    let watching = &watch;
    wait_until("the guardian sweeps on the new topology", || async move {
        watching.successful_sweeps() > sweeps_before
    })
    .await;
    let orphaned = watch.stop().await;
    assert_eq!(
        orphaned,
        Vec::<String>::new(),
        "streams orphaned during the failover"
    );
}

#[tokio::test]
async fn reconnecting_cluster_reports_unreachable_nodes() {
    let port = support::free_port();
    let client = redis::cluster::ClusterClient::new(vec![format!("redis://127.0.0.1:{port}")])
        .expect("valid node url");
    let error = ReconnectingCluster::builder(client)
        .reconnect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect_err("a cluster without nodes was reached");
    assert!(
        error.to_string().contains("refused") || error.is_timeout(),
        "unexpected error: {error}"
    );
}
