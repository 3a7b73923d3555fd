//! The examples' connection to Redis: one quick first attempt, and error
//! messages that name the server without its password.

use std::time::Duration;

use redis::{ErrorKind, RedisError, aio::ConnectionManager};

#[path = "../../src/bin/sse-resilience/redact.rs"]
mod redact;

pub use redact::redact_url;

/// Time a Redis server has to accept a first connection and reply to PING.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connects a `ConnectionManager` to the Redis at `url`, read from the
/// environment variable `variable`.
///
/// A first connection must reply to PING within `timeout`, so a server that is
/// down, silent or rejects the password fails at once instead of after the
/// manager's retries. The error message contains the URL without its
/// password, and what to do.
pub async fn connect(
    url: &str,
    variable: &str,
    timeout: Duration,
) -> Result<ConnectionManager, String> {
    let target = redact_url(url);
    let client = redis::Client::open(url).map_err(|error| {
        format!("invalid {variable} {target}: {error}; use a URL such as redis://127.0.0.1:6379")
    })?;

    let first = async {
        let mut connection = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
    };
    match tokio::time::timeout(timeout, first).await {
        Ok(Ok(_)) => {}
        Ok(Err(error)) => return Err(failed(&target, variable, &error)),
        Err(_) => {
            return Err(format!(
                "cannot connect to Redis at {target}: no answer within {timeout:?}; check that it runs and responds, or set {variable}"
            ));
        }
    }

    ConnectionManager::new(client)
        .await
        .map_err(|error| failed(&target, variable, &error))
}

fn failed(target: &str, variable: &str, error: &RedisError) -> String {
    let rejected_password = error.kind() == ErrorKind::AuthenticationFailed
        || matches!(error.code(), Some("NOAUTH" | "WRONGPASS"));
    let fix = if rejected_password {
        format!("check the user and password in {variable}")
    } else {
        format!("start redis-server, or set {variable} to a running one")
    };
    format!("cannot connect to Redis at {target}: {error}; {fix}")
}
