//! Helpers of the resume and shutdown tests: the events of a scripted run, the
//! event log in Redis, and parsing of what a client received.

#![allow(dead_code)]

use std::{collections::HashMap, time::Duration};

use redis::aio::ConnectionManager;
use sse_resilience::{EventLog, EventStreamParser, SseResilienceLayer};

use crate::common::{Backend, TestServer, eventually, read_until, redis, stream_field};

/// Returns token event `n`: `id: n` and JSON data with `"n":n`.
pub fn token(n: u32) -> Vec<u8> {
    format!("id: {n}\ndata: {{\"type\":\"token\",\"n\":{n}}}\n\n").into_bytes()
}

/// Returns a `completed` terminal event with id `n`.
pub fn completed(n: u32) -> Vec<u8> {
    format!("id: {n}\nevent: completed\ndata: {{\"type\":\"completed\"}}\n\n").into_bytes()
}

/// Returns the events of a run: tokens 1 to `tokens`, then `completed` with the next id.
pub fn run_events(tokens: u32) -> Vec<Vec<u8>> {
    let mut events: Vec<Vec<u8>> = (1..=tokens).map(token).collect();
    events.push(completed(tokens + 1));
    events
}

/// Returns the bytes of events `from..=to` (1-based positions) of `events`.
pub fn span(events: &[Vec<u8>], from: usize, to: usize) -> Vec<u8> {
    events[from - 1..to].concat()
}

/// Builds a layer on the test Redis under `prefix` with the event log `log`.
pub async fn log_layer(prefix: &str, log: EventLog) -> SseResilienceLayer {
    SseResilienceLayer::new(redis().await)
        .key_prefix(prefix)
        .event_log(log)
}

/// Returns the key of the event log of stream `id`.
pub fn log_key(prefix: &str, id: &str) -> String {
    format!("{prefix}{{{id}}}:log")
}

/// One entry of a stream's event log.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub event_id: String,
    pub event: Vec<u8>,
    pub terminal: bool,
}

/// Reads the whole event log of stream `id`.
pub async fn log_entries(conn: &mut ConnectionManager, prefix: &str, id: &str) -> Vec<LogEntry> {
    let entries: Vec<(String, HashMap<String, Vec<u8>>)> = redis::cmd("XRANGE")
        .arg(log_key(prefix, id))
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE of the event log failed");
    entries
        .into_iter()
        .map(|(_, fields)| LogEntry {
            event_id: String::from_utf8_lossy(fields.get("i").map_or(&[][..], |v| v)).into_owned(),
            event: fields.get("e").cloned().unwrap_or_default(),
            terminal: fields.get("t").is_some_and(|v| v == b"1"),
        })
        .collect()
}

/// Waits until the event log of stream `id` has an entry for event `event_id`.
pub async fn wait_for_logged(conn: &ConnectionManager, prefix: &str, id: &str, event_id: &str) {
    wait_for_logged_on(&redis_backend(conn, prefix), id, event_id).await;
}

/// Waits until the event log of stream `id` has its terminal entry.
pub async fn wait_for_terminal_logged(conn: &ConnectionManager, prefix: &str, id: &str) {
    wait_for_terminal_logged_on(&redis_backend(conn, prefix), id).await;
}

fn redis_backend(conn: &ConnectionManager, prefix: &str) -> Backend {
    Backend::Redis {
        conn: conn.clone(),
        layer_conn: conn.clone(),
        prefix: prefix.to_owned(),
    }
}

/// Waits until the event log of stream `id` on `backend` has an entry for event `event_id`.
pub async fn wait_for_logged_on(backend: &Backend, id: &str, event_id: &str) {
    let what = format!("event {event_id} of stream {id} is in the event log");
    eventually(&what, || async move {
        backend
            .logged_events(id)
            .await
            .iter()
            .any(|(logged, _)| logged == event_id)
    })
    .await;
}

/// Waits until the event log of stream `id` on `backend` has its terminal entry.
pub async fn wait_for_terminal_logged_on(backend: &Backend, id: &str) {
    let what = format!("the terminal event of stream {id} is in the event log");
    eventually(&what, || async move {
        backend
            .logged_events(id)
            .await
            .iter()
            .any(|(_, terminal)| *terminal)
    })
    .await;
}

/// Waits until stream `id` has state `expected` in its hash.
pub async fn wait_for_state(conn: &ConnectionManager, prefix: &str, id: &str, expected: &str) {
    let what = format!("stream {id} has state {expected}");
    eventually(&what, || {
        let mut conn = conn.clone();
        let (prefix, id, expected) = (prefix.to_owned(), id.to_owned(), expected.to_owned());
        async move {
            stream_field(&mut conn, &prefix, &id, "state")
                .await
                .as_deref()
                == Some(expected.as_str())
        }
    })
    .await;
}

/// One event a client would dispatch, parsed from received bytes.
#[derive(Debug, Clone)]
pub struct ParsedEvent {
    pub event_type: String,
    pub id: Option<String>,
    pub data: String,
    pub raw: Vec<u8>,
}

/// Parses `bytes` into the events a client dispatches, in order.
pub fn parse_events(bytes: &[u8]) -> Vec<ParsedEvent> {
    let mut parser = EventStreamParser::new(1024 * 1024);
    let mut events = Vec::new();
    parser.feed(bytes, |event| {
        events.push(ParsedEvent {
            event_type: event.event_type().to_owned(),
            id: event.id().map(str::to_owned),
            data: event.data().into_owned(),
            raw: event.raw().to_vec(),
        });
    });
    events
}

/// Returns true when `bytes` end at an event boundary.
pub fn ends_at_event_boundary(bytes: &[u8]) -> bool {
    let mut parser = EventStreamParser::new(1024 * 1024);
    parser.feed(bytes, |_| {});
    parser.is_at_event_boundary()
}

/// Returns the position of the first `needle` in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// Renders bytes for assertion messages.
pub fn show(bytes: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(bytes))
}

/// Reads a response body to its end (bounded by `read_until`'s 20 s).
pub async fn read_to_end(response: &mut reqwest::Response) -> Vec<u8> {
    read_until(response, |_| false).await
}

/// Sends a GET request with extra headers.
pub async fn get_with(
    server: &TestServer,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut request = server.client.get(server.url(path_and_query));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    request.send().await.unwrap()
}

/// Returns the `Content-Type` of a response, or "" when it has none.
pub fn content_type(response: &reqwest::Response) -> String {
    response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

/// A small xorshift generator, so a failing run can be repeated from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// Returns a seed from a random UUID.
    pub fn random_seed() -> u64 {
        uuid::Uuid::new_v4().as_u64_pair().0
    }

    /// Returns a number in `0..bound`.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }

    /// Returns a pause of up to `max_ms` milliseconds.
    pub fn pause(&mut self, max_ms: u64) -> Duration {
        Duration::from_millis(self.below(max_ms + 1))
    }
}
