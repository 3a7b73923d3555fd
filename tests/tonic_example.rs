//! The tonic example served on a loopback port with real Redis: gRPC and
//! gRPC-Web clients get the same responses as from a server without the
//! layer, trailers included, and the SSE route beside them is resilient.

mod common;

#[allow(dead_code)]
#[path = "../examples/tonic.rs"]
mod example;

use std::net::SocketAddr;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Version, header};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use sse_resilience::SseResilienceLayer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_web::GrpcWebClientService;

use common::{eventually, keys_under, redis, stream_field, unique_prefix};

/// The example with the layer, and the same routes without it, each on a
/// loopback port. Both stop on drop.
struct Servers {
    layered: SocketAddr,
    bare: SocketAddr,
    prefix: String,
    stop: CancellationToken,
}

impl Servers {
    async fn start(test: &str) -> Self {
        let prefix = unique_prefix(test);
        let stop = CancellationToken::new();

        let layer = SseResilienceLayer::new(redis().await).key_prefix(&prefix);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let layered = listener.local_addr().unwrap();
        tokio::spawn(example::serve(
            listener,
            layer,
            stop.clone().cancelled_owned(),
        ));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bare = listener.local_addr().unwrap();
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        tokio::spawn(
            Server::builder()
                .accept_http1(true)
                .add_routes(example::routes())
                .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned()),
        );

        Self {
            layered,
            bare,
            prefix,
            stop,
        }
    }

    async fn assert_no_keys(&self) {
        let mut conn = redis().await;
        assert_eq!(
            keys_under(&mut conn, &self.prefix).await,
            Vec::<String>::new()
        );
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One response as the client saw it: head, body bytes and trailers.
#[derive(Debug, PartialEq)]
struct Exchange {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
}

/// Sends one raw POST with `content_type` and `body` over HTTP/2 (`http2`)
/// or HTTP/1.1, and collects every frame of the response.
async fn exchange(
    addr: SocketAddr,
    http2: bool,
    path: &str,
    content_type: &str,
    body: &'static [u8],
) -> Exchange {
    let client = Client::builder(TokioExecutor::new())
        .http2_only(http2)
        .build_http::<Full<Bytes>>();
    let request = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}{path}"))
        .version(if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        })
        .header(header::CONTENT_TYPE, content_type)
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(body)))
        .unwrap();
    let response = client.request(request).await.unwrap();
    let (parts, mut incoming) = response.into_parts();
    let mut body = Vec::new();
    let mut trailers = None;
    while let Some(frame) = incoming.frame().await {
        match frame.unwrap().into_data() {
            Ok(data) => body.extend_from_slice(&data),
            Err(frame) => trailers = frame.into_trailers().ok(),
        }
    }
    let mut headers = parts.headers;
    headers.remove(header::DATE);
    Exchange {
        status: parts.status,
        headers,
        body,
        trailers,
    }
}

/// A gRPC message frame: no compression, length 0, so the empty
/// `HealthCheckRequest` (the server's overall status).
const EMPTY_CHECK: &[u8] = &[0, 0, 0, 0, 0];
/// A gRPC message frame of a `HealthCheckRequest` for the service `nope`.
const UNKNOWN_SERVICE_CHECK: &[u8] = &[0, 0, 0, 0, 6, 0x0a, 4, b'n', b'o', b'p', b'e'];

#[tokio::test]
async fn grpc_client_gets_serving() {
    let servers = Servers::start("tonic_grpc_client").await;

    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", servers.layered))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);

    let status = client
        .check(HealthCheckRequest {
            service: "nope".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    servers.assert_no_keys().await;
}

#[tokio::test]
async fn grpc_web_client_gets_serving() {
    let servers = Servers::start("tonic_grpc_web_client").await;

    let http1 = Client::builder(TokioExecutor::new()).build_http();
    let origin = format!("http://{}", servers.layered).parse().unwrap();
    let mut client = HealthClient::with_origin(GrpcWebClientService::new(http1), origin);
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().status, ServingStatus::Serving as i32);
    servers.assert_no_keys().await;
}

#[tokio::test]
async fn grpc_responses_match_bare_server() {
    let servers = Servers::start("tonic_grpc_frames").await;
    let cases = [
        ("/grpc.health.v1.Health/Check", EMPTY_CHECK),
        ("/grpc.health.v1.Health/Check", UNKNOWN_SERVICE_CHECK),
        ("/grpc.health.v1.Health/Nope", EMPTY_CHECK),
    ];

    for (path, body) in cases {
        let layered = exchange(servers.layered, true, path, "application/grpc", body).await;
        let bare = exchange(servers.bare, true, path, "application/grpc", body).await;
        assert_eq!(layered, bare, "{path} with {body:?}");
    }
    let ok = exchange(
        servers.layered,
        true,
        cases[0].0,
        "application/grpc",
        EMPTY_CHECK,
    )
    .await;
    let trailers = ok.trailers.expect("the gRPC trailers were dropped");
    assert_eq!(trailers["grpc-status"], "0");
    // A serialized `HealthCheckResponse` with status SERVING (1).
    assert_eq!(ok.body, [0, 0, 0, 0, 2, 0x08, 1]);
    let missing = exchange(
        servers.layered,
        true,
        cases[1].0,
        "application/grpc",
        cases[1].1,
    )
    .await;
    let status = missing
        .trailers
        .as_ref()
        .unwrap_or(&missing.headers)
        .get("grpc-status")
        .expect("no grpc-status");
    assert_eq!(status, "5");
    servers.assert_no_keys().await;
}

#[tokio::test]
async fn grpc_web_responses_match_bare_server() {
    let servers = Servers::start("tonic_grpc_web_frames").await;
    let path = "/grpc.health.v1.Health/Check";

    for content_type in ["application/grpc-web", "application/grpc-web-text"] {
        let body: &'static [u8] = if content_type.ends_with("text") {
            b"AAAAAAA="
        } else {
            EMPTY_CHECK
        };
        let layered = exchange(servers.layered, false, path, content_type, body).await;
        let bare = exchange(servers.bare, false, path, content_type, body).await;
        assert_eq!(layered, bare, "{content_type}");
        assert_eq!(layered.status, StatusCode::OK, "{content_type}");
    }
    let binary = exchange(
        servers.layered,
        false,
        path,
        "application/grpc-web",
        EMPTY_CHECK,
    )
    .await;
    // gRPC-Web carries the trailers in the body: a frame with flag 0x80.
    let trailer_frame = &binary.body[7..];
    assert_eq!(trailer_frame[0], 0x80, "body {:?}", binary.body);
    let trailer_text = String::from_utf8_lossy(&trailer_frame[5..]).to_lowercase();
    assert!(
        trailer_text.contains("grpc-status:0"),
        "trailers {trailer_text:?}"
    );
    servers.assert_no_keys().await;
}

#[tokio::test]
async fn sse_route_completes_then_replays() {
    let servers = Servers::start("tonic_sse").await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/events/job-1?count=2&delay_ms=5", servers.layered);

    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["cache-control"], "no-cache");
    assert_eq!(response.headers()["x-accel-buffering"], "no");
    let body = response.text().await.unwrap();
    let completed = "id: 3\nevent: completed\ndata: {\"tokens\":2}\n\n";
    assert!(body.ends_with(completed), "body {body:?}");

    let conn = redis().await;
    eventually("stream job-1 completes", || {
        let mut conn = conn.clone();
        let prefix = servers.prefix.clone();
        async move {
            stream_field(&mut conn, &prefix, "job-1", "state")
                .await
                .as_deref()
                == Some("completed")
        }
    })
    .await;
    let replay = client.get(&url).send().await.unwrap().text().await.unwrap();
    assert_eq!(replay, completed);
}
