//! The operator commands of the `sse-resilience` binary against real Redis:
//! `streams list`, `streams show`, `stats` and `guardian`, on streams made by
//! a real server, a crashed one, and a cluster.

mod cli_support;
mod cluster_support;
mod common;
mod support;

use std::time::Duration;

use http::HeaderName;
use serde_json::Value;
use sse_resilience::SseResilienceLayer;

use cli_support::{Process, run, run_closing_stdout, run_raw};
use cluster_support::shared_cluster;
use common::{TestServer, contains, read_until, redis, unique_prefix};
use support::{abandon_streams, free_port, wait_for_state};

/// Stale threshold of the abandoned streams.
const STALE: Duration = Duration::from_millis(600);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|error| panic!("not JSON ({error}): {text:?}"))
}

#[tokio::test]
async fn list_show_stats_print_streams() {
    let prefix = unique_prefix("cli_streams");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .owner_header(HeaderName::from_static("x-user"))
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    server
        .get("/fixed?stream_id=done-1")
        .await
        .bytes()
        .await
        .unwrap();
    wait_for_state(&prefix, "done-1", "completed").await;
    let mut live = server
        .client
        .get(server.url("/sse?stream_id=live-1"))
        .header("x-user", "alice")
        .send()
        .await
        .unwrap();
    let inner = server.scripted.next_stream().await;
    inner.send("data: 1\n\n");
    read_until(&mut live, |bytes| contains(bytes, b"\n\n")).await;

    let listed = run(&prefix, &["streams", "list", "--json"]).await;
    assert_eq!(listed.code, Some(0), "{listed:?}");
    let listed = json(&listed.stdout);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2);
    let live_entry = listed.iter().find(|s| s["id"] == "live-1").unwrap();
    assert_eq!(live_entry["state"], "live");
    assert_eq!(live_entry["owner"], "alice");
    assert_eq!(live_entry["type"], "sse");
    assert!(live_entry["since_refresh_ms"].is_u64());
    let done_entry = listed.iter().find(|s| s["id"] == "done-1").unwrap();
    assert_eq!(done_entry["state"], "completed");
    assert!(done_entry["owner"].is_null());

    let live_only = json(
        &run(&prefix, &["streams", "list", "--state", "live", "--json"])
            .await
            .stdout,
    );
    assert_eq!(live_only.as_array().unwrap().len(), 1);
    let finished = json(
        &run(
            &prefix,
            &["streams", "list", "--state", "finished", "--json"],
        )
        .await
        .stdout,
    );
    assert_eq!(finished[0]["id"], "done-1");

    let table = run(&prefix, &["streams", "list"]).await;
    assert_eq!(table.code, Some(0), "{table:?}");
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert!(lines[0].starts_with("ID"), "{}", table.stdout);
    assert!(lines[0].contains("REFRESHED"), "{}", table.stdout);
    let live_line = lines
        .iter()
        .find(|line| line.starts_with("live-1"))
        .unwrap();
    assert!(live_line.contains("alice"), "{live_line}");

    let shown = run(&prefix, &["streams", "show", "done-1", "--json"]).await;
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let shown = json(&shown.stdout);
    assert_eq!(shown["state"], "completed");
    assert_eq!(shown["terminal_id"], "2");
    assert!(
        shown["terminal_event"]
            .as_str()
            .unwrap()
            .starts_with("id: 2\nevent: completed\n")
    );
    let text = run(&prefix, &["streams", "show", "done-1"]).await.stdout;
    assert!(
        text.contains("terminal event (id 2):\n  id: 2\n  event: completed\n"),
        "{text}"
    );
    let text = run(&prefix, &["streams", "show", "live-1"]).await.stdout;
    assert!(text.contains("terminal event: none yet"), "{text}");

    let stats = run(&prefix, &["stats", "--json"]).await;
    assert_eq!(stats.code, Some(0), "{stats:?}");
    let stats = json(&stats.stdout);
    assert_eq!(stats["live"], 1);
    assert_eq!(stats["completed"], 1);
    assert_eq!(stats["total"], 2);
    let text = run(&prefix, &["stats"]).await.stdout;
    assert!(text.contains("live          1\n"), "{text}");

    let missing = run(&prefix, &["streams", "show", "nope-1"]).await;
    assert_eq!(missing.code, Some(1));
    assert!(
        missing.stderr.contains("stream nope-1 not found"),
        "{}",
        missing.stderr
    );
    assert!(missing.stdout.is_empty());
    drop(inner);
}

/// Size of the data of the terminal event of `closed_stdout_exits_quietly`:
/// far above the 64 KiB a Linux pipe buffers, so `streams show` is still
/// writing when the reader closes the pipe.
const LARGE_EVENT_BYTES: usize = 512 * 1024;

/// Checks that a command whose stdout reader went away exited with status 0
/// and without a panic.
fn assert_quiet_exit(args: &[&str], run: &cli_support::Run) {
    assert!(!run.stderr.contains("panicked"), "{args:?}: {}", run.stderr);
    assert!(
        !run.stderr.contains("Broken pipe"),
        "{args:?}: {}",
        run.stderr
    );
    assert_eq!(run.code, Some(0), "{args:?}: {run:?}");
}

#[tokio::test]
async fn closed_stdout_exits_quietly() {
    let prefix = unique_prefix("cli_closed_stdout");
    let layer = SseResilienceLayer::new(redis().await)
        .key_prefix(&prefix)
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let response = server.get("/sse?stream_id=big-1").await;
    let inner = server.scripted.next_stream().await;
    inner.send(format!(
        "event: completed\ndata: {}\n\n",
        "x".repeat(LARGE_EVENT_BYTES)
    ));
    drop(inner);
    response.bytes().await.unwrap();
    wait_for_state(&prefix, "big-1", "completed").await;

    // The reader takes a few bytes and leaves, as `| head -c 600` does.
    for args in [
        &["streams", "show", "big-1"][..],
        &["streams", "show", "big-1", "--json"],
    ] {
        let run = run_closing_stdout(&prefix, args, 600).await;
        assert_quiet_exit(args, &run);
        assert_eq!(run.stdout.len(), 600, "{args:?}");
    }

    // The reader is gone before the first write, in text and in JSON.
    for args in [
        &["streams", "list"][..],
        &["streams", "list", "--json"],
        &["streams", "show", "big-1"],
        &["streams", "show", "big-1", "--json"],
        &["stats"],
        &["stats", "--json"],
        &["guardian", "--once"],
        &["guardian", "--once", "--json"],
    ] {
        let run = run_closing_stdout(&prefix, args, 0).await;
        assert_quiet_exit(args, &run);
    }
}

#[tokio::test]
async fn guardian_once_orphans_stale() {
    let prefix = unique_prefix("cli_guardian_once");
    abandon_streams(&prefix, &["gone-1".to_owned()], STALE).await;
    let conn = redis().await;
    common::eventually("gone-1 looks stale", || {
        let mut conn = conn.clone();
        let prefix = prefix.clone();
        async move {
            let refreshed =
                common::stream_field(&mut conn, &prefix, "gone-1", "last_refresh").await;
            let refreshed: u64 = refreshed.unwrap().parse().unwrap();
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            now.saturating_sub(refreshed) > STALE.as_millis() as u64 + 50
        }
    })
    .await;
    let stale = json(&run(&prefix, &["streams", "list", "--json"]).await.stdout);
    assert_eq!(stale[0]["state"], "stale");

    let swept = run(
        &prefix,
        &["guardian", "--once", "--json", "--stale-threshold", "600ms"],
    )
    .await;

    assert_eq!(swept.code, Some(0), "{swept:?}");
    let report = json(&swept.stdout);
    assert_eq!(report["orphaned"], serde_json::json!(["gone-1"]));
    let shown = json(
        &run(&prefix, &["streams", "show", "gone-1", "--json"])
            .await
            .stdout,
    );
    assert_eq!(shown["state"], "orphaned");
    assert_eq!(shown["reason"], "orphaned");
    assert!(
        shown["terminal_event"]
            .as_str()
            .unwrap()
            .contains("\"reason\":\"orphaned\"")
    );
    let again = run(
        &prefix,
        &["guardian", "--once", "--stale-threshold", "600ms"],
    )
    .await;
    assert!(again.stdout.starts_with("orphaned 0,"), "{}", again.stdout);
}

#[tokio::test]
async fn guardian_runs_until_sigterm() {
    let prefix = unique_prefix("cli_guardian_run");
    let mut guardian = Process::start(
        &prefix,
        &[
            "guardian",
            "--sweep-interval",
            "100ms",
            "--stale-threshold",
            "600ms",
        ],
    );

    abandon_streams(&prefix, &["gone-2".to_owned()], STALE).await;
    wait_for_state(&prefix, "gone-2", "orphaned").await;
    guardian.assert_running();
    let status = guardian.terminate().await;

    assert!(status.success(), "exit {status}:\n{}", guardian.logs());
    let logs = guardian.logs();
    assert!(logs.contains("guardian started"), "{logs}");
    assert!(logs.contains("stream marked orphaned"), "{logs}");
    assert!(logs.contains("guardian stopped"), "{logs}");
}

#[tokio::test]
async fn unreachable_redis_is_named() {
    let redis_url = format!("redis://127.0.0.1:{}", free_port());
    for args in [
        &["stats"][..],
        &["streams", "list"],
        &["streams", "show", "any"],
        &["guardian", "--once"],
    ] {
        let mut all = vec!["--redis", redis_url.as_str()];
        all.extend_from_slice(args);
        let run = run_raw(&all).await;
        assert_eq!(run.code, Some(1), "{args:?}: {run:?}");
        let expected = format!("error: cannot reach Redis at {redis_url}: ");
        assert!(run.stderr.contains(&expected), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("start Redis or pass --redis"),
            "{}",
            run.stderr
        );
    }
}

#[tokio::test]
async fn invalid_arguments_are_rejected() {
    let cases: [(&[&str], &str); 5] = [
        (&["streams", "show", "a b"], "invalid stream id"),
        (&["--key-prefix", "a{b", "stats"], "must not contain braces"),
        (&["--redis-timeout", "0s", "stats"], "greater than zero"),
        (&["streams", "list", "--state", "sleeping"], "sleeping"),
        (&["guardian", "--json"], "--once"),
    ];
    for (args, expected) in cases {
        let run = run_raw(args).await;
        assert_eq!(run.code, Some(2), "{args:?}: {run:?}");
        assert!(run.stderr.contains(expected), "{args:?}: {}", run.stderr);
    }
}

#[tokio::test]
async fn cluster_streams_are_listed() {
    let cluster = shared_cluster();
    let prefix = unique_prefix("cli_cluster");
    let conn = cluster.connect().await;
    let server = TestServer::start(SseResilienceLayer::new(conn.clone()).key_prefix(&prefix)).await;
    let mut ids: Vec<String> = (0..8).map(|i| format!("c-{i}")).collect();
    for id in &ids {
        server
            .get(&format!("/fixed?stream_id={id}"))
            .await
            .bytes()
            .await
            .unwrap();
    }
    let nodes: Vec<String> = cluster
        .master_ports()
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect();
    let nodes = nodes.join(",");
    let args = [
        "--redis-cluster",
        nodes.as_str(),
        "--key-prefix",
        prefix.as_str(),
    ];

    common::eventually("every cluster stream completes", || async {
        let mut all = args.to_vec();
        all.extend(["stats", "--json"]);
        json(&run_raw(&all).await.stdout)["completed"] == 8
    })
    .await;
    let mut all = args.to_vec();
    all.extend(["streams", "list", "--json"]);
    let listed = run_raw(&all).await;

    assert_eq!(listed.code, Some(0), "{listed:?}");
    let mut listed: Vec<String> = json(&listed.stdout)
        .as_array()
        .unwrap()
        .iter()
        .map(|stream| stream["id"].as_str().unwrap().to_owned())
        .collect();
    listed.sort();
    ids.sort();
    assert_eq!(listed, ids);
}
