//! The `proxy` command: an HTTP reverse proxy with the layer in front of the
//! upstream server, so its event streams get replay, drain and heartbeats.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use clap::Args;
use http::{
    HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version, header,
    uri::{Authority, PathAndQuery},
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use sse_resilience::{
    DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_MAX_EVENTS, EventLog, SseResilienceLayer, StreamGuardian,
    StreamIdSource, TerminalRule, parser::DEFAULT_MAX_EVENT_BYTES,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

use crate::{
    CliError, Redis, RedisArgs, parse_duration, parse_positive_duration, shutdown_signal,
    with_connection,
};

/// Time given to open connections to close after the layer's shutdown.
const CONNECTION_CLOSE_WAIT: Duration = Duration::from_secs(5);

#[derive(Args, Debug)]
pub struct ProxyArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// Base URL of the upstream HTTP server, such as http://127.0.0.1:8000.
    /// A path in it is put before every request path. Only http is supported.
    #[arg(long, value_parser = parse_upstream)]
    upstream: Upstream,

    /// Time-out of one connection attempt to the upstream.
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    upstream_connect_timeout: Duration,

    /// Time the upstream has to send its response headers, counted from the
    /// start of the request (connection and request body included). Past
    /// it the client gets 504.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    upstream_timeout: Duration,

    /// The location of a request's stream id: query:NAME (a query parameter),
    /// path:PREFIX (the path segment after PREFIX; other paths are not
    /// streams) or header:NAME.
    #[arg(long, default_value = "query:stream_id", value_parser = parse_id_source)]
    id_source: StreamIdSource,

    /// Request header with the owner of a stream; a stream with an owner is
    /// replayed only to requests of the same owner. Trust it only when a proxy
    /// in front of this one sets it.
    #[arg(long, value_parser = parse_header_name)]
    owner_header: Option<HeaderName>,

    /// Idle time after which a heartbeat comment is sent.
    #[arg(long, default_value = "15s", value_parser = parse_positive_duration)]
    heartbeat_interval: Duration,

    /// Text of the heartbeat comment.
    #[arg(long, default_value = sse_resilience::DEFAULT_HEARTBEAT_COMMENT, value_parser = parse_comment)]
    heartbeat_comment: String,

    /// Send no heartbeats.
    #[arg(long, conflicts_with_all = ["heartbeat_interval", "heartbeat_comment"])]
    no_heartbeats: bool,

    /// Age of the last refresh after which a guardian marks a stream
    /// orphaned; streams are refreshed every third of it.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    stale_threshold: Duration,

    /// A stream open longer than this is ended and recorded as failed.
    #[arg(long, default_value = "1h", value_parser = parse_positive_duration)]
    max_stream_lifetime: Duration,

    /// How long a finished stream's terminal event is kept for replay.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    completion_ttl: Duration,

    /// How long the upstream response is read after the client left; 0
    /// stops at once.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Event types that complete a stream, comma-separated. With this or
    /// --failed-events, only the listed event types end streams. Without
    /// both, an event of type `completed` or `failed` ends a stream, and so
    /// does a JSON `type` field with one of these values.
    #[arg(long, value_delimiter = ',', value_name = "TYPES")]
    completed_events: Vec<String>,

    /// Event types that fail a stream, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "TYPES")]
    failed_events: Vec<String>,

    /// Keep a log of every event, so clients resume with Last-Event-ID on
    /// any instance and a second client can follow a live stream.
    #[arg(long)]
    event_log: bool,

    /// With --event-log: events kept per stream.
    #[arg(long, default_value_t = DEFAULT_LOG_MAX_EVENTS, requires = "event_log")]
    log_max_events: usize,

    /// With --event-log: bytes kept per stream.
    #[arg(long, default_value_t = DEFAULT_LOG_MAX_BYTES, requires = "event_log")]
    log_max_bytes: usize,

    /// With --event-log: give each event without an `id:` line its position
    /// in the stream as id (this changes the bytes clients receive).
    #[arg(long, requires = "event_log")]
    assign_ids: bool,

    /// Bytes of one event kept while scanning; a larger terminal event is
    /// stored truncated.
    #[arg(long, default_value_t = DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,

    /// Stream type stored in the registry.
    #[arg(long, default_value = sse_resilience::DEFAULT_STREAM_TYPE)]
    stream_type: String,

    /// Instance id stored with this proxy's streams. Default: the process id
    /// and a random suffix.
    #[arg(long)]
    instance_id: Option<String>,

    /// Respond to stream requests with 503 when Redis fails, instead of serving
    /// them untracked.
    #[arg(long)]
    fail_closed: bool,

    /// On Ctrl-C or SIGTERM: how long live streams may run on before they
    /// are recorded as failed with reason `shutdown`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    shutdown_grace: Duration,

    /// Reconnection delay suggested to clients during a shutdown.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    shutdown_retry: Duration,

    /// Also run a guardian in this process.
    #[arg(long)]
    guardian: bool,

    /// With --guardian: time between two sweeps.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration, requires = "guardian")]
    sweep_interval: Duration,
}

/// Runs the proxy until Ctrl-C or SIGTERM, then shuts the layer down gracefully.
pub async fn run(args: ProxyArgs, redis: Redis) -> Result<(), CliError> {
    let layer = with_connection!(redis.connection.clone(), conn => SseResilienceLayer::new(conn));
    let layer = configure(layer, &args, &redis.args);
    let shutdown = layer.shutdown_handle();

    let stop_guardian = CancellationToken::new();
    let guardian = args.guardian.then(|| {
        let guardian =
            with_connection!(redis.connection.clone(), conn => StreamGuardian::new(conn))
                .key_prefix(&redis.args.key_prefix)
                .redis_timeout(redis.args.redis_timeout)
                .stale_threshold(args.stale_threshold)
                .completion_ttl(args.completion_ttl)
                .sweep_interval(args.sweep_interval);
        tokio::spawn(guardian.run_with_token(stop_guardian.clone()))
    });

    let listener = TcpListener::bind(args.listen).await.map_err(|error| {
        CliError::new(format!(
            "cannot listen on {}: {error}; pass a free address with --listen",
            args.listen
        ))
    })?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(args.upstream_connect_timeout));
    let client = Client::builder(TokioExecutor::new()).build(connector);
    tracing::info!(
        listen = %args.listen,
        upstream = %args.upstream,
        redis = %redis.target(),
        key_prefix = %redis.args.key_prefix,
        id_source = ?args.id_source,
        "proxy listening"
    );

    let connections = GracefulShutdown::new();
    let http = auto::Builder::new(TokioExecutor::new());
    let signal = shutdown_signal();
    tokio::pin!(signal);
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Such as too many open files: wait instead of spinning.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut signal => break,
        };
        let forward = Forward {
            client: client.clone(),
            upstream: args.upstream.clone(),
            upstream_timeout: args.upstream_timeout,
            peer,
        };
        let service = TowerToHyperService::new(layer.layer(forward));
        let connection = http
            .serve_connection(TokioIo::new(socket), service)
            .into_owned();
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }

    drop(listener);
    tracing::info!("shutting down: live streams are handed over, new ones are refused");
    let report = shutdown.shutdown(args.shutdown_grace).await;
    tracing::info!(?report, "streams handed over");
    if tokio::time::timeout(CONNECTION_CLOSE_WAIT, connections.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown; closing them");
    }
    stop_guardian.cancel();
    if let Some(guardian) = guardian {
        let _ = guardian.await;
    }
    tracing::info!("proxy stopped");
    Ok(())
}

fn configure(layer: SseResilienceLayer, args: &ProxyArgs, redis: &RedisArgs) -> SseResilienceLayer {
    let mut layer = layer
        .key_prefix(&redis.key_prefix)
        .redis_timeout(redis.redis_timeout)
        .stream_id_source(args.id_source.clone())
        .stale_threshold(args.stale_threshold)
        .max_stream_lifetime(args.max_stream_lifetime)
        .completion_ttl(args.completion_ttl)
        .drain_timeout(args.drain_timeout)
        .max_event_bytes(args.max_event_bytes)
        .stream_type(&args.stream_type)
        .shutdown_retry(args.shutdown_retry)
        .fail_closed(args.fail_closed);
    layer = if args.no_heartbeats {
        layer.without_heartbeats()
    } else {
        layer
            .heartbeat_interval(args.heartbeat_interval)
            .heartbeat_comment(&args.heartbeat_comment)
    };
    if let Some(header) = &args.owner_header {
        layer = layer.owner_header(header.clone());
    }
    if let Some(instance) = &args.instance_id {
        layer = layer.instance_id(instance);
    }
    if !args.completed_events.is_empty() || !args.failed_events.is_empty() {
        layer = layer.terminal_rule(TerminalRule::event_types(
            args.completed_events.clone(),
            args.failed_events.clone(),
        ));
    }
    if args.event_log {
        layer = layer.event_log(
            EventLog::new()
                .max_events(args.log_max_events)
                .max_bytes(args.log_max_bytes)
                .assign_ids(args.assign_ids),
        );
    }
    layer
}

/// The base URL of the upstream server.
#[derive(Clone, Debug)]
pub struct Upstream {
    authority: Authority,
    /// The path of the base URL without its trailing slash, often empty.
    path_prefix: String,
}

impl std::fmt::Display for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.path_prefix)
    }
}

impl Upstream {
    /// Returns the upstream URI of a request URI: the base path, then the
    /// request's path and query.
    fn uri_for(&self, request: &Uri) -> Result<Uri, http::Error> {
        let path_and_query = request.path_and_query().map_or("/", PathAndQuery::as_str);
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.path_prefix))
            .build()
    }
}

fn parse_upstream(text: &str) -> Result<Upstream, String> {
    let uri: Uri = text
        .parse()
        .map_err(|error| format!("invalid upstream URL {text:?}: {error}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "unsupported upstream URL {text:?}: https is not supported; use http:// to a server on a trusted network"
            ));
        }
        _ => {
            return Err(format!(
                "invalid upstream URL {text:?}: it must start with http://, such as http://127.0.0.1:8000"
            ));
        }
    }
    let Some(authority) = uri.authority().cloned() else {
        return Err(format!(
            "invalid upstream URL {text:?}: the host is missing"
        ));
    };
    if uri.query().is_some() {
        return Err(format!(
            "invalid upstream URL {text:?}: a query is not allowed"
        ));
    }
    Ok(Upstream {
        authority,
        path_prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

fn parse_id_source(text: &str) -> Result<StreamIdSource, String> {
    let usage = "use query:NAME, path:PREFIX or header:NAME";
    let Some((kind, value)) = text.split_once(':') else {
        return Err(format!("invalid id source {text:?}: {usage}"));
    };
    if value.is_empty() {
        return Err(format!(
            "invalid id source {text:?}: the name is empty; {usage}"
        ));
    }
    match kind {
        "query" => Ok(StreamIdSource::query(value)),
        "path" if value.starts_with('/') => Ok(StreamIdSource::path_segment(value)),
        "path" => Err(format!(
            "invalid id source {text:?}: the path prefix must start with /"
        )),
        "header" => Ok(StreamIdSource::header(parse_header_name(value)?)),
        _ => Err(format!("invalid id source {text:?}: {usage}")),
    }
}

fn parse_header_name(text: &str) -> Result<HeaderName, String> {
    HeaderName::try_from(text).map_err(|_| format!("invalid header name {text:?}"))
}

fn parse_comment(text: &str) -> Result<String, String> {
    if text.contains(['\r', '\n']) {
        return Err("invalid heartbeat comment: it must not contain CR or LF".to_owned());
    }
    Ok(text.to_owned())
}

/// The body of a proxied response: the upstream's, or the proxy's own.
type ProxyBody = Either<Incoming, Full<Bytes>>;

/// The inner service: forwards a request to the upstream and streams its
/// response back.
#[derive(Clone)]
struct Forward {
    client: Client<HttpConnector, Incoming>,
    upstream: Upstream,
    /// Time the upstream has to send its response headers.
    upstream_timeout: Duration,
    /// Address of the client connection, for `X-Forwarded-For`.
    peer: SocketAddr,
}

impl Service<Request<Incoming>> for Forward {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Incoming>) -> Self::Future {
        Box::pin(self.clone().forward(request))
    }
}

impl Forward {
    async fn forward(self, request: Request<Incoming>) -> Result<Response<ProxyBody>, Infallible> {
        let (mut parts, body) = request.into_parts();
        let client_version = parts.version;
        let uri = match self.upstream.uri_for(&parts.uri) {
            Ok(uri) => uri,
            Err(error) => {
                tracing::info!(uri = %parts.uri, %error, "request rejected: its path does not fit the upstream URL");
                return Ok(plain(StatusCode::BAD_REQUEST, "invalid request path"));
            }
        };

        let original_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            let authority = parts.uri.authority()?;
            HeaderValue::from_str(authority.as_str()).ok()
        });
        remove_hop_by_hop(&mut parts.headers);
        add_forwarded_headers(&mut parts.headers, self.peer, original_host);
        if accepts_event_stream(&parts.headers) {
            // The layer cannot scan or extend a compressed event stream, so the
            // proxy requests plain bytes from the upstream.
            parts.headers.insert(
                header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
        if let Ok(host) = HeaderValue::from_str(self.upstream.authority.as_str()) {
            parts.headers.insert(header::HOST, host);
        }
        let path = uri.path().to_owned();
        parts.uri = uri;
        parts.version = Version::HTTP_11;

        let request = self.client.request(Request::from_parts(parts, body));
        let Ok(result) = tokio::time::timeout(self.upstream_timeout, request).await else {
            // Dropping the request closes its upstream connection. The layer
            // releases the stream's claim, since this is no event stream.
            tracing::warn!(
                upstream = %self.upstream,
                %path,
                timeout = ?self.upstream_timeout,
                "upstream sent no response headers in time"
            );
            return Ok(plain(
                StatusCode::GATEWAY_TIMEOUT,
                &format!(
                    "gateway timeout: the upstream {} sent no response headers within {:?}",
                    self.upstream, self.upstream_timeout
                ),
            ));
        };
        match result {
            Ok(response) => {
                let (mut parts, body) = response.into_parts();
                remove_hop_by_hop(&mut parts.headers);
                // The client's HTTP version, not the upstream's: an HTTP/1.0
                // upstream must not turn off keep-alive and chunking for the client.
                parts.version = client_version;
                Ok(Response::from_parts(parts, Either::Left(body)))
            }
            Err(error) => {
                let cause = error_chain(&error);
                tracing::warn!(upstream = %self.upstream, error = %cause, "upstream request failed");
                Ok(plain(
                    StatusCode::BAD_GATEWAY,
                    &format!(
                        "bad gateway: the upstream {} failed: {cause}",
                        self.upstream
                    ),
                ))
            }
        }
    }
}

/// Headers that describe one connection, so a proxy does not forward them;
/// the headers named in `Connection` are removed too.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::TRANSFER_ENCODING);
}

fn add_forwarded_headers(headers: &mut HeaderMap, peer: SocketAddr, host: Option<HeaderValue>) {
    let client = peer.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) => format!("{earlier}, {client}"),
        None => client,
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded_for) {
        headers.insert("x-forwarded-for", value);
    }
    if let Some(host) = host
        && !headers.contains_key("x-forwarded-host")
    {
        headers.insert("x-forwarded-host", host);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }
}

fn accepts_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.to_ascii_lowercase().contains("text/event-stream"))
}

fn plain(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(format!(
        "{message}\n"
    )))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Joins an error and its sources: `client error (Connect): tcp connect
/// error: Connection refused (os error 111)`.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_library() {
        use clap::Parser;

        #[derive(Parser)]
        struct Wrapper {
            #[command(flatten)]
            proxy: ProxyArgs,
        }
        let args = Wrapper::parse_from(["proxy", "--upstream", "http://127.0.0.1:1"]).proxy;
        assert_eq!(
            args.heartbeat_interval,
            sse_resilience::DEFAULT_HEARTBEAT_INTERVAL
        );
        assert_eq!(
            args.stale_threshold,
            sse_resilience::DEFAULT_STALE_THRESHOLD
        );
        assert_eq!(
            args.max_stream_lifetime,
            sse_resilience::DEFAULT_MAX_STREAM_LIFETIME
        );
        assert_eq!(args.completion_ttl, sse_resilience::DEFAULT_COMPLETION_TTL);
        assert_eq!(args.drain_timeout, sse_resilience::DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(args.shutdown_retry, sse_resilience::DEFAULT_SHUTDOWN_RETRY);
        assert_eq!(args.sweep_interval, sse_resilience::DEFAULT_SWEEP_INTERVAL);
        assert_eq!(args.upstream_timeout, Duration::from_secs(30));
    }

    #[test]
    fn upstream_urls_are_checked() {
        let upstream = parse_upstream("http://127.0.0.1:8000/api/").unwrap();
        assert_eq!(upstream.to_string(), "http://127.0.0.1:8000/api");
        let uri = upstream.uri_for(&"/stream/1?x=2".parse().unwrap()).unwrap();
        assert_eq!(uri, "http://127.0.0.1:8000/api/stream/1?x=2");

        let root = parse_upstream("http://127.0.0.1:8000").unwrap();
        let uri = root.uri_for(&"/".parse().unwrap()).unwrap();
        assert_eq!(uri, "http://127.0.0.1:8000/");

        assert!(
            parse_upstream("https://127.0.0.1")
                .unwrap_err()
                .contains("https")
        );
        assert!(parse_upstream("127.0.0.1:8000").is_err());
        assert!(parse_upstream("http://127.0.0.1:8000/?a=1").is_err());
        assert!(parse_upstream("ftp://127.0.0.1").is_err());
    }

    #[test]
    fn id_sources_parse() {
        assert!(parse_id_source("query:stream_id").is_ok());
        assert!(parse_id_source("path:/stream/").is_ok());
        assert!(parse_id_source("header:x-stream-id").is_ok());
        assert!(parse_id_source("path:stream").is_err());
        assert!(parse_id_source("header:bad header").is_err());
        assert!(parse_id_source("query:").is_err());
        assert!(parse_id_source("cookie:id").is_err());
        assert!(parse_id_source("stream_id").is_err());
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("keep-alive, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("x-end-to-end", HeaderValue::from_static("kept"));

        remove_hop_by_hop(&mut headers);

        assert_eq!(headers.len(), 1);
        assert_eq!(headers["x-end-to-end"], "kept");
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();

        add_forwarded_headers(
            &mut headers,
            peer,
            Some(HeaderValue::from_static("example.test")),
        );

        assert_eq!(headers["x-forwarded-for"], "192.0.2.1, 127.0.0.1");
        assert_eq!(headers["x-forwarded-host"], "example.test");
        assert_eq!(headers["x-forwarded-proto"], "http");
    }
}
