//! The recovery status service: the state of one stream and, once it ended,
//! its terminal event, as JSON for a page that lost its connection.

use std::{
    convert::Infallible,
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tower::Service;

use crate::{
    parser::EventStreamParser,
    request::{IdLookup, OwnerSource, StreamIdSource, sanitize_owner, validate_stream_id},
    store::{BoxFuture, Store, StreamSnapshot},
};

/// A tower service that returns the recovery status of one stream as JSON.
///
/// Created by [`SseResilienceLayer::status_service`](crate::SseResilienceLayer::status_service),
/// it reads the stream from the layer's store (Redis or a
/// [`MemoryStore`](crate::MemoryStore)) with one read-only command, and
/// applies the layer's id checks and owner rule. Every response has
/// `Content-Type: application/json` and `Cache-Control: no-store`:
///
/// | status | body |
/// |---|---|
/// | 200 | `{"id", "state", "type", "started_at_ms", "last_refresh_ms", "terminal"}` |
/// | 400 | `{"error": "<why the id or the owner is invalid>"}`, also when the request has no id |
/// | 404 | `{"error": "not found"}` for an unknown id and for a stream of another owner |
/// | 405 | `{"error": "method not allowed"}` for a method other than GET and HEAD |
/// | 503 | `{"error": "store unavailable"}` when the store fails or times out |
///
/// `state` is `active`, `completed`, `failed` or `orphaned`. `terminal` is
/// `null` while the stream is active, else
/// `{"event": "<event type>", "id": "<event id>" or null, "data": "<data lines joined with \n>", "truncated": false}`.
/// The times are milliseconds since the Unix epoch.
///
/// # Example
///
/// ```no_run
/// use axum::Router;
/// use sse_resilience::{MemoryStore, SseResilienceLayer, StreamIdSource};
///
/// let layer = SseResilienceLayer::with_memory_store(MemoryStore::new())
///     .stream_id_source(StreamIdSource::path_segment("/api/stream/"));
/// let status = layer
///     .status_service()
///     .stream_id_source(StreamIdSource::path_segment("/api/status/"));
/// let app: Router = Router::new().route_service("/api/status/{id}", status);
/// # let _ = (app, layer);
/// ```
#[derive(Clone)]
pub struct StreamStatusService {
    store: Arc<dyn Store>,
    id_source: StreamIdSource,
    owner_source: OwnerSource,
}

impl StreamStatusService {
    pub(crate) fn new(
        store: Arc<dyn Store>,
        id_source: StreamIdSource,
        owner_source: OwnerSource,
    ) -> Self {
        Self {
            store,
            id_source,
            owner_source,
        }
    }

    /// Sets where the stream id is read. Default: the layer's source, which
    /// usually names the stream route, so a status route needs its own
    /// (`StreamIdSource::path_segment("/api/status/")`, say). A request whose
    /// path is outside a path source's prefix gets 404.
    pub fn stream_id_source(mut self, source: StreamIdSource) -> Self {
        self.id_source = source;
        self
    }

    /// Checks the request head and reads the stream, or responds at once.
    fn answer(&self, parts: &http::request::Parts) -> BoxFuture<Response<String>> {
        let ready =
            |response| -> BoxFuture<Response<String>> { Box::pin(std::future::ready(response)) };
        if parts.method != Method::GET && parts.method != Method::HEAD {
            let mut response = error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed");
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return ready(response);
        }
        let id = match self.id_source.lookup(parts) {
            IdLookup::NotApplicable => return ready(not_found()),
            IdLookup::Missing => {
                return ready(error_response(StatusCode::BAD_REQUEST, "missing stream id"));
            }
            IdLookup::Found(id) => id,
        };
        if let Err(error) = validate_stream_id(&id) {
            return ready(error_response(StatusCode::BAD_REQUEST, &error.to_string()));
        }
        let owner = match self.owner_source.lookup(parts).map(sanitize_owner) {
            None => String::new(),
            Some(Ok(owner)) => owner,
            Some(Err(reason)) => return ready(error_response(StatusCode::BAD_REQUEST, reason)),
        };

        let id: Arc<str> = id.into();
        let read = self.store.inspect(id.clone());
        Box::pin(async move {
            match read.await {
                // A stream of another owner is reported as unknown, so its existence is not revealed.
                Ok(Some(snapshot)) if snapshot.owner.is_empty() || snapshot.owner == owner => {
                    json_response(StatusCode::OK, &status_json(&id, snapshot))
                }
                Ok(_) => not_found(),
                Err(error) => {
                    tracing::warn!(stream_id = %id, %error, "reading the stream status failed");
                    error_response(StatusCode::SERVICE_UNAVAILABLE, "store unavailable")
                }
            }
        })
    }
}

impl<B> Service<Request<B>> for StreamStatusService {
    type Response = Response<String>;
    type Error = Infallible;
    type Future = StatusFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let (parts, _body) = request.into_parts();
        StatusFuture {
            future: self.answer(&parts),
        }
    }
}

impl fmt::Debug for StreamStatusService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamStatusService")
            .field("id_source", &self.id_source)
            .field("owner_source", &self.owner_source)
            .finish_non_exhaustive()
    }
}

/// Response future of [`StreamStatusService`].
pub struct StatusFuture {
    future: BoxFuture<Response<String>>,
}

impl Future for StatusFuture {
    type Output = Result<Response<String>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.future.as_mut().poll(cx).map(Ok)
    }
}

impl fmt::Debug for StatusFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StatusFuture").finish_non_exhaustive()
    }
}

/// Builds the JSON of a stream the caller may see.
fn status_json(id: &str, snapshot: StreamSnapshot) -> Value {
    let terminal = match &snapshot.terminal_event {
        Some(event) if snapshot.state != "active" => {
            terminal_json(event, snapshot.terminal_id.as_deref(), snapshot.truncated)
        }
        _ => Value::Null,
    };
    json!({
        "id": id,
        "state": snapshot.state,
        "type": snapshot.stream_type,
        "started_at_ms": snapshot.started_at,
        "last_refresh_ms": snapshot.last_refresh,
        "terminal": terminal,
    })
}

/// Parses a recorded terminal event into its type and data.
fn terminal_json(event: &Bytes, event_id: Option<&str>, truncated: bool) -> Value {
    let mut parser = EventStreamParser::new(event.len() + 2);
    let mut parsed: Option<(String, String)> = None;
    let mut keep_first = |event: &crate::parser::Event<'_>| {
        if parsed.is_none() {
            parsed = Some((event.event_type().to_owned(), event.data().into_owned()));
        }
    };
    parser.feed(event, &mut keep_first);
    // A truncated event lacks the blank line that dispatches it.
    parser.feed(b"\n\n", &mut keep_first);
    let (event_type, data) = parsed.unwrap_or_else(|| ("message".to_owned(), String::new()));
    json!({
        "event": event_type,
        "id": event_id,
        "data": data,
        "truncated": truncated,
    })
}

fn not_found() -> Response<String> {
    error_response(StatusCode::NOT_FOUND, "not found")
}

fn error_response(status: StatusCode, error: &str) -> Response<String> {
    json_response(status, &json!({ "error": error }))
}

fn json_response(status: StatusCode, body: &Value) -> Response<String> {
    let mut response = Response::new(body.to_string());
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_event_parsed() {
        let event = Bytes::from_static(b"id: 7\nevent: completed\ndata: a\ndata: b\n\n");
        let json = terminal_json(&event, Some("7"), false);
        assert_eq!(
            json,
            json!({"event": "completed", "id": "7", "data": "a\nb", "truncated": false})
        );
    }

    #[test]
    fn truncated_terminal_parsed() {
        let event = Bytes::from_static(b"event: failed\ndata: {\"type\":\"fai");
        let json = terminal_json(&event, None, true);
        assert_eq!(
            json,
            json!({"event": "failed", "id": null, "data": "{\"type\":\"fai", "truncated": true})
        );
    }

    #[test]
    fn message_event_without_type() {
        let event = Bytes::from_static(b"data: {\"type\":\"completed\"}\r\n\r\n");
        let json = terminal_json(&event, None, false);
        assert_eq!(json["event"], "message");
        assert_eq!(json["data"], "{\"type\":\"completed\"}");
    }
}
