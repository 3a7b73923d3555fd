//! Test harness: a real Redis or a memory store, a real axum server on a
//! loopback port, and an inner SSE service whose frames each test sends by
//! hand.

#![allow(dead_code)]

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Body,
    extract::{Query, State},
    http::{HeaderValue, Response, header},
    routing::get,
};
use bytes::Bytes;
use redis::aio::ConnectionManager;
use sse_resilience::{MemoryStore, SseResilienceLayer, StreamGuardian};
use tokio::sync::mpsc;

/// Returns the Redis URL of the tests: `REDIS_URL`, else the local server.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Connects to the test Redis.
pub async fn redis() -> ConnectionManager {
    let client = redis::Client::open(redis_url()).expect("invalid REDIS_URL");
    ConnectionManager::new(client)
        .await
        .expect("redis is not reachable: start redis-server or set REDIS_URL")
}

/// Returns a key prefix no other test uses.
pub fn unique_prefix(test: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("test:{test}:{}:", &random[..10])
}

/// Lists the keys under `prefix` on the server behind `conn` (one node of a cluster).
pub async fn keys_under<C: redis::aio::ConnectionLike>(conn: &mut C, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        keys.extend(batch);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys
}

/// The store a test runs on.
#[derive(Clone)]
pub enum Backend {
    /// The test Redis, under a key prefix of the test's own. The layers and
    /// guardians get a connection of their own, so the checks of a busy test
    /// do not queue behind their commands.
    Redis {
        conn: ConnectionManager,
        layer_conn: ConnectionManager,
        prefix: String,
    },
    /// A memory store of the test's own.
    Memory(MemoryStore),
}

/// Declares, for each named async function `case(backend: Backend)`, a module
/// `case` with two tests, `redis` and `memory`, that run it on each backend.
/// Prefix the list with `multi_thread:` for tests on a multi-threaded runtime.
#[allow(unused_macros)]
macro_rules! backend_tests {
    (multi_thread: $($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn redis() {
                super::$case(crate::common::Backend::redis(stringify!($case)).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn memory() {
                super::$case(crate::common::Backend::memory()).await;
            }
        }
    )+};
    ($($case:ident),+ $(,)?) => {$(
        mod $case {
            #[tokio::test]
            async fn redis() {
                super::$case(crate::common::Backend::redis(stringify!($case)).await).await;
            }

            #[tokio::test]
            async fn memory() {
                super::$case(crate::common::Backend::memory()).await;
            }
        }
    )+};
}
#[allow(unused_imports)]
pub(crate) use backend_tests;

impl Backend {
    /// Connects to the test Redis with a key prefix for `test`.
    pub async fn redis(test: &str) -> Self {
        Self::redis_with_prefix(&unique_prefix(test)).await
    }

    /// Connects to the test Redis with the key prefix `prefix`.
    pub async fn redis_with_prefix(prefix: &str) -> Self {
        Backend::Redis {
            conn: redis().await,
            layer_conn: redis().await,
            prefix: prefix.to_owned(),
        }
    }

    pub fn memory() -> Self {
        Backend::Memory(MemoryStore::new())
    }

    /// Returns a layer with default settings on this backend.
    pub fn layer(&self) -> SseResilienceLayer {
        match self {
            Backend::Redis {
                layer_conn, prefix, ..
            } => SseResilienceLayer::new(layer_conn.clone()).key_prefix(prefix),
            Backend::Memory(store) => SseResilienceLayer::with_memory_store(store.clone()),
        }
    }

    /// Returns a guardian with default settings on this backend.
    pub fn guardian(&self) -> StreamGuardian {
        match self {
            Backend::Redis { conn, prefix, .. } => {
                StreamGuardian::new(conn.clone()).key_prefix(prefix)
            }
            Backend::Memory(store) => StreamGuardian::with_memory_store(store.clone()),
        }
    }

    /// Returns the Redis connection and key prefix; panics on the memory backend.
    pub fn redis_parts(&self) -> (ConnectionManager, &str) {
        match self {
            Backend::Redis { conn, prefix, .. } => (conn.clone(), prefix),
            Backend::Memory(_) => panic!("this check needs the Redis backend"),
        }
    }

    /// Reads one field of a stream's hash (for Redis) or entry (for memory).
    pub async fn field(&self, id: &str, field: &str) -> Option<String> {
        match self {
            Backend::Redis { conn, prefix, .. } => {
                stream_field(&mut conn.clone(), prefix, id, field).await
            }
            Backend::Memory(store) => store
                .stream_field(id, field)
                .map(|value| String::from_utf8_lossy(&value).into_owned()),
        }
    }

    pub async fn state(&self, id: &str) -> Option<String> {
        self.field(id, "state").await
    }

    /// Waits until stream `id` has state `expected`.
    pub async fn wait_for_state(&self, id: &str, expected: &str) {
        let condition = format!("stream {id} has state {expected}");
        eventually(&condition, || async move {
            self.state(id).await.as_deref() == Some(expected)
        })
        .await;
    }

    /// Returns the ids of the streams stored, sorted.
    pub async fn stream_ids(&self) -> Vec<String> {
        match self {
            Backend::Redis { conn, prefix, .. } => keys_under(&mut conn.clone(), prefix)
                .await
                .into_iter()
                .filter_map(|key| {
                    let rest = key.strip_prefix(prefix.as_str())?;
                    let id = rest.strip_prefix('{')?.strip_suffix('}')?;
                    Some(id.to_owned())
                })
                .collect(),
            Backend::Memory(store) => store.stream_ids(),
        }
    }

    /// Returns the `(event id, terminal)` pairs of a stream's event log, oldest first.
    pub async fn logged_events(&self, id: &str) -> Vec<(String, bool)> {
        match self {
            Backend::Redis { conn, prefix, .. } => {
                let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
                    .arg(format!("{prefix}{{{id}}}:log"))
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn.clone())
                    .await
                    .expect("XRANGE of the event log failed");
                entries
                    .into_iter()
                    .map(|(_, fields)| {
                        let event_id = fields.get("i").map_or(&[][..], |v| v);
                        (
                            String::from_utf8_lossy(event_id).into_owned(),
                            fields.get("t").is_some_and(|v| v == b"1"),
                        )
                    })
                    .collect()
            }
            Backend::Memory(store) => store
                .event_log(id)
                .into_iter()
                .map(|event| (event.event_id.unwrap_or_default(), event.terminal))
                .collect(),
        }
    }
}

/// Reads one field of a stream's hash.
pub async fn stream_field(
    conn: &mut ConnectionManager,
    prefix: &str,
    id: &str,
    field: &str,
) -> Option<String> {
    redis::cmd("HGET")
        .arg(format!("{prefix}{{{id}}}"))
        .arg(field)
        .query_async(conn)
        .await
        .unwrap()
}

/// Waits until `check` returns true, polling every 20 ms, for at most 20 s.
///
/// The bound only keeps a broken test from hanging; no test asserts on time.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..1000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition never became true: {what}");
}

/// One response body of the scripted inner service, driven by the test.
pub struct ScriptedStream {
    pub stream_id: Option<String>,
    pub tx: mpsc::UnboundedSender<Result<Bytes, std::io::Error>>,
}

impl ScriptedStream {
    /// Sends one frame to the client.
    pub fn send(&self, frame: impl Into<Bytes>) {
        self.tx
            .send(Ok(frame.into()))
            .expect("the inner body was dropped");
    }

    /// Makes the inner body fail.
    pub fn fail(&self) {
        let _ = self
            .tx
            .send(Err(std::io::Error::other("inner body failed on purpose")));
    }

    /// Returns true once the layer dropped the inner body.
    pub fn is_dropped(&self) -> bool {
        self.tx.is_closed()
    }
}

#[derive(Clone, Default)]
pub struct Scripted {
    calls: Arc<AtomicUsize>,
    streams: Arc<Mutex<Vec<ScriptedStream>>>,
    new_stream: Arc<tokio::sync::Notify>,
    content_types: Arc<Mutex<HashMap<String, String>>>,
}

impl Scripted {
    /// Number of times the inner service was called.
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Waits for the next stream the inner service opened.
    pub async fn next_stream(&self) -> ScriptedStream {
        loop {
            let notified = self.new_stream.notified();
            if let Some(stream) = {
                let mut streams = self.streams.lock().unwrap();
                (!streams.is_empty()).then(|| streams.remove(0))
            } {
                return stream;
            }
            tokio::time::timeout(Duration::from_secs(20), notified)
                .await
                .expect("the inner service was never called");
        }
    }
}

async fn scripted_handler(
    State(scripted): State<Scripted>,
    Query(query): Query<HashMap<String, String>>,
) -> Response<Body> {
    scripted.calls.fetch_add(1, Ordering::SeqCst);
    let (tx, rx) = mpsc::unbounded_channel();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    scripted.streams.lock().unwrap().push(ScriptedStream {
        stream_id: query.get("stream_id").cloned(),
        tx,
    });
    scripted.new_stream.notify_one();

    let content_type = query
        .get("content_type")
        .cloned()
        .unwrap_or_else(|| "text/event-stream".to_owned());
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&content_type).unwrap(),
    );
    response
}

async fn json_handler(State(scripted): State<Scripted>) -> Response<Body> {
    scripted.calls.fetch_add(1, Ordering::SeqCst);
    let mut response = Response::new(Body::from("{\"ok\":true,\"bytes\":\"\\u0000\\r\\n\"}"));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
        .headers_mut()
        .insert("x-inner", HeaderValue::from_static("kept"));
    response
}

async fn fixed_sse_handler(State(scripted): State<Scripted>) -> Result<Response<Body>, Infallible> {
    scripted.calls.fetch_add(1, Ordering::SeqCst);
    let mut response = Response::new(Body::from(
        "id: 1\ndata: {\"type\":\"token\"}\n\nid: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n",
    ));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    Ok(response)
}

/// A running test server.
pub struct TestServer {
    pub addr: SocketAddr,
    pub scripted: Scripted,
    pub client: reqwest::Client,
    shutdown: tokio_util::sync::CancellationToken,
}

impl TestServer {
    /// Starts a server with routes behind `layer`:
    /// - `/sse`: the scripted inner service (query `content_type` overrides the type),
    /// - `/fixed`: a finished event stream with a `completed` event of id 2,
    /// - `/json`: a JSON response.
    pub async fn start(layer: SseResilienceLayer) -> Self {
        Self::start_with(layer, Router::new()).await
    }

    /// Starts a server with the routes of [`TestServer::start`] behind
    /// `layer`, and the routes of `outside` beside them, not behind it.
    pub async fn start_with(layer: SseResilienceLayer, outside: Router) -> Self {
        let scripted = Scripted::default();
        let app = Router::new()
            .route("/sse", get(scripted_handler))
            .route("/fixed", get(fixed_sse_handler))
            .route("/json", get(json_handler))
            .layer(layer)
            .with_state(scripted.clone())
            .merge(outside);
        Self::serve(app, scripted).await
    }

    /// Starts a server for any router.
    pub async fn serve(app: Router, scripted: Scripted) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = tokio_util::sync::CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
                .unwrap();
        });
        Self {
            addr,
            scripted,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            shutdown,
        }
    }

    /// Returns the URL of `path_and_query` on this server.
    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// Sends a GET request.
    pub async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(self.url(path_and_query))
            .send()
            .await
            .unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Reads a streaming response until `done` returns true for the bytes so far,
/// complete, or the body ends. Bounded by 20 s so a broken test fails.
pub async fn read_until(
    response: &mut reqwest::Response,
    mut done: impl FnMut(&[u8]) -> bool,
) -> Vec<u8> {
    let mut bytes = Vec::new();
    let read = async {
        while !done(&bytes) {
            match response.chunk().await.unwrap() {
                Some(chunk) => bytes.extend_from_slice(&chunk),
                None => break,
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read)
        .await
        .expect("the response did not reach the expected bytes in 20 s");
    bytes
}

/// Returns true when `haystack` contains `needle`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Removes every heartbeat frame `:heartbeat\n\n` from `output`.
pub fn strip_heartbeats(output: &[u8]) -> Vec<u8> {
    let text = output.to_vec();
    let heartbeat = b":heartbeat\n\n";
    let mut result = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i..].starts_with(heartbeat) {
            i += heartbeat.len();
        } else {
            result.push(text[i]);
            i += 1;
        }
    }
    result
}
