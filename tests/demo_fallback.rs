//! The built demo without Redis: with `REDIS_URL` unset and nothing listening
//! at the probed address, it runs on the memory store, says so in its first
//! log line, and serves streams, replays, status and metrics.
//!
//! `cargo test` builds the demo with the other targets. Run alone, this test
//! needs `cargo build --example demo` first.

mod example_support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    time::Duration,
};

use example_support::example_binary;

/// The demo process, killed on drop.
struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Returns a loopback port that was free a moment ago.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("no free loopback port");
    listener.local_addr().unwrap().port()
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let response = client.get(url).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

#[tokio::test]
async fn demo_runs_on_memory_store() {
    let addr = format!("127.0.0.1:{}", free_port());
    let silent_redis = format!("redis://127.0.0.1:{}", free_port());
    let mut child = Command::new(example_binary("demo"))
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .env("REDIS_PROBE_URL", &silent_redis)
        .env("ADDR", &addr)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("failed to start the demo");
    let stdout = child.stdout.take().unwrap();
    let _demo = Demo(child);

    // The first log line names the store; the rest is drained so the demo never blocks on it.
    let first_line = tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next();
        std::thread::spawn(move || lines.for_each(drop));
        first
    })
    .await
    .unwrap()
    .expect("the demo wrote no log line")
    .unwrap();
    assert!(
        first_line.contains("using the in-memory store"),
        "first log line {first_line:?}"
    );
    assert!(
        first_line.contains(&silent_redis),
        "first log line {first_line:?} does not name the probed address"
    );
    assert!(
        first_line.contains("Connection refused"),
        "first log line {first_line:?} does not give the probe's error"
    );

    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut up = false;
    for _ in 0..250 {
        if client.get(format!("{base}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(up, "the demo never answered on {addr}");

    let (status, run) = get(
        &client,
        &format!("{base}/api/stream/m1?tokens=2&delay_ms=5"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(run.contains("event: completed"), "run {run:?}");

    let mut status_json = serde_json::Value::Null;
    for _ in 0..250 {
        let (code, body) = get(&client, &format!("{base}/api/status/m1")).await;
        assert_eq!(code, 200, "status {body}");
        status_json = serde_json::from_str(&body).unwrap();
        if status_json["state"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status_json["state"], "completed", "{status_json}");
    assert_eq!(status_json["terminal"]["event"], "completed");

    let (status, replay) = get(&client, &format!("{base}/api/stream/m1")).await;
    assert_eq!(status, 200);
    assert!(
        replay.starts_with("event: completed"),
        "replay from the memory store {replay:?}"
    );

    let (status, metrics) = get(&client, &format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for line in [
        "sse_resilience_streams_opened_total 1",
        "sse_resilience_streams_completed_total 1",
        "sse_resilience_replays_served_total 1",
        "sse_resilience_streams_live 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in {metrics}"
        );
    }
}
