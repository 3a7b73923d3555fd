//! Helpers shared by the lifecycle and guardian tests: a private redis-server
//! process, streams abandoned by a crashed server, and index lookups.

#![allow(dead_code)]

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Stdio},
    time::Duration,
};

use redis::aio::ConnectionManager;
use sse_resilience::INDEX_SHARDS;

use crate::common::{Backend, TestServer, contains, eventually, read_until, redis, stream_field};

/// A redis-server child process on a free loopback port, killed on drop.
pub struct RedisProcess {
    child: Option<Child>,
    pub port: u16,
}

impl RedisProcess {
    /// Starts a redis-server without persistence on a free loopback port.
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    /// Starts a redis-server without persistence on `port`, and waits until it accepts connections.
    pub fn start_on(port: u16) -> Self {
        Self::start_with(port, &[])
    }

    /// Starts a redis-server without persistence on `port` with the extra
    /// command-line options `args`, such as `["--requirepass", "pw"]`, and
    /// waits until it accepts connections.
    pub fn start_with(port: u16, args: &[&str]) -> Self {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("failed to start redis-server: is it installed and on PATH?");
        let process = Self {
            child: Some(child),
            port,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..250 {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return process;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not accept connections within about 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Connects a `ConnectionManager` to this server.
    pub async fn connect(&self) -> ConnectionManager {
        let client = redis::Client::open(self.url()).expect("invalid redis url");
        ConnectionManager::new(client)
            .await
            .expect("failed to connect to the private redis-server")
    }

    /// Stops the server process with SIGSTOP: connections stay open and no command is processed.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server go on with SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server was killed").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("failed to run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Kills the server and waits for the process to exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits for `child` to exit, for at most `limit`. Returns `None`, after
/// killing it, when it still runs then.
pub fn wait_or_kill(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let poll = Duration::from_millis(20);
    for _ in 0..limit.as_millis() / poll.as_millis() {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(poll);
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Returns a loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("failed to bind a loopback port");
    listener.local_addr().unwrap().port()
}

/// Returns the index shard of a stream id. This mirrors the crate's Redis data
/// layout: FNV-1a of the id bytes, modulo `INDEX_SHARDS`.
pub fn shard_of(id: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in id.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(INDEX_SHARDS)) as u16
}

/// Returns the key of the index shard that contains `id`.
pub fn index_key(prefix: &str, id: &str) -> String {
    format!("{prefix}active:{{{}}}", shard_of(id))
}

/// Returns the key of the hash of stream `id`.
pub fn stream_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{{{id}}}")
}

/// Returns the score of `id` in the active index, or `None` when it has no entry.
pub async fn index_score(conn: &mut ConnectionManager, prefix: &str, id: &str) -> Option<f64> {
    redis::cmd("ZSCORE")
        .arg(index_key(prefix, id))
        .arg(id)
        .query_async(conn)
        .await
        .unwrap()
}

/// Returns the `PTTL` of `key`: -2 when it does not exist, -1 when it has no TTL.
pub async fn pttl(conn: &mut ConnectionManager, key: &str) -> i64 {
    redis::cmd("PTTL").arg(key).query_async(conn).await.unwrap()
}

/// Returns the `state` field of stream `id`.
pub async fn state_of(conn: &mut ConnectionManager, prefix: &str, id: &str) -> Option<String> {
    stream_field(conn, prefix, id, "state").await
}

/// Opens one stream per id on a server in its own runtime, waits until every
/// stream is claimed and refreshed at least once, then shuts that runtime down
/// so the server and its refresher stop like a crashed process.
///
/// The streams stay `active` in Redis with a last refresh that only ages.
pub async fn abandon_streams(prefix: &str, ids: &[String], stale_threshold: Duration) {
    let backend = Backend::redis_with_prefix(prefix).await;
    abandon_streams_on(&backend, ids, stale_threshold).await;
}

/// [`abandon_streams`] on any backend: a memory store keeps the streams
/// `active` after the server's runtime stopped, as Redis does.
pub async fn abandon_streams_on(backend: &Backend, ids: &[String], stale_threshold: Duration) {
    let backend = backend.clone();
    let ids = ids.to_vec();
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("failed to build the runtime of the crashing server");
        let open_streams = runtime.block_on(open_and_refresh(&backend, &ids, stale_threshold));
        runtime.shutdown_background();
        drop(open_streams);
    })
    .await
    .expect("the crashing server panicked");
}

/// What keeps the streams of a crashing server open until its runtime stops.
struct OpenStreams {
    server: TestServer,
    responses: Vec<reqwest::Response>,
    streams: Vec<crate::common::ScriptedStream>,
}

async fn open_and_refresh(
    backend: &Backend,
    ids: &[String],
    stale_threshold: Duration,
) -> OpenStreams {
    let layer = backend
        .layer()
        .stale_threshold(stale_threshold)
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let mut responses = Vec::new();
    let mut streams = Vec::new();
    for id in ids {
        let mut response = server.get(&format!("/sse?stream_id={id}")).await;
        assert_eq!(
            response.status(),
            200,
            "opening stream {id} on the crashing server"
        );
        let stream = server.scripted.next_stream().await;
        stream.send("data: {\"type\":\"token\"}\n\n");
        read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
        responses.push(response);
        streams.push(stream);
    }

    for id in ids {
        let refreshed = async {
            loop {
                let started = backend.field(id, "started_at").await;
                let refreshed = backend.field(id, "last_refresh").await;
                if is_indexed(backend, id).await
                    && started.is_some()
                    && refreshed.is_some()
                    && started != refreshed
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(20), refreshed)
            .await
            .unwrap_or_else(|_| panic!("stream {id} was never refreshed on the crashing server"));
    }

    OpenStreams {
        server,
        responses,
        streams,
    }
}

/// Returns true when stream `id` has an entry in the active index.
pub async fn is_indexed(backend: &Backend, id: &str) -> bool {
    match backend {
        Backend::Redis { conn, prefix, .. } => {
            index_score(&mut conn.clone(), prefix, id).await.is_some()
        }
        Backend::Memory(store) => store.is_indexed(id),
    }
}

/// Waits until stream `id` has no entry in the active index of `backend`.
pub async fn wait_until_unindexed_on(backend: &Backend, id: &str) {
    eventually(
        &format!("stream {id} leaves the active index"),
        || async move { !is_indexed(backend, id).await },
    )
    .await;
}

/// Waits until stream `id` has state `expected` in the hash.
pub async fn wait_for_state(prefix: &str, id: &str, expected: &str) {
    let conn = redis().await;
    eventually(&format!("stream {id} reaches state {expected}"), || {
        let mut conn = conn.clone();
        let (prefix, id, expected) = (prefix.to_owned(), id.to_owned(), expected.to_owned());
        async move { state_of(&mut conn, &prefix, &id).await.as_deref() == Some(expected.as_str()) }
    })
    .await;
}

/// Waits until stream `id` has no entry in the active index.
pub async fn wait_until_unindexed(prefix: &str, id: &str) {
    let conn = redis().await;
    eventually(&format!("stream {id} leaves the active index"), || {
        let mut conn = conn.clone();
        let (prefix, id) = (prefix.to_owned(), id.to_owned());
        async move { index_score(&mut conn, &prefix, &id).await.is_none() }
    })
    .await;
}

/// The fields of one synthetic terminal event.
#[derive(Debug)]
pub struct SyntheticEvent {
    pub event_type: String,
    pub id: String,
    pub data: serde_json::Value,
}

/// Parses a body that is exactly one event with `event`, `id` and one JSON `data` line.
pub fn parse_synthetic(body: &str) -> SyntheticEvent {
    assert!(
        body.ends_with("\n\n"),
        "event does not end with a blank line: {body:?}"
    );
    let mut event_type = None;
    let mut id = None;
    let mut data = None;
    for line in body.trim_end_matches('\n').split('\n') {
        let (field, value) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("unexpected line {line:?} in {body:?}"));
        match field {
            "event" => event_type = Some(value.to_owned()),
            "id" => id = Some(value.to_owned()),
            "data" => {
                data = Some(
                    serde_json::from_str(value)
                        .unwrap_or_else(|e| panic!("data is not JSON ({e}): {body:?}")),
                )
            }
            other => panic!("unexpected field {other:?} in {body:?}"),
        }
    }
    SyntheticEvent {
        event_type: event_type.unwrap_or_else(|| panic!("no event field in {body:?}")),
        id: id.unwrap_or_else(|| panic!("no id field in {body:?}")),
        data: data.unwrap_or_else(|| panic!("no data field in {body:?}")),
    }
}
