//! Inputs and helpers shared by the benchmarks: realistic event-stream
//! bodies, a body that hands out a prepared buffer in fixed-size frames, an
//! identity layer to compare the layer against, and the ratio summary printed
//! after a criterion run.

#![allow(dead_code)]

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// Frame sizes the inner body is cut into: one byte (the worst case), about
/// one small event, and a full 16 KiB socket read.
pub const FRAME_SIZES: [usize; 3] = [1, 100, 16 * 1024];

/// A kind of realistic event-stream body.
#[derive(Clone, Copy, Debug)]
pub enum Workload {
    /// Many small token events, as a language model streams them: an `id`
    /// line and a short JSON `data` line, LF line ends.
    Tokens,
    /// Large JSON events (about 16 KiB of data each), LF line ends.
    LargeJson,
    /// The token events with CRLF line ends.
    TokensCrlf,
}

impl Workload {
    pub const ALL: [Workload; 3] = [Workload::Tokens, Workload::LargeJson, Workload::TokensCrlf];

    pub fn name(self) -> &'static str {
        match self {
            Workload::Tokens => "tokens",
            Workload::LargeJson => "large_json",
            Workload::TokensCrlf => "tokens_crlf",
        }
    }

    /// Builds a body of at least `min_bytes` bytes of this workload, ended by
    /// a `completed` event.
    pub fn body(self, min_bytes: usize) -> Bytes {
        let line_end = match self {
            Workload::TokensCrlf => "\r\n",
            _ => "\n",
        };
        let mut body = String::with_capacity(min_bytes + 64 * 1024);
        let mut seq = 0u64;
        while body.len() < min_bytes {
            seq += 1;
            match self {
                Workload::Tokens | Workload::TokensCrlf => {
                    let word = WORDS[(seq as usize) % WORDS.len()];
                    body.push_str(&format!(
                        "id: {seq}{line_end}data: {{\"type\":\"token\",\"index\":{seq},\"text\":\" {word}\"}}{line_end}{line_end}"
                    ));
                }
                Workload::LargeJson => {
                    body.push_str(&format!("id: {seq}{line_end}event: result{line_end}data: "));
                    body.push_str(&large_json(seq));
                    body.push_str(line_end);
                    body.push_str(line_end);
                }
            }
        }
        body.push_str(&format!(
            "event: completed{line_end}data: {{\"type\":\"completed\",\"events\":{seq}}}{line_end}{line_end}"
        ));
        Bytes::from(body)
    }
}

const WORDS: [&str; 8] = [
    "the", "stream", "keeps", "going", "while", "tokens", "arrive", "fast",
];

/// Builds a JSON object of about 16 KiB on one line: a list of records.
fn large_json(seq: u64) -> String {
    let mut json = format!("{{\"type\":\"result\",\"seq\":{seq},\"items\":[");
    for item in 0..160 {
        if item > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            "{{\"id\":{item},\"name\":\"item number {item}\",\"score\":{}.{},\"tags\":[\"a\",\"b\"]}}",
            item * 7 % 100,
            item % 10
        ));
    }
    json.push_str("]}");
    json
}

/// Splits `body` into frames of `frame_size` bytes (the last may be shorter).
/// The frames are slices of `body`: no byte is copied.
pub fn frames(body: &Bytes, frame_size: usize) -> Vec<Bytes> {
    (0..body.len())
        .step_by(frame_size)
        .map(|start| body.slice(start..(start + frame_size).min(body.len())))
        .collect()
}

/// Response body that hands out a prepared buffer in frames of a fixed size,
/// always ready, with an unknown length as event streams have. Cutting a frame is a reference count increment: no copy.
pub struct FramedBody {
    rest: Bytes,
    frame_size: usize,
}

impl FramedBody {
    pub fn new(data: Bytes, frame_size: usize) -> Self {
        Self {
            rest: data,
            frame_size,
        }
    }
}

impl Body for FramedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.rest.is_empty() {
            return Poll::Ready(None);
        }
        let take = self.frame_size.min(self.rest.len());
        let frame = self.rest.split_to(take);
        Poll::Ready(Some(Ok(Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    // No exact size hint: an event stream does not know its length, and
    // served over HTTP/1.1 an exact size would switch the baseline from
    // chunked encoding to a Content-Length.
}

/// Builds an inner service that responds to every request with `body` as
/// `text/event-stream`, cut into frames of `frame_size` bytes.
pub fn event_stream_service(
    body: Bytes,
    frame_size: usize,
) -> impl Service<
    Request<()>,
    Response = Response<FramedBody>,
    Error = Infallible,
    Future = std::future::Ready<Result<Response<FramedBody>, Infallible>>,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |_request: Request<()>| {
        let mut response = Response::new(FramedBody::new(body.clone(), frame_size));
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/event-stream"),
        );
        std::future::ready(Ok(response))
    })
}

/// A layer whose body only forwards the inner frames: the baseline of the
/// body wrapper.
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityLayer;

impl<S> Layer<S> for IdentityLayer {
    type Service = Identity<S>;

    fn layer(&self, inner: S) -> Identity<S> {
        Identity { inner }
    }
}

/// Service of [`IdentityLayer`].
#[derive(Clone, Debug)]
pub struct Identity<S> {
    inner: S,
}

impl<S, R, B> Service<R> for Identity<S>
where
    S: Service<R, Response = Response<B>>,
    S::Future: Send + 'static,
    B: 'static,
{
    type Response = Response<ForwardBody<B>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn std::future::Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let future = self.inner.call(request);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|inner| ForwardBody { inner }))
        })
    }
}

pin_project! {
    /// Body of [`Identity`]: forwards every frame of the inner body.
    pub struct ForwardBody<B> {
        #[pin]
        inner: B,
    }
}

impl<B: Body> Body for ForwardBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a body to its end and returns the number of data bytes.
pub async fn read_body<B>(body: B) -> usize
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut body = std::pin::pin!(body);
    let mut total = 0;
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.expect("the benchmark body failed");
        if let Some(data) = frame.data_ref() {
            total += data.len();
        }
    }
    total
}

/// Returns the Redis URL of the benchmarks: `REDIS_URL`, else the local server.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Returns a key prefix of its own for one benchmark run.
pub fn unique_prefix(bench: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("bench:{bench}:{}:", &random[..10])
}

/// Deletes every key under `prefix` (only those) with SCAN and UNLINK.
pub async fn delete_prefix(conn: &mut redis::aio::ConnectionManager, prefix: &str) {
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .expect("SCAN failed");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(conn)
                .await
                .expect("UNLINK failed");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// One line of the ratio summary: a measured benchmark and its baseline, by
/// their criterion ids (`group/function/parameter`).
pub struct Ratio {
    pub label: String,
    pub measured: String,
    pub baseline: String,
}

/// Prints, for each pair, the times per iteration criterion wrote in this
/// run and their ratio `baseline / measured`, where 1.0 means no cost. Pairs
/// not run now (filtered out) are skipped.
pub fn print_ratios(title: &str, started: SystemTime, ratios: &[Ratio]) {
    let dir = criterion_dir();
    println!();
    println!("{title}");
    println!(
        "{:<44} {:>14} {:>14} {:>9}",
        "pair", "measured", "baseline", "ratio"
    );
    for ratio in ratios {
        let (Some(measured), Some(baseline)) = (
            time_ns(&dir, &ratio.measured, started),
            time_ns(&dir, &ratio.baseline, started),
        ) else {
            continue;
        };
        println!(
            "{:<44} {:>14} {:>14} {:>9.3}",
            ratio.label,
            format_ns(measured),
            format_ns(baseline),
            baseline / measured
        );
    }
}

/// Criterion's output folder: `CRITERION_HOME`, else `criterion` in the
/// cargo target folder.
fn criterion_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").unwrap_or_else(|| "target".into());
    Path::new(&target).join("criterion")
}

/// Reads the time per iteration of benchmark `id` written in this run, in
/// nanoseconds.
pub fn time_ns_of(id: &str, started: SystemTime) -> Option<f64> {
    time_ns(&criterion_dir(), id, started)
}

/// Reads the time per iteration of one benchmark from criterion's
/// estimates, when they were written after `started`.
fn time_ns(dir: &Path, id: &str, started: SystemTime) -> Option<f64> {
    let path = dir.join(id).join("new").join("estimates.json");
    let modified = std::fs::metadata(&path).ok()?.modified().ok()?;
    if modified < started {
        return None;
    }
    let text = std::fs::read_to_string(&path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    // Criterion reports the slope of its linear samples when it has one.
    json["slope"]["point_estimate"]
        .as_f64()
        .or_else(|| json["mean"]["point_estimate"].as_f64())
}

pub fn format_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// A redis-server child process without persistence on a free loopback
/// port, killed on drop.
pub struct RedisServer {
    child: std::process::Child,
    pub port: u16,
}

impl RedisServer {
    /// Starts the server and waits (at most about 5 s) until it accepts connections.
    pub fn start() -> Self {
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("failed to start redis-server: is it installed and on PATH?");
        let server = Self { child, port };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..250 {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {port} did not accept connections within about 5 s");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Returns a loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("failed to bind a loopback port");
    listener.local_addr().unwrap().port()
}

/// Returns the CPU time the calling thread has used, from
/// `/proc/thread-self/schedstat` (nanoseconds).
pub fn thread_cpu() -> Duration {
    schedstat("/proc/thread-self/schedstat")
}

/// Returns the CPU time of the main thread of process `pid`, from
/// `/proc/<pid>/schedstat` (nanoseconds).
pub fn main_thread_cpu(pid: u32) -> Duration {
    schedstat(&format!("/proc/{pid}/schedstat"))
}

fn schedstat(path: &str) -> Duration {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let ns: u64 = text
        .split_whitespace()
        .next()
        .and_then(|field| field.parse().ok())
        .unwrap_or_else(|| panic!("unexpected content of {path}: {text:?}"));
    Duration::from_nanos(ns)
}

/// Returns the user and system CPU time of process `pid` (all its threads),
/// from `/proc/<pid>/stat`, in clock ticks of 10 ms.
pub fn process_cpu(pid: u32) -> Duration {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    // The command name is in parentheses and may contain spaces: fields
    // are counted after its closing parenthesis.
    let rest = &text[text.rfind(')').expect("no ')' in /proc/PID/stat") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// Returns the resident set size of process `pid`, from `/proc/<pid>/status`, in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let line = text
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .unwrap_or_else(|| panic!("no VmRSS in {path}"));
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("unexpected VmRSS line {line:?}"));
    kib * 1024
}

/// Reads `INFO commandstats` and returns the number of calls of each
/// command, lower case, since the last `CONFIG RESETSTAT`.
pub async fn command_calls<C: redis::aio::ConnectionLike>(
    conn: &mut C,
) -> std::collections::BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats failed");
    let mut calls = std::collections::BTreeMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, stats)) = rest.split_once(':') else {
            continue;
        };
        let count = stats
            .split(',')
            .find_map(|field| field.strip_prefix("calls="))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        calls.insert(name.to_owned(), count);
    }
    calls
}
