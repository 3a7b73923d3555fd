//! Per-request cost of the layer, against real Redis (`REDIS_URL`, default
//! `redis://127.0.0.1:6379`, under a key prefix of its own), beside the same
//! app without the layer, in the same run.
//!
//! - claim path: a new stream id. The layer claims it (one script call) and
//!   calls the inner service. When the small body ends, a background task
//!   records the end, and the registry batches the index updates.
//! - replay path: the id of a finished stream. The layer responds from Redis
//!   without calling the inner service.
//! - the app without the layer: the inner service responds to the same request.
//! - one Redis round trip (`PING` on the same kind of connection), the unit
//!   the layer's cost is counted in.
//!
//! The tower service is called in-process (no socket) on one thread, so the
//! layer's background work runs on the measured thread too.
//!
//! Run with `cargo bench --bench request`.

mod support;

use std::{
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use criterion::Criterion;
use http::{Request, Response, header};
use redis::aio::ConnectionManager;
use sse_resilience::SseResilienceLayer;
use support::{
    FramedBody, Ratio, delete_prefix, print_ratios, read_body, redis_url, unique_prefix,
};
use tower::{Layer, Service, ServiceExt};

/// The body of one short stream: a token and the terminal event.
const SMALL_BODY: &str = "id: 1\ndata: {\"type\":\"token\",\"text\":\"Hi\"}\n\n\
id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"Hi\"}\n\n";

/// Builds an inner service that streams `SMALL_BODY` and counts its calls.
fn small_stream_service(
    calls: Arc<AtomicUsize>,
) -> impl Service<
    Request<()>,
    Response = Response<FramedBody>,
    Error = std::convert::Infallible,
    Future = std::future::Ready<Result<Response<FramedBody>, std::convert::Infallible>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: Request<()>| {
        calls.fetch_add(1, Ordering::Relaxed);
        let mut response = Response::new(FramedBody::new(
            Bytes::from_static(SMALL_BODY.as_bytes()),
            SMALL_BODY.len(),
        ));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        std::future::ready(Ok(response))
    })
}

async fn connect() -> ConnectionManager {
    let client = redis::Client::open(redis_url()).expect("invalid REDIS_URL");
    ConnectionManager::new(client)
        .await
        .expect("redis is not reachable: start redis-server or set REDIS_URL")
}

fn bench_requests(c: &mut Criterion, runtime: &tokio::runtime::Runtime, prefix: &str) {
    let redis = runtime.block_on(connect());
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = small_stream_service(calls.clone());
    let layer = SseResilienceLayer::new(redis.clone())
        .key_prefix(prefix)
        .completion_ttl(Duration::from_secs(120));
    let layered = layer.layer(inner.clone());
    let next_id = AtomicU64::new(0);

    // A finished stream for the replay path: run it once, then wait until a
    // second request is served from Redis without calling the inner service.
    runtime.block_on(async {
        let request = || Request::get("/events?stream_id=finished").body(()).unwrap();
        let response = layered.clone().oneshot(request()).await.unwrap();
        read_body(response.into_body()).await;
        for _ in 0..1000 {
            let before = calls.load(Ordering::Relaxed);
            let response = layered.clone().oneshot(request()).await.unwrap();
            read_body(response.into_body()).await;
            if calls.load(Ordering::Relaxed) == before {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the finished stream was never replayed from redis");
    });

    let mut group = c.benchmark_group("request");
    group.bench_function("no_layer", |b| {
        b.to_async(runtime).iter(|| {
            let service = inner.clone();
            async move {
                let response = service
                    .oneshot(Request::get("/events?stream_id=x").body(()).unwrap())
                    .await
                    .unwrap();
                black_box(read_body(response.into_body()).await)
            }
        })
    });
    group.bench_function("claim", |b| {
        b.to_async(runtime).iter(|| {
            let service = layered.clone();
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            async move {
                let request = Request::get(format!("/events?stream_id=c{id}"))
                    .body(())
                    .unwrap();
                let response = service.oneshot(request).await.unwrap();
                black_box(read_body(response.into_body()).await)
            }
        })
    });
    group.bench_function("replay", |b| {
        b.to_async(runtime).iter(|| {
            let service = layered.clone();
            async move {
                let request = Request::get("/events?stream_id=finished").body(()).unwrap();
                let response = service.oneshot(request).await.unwrap();
                black_box(read_body(response.into_body()).await)
            }
        })
    });
    group.bench_function("redis_ping", |b| {
        b.to_async(runtime).iter(|| {
            let mut conn = redis.clone();
            async move {
                let pong: String = redis::cmd("PING").query_async(&mut conn).await.unwrap();
                black_box(pong)
            }
        })
    });
    group.finish();
}

fn main() {
    let started = SystemTime::now();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to build the runtime");
    let prefix = unique_prefix("request");

    let mut criterion = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .configure_from_args();
    bench_requests(&mut criterion, &runtime, &prefix);
    criterion.final_summary();

    runtime.block_on(async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        delete_prefix(&mut connect().await, &prefix).await;
    });

    print_ratios(
        "Request time against the app without the layer (no_layer / measured)",
        started,
        &[
            Ratio {
                label: "claim path".into(),
                measured: "request/claim".into(),
                baseline: "request/no_layer".into(),
            },
            Ratio {
                label: "replay path".into(),
                measured: "request/replay".into(),
                baseline: "request/no_layer".into(),
            },
        ],
    );
    print_ratios(
        "Request time in Redis round trips (redis_ping / measured; 0.5 means two round trips)",
        started,
        &[
            Ratio {
                label: "claim path".into(),
                measured: "request/claim".into(),
                baseline: "request/redis_ping".into(),
            },
            Ratio {
                label: "replay path".into(),
                measured: "request/replay".into(),
                baseline: "request/redis_ping".into(),
            },
        ],
    );
}
