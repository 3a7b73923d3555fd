//! The demo app: an axum server whose generation endpoint is made resilient
//! by `SseResilienceLayer`, with the guardian running in the same process.
//!
//! ```sh
//! cargo run --example demo
//! curl -N 'http://127.0.0.1:3000/api/stream/demo-1?tokens=5'
//! ```
//!
//! Routes: the page at `/`, `/healthz`, the streams at `/api/stream/{id}`, their
//! recovery status at `/api/status/{id}`, the metrics at `/metrics` and the
//! browser client at `/sse-resilience.js`.
//!
//! Environment: `ADDR` (default `127.0.0.1:3000`), `REDIS_URL`,
//! `HEARTBEAT_SECS` (15), `STALE_SECS` (30), `GUARDIAN_SECS` (30),
//! `SHUTDOWN_GRACE_SECS` (10), `RUST_LOG` (`info`), and `REDIS_CLUSTER_NODES`
//! (comma-separated `host:port` of cluster nodes; when set, the demo uses the
//! cluster instead of `REDIS_URL`).
//!
//! Without `REDIS_URL` the demo tries the Redis at `REDIS_PROBE_URL` (default
//! `redis://127.0.0.1:6379`) for 500 ms, and runs on an in-memory store when
//! none answers; its first log line says which store it uses.
//!
//! `GET /metrics` returns the crate's metrics in the Prometheus text format,
//! and `GET /api/status/{id}` the recovery status of a stream as JSON.

use std::{
    convert::Infallible,
    env,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Extension, Json, Router,
    extract::{Query, State},
    http::header,
    response::{
        Html, IntoResponse,
        sse::{Event, Sse},
    },
    routing::get,
};
use futures_util::stream::{self, Stream};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use sse_resilience::{
    EventLog, MemoryStore, OwnerSource, ReconnectingCluster, SseResilienceLayer, StreamGuardian,
    StreamId, StreamIdSource, StreamOwner,
};
use tokio_util::sync::CancellationToken;

#[path = "support/redis.rs"]
mod redis_support;

use redis_support::redact_url;

const WORDS: &[&str] = &[
    "Streams", "that", "survive", "dropped", "clients,", "crashed", "servers", "and", "slow",
    "networks", "deliver", "every", "result", "exactly", "once.",
];

/// How long the demo waits for a reply of the probed Redis when `REDIS_URL` is unset.
const REDIS_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

#[derive(Clone, Default)]
struct AppState {
    generations: Arc<AtomicU64>,
}

#[derive(serde::Deserialize)]
struct GenerationParams {
    tokens: Option<u32>,
    delay_ms: Option<u64>,
    fail: Option<u8>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,sse_resilience=debug".into()),
        )
        .init();

    let addr = env_addr("ADDR", "127.0.0.1:3000")?;
    let heartbeat = Duration::from_secs(env_secs("HEARTBEAT_SECS", 15)?);
    let stale = Duration::from_secs(env_secs("STALE_SECS", 30)?);
    let sweep = Duration::from_secs(env_secs("GUARDIAN_SECS", 30)?);
    let grace = Duration::from_secs(env_secs("SHUTDOWN_GRACE_SECS", 10)?);

    // The recorder goes in first, so the layer's and the guardian's metrics reach it.
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder failed: {e}"))?;
    let (layer, guardian) = connect_store().await?;

    let layer = layer
        .stream_id_source(StreamIdSource::path_segment("/api/stream/"))
        .stream_type("generation")
        .heartbeat_interval(heartbeat)
        .stale_threshold(stale)
        .event_log(EventLog::new())
        .owner_source(OwnerSource::Extension);
    let streams = layer.shutdown_handle();
    let status = layer
        .status_service()
        .stream_id_source(StreamIdSource::path_segment("/api/status/"));

    let shutdown = CancellationToken::new();
    let guardian = tokio::spawn(
        guardian
            .sweep_interval(sweep)
            .stale_threshold(stale)
            .run_with_token(shutdown.clone()),
    );

    let app = Router::new()
        .route("/", get(page))
        .route("/healthz", get(healthz))
        .route("/api/stream/{id}", get(generate))
        .route("/api/stream/", get(generate))
        .layer(layer)
        .with_state(AppState::default())
        // Added after the layer: these routes are not streams.
        .route_service("/api/status/{id}", status)
        .route(
            "/metrics",
            get(move || std::future::ready(prometheus_text(&metrics))),
        )
        .route("/sse-resilience.js", get(client_js))
        // Added last, so it runs first, as an app's authentication would.
        .layer(axum::middleware::from_fn(demo_owner));

    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}; set ADDR to a free address"))?;
    tracing::info!(
        "demo listening on http://{addr} (heartbeat {}s, stale {}s, guardian every {}s)",
        heartbeat.as_secs(),
        stale.as_secs(),
        sweep.as_secs()
    );

    // On Ctrl-C or SIGTERM the layer rejects new streams and sends live clients a
    // retry hint, so they resume on another instance from the event log.
    // Unfinished generations get the grace period, then the server stops.
    let (report_tx, report_rx) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            wait_for_signal().await;
            tokio::spawn(async {
                wait_for_signal().await;
                tracing::warn!("second signal: exiting without waiting for the grace period");
                std::process::exit(130);
            });
            let report = streams.shutdown(grace).await;
            let _ = report_tx.send(report);
            stop.cancel();
        })
        .await?;
    guardian.await?;
    if let Ok(report) = report_rx.await {
        tracing::info!(?report, "demo stopped");
    }
    Ok(())
}

/// Connects the store the demo runs on: the cluster of `REDIS_CLUSTER_NODES`,
/// the Redis of `REDIS_URL`, the Redis of `REDIS_PROBE_URL` when it replies,
/// or else a memory store. Logs the choice before anything else.
async fn connect_store() -> Result<(SseResilienceLayer, StreamGuardian), String> {
    if let Ok(nodes) = env::var("REDIS_CLUSTER_NODES") {
        let urls: Vec<String> = nodes
            .split(',')
            .map(|node| format!("redis://{}", node.trim()))
            .collect();
        let shown: Vec<String> = urls.iter().map(|url| redact_url(url)).collect();
        let nodes = shown.join(",");
        let client = redis::cluster::ClusterClient::new(urls)
            .map_err(|e| format!("invalid REDIS_CLUSTER_NODES {nodes:?}: {e}"))?;
        let cluster = ReconnectingCluster::connect(client).await.map_err(|e| {
            format!(
                "cannot connect to the redis cluster at {nodes}: {e}; check REDIS_CLUSTER_NODES"
            )
        })?;
        tracing::info!(%nodes, "connected to redis cluster");
        return Ok((
            SseResilienceLayer::new(cluster.clone()),
            StreamGuardian::new(cluster),
        ));
    }

    if let Ok(redis_url) = env::var("REDIS_URL") {
        let redis = redis_support::connect(&redis_url, "REDIS_URL", redis_support::CONNECT_TIMEOUT)
            .await
            .map_err(|e| format!("{e}, or unset REDIS_URL to use the in-memory store"))?;
        tracing::info!(redis_url = %redact_url(&redis_url), "connected to redis");
        return Ok((
            SseResilienceLayer::new(redis.clone()),
            StreamGuardian::new(redis),
        ));
    }

    let probe_url = env_or("REDIS_PROBE_URL", "redis://127.0.0.1:6379");
    match redis_support::connect(&probe_url, "REDIS_PROBE_URL", REDIS_PROBE_TIMEOUT).await {
        Ok(redis) => {
            tracing::info!(redis_url = %redact_url(&probe_url), "connected to redis");
            Ok((
                SseResilienceLayer::new(redis.clone()),
                StreamGuardian::new(redis),
            ))
        }
        Err(reason) => {
            tracing::warn!(
                redis_url = %redact_url(&probe_url),
                %reason,
                "REDIS_URL is unset and no redis answered: using the in-memory store, so streams live in this process only and are lost when it stops"
            );
            let store = MemoryStore::new();
            Ok((
                SseResilienceLayer::with_memory_store(store.clone()),
                StreamGuardian::with_memory_store(store),
            ))
        }
    }
}

/// Renders the metrics in the Prometheus text format.
fn prometheus_text(
    metrics: &PrometheusHandle,
) -> ([(header::HeaderName, &'static str); 1], String) {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// Sets the stream owner from the `x-user-id` header.
///
/// For demonstration only: any client can send any `x-user-id`. A real app
/// sets `StreamOwner` from a verified session or token.
async fn demo_owner(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let user = match request
        .headers()
        .get("x-user-id")
        .map(|value| value.to_str())
    {
        None => None,
        Some(Ok(user)) => Some(user.to_owned()),
        // Unreadable is rejected, never taken as "no owner": that would start
        // a stream anyone can read.
        Some(Err(_)) => {
            return (
                axum::http::StatusCode::BAD_REQUEST,
                "invalid x-user-id: use visible ASCII",
            )
                .into_response();
        }
    };
    if let Some(user) = user {
        request.extensions_mut().insert(StreamOwner(user));
    }
    next.run(request).await
}

async fn page() -> Html<&'static str> {
    Html(include_str!("demo/index.html"))
}

async fn healthz(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "generations": state.generations.load(Ordering::Relaxed),
    }))
}

/// Streams `tokens` token events `delay_ms` apart, then `completed` with the
/// whole text, or `failed` when `fail=1`. Every event has an id and JSON data.
/// `tokens` is capped at 10,000 and `delay_ms` at 60,000.
async fn generate(
    State(state): State<AppState>,
    stream_id: Option<Extension<StreamId>>,
    Query(params): Query<GenerationParams>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // The layer sets the extension on stream requests; HEAD requests pass without it.
    let id = stream_id.map_or_else(String::new, |Extension(id)| id.as_str().to_owned());
    let tokens = params.tokens.unwrap_or(20).min(10_000);
    let delay = Duration::from_millis(params.delay_ms.unwrap_or(200).min(60_000));
    let fail = params.fail == Some(1);
    let generation = state.generations.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::info!(stream_id = %id, tokens, generation, "generation started");

    let events = stream::unfold((0u32, String::new()), move |(index, mut text)| async move {
        if index > tokens {
            return None;
        }
        tokio::time::sleep(delay).await;
        let event = if index < tokens {
            let word = WORDS[index as usize % WORDS.len()];
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(word);
            Event::default()
                .event("token")
                .id(index.to_string())
                .data(json!({ "type": "token", "index": index, "text": word }).to_string())
        } else if fail {
            Event::default().event("failed").id(index.to_string()).data(
                json!({ "type": "failed", "error": "generation failed on request (fail=1)" })
                    .to_string(),
            )
        } else {
            Event::default()
                .event("completed")
                .id(index.to_string())
                .data(json!({ "type": "completed", "text": text }).to_string())
        };
        Some((Ok(event), (index + 1, text)))
    });
    Sse::new(events)
}

fn env_or(name: &str, default: &str) -> String {
    env::var(name).unwrap_or_else(|_| default.to_owned())
}

fn env_addr(name: &str, default: &str) -> Result<SocketAddr, String> {
    let value = env_or(name, default);
    value.parse().map_err(|e| {
        format!("invalid {name} {value:?}: {e}; expected an IP address and port such as {default}")
    })
}

fn env_secs(name: &str, default: u64) -> Result<u64, String> {
    let Ok(value) = env::var(name) else {
        return Ok(default);
    };
    match value.parse::<u64>() {
        Ok(secs) if secs > 0 => Ok(secs),
        _ => Err(format!(
            "invalid {name} {value:?}: expected a whole number of seconds greater than zero"
        )),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler failed");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

async fn client_js() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            sse_resilience::client::JS_CONTENT_TYPE,
        )],
        sse_resilience::client::JS,
    )
}
