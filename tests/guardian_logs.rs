//! The guardian's log while Redis is down: the failed sweeps are logged at
//! the 1st, 2nd, 4th, 8th and 16th failure, each with its repeat count, and
//! one line reports when sweeps work again.
//!
//! A test binary of its own, because it installs the global `tracing`
//! subscriber and counts every line the guardian logs.

mod common;
mod support;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::unique_prefix;
use sse_resilience::StreamGuardian;
use support::RedisProcess;

const FAILED: &str = "guardian sweep failed";
const RECOVERED: &str = "guardian sweeps work again";

/// A log destination for a `tracing` subscriber that the test can read.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for LogBuffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Polls `logs` every 20 ms until `done` returns true for their text, for
/// at most 60 s, so a broken test ends.
async fn wait_for_logs(logs: &LogBuffer, done: impl Fn(&str) -> bool) {
    for _ in 0..3000 {
        if done(&logs.text()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn redis_outage_logs_few_failures() {
    let logs = LogBuffer::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let mut redis_process = RedisProcess::start();
    let port = redis_process.port;
    let guardian = StreamGuardian::new(redis_process.connect().await)
        .key_prefix(&unique_prefix("guardian_outage_logs"))
        .redis_timeout(Duration::from_millis(200))
        .sweep_interval(Duration::from_millis(20));
    redis_process.kill();

    // Redis stays down for 16 failed sweeps or more, then comes back. The
    // restarted server lives until the guardian has stopped, so no sweep
    // fails after the recovery.
    let restarted = Mutex::new(None);
    guardian
        .run_until(async {
            wait_for_logs(&logs, |text| {
                text.contains("repeat=16") || text.matches(FAILED).count() > 16
            })
            .await;
            let redis = tokio::task::spawn_blocking(move || RedisProcess::start_on(port))
                .await
                .unwrap();
            *restarted.lock().unwrap() = Some(redis);
            wait_for_logs(&logs, |text| text.contains(RECOVERED)).await;
        })
        .await;
    drop(restarted);

    let failed = logs.lines_with(FAILED);
    assert_eq!(failed.len(), 5, "{}", logs.text());
    for (line, repeat) in failed.iter().zip([1, 2, 4, 8, 16]) {
        assert!(line.contains(&format!("repeat={repeat}")), "{line}");
    }
    let recovered = logs.lines_with(RECOVERED);
    assert_eq!(recovered.len(), 1, "{}", logs.text());
    assert!(recovered[0].contains("failed_before="), "{}", recovered[0]);
}
