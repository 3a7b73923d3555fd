//! The metrics of the layer and the guardian, read by a recorder installed in
//! this test process, while real clients use a real server on Redis and on
//! the memory store.

mod common;
mod support;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use sse_resilience::{SseResilienceLayer, metrics as names};
use support::{RedisProcess, abandon_streams_on};

/// A recorder that keeps every counter and gauge by name and labels.
#[derive(Clone, Default)]
struct TestRecorder {
    values: Arc<Mutex<HashMap<String, Arc<AtomicU64>>>>,
    described: Arc<Mutex<HashSet<String>>>,
}

impl TestRecorder {
    /// Returns the handle of `key`, rendered as `name` or `name{label=value,...}`.
    fn handle(&self, key: &Key) -> Arc<AtomicU64> {
        let mut labels: Vec<String> = key
            .labels()
            .map(|label| format!("{}={}", label.key(), label.value()))
            .collect();
        labels.sort();
        let name = if labels.is_empty() {
            key.name().to_owned()
        } else {
            format!("{}{{{}}}", key.name(), labels.join(","))
        };
        self.values
            .lock()
            .unwrap()
            .entry(name)
            .or_insert_with(|| Arc::new(AtomicU64::new(0)))
            .clone()
    }

    fn counter(&self, name: &str) -> u64 {
        self.values
            .lock()
            .unwrap()
            .get(name)
            .map_or(0, |value| value.load(Ordering::SeqCst))
    }

    fn gauge(&self, name: &str) -> f64 {
        f64::from_bits(self.counter(name))
    }
}

impl Recorder for TestRecorder {
    fn describe_counter(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned());
    }

    fn describe_gauge(&self, key: KeyName, _: Option<Unit>, _: SharedString) {
        self.described
            .lock()
            .unwrap()
            .insert(key.as_str().to_owned());
    }

    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.handle(key))
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.handle(key))
    }

    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// Installs the recorder once for the test process.
fn recorder() -> &'static TestRecorder {
    static RECORDER: OnceLock<TestRecorder> = OnceLock::new();
    RECORDER.get_or_init(|| {
        let recorder = TestRecorder::default();
        metrics::set_global_recorder(recorder.clone()).expect("another recorder is installed");
        recorder
    })
}

/// Serializes the tests of this file: the counters are global to the process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOKEN: &str = "id: 1\ndata: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 2\nevent: completed\ndata: {\"type\":\"completed\"}\n\n";

/// Counter values before a test, to compare with after.
struct Before(HashMap<&'static str, u64>);

const COUNTERS: [&str; 7] = [
    names::STREAMS_OPENED,
    names::STREAMS_COMPLETED,
    names::STREAMS_ORPHANED,
    names::REPLAYS_SERVED,
    names::HEARTBEATS_SENT,
    "sse_resilience_streams_failed_total{reason=body_error}",
    "sse_resilience_redis_errors_total{operation=open}",
];

impl Before {
    fn take(recorder: &TestRecorder) -> Self {
        Self(
            COUNTERS
                .iter()
                .map(|name| (*name, recorder.counter(name)))
                .collect(),
        )
    }

    fn delta(&self, recorder: &TestRecorder, name: &str) -> u64 {
        recorder.counter(name) - self.0[name]
    }
}

backend_tests!(stream_events_counted);

async fn stream_events_counted(backend: Backend) {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let before = Before::take(recorder);
    let live_before = recorder.gauge(names::STREAMS_LIVE);

    let layer = backend
        .layer()
        .heartbeat_interval(Duration::from_millis(50));
    let server = TestServer::start(layer).await;

    // A stream that sends a heartbeat, then completes.
    let mut response = server.get("/sse?stream_id=m1").await;
    let stream = server.scripted.next_stream().await;
    eventually("the live gauge counts the open stream", || async {
        recorder.gauge(names::STREAMS_LIVE) == live_before + 1.0
    })
    .await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b":heartbeat\n\n")).await;
    stream.send(COMPLETED);
    drop(stream);
    read_until(&mut response, |_| false).await;
    backend.wait_for_state("m1", "completed").await;
    eventually("the live gauge is back", || async {
        recorder.gauge(names::STREAMS_LIVE) == live_before
    })
    .await;

    // Its replay, then a stream whose inner body fails.
    let replay = server.get("/sse?stream_id=m1").await;
    assert_eq!(replay.text().await.unwrap(), COMPLETED);
    let mut failing = server.get("/sse?stream_id=m2").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut failing, |bytes| contains(bytes, b"\n\n")).await;
    stream.fail();
    backend.wait_for_state("m2", "failed").await;

    // A stream left by a crashed server, marked by a guardian.
    let stale = Duration::from_millis(300);
    abandon_streams_on(&backend, &["m3".to_owned()], stale).await;
    let guardian = backend.guardian().stale_threshold(stale);
    eventually("stream m3 is orphaned", || {
        let guardian = guardian.clone();
        async move { !guardian.sweep().await.unwrap().orphaned.is_empty() }
    })
    .await;

    assert_eq!(before.delta(recorder, names::STREAMS_OPENED), 3);
    assert_eq!(before.delta(recorder, names::STREAMS_COMPLETED), 1);
    assert_eq!(
        before.delta(
            recorder,
            "sse_resilience_streams_failed_total{reason=body_error}"
        ),
        1
    );
    assert_eq!(before.delta(recorder, names::STREAMS_ORPHANED), 1);
    assert_eq!(before.delta(recorder, names::REPLAYS_SERVED), 1);
    assert!(
        before.delta(recorder, names::HEARTBEATS_SENT) >= 1,
        "no heartbeat counted"
    );
    assert_eq!(
        before.delta(
            recorder,
            "sse_resilience_redis_errors_total{operation=open}"
        ),
        0
    );
    assert_eq!(recorder.gauge(names::STREAMS_LIVE), live_before);

    let described = recorder.described.lock().unwrap().clone();
    for name in COUNTERS.iter().take(5).chain([&names::STREAMS_LIVE]) {
        assert!(described.contains(*name), "{name} has no description");
    }
}

#[tokio::test]
async fn redis_errors_counted() {
    let _serial = SERIAL.lock().await;
    let recorder = recorder();
    let before = Before::take(recorder);

    let mut redis_process = RedisProcess::start();
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&unique_prefix("metrics_down"))
        .redis_timeout(Duration::from_millis(300))
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    redis_process.kill();

    // Served untracked: counted as a Redis error, not as an opened stream.
    let response = server.get("/fixed?stream_id=down1").await;
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
    assert_eq!(
        before.delta(
            recorder,
            "sse_resilience_redis_errors_total{operation=open}"
        ),
        1
    );
    assert_eq!(before.delta(recorder, names::STREAMS_OPENED), 0);
}
