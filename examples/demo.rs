//! The demo app: an axum server whose generation endpoint is made resilient
//! by `SseResilienceLayer`, with the guardian running in the same process.
//!
//! ```sh
//! cargo run --example demo
//! curl -N 'http://127.0.0.1:3000/api/stream/demo-1?tokens=5'
//! ```
//!
//! Environment: `ADDR` (default `127.0.0.1:3000`), `REDIS_URL` (default
//! `redis://127.0.0.1:6379`), `HEARTBEAT_SECS` (15), `STALE_SECS` (30),
//! `GUARDIAN_SECS` (30), `SHUTDOWN_GRACE_SECS` (10), `RUST_LOG` (`info`), and
//! `REDIS_CLUSTER_NODES` (comma-separated `host:port` of cluster nodes; when
//! set, the demo uses the cluster instead of `REDIS_URL`).

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
    response::{
        Html,
        sse::{Event, Sse},
    },
    routing::get,
};
use futures_util::stream::{self, Stream};
use serde_json::json;
use sse_resilience::{
    EventLog, OwnerSource, SseResilienceLayer, StreamGuardian, StreamId, StreamIdSource,
    StreamOwner,
};
use tokio_util::sync::CancellationToken;

const WORDS: &[&str] = &[
    "Streams", "that", "survive", "dropped", "clients,", "crashed", "servers", "and", "slow",
    "networks", "deliver", "every", "result", "exactly", "once.",
];

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

    let addr: SocketAddr = env_or("ADDR", "127.0.0.1:3000").parse()?;
    let redis_url = env_or("REDIS_URL", "redis://127.0.0.1:6379");
    let heartbeat = Duration::from_secs(env_secs("HEARTBEAT_SECS", 15)?);
    let stale = Duration::from_secs(env_secs("STALE_SECS", 30)?);
    let sweep = Duration::from_secs(env_secs("GUARDIAN_SECS", 30)?);
    let grace = Duration::from_secs(env_secs("SHUTDOWN_GRACE_SECS", 10)?);

    // The layer and the guardian take a single Redis or a cluster alike.
    let (layer, guardian) = match env::var("REDIS_CLUSTER_NODES") {
        Ok(nodes) => {
            let urls: Vec<String> = nodes
                .split(',')
                .map(|node| format!("redis://{}", node.trim()))
                .collect();
            let cluster = redis::cluster::ClusterClient::new(urls)
                .map_err(|e| format!("invalid REDIS_CLUSTER_NODES {nodes:?}: {e}"))?
                .get_async_connection()
                .await
                .map_err(|e| {
                    format!("cannot connect to the redis cluster at {nodes}: {e}; check REDIS_CLUSTER_NODES")
                })?;
            tracing::info!(%nodes, "connected to redis cluster");
            (
                SseResilienceLayer::new(cluster.clone()),
                StreamGuardian::new(cluster),
            )
        }
        Err(_) => {
            let client = redis::Client::open(redis_url.as_str())
                .map_err(|e| format!("invalid REDIS_URL {redis_url:?}: {e}"))?;
            let redis = redis::aio::ConnectionManager::new(client)
                .await
                .map_err(|e| {
                    format!(
                        "cannot connect to redis at {redis_url}: {e}; start redis-server or set REDIS_URL"
                    )
                })?;
            tracing::info!(%redis_url, "connected to redis");
            (
                SseResilienceLayer::new(redis.clone()),
                StreamGuardian::new(redis),
            )
        }
    };

    let layer = layer
        .stream_id_source(StreamIdSource::path_segment("/api/stream/"))
        .stream_type("generation")
        .heartbeat_interval(heartbeat)
        .stale_threshold(stale)
        .event_log(EventLog::new())
        .owner_source(OwnerSource::Extension);
    let streams = layer.shutdown_handle();

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
        // Added after the layer, so it runs before it, as an app's auth would.
        .layer(axum::middleware::from_fn(demo_owner))
        .with_state(AppState::default());

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

/// Sets the stream owner from the `x-user-id` header.
///
/// For demonstration only: any client can send any `x-user-id`. A real app
/// sets `StreamOwner` from a verified session or token.
async fn demo_owner(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let user = request
        .headers()
        .get("x-user-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
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
