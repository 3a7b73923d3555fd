//! The service the layer wraps around an inner service.

use std::{
    fmt,
    sync::Arc,
    sync::atomic::Ordering,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, header};
use http_body::Body;
use tower::Service;

use crate::{
    body::ResilientBody,
    future::{ResponseFuture, StreamRequest},
    layer::Shared,
    request::{
        IdLookup, InvalidId, StreamId, StreamMetadata, generate_stream_id, query_value,
        sanitize_owner, validate_stream_id,
    },
    store::{BoxFuture, OpenDecision, OpenRequest, OwnerSlot, StoreError, StreamRecord, now_ms},
};

/// Maximum length of a `Last-Event-ID` the layer compares; longer values are ignored.
pub(crate) const MAX_LAST_EVENT_ID_LEN: usize = 1024;

/// The name of the response header that carries a generated stream id.
pub const STREAM_ID_HEADER: &str = "x-stream-id";

/// Middleware that makes the event streams of the inner service resilient.
/// Created by [`SseResilienceLayer`](crate::SseResilienceLayer).
pub struct SseResilience<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SseResilience<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }
}

impl<S: Clone> Clone for SseResilience<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for SseResilience<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SseResilience")
            .field("inner", &self.inner)
            .field("config", &self.shared.config)
            .finish()
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SseResilience<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send,
    ReqBody: Send + 'static,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: fmt::Display,
{
    type Response = Response<ResilientBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, ReqBody>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        let (mut parts, body) = request.into_parts();

        // Streams are opened by GET (EventSource) and POST (APIs that stream
        // their response). A HEAD request has no body to stream, and claiming it
        // would drain a whole run that no client reads; DELETE, PUT and the
        // rest belong to the app.
        let lookup = if matches!(parts.method, Method::GET | Method::POST) {
            config.id_source.lookup(&parts)
        } else {
            IdLookup::NotApplicable
        };
        let id = match lookup {
            IdLookup::NotApplicable => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                );
            }
            // Without an id, only a request that accepts an event stream gets
            // one: other requests (JSON calls, pages) never touch the store.
            IdLookup::Missing if !accepts_event_stream(&parts.headers) => {
                return ResponseFuture::passthrough(
                    self.inner.call(Request::from_parts(parts, body)),
                );
            }
            IdLookup::Missing => generate_stream_id(),
            IdLookup::Found(id) => match validate_stream_id(&id) {
                Ok(()) => id,
                Err(error) => return ResponseFuture::ready(bad_request(&error)),
            },
        };

        if self.shared.shutdown.begun.load(Ordering::Relaxed) {
            // A request that accepts an event stream (as EventSource does) is
            // refused at once. Any other goes to the inner service unclaimed,
            // and only an event-stream response is replaced by the 503.
            if accepts_event_stream(&parts.headers) {
                return ResponseFuture::ready(shutting_down(config.shutdown_retry));
            }
            return ResponseFuture::refusing_event_streams(
                self.inner.call(Request::from_parts(parts, body)),
                config.shutdown_retry,
            );
        }

        let owner = match config.owner_source.lookup(&parts).map(sanitize_owner) {
            None => String::new(),
            Some(Ok(owner)) => owner,
            Some(Err(reason)) => {
                tracing::warn!(stream_id = %id, reason, "request rejected: invalid owner");
                return ResponseFuture::ready(plain_response(
                    http::StatusCode::BAD_REQUEST,
                    reason,
                ));
            }
        };

        let metadata = match parts.extensions.get::<StreamMetadata>() {
            Some(StreamMetadata(value)) => value.to_string(),
            None => {
                serde_json::json!({ "method": parts.method.as_str(), "path": parts.uri.path() })
                    .to_string()
            }
        };

        let id: Arc<str> = id.into();
        parts.extensions.insert(StreamId(id.clone()));
        let claim: Arc<str> = generate_stream_id().into();
        let last_event_id = last_event_id(&parts, config.event_log.is_some());
        let limited_owner = match config.max_streams_per_owner {
            Some(_) if !owner.is_empty() => Some(Arc::<str>::from(owner.as_str())),
            _ => None,
        };
        let record = Arc::new(StreamRecord {
            id: id.clone(),
            claim: claim.clone(),
            owner,
            instance: config.instance_id.clone(),
            stream_type: config.stream_type.clone(),
            metadata,
            started_at: now_ms(),
            live_ttl: config.live_ttl(),
            stale_threshold: config.stale_threshold,
            limited_owner,
        });
        let decision = open_within_owner_limit(
            &self.shared,
            OpenRequest {
                record: record.clone(),
                last_event_id: last_event_id.clone(),
                follow: config.event_log.is_some(),
            },
        );

        // The service that was made ready goes into the future; a clone takes its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);

        ResponseFuture::decide(
            decision,
            inner,
            Request::from_parts(parts, body),
            StreamRequest {
                shared: self.shared.clone(),
                id,
                claim,
                record,
                last_event_id: (!last_event_id.is_empty()).then(|| last_event_id.into()),
            },
        )
    }
}

/// Runs the open script and, when it claimed a stream whose owner is
/// limited, counts the stream among the owner's live streams: a second round
/// trip, on the owner's key. An owner at its limit gets the claim released
/// and [`OpenDecision::OwnerLimitReached`].
///
/// When the count fails, the stream is served, and the next registry refresh
/// counts it. With `fail_closed`, the claim is released and the error
/// returned instead.
fn open_within_owner_limit(
    shared: &Arc<Shared>,
    request: OpenRequest,
) -> BoxFuture<Result<OpenDecision, StoreError>> {
    let record = request.record.clone();
    let decision = shared.store.open(request);
    let (Some(owner), Some(max)) = (
        record.limited_owner.clone(),
        shared.config.max_streams_per_owner,
    ) else {
        return decision;
    };
    let store = shared.store.clone();
    let fail_closed = shared.config.fail_closed;
    Box::pin(async move {
        let decision = decision.await?;
        if decision != OpenDecision::Claimed {
            return Ok(decision);
        }
        let slot = OwnerSlot {
            owner,
            id: record.id.clone(),
            max,
            stale_threshold: record.stale_threshold,
            ttl: record.live_ttl,
        };
        let refusal = match store.claim_owner_slot(slot).await {
            Ok(true) => return Ok(OpenDecision::Claimed),
            Ok(false) => {
                tracing::debug!(
                    stream_id = %record.id,
                    max,
                    "owner is at its live-stream limit; releasing the claim"
                );
                Ok(OpenDecision::OwnerLimitReached)
            }
            Err(error) if !fail_closed => {
                tracing::warn!(
                    stream_id = %record.id,
                    %error,
                    "counting the owner's live streams failed; serving the stream"
                );
                return Ok(OpenDecision::Claimed);
            }
            Err(error) => Err(error),
        };
        if let Err(error) = store.release(record.id.clone(), record.claim.clone()).await {
            tracing::warn!(
                stream_id = %record.id,
                %error,
                "releasing the claim failed; it expires with its TTL"
            );
        }
        refusal
    })
}

/// Returns the request's last event id: its `Last-Event-ID` header or, when
/// `query_too` (the event log is on), the query parameter `last_event_id` for
/// clients that cannot set headers. Returns "" when there is none or it is not
/// a value a browser could have stored (NUL, CR or LF, or too long).
fn last_event_id(parts: &http::request::Parts, query_too: bool) -> String {
    let from_header = parts
        .headers
        .get("last-event-id")
        .map(|value| value.as_bytes().to_vec());
    let from_query = || {
        query_too
            .then(|| query_value(parts.uri.query(), "last_event_id"))
            .flatten()
            .map(String::into_bytes)
    };
    let Some(bytes) = from_header.or_else(from_query) else {
        return String::new();
    };
    if bytes.len() > MAX_LAST_EVENT_ID_LEN
        || bytes.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n'))
    {
        return String::new();
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Builds the 503 response of a layer that is shutting down.
pub(crate) fn shutting_down(retry: std::time::Duration) -> Response<Bytes> {
    service_unavailable("server is shutting down; retry on another instance", retry)
}

/// Builds a 503 response with `text` and a `Retry-After` of `retry`, rounded
/// up to whole seconds.
pub(crate) fn service_unavailable(text: &str, retry: std::time::Duration) -> Response<Bytes> {
    let mut response = plain_response(http::StatusCode::SERVICE_UNAVAILABLE, text);
    set_retry_after(&mut response, retry);
    response
}

/// Builds a 429 response with `text` and a `Retry-After` of `retry`, rounded
/// up to whole seconds.
pub(crate) fn too_many_requests(text: &str, retry: std::time::Duration) -> Response<Bytes> {
    let mut response = plain_response(http::StatusCode::TOO_MANY_REQUESTS, text);
    set_retry_after(&mut response, retry);
    response
}

fn set_retry_after(response: &mut Response<Bytes>, retry: std::time::Duration) {
    let seconds = retry.as_millis().div_ceil(1000).max(1);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(seconds as u64));
}

fn bad_request(error: &InvalidId) -> Response<Bytes> {
    plain_response(http::StatusCode::BAD_REQUEST, &error.to_string())
}

/// Builds a plain-text response of the layer itself.
pub(crate) fn plain_response(status: http::StatusCode, text: &str) -> Response<Bytes> {
    let mut response = Response::new(Bytes::from(format!("{text}\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Returns true when the `Accept` header lists `text/event-stream`.
fn accepts_event_stream(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| {
            let essence = item.split(';').next().unwrap_or_default().trim();
            essence.eq_ignore_ascii_case("text/event-stream")
        })
}

/// Returns true when a `Content-Type` is `text/event-stream`, compared
/// without case and parameters.
pub(crate) fn is_event_stream(headers: &http::HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("text/event-stream")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn event_stream_mime_matching() {
        for value in [
            "text/event-stream",
            "Text/Event-Stream",
            "text/event-stream; charset=utf-8",
            " text/event-stream ;x=1",
        ] {
            assert!(
                is_event_stream(&headers(&[("content-type", value)])),
                "{value}"
            );
        }
        for value in ["text/plain", "application/json", "text/event-streams", ""] {
            assert!(
                !is_event_stream(&headers(&[("content-type", value)])),
                "{value}"
            );
        }
        assert!(!is_event_stream(&headers(&[])));
    }

    #[test]
    fn last_event_id_hygiene() {
        let parts = |uri: &str, pairs: &[(&str, &str)]| {
            let mut request = http::Request::get(uri).body(()).unwrap();
            *request.headers_mut() = headers(pairs);
            request.into_parts().0
        };
        assert_eq!(
            last_event_id(&parts("/", &[("last-event-id", "42")]), false),
            "42"
        );
        assert_eq!(last_event_id(&parts("/", &[]), false), "");
        let long = "x".repeat(MAX_LAST_EVENT_ID_LEN + 1);
        assert_eq!(
            last_event_id(&parts("/", &[("last-event-id", &long)]), false),
            ""
        );
        assert_eq!(last_event_id(&parts("/?last_event_id=7", &[]), true), "7");
        assert_eq!(last_event_id(&parts("/?last_event_id=7", &[]), false), "");
        assert_eq!(
            last_event_id(&parts("/?last_event_id=7", &[("last-event-id", "8")]), true),
            "8"
        );
        assert_eq!(
            last_event_id(&parts("/?last_event_id=a%0Ab", &[]), true),
            ""
        );
        // The http crate rejects NUL, CR and LF in header values before the layer runs.
        assert!(HeaderValue::from_bytes(b"a\0b").is_err());
        assert!(HeaderValue::from_bytes(b"a\rb").is_err());
    }
}
