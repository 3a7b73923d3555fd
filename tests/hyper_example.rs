//! The hyper example served on a loopback port with real Redis and real
//! HTTP clients, and the frames of hyper responses through the layer.

mod common;

#[allow(dead_code)]
#[path = "../examples/hyper.rs"]
mod example;

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::{
    client::legacy::Client,
    rt::{TokioExecutor, TokioIo},
    service::TowerToHyperService,
};
use sse_resilience::SseResilienceLayer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

use common::{contains, eventually, keys_under, read_until, redis, stream_field, unique_prefix};

/// The example's server on a loopback port, stopped on drop.
struct ExampleServer {
    addr: SocketAddr,
    prefix: String,
    client: reqwest::Client,
    stop: CancellationToken,
}

impl ExampleServer {
    async fn start(
        test: &str,
        configure: impl FnOnce(SseResilienceLayer) -> SseResilienceLayer,
    ) -> Self {
        let prefix = unique_prefix(test);
        let layer = configure(SseResilienceLayer::new(redis().await).key_prefix(&prefix));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(example::serve(
            listener,
            layer,
            stop.clone().cancelled_owned(),
        ));
        Self {
            addr,
            prefix,
            client: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()
                .unwrap(),
            stop,
        }
    }

    async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("http://{}{path}", self.addr))
            .send()
            .await
            .unwrap()
    }

    async fn wait_for_state(&self, id: &str, expected: &str) {
        let conn = redis().await;
        eventually(&format!("stream {id} reaches state {expected}"), || {
            let mut conn = conn.clone();
            async move {
                stream_field(&mut conn, &self.prefix, id, "state")
                    .await
                    .as_deref()
                    == Some(expected)
            }
        })
        .await;
    }
}

impl Drop for ExampleServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test]
async fn stream_completes_then_replays() {
    let server = ExampleServer::start("hyper_replay", |layer| layer).await;

    let response = server.get("/events/job-1?count=3&delay_ms=5").await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["x-stream-id"], "job-1");
    let body = response.text().await.unwrap();
    let completed = "id: 4\nevent: completed\ndata: {\"tokens\":3}\n\n";
    assert!(
        body.contains("id: 3\ndata: {\"type\":\"token\",\"n\":3}\n\n"),
        "body {body:?}"
    );
    assert!(body.ends_with(completed), "body {body:?}");
    server.wait_for_state("job-1", "completed").await;

    let replay = server.get("/events/job-1").await;
    assert_eq!(replay.status(), StatusCode::OK);
    assert_eq!(replay.headers()["cache-control"], "no-cache");
    assert_eq!(replay.text().await.unwrap(), completed);
}

#[tokio::test]
async fn dropped_client_result_is_recorded() {
    let server = ExampleServer::start("hyper_drain", |layer| layer).await;

    let mut response = server.get("/events/job-2?count=5&delay_ms=50").await;
    let first = read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    assert!(first.starts_with(b"id: 1\n"), "first bytes {first:?}");
    drop(response);

    server.wait_for_state("job-2", "completed").await;
    let replay = server.get("/events/job-2").await.text().await.unwrap();
    assert_eq!(replay, "id: 6\nevent: completed\ndata: {\"tokens\":5}\n\n");
}

#[tokio::test]
async fn idle_stream_gets_heartbeats() {
    let server = ExampleServer::start("hyper_heartbeat", |layer| {
        layer.heartbeat_interval(Duration::from_millis(50))
    })
    .await;

    let mut response = server.get("/events/job-3?count=1&delay_ms=400").await;
    let bytes = read_until(&mut response, |bytes| contains(bytes, b"event: completed")).await;
    let first_event = bytes
        .windows(4)
        .position(|w| w == b"id: ")
        .expect("no event arrived");
    assert!(
        contains(&bytes[..first_event], b":heartbeat\n\n"),
        "no heartbeat before the first event: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn other_paths_skip_redis() {
    let server = ExampleServer::start("hyper_other", |layer| layer).await;

    let response = server.get("/healthz").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.headers().get("cache-control").is_none());
    let mut conn = redis().await;
    assert!(keys_under(&mut conn, &server.prefix).await.is_empty());
}

// Frames: hyper responses over HTTP/2, where trailers reach the client.

/// Starts an HTTP/2 server whose inner service responds to every request with
/// `content_type`, the data frames `data` and the trailer `x-checksum: abc`.
async fn serve_with_trailers(
    layer: SseResilienceLayer,
    content_type: &'static str,
    data: &'static [&'static str],
) -> (SocketAddr, CancellationToken) {
    let service = ServiceBuilder::new().layer(layer).service_fn(
        move |_request: Request<Incoming>| async move {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-checksum", HeaderValue::from_static("abc"));
            let frames = data
                .iter()
                .map(|piece| Ok::<_, Infallible>(Frame::data(Bytes::from_static(piece.as_bytes()))))
                .chain([Ok(Frame::trailers(trailers))]);
            let mut response = Response::new(StreamBody::new(stream::iter(frames)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
            Ok::<_, Infallible>(response)
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let stopped = stop.clone();
    tokio::spawn(async move {
        loop {
            let (socket, _) = tokio::select! {
                accepted = listener.accept() => accepted.unwrap(),
                () = stopped.cancelled() => return,
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(socket), service),
            );
        }
    });
    (addr, stop)
}

/// Sends a GET over HTTP/2 and returns the response head, its data and its trailers.
async fn get_frames(
    addr: SocketAddr,
    path: &str,
) -> (http::response::Parts, Vec<u8>, Option<HeaderMap>) {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Empty<Bytes>>();
    let response = client
        .get(format!("http://{addr}{path}").parse().unwrap())
        .await
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    (parts, data, trailers)
}

#[tokio::test]
async fn event_stream_keeps_trailers() {
    let prefix = unique_prefix("hyper_trailers_sse");
    let layer = SseResilienceLayer::new(redis().await).key_prefix(&prefix);
    let data: &[&str] = &["id: 1\ndata: a\n\n", "event: completed\ndata: {}\n\n"];
    let (addr, stop) = serve_with_trailers(layer, "text/event-stream", data).await;

    let (parts, body, trailers) = get_frames(addr, "/events?stream_id=t-1").await;

    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["cache-control"], "no-cache");
    assert_eq!(body, data.concat().as_bytes());
    let trailers = trailers.expect("the trailers were dropped");
    assert_eq!(trailers["x-checksum"], "abc");
    let mut conn = redis().await;
    eventually("stream t-1 completes", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            stream_field(&mut conn, &prefix, "t-1", "state")
                .await
                .as_deref()
                == Some("completed")
        }
    })
    .await;
    assert!(
        stream_field(&mut conn, &prefix, "t-1", "terminal_event")
            .await
            .is_some()
    );
    stop.cancel();
}

#[tokio::test]
async fn other_response_keeps_trailers() {
    let prefix = unique_prefix("hyper_trailers_json");
    let layer = SseResilienceLayer::new(redis().await).key_prefix(&prefix);
    let data: &[&str] = &["{\"a\":", "1}"];
    let (addr, stop) = serve_with_trailers(layer, "application/json", data).await;

    let (parts, body, trailers) = get_frames(addr, "/json?stream_id=t-2").await;

    assert_eq!(parts.status, StatusCode::OK);
    assert_eq!(parts.headers["content-type"], "application/json");
    assert!(parts.headers.get("cache-control").is_none());
    assert!(parts.headers.get("x-stream-id").is_none());
    assert_eq!(body, b"{\"a\":1}");
    assert_eq!(
        trailers.expect("the trailers were dropped")["x-checksum"],
        "abc"
    );
    let mut conn = redis().await;
    eventually("the claim of t-2 is released", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { keys_under(&mut conn, &prefix).await.is_empty() }
    })
    .await;
    assert!(
        stream_field(&mut conn, &prefix, "t-2", "state")
            .await
            .is_none()
    );
    stop.cancel();
}
