//! Cost of keeping live streams fresh: what one refresh tick of N live
//! streams (10,000 by default) sends to Redis, how long it takes and how much
//! CPU it uses, beside baselines measured in the same run:
//!
//! - a bare redis-rs pipeline that touches the same number of keys (one
//!   `PEXPIRE` per stream key, and one `ZADD` and `PEXPIRE` per index shard),
//!   the least one pipelined refresh can cost;
//! - the same `PEXPIRE`s sent one round trip each, what a refresh without
//!   batching would cost.
//!
//! Before that, it opens up to 2,000 streams one after the other, and as
//! many 50 at a time, and counts the Redis calls of each open. These streams
//! are on layers of their own, whose refresh ticks do not come during the
//! measurement. The time to a response is compared with one `PING` round
//! trip.
//!
//! The harness starts its own redis-server on a free loopback port, so that
//! `INFO commandstats` counts only its commands, and gives the layer a
//! connection wrapper that counts and times every call and pipeline.
//!
//! Run with `cargo bench --bench refresh -- --streams 10000 --ticks 5`.

mod support;

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::{Arg, Command, value_parser};
use futures_util::StreamExt;
use http::{Request, Response, header};
use http_body_util::StreamBody;
use redis::{Cmd, Pipeline, RedisFuture, Value, aio::ConnectionLike, aio::ConnectionManager};
use sse_resilience::SseResilienceLayer;
use support::{RedisServer, command_calls, main_thread_cpu, thread_cpu};
use tower::{Layer, Service, ServiceExt};

/// Interval of the refresh ticks: a third of the stale threshold set below.
const TICK: Duration = Duration::from_secs(1);
const STALE_THRESHOLD: Duration = Duration::from_secs(3);
const KEY_PREFIX: &str = "bench:";

/// Calls that went through a [`CountingConnection`].
#[derive(Default)]
struct CallLog {
    /// Single commands (one round trip each).
    single: u64,
    /// Pipelines: number of commands and time from send to last reply.
    pipelines: Vec<(usize, Duration)>,
}

/// A connection that counts and times the calls made through it. Clones
/// share the inner connection and the log.
#[derive(Clone)]
struct CountingConnection {
    inner: ConnectionManager,
    log: Arc<Mutex<CallLog>>,
}

impl CountingConnection {
    fn take_log(&self) -> CallLog {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl ConnectionLike for CountingConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.log.lock().unwrap().single += 1;
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let log = self.log.clone();
        let commands = pipeline.len();
        Box::pin(async move {
            let started = Instant::now();
            let replies = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            log.lock()
                .unwrap()
                .pipelines
                .push((commands, started.elapsed()));
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// Body of a stream that never sends a byte and never ends.
type IdleBody =
    StreamBody<futures_util::stream::Pending<Result<http_body::Frame<Bytes>, Infallible>>>;

/// Builds an inner service whose event streams never send a byte and never end.
fn idle_stream_service()
-> impl Service<Request<()>, Response = Response<IdleBody>, Error = Infallible, Future = impl Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_request: Request<()>| async {
        let mut response = Response::new(StreamBody::new(futures_util::stream::pending()));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        Ok(response)
    })
}

/// CPU and Redis work over a measured window.
struct Window {
    wall: Duration,
    client_cpu: Duration,
    redis_cpu: Duration,
    calls: std::collections::BTreeMap<String, u64>,
    log: CallLog,
}

/// Measures `work`: the layer's pipelines and calls (through `conn`), the
/// CPU of this thread and of the Redis server, and the commands Redis ran.
async fn measure<F: std::future::Future<Output = ()>>(
    admin: &mut ConnectionManager,
    conn: &CountingConnection,
    redis_pid: u32,
    work: F,
) -> Window {
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(admin)
        .await
        .expect("CONFIG RESETSTAT failed");
    conn.take_log();
    let started = Instant::now();
    let client_cpu = thread_cpu();
    let redis_cpu = main_thread_cpu(redis_pid);

    work.await;

    let client_cpu = thread_cpu() - client_cpu;
    let redis_cpu = main_thread_cpu(redis_pid) - redis_cpu;
    let wall = started.elapsed();
    let log = conn.take_log();
    let mut calls = command_calls(admin).await;
    // The commands of this measurement itself.
    calls.remove("info");
    calls.remove("config|resetstat");
    Window {
        wall,
        client_cpu,
        redis_cpu,
        calls,
        log,
    }
}

fn describe_calls(calls: &std::collections::BTreeMap<String, u64>, per: u64) -> String {
    calls
        .iter()
        .map(|(name, count)| format!("{name} {}", count / per.max(1)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Stale threshold of the layers that only measure opening: their refresh
/// tick (a third of it) does not come during the measurement.
const OPEN_STALE_THRESHOLD: Duration = Duration::from_secs(600);

/// Builds a layer for the opening measurements, whose streams end at once
/// when their bodies are dropped.
fn opening_layer(conn: &CountingConnection) -> SseResilienceLayer {
    SseResilienceLayer::new(conn.clone())
        .key_prefix(KEY_PREFIX)
        .stale_threshold(OPEN_STALE_THRESHOLD)
        .drain_timeout(Duration::ZERO)
        .without_heartbeats()
}

/// Waits until the streams of `layer` ended and their ends reached Redis.
async fn wait_until_ended(layer: &SseResilienceLayer) {
    for _ in 0..3000 {
        if layer.live_streams() == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("streams of an opening measurement did not end within 30 s");
}

/// Opens `count` streams one after the other and prints the Redis calls and
/// the time per open, against one `PING` round trip.
async fn open_sequentially(
    admin: &mut ConnectionManager,
    conn: &CountingConnection,
    redis_pid: u32,
    count: usize,
) {
    let mut ping_conn = conn.clone();
    let pings = 2000u32;
    let ping_window = measure(admin, conn, redis_pid, async {
        for _ in 0..pings {
            let _: String = redis::cmd("PING")
                .query_async(&mut ping_conn)
                .await
                .unwrap();
        }
    })
    .await;
    let ping = ping_window.wall / pings;

    let layer = opening_layer(conn);
    let service = layer.layer(idle_stream_service());
    let mut bodies = Vec::with_capacity(count);
    let mut open_time = Duration::ZERO;
    let window = measure(admin, conn, redis_pid, async {
        for i in 0..count {
            let request = Request::get(format!("/s?stream_id=o{i}")).body(()).unwrap();
            let started = Instant::now();
            let response = service.clone().oneshot(request).await.unwrap();
            open_time += started.elapsed();
            assert_eq!(response.status(), 200, "opening stream o{i}");
            bodies.push(response.into_body());
        }
    })
    .await;

    let per_open = open_time / count as u32;
    let count_f = count as f64;
    println!("Opening {count} streams one after the other");
    println!(
        "  single calls (one round trip each) per open: {:.3}; background pipelines per open: {:.3}",
        window.log.single as f64 / count_f,
        window.log.pipelines.len() as f64 / count_f
    );
    println!(
        "  commands run by redis per open, script internals included: {}",
        window
            .calls
            .iter()
            .map(|(name, calls)| format!("{name} {:.3}", *calls as f64 / count_f))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  time to response: {:.1} µs per open; one PING round trip: {:.1} µs; ratio {:.2}",
        per_open.as_secs_f64() * 1e6,
        ping.as_secs_f64() * 1e6,
        per_open.as_secs_f64() / ping.as_secs_f64()
    );
    println!(
        "  CPU per open: client {:.1} µs, redis {:.1} µs; per PING: client {:.1} µs, redis {:.1} µs",
        window.client_cpu.as_secs_f64() * 1e6 / count_f,
        window.redis_cpu.as_secs_f64() * 1e6 / count_f,
        ping_window.client_cpu.as_secs_f64() * 1e6 / f64::from(pings),
        ping_window.redis_cpu.as_secs_f64() * 1e6 / f64::from(pings),
    );
    drop(bodies);
    wait_until_ended(&layer).await;
}

/// Opens `count` streams, `concurrency` at a time, and prints the Redis
/// calls per open.
async fn open_concurrently(
    admin: &mut ConnectionManager,
    conn: &CountingConnection,
    redis_pid: u32,
    count: usize,
    concurrency: usize,
) {
    let layer = opening_layer(conn);
    let service = layer.layer(idle_stream_service());
    let mut bodies = Vec::with_capacity(count);
    let window = measure(admin, conn, redis_pid, async {
        let mut opens = open_all(&service, "c", count, concurrency);
        while let Some(response) = opens.next().await {
            bodies.push(response.unwrap().into_body());
        }
    })
    .await;
    println!("Opening {count} streams, {concurrency} at a time");
    println!(
        "  single calls per open: {:.3}; background pipelines per open: {:.3}",
        window.log.single as f64 / count as f64,
        window.log.pipelines.len() as f64 / count as f64
    );
    drop(bodies);
    wait_until_ended(&layer).await;
}

/// Returns the responses to `count` stream requests, `concurrency` at a time.
fn open_all<S>(
    service: &S,
    name: &str,
    count: usize,
    concurrency: usize,
) -> impl futures_util::Stream<Item = Result<S::Response, S::Error>>
where
    S: Service<Request<()>> + Clone,
{
    let name = name.to_owned();
    futures_util::stream::iter(0..count)
        .map(move |i| {
            let request = Request::get(format!("/s?stream_id={name}{i}"))
                .body(())
                .unwrap();
            service.clone().oneshot(request)
        })
        .buffer_unordered(concurrency)
}

/// Waits until the layer's next refresh pipeline has come back, so that a
/// measurement started now has most of a tick interval to itself.
async fn after_next_tick(conn: &CountingConnection) {
    let seen = conn.log.lock().unwrap().pipelines.len();
    while conn.log.lock().unwrap().pipelines.len() == seen {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn run(redis: &RedisServer, streams: usize, ticks: u32) {
    let client = redis::Client::open(redis.url()).expect("invalid redis url");
    let manager = ConnectionManager::new(client.clone())
        .await
        .expect("failed to connect to the private redis-server");
    let mut admin = ConnectionManager::new(client)
        .await
        .expect("failed to connect to the private redis-server");
    let conn = CountingConnection {
        inner: manager,
        log: Arc::default(),
    };

    // Loads the scripts, so that no measured open pays for it.
    let warm_layer = opening_layer(&conn);
    let warm = warm_layer
        .layer(idle_stream_service())
        .oneshot(Request::get("/s?stream_id=warm").body(()).unwrap())
        .await
        .unwrap();
    drop(warm);
    wait_until_ended(&warm_layer).await;

    let opened = streams.min(2000);
    open_sequentially(&mut admin, &conn, redis.pid(), opened).await;
    open_concurrently(&mut admin, &conn, redis.pid(), opened, 50).await;

    let layer = SseResilienceLayer::new(conn.clone())
        .key_prefix(KEY_PREFIX)
        .stale_threshold(STALE_THRESHOLD)
        .without_heartbeats();
    let service = layer.layer(idle_stream_service());
    let mut bodies = Vec::with_capacity(streams);
    let mut opens = open_all(&service, "s", streams, 50);
    while let Some(response) = opens.next().await {
        bodies.push(response.unwrap().into_body());
    }
    drop(opens);
    assert_eq!(layer.live_streams(), streams, "every stream is live");

    // Lets the index additions flush before the ticks are measured.
    tokio::time::sleep(TICK * 2).await;

    let tick_window = measure(&mut admin, &conn, redis.pid(), async {
        tokio::time::sleep(TICK * ticks + TICK / 2).await;
    })
    .await;
    let tick_count = tick_window.log.pipelines.len().max(1) as u32;
    let tick_wire: Duration = tick_window.log.pipelines.iter().map(|(_, d)| *d).sum();

    // The bare pipeline: the same number of keys, touched once each.
    let mut bare = redis::pipe();
    for i in 0..streams {
        bare.cmd("PEXPIRE")
            .arg(format!("{KEY_PREFIX}{{s{i}}}"))
            .arg(30_000)
            .ignore();
    }
    for shard in 0..16 {
        let key = format!("{KEY_PREFIX}active:{{{shard}}}");
        let mut zadd = redis::cmd("ZADD");
        zadd.arg(&key);
        for i in (shard..streams).step_by(16) {
            zadd.arg(0).arg(format!("s{i}"));
        }
        bare.add_command(zadd).ignore();
        bare.cmd("PEXPIRE").arg(&key).arg(30_000).ignore();
    }
    let mut bare_conn = conn.clone();
    after_next_tick(&conn).await;
    let bare_window = measure(&mut admin, &conn, redis.pid(), async {
        for _ in 0..ticks {
            let _: () = bare.query_async(&mut bare_conn).await.unwrap();
        }
    })
    .await;
    let bare_wire: Duration = bare_window.log.pipelines.iter().map(|(_, d)| *d).sum();

    after_next_tick(&conn).await;
    let sequential_window = measure(&mut admin, &conn, redis.pid(), async {
        for i in 0..streams {
            let _: i64 = redis::cmd("PEXPIRE")
                .arg(format!("{KEY_PREFIX}{{s{i}}}"))
                .arg(30_000)
                .query_async(&mut bare_conn)
                .await
                .unwrap();
        }
    })
    .await;

    println!();
    println!("Refresh of {streams} live streams, per tick (mean of {tick_count} ticks)");
    println!(
        "{:<26} {:>9} {:>11} {:>11} {:>11}  commands",
        "", "pipelines", "wire ms", "client CPU", "redis CPU"
    );
    let row = |name: &str, window: &Window, runs: u32, wire: Duration| {
        let runs_f = f64::from(runs.max(1));
        println!(
            "{:<26} {:>9.2} {:>11.2} {:>11.2} {:>11.2}  {}",
            name,
            window.log.pipelines.len() as f64 / runs_f,
            millis(wire) / runs_f,
            millis(window.client_cpu) / runs_f,
            millis(window.redis_cpu) / runs_f,
            describe_calls(&window.calls, u64::from(runs.max(1)))
        );
    };
    row("layer tick", &tick_window, tick_count, tick_wire);
    row("bare pipeline", &bare_window, ticks, bare_wire);
    row(
        "one round trip per stream",
        &sequential_window,
        1,
        sequential_window.wall,
    );
    println!(
        "ratios, bare pipeline / layer tick: wire time {:.3}, client CPU {:.3}, redis CPU {:.3}",
        (millis(bare_wire) / f64::from(ticks)) / (millis(tick_wire) / f64::from(tick_count)),
        (millis(bare_window.client_cpu) / f64::from(ticks))
            / (millis(tick_window.client_cpu) / f64::from(tick_count)),
        (millis(bare_window.redis_cpu) / f64::from(ticks))
            / (millis(tick_window.redis_cpu) / f64::from(tick_count)),
    );
    println!(
        "ratio, one round trip per stream / layer tick: wire time {:.1}",
        millis(sequential_window.wall) / (millis(tick_wire) / f64::from(tick_count))
    );
    drop(bodies);
}

fn main() {
    let matches = Command::new("refresh")
        .about("Measures the refresh tick of many live streams against a bare Redis pipeline")
        .arg(
            Arg::new("streams")
                .long("streams")
                .value_parser(value_parser!(usize))
                .default_value("10000")
                .help("number of live streams"),
        )
        .arg(
            Arg::new("ticks")
                .long("ticks")
                .value_parser(value_parser!(u32).range(1..))
                .default_value("5")
                .help("number of refresh ticks (1 s apart) to measure"),
        )
        .arg(Arg::new("bench").long("bench").num_args(0).hide(true))
        .arg(Arg::new("filter").num_args(0..).hide(true))
        .get_matches();
    if let Some(mut filters) = matches.get_many::<String>("filter")
        && !filters.any(|filter| "refresh".contains(filter.as_str()))
    {
        return;
    }
    let streams = *matches.get_one::<usize>("streams").unwrap();
    let ticks = *matches.get_one::<u32>("ticks").unwrap();

    let redis = RedisServer::start();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("failed to build the runtime");
    runtime.block_on(run(&redis, streams, ticks));
}
