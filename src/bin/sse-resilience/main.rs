//! The `sse-resilience` command: a proxy that puts the layer in front of any
//! HTTP server, the guardian as its own process, and read-only operator
//! commands over the stream registry.
//!
//! Built with the `cli` feature: `cargo install sse-resilience --features cli`.

mod operator;
mod proxy;
mod redact;

use std::{fmt, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use redact::redact_url;
use redis::{
    aio::{ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

#[derive(Parser)]
#[command(
    name = "sse-resilience",
    version,
    about = "Resilient Server-Sent Events in front of any HTTP server, and tools to inspect the stream registry in Redis"
)]
struct Cli {
    #[command(flatten)]
    redis: RedisArgs,

    #[command(subcommand)]
    command: Command,
}

/// The location of the stream registry. Every command takes these options.
#[derive(Args, Clone, Debug)]
pub struct RedisArgs {
    /// URL of the Redis server.
    #[arg(
        long,
        global = true,
        env = "REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis: String,

    /// Nodes of a Redis Cluster, comma-separated (`host:port` or URLs). When
    /// set, the cluster is used instead of --redis.
    #[arg(
        long,
        global = true,
        env = "REDIS_CLUSTER_NODES",
        value_delimiter = ',',
        value_name = "NODES"
    )]
    redis_cluster: Vec<String>,

    /// Prefix of every Redis key; use the value of the layers.
    #[arg(long, global = true, default_value = sse_resilience::DEFAULT_KEY_PREFIX, value_parser = parse_key_prefix)]
    key_prefix: String,

    /// Time-out of one Redis call (for example 500ms, 2s).
    #[arg(long, global = true, default_value = "2s", value_parser = parse_positive_duration)]
    redis_timeout: Duration,
}

#[derive(Subcommand)]
enum Command {
    /// Put the layer in front of an HTTP server: replay, drain and heartbeats
    /// for its event streams, with no change to the server.
    Proxy(Box<proxy::ProxyArgs>),
    /// Run the guardian, which marks streams whose process died as orphaned.
    Guardian(operator::GuardianArgs),
    /// List or show the streams in the registry.
    Streams {
        #[command(subcommand)]
        command: operator::StreamsCommand,
    },
    /// Count the streams in the registry by state.
    Stats(operator::StatsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let redis = Redis::connect(&cli.redis).await?;
        match cli.command {
            Command::Proxy(args) => proxy::run(*args, redis).await,
            Command::Guardian(args) => operator::guardian(args, redis).await,
            Command::Streams { command } => operator::streams(command, redis).await,
            Command::Stats(args) => operator::stats(args, redis).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// A failure of a command, with what to do about it in the message.
#[derive(Debug)]
pub struct CliError(String);

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A connection to the registry, and the options it came from.
pub struct Redis {
    pub connection: Connection,
    pub args: RedisArgs,
}

/// A connection to one Redis server or to a Redis Cluster.
#[derive(Clone)]
pub enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Redis {
    /// Connects, and fails fast with a message naming the server when it does not respond.
    async fn connect(args: &RedisArgs) -> Result<Self, CliError> {
        let target = describe_target(args);
        let unreachable = |error: &dyn fmt::Display| {
            let fix = if args.redis_cluster.is_empty() {
                "start Redis or pass --redis"
            } else {
                "check the nodes or pass --redis-cluster"
            };
            CliError::new(format!("cannot reach Redis at {target}: {error}; {fix}"))
        };

        let connection = if args.redis_cluster.is_empty() {
            let client = redis::Client::open(args.redis.as_str()).map_err(|error| {
                CliError::new(format!(
                    "invalid Redis URL {target}: {error}; pass one like redis://127.0.0.1:6379"
                ))
            })?;
            // A first connection of its own, so an unreachable server fails at
            // once instead of after the connection manager's retries.
            let probe = tokio::time::timeout(
                args.redis_timeout,
                client.get_multiplexed_async_connection(),
            )
            .await;
            match probe {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => return Err(unreachable(&error)),
                Err(_) => {
                    return Err(unreachable(&format!(
                        "timed out after {:?}",
                        args.redis_timeout
                    )));
                }
            }
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(args.redis_timeout))
                .set_response_timeout(Some(args.redis_timeout));
            let manager = ConnectionManager::new_with_config(client, config)
                .await
                .map_err(|error| unreachable(&error))?;
            Connection::Single(manager)
        } else {
            let nodes: Vec<String> = args
                .redis_cluster
                .iter()
                .map(|node| {
                    if node.contains("://") {
                        node.clone()
                    } else {
                        format!("redis://{node}")
                    }
                })
                .collect();
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(args.redis_timeout)
                .response_timeout(args.redis_timeout)
                .build()
                .map_err(|error| {
                    CliError::new(format!(
                        "invalid Redis Cluster nodes {target}: {error}; pass them like 127.0.0.1:7000,127.0.0.1:7001"
                    ))
                })?;
            let cluster = tokio::time::timeout(args.redis_timeout, client.get_async_connection())
                .await
                .map_err(|_| unreachable(&format!("timed out after {:?}", args.redis_timeout)))?
                .map_err(|error| unreachable(&error))?;
            Connection::Cluster(cluster)
        };
        Ok(Self {
            connection,
            args: args.clone(),
        })
    }

    /// Returns the server or the cluster nodes, without passwords, for messages.
    pub fn target(&self) -> String {
        describe_target(&self.args)
    }
}

/// Runs `$body` with `$conn` bound to the concrete connection type of `$connection`.
macro_rules! with_connection {
    ($connection:expr, $conn:ident => $body:expr) => {
        match $connection {
            $crate::Connection::Single($conn) => $body,
            $crate::Connection::Cluster($conn) => $body,
        }
    };
}
pub(crate) use with_connection;

fn describe_target(args: &RedisArgs) -> String {
    if args.redis_cluster.is_empty() {
        redact_url(&args.redis)
    } else {
        let nodes: Vec<String> = args
            .redis_cluster
            .iter()
            .map(|node| redact_url(node))
            .collect();
        format!("cluster {}", nodes.join(","))
    }
}

fn parse_key_prefix(prefix: &str) -> Result<String, String> {
    if prefix.contains(['{', '}']) {
        return Err(format!(
            "invalid key prefix {prefix:?}: it must not contain braces"
        ));
    }
    Ok(prefix.to_owned())
}

/// Parses a duration such as `250ms`, `15s`, `5m`, `1h` or `1.5s`; a bare
/// number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration {text:?}: use a number and a unit, such as 500ms, 15s, 5m or 1h")
    })?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m or h"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds)
        .map_err(|error| format!("invalid duration {text:?}: {error}"))
}

/// Parses a duration that must be greater than zero.
pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!(
            "invalid duration {text:?}: it must be greater than zero"
        ));
    }
    Ok(duration)
}

/// Waits for Ctrl-C or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::warn!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn bad_durations_are_rejected() {
        for text in ["", "s", "ten", "5d", "-1s", "1e400s", "1..2s"] {
            assert!(parse_duration(text).is_err(), "{text:?} was accepted");
        }
        assert!(parse_positive_duration("0ms").is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://user:secret@host:1"),
            "redis://***@host:1"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(redact_url("user:pw@127.0.0.1:7000"), "***@127.0.0.1:7000");
    }
}
