//! Throughput of the layer's body wrapper, measured through the layer itself:
//! the layered tower service is called in-process (no socket) and its
//! response body read to the end. The inner service responds with a large
//! prepared event-stream body in frames of 1 B, 100 B or 16 KiB.
//!
//! The baseline, in the same run, is the same inner service wrapped by an
//! identity layer whose body only forwards frames. The layer claims each
//! stream in Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`, under a
//! key prefix of its own) and records its end. The bodies are large enough
//! (2 MiB in 1 B frames, 16 MiB in 100 B frames, 64 MiB in 16 KiB frames)
//! that this once-per-request cost is small beside the frames, and
//! `cargo bench --bench request` measures it on its own.
//!
//! A second group makes the same comparison over a loopback socket.
//!
//! Run with `cargo bench --bench body`.

mod support;

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use http::Request;
use sse_resilience::SseResilienceLayer;
use support::{
    FRAME_SIZES, IdentityLayer, Ratio, Workload, delete_prefix, event_stream_service, print_ratios,
    read_body, redis_url, unique_prefix,
};
use tower::{Layer, Service, ServiceExt};

fn frame_label(size: usize) -> String {
    if size >= 1024 {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

/// Bytes of the body for frames of `frame_size`: enough that one request
/// takes tens of milliseconds, so the claim and the record of the end (a few
/// hundred microseconds) weigh under 1 %.
fn body_bytes(frame_size: usize) -> usize {
    match frame_size {
        1 => 2 * 1024 * 1024,
        100 => 16 * 1024 * 1024,
        _ => 64 * 1024 * 1024,
    }
}

fn bench_body(c: &mut Criterion, runtime: &tokio::runtime::Runtime, prefix: &str) {
    let redis = runtime.block_on(async {
        let client = redis::Client::open(redis_url()).expect("invalid REDIS_URL");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("redis is not reachable: start redis-server or set REDIS_URL")
    });
    let layer = SseResilienceLayer::new(redis)
        .key_prefix(prefix)
        .completion_ttl(Duration::from_secs(60));
    let next_id = AtomicU64::new(0);

    for workload in Workload::ALL {
        let mut group = c.benchmark_group(format!("body_{}", workload.name()));
        // Iterations take up to a few hundred milliseconds: the same number
        // of them per sample keeps the run short.
        group.sampling_mode(SamplingMode::Flat);
        for frame_size in FRAME_SIZES {
            let body = workload.body(body_bytes(frame_size));
            let label = frame_label(frame_size);
            group.throughput(Throughput::Bytes(body.len() as u64));

            let inner = event_stream_service(body.clone(), frame_size);
            let identity = IdentityLayer.layer(inner.clone());
            group.bench_function(BenchmarkId::new("identity", &label), |b| {
                b.to_async(runtime).iter(|| {
                    let service = identity.clone();
                    async move {
                        let response = service.oneshot(Request::new(())).await.unwrap();
                        black_box(read_body(response.into_body()).await)
                    }
                })
            });

            let layered = layer.layer(inner);
            group.bench_function(BenchmarkId::new("layer", &label), |b| {
                b.to_async(runtime).iter(|| {
                    let mut service = layered.clone();
                    let id = next_id.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let request = Request::get(format!("/events?stream_id=b{id}"))
                            .body(())
                            .unwrap();
                        let response = service.ready().await.unwrap().call(request).await.unwrap();
                        assert_eq!(response.status(), 200);
                        black_box(read_body(response.into_body()).await)
                    }
                })
            });
        }
        group.finish();
    }
}

/// Bytes of the body sent over a socket for frames of `frame_size`.
fn socket_body_bytes(frame_size: usize) -> usize {
    match frame_size {
        1 => 512 * 1024,
        100 => 8 * 1024 * 1024,
        _ => 32 * 1024 * 1024,
    }
}

/// Serves `router` with axum on a loopback port of the current runtime and
/// returns the port.
async fn serve_loopback(router: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("failed to bind a loopback port");
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, router).await });
    port
}

/// Requests `path` on a new HTTP/1.1 connection to `port` and reads the
/// response body to its end; returns its length.
async fn fetch(port: u16, path: String) -> usize {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("failed to connect to the loopback server");
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .expect("HTTP/1.1 handshake failed");
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "127.0.0.1")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.expect("request failed");
    assert_eq!(response.status(), 200);
    read_body(response.into_body()).await
}

/// Makes the same comparison over a real loopback connection. axum serves
/// the router with the layer and with the identity layer, and a hyper client
/// on the same thread reads the body. So both sides pay for the socket
/// writes and reads, chunked encoding and the client.
fn bench_body_over_socket(c: &mut Criterion, runtime: &tokio::runtime::Runtime, prefix: &str) {
    let redis = runtime.block_on(async {
        let client = redis::Client::open(redis_url()).expect("invalid REDIS_URL");
        redis::aio::ConnectionManager::new(client)
            .await
            .expect("redis is not reachable: start redis-server or set REDIS_URL")
    });
    let layer = SseResilienceLayer::new(redis)
        .key_prefix(prefix)
        .completion_ttl(Duration::from_secs(60));
    let next_id = AtomicU64::new(0);

    let workload = Workload::Tokens;
    let mut group = c.benchmark_group("body_socket_tokens");
    group.sampling_mode(SamplingMode::Flat);
    for frame_size in FRAME_SIZES {
        let body = workload.body(socket_body_bytes(frame_size));
        let label = frame_label(frame_size);
        group.throughput(Throughput::Bytes(body.len() as u64));

        let router = || {
            let inner = event_stream_service(body.clone(), frame_size);
            axum::Router::new().route_service(
                "/events",
                tower::ServiceBuilder::new()
                    .map_request(|request: Request<axum::body::Body>| request.map(|_| ()))
                    .service(inner),
            )
        };
        let identity_port = runtime.block_on(serve_loopback(router().layer(IdentityLayer)));
        let layer_port = runtime.block_on(serve_loopback(router().layer(layer.clone())));

        group.bench_function(BenchmarkId::new("identity", &label), |b| {
            b.to_async(runtime)
                .iter(|| async { black_box(fetch(identity_port, "/events".to_owned()).await) })
        });
        group.bench_function(BenchmarkId::new("layer", &label), |b| {
            b.to_async(runtime).iter(|| {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                async move {
                    black_box(fetch(layer_port, format!("/events?stream_id=s{id}")).await)
                }
            })
        });
    }
    group.finish();
}

fn main() {
    let started = SystemTime::now();
    // One thread: the layer's background tasks (index flushes, stream ends)
    // run on it too, so their cost is counted in the layer's time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to build the runtime");
    let prefix = unique_prefix("body");

    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    bench_body(&mut criterion, &runtime, &prefix);
    bench_body_over_socket(&mut criterion, &runtime, &prefix);
    criterion.final_summary();

    runtime.block_on(async {
        // Lets the last stream ends reach Redis, then removes every key of the run.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let client = redis::Client::open(redis_url()).expect("invalid REDIS_URL");
        let mut conn = redis::aio::ConnectionManager::new(client)
            .await
            .expect("redis is not reachable");
        delete_prefix(&mut conn, &prefix).await;
    });

    let mut ratios = Vec::new();
    for workload in Workload::ALL {
        for frame_size in FRAME_SIZES {
            let group = format!("body_{}", workload.name());
            let label = frame_label(frame_size);
            ratios.push(Ratio {
                label: format!("{} {label}", workload.name()),
                measured: format!("{group}/layer/{label}"),
                baseline: format!("{group}/identity/{label}"),
            });
        }
    }
    print_ratios(
        "Body wrapper throughput against the identity wrapper (identity time / layer time)",
        started,
        &ratios,
    );
    let socket_ratios: Vec<Ratio> = FRAME_SIZES
        .into_iter()
        .map(|frame_size| {
            let label = frame_label(frame_size);
            Ratio {
                label: format!("tokens {label}"),
                measured: format!("body_socket_tokens/layer/{label}"),
                baseline: format!("body_socket_tokens/identity/{label}"),
            }
        })
        .collect();
    print_ratios(
        "Over a loopback socket, layer against identity (identity time / layer time)",
        started,
        &socket_ratios,
    );
}
