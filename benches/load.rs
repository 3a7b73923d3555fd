//! Load harness: N concurrent SSE connections (10,000 by default) held on an
//! axum server with the layer and, side by side in the same run, on a bare
//! axum server (`Sse` with `KeepAlive`), both sending a heartbeat every
//! second. It stops by itself, and reports for each server and as ratios:
//!
//! - memory per stream: RSS growth over N, read from `/proc`;
//! - CPU time of the server and client processes;
//! - events received per second;
//! - heartbeat lateness: the interval between two heartbeats minus the
//!   heartbeat interval, measured by the client.
//!
//! Every server and every client is a process of its own, started from this
//! binary: a process holds one end of N connections, so it stays under the
//! open-files limit for N up to the limit less a few hundred. A private
//! redis-server on a free loopback port serves the layer. Everything listens
//! and connects on 127.0.0.1 only.
//!
//! Run with `cargo bench --bench load -- --streams 10000 --hold-secs 20`.

mod support;

use std::{
    convert::Infallible,
    io::{BufRead, BufReader, Write},
    process::{Child, ChildStdin, Command as Process, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use axum::{
    Router,
    response::sse::{Event, KeepAlive, Sse},
    routing::get,
};
use bytes::Bytes;
use clap::{Arg, ArgAction, ArgMatches, Command, value_parser};
use futures_util::stream::{self, Stream};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::{RedisServer, process_cpu, rss_bytes};

/// How long the orchestrator waits for one step of a child before it gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

fn main() {
    let matches = cli().get_matches();
    if let Some(mut filters) = matches.get_many::<String>("filter")
        && !filters.any(|filter| "load".contains(filter.as_str()))
    {
        return;
    }
    match matches.get_one::<String>("role").map(String::as_str) {
        Some("server") => serve(&matches),
        Some("client") => run_client(&matches),
        _ => orchestrate(&matches),
    }
}

fn cli() -> Command {
    let number = |name: &'static str, default: &'static str, help: &'static str| {
        Arg::new(name)
            .long(name)
            .value_parser(value_parser!(u64).range(1..))
            .default_value(default)
            .help(help)
    };
    Command::new("load")
        .about("Holds many SSE connections on a server with the layer and on a bare one, and compares them")
        .arg(number("streams", "10000", "concurrent streams held on each server"))
        .arg(number("hold-secs", "20", "seconds of the measured window, once every stream is open"))
        .arg(number("heartbeat-ms", "1000", "heartbeat interval of both servers, milliseconds"))
        .arg(number("concurrency", "200", "connections each client opens at once"))
        .arg(number("warmup-streams", "200", "streams opened and closed before the memory baseline"))
        .arg(number(
            "stale-secs",
            "30",
            "stale threshold of the layer, seconds; it refreshes its streams every third of it",
        ))
        // Internal: the roles of the child processes.
        .arg(Arg::new("role").long("role").hide(true))
        .arg(Arg::new("layer").long("layer").action(ArgAction::SetTrue).hide(true))
        .arg(Arg::new("redis-url").long("redis-url").hide(true))
        .arg(Arg::new("port").long("port").value_parser(value_parser!(u16)).hide(true))
        .arg(Arg::new("tag").long("tag").hide(true))
        // Passed by `cargo bench`.
        .arg(Arg::new("bench").long("bench").action(ArgAction::SetTrue).hide(true))
        .arg(Arg::new("filter").num_args(0..).hide(true))
}

fn number(matches: &ArgMatches, name: &str) -> u64 {
    *matches.get_one::<u64>(name).unwrap()
}

// ---------------------------------------------------------------------------
// Orchestrator

/// A child process of the harness, killed (by its pid) on drop.
struct ChildProcess {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
}

impl ChildProcess {
    fn spawn(name: &str, args: &[String]) -> Self {
        let exe = std::env::current_exe().expect("no path of the running binary");
        let mut child = Process::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start the {name} process: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the next line that starts with `word`, and returns the rest.
    fn expect(&self, word: &str) -> String {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(word) {
                        return rest.trim().to_owned();
                    }
                }
                Err(_) => panic!(
                    "the {} process did not report {word:?} in time (or exited)",
                    self.name
                ),
            }
        }
    }

    fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        writeln!(stdin, "{line}")
            .unwrap_or_else(|e| panic!("writing to the {} process: {e}", self.name));
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        self.stdin.take();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Server-side samples of one side of the comparison.
#[derive(Default)]
struct ServerSamples {
    rss_base: u64,
    rss_start: u64,
    rss_end: u64,
    cpu_start: Duration,
    cpu_end: Duration,
    client_cpu_start: Duration,
    client_cpu_end: Duration,
    window: Duration,
}

fn orchestrate(matches: &ArgMatches) {
    let streams = number(matches, "streams");
    let hold = number(matches, "hold-secs");
    let heartbeat = number(matches, "heartbeat-ms");
    let limit = open_files_limit();
    assert!(
        streams + 200 <= limit,
        "--streams {streams} needs more open files per process than the limit of {limit}: \
         raise it (ulimit -n) or hold fewer streams"
    );

    let redis = RedisServer::start();
    let common = |role: &str| {
        vec![
            format!("--role={role}"),
            format!("--streams={streams}"),
            format!("--hold-secs={hold}"),
            format!("--heartbeat-ms={heartbeat}"),
            format!("--concurrency={}", number(matches, "concurrency")),
            format!("--warmup-streams={}", number(matches, "warmup-streams")),
            format!("--stale-secs={}", number(matches, "stale-secs")),
        ]
    };

    let mut layer_args = common("server");
    layer_args.push("--layer".into());
    layer_args.push(format!("--redis-url={}", redis.url()));
    let layer_server = ChildProcess::spawn("layer server", &layer_args);
    let bare_server = ChildProcess::spawn("bare server", &common("server"));
    let layer_port = layer_server.expect("listening");
    let bare_port = bare_server.expect("listening");

    let client_args = |port: &str, tag: &str| {
        let mut args = common("client");
        args.push(format!("--port={port}"));
        args.push(format!("--tag={tag}"));
        args
    };
    let mut clients = [
        ChildProcess::spawn("layer client", &client_args(&layer_port, "layer")),
        ChildProcess::spawn("bare client", &client_args(&bare_port, "bare")),
    ];
    let servers = [&layer_server, &bare_server];
    let mut samples = [ServerSamples::default(), ServerSamples::default()];

    println!("Holding {streams} streams on each server, heartbeat {heartbeat} ms, window {hold} s");
    for client in &clients {
        client.expect("warm");
    }
    for (sample, server) in samples.iter_mut().zip(servers) {
        sample.rss_base = rss_bytes(server.pid());
    }
    for client in &mut clients {
        client.send("go");
    }
    let mut open_secs = [String::new(), String::new()];
    for (open, client) in open_secs.iter_mut().zip(&clients) {
        *open = client.expect("open");
    }
    for ((sample, server), client) in samples.iter_mut().zip(servers).zip(&clients) {
        client.expect("window-start");
        sample.rss_start = rss_bytes(server.pid());
        sample.cpu_start = process_cpu(server.pid());
        sample.client_cpu_start = process_cpu(client.pid());
    }
    let mut results = Vec::new();
    for ((sample, server), client) in samples.iter_mut().zip(servers).zip(&clients) {
        let window_ms: u64 = client.expect("window-end").parse().expect("window length");
        sample.rss_end = rss_bytes(server.pid());
        sample.cpu_end = process_cpu(server.pid());
        sample.client_cpu_end = process_cpu(client.pid());
        sample.window = Duration::from_millis(window_ms);
        let result: serde_json::Value =
            serde_json::from_str(&client.expect("result")).expect("client result is not JSON");
        results.push(result);
    }
    drop(clients);
    drop(layer_server);
    drop(bare_server);
    drop(redis);

    report(streams, heartbeat, &open_secs, &samples, &results);
}

/// Returns the soft limit of open files of this process, from /proc/self/limits.
fn open_files_limit() -> u64 {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .and_then(|line| line.split_whitespace().nth(3))
        .and_then(|value| value.parse().ok())
        .unwrap_or(u64::MAX)
}

fn report(
    streams: u64,
    heartbeat_ms: u64,
    open_secs: &[String; 2],
    samples: &[ServerSamples; 2],
    results: &[serde_json::Value],
) {
    let per_stream = |s: &ServerSamples| (s.rss_end as f64 - s.rss_base as f64) / streams as f64;
    let cpu_share = |start: Duration, end: Duration, window: Duration| {
        (end - start).as_secs_f64() / window.as_secs_f64() * 100.0
    };
    let field = |i: usize, name: &str| results[i][name].as_f64().unwrap_or(f64::NAN);

    println!();
    println!(
        "{:<44} {:>12} {:>12} {:>12}",
        "", "layer", "bare", "layer/bare"
    );
    let row = |name: &str, layer: f64, bare: f64| {
        println!(
            "{:<44} {:>12.2} {:>12.2} {:>12.3}",
            name,
            layer,
            bare,
            layer / bare
        );
    };
    row(
        "time to open all streams (s)",
        open_secs[0].parse().unwrap_or(f64::NAN),
        open_secs[1].parse().unwrap_or(f64::NAN),
    );
    row(
        "memory per stream (RSS growth / N, bytes)",
        per_stream(&samples[0]),
        per_stream(&samples[1]),
    );
    row(
        "RSS growth during the window / N (bytes)",
        (samples[0].rss_end as f64 - samples[0].rss_start as f64) / streams as f64,
        (samples[1].rss_end as f64 - samples[1].rss_start as f64) / streams as f64,
    );
    row(
        "server CPU (% of one core)",
        cpu_share(samples[0].cpu_start, samples[0].cpu_end, samples[0].window),
        cpu_share(samples[1].cpu_start, samples[1].cpu_end, samples[1].window),
    );
    row(
        "client CPU (% of one core)",
        cpu_share(
            samples[0].client_cpu_start,
            samples[0].client_cpu_end,
            samples[0].window,
        ),
        cpu_share(
            samples[1].client_cpu_start,
            samples[1].client_cpu_end,
            samples[1].window,
        ),
    );
    row(
        "events received per second",
        field(0, "events_per_sec"),
        field(1, "events_per_sec"),
    );
    row(
        "heartbeat lateness p50 (ms)",
        field(0, "p50_ms"),
        field(1, "p50_ms"),
    );
    row(
        "heartbeat lateness p99 (ms)",
        field(0, "p99_ms"),
        field(1, "p99_ms"),
    );
    row(
        "heartbeat lateness max (ms)",
        field(0, "max_ms"),
        field(1, "max_ms"),
    );
    row(
        "intervals more than 20 ms late",
        field(0, "late_over_20ms"),
        field(1, "late_over_20ms"),
    );
    row(
        "intervals more than 100 ms late",
        field(0, "late_over_100ms"),
        field(1, "late_over_100ms"),
    );
    row(
        "intervals measured",
        field(0, "intervals"),
        field(1, "intervals"),
    );
    row(
        "streams without an event in the window",
        field(0, "silent_streams"),
        field(1, "silent_streams"),
    );
    row("failed connections", field(0, "failed"), field(1, "failed"));
    println!(
        "memory per stream, layer minus bare: {:.0} bytes; expected events per second: {:.0}",
        per_stream(&samples[0]) - per_stream(&samples[1]),
        streams as f64 * 1000.0 / heartbeat_ms as f64
    );
}

// ---------------------------------------------------------------------------
// Servers

fn serve(matches: &ArgMatches) {
    let heartbeat = Duration::from_millis(number(matches, "heartbeat-ms"));
    let stale_threshold = Duration::from_secs(number(matches, "stale-secs"));
    let with_layer = matches.get_flag("layer");
    let redis_url = matches.get_one::<String>("redis-url").cloned();
    let runtime = tokio::runtime::Runtime::new().expect("failed to build the runtime");
    runtime.block_on(async move {
        let router = if with_layer {
            let url = redis_url.expect("the layer server needs --redis-url");
            let client = redis::Client::open(url).expect("invalid redis url");
            let redis = redis::aio::ConnectionManager::new(client)
                .await
                .expect("failed to connect to the private redis-server");
            // The same handler as the bare server, without its keep-alive:
            // the layer sends the heartbeats.
            Router::new()
                .route("/events", get(|| async { Sse::new(silent_stream()) }))
                .layer(
                    sse_resilience::SseResilienceLayer::new(redis)
                        .key_prefix("load:")
                        .heartbeat_interval(heartbeat)
                        .stale_threshold(stale_threshold),
                )
        } else {
            Router::new().route(
                "/events",
                get(move || async move {
                    Sse::new(silent_stream())
                        .keep_alive(KeepAlive::new().interval(heartbeat).text("heartbeat"))
                }),
            )
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("failed to bind a loopback port");
        println!("listening {}", listener.local_addr().unwrap().port());

        // The server stops when the orchestrator closes its stdin (or dies).
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = String::new();
            while std::io::stdin().read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        tokio::select! {
            result = axum::serve(listener, router) => result.expect("server failed"),
            _ = stdin_closed => {}
        }
    });
    std::process::exit(0);
}

/// Returns an event stream that never sends an event and never ends.
fn silent_stream() -> impl Stream<Item = Result<Event, Infallible>> {
    stream::pending()
}

// ---------------------------------------------------------------------------
// Clients

/// Measurements of one client connection.
#[derive(Default)]
struct StreamStats {
    /// Intervals between two events that ended inside the window, microseconds.
    intervals_us: Vec<u32>,
    events_in_window: u64,
    /// Times of the first and last event inside the window, microseconds
    /// since the client started.
    first_in_window_us: u64,
    last_in_window_us: u64,
}

impl StreamStats {
    /// Events per second of this stream inside the window, measured from its
    /// first to its last event there, so that where the window falls between
    /// two heartbeats does not matter.
    fn rate(&self) -> f64 {
        if self.events_in_window < 2 || self.last_in_window_us <= self.first_in_window_us {
            return 0.0;
        }
        (self.events_in_window - 1) as f64
            / ((self.last_in_window_us - self.first_in_window_us) as f64 / 1e6)
    }
}

/// State shared by the connections of a client.
struct ClientState {
    port: u16,
    tag: String,
    /// Set while the measured window runs.
    measuring: AtomicBool,
    /// Set when the connections must stop.
    stopping: AtomicBool,
    stop: tokio::sync::Notify,
    failed: AtomicUsize,
    first_failure: Mutex<Option<String>>,
    started: Instant,
}

impl ClientState {
    fn new(port: u16, tag: String) -> Arc<Self> {
        Arc::new(Self {
            port,
            tag,
            measuring: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            stop: tokio::sync::Notify::new(),
            failed: AtomicUsize::new(0),
            first_failure: Mutex::new(None),
            started: Instant::now(),
        })
    }
}

fn run_client(matches: &ArgMatches) {
    let port = *matches.get_one::<u16>("port").expect("--port");
    let tag = matches
        .get_one::<String>("tag")
        .cloned()
        .unwrap_or_default();
    let streams = number(matches, "streams") as usize;
    let hold = Duration::from_secs(number(matches, "hold-secs"));
    let heartbeat = Duration::from_millis(number(matches, "heartbeat-ms"));
    let concurrency = number(matches, "concurrency") as usize;
    let warmup = number(matches, "warmup-streams") as usize;

    let runtime = tokio::runtime::Runtime::new().expect("failed to build the runtime");
    runtime.block_on(async move {
        let state = ClientState::new(port, tag.clone());

        // Warm-up: a few streams opened, held for two heartbeats, and closed.
        let warm_state = ClientState::new(port, format!("{tag}-warm"));
        let warm_tasks = open_streams(&warm_state, warmup, concurrency).await;
        tokio::time::sleep(heartbeat * 2).await;
        stop_streams(&warm_state, warm_tasks).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        println!("warm");

        wait_for_line("go").await;
        let opening = Instant::now();
        let tasks = open_streams(&state, streams, concurrency).await;
        println!("open {:.2}", opening.elapsed().as_secs_f64());

        tokio::time::sleep(heartbeat * 2).await;
        state.measuring.store(true, Ordering::SeqCst);
        let window_start = Instant::now();
        println!("window-start");
        tokio::time::sleep(hold).await;
        state.measuring.store(false, Ordering::SeqCst);
        let window = window_start.elapsed();
        println!("window-end {}", window.as_millis());

        let stats = stop_streams(&state, tasks).await;
        let mut intervals: Vec<u32> = Vec::new();
        let mut events_per_sec = 0.0;
        let mut silent = 0u64;
        for stream in &stats {
            intervals.extend_from_slice(&stream.intervals_us);
            events_per_sec += stream.rate();
            if stream.events_in_window == 0 {
                silent += 1;
            }
        }
        intervals.sort_unstable();
        let heartbeat_us = heartbeat.as_micros() as f64;
        let lateness_ms = |quantile: f64| {
            if intervals.is_empty() {
                return f64::NAN;
            }
            let index = ((intervals.len() - 1) as f64 * quantile).round() as usize;
            (f64::from(intervals[index]) - heartbeat_us) / 1000.0
        };
        if let Some(failure) = state.first_failure.lock().unwrap().as_ref() {
            eprintln!("load client {}: first failure: {failure}", state.tag);
        }
        let result = serde_json::json!({
            "events_per_sec": events_per_sec,
            "p50_ms": lateness_ms(0.50),
            "p99_ms": lateness_ms(0.99),
            "max_ms": lateness_ms(1.0),
            "intervals": intervals.len(),
            "late_over_20ms": intervals.iter().filter(|&&i| f64::from(i) > heartbeat_us + 20_000.0).count(),
            "late_over_100ms": intervals.iter().filter(|&&i| f64::from(i) > heartbeat_us + 100_000.0).count(),
            "silent_streams": silent,
            "failed": state.failed.load(Ordering::SeqCst),
        });
        println!("result {result}");
    });
    std::process::exit(0);
}

async fn wait_for_line(word: &'static str) {
    tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        loop {
            line.clear();
            if std::io::stdin().read_line(&mut line).unwrap_or(0) == 0 {
                // The orchestrator is gone.
                std::process::exit(1);
            }
            if line.trim() == word {
                return;
            }
        }
    })
    .await
    .expect("stdin reader panicked");
}

/// Opens `count` streams, at most `concurrency` connection attempts at once,
/// and returns when every one has its response headers (or failed).
async fn open_streams(
    state: &Arc<ClientState>,
    count: usize,
    concurrency: usize,
) -> Vec<tokio::task::JoinHandle<StreamStats>> {
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::with_capacity(count);
    for index in 0..count {
        let permit = permits.clone().acquire_owned().await.unwrap();
        let state = state.clone();
        let opened_tx = opened_tx.clone();
        tasks.push(tokio::spawn(async move {
            hold_stream(state, index, permit, opened_tx).await
        }));
    }
    drop(opened_tx);
    for _ in 0..count {
        if opened_rx.recv().await.is_none() {
            break;
        }
    }
    tasks
}

async fn stop_streams(
    state: &Arc<ClientState>,
    tasks: Vec<tokio::task::JoinHandle<StreamStats>>,
) -> Vec<StreamStats> {
    state.stopping.store(true, Ordering::SeqCst);
    state.stop.notify_waiters();
    let mut stats = Vec::with_capacity(tasks.len());
    for task in tasks {
        stats.push(task.await.unwrap_or_default());
    }
    stats
}

/// Connects, requests one stream, reports that it is open, then reads its
/// events until the client stops.
async fn hold_stream(
    state: Arc<ClientState>,
    index: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    opened: tokio::sync::mpsc::UnboundedSender<()>,
) -> StreamStats {
    let fail = |state: &ClientState, error: String| {
        state.failed.fetch_add(1, Ordering::SeqCst);
        state.first_failure.lock().unwrap().get_or_insert(error);
    };
    let response = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", state.port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tokio::spawn(connection);
        let request = http::Request::get(format!(
            "/events?stream_id=load-{}-{}-{index}",
            state.tag,
            std::process::id()
        ))
        .header("host", "127.0.0.1")
        .header("accept", "text/event-stream")
        .body(Empty::<Bytes>::new())
        .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if response.status() != 200 {
            return Err(format!("status {}", response.status()));
        }
        Ok(response)
    }
    .await;
    drop(permit);
    let _ = opened.send(());
    drop(opened);

    let mut stats = StreamStats::default();
    let mut body = match response {
        Ok(response) => response.into_body(),
        Err(error) => {
            fail(&state, error);
            return stats;
        }
    };

    let mut last_event: Option<u64> = None;
    let mut previous_byte_was_lf = false;
    loop {
        if state.stopping.load(Ordering::SeqCst) {
            break;
        }
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = state.stop.notified() => break,
        };
        let data = match frame {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Some(Err(error)) => {
                fail(&state, format!("body: {error}"));
                break;
            }
            None => {
                fail(&state, "the server ended the stream".to_owned());
                break;
            }
        };
        let now_us = state.started.elapsed().as_micros() as u64;
        // Every event (a heartbeat comment here) ends with a blank line.
        let mut events = 0;
        for &byte in data.iter() {
            if byte == b'\n' {
                if previous_byte_was_lf {
                    events += 1;
                }
                previous_byte_was_lf = true;
            } else {
                previous_byte_was_lf = false;
            }
        }
        for _ in 0..events {
            let measuring = state.measuring.load(Ordering::Relaxed);
            if measuring {
                if stats.events_in_window == 0 {
                    stats.first_in_window_us = now_us;
                }
                stats.last_in_window_us = now_us;
                stats.events_in_window += 1;
                if let Some(last) = last_event {
                    let interval = now_us.saturating_sub(last);
                    stats
                        .intervals_us
                        .push(interval.min(u64::from(u32::MAX)) as u32);
                }
            }
            last_event = Some(now_us);
        }
    }
    stats
}
