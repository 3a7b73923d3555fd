//! The built examples (demo, hyper and tonic) when their settings are wrong:
//! a Redis that rejects the password or refuses the connection, and an
//! invalid `ADDR`. They exit at once with a message that names the setting,
//! never shows the Redis password, and says what to do.
//!
//! `cargo test` builds the examples with the other targets. Run alone, this
//! test needs `cargo build --examples` first.

mod common;
mod example_support;
mod support;

use std::{
    fs::File,
    process::{Command, ExitStatus, Stdio},
    time::Duration,
};

use example_support::example_binary;
use support::{RedisProcess, free_port, wait_or_kill};

const EXAMPLES: [&str; 3] = ["demo", "hyper", "tonic"];
const PASSWORD: &str = "secret-example-pw";

/// The exit status and the whole output (stdout, then stderr) of one run.
struct Outcome {
    status: ExitStatus,
    output: String,
}

/// Runs the built example `name` with `env` and without the Redis variables
/// of the caller, and waits for it to exit (at most 60 s).
async fn run_example(name: &str, env: &[(&str, &str)]) -> Outcome {
    let mut command = Command::new(example_binary(name));
    command
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .env_remove("REDIS_PROBE_URL")
        .env("ADDR", format!("127.0.0.1:{}", free_port()))
        .env("NO_COLOR", "1")
        .envs(env.iter().copied());
    let name = name.to_owned();
    tokio::task::spawn_blocking(move || {
        let base = std::env::temp_dir().join(format!(
            "sse-resilience-example-{}",
            uuid::Uuid::new_v4().simple()
        ));
        let stdout = base.with_extension("stdout");
        let stderr = base.with_extension("stderr");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|error| panic!("failed to start the {name} example: {error}"));
        let status = wait_or_kill(&mut child, Duration::from_secs(60));
        let output = std::fs::read_to_string(&stdout).unwrap_or_default()
            + &std::fs::read_to_string(&stderr).unwrap_or_default();
        let _ = std::fs::remove_file(&stdout);
        let _ = std::fs::remove_file(&stderr);
        let status =
            status.unwrap_or_else(|| panic!("the {name} example still ran after 60 s:\n{output}"));
        Outcome { status, output }
    })
    .await
    .expect("the example runner panicked")
}

#[tokio::test]
async fn redis_password_never_printed() {
    let port = free_port();
    let redis = RedisProcess::start_with(port, &["--requirepass", "the-right-pw"]);
    let refused_port = free_port();
    let cases = [
        // The server rejects the password.
        (redis.port, "check the user and password in REDIS_URL"),
        // Nothing listens on the port.
        (refused_port, "start redis-server"),
    ];

    for example in EXAMPLES {
        for (port, fix) in cases {
            let url = format!("redis://user:{PASSWORD}@127.0.0.1:{port}");
            let outcome = run_example(example, &[("REDIS_URL", &url)]).await;

            let output = &outcome.output;
            assert!(
                !outcome.status.success(),
                "{example}, port {port}: {output}"
            );
            assert!(!output.contains(PASSWORD), "{example}: {output}");
            assert!(
                output.contains(&format!(
                    "cannot connect to Redis at redis://***@127.0.0.1:{port}"
                )),
                "{example}: {output}"
            );
            assert!(output.contains(fix), "{example}: {output}");
        }
    }
}

#[tokio::test]
async fn invalid_addr_is_named() {
    let outcome = run_example(
        "demo",
        &[
            ("ADDR", "bogus"),
            (
                "REDIS_PROBE_URL",
                &format!("redis://127.0.0.1:{}", free_port()),
            ),
        ],
    )
    .await;

    let output = &outcome.output;
    assert!(!outcome.status.success(), "{output}");
    // `main` prints its error with `Debug`, so the quotes come escaped.
    assert!(output.contains("invalid ADDR \\\"bogus\\\""), "{output}");
    assert!(output.contains("such as 127.0.0.1:3000"), "{output}");
    assert!(!output.contains("AddrParseError"), "{output}");
}
