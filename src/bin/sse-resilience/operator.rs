//! The operator commands: `guardian`, `streams list`, `streams show` and
//! `stats`. The reads are in the library's `inspect` module.

use std::{
    fmt::Write as _,
    io::{ErrorKind, Write as _},
    time::Duration,
};

use clap::{Args, Subcommand, ValueEnum};
use redis::aio::ConnectionLike;
use sse_resilience::{
    DEFAULT_ORPHAN_EVENT_TYPE, DEFAULT_SWEEP_BATCH, StoreError, StreamGuardian, SweepReport,
    inspect::{Inspector, StreamDetails, StreamState, StreamSummary},
    validate_stream_id,
};

use crate::{CliError, Redis, parse_positive_duration, shutdown_signal, with_connection};

#[derive(Args, Debug)]
pub struct GuardianArgs {
    /// Time between two sweeps.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    sweep_interval: Duration,

    /// A stream counts as stale only past the larger of this and the stale
    /// threshold its layer stored with it.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    stale_threshold: Duration,

    /// How long an orphaned stream's terminal event is kept for replay.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    completion_ttl: Duration,

    /// Event type of the terminal event recorded for an orphaned stream.
    #[arg(long, default_value = DEFAULT_ORPHAN_EVENT_TYPE)]
    orphan_event_type: String,

    /// Stale candidates taken per index shard per sweep.
    #[arg(long, default_value_t = DEFAULT_SWEEP_BATCH as u64, value_parser = clap::value_parser!(u64).range(1..))]
    batch_size: u64,

    /// Run one sweep, print what it did, and exit.
    #[arg(long)]
    once: bool,

    /// With --once: print the sweep report as JSON.
    #[arg(long, requires = "once")]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum StreamsCommand {
    /// List the streams: live, stale, orphaned and finished, newest first.
    List(ListArgs),
    /// Show one stream: its state, registry fields and stored terminal event.
    Show(ShowArgs),
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Show only streams in these states (comma-separated).
    #[arg(long, value_delimiter = ',')]
    state: Vec<StateFilter>,

    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    /// The stream id.
    #[arg(value_parser = parse_stream_id)]
    id: String,

    #[command(flatten)]
    read: ReadArgs,
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[command(flatten)]
    read: ReadArgs,
}

/// Options of the commands that read the registry.
#[derive(Args, Debug)]
struct ReadArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,

    /// The stale threshold for streams whose layer did not store its own.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    stale_threshold: Duration,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StateFilter {
    Live,
    Stale,
    Orphaned,
    Completed,
    Failed,
    /// Orphaned, completed and failed.
    Finished,
}

impl StateFilter {
    fn matches(self, state: StreamState) -> bool {
        match self {
            StateFilter::Live => state == StreamState::Live,
            StateFilter::Stale => state == StreamState::Stale,
            StateFilter::Orphaned => state == StreamState::Orphaned,
            StateFilter::Completed => state == StreamState::Completed,
            StateFilter::Failed => state == StreamState::Failed,
            StateFilter::Finished => state.is_finished(),
        }
    }
}

/// Runs the guardian until Ctrl-C or SIGTERM, or one sweep with `--once`.
pub async fn guardian(args: GuardianArgs, redis: Redis) -> Result<(), CliError> {
    let guardian = with_connection!(redis.connection.clone(), conn => StreamGuardian::new(conn))
        .key_prefix(&redis.args.key_prefix)
        .redis_timeout(redis.args.redis_timeout)
        .sweep_interval(args.sweep_interval)
        .stale_threshold(args.stale_threshold)
        .completion_ttl(args.completion_ttl)
        .orphan_event_type(&args.orphan_event_type)
        .batch_size(usize::try_from(args.batch_size).unwrap_or(usize::MAX));

    if !args.once {
        guardian.run_until(shutdown_signal()).await;
        return Ok(());
    }
    let report = guardian
        .sweep()
        .await
        .map_err(|error| read_failed("the guardian sweep", &error, &redis))?;
    if args.json {
        print_json(&sweep_json(&report))
    } else {
        print_text(&sweep_text(&report))
    }
}

/// Runs `streams list` or `streams show`.
pub async fn streams(command: StreamsCommand, redis: Redis) -> Result<(), CliError> {
    with_connection!(redis.connection.clone(), conn => streams_on(conn, command, &redis).await)
}

async fn streams_on<C>(conn: C, command: StreamsCommand, redis: &Redis) -> Result<(), CliError>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    match command {
        StreamsCommand::List(args) => {
            let streams = inspector(conn, redis, &args.read)
                .list()
                .await
                .map_err(|error| read_failed("listing streams", &error, redis))?;
            let streams: Vec<StreamSummary> = streams
                .into_iter()
                .filter(|stream| {
                    args.state.is_empty()
                        || args.state.iter().any(|filter| filter.matches(stream.state))
                })
                .collect();
            if args.read.json {
                let list = streams.iter().map(StreamSummary::to_json).collect();
                print_json(&serde_json::Value::Array(list))
            } else {
                print_text(&list_text(&streams))
            }
        }
        StreamsCommand::Show(args) => {
            let details = inspector(conn, redis, &args.read)
                .stream(&args.id)
                .await
                .map_err(|error| read_failed("reading the stream", &error, redis))?;
            let Some(details) = details else {
                return Err(CliError::new(format!(
                    "stream {} not found under key prefix {:?} at {}; it never existed, it expired, or its layer uses another --key-prefix",
                    args.id,
                    redis.args.key_prefix,
                    redis.target()
                )));
            };
            if args.read.json {
                print_json(&details.to_json())
            } else {
                print_text(&show_text(&details))
            }
        }
    }
}

/// Runs `stats`.
pub async fn stats(args: StatsArgs, redis: Redis) -> Result<(), CliError> {
    let stats = with_connection!(redis.connection.clone(), conn => inspector(conn, &redis, &args.read).stats().await)
        .map_err(|error| read_failed("counting streams", &error, &redis))?;
    if args.read.json {
        return print_json(&stats.to_json());
    }
    let mut text = String::new();
    for (name, count) in [
        ("live", stats.live),
        ("stale", stats.stale),
        ("orphaned", stats.orphaned),
        ("completed", stats.completed),
        ("failed", stats.failed),
        ("total", stats.total()),
        ("index_entries", stats.index_entries),
    ] {
        let _ = writeln!(text, "{name:<14}{count}");
    }
    print_text(&text)
}

fn inspector<C>(conn: C, redis: &Redis, args: &ReadArgs) -> Inspector<C>
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    Inspector::new(conn)
        .key_prefix(&redis.args.key_prefix)
        .stale_threshold(args.stale_threshold)
        .redis_timeout(redis.args.redis_timeout)
}

fn read_failed(action: &str, error: &StoreError, redis: &Redis) -> CliError {
    let fix = if error.is_timeout() {
        format!(
            "check that Redis responds, or raise --redis-timeout (now {:?})",
            redis.args.redis_timeout
        )
    } else {
        "check that Redis is running and reachable".to_owned()
    };
    CliError::new(format!(
        "{action} from Redis at {} failed: {error}; {fix}",
        redis.target()
    ))
}

fn parse_stream_id(id: &str) -> Result<String, String> {
    validate_stream_id(id).map_err(|error| error.to_string())?;
    Ok(id.to_owned())
}

fn print_json(value: &serde_json::Value) -> Result<(), CliError> {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    text.push('\n');
    print_text(&text)
}

/// Writes the output to stdout. A reader that closed the pipe early, as
/// `| head` does, is no failure: the rest of the output is dropped and the
/// command exits with status 0.
fn print_text(text: &str) -> Result<(), CliError> {
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(error) => Err(CliError::new(format!(
            "writing the output to stdout failed: {error}"
        ))),
    }
}

fn sweep_json(report: &SweepReport) -> serde_json::Value {
    serde_json::json!({
        "orphaned": report.orphaned,
        "dangling_removed": report.dangling_removed,
        "fresh": report.fresh,
    })
}

fn sweep_text(report: &SweepReport) -> String {
    let mut text = format!(
        "orphaned {}, dangling index entries removed {}, fresh {}\n",
        report.orphaned.len(),
        report.dangling_removed,
        report.fresh
    );
    for id in &report.orphaned {
        let _ = writeln!(text, "orphaned {id}");
    }
    text
}

fn list_text(streams: &[StreamSummary]) -> String {
    let rows: Vec<[String; 7]> = streams
        .iter()
        .map(|stream| {
            [
                stream.id.clone(),
                stream.state.to_string(),
                stream.owner.clone().unwrap_or_else(|| "-".to_owned()),
                stream.stream_type.clone(),
                short_duration(stream.age),
                stream.since_refresh.map_or_else(
                    || "-".to_owned(),
                    |since| format!("{} ago", short_duration(since)),
                ),
                stream.reason.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    let header = ["ID", "STATE", "OWNER", "TYPE", "AGE", "REFRESHED", "REASON"].map(str::to_owned);
    let mut widths = header.clone().map(|title| title.len());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in std::iter::once(&header).chain(&rows) {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        let _ = writeln!(text, "{}", line.trim_end());
    }
    if rows.is_empty() {
        text.push_str("(no streams)\n");
    }
    text
}

fn show_text(details: &StreamDetails) -> String {
    let summary = &details.summary;
    let mut text = String::new();
    let mut field = |name: &str, value: String| {
        let _ = writeln!(text, "{name:<14}{value}");
    };

    field("id", summary.id.clone());
    field("state", summary.state.to_string());
    field(
        "owner",
        summary.owner.clone().unwrap_or_else(|| "-".to_owned()),
    );
    field("type", summary.stream_type.clone());
    field("instance", summary.instance.clone());
    field(
        "started",
        format!(
            "{} ago ({} ms since the epoch)",
            short_duration(summary.age),
            summary.started_at_ms
        ),
    );

    if let Some(since) = summary.since_refresh {
        field("refreshed", format!("{} ago", short_duration(since)));
    }
    if let Some(finished) = summary.finished_at_ms {
        field("finished", format!("{finished} ms since the epoch"));
    }
    if let Some(reason) = &summary.reason {
        field("reason", reason.clone());
    }
    if let Some(metadata) = &details.metadata {
        field("metadata", metadata.clone());
    }

    field("logged events", details.logged_events.to_string());
    if let Some(expires) = details.expires_in {
        field("expires in", short_duration(expires));
    }

    match &details.terminal_event {
        Some(event) => {
            let id = details.terminal_id.as_deref().unwrap_or("-");
            let truncated = if details.truncated { ", truncated" } else { "" };
            let _ = writeln!(text, "terminal event (id {id}{truncated}):");
            for line in event.trim_end_matches('\n').split('\n') {
                let _ = writeln!(text, "  {line}");
            }
        }
        None => text.push_str("terminal event: none yet\n"),
    }
    text
}

/// Formats a duration for a table: `850ms`, `12s`, `3m04s`, `2h01m`.
fn short_duration(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds == 0 {
        format!("{}ms", duration.as_millis())
    } else if seconds < 60 {
        format!("{seconds}s")
    } else if seconds < 3600 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_short() {
        assert_eq!(short_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(short_duration(Duration::from_secs(12)), "12s");
        assert_eq!(short_duration(Duration::from_secs(184)), "3m04s");
        assert_eq!(short_duration(Duration::from_secs(7260)), "2h01m");
    }

    #[test]
    fn guardian_defaults_match_library() {
        use clap::Parser;

        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            guardian: GuardianArgs,
        }
        let args = Wrapper::parse_from(["guardian"]).guardian;
        assert_eq!(args.sweep_interval, sse_resilience::DEFAULT_SWEEP_INTERVAL);
        assert_eq!(
            args.stale_threshold,
            sse_resilience::DEFAULT_STALE_THRESHOLD
        );
        assert_eq!(args.completion_ttl, sse_resilience::DEFAULT_COMPLETION_TTL);
        assert_eq!(args.batch_size, DEFAULT_SWEEP_BATCH as u64);
    }
}
