//! `sse-resilience proxy` in front of a Python SSE backend that does not
//! use the layer: forwarding, replay, drain, heartbeats, a down
//! upstream, and a graceful stop.

mod cli_support;
mod common;
mod support;

use std::time::Duration;

use cli_support::{Backend, Proxy, run_raw};
use common::{contains, eventually, keys_under, read_until, redis, stream_field, unique_prefix};
use support::free_port;

const ID_SOURCE: [&str; 2] = ["--id-source", "path:/stream/"];

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

async fn wait_for_state(prefix: &str, id: &str, expected: &str) {
    let conn = redis().await;
    eventually(&format!("stream {id} reaches state {expected}"), || {
        let mut conn = conn.clone();
        async move {
            stream_field(&mut conn, prefix, id, "state")
                .await
                .as_deref()
                == Some(expected)
        }
    })
    .await;
}

#[tokio::test]
async fn plain_request_is_forwarded() {
    let prefix = unique_prefix("proxy_forward");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;

    let response = client()
        .post(proxy.url("/echo?x=1&y=two%20words"))
        .header("x-custom", "kept")
        .header("connection", "x-hop-only")
        .header("x-hop-only", "dropped")
        .header("x-forwarded-for", "192.0.2.7")
        .body("hello body")
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert!(response.headers().get("x-stream-id").is_none());
    let echo: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo");
    assert_eq!(echo["query"], "x=1&y=two%20words");
    assert_eq!(echo["body"], "hello body");
    let headers = &echo["headers"];
    assert_eq!(headers["x-custom"], "kept");
    assert!(headers.get("x-hop-only").is_none(), "{headers}");
    assert_eq!(headers["x-forwarded-for"], "192.0.2.7, 127.0.0.1");
    assert_eq!(headers["x-forwarded-host"], proxy.addr.to_string());
    assert_eq!(headers["host"], backend.addr.to_string());
    let mut conn = redis().await;
    assert!(keys_under(&mut conn, &prefix).await.is_empty());
}

#[tokio::test]
async fn event_stream_request_gets_identity() {
    let prefix = unique_prefix("proxy_identity");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;

    for (accept, expected) in [
        ("text/event-stream", "identity"),
        ("application/json", "gzip, br"),
    ] {
        let response = client()
            .get(proxy.url("/echo"))
            .header("accept", accept)
            .header("accept-encoding", "gzip, br")
            .send()
            .await
            .unwrap();
        let echo: serde_json::Value =
            serde_json::from_str(&response.text().await.unwrap()).unwrap();
        assert_eq!(
            echo["headers"]["accept-encoding"], expected,
            "accept {accept}"
        );
    }
}

#[tokio::test]
async fn finished_stream_is_replayed() {
    let prefix = unique_prefix("proxy_replay");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;
    let client = client();

    let response = client
        .get(proxy.url("/stream/s-1?count=3&delay_ms=5"))
        .header("accept", "text/event-stream")
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    assert_eq!(headers["x-stream-id"], "s-1");
    let body = response.text().await.unwrap();
    let completed = "id: 4\nevent: completed\ndata: {\"tokens\":3}\n\n";
    assert!(
        body.starts_with("id: 1\ndata: {\"type\":\"token\",\"n\":1}\n\n"),
        "{body:?}"
    );
    assert!(body.ends_with(completed), "{body:?}");
    wait_for_state(&prefix, "s-1", "completed").await;

    let replay = client.get(proxy.url("/stream/s-1")).send().await.unwrap();
    assert_eq!(replay.status(), 200);
    assert_eq!(replay.text().await.unwrap(), completed);
    assert_eq!(backend.calls("s-1").await, 1);
}

#[tokio::test]
async fn dropped_client_stream_is_drained() {
    let prefix = unique_prefix("proxy_drain");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;
    let client = client();

    let mut response = client
        .get(proxy.url("/stream/s-2?count=8&delay_ms=60"))
        .send()
        .await
        .unwrap();
    let first = read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    assert!(first.starts_with(b"id: 1\n"), "{first:?}");
    drop(response);

    wait_for_state(&prefix, "s-2", "completed").await;
    let replay = client.get(proxy.url("/stream/s-2")).send().await.unwrap();
    assert_eq!(
        replay.text().await.unwrap(),
        "id: 9\nevent: completed\ndata: {\"tokens\":8}\n\n"
    );
    assert_eq!(backend.calls("s-2").await, 1);
}

#[tokio::test]
async fn idle_stream_gets_heartbeats() {
    let prefix = unique_prefix("proxy_heartbeat");
    let backend = Backend::start();
    let mut args = ID_SOURCE.to_vec();
    args.extend([
        "--heartbeat-interval",
        "50ms",
        "--heartbeat-comment",
        "ping",
    ]);
    let proxy = Proxy::start(&prefix, &backend.url(), &args).await;

    let mut response = client()
        .get(proxy.url("/stream/s-3?count=1&delay_ms=400"))
        .send()
        .await
        .unwrap();
    let bytes = read_until(&mut response, |bytes| contains(bytes, b"event: completed")).await;

    let first_event = bytes
        .windows(4)
        .position(|window| window == b"id: ")
        .expect("no event arrived");
    assert!(
        contains(&bytes[..first_event], b":ping\n\n"),
        "no heartbeat before the first event: {:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn failed_event_is_recorded() {
    let prefix = unique_prefix("proxy_failed");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;

    let body = client()
        .get(proxy.url("/stream/s-5?count=1&delay_ms=5&fail=1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    assert!(
        body.ends_with("event: failed\ndata: {\"tokens\":1}\n\n"),
        "{body:?}"
    );
    wait_for_state(&prefix, "s-5", "failed").await;
}

#[tokio::test]
async fn unreachable_upstream_gives_502() {
    let prefix = unique_prefix("proxy_502");
    let upstream = format!("http://127.0.0.1:{}", free_port());
    let proxy = Proxy::start(&prefix, &upstream, &ID_SOURCE).await;

    let response = client().get(proxy.url("/stream/s-4")).send().await.unwrap();

    assert_eq!(response.status(), 502);
    assert!(response.headers().get("x-stream-id").is_none());
    let text = response.text().await.unwrap();
    assert!(text.contains(&upstream), "{text:?}");
    assert!(
        text.to_lowercase().contains("connection refused"),
        "{text:?}"
    );
    let conn = redis().await;
    eventually("the claim of s-4 is released", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move { keys_under(&mut conn, &prefix).await.is_empty() }
    })
    .await;
    assert!(proxy.process.logs().contains("upstream request failed"));
}

#[tokio::test]
async fn silent_upstream_gives_504() {
    let prefix = unique_prefix("proxy_504");
    // The upstream accepts connections and never sends a byte back.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = format!("http://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let mut args = ID_SOURCE.to_vec();
    args.extend(["--upstream-timeout", "300ms"]);
    let proxy = Proxy::start(&prefix, &upstream, &args).await;
    let client = client();

    // The same id twice: the first request's claim must not block the second.
    for _ in 0..2 {
        let response = client
            .get(proxy.url("/stream/hang-1"))
            .header("accept", "text/event-stream")
            .timeout(Duration::from_secs(60))
            .send()
            .await
            .expect("the proxy sent no response within 60 s");

        assert_eq!(response.status(), 504);
        assert!(response.headers().get("x-stream-id").is_none());
        let text = response.text().await.unwrap();
        assert!(text.contains(&upstream), "{text:?}");
        assert!(
            text.contains("no response headers within 300ms"),
            "{text:?}"
        );
        let conn = redis().await;
        eventually("the claim of hang-1 is released", || {
            let mut conn = conn.clone();
            let prefix = prefix.clone();
            async move { keys_under(&mut conn, &prefix).await.is_empty() }
        })
        .await;
    }
    let logs = proxy.process.logs();
    assert!(
        logs.contains("upstream sent no response headers in time"),
        "{logs}"
    );
    holder.abort();
}

#[tokio::test]
async fn sigterm_hands_streams_over() {
    let prefix = unique_prefix("proxy_sigterm");
    let backend = Backend::start();
    let mut args = ID_SOURCE.to_vec();
    args.extend(["--shutdown-grace", "200ms", "--shutdown-retry", "3s"]);
    let mut proxy = Proxy::start(&prefix, &backend.url(), &args).await;

    let mut response = client()
        .get(proxy.url("/stream/s-6?count=100&delay_ms=100"))
        .send()
        .await
        .unwrap();
    read_until(&mut response, |bytes| contains(bytes, b"\n\n")).await;
    let status = proxy.process.terminate().await;

    assert!(status.success(), "exit {status}:\n{}", proxy.process.logs());
    let rest = read_until(&mut response, |_| false).await;
    assert!(
        contains(&rest, b"retry: 3000\n\n"),
        "{:?}",
        String::from_utf8_lossy(&rest)
    );
    wait_for_state(&prefix, "s-6", "failed").await;
    let mut conn = redis().await;
    let reason = stream_field(&mut conn, &prefix, "s-6", "reason").await;
    assert_eq!(reason.as_deref(), Some("shutdown"));
    assert!(proxy.process.logs().contains("proxy stopped"));
}

#[tokio::test]
async fn unreachable_redis_stops_start() {
    let redis_url = format!("redis://127.0.0.1:{}", free_port());

    let run = run_raw(&[
        "--redis",
        &redis_url,
        "proxy",
        "--upstream",
        "http://127.0.0.1:9",
    ])
    .await;

    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(
        run.stderr
            .contains(&format!("cannot reach Redis at {redis_url}")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("start Redis or pass --redis"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn bad_flags_are_rejected() {
    let cases: [(&[&str], &str); 5] = [
        (&["proxy"], "--upstream"),
        (
            &["proxy", "--upstream", "https://127.0.0.1:1"],
            "https is not supported",
        ),
        (
            &[
                "proxy",
                "--upstream",
                "http://127.0.0.1:1",
                "--heartbeat-interval",
                "0s",
            ],
            "greater than zero",
        ),
        (
            &[
                "proxy",
                "--upstream",
                "http://127.0.0.1:1",
                "--id-source",
                "cookie:id",
            ],
            "query:NAME, path:PREFIX or header:NAME",
        ),
        (
            &[
                "proxy",
                "--upstream",
                "http://127.0.0.1:1",
                "--heartbeat-comment",
                "a\nb",
            ],
            "CR or LF",
        ),
    ];
    for (args, expected) in cases {
        let run = run_raw(args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
    }
}

#[tokio::test]
async fn redis_password_is_not_printed() {
    let redis_url = format!("redis://:hunter2@127.0.0.1:{}", free_port());

    let run = run_raw(&["--redis", &redis_url, "stats"]).await;

    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(!run.stderr.contains("hunter2"), "{}", run.stderr);
    assert!(
        run.stderr.contains("redis://***@127.0.0.1"),
        "{}",
        run.stderr
    );
}

#[tokio::test]
async fn invalid_id_never_reaches_upstream() {
    let prefix = unique_prefix("proxy_invalid_id");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;

    let response = client()
        .get(proxy.url("/stream/bad%20id"))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 400);
    let text = response.text().await.unwrap();
    assert!(text.contains("invalid stream id"), "{text:?}");
    assert_eq!(backend.calls("bad%20id").await, 0);
    assert_eq!(backend.calls("bad id").await, 0);
    let mut conn = redis().await;
    assert!(keys_under(&mut conn, &prefix).await.is_empty());
}

#[tokio::test]
async fn large_body_is_forwarded_whole() {
    let prefix = unique_prefix("proxy_large_body");
    let backend = Backend::start();
    let proxy = Proxy::start(&prefix, &backend.url(), &ID_SOURCE).await;
    let body: String = (0..(1 << 20))
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();

    let response = client()
        .put(proxy.url("/echo"))
        .body(body.clone())
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 200);
    let echo: serde_json::Value = serde_json::from_str(&response.text().await.unwrap()).unwrap();
    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["body"].as_str().unwrap().len(), body.len());
    assert!(echo["body"] == body.as_str(), "the body changed on the way");
}
