//! Hostile input through real servers and a real Redis. The tests cover
//! owners bound by the app's authentication, ids and owners that must never
//! reach a key, and unsafe `Last-Event-ID` values. They also cover huge and
//! malformed bodies, an oversized terminal event, idle upstreams and
//! upstreams that never pause.

mod common;
mod support;

use std::{collections::HashSet, convert::Infallible, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::Request,
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use bytes::Bytes;
use common::*;
use http::{HeaderName, HeaderValue, StatusCode, header};
use sse_resilience::{
    EventLog, OwnerSource, SseResilienceLayer, StreamIdSource, StreamOwner, generate_stream_id,
};
use support::{parse_synthetic, wait_for_state};

const TOKEN: &str = "id: 1\ndata: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 2\nevent: completed\ndata: {\"type\":\"completed\"}\n\n";

async fn field(prefix: &str, id: &str, name: &str) -> Option<String> {
    stream_field(&mut redis().await, prefix, id, name).await
}

async fn get_with(server: &TestServer, path: &str, headers: &[(&str, &[u8])]) -> reqwest::Response {
    let mut request = server.client.get(server.url(path));
    for (name, value) in headers {
        request = request.header(*name, HeaderValue::from_bytes(value).unwrap());
    }
    request.send().await.unwrap()
}

async fn read_to_end(response: &mut reqwest::Response) -> Vec<u8> {
    read_until(response, |_| false).await
}

// Owners.

/// Stands in for an app's authentication: `Authorization: User <name>` sets
/// the stream owner. Real apps verify a credential first.
async fn authenticate(mut request: Request, next: Next) -> Response {
    let user = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("User "))
        .map(str::to_owned);
    if let Some(user) = user {
        request.extensions_mut().insert(StreamOwner(user));
    }
    next.run(request).await
}

async fn finished_stream() -> Response<Body> {
    let mut response = Response::new(Body::from(format!("{TOKEN}{COMPLETED}")));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

#[tokio::test]
async fn extension_owner_guards_streams() {
    let prefix = unique_prefix("owner_extension");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .owner_source(OwnerSource::Extension);
    let app = Router::new()
        .route("/s", get(finished_stream))
        .layer(layer)
        .layer(middleware::from_fn(authenticate));
    let server = TestServer::serve(app, Scripted::default()).await;
    let alice: &[(&str, &[u8])] = &[("authorization", b"User alice")];
    let bob: &[(&str, &[u8])] = &[("authorization", b"User bob")];

    let first = get_with(&server, "/s?stream_id=owned", alice).await;
    assert_eq!(first.status(), StatusCode::OK);
    first.bytes().await.unwrap();
    wait_for_state(&prefix, "owned", "completed").await;
    assert_eq!(
        field(&prefix, "owned", "owner").await.as_deref(),
        Some("alice")
    );

    // Existence is not revealed: another owner and an anonymous request get 404.
    for (who, headers) in [("bob", bob), ("anonymous", &[][..])] {
        let response = get_with(&server, "/s?stream_id=owned", headers).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{who}");
        assert_eq!(
            response.text().await.unwrap(),
            "stream not found\n",
            "{who}"
        );
    }
    let replay = get_with(&server, "/s?stream_id=owned", alice).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.bytes().await.unwrap(), COMPLETED.as_bytes());

    // A stream started without an owner is readable by whoever has its id.
    get_with(&server, "/s?stream_id=open", &[])
        .await
        .bytes()
        .await
        .unwrap();
    wait_for_state(&prefix, "open", "completed").await;
    let replay = get_with(&server, "/s?stream_id=open", bob).await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.bytes().await.unwrap(), COMPLETED.as_bytes());
}

#[test]
fn generated_ids_random_and_long() {
    let ids: HashSet<String> = (0..10_000).map(|_| generate_stream_id()).collect();
    assert_eq!(ids.len(), 10_000);
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
}

// Ids, owners and Last-Event-ID.

#[tokio::test]
async fn hostile_ids_rejected_before_redis() {
    let prefix = unique_prefix("hostile_ids");
    let server =
        TestServer::start(SseResilienceLayer::new(redis().await).key_prefix(&prefix)).await;
    let long = "x".repeat(129);
    let queries = [
        "a%7Db",
        "%7Ba%7D",
        "*",
        "a%2A",
        "%3F",
        "a%5B1%5D",
        "a%20b",
        "a+b",
        "a%0D%0ADEL%20x",
        "a%0A",
        "%00",
        "..%2F..",
        "a%3Ab",
        "%E2%82%AC",
        "%FF",
        long.as_str(),
    ];
    for query in queries {
        let response = server.get(&format!("/sse?stream_id={query}")).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
        assert!(response.headers().get("x-stream-id").is_none(), "{query}");
    }

    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stream_id_source(StreamIdSource::header(HeaderName::from_static("x-id")));
    let by_header = TestServer::start(layer).await;
    let values: [&[u8]; 5] = [b"a b", b"a{b}", b"*", b"\xff\xfe", b"a:b"];
    for value in values {
        let response = get_with(&by_header, "/sse", &[("x-id", value)]).await;
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(value)
        );
    }

    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .stream_id_source(StreamIdSource::path_segment("/s/"));
    let app = Router::new()
        .route("/s/{id}", get(finished_stream))
        .layer(layer);
    let by_path = TestServer::serve(app, Scripted::default()).await;
    for path in ["/s/a%7Bb%7D", "/s/%2A", "/s/a%0Ab", "/s/%25"] {
        assert_eq!(
            by_path.get(path).await.status(),
            StatusCode::BAD_REQUEST,
            "{path}"
        );
    }

    assert_eq!(server.scripted.calls() + by_header.scripted.calls(), 0);
    assert!(keys_under(&mut redis().await, &prefix).await.is_empty());
}

#[tokio::test]
async fn hostile_owners_rejected_or_encoded() {
    let prefix = unique_prefix("hostile_owners");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .owner_header(HeaderName::from_static("x-user-id"))
        .max_streams_per_owner(5);
    let server = TestServer::start(layer).await;

    let long = vec![b'u'; 257];
    let rejected: [&[u8]; 3] = [b"a b", b"caf\xc3\xa9", &long];
    for owner in rejected {
        let response = get_with(&server, "/sse?stream_id=h1", &[("x-user-id", owner)]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.text().await.unwrap().starts_with("invalid owner"));
    }
    assert!(keys_under(&mut redis().await, &prefix).await.is_empty());

    // Braces and glob characters are allowed in owners, but never reach a key raw.
    let response = get_with(&server, "/sse?stream_id=h2", &[("x-user-id", b"a}*{b")]).await;
    assert_eq!(response.status(), StatusCode::OK);
    let _stream = server.scripted.next_stream().await;
    let keys = keys_under(&mut redis().await, &prefix).await;
    assert!(
        keys.contains(&format!("{prefix}owner:{{a%7D%2A%7Bb}}")),
        "{keys:?}"
    );
    assert!(keys.iter().all(|key| !key.contains("}*{")), "{keys:?}");
}

#[tokio::test]
async fn unsafe_last_event_ids_ignored() {
    let prefix = unique_prefix("hostile_last_event_id");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .event_log(EventLog::new());
    let server = TestServer::start(layer).await;
    let terminal: &[u8] =
        b"id: 2\nevent: completed\ndata: {\"type\":\"completed\",\"text\":\"done\"}\n\n";
    server
        .get("/fixed?stream_id=l1")
        .await
        .bytes()
        .await
        .unwrap();
    wait_for_state(&prefix, "l1", "completed").await;

    // The terminal event's own id, once valid, gets 204.
    let valid = server.get("/fixed?stream_id=l1&last_event_id=2").await;
    assert_eq!(valid.status(), StatusCode::NO_CONTENT);

    // With NUL, CR or LF, or too long, it is ignored: the request gets the replay.
    for value in ["2%00", "2%0D", "2%0A", "2%0D%0A", "%0A2"] {
        let response = server
            .get(&format!("/fixed?stream_id=l1&last_event_id={value}"))
            .await;
        assert_eq!(response.status(), StatusCode::OK, "{value}");
        assert_eq!(response.bytes().await.unwrap(), terminal, "{value}");
    }
    // An id of 1,024 bytes is looked up (and not found: a gap event comes
    // first); one byte more and it is ignored.
    let at_cap = "x".repeat(1024);
    let response = get_with(
        &server,
        "/fixed?stream_id=l1",
        &[("last-event-id", at_cap.as_bytes())],
    )
    .await;
    assert!(response.text().await.unwrap().starts_with("event: gap\n"));
    let over_cap = "x".repeat(1025);
    let response = get_with(
        &server,
        "/fixed?stream_id=l1",
        &[("last-event-id", over_cap.as_bytes())],
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.bytes().await.unwrap(), terminal);
    assert_eq!(server.scripted.calls(), 1);
}

// Bodies.

#[tokio::test]
async fn hostile_bodies_pass_through() {
    let prefix = unique_prefix("hostile_bodies");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .heartbeat_interval(Duration::from_millis(20));
    let server = TestServer::start(layer).await;

    // A 16 MiB data line, sent in 64 KiB frames, then a terminal event.
    let mut response = server.get("/sse?stream_id=b1").await;
    let stream = server.scripted.next_stream().await;
    let mut input = b"data: ".to_vec();
    stream.send(Bytes::from_static(b"data: "));
    let frame = Bytes::from(vec![b'a'; 64 * 1024]);
    for _ in 0..256 {
        stream.send(frame.clone());
        input.extend_from_slice(&frame);
    }
    let rest = format!("\n\n{COMPLETED}");
    stream.send(rest.clone());
    input.extend_from_slice(rest.as_bytes());
    let output = read_until(&mut response, |bytes| bytes.ends_with(COMPLETED.as_bytes())).await;
    assert!(
        strip_heartbeats(&output) == input,
        "the long line was altered"
    );
    wait_for_state(&prefix, "b1", "completed").await;

    // A body of only CRs: every byte reaches the client, no event, no end.
    let mut response = server.get("/sse?stream_id=b2").await;
    let stream = server.scripted.next_stream().await;
    let crs = Bytes::from(vec![b'\r'; 64 * 1024]);
    for _ in 0..64 {
        stream.send(crs.clone());
    }
    drop(stream);
    let output = read_to_end(&mut response).await;
    assert_eq!(strip_heartbeats(&output).len(), 64 * 64 * 1024);
    wait_for_state(&prefix, "b2", "failed").await;
    assert_eq!(
        field(&prefix, "b2", "reason").await.as_deref(),
        Some("no_terminal_event")
    );

    // 200,000 tiny events in 1,000-event frames, then a terminal event.
    let mut response = server.get("/sse?stream_id=b3").await;
    let stream = server.scripted.next_stream().await;
    let tiny = Bytes::from("data:x\n\n".repeat(1000));
    for _ in 0..200 {
        stream.send(tiny.clone());
    }
    stream.send(COMPLETED);
    let output = read_until(&mut response, |bytes| bytes.ends_with(COMPLETED.as_bytes())).await;
    assert_eq!(
        strip_heartbeats(&output).len(),
        200 * tiny.len() + COMPLETED.len()
    );
    wait_for_state(&prefix, "b3", "completed").await;
}

#[tokio::test]
async fn oversized_terminal_recorded_truncated() {
    let prefix = unique_prefix("hostile_terminal");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .without_heartbeats()
        .max_event_bytes(1024)
        .event_log(EventLog::new());
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=big").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    let big = format!(
        "id: 2\nevent: completed\ndata: {{\"text\":\"{}\"}}\n\n",
        "x".repeat(5000)
    );
    for piece in big.as_bytes().chunks(700) {
        stream.send(Bytes::copy_from_slice(piece));
    }
    let live = read_until(&mut response, |bytes| bytes.ends_with(big.as_bytes())).await;
    assert!(
        live == format!("{TOKEN}{big}").as_bytes(),
        "the live client lost bytes"
    );

    wait_for_state(&prefix, "big", "completed").await;
    assert_eq!(
        field(&prefix, "big", "truncated").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        field(&prefix, "big", "reason").await.as_deref(),
        Some("truncated")
    );
    assert_eq!(
        field(&prefix, "big", "terminal_id").await.as_deref(),
        Some("2")
    );

    let replay = server.get("/sse?stream_id=big").await;
    assert_eq!(replay.status(), StatusCode::OK);
    let replayed = replay.text().await.unwrap();
    let marker = parse_synthetic(&replayed);
    assert_eq!(marker.event_type, "completed");
    assert_eq!(marker.id, "2");
    assert_eq!(
        marker.data,
        serde_json::json!({"type": "completed", "reason": "truncated", "stream_id": "big"})
    );

    // A client that already has it gets 204; one that resumes gets the marker.
    let done = get_with(&server, "/sse?stream_id=big", &[("last-event-id", b"2")]).await;
    assert_eq!(done.status(), StatusCode::NO_CONTENT);
    let mut resumed = get_with(&server, "/sse?stream_id=big", &[("last-event-id", b"1")]).await;
    assert_eq!(resumed.status(), StatusCode::OK);
    assert_eq!(read_to_end(&mut resumed).await, replayed.as_bytes());
    assert_eq!(server.scripted.calls(), 1);
}

// Idle upstreams and upstreams that never pause.

#[tokio::test]
async fn idle_timeout_ignores_comments() {
    let prefix = unique_prefix("idle_comments");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .heartbeat_interval(Duration::from_millis(50))
        .idle_timeout(Duration::from_millis(400));
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=i1").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    let tx = stream.tx.clone();
    let keep_alive = tokio::spawn(async move {
        while tx.send(Ok(Bytes::from_static(b": keep-alive\n\n"))).is_ok() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let output = read_to_end(&mut response).await;

    assert!(contains(&output, b": keep-alive\n\n"));
    assert!(contains(&output, b":heartbeat\n\n"));
    wait_for_state(&prefix, "i1", "failed").await;
    assert_eq!(
        field(&prefix, "i1", "reason").await.as_deref(),
        Some("idle_timeout")
    );
    let replay = server.get("/sse?stream_id=i1").await.text().await.unwrap();
    assert_eq!(parse_synthetic(&replay).data["reason"], "idle_timeout");
    assert!(
        stream.is_dropped(),
        "the inner body was kept after the idle timeout"
    );
    keep_alive.await.unwrap();
}

#[tokio::test]
async fn events_keep_stream_alive() {
    let prefix = unique_prefix("idle_events");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .without_heartbeats()
        .idle_timeout(Duration::from_millis(400));
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=i2").await;
    let stream = server.scripted.next_stream().await;
    // Twelve events 100 ms apart: three times the idle timeout in all.
    for _ in 0..12 {
        stream.send("data: {\"type\":\"token\"}\n\n");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stream.send(COMPLETED);
    read_until(&mut response, |bytes| bytes.ends_with(COMPLETED.as_bytes())).await;

    wait_for_state(&prefix, "i2", "completed").await;
}

#[tokio::test]
async fn idle_timeout_while_draining() {
    let prefix = unique_prefix("idle_drain");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .without_heartbeats()
        .drain_timeout(Duration::from_secs(60))
        .idle_timeout(Duration::from_millis(400));
    let server = TestServer::start(layer).await;

    let mut response = server.get("/sse?stream_id=i3").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    drop(response);
    stream.send(": still here\n\n");

    wait_for_state(&prefix, "i3", "failed").await;
    assert_eq!(
        field(&prefix, "i3", "reason").await.as_deref(),
        Some("idle_timeout")
    );
}

/// Responds with an event stream that always has a comment frame ready.
async fn flood() -> Response<Body> {
    let frames = futures_util::stream::repeat_with(|| {
        Ok::<_, Infallible>(Bytes::from_static(b": flood\n\n"))
    });
    let mut response = Response::new(Body::from_stream(frames));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response
}

#[tokio::test]
async fn constant_frames_cannot_outlive_limits() {
    let prefix = unique_prefix("flood");
    type Limit = fn(SseResilienceLayer) -> SseResilienceLayer;
    let limits: [(&str, Limit, &str); 2] = [
        (
            "f1",
            |layer| layer.max_stream_lifetime(Duration::from_millis(300)),
            "max_lifetime_exceeded",
        ),
        (
            "f2",
            |layer| layer.idle_timeout(Duration::from_millis(300)),
            "idle_timeout",
        ),
    ];
    for (id, limit, reason) in limits {
        let layer = limit(SseResilienceLayer::new(redis().await).key_prefix(&prefix));
        let app = Router::new().route("/flood", get(flood)).layer(layer);
        let server = TestServer::serve(app, Scripted::default()).await;

        let mut response = server.get(&format!("/flood?stream_id={id}")).await;
        let output = read_to_end(&mut response).await;

        assert!(output.starts_with(b": flood\n\n"));
        wait_for_state(&prefix, id, "failed").await;
        assert_eq!(field(&prefix, id, "reason").await.as_deref(), Some(reason));
    }
}

#[tokio::test]
#[should_panic(expected = "invalid idle_timeout")]
async fn zero_idle_timeout_rejected() {
    let _ = SseResilienceLayer::new(redis().await).idle_timeout(Duration::ZERO);
}
