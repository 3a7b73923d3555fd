//! End-to-end tests of the browser client: the demo page in headless
//! Chromium, against the built demo binary and a private redis-server.
//!
//! They need Chromium and chromedriver (Debian: `apt-get install -y chromium
//! chromium-driver`) and fail with that hint when either is missing. Each
//! test saves a screenshot of its final page, with the logs of chromedriver
//! and the demo, under `target/browser-tests/<test name>/`.

mod browser_support;
mod common;
mod support;

use browser_support::{
    CutProxy, Demo, assert_whole_result, browser_test, logged_tokens, start_generation, text_of,
    wait_for_status, wait_for_tokens,
};
use serde_json::{Value, json};
use support::{RedisProcess, free_port};

#[tokio::test]
async fn generation_completes_on_page() {
    browser_test("generation_completes_on_page", |client, dir| async move {
        let redis = RedisProcess::start();
        let demo = Demo::start(free_port(), &redis.url(), dir.join("demo.log")).await;

        client
            .goto(&demo.url("/"))
            .await
            .expect("loading the page failed");
        start_generation(&client, 12, 50).await;

        wait_for_status(&client, "completed").await;
        assert_whole_result(&client, 12).await;
        assert_eq!(demo.generations().await, 1);
    })
    .await;
}

#[tokio::test]
async fn cut_connection_resumes_on_page() {
    browser_test("cut_connection_resumes_on_page", |client, dir| async move {
        let redis = RedisProcess::start();
        let demo = Demo::start(free_port(), &redis.url(), dir.join("demo.log")).await;
        // Cuts the stream in the middle of token 7, before its empty line,
        // so the browser never dispatches that event on the first connection.
        let proxy = CutProxy::start(demo.addr, br#""index":7,"#).await;

        client
            .goto(&proxy.url("/"))
            .await
            .expect("loading the page failed");
        start_generation(&client, 20, 100).await;

        wait_for_status(&client, "completed").await;
        assert_eq!(proxy.cuts(), 1, "the proxy never cut the stream");
        let log = text_of(&client, "log").await;
        assert!(
            log.contains("connection lost; reconnect 1 in") && log.contains("resuming after #6"),
            "the page did not reconnect after event 6; log:\n{log}"
        );
        assert_whole_result(&client, 20).await;
        assert_eq!(
            demo.generations().await,
            1,
            "the reconnect started a new generation"
        );
    })
    .await;
}

#[tokio::test]
async fn reload_after_completion_replays() {
    browser_test(
        "reload_after_completion_replays",
        |client, dir| async move {
            let redis = RedisProcess::start();
            let demo = Demo::start(free_port(), &redis.url(), dir.join("demo.log")).await;

            client
                .goto(&demo.url("/"))
                .await
                .expect("loading the page failed");
            let stream_id = start_generation(&client, 8, 50).await;
            wait_for_status(&client, "completed").await;
            let result = text_of(&client, "output").await;
            assert_eq!(result.split(' ').count(), 8, "unexpected result {result:?}");

            client.refresh().await.expect("reloading the page failed");
            wait_for_status(&client, "completed").await;

            assert_eq!(text_of(&client, "stream-id").await, stream_id);
            assert_eq!(text_of(&client, "output").await, result);
            let log = text_of(&client, "log").await;
            assert!(
                logged_tokens(&log).is_empty(),
                "the reload streamed tokens again; log:\n{log}"
            );
            assert!(
                log.contains("completed #8") && log.contains("from the status service"),
                "the reload did not show the recorded end; log:\n{log}"
            );
            assert_eq!(
                demo.generations().await,
                1,
                "the reload ran a second generation"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn crashed_server_ends_as_failed() {
    browser_test("crashed_server_ends_as_failed", |client, dir| async move {
        let redis = RedisProcess::start();
        let port = free_port();
        let mut demo = Demo::start(port, &redis.url(), dir.join("demo-1.log")).await;

        client
            .goto(&demo.url("/"))
            .await
            .expect("loading the page failed");
        start_generation(&client, 200, 100).await;
        wait_for_tokens(&client, 5).await;

        // The process dies with its stream open, then a fresh instance takes
        // the same port and Redis; its guardian marks the stream orphaned.
        demo.kill();
        let restarted = Demo::start(port, &redis.url(), dir.join("demo-2.log")).await;

        wait_for_status(&client, "failed").await;
        assert_eq!(text_of(&client, "output").await, "failed: orphaned");
        let log = text_of(&client, "log").await;
        assert!(
            !log.contains("completed"),
            "a crashed stream cannot complete; log:\n{log}"
        );
        assert_eq!(
            restarted.generations().await,
            0,
            "the fresh instance ran the crashed generation again"
        );
    })
    .await;
}

/// Runs the client module in the page against routes that never stream.
/// The callback of an asynchronous WebDriver script is its last argument.
const CLIENT_SCRIPT: &str = r#"
const [streamUrl, options, done] = arguments;
import("/sse-resilience.js").then(({ ResilientStream }) => {
  const seen = [];
  const stream = new ResilientStream(streamUrl, options);
  stream.addEventListener("reconnect", (e) => seen.push(e.detail));
  stream.addEventListener("statuschange", (e) => {
    if (e.detail.status === "error") done({ reconnects: seen, error: e.detail.error });
  });
  stream.start();
}).catch((e) => done({ failure: String(e) }));
"#;

#[tokio::test]
async fn client_gives_up_after_retries() {
    browser_test("client_gives_up_after_retries", |client, dir| async move {
        let redis = RedisProcess::start();
        let demo = Demo::start(free_port(), &redis.url(), dir.join("demo.log")).await;
        client
            .goto(&demo.url("/"))
            .await
            .expect("loading the page failed");

        // A route that returns 404: every attempt fails.
        let options = json!({ "maxRetries": 3, "initialDelayMs": 40, "maxDelayMs": 100 });
        let outcome = client
            .execute_async(CLIENT_SCRIPT, vec![json!("/no-such-route"), options])
            .await
            .expect("running the client failed");
        assert_eq!(outcome["failure"], Value::Null, "{outcome}");
        let reconnects = outcome["reconnects"]
            .as_array()
            .expect("no reconnects list");
        assert_eq!(reconnects.len(), 3, "{outcome}");
        // Each delay is between half and all of min(100, 40 * 2^(attempt - 1)).
        for (reconnect, ceiling) in reconnects.iter().zip([40, 80, 100]) {
            let delay = reconnect["delayMs"].as_u64().expect("no delay");
            assert!(
                (ceiling / 2..=ceiling).contains(&delay),
                "delay {delay} outside {}..={ceiling}: {outcome}",
                ceiling / 2
            );
        }
        let error = outcome["error"].as_str().expect("no error message");
        assert!(
            error.starts_with("gave up after 3 reconnection attempts"),
            "{error}"
        );

        // An id the status service rejects ends at once, without reconnects.
        let options = json!({ "statusUrl": "/api/status/bad%20id" });
        let outcome = client
            .execute_async(CLIENT_SCRIPT, vec![json!("/api/stream/bad%20id"), options])
            .await
            .expect("running the client failed");
        assert_eq!(outcome["reconnects"], json!([]), "{outcome}");
        let error = outcome["error"].as_str().expect("no error message");
        // The message is the status service's reason for the 400.
        assert!(error.contains("invalid"), "{error}");
        assert_eq!(demo.generations().await, 0);
    })
    .await;
}

#[tokio::test]
async fn client_terminal_rule_matches_layer() {
    browser_test("client_terminal_rule_matches_layer", |client, dir| async move {
        let redis = RedisProcess::start();
        let demo = Demo::start(free_port(), &redis.url(), dir.join("demo.log")).await;
        client.goto(&demo.url("/")).await.expect("loading the page failed");

        let script = r#"
            const [cases, done] = arguments;
            import("/sse-resilience.js")
              .then(({ defaultTerminal }) => done(cases.map(([type, data]) => defaultTerminal(type, data))))
              .catch((e) => done(String(e)));
        "#;
        let cases = [
            (("completed", "{}"), json!("completed")),
            (("failed", "not json"), json!("failed")),
            (("message", r#"{"type":"completed","text":"x"}"#), json!("completed")),
            (("message", r#"{"type":"failed"}"#), json!("failed")),
            (("message", r#"{"type":"token"}"#), Value::Null),
            (("message", "not json"), Value::Null),
            (("message", "null"), Value::Null),
            (("token", r#"{"type":"completed"}"#), Value::Null),
        ];
        let inputs: Vec<Value> = cases.iter().map(|((t, d), _)| json!([t, d])).collect();
        let outcome = client
            .execute_async(script, vec![json!(inputs)])
            .await
            .expect("running the terminal rule failed");
        let results = outcome.as_array().unwrap_or_else(|| panic!("{outcome}"));
        for (((event_type, data), expected), result) in cases.iter().zip(results) {
            assert_eq!(result, expected, "event type {event_type:?}, data {data:?}");
        }
    })
    .await;
}
