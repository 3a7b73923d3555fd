//! HTTP behaviour of the layer through a real axum server and a real Redis:
//! heartbeats, terminal events, replay, status codes and pass-through.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use common::*;
use http::HeaderName;
use reqwest::{StatusCode, header::HeaderMap};
use sse_resilience::{EventStreamParser, SseResilienceLayer, TerminalRule};

/// Heartbeat interval of the tests that check where heartbeats go.
const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(30);
/// Idle time of those tests, which is four heartbeat intervals.
const IDLE: Duration = Duration::from_millis(120);

const HEARTBEAT: &[u8] = b":heartbeat\n\n";

/// A server behind a layer on its own backend: the test Redis under a key
/// prefix of its own, or a memory store.
struct Harness {
    backend: Backend,
    server: TestServer,
}

impl Harness {
    async fn start(
        test: &str,
        configure: impl FnOnce(SseResilienceLayer) -> SseResilienceLayer,
    ) -> Self {
        Self::on(Backend::redis(test).await, configure).await
    }

    async fn on(
        backend: Backend,
        configure: impl FnOnce(SseResilienceLayer) -> SseResilienceLayer,
    ) -> Self {
        let server = TestServer::start(configure(backend.layer())).await;
        Self { backend, server }
    }

    /// Starts a server whose heartbeats are sent every `HEARTBEAT_INTERVAL`.
    async fn with_fast_heartbeats(test: &str) -> Self {
        Self::start(test, |layer| layer.heartbeat_interval(HEARTBEAT_INTERVAL)).await
    }

    async fn field(&self, id: &str, field: &str) -> Option<String> {
        self.backend.field(id, field).await
    }

    async fn state(&self, id: &str) -> Option<String> {
        self.backend.state(id).await
    }

    async fn wait_for_state(&self, id: &str, expected: &str) {
        self.backend.wait_for_state(id, expected).await;
    }

    async fn wait_for_no_key(&self, id: &str) {
        let condition = format!("stream {id} has no key");
        eventually(&condition, || async move {
            self.backend.state(id).await.is_none()
        })
        .await;
    }

    /// Opens `/sse` at `path_and_query` and takes the scripted stream it started.
    async fn open(&self, path_and_query: &str) -> ClientStream {
        let response = self.server.get(path_and_query).await;
        let inner = self.server.scripted.next_stream().await;
        ClientStream::new(response, inner)
    }

    /// Sends a GET request and reads the whole body.
    async fn fetch(
        &self,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, Bytes) {
        let mut request = self.server.client.get(self.server.url(path_and_query));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.unwrap();
        (status, headers, body)
    }
}

/// A streaming response read by a background task, and the scripted inner
/// stream that feeds it.
struct ClientStream {
    status: StatusCode,
    headers: HeaderMap,
    inner: ScriptedStream,
    sent: Vec<u8>,
    received: Arc<Mutex<Vec<u8>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl ClientStream {
    fn new(mut response: reqwest::Response, inner: ScriptedStream) -> Self {
        let status = response.status();
        let headers = response.headers().clone();
        let received = Arc::new(Mutex::new(Vec::new()));
        let sink = received.clone();
        let reader = tokio::spawn(async move {
            while let Some(chunk) = response
                .chunk()
                .await
                .expect("reading the response body failed")
            {
                sink.lock().unwrap().extend_from_slice(&chunk);
            }
        });
        Self {
            status,
            headers,
            inner,
            sent: Vec::new(),
            received,
            reader,
        }
    }

    /// Sends one frame and waits until the client has received it.
    async fn send(&mut self, frame: &[u8]) {
        self.inner.send(Bytes::copy_from_slice(frame));
        self.sent.extend_from_slice(frame);
        let received = self.received.clone();
        let sent = self.sent.clone();
        eventually("the client received every frame sent", move || {
            let arrived = strip_heartbeats(&received.lock().unwrap()).starts_with(&sent);
            async move { arrived }
        })
        .await;
    }

    async fn idle(&self) {
        tokio::time::sleep(IDLE).await;
    }

    fn received_so_far(&self) -> Vec<u8> {
        self.received.lock().unwrap().clone()
    }

    /// Ends the inner body and returns (bytes sent by the inner service,
    /// bytes the client received).
    async fn finish(self) -> (Vec<u8>, Vec<u8>) {
        let Self {
            inner,
            sent,
            received,
            reader,
            ..
        } = self;
        drop(inner);
        tokio::time::timeout(Duration::from_secs(20), reader)
            .await
            .expect("the response did not end within 20 s")
            .expect("the reader task failed");
        let output = received.lock().unwrap().clone();
        (sent, output)
    }
}

/// Renders bytes for assertion messages.
fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Returns, for each heartbeat in `output`, the number of inner bytes before it.
fn heartbeat_offsets(output: &[u8]) -> Vec<usize> {
    let mut offsets = Vec::new();
    let mut inner_bytes = 0;
    let mut i = 0;
    while i < output.len() {
        if output[i..].starts_with(HEARTBEAT) {
            offsets.push(inner_bytes);
            i += HEARTBEAT.len();
        } else {
            inner_bytes += 1;
            i += 1;
        }
    }
    offsets
}

/// Checks that `output` is `input` with heartbeats added only at event
/// boundaries, and that at least one heartbeat was sent.
fn assert_heartbeats_only_between_events(input: &[u8], output: &[u8]) {
    assert!(
        strip_heartbeats(output) == input,
        "output without heartbeats differs from the input\n input:  {}\n output: {}",
        show(input),
        show(output)
    );

    let offsets = heartbeat_offsets(output);
    assert!(!offsets.is_empty(), "no heartbeat in {}", show(output));

    for offset in offsets {
        let before = &input[..offset];
        let tail = &before[before.len().saturating_sub(40)..];
        assert!(
            before.is_empty() || before.ends_with(b"\n"),
            "heartbeat after a byte other than LF, after ...{}",
            show(tail)
        );
        let mut parser = EventStreamParser::default();
        parser.feed(before, |_| {});
        assert!(
            parser.is_at_event_boundary(),
            "heartbeat inside an event at inner offset {offset}, after ...{}",
            show(tail)
        );
    }
}

/// Checks that `id` failed with `no_terminal_event` and that its replay is
/// the layer's synthetic `failed` event.
async fn assert_failed_without_terminal(harness: &Harness, id: &str) {
    harness.wait_for_state(id, "failed").await;
    assert_eq!(
        harness.field(id, "reason").await.as_deref(),
        Some("no_terminal_event")
    );

    let (status, _, body) = harness.fetch(&format!("/sse?stream_id={id}"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    let mut events = Vec::new();
    EventStreamParser::default().feed(&body, |event| {
        events.push((event.event_type().to_owned(), event.data().into_owned()));
    });
    assert_eq!(events.len(), 1, "replay {}", show(&body));
    let (event_type, data) = &events[0];
    assert_eq!(event_type, "failed");
    let data: serde_json::Value = serde_json::from_str(data).expect("replay data is not JSON");
    assert_eq!(data["type"], "failed");
    assert_eq!(data["reason"], "no_terminal_event");
    assert_eq!(data["stream_id"], id);
}

/// Checks that `id` completed and that its replay is exactly `event`.
async fn assert_completed_with(harness: &Harness, id: &str, event: &[u8]) {
    harness.wait_for_state(id, "completed").await;
    assert_eq!(harness.field(id, "reason").await.as_deref(), Some(""));

    let (status, _, body) = harness.fetch(&format!("/sse?stream_id={id}"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        body == event,
        "replay {} is not the terminal event {}",
        show(&body),
        show(event)
    );
}

// Heartbeats when idle.

#[tokio::test]
async fn heartbeats_sent_when_idle() {
    let harness = Harness::start("hb_idle", |layer| {
        layer.heartbeat_interval(Duration::from_millis(100))
    })
    .await;
    let stream = harness.open("/sse?stream_id=s").await;
    assert_eq!(stream.status, StatusCode::OK);

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_output = stream.received_so_far();
    let (_, output) = stream.finish().await;

    assert!(
        contains(&idle_output, HEARTBEAT),
        "no heartbeat while idle: {}",
        show(&idle_output)
    );
    assert!(
        strip_heartbeats(&output).is_empty(),
        "output {}",
        show(&output)
    );
}

#[tokio::test]
async fn custom_heartbeat_comment_sent() {
    let harness = Harness::start("hb_custom", |layer| {
        layer
            .heartbeat_interval(Duration::from_millis(100))
            .heartbeat_comment("ping")
    })
    .await;
    let stream = harness.open("/sse?stream_id=s").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_output = stream.received_so_far();
    let (_, output) = stream.finish().await;

    assert!(
        contains(&idle_output, b":ping\n\n"),
        "no ping while idle: {}",
        show(&idle_output)
    );
    assert!(!contains(&output, b"heartbeat"), "output {}", show(&output));
    assert!(
        output
            .chunks(b":ping\n\n".len())
            .all(|frame| frame == b":ping\n\n"),
        "output is not only ping comments: {}",
        show(&output)
    );
}

#[tokio::test]
async fn no_heartbeats_when_disabled() {
    let harness = Harness::start("hb_off", |layer| {
        layer
            .heartbeat_interval(Duration::from_millis(100))
            .without_heartbeats()
    })
    .await;
    let stream = harness.open("/sse?stream_id=s").await;

    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, output) = stream.finish().await;

    assert!(output.is_empty(), "output {}", show(&output));
}

// Heartbeats never inside an event. Every case idles at the start so that at
// least one heartbeat is sent, and most cases idle before the end too.

#[tokio::test]
async fn heartbeat_waits_for_split_crlf() {
    let harness = Harness::with_fast_heartbeats("split_crlf").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream.send(b"data: A\r\n").await;
    stream.send(b"data: B\r").await;
    stream.idle().await;
    stream.send(b"\n").await;
    stream.send(b"data: C\r\n").await;
    stream.send(b"\n").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_failed_without_terminal(&harness, "s").await;
}

#[tokio::test]
async fn terminal_split_inside_crlf() {
    let harness = Harness::with_fast_heartbeats("terminal_crlf").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream.send(b"event: completed\r\ndata: {\"type\":\r").await;
    stream.idle().await;
    assert_eq!(harness.state("s").await.as_deref(), Some("active"));
    stream.send(b"\ndata: \"completed\"}\r\n").await;
    stream.send(b"\r\n").await;
    harness.wait_for_state("s", "completed").await;
    let finished_at = harness.field("s", "finished_at").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", &input).await;
    // The end of the stream records nothing more.
    assert_eq!(harness.field("s", "finished_at").await, finished_at);
    assert_eq!(
        harness
            .field("s", "terminal_event")
            .await
            .as_deref()
            .map(str::as_bytes),
        Some(&input[..])
    );
}

#[tokio::test]
async fn terminal_recorded_at_blank_line() {
    let harness = Harness::with_fast_heartbeats("terminal_blank").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream
        .send(b"id: 9\ndata: {\"type\":\"completed\"}\ntype: failed\n")
        .await;
    stream.idle().await;
    assert_eq!(harness.state("s").await.as_deref(), Some("active"));
    stream.send(b"\n").await;
    harness.wait_for_state("s", "completed").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", &input).await;
    assert_eq!(
        harness.field("s", "terminal_id").await.as_deref(),
        Some("9")
    );
}

#[tokio::test]
async fn heartbeat_waits_inside_data_line() {
    let harness = Harness::with_fast_heartbeats("split_line").await;
    let mut stream = harness.open("/sse?stream_id=s").await;
    let terminal: &[u8] = b"event: completed\ndata: {\"type\":\"completed\"}\n\n";

    stream.idle().await;
    stream
        .send(b"data: {\"type\":\"delta\",\"text\":\"hel")
        .await;
    stream.idle().await;
    stream.send(b"lo\"}\n\n").await;
    stream.send(terminal).await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", terminal).await;
}

#[tokio::test]
async fn bytes_after_terminal_pass_through() {
    let harness = Harness::with_fast_heartbeats("after_terminal").await;
    let mut stream = harness.open("/sse?stream_id=s").await;
    let terminal: &[u8] = b"event: completed\ndata: {\"type\":\"completed\"}\n\n";
    let mut first_frame = b"data: {\"type\":\"progress\"}\n\n".to_vec();
    first_frame.extend_from_slice(terminal);
    first_frame.extend_from_slice(b"data: {\"ty");

    stream.idle().await;
    stream.send(&first_frame).await;
    // The terminal event is recorded before any later frame is sent.
    harness.wait_for_state("s", "completed").await;
    stream.idle().await;
    stream.send(b"pe\":\"x\"}\n\n").await;
    stream.send(b"event: failed\ndata: x\n\n").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;
    wait_for_late_writes().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", terminal).await;
    assert_eq!(
        harness
            .field("s", "terminal_event")
            .await
            .as_deref()
            .map(str::as_bytes),
        Some(terminal)
    );
}

#[tokio::test]
async fn unterminated_last_event_fails_stream() {
    let harness = Harness::with_fast_heartbeats("unterminated").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream
        .send(b"data: {\"type\":\"progress\"}\n\ndata: {\"type\":\"completed\"}\n")
        .await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_failed_without_terminal(&harness, "s").await;
}

#[tokio::test]
async fn terminal_ending_in_lone_cr() {
    let harness = Harness::with_fast_heartbeats("lone_cr").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream.send(b"data: {\"type\":\"completed\"}\r\n\r").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", &input).await;
}

#[tokio::test]
async fn comment_lines_inside_event() {
    let harness = Harness::with_fast_heartbeats("comments").await;
    let mut stream = harness.open("/sse?stream_id=s").await;
    let half_comment = "x".repeat(1024);
    let long_comment = "x".repeat(2048);

    // The input is sent in pieces that end inside lines and after a lone CR.
    stream.idle().await;
    stream.send(b"data:1\r").await;
    stream.idle().await;
    stream.send(b":\0\n:\r").await;
    stream.idle().await;
    stream
        .send(format!("\ndata:2\n:{half_comment}").as_bytes())
        .await;
    stream.idle().await;
    stream
        .send(format!("{half_comment}\rdata:3\n:data:fail\r:{long_comment}\n").as_bytes())
        .await;
    stream.idle().await;
    stream.send(b"data:4\n\n").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    let expected = format!(
        "data:1\r:\0\n:\r\ndata:2\n:{long_comment}\rdata:3\n:data:fail\r:{long_comment}\ndata:4\n\n"
    );
    assert_eq!(show(&input), show(expected.as_bytes()));
    assert_heartbeats_only_between_events(&input, &output);
    assert_failed_without_terminal(&harness, "s").await;
}

#[tokio::test]
async fn terminal_words_in_comments_ignored() {
    let harness = Harness::with_fast_heartbeats("comment_words").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream
        .send(b"data: {\"type\":\"progress\"}\n:event: completed\n: {\"type\":\"failed\"}\n\n")
        .await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_failed_without_terminal(&harness, "s").await;
}

#[tokio::test]
async fn event_without_data_not_terminal() {
    let harness = Harness::with_fast_heartbeats("no_data").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream.send(b"event: completed\n\n").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_failed_without_terminal(&harness, "s").await;
}

#[tokio::test]
async fn completed_event_with_empty_data() {
    let harness = Harness::with_fast_heartbeats("empty_data").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream.send(b"event: completed\ndata:\n\n").await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", &input).await;
}

#[tokio::test]
async fn mixed_line_endings_terminal() {
    let harness = Harness::with_fast_heartbeats("mixed_endings").await;
    let mut stream = harness.open("/sse?stream_id=s").await;

    stream.idle().await;
    stream
        .send(b"event: completed\r\ndata: {\"type\":\"completed\"}\n\n")
        .await;
    stream.idle().await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
    assert_completed_with(&harness, "s", &input).await;
}

/// Waits so that a wrong second write of the stream's end would reach Redis
/// before the test checks that nothing changed.
async fn wait_for_late_writes() {
    tokio::time::sleep(Duration::from_millis(200)).await;
}

// Replay of a finished stream, owners, conflicts and released claims, on
// both backends.

backend_tests!(
    terminal_replayed_without_inner_call,
    last_event_id_selects_replay,
    other_owner_gets_404,
    live_stream_of_other_owner_404,
    live_id_gets_409,
    json_response_passes_through,
);

// Replay of a finished stream.

async fn terminal_replayed_without_inner_call(backend: Backend) {
    let harness = Harness::on(backend, |layer| layer).await;
    let terminal: &[u8] =
        b"id: 7\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"ok\"}\n\n";
    let mut stream = harness.open("/sse?stream_id=r1").await;
    stream.send(b"id: 1\ndata: {\"type\":\"delta\"}\n\n").await;
    stream.send(terminal).await;
    harness.wait_for_state("r1", "completed").await;
    stream.finish().await;
    assert_eq!(harness.server.scripted.calls(), 1);

    let (status, headers, body) = harness.fetch("/sse?stream_id=r1", &[]).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers.get("content-type").unwrap(), "text/event-stream");
    assert_eq!(headers.get("x-stream-id").unwrap(), "r1");
    assert!(body == terminal, "replay {}", show(&body));
    assert_eq!(harness.server.scripted.calls(), 1);
}

async fn last_event_id_selects_replay(backend: Backend) {
    let harness = Harness::on(backend, |layer| layer).await;
    let terminal: &[u8] =
        b"id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";
    harness.fetch("/fixed?stream_id=f", &[]).await;
    harness.wait_for_state("f", "completed").await;

    let (status, _, body) = harness
        .fetch("/fixed?stream_id=f", &[("last-event-id", "2")])
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(body.is_empty(), "204 body {}", show(&body));

    let (status, _, body) = harness
        .fetch("/fixed?stream_id=f", &[("last-event-id", "1")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == terminal, "replay {}", show(&body));

    let too_long = "2".repeat(1025);
    let (status, _, body) = harness
        .fetch("/fixed?stream_id=f", &[("last-event-id", &too_long)])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == terminal, "replay {}", show(&body));

    assert_eq!(harness.server.scripted.calls(), 1);
}

// Owners.

async fn other_owner_gets_404(backend: Backend) {
    let harness = Harness::on(backend, |layer| {
        layer.owner_header(HeaderName::from_static("x-user-id"))
    })
    .await;
    let terminal: &[u8] =
        b"id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";
    harness
        .fetch("/fixed?stream_id=o", &[("x-user-id", "alice")])
        .await;
    harness.wait_for_state("o", "completed").await;

    let (status, _, _) = harness
        .fetch("/fixed?stream_id=o", &[("x-user-id", "bob")])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(harness.server.scripted.calls(), 1);

    let (status, _, body) = harness
        .fetch("/fixed?stream_id=o", &[("x-user-id", "alice")])
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == terminal, "replay {}", show(&body));

    let (status, _, _) = harness.fetch("/fixed?stream_id=o", &[]).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(harness.server.scripted.calls(), 1);
}

async fn live_stream_of_other_owner_404(backend: Backend) {
    let harness = Harness::on(backend, |layer| {
        layer.owner_header(HeaderName::from_static("x-user-id"))
    })
    .await;
    let response = harness
        .server
        .client
        .get(harness.server.url("/sse?stream_id=l"))
        .header("x-user-id", "alice")
        .send()
        .await
        .unwrap();
    let stream = ClientStream::new(response, harness.server.scripted.next_stream().await);
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(harness.state("l").await.as_deref(), Some("active"));

    let (status, _, _) = harness
        .fetch("/sse?stream_id=l", &[("x-user-id", "bob")])
        .await;

    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(harness.server.scripted.calls(), 1);
    stream.finish().await;
}

// Conflicts.

async fn live_id_gets_409(backend: Backend) {
    let harness = Harness::on(backend, |layer| layer).await;
    let stream = harness.open("/sse?stream_id=live-1").await;
    assert_eq!(stream.status, StatusCode::OK);

    let (status, headers, body) = harness.fetch("/sse?stream_id=live-1", &[]).await;

    assert_eq!(status, StatusCode::CONFLICT);
    let content_type = headers.get("content-type").unwrap().to_str().unwrap();
    assert!(
        content_type.starts_with("text/plain"),
        "content-type {content_type}"
    );
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert!(text.contains("live-1"), "409 body {text:?}");
    assert_eq!(harness.server.scripted.calls(), 1);
    stream.finish().await;
}

// Responses that are not event streams.

async fn json_response_passes_through(backend: Backend) {
    let harness = Harness::on(backend, |layer| layer).await;

    let (status, headers, body) = harness.fetch("/json?stream_id=x", &[]).await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(&body[..], b"{\"ok\":true,\"bytes\":\"\\u0000\\r\\n\"}");
    assert_eq!(headers.get("x-inner").unwrap(), "kept");
    assert_eq!(headers.get("content-type").unwrap(), "application/json");
    assert!(headers.get("x-stream-id").is_none());
    assert!(headers.get("cache-control").is_none());
    assert!(headers.get("x-accel-buffering").is_none());
    harness.wait_for_no_key("x").await;

    let stream = harness.open("/sse?stream_id=x").await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(harness.state("x").await.as_deref(), Some("active"));
    assert_eq!(harness.server.scripted.calls(), 2);
    stream.finish().await;
}

#[tokio::test]
async fn plain_text_stream_passes_through() {
    let harness = Harness::with_fast_heartbeats("plain_text").await;
    let mut stream = harness
        .open("/sse?stream_id=y&content_type=text/plain")
        .await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.headers.get("content-type").unwrap(), "text/plain");
    assert!(stream.headers.get("x-accel-buffering").is_none());

    stream.idle().await;
    stream.send(b"data: {\"type\":\"completed\"}\n\n").await;
    stream.idle().await;
    harness.wait_for_no_key("y").await;
    let (input, output) = stream.finish().await;

    assert!(output == input, "output {}", show(&output));
    let again = harness.open("/sse?stream_id=y").await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(harness.state("y").await.as_deref(), Some("active"));
    again.finish().await;
}

#[tokio::test]
async fn content_type_matched_without_case() {
    let harness = Harness::with_fast_heartbeats("mime_case").await;
    let mut stream = harness
        .open("/sse?stream_id=m&content_type=Text%2FEvent-Stream%3B%20charset%3Dutf-8")
        .await;
    assert_eq!(
        stream.headers.get("content-type").unwrap(),
        "Text/Event-Stream; charset=utf-8"
    );
    assert_eq!(harness.state("m").await.as_deref(), Some("active"));

    stream.idle().await;
    assert!(
        contains(&stream.received_so_far(), HEARTBEAT),
        "no heartbeat while idle: {}",
        show(&stream.received_so_far())
    );
    stream.send(b"event: completed\ndata: {}\n\n").await;
    harness.wait_for_state("m", "completed").await;
    let (input, output) = stream.finish().await;

    assert_heartbeats_only_between_events(&input, &output);
}

// Stream ids.

#[tokio::test]
async fn invalid_ids_get_400() {
    let harness = Harness::start("invalid_ids", |layer| layer).await;
    let too_long = "a".repeat(129);
    let queries = [
        too_long.as_str(),
        "a*b",
        "a%7Bb%7D",
        "a%20b",
        "..%2F",
        "",
        "%C3%A9",
    ];

    for query in queries {
        let (status, headers, body) = harness.fetch(&format!("/sse?stream_id={query}"), &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "stream_id={query}");
        let content_type = headers.get("content-type").unwrap().to_str().unwrap();
        assert!(
            content_type.starts_with("text/plain"),
            "stream_id={query}: content-type {content_type}"
        );
        let text = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            text.starts_with("invalid stream id"),
            "stream_id={query}: body {text:?}"
        );
    }

    let (mut conn, prefix) = harness.backend.redis_parts();
    assert_eq!(keys_under(&mut conn, prefix).await, Vec::<String>::new());
    assert_eq!(harness.server.scripted.calls(), 0);
}

#[tokio::test]
async fn max_length_id_accepted() {
    let harness = Harness::start("max_id", |layer| layer).await;
    let alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-";
    let id: String = alphabet.chars().cycle().take(128).collect();

    let (status, _, _) = harness.fetch(&format!("/fixed?stream_id={id}"), &[]).await;

    assert_eq!(status, StatusCode::OK);
    harness.wait_for_state(&id, "completed").await;
    assert_eq!(harness.server.scripted.calls(), 1);
}

#[tokio::test]
async fn missing_id_gets_generated_id() {
    let harness = Harness::start("generated_id", |layer| layer).await;
    let response = harness
        .server
        .client
        .get(harness.server.url("/sse"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    let stream = ClientStream::new(response, harness.server.scripted.next_stream().await);
    assert_eq!(stream.status, StatusCode::OK);

    let id = stream
        .headers
        .get("x-stream-id")
        .expect("missing x-stream-id header")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 32, "id {id:?}");
    assert!(
        id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "id {id:?}"
    );
    assert_eq!(harness.state(&id).await.as_deref(), Some("active"));
    assert_eq!(harness.field(&id, "id").await.as_deref(), Some(id.as_str()));
    stream.finish().await;
}

#[tokio::test]
async fn missing_id_without_accept_passes_through() {
    let harness = Harness::start("no_id_no_accept", |layer| layer).await;

    let (status, headers, body) = harness.fetch("/fixed", &[]).await;

    assert_eq!(status, StatusCode::OK);
    assert!(headers.get("x-stream-id").is_none());
    assert!(body.ends_with(b"\n\n"), "body {}", show(&body));
    assert_eq!(harness.server.scripted.calls(), 1);
}

#[tokio::test]
async fn other_methods_pass_through() {
    let harness = Harness::start("other_methods", |layer| layer).await;
    harness.fetch("/fixed?stream_id=d", &[]).await;
    harness.wait_for_state("d", "completed").await;

    for method in [reqwest::Method::DELETE, reqwest::Method::PUT] {
        let response = harness
            .server
            .client
            .request(method.clone(), harness.server.url("/fixed?stream_id=d"))
            .send()
            .await
            .unwrap();
        // The app has no such route: its 405, not the layer's replay.
        assert_eq!(
            response.status(),
            StatusCode::METHOD_NOT_ALLOWED,
            "{method}"
        );
        assert!(response.headers().get("x-stream-id").is_none(), "{method}");
    }
    assert_eq!(harness.state("d").await.as_deref(), Some("completed"));
}

#[tokio::test]
async fn dot_segment_ids_rejected() {
    let harness = Harness::start("dot_ids", |layer| layer).await;
    for id in [".", ".."] {
        let (status, _, body) = harness.fetch(&format!("/sse?stream_id={id}"), &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id}");
        assert!(
            String::from_utf8_lossy(&body).contains("path segments"),
            "body {}",
            show(&body)
        );
    }
    assert_eq!(harness.server.scripted.calls(), 0);
}

// Terminal rules.

#[tokio::test]
async fn custom_terminal_rule_event_types() {
    let harness = Harness::start("custom_rule", |layer| {
        layer.terminal_rule(TerminalRule::event_types(["done"], ["error"]))
    })
    .await;
    let terminal: &[u8] = b"event: done\ndata: ok\n\n";
    let mut stream = harness.open("/sse?stream_id=c").await;

    // Not terminal under this rule.
    stream
        .send(b"event: completed\ndata: {\"type\":\"completed\"}\n\n")
        .await;
    stream.send(terminal).await;
    harness.wait_for_state("c", "completed").await;
    stream.finish().await;

    assert_eq!(
        harness
            .field("c", "terminal_event")
            .await
            .as_deref()
            .map(str::as_bytes),
        Some(terminal)
    );
}
