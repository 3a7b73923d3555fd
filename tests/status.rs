//! The recovery status service through a real server, on Redis and on the
//! memory store: states and terminal events, the owner rule, invalid ids and
//! methods, and a store that is down.

mod common;
mod support;

use std::time::Duration;

use axum::Router;
use common::*;
use http::HeaderName;
use reqwest::StatusCode;
use serde_json::{Value, json};
use sse_resilience::{SseResilienceLayer, StreamIdSource};
use support::{RedisProcess, abandon_streams_on};

const TOKEN: &str = "id: 1\ndata: {\"type\":\"token\"}\n\n";
const COMPLETED: &str = "id: 2\nevent: completed\ndata: {\"type\":\"completed\",\n\
                         data: \"text\":\"done\"}\n\n";

/// Starts a server with the stream routes behind `layer` and its status
/// service at `/status/{id}`.
async fn start(layer: SseResilienceLayer) -> TestServer {
    let status = layer
        .status_service()
        .stream_id_source(StreamIdSource::path_segment("/status/"));
    let outside = Router::new().route_service("/status/{id}", status);
    TestServer::start_with(layer, outside).await
}

fn owned_layer(backend: &Backend) -> SseResilienceLayer {
    backend
        .layer()
        .owner_header(HeaderName::from_static("x-user-id"))
        .without_heartbeats()
}

/// Requests the status of `path` with optional owner, and returns the
/// status code and the JSON body, after checking the headers every answer has.
async fn status_of(server: &TestServer, path: &str, owner: Option<&str>) -> (StatusCode, Value) {
    let mut request = server.client.get(server.url(path));
    if let Some(owner) = owner {
        request = request.header("x-user-id", owner);
    }
    let response = request.send().await.unwrap();
    let code = response.status();
    let headers = response.headers().clone();
    assert_eq!(
        headers.get("content-type").unwrap(),
        "application/json",
        "{path}"
    );
    assert_eq!(headers.get("cache-control").unwrap(), "no-store", "{path}");
    let body = response.text().await.unwrap();
    let json = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{path}: body is not JSON ({e}): {body:?}"));
    (code, json)
}

fn assert_times(status: &Value) {
    let started = status["started_at_ms"].as_u64().expect("started_at_ms");
    let refreshed = status["last_refresh_ms"].as_u64().expect("last_refresh_ms");
    assert!(started > 1_600_000_000_000, "started_at_ms {started}");
    assert!(
        refreshed >= started,
        "last_refresh_ms {refreshed} < {started}"
    );
}

backend_tests!(
    status_follows_stream,
    status_of_failed_stream,
    status_of_orphaned_stream,
    status_hides_other_owners,
    status_rejects_bad_requests,
);

async fn status_follows_stream(backend: Backend) {
    let server = start(owned_layer(&backend).stream_type("generation")).await;

    let mut response = server
        .client
        .get(server.url("/sse?stream_id=s1"))
        .header("x-user-id", "alice")
        .send()
        .await
        .unwrap();
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;

    let (code, live) = status_of(&server, "/status/s1", Some("alice")).await;
    assert_eq!(code, StatusCode::OK, "{live}");
    assert_eq!(live["id"], "s1");
    assert_eq!(live["state"], "active");
    assert_eq!(live["type"], "generation");
    assert_eq!(live["terminal"], Value::Null);
    assert_times(&live);

    stream.send(COMPLETED);
    backend.wait_for_state("s1", "completed").await;
    let (code, done) = status_of(&server, "/status/s1", Some("alice")).await;
    assert_eq!(code, StatusCode::OK, "{done}");
    assert_eq!(done["state"], "completed");
    assert_eq!(
        done["terminal"],
        json!({
            "event": "completed",
            "id": "2",
            "data": "{\"type\":\"completed\",\n\"text\":\"done\"}",
            "truncated": false,
        })
    );
    assert_times(&done);
    assert_eq!(
        done.as_object().unwrap().len(),
        6,
        "unexpected fields in {done}"
    );
}

async fn status_of_failed_stream(backend: Backend) {
    let server = start(backend.layer().without_heartbeats()).await;
    let mut response = server.get("/sse?stream_id=f1").await;
    let stream = server.scripted.next_stream().await;
    stream.send(TOKEN);
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    stream.fail();
    backend.wait_for_state("f1", "failed").await;

    // A stream without an owner is visible to any caller.
    let (code, failed) = status_of(&server, "/status/f1", Some("anyone")).await;
    assert_eq!(code, StatusCode::OK, "{failed}");
    assert_eq!(failed["state"], "failed");
    let terminal = &failed["terminal"];
    assert_eq!(terminal["event"], "failed");
    assert_eq!(terminal["id"], "_end");
    assert_eq!(terminal["truncated"], false);
    let data: Value = serde_json::from_str(terminal["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["reason"], "body_error");
    assert_eq!(data["stream_id"], "f1");
}

async fn status_of_orphaned_stream(backend: Backend) {
    let stale = Duration::from_millis(300);
    abandon_streams_on(&backend, &["o1".to_owned()], stale).await;
    let server = start(backend.layer()).await;
    let (code, live) = status_of(&server, "/status/o1", None).await;
    assert_eq!(code, StatusCode::OK, "{live}");
    assert_eq!(live["state"], "active");

    let guardian = backend.guardian().stale_threshold(stale);
    eventually("stream o1 is orphaned", || {
        let guardian = guardian.clone();
        async move { !guardian.sweep().await.unwrap().orphaned.is_empty() }
    })
    .await;
    let (code, orphaned) = status_of(&server, "/status/o1", None).await;
    assert_eq!(code, StatusCode::OK, "{orphaned}");
    assert_eq!(orphaned["state"], "orphaned");
    assert_eq!(orphaned["terminal"]["event"], "failed");
    assert_eq!(orphaned["terminal"]["id"], "_end");
    let data: Value = serde_json::from_str(orphaned["terminal"]["data"].as_str().unwrap()).unwrap();
    assert_eq!(data["reason"], "orphaned");
}

async fn status_hides_other_owners(backend: Backend) {
    let server = start(owned_layer(&backend)).await;
    let response = server
        .client
        .get(server.url("/fixed?stream_id=mine"))
        .header("x-user-id", "alice")
        .send()
        .await
        .unwrap();
    response.bytes().await.unwrap();
    backend.wait_for_state("mine", "completed").await;

    let (code, own) = status_of(&server, "/status/mine", Some("alice")).await;
    assert_eq!(code, StatusCode::OK, "{own}");
    assert_eq!(own["state"], "completed");

    let not_found = json!({ "error": "not found" });
    for owner in [Some("bob"), None] {
        let (code, other) = status_of(&server, "/status/mine", owner).await;
        assert_eq!(code, StatusCode::NOT_FOUND, "owner {owner:?}");
        assert_eq!(other, not_found, "owner {owner:?}");
    }
    let (code, unknown) = status_of(&server, "/status/nobody-has-this", Some("alice")).await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(unknown, not_found);
}

async fn status_rejects_bad_requests(backend: Backend) {
    let server = start(owned_layer(&backend)).await;
    let too_long = "a".repeat(129);
    for (path, reason) in [
        ("/status/a*b", "invalid stream id: character '*'"),
        ("/status/a%7Bb%7D", "invalid stream id: character '{'"),
        ("/status/%C3%A9", "invalid stream id: character 'é'"),
        (
            &format!("/status/{too_long}"),
            "invalid stream id: it is 129 bytes",
        ),
    ] {
        let (code, body) = status_of(&server, path, Some("alice")).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{path}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(reason), "{path}: error {error:?}");
    }

    let (code, body) = status_of(&server, "/status/ok", Some("a b")).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(
        body["error"].as_str().unwrap().starts_with("invalid owner"),
        "{body}"
    );

    let post = server
        .client
        .post(server.url("/status/ok"))
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers().get("allow").unwrap(), "GET, HEAD");
    assert_eq!(server.scripted.calls(), 0);
    assert!(
        backend.stream_ids().await.is_empty(),
        "a status request wrote a stream"
    );
}

#[tokio::test]
async fn status_503_when_redis_down() {
    let mut redis_process = RedisProcess::start();
    let layer = SseResilienceLayer::new(redis_process.connect().await)
        .key_prefix(&unique_prefix("status_down"))
        .redis_timeout(Duration::from_millis(300))
        .without_heartbeats();
    let server = start(layer.clone()).await;
    server
        .get("/fixed?stream_id=d1")
        .await
        .bytes()
        .await
        .unwrap();
    eventually("stream d1 is completed", || async {
        status_of(&server, "/status/d1", None).await.1["state"] == "completed"
    })
    .await;

    redis_process.kill();
    let (code, body) = status_of(&server, "/status/d1", None).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body, json!({ "error": "store unavailable" }));
    assert!(layer.redis_errors() >= 1, "the failed read was not counted");
}
