//! The response future of [`SseResilience`](crate::SseResilience).

use std::{
    fmt,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, header};
use http_body::Body;
use pin_project_lite::pin_project;
use tower::Service;

use crate::{
    body::{FollowStream, ResilientBody},
    layer::Shared,
    registry::LiveEntry,
    service::{
        STREAM_ID_HEADER, is_event_stream, plain_response, service_unavailable, shutting_down,
        too_many_requests,
    },
    store::{BoxFuture, OpenDecision, StoreError, StreamRecord},
    tracker::Tracker,
};

/// The stream a request is about, as the future needs it.
pub(crate) struct StreamRequest {
    pub shared: Arc<Shared>,
    pub id: Arc<str>,
    pub claim: Arc<str>,
    pub record: Arc<StreamRecord>,
    pub last_event_id: Option<Arc<str>>,
}

pin_project! {
    /// Response future of [`SseResilience`](crate::SseResilience).
    pub struct ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        #[pin]
        state: State<S, ReqBody, S::Future>,
    }

    impl<S, ReqBody> PinnedDrop for ResponseFuture<S, ReqBody>
    where
        S: Service<Request<ReqBody>>,
    {
        fn drop(this: Pin<&mut Self>) {
            // A request dropped before its response (the client went away) must not
            // leave its claim behind, or requests for the id would get 409 until the TTL runs out.
            match this.project().state.project() {
                StateProj::Deciding { decision, stream, .. } => {
                    if let (Some(decision), Some(stream)) = (decision.take(), stream.take()) {
                        release_when_claimed(decision, stream);
                    }
                }
                StateProj::Calling { stream, entry, .. } => {
                    if let (Some(stream), Some(entry)) = (stream.take(), entry.take()) {
                        release(&stream, Some(entry));
                    }
                }
                StateProj::Ready { .. } => {}
            }
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, ReqBody, F> {
        Deciding {
            decision: Option<BoxFuture<Result<OpenDecision, StoreError>>>,
            service: Option<S>,
            request: Option<Request<ReqBody>>,
            stream: Option<StreamRequest>,
        },
        Calling {
            #[pin]
            future: F,
            stream: Option<StreamRequest>,
            entry: Option<LiveEntry>,
            // During a shutdown: an event-stream response is replaced by 503
            // with this Retry-After; other responses pass through.
            refuse_event_stream: Option<Duration>,
        },
        Ready {
            response: Option<Response<ReadyBody>>,
        },
    }
}

impl<S, ReqBody> ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    /// Creates a future that resolves at once to a response of the layer itself.
    pub(crate) fn ready(response: Response<Bytes>) -> Self {
        Self {
            state: State::Ready {
                response: Some(response.map(ReadyBody::Full)),
            },
        }
    }

    pub(crate) fn passthrough(future: S::Future) -> Self {
        Self {
            state: State::Calling {
                future,
                stream: None,
                entry: None,
                refuse_event_stream: None,
            },
        }
    }

    /// Creates the future of a stream request during a shutdown: the request
    /// reaches the inner service unclaimed, and a new event stream is refused.
    pub(crate) fn refusing_event_streams(future: S::Future, retry: Duration) -> Self {
        Self {
            state: State::Calling {
                future,
                stream: None,
                entry: None,
                refuse_event_stream: Some(retry),
            },
        }
    }

    pub(crate) fn decide(
        decision: BoxFuture<Result<OpenDecision, StoreError>>,
        service: S,
        request: Request<ReqBody>,
        stream: StreamRequest,
    ) -> Self {
        Self {
            state: State::Deciding {
                decision: Some(decision),
                service: Some(service),
                request: Some(request),
                stream: Some(stream),
            },
        }
    }
}

impl<S, ReqBody, ResBody> Future for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: Body<Data = Bytes> + Send + 'static,
    ResBody::Error: fmt::Display,
{
    type Output = Result<Response<ResilientBody<ResBody>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Deciding {
                    decision,
                    service,
                    request,
                    stream,
                } => {
                    let pending = decision.as_mut().expect("polled after completion");
                    let result = ready!(pending.as_mut().poll(cx));
                    decision.take();
                    let stream_request = stream.take().expect("polled after completion");
                    let mut service = service.take().expect("polled after completion");
                    let request = request.take().expect("polled after completion");

                    let entry = match result {
                        Ok(OpenDecision::Claimed) => {
                            tracing::debug!(stream_id = %stream_request.id, "stream claimed");
                            Some(
                                stream_request
                                    .shared
                                    .registry
                                    .enter(stream_request.record.clone()),
                            )
                        }
                        Ok(OpenDecision::Follow) => {
                            let response = follow_response(&stream_request);
                            this.state.set(State::Ready {
                                response: Some(response),
                            });
                            continue;
                        }
                        Ok(other) => {
                            let response = answer_from_store(other, &stream_request);
                            this.state.set(State::Ready {
                                response: Some(response.map(ReadyBody::Full)),
                            });
                            continue;
                        }
                        Err(error) if stream_request.shared.config.fail_closed => {
                            tracing::warn!(
                                stream_id = %stream_request.id,
                                %error,
                                "redis unavailable; stream request refused (fail closed)"
                            );
                            if error.is_timeout() {
                                release(&stream_request, None);
                            }
                            let retry = stream_request.shared.config.shutdown_retry;
                            let response = service_unavailable(
                                "stream registry unavailable; retry later",
                                retry,
                            );
                            this.state.set(State::Ready {
                                response: Some(response.map(ReadyBody::Full)),
                            });
                            continue;
                        }
                        Err(error) => {
                            // Fail open: the stream runs without resilience rather than not at all.
                            tracing::warn!(
                                stream_id = %stream_request.id,
                                %error,
                                "redis unavailable; serving the stream without tracking"
                            );
                            // A timed-out open may still have claimed the id in Redis.
                            if error.is_timeout() {
                                release(&stream_request, None);
                            }
                            None
                        }
                    };
                    let future = service.call(request);
                    this.state.set(State::Calling {
                        future,
                        stream: Some(stream_request),
                        entry,
                        refuse_event_stream: None,
                    });
                }
                StateProj::Calling {
                    future,
                    stream,
                    entry,
                    refuse_event_stream,
                } => {
                    let result = ready!(future.poll(cx));
                    let stream = stream.take();
                    let entry = entry.take();
                    if let (Some(retry), Ok(response)) = (*refuse_event_stream, &result)
                        && is_event_stream(response.headers())
                    {
                        tracing::debug!("event-stream response replaced by 503: shutting down");
                        return Poll::Ready(Ok(shutting_down(retry).map(ResilientBody::full)));
                    }
                    return Poll::Ready(match result {
                        Ok(response) => Ok(wrap_response(response, stream, entry)),
                        Err(error) => {
                            if let (Some(stream), Some(entry)) = (stream, entry) {
                                release(&stream, Some(entry));
                            }
                            Err(error)
                        }
                    });
                }
                StateProj::Ready { response } => {
                    let response = response.take().expect("polled after completion");
                    return Poll::Ready(Ok(response.map(|body| match body {
                        ReadyBody::Full(bytes) => ResilientBody::full(bytes),
                        ReadyBody::Follow(stream) => ResilientBody::follow(stream),
                    })));
                }
            }
        }
    }
}

impl<S, ReqBody> fmt::Debug for ResponseFuture<S, ReqBody>
where
    S: Service<Request<ReqBody>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

/// Body of a response the layer builds itself.
pub(crate) enum ReadyBody {
    Full(Bytes),
    Follow(Box<FollowStream>),
}

/// Builds the response of a follower: the stream's logged events after the
/// request's Last-Event-ID (or from the start), then its live events.
fn follow_response(stream: &StreamRequest) -> Response<ReadyBody> {
    let shared = &stream.shared;
    let poller = shared
        .follow
        .as_ref()
        .expect("follow decisions need the event log, which starts the poller");
    tracing::info!(
        stream_id = %stream.id,
        last_event_id = stream.last_event_id.as_deref().unwrap_or(""),
        "serving the stream from its event log"
    );
    let (handle, rx) = poller.follow(stream.id.clone(), stream.last_event_id.clone());
    let config = &shared.config;
    let heartbeat = config
        .heartbeat_interval
        .map(|interval| (interval, config.heartbeat_frame.clone()));
    let body = FollowStream::new(shared.clone(), handle, rx, heartbeat);
    let mut response = Response::new(ReadyBody::Follow(Box::new(body)));
    set_event_stream_headers(response.headers_mut());
    set_stream_id(&mut response, &stream.id);
    response
}

/// Builds the layer's own response for a stream that is not claimed.
fn answer_from_store(decision: OpenDecision, stream: &StreamRequest) -> Response<Bytes> {
    let id = &stream.id;
    match decision {
        OpenDecision::Replay(event) => {
            tracing::info!(stream_id = %id, "replaying the terminal event of a finished stream");
            crate::metrics::replay_served();
            let mut response = Response::new(event);
            set_event_stream_headers(response.headers_mut());
            set_stream_id(&mut response, id);
            response
        }
        OpenDecision::Gone => {
            tracing::debug!(stream_id = %id, "client already has the terminal event");
            let mut response = Response::new(Bytes::new());
            *response.status_mut() = StatusCode::NO_CONTENT;
            response
        }
        OpenDecision::NotFound => {
            tracing::info!(stream_id = %id, "stream belongs to another owner");
            plain_response(StatusCode::NOT_FOUND, "stream not found")
        }
        OpenDecision::Live => {
            tracing::info!(stream_id = %id, "stream is live on another connection");
            plain_response(
                StatusCode::CONFLICT,
                &format!("stream {id} is live on another connection; retry after it ends"),
            )
        }
        OpenDecision::OwnerLimitReached => {
            tracing::info!(stream_id = %id, "owner has too many live streams");
            too_many_requests(
                "too many live streams for this owner; retry after one ends",
                stream.shared.config.owner_limit_retry,
            )
        }
        OpenDecision::Claimed | OpenDecision::Follow => {
            unreachable!("claimed and followed streams have their own responses")
        }
    }
}

fn wrap_response<B>(
    response: Response<B>,
    stream: Option<StreamRequest>,
    entry: Option<LiveEntry>,
) -> Response<ResilientBody<B>>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Display,
{
    let event_stream = is_event_stream(response.headers());
    let Some(stream) = stream else {
        return passthrough(response, event_stream);
    };
    if !event_stream {
        if let Some(entry) = entry {
            release(&stream, Some(entry));
        }
        return passthrough(response, false);
    }
    if let Some(encoding) = content_encoding(response.headers()) {
        // Compressed bytes cannot be scanned for events, and a heartbeat
        // inserted into them would corrupt the stream.
        tracing::warn!(
            stream_id = %stream.id,
            encoding,
            "event stream with a content encoding passes through untracked; compress outside the layer"
        );
        if let Some(entry) = entry {
            release(&stream, Some(entry));
        }
        return passthrough(response, true);
    }

    let (mut parts, body) = response.into_parts();
    set_event_stream_headers_if_missing(&mut parts.headers);
    if let Ok(value) = HeaderValue::from_str(&stream.id) {
        parts
            .headers
            .insert(HeaderName::from_static(STREAM_ID_HEADER), value);
    }

    // Without an entry (Redis was unavailable) the body still gets heartbeats
    // and the lifetime limit, but nothing is recorded.
    let config = &stream.shared.config;
    let heartbeat = config
        .heartbeat_interval
        .map(|interval| (interval, config.heartbeat_frame.clone()));
    let body = ResilientBody::tracked(
        body,
        Tracker::new(stream.shared.clone(), entry),
        heartbeat,
        config.max_stream_lifetime,
        config.drain_timeout,
    );
    Response::from_parts(parts, body)
}

/// Passes `response` through with its body untouched. An event stream still
/// gets the headers that keep proxies from caching or buffering it.
fn passthrough<B>(mut response: Response<B>, event_stream: bool) -> Response<ResilientBody<B>> {
    if event_stream {
        set_event_stream_headers_if_missing(response.headers_mut());
    }
    response.map(ResilientBody::passthrough)
}

/// Returns the response's content encoding unless it is absent or `identity`.
fn content_encoding(headers: &http::HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_ENCODING)?;
    let text = String::from_utf8_lossy(value.as_bytes());
    let text = text.trim();
    (!text.is_empty() && !text.eq_ignore_ascii_case("identity")).then(|| text.to_owned())
}

/// Gives up a claim whose stream will not run: its response is not an event
/// stream, the inner service failed, or the request was dropped.
fn release(stream: &StreamRequest, entry: Option<LiveEntry>) {
    let store = stream.shared.store.clone();
    let id = stream.id.clone();
    let claim = stream.claim.clone();
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(stream_id = %id, "no tokio runtime to release the claim; it expires with its TTL");
        return;
    };
    tracing::debug!(stream_id = %id, "releasing the claim");
    runtime.spawn(async move {
        let released = match store.release(id.clone(), claim).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(stream_id = %id, %error, "releasing the claim failed; it expires with its TTL");
                false
            }
        };
        if let Some(entry) = entry {
            entry.finish(released);
        }
    });
}

/// Waits for the open script of a dropped request and releases the claim it made, if any.
fn release_when_claimed(
    decision: BoxFuture<Result<OpenDecision, StoreError>>,
    stream: StreamRequest,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        match decision.await {
            // A stream counted for its owner leaves the owner's set through the registry.
            Ok(OpenDecision::Claimed) if stream.record.limited_owner.is_some() => {
                let entry = stream.shared.registry.enter(stream.record.clone());
                release(&stream, Some(entry));
            }
            Ok(OpenDecision::Claimed) => release(&stream, None),
            Ok(_) => {}
            Err(error) if error.is_timeout() => release(&stream, None),
            Err(_) => {}
        }
    });
}

fn set_stream_id<B>(response: &mut Response<B>, id: &str) {
    if let Ok(value) = HeaderValue::from_str(id) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(STREAM_ID_HEADER), value);
    }
}

fn set_event_stream_headers(headers: &mut http::HeaderMap) {
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    set_event_stream_headers_if_missing(headers);
}

/// Sets the headers that keep proxies from caching or buffering a stream,
/// unless the inner service set them.
fn set_event_stream_headers_if_missing(headers: &mut http::HeaderMap) {
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-cache"));
    headers
        .entry(HeaderName::from_static("x-accel-buffering"))
        .or_insert(HeaderValue::from_static("no"));
}
