//! Sources of a request's stream id and owner, and the id checks.

use std::{fmt, sync::Arc};

use http::{HeaderName, request::Parts};

/// Maximum length of a stream id, in bytes.
pub const MAX_STREAM_ID_LEN: usize = 128;

/// Maximum length of an owner, in bytes.
pub const MAX_OWNER_LEN: usize = 256;

/// The source of a request's stream id.
///
/// The default is the query parameter `stream_id`. A request that carries no
/// id gets a generated one, returned in the `X-Stream-Id` response header.
/// With [`StreamIdSource::path_segment`], requests whose path is outside the
/// given prefix are not streams: they pass through without touching Redis.
#[derive(Clone)]
pub struct StreamIdSource {
    kind: SourceKind,
}

#[derive(Clone)]
enum SourceKind {
    Query(Arc<str>),
    PathSegment(Arc<str>),
    Header(HeaderName),
    Custom(Arc<ExtractId>),
}

type ExtractId = dyn Fn(&Parts) -> Option<String> + Send + Sync;

/// Result of looking up a stream id in a request.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum IdLookup {
    /// The request names this id (not yet validated).
    Found(String),
    /// The request is a stream request without an id: the layer generates one.
    Missing,
    /// The request is not a stream request: it passes through untouched.
    NotApplicable,
}

impl StreamIdSource {
    /// Reads the id from the query parameter `name`.
    pub fn query(name: impl Into<String>) -> Self {
        Self {
            kind: SourceKind::Query(name.into().into()),
        }
    }

    /// Reads the id from the path segment right after `prefix`.
    ///
    /// With prefix `/api/stream/`, the request `/api/stream/abc` has the id
    /// `abc`, `/api/stream/` has none (one is generated), and `/healthz` and
    /// `/api/stream/abc/more` are not stream requests. The path is the one the
    /// layer receives: inside a nested axum router the nest prefix is already
    /// removed.
    pub fn path_segment(prefix: impl Into<String>) -> Self {
        let mut prefix = prefix.into();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Self {
            kind: SourceKind::PathSegment(prefix.into()),
        }
    }

    /// Reads the id from the request header `name`.
    pub fn header(name: HeaderName) -> Self {
        Self {
            kind: SourceKind::Header(name),
        }
    }

    /// Reads the id with a function of the request head; `None` means the
    /// request has no id and gets a generated one.
    pub fn custom<F>(extract: F) -> Self
    where
        F: Fn(&Parts) -> Option<String> + Send + Sync + 'static,
    {
        Self {
            kind: SourceKind::Custom(Arc::new(extract)),
        }
    }

    pub(crate) fn lookup(&self, parts: &Parts) -> IdLookup {
        match &self.kind {
            SourceKind::Query(name) => match query_value(parts.uri.query(), name) {
                Some(value) => IdLookup::Found(value),
                None => IdLookup::Missing,
            },
            SourceKind::PathSegment(prefix) => {
                let Some(rest) = parts.uri.path().strip_prefix(&**prefix) else {
                    return IdLookup::NotApplicable;
                };
                // Only `{prefix}{id}` and `{prefix}{id}/` name a stream; deeper paths are other routes.
                let segment = rest.strip_suffix('/').unwrap_or(rest);
                if segment.contains('/') {
                    IdLookup::NotApplicable
                } else if segment.is_empty() {
                    IdLookup::Missing
                } else {
                    IdLookup::Found(percent_decode(segment, false))
                }
            }
            SourceKind::Header(name) => match parts.headers.get(name) {
                Some(value) => {
                    IdLookup::Found(String::from_utf8_lossy(value.as_bytes()).into_owned())
                }
                None => IdLookup::Missing,
            },
            SourceKind::Custom(extract) => match extract(parts) {
                Some(value) => IdLookup::Found(value),
                None => IdLookup::Missing,
            },
        }
    }
}

impl Default for StreamIdSource {
    fn default() -> Self {
        Self::query("stream_id")
    }
}

impl fmt::Debug for StreamIdSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            SourceKind::Query(name) => f.debug_tuple("StreamIdSource::Query").field(name).finish(),
            SourceKind::PathSegment(prefix) => f
                .debug_tuple("StreamIdSource::PathSegment")
                .field(prefix)
                .finish(),
            SourceKind::Header(name) => {
                f.debug_tuple("StreamIdSource::Header").field(name).finish()
            }
            SourceKind::Custom(_) => f.write_str("StreamIdSource::Custom(..)"),
        }
    }
}

/// The source of a request's owner.
///
/// When a stream has an owner, its replay is served only to requests of the
/// same owner; any other request gets 404. The default is no owner, so a
/// stream is readable by anyone who has its id.
#[derive(Clone, Debug, Default)]
pub enum OwnerSource {
    /// Streams have no owner.
    #[default]
    None,
    /// The [`StreamOwner`] request extension, set by the app's authentication
    /// middleware before this layer runs. A request without it has no owner.
    Extension,
    /// A request header. Trust it only when a proxy in front sets it.
    Header(HeaderName),
}

impl OwnerSource {
    pub(crate) fn lookup(&self, parts: &Parts) -> Option<String> {
        match self {
            OwnerSource::None => None,
            OwnerSource::Extension => parts.extensions.get::<StreamOwner>().map(|o| o.0.clone()),
            OwnerSource::Header(name) => parts
                .headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        }
    }
}

/// The owner of a request, as a request extension set by the app's
/// authentication (used with [`OwnerSource::Extension`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamOwner(pub String);

/// The id of the stream a request is about, as a request extension the layer
/// sets before it calls the inner service. It is the generated id when the
/// request carried none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamId(pub Arc<str>);

impl StreamId {
    /// Returns the id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Metadata JSON stored with a stream in the registry, as a request extension
/// set by the app. Without it the layer stores the request method and path.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamMetadata(pub serde_json::Value);

/// The reason a stream id was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidId {
    /// The id is empty.
    Empty,
    /// The id is longer than [`MAX_STREAM_ID_LEN`] bytes.
    TooLong(usize),
    /// The id contains a character outside `A-Z a-z 0-9 . _ ~ -`.
    BadCharacter(char),
    /// The id is `.` or `..`, path segments that browsers, HTTP clients and
    /// proxies rewrite, so no client could ask for the stream again.
    DotSegment,
}

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidId::Empty => f.write_str("invalid stream id: it is empty"),
            InvalidId::TooLong(len) => write!(
                f,
                "invalid stream id: it is {len} bytes long, the maximum is {MAX_STREAM_ID_LEN}"
            ),
            InvalidId::BadCharacter(c) => write!(
                f,
                "invalid stream id: character {c:?} is not allowed, use only A-Z a-z 0-9 . _ ~ -"
            ),
            InvalidId::DotSegment => {
                f.write_str("invalid stream id: `.` and `..` are path segments, not ids")
            }
        }
    }
}

impl std::error::Error for InvalidId {}

/// Checks that `id` has 1 to 128 characters of `A-Z a-z 0-9 . _ ~ -` and is
/// not `.` or `..`.
///
/// Stream ids become part of Redis key names, so nothing else is accepted.
pub fn validate_stream_id(id: &str) -> Result<(), InvalidId> {
    if id.is_empty() {
        return Err(InvalidId::Empty);
    }
    if id == "." || id == ".." {
        return Err(InvalidId::DotSegment);
    }
    if let Some(c) = id.chars().find(|c| !is_id_char(*c)) {
        return Err(InvalidId::BadCharacter(c));
    }
    if id.len() > MAX_STREAM_ID_LEN {
        return Err(InvalidId::TooLong(id.len()));
    }
    Ok(())
}

/// Returns a new random stream id: 32 lowercase hex digits (122 random bits).
pub fn generate_stream_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Returns `owner` when it is printable ASCII of at most [`MAX_OWNER_LEN`] bytes.
pub(crate) fn sanitize_owner(owner: String) -> Result<String, &'static str> {
    if owner.len() > MAX_OWNER_LEN {
        return Err("invalid owner: longer than 256 bytes");
    }
    if !owner.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("invalid owner: only printable ASCII without spaces is allowed");
    }
    Ok(owner)
}

fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '~' | '-')
}

/// Returns the decoded value of the query parameter `name`.
pub(crate) fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key, true) == name).then(|| percent_decode(value, true))
    })
}

/// Decodes `%XX` escapes, and `+` as a space when `plus_is_space` (in a query).
/// Invalid escapes are kept as they are, so a bad id is still rejected by
/// validation rather than silently altered.
fn percent_decode(input: &str, plus_is_space: bool) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match (hex_value(bytes[i + 1]), hex_value(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push(high << 4 | low);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            other => {
                out.push(other);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        http::Request::get(uri).body(()).unwrap().into_parts().0
    }

    #[test]
    fn valid_ids_accepted() {
        for id in ["a", "abc-DEF_0.9~", &"x".repeat(128)] {
            assert_eq!(validate_stream_id(id), Ok(()), "{id}");
        }
    }

    #[test]
    fn invalid_ids_rejected() {
        assert_eq!(validate_stream_id(""), Err(InvalidId::Empty));
        assert_eq!(
            validate_stream_id(&"x".repeat(129)),
            Err(InvalidId::TooLong(129))
        );
        for (id, bad) in [
            ("a b", ' '),
            ("a{b}", '{'),
            ("a*", '*'),
            ("a:b", ':'),
            ("é", 'é'),
            ("a\0", '\0'),
        ] {
            assert_eq!(
                validate_stream_id(id),
                Err(InvalidId::BadCharacter(bad)),
                "{id:?}"
            );
        }
        assert_eq!(validate_stream_id("."), Err(InvalidId::DotSegment));
        assert_eq!(validate_stream_id(".."), Err(InvalidId::DotSegment));
        assert_eq!(validate_stream_id("..."), Ok(()));
        assert_eq!(validate_stream_id(".a"), Ok(()));
    }

    #[test]
    fn query_source_reads_parameter() {
        let source = StreamIdSource::default();
        assert_eq!(
            source.lookup(&parts("/s?a=1&stream_id=abc")),
            IdLookup::Found("abc".into())
        );
        assert_eq!(
            source.lookup(&parts("/s?stream_id=a%2Ab")),
            IdLookup::Found("a*b".into())
        );
        assert_eq!(source.lookup(&parts("/s?other=1")), IdLookup::Missing);
        assert_eq!(source.lookup(&parts("/s")), IdLookup::Missing);
        assert_eq!(
            source.lookup(&parts("/s?stream_id=")),
            IdLookup::Found(String::new())
        );
    }

    #[test]
    fn path_source_reads_segment() {
        let source = StreamIdSource::path_segment("/api/stream");
        assert_eq!(
            source.lookup(&parts("/api/stream/abc")),
            IdLookup::Found("abc".into())
        );
        assert_eq!(
            source.lookup(&parts("/api/stream/abc/?x=1")),
            IdLookup::Found("abc".into())
        );
        assert_eq!(
            source.lookup(&parts("/api/stream/abc/more")),
            IdLookup::NotApplicable
        );
        assert_eq!(
            source.lookup(&parts("/api/stream/a+b")),
            IdLookup::Found("a+b".into())
        );
        assert_eq!(source.lookup(&parts("/api/stream/")), IdLookup::Missing);
        assert_eq!(source.lookup(&parts("/healthz")), IdLookup::NotApplicable);
        assert_eq!(
            source.lookup(&parts("/api/streams/abc")),
            IdLookup::NotApplicable
        );
    }

    #[test]
    fn percent_decode_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%zz", true), "a%zz");
        assert_eq!(percent_decode("a%4", true), "a%4");
        assert_eq!(percent_decode("%41%42", true), "AB");
        assert_eq!(percent_decode("a+b", true), "a b");
        assert_eq!(percent_decode("a+b", false), "a+b");
    }

    #[test]
    fn owners_sanitized() {
        assert!(sanitize_owner("user-1".into()).is_ok());
        assert!(sanitize_owner("a b".into()).is_err());
        assert!(sanitize_owner("a\r\nb".into()).is_err());
        assert!(sanitize_owner("x".repeat(257)).is_err());
    }
}
