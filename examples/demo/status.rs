//! `GET /api/status/{id}`: the recovery status of a stream, read from the
//! layer's Redis hash, for the browser client to request before it connects.
//!
//! TODO: replace with the library's status service. This stand-in reads the
//! hash with the key layout of the crate's store (`sse:{<id>}`, the default
//! key prefix) and responds in the same JSON shape:
//!
//! - 200 `{"id", "state", "type", "started_at_ms", "last_refresh_ms",
//!   "terminal"}`, where `terminal` is null while the stream is active, else
//!   `{"event", "id", "data", "truncated"}`;
//! - 404 `{"error": "not found"}` for an unknown id, and for a stream whose
//!   owner differs from the `x-user-id` header (existence is not revealed);
//! - 400 `{"error": ...}` for an invalid id;
//! - 503 `{"error": "store unavailable"}` when Redis fails or times out.

use std::{collections::HashMap, time::Duration};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use redis::aio::ConnectionLike;
use serde_json::{Value, json};
use sse_resilience::{DEFAULT_KEY_PREFIX, EventStreamParser, validate_stream_id};

/// Time limit of the Redis call of one status request.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);

/// The header the demo reads the owner from.
const OWNER_HEADER: &str = "x-user-id";

/// Returns the status route, with its own Redis connection as state.
pub fn routes<C>(redis: C) -> Router
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/api/status/{id}", get(status::<C>))
        .with_state(redis)
}

async fn status<C>(
    State(mut redis): State<C>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response
where
    C: ConnectionLike + Clone + Send + Sync + 'static,
{
    if let Err(error) = validate_stream_id(&id) {
        return answer(
            StatusCode::BAD_REQUEST,
            json!({ "error": error.to_string() }),
        );
    }

    let key = format!("{DEFAULT_KEY_PREFIX}{{{id}}}");
    let mut command = redis::cmd("HGETALL");
    command.arg(&key);
    let read = command.query_async(&mut redis);
    let fields: HashMap<String, Vec<u8>> = match tokio::time::timeout(REDIS_TIMEOUT, read).await {
        Ok(Ok(fields)) => fields,
        Ok(Err(error)) => {
            tracing::warn!(stream_id = %id, %error, "status request: redis failed");
            return store_unavailable();
        }
        Err(_) => {
            tracing::warn!(stream_id = %id, "status request: redis timed out");
            return store_unavailable();
        }
    };

    let text = |name: &str| {
        fields
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    let Some(state) = text("state") else {
        return not_found();
    };
    let owner = text("owner").unwrap_or_default();
    let caller = headers
        .get(OWNER_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    if !owner.is_empty() && caller.as_deref() != Some(owner.as_str()) {
        return not_found();
    }

    let terminal = match fields.get("terminal_event") {
        Some(bytes) if state != "active" => terminal_json(
            bytes,
            text("terminal_id").filter(|id| !id.is_empty()),
            text("truncated").as_deref() == Some("1"),
        ),
        _ => Value::Null,
    };
    let millis = |name: &str| text(name).and_then(|v| v.parse::<u64>().ok());
    answer(
        StatusCode::OK,
        json!({
            "id": id,
            "state": state,
            "type": text("type").unwrap_or_default(),
            "started_at_ms": millis("started_at"),
            "last_refresh_ms": millis("last_refresh"),
            "terminal": terminal,
        }),
    )
}

/// Parses the stored terminal event bytes into `{"event", "id", "data", "truncated"}`.
fn terminal_json(bytes: &[u8], id: Option<String>, truncated: bool) -> Value {
    let mut parsed = None;
    let mut parser = EventStreamParser::new(bytes.len());
    let mut keep_first = |event: &sse_resilience::parser::Event<'_>| {
        parsed.get_or_insert_with(|| (event.event_type().to_owned(), event.data().into_owned()));
    };
    parser.feed(bytes, &mut keep_first);
    // A truncated event may lack its empty line: end it to dispatch what was kept.
    parser.feed(b"\n\n", &mut keep_first);
    let (event, data) = parsed.unwrap_or_else(|| ("message".to_owned(), String::new()));
    json!({ "event": event, "id": id, "data": data, "truncated": truncated })
}

fn answer(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_found() -> Response {
    answer(StatusCode::NOT_FOUND, json!({ "error": "not found" }))
}

fn store_unavailable() -> Response {
    answer(
        StatusCode::SERVICE_UNAVAILABLE,
        json!({ "error": "store unavailable" }),
    )
}
