//! Throughput of the layer's body wrapper, measured through the layer itself:
//! the layered tower service is called in-process (no socket) and its
//! response body read to the end. The inner service answers with a large
//! prepared event-stream body in frames of 1 B, 100 B or 16 KiB.
//!
//! The baseline, in the same run, is the same inner service wrapped by an
//! identity layer whose body only forwards frames. The layer claims each
//! stream in Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`, under a
//! key prefix of its own) and records its end; the bodies are large enough
//! (2 MiB in 1 B frames, 16 MiB in 100 B frames, 64 MiB in 16 KiB frames) that this once-per-request
//! cost is small beside the frames. `cargo bench --bench request` measures it
//! on its own.
//!
//! Run with `cargo bench --bench body`.

mod support;

use std::{
    hint::black_box,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use criterion::{BenchmarkId, Criterion, Throughput};
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
}
