//! Checks of the parser and the body wrapper on arbitrary input, shared by
//! the fuzz targets in `fuzz/` and the property tests of the test suite.
//!
//! Not part of the public API: compiled only with the `fuzzing` feature and
//! in the crate's own tests. Each check panics when a property fails.

use std::{
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame};
use redis::{Cmd, Pipeline, RedisFuture, Value, aio::ConnectionLike};
use tokio::sync::mpsc;

use crate::{
    ResilientBody, SseResilienceLayer,
    parser::{DEFAULT_MAX_EVENT_BYTES, EventStreamParser, MAX_FIELD_VALUE_BYTES},
    tracker::Tracker,
};

/// UTF-8 byte order mark.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// Heartbeat interval of the body check; only its ratio to the idle steps matters.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);

/// Values of `max_event_bytes` the parser check picks from.
const MAX_EVENT_BYTES_CHOICES: [usize; 5] = [0, 7, 64, 1024, DEFAULT_MAX_EVENT_BYTES];

/// Decodes fuzz input for [`check_parser_chunks`] and runs it.
///
/// Byte 0 picks `max_event_bytes`, byte 1 the number of cuts (0 to 15), then
/// two bytes per cut (little-endian, modulo the stream length plus one) give
/// where the stream is split. The remaining bytes are the stream.
pub fn check_parser(data: &[u8]) {
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let max_event_bytes =
        MAX_EVENT_BYTES_CHOICES[usize::from(choice) % MAX_EVENT_BYTES_CHOICES.len()];
    let Some((&cut_count, rest)) = rest.split_first() else {
        return;
    };
    let cut_bytes = (usize::from(cut_count) % 16 * 2).min(rest.len());
    let (cut_data, input) = rest.split_at(cut_bytes);
    let cuts: Vec<usize> = cut_data
        .chunks_exact(2)
        .map(|pair| usize::from(u16::from_le_bytes([pair[0], pair[1]])) % (input.len() + 1))
        .collect();
    check_parser_chunks(input, &cuts, max_event_bytes);
}

/// Feeds `input` to a parser in chunks split at `cuts` (byte offsets, in any
/// order) and checks that:
///
/// - the heap the parser keeps stays within its stated bound after every chunk;
/// - no event keeps more than `max_event_bytes` raw bytes;
/// - the dispatched events (type, data and last event ID) equal those of a
///   plain implementation of the WHATWG algorithm on the whole input, the
///   data only for events within `max_event_bytes`;
/// - the last event ID and the event-boundary state at the end do not depend
///   on the split.
pub fn check_parser_chunks(input: &[u8], cuts: &[usize], max_event_bytes: usize) {
    let bound = max_event_bytes + 3 * MAX_FIELD_VALUE_BYTES + 3;
    let mut positions: Vec<usize> = cuts.iter().map(|&cut| cut.min(input.len())).collect();
    positions.push(0);
    positions.push(input.len());
    positions.sort_unstable();

    let mut parser = EventStreamParser::new(max_event_bytes);
    let mut events = Vec::new();
    for pair in positions.windows(2) {
        parser.feed(&input[pair[0]..pair[1]], |event| {
            assert!(
                event.raw().len() <= max_event_bytes,
                "raw event of {} bytes over max_event_bytes {max_event_bytes}",
                event.raw().len()
            );
            // The data of a truncated event is built from its kept prefix only.
            let data = (!event.is_truncated()).then(|| event.data().into_owned());
            events.push((
                event.event_type().to_owned(),
                data,
                event.last_event_id().to_owned(),
            ));
        });
        assert!(
            parser.buffered_bytes() <= bound,
            "parser keeps {} bytes, over its bound of {bound}",
            parser.buffered_bytes()
        );
    }
    let reference = reference_events(input);
    assert_eq!(
        events.len(),
        reference.len(),
        "number of events differs from the reference"
    );
    let expected: Vec<_> = reference
        .into_iter()
        .zip(&events)
        .map(|((event_type, data, id), (_, kept, _))| {
            (event_type, kept.as_ref().and(Some(data)), id)
        })
        .collect();
    assert_eq!(events, expected, "events differ from the reference");

    let mut whole = EventStreamParser::new(max_event_bytes);
    whole.feed(input, |_| {});
    assert_eq!(parser.last_event_id(), whole.last_event_id());
    assert_eq!(parser.is_at_event_boundary(), whole.is_at_event_boundary());
}

/// One step of the inner body in [`check_body_steps`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// The inner body sends these bytes as one frame.
    Frame(Vec<u8>),
    /// The inner body sends nothing for longer than the heartbeat interval.
    Idle,
}

/// Decodes fuzz input into steps for [`check_body_steps`] and runs them.
///
/// Each step starts with a tag byte. A tag whose two low bits are zero is an
/// idle step. Any other tag is a frame of the next `tag >> 2` bytes (0 to 63,
/// fewer at the end of the input).
pub fn check_body(data: &[u8]) {
    let mut steps = Vec::new();
    let mut rest = data;
    while let Some((&tag, after)) = rest.split_first() {
        if tag & 3 == 0 {
            steps.push(Step::Idle);
            rest = after;
        } else {
            let len = usize::from(tag >> 2).min(after.len());
            steps.push(Step::Frame(after[..len].to_vec()));
            rest = &after[len..];
        }
    }
    check_body_steps(&steps);
}

/// Runs the body wrapper of an untracked stream (no Redis) over `steps`, on a
/// paused clock, and checks that:
///
/// - its output is the inner body's bytes plus heartbeat frames, except that
///   a byte order mark that starts the body is removed when a heartbeat went
///   out before it (a client strips a mark only at the very start);
/// - every heartbeat sits at an event boundary of the bytes before it: not
///   inside a line, not after a lone CR, not after a field line of an event
///   that has not ended;
/// - each idle step sends exactly one heartbeat when the stream is at such a
///   boundary, and none otherwise;
/// - a client dispatches the same events from the output as from the input.
pub fn check_body_steps(steps: &[Step]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime builds");
    // The checks poll the body with a no-op waker and never yield to the
    // runtime, so tokio's cooperative budget would run out after 128 channel
    // reads and make the inner body look pending forever.
    runtime.block_on(tokio::task::unconstrained(run_body_steps(steps)));
}

async fn run_body_steps(steps: &[Step]) {
    let layer = SseResilienceLayer::new(NoRedis)
        .heartbeat_interval(HEARTBEAT_INTERVAL)
        .max_stream_lifetime(Duration::from_secs(365 * 24 * 60 * 60));
    let shared = layer.shared();
    let heartbeat = shared.config.heartbeat_frame.clone();
    let (tx, rx) = mpsc::unbounded_channel();
    let mut body = Box::pin(ResilientBody::tracked(
        ChannelBody(rx),
        Tracker::new(shared, None),
        Some((HEARTBEAT_INTERVAL, heartbeat.clone())),
        Duration::from_secs(365 * 24 * 60 * 60),
        Duration::ZERO,
    ));

    let mut input = Vec::new();
    let mut output = Vec::new();
    let mut content = Vec::new();
    let mut heartbeat_before_content = false;
    for step in steps {
        match step {
            Step::Frame(bytes) => {
                input.extend_from_slice(bytes);
                tx.send(Bytes::copy_from_slice(bytes))
                    .expect("the body is alive");
            }
            Step::Idle => {
                tokio::time::advance(HEARTBEAT_INTERVAL + Duration::from_millis(1)).await;
            }
        }
        // Boundaries are judged on what the client receives, heartbeats
        // included: a mark after the first heartbeat is content, not the
        // stream's leading mark.
        let boundary_before = is_event_boundary(&output);
        let (frames, ended) = poll_ready_frames(body.as_mut());
        assert!(!ended, "the body ended while its inner body was open");
        let mut heartbeats = 0;
        for frame in frames {
            // The wrapper sends clones of the configured heartbeat, so its
            // address distinguishes a heartbeat from identical inner bytes.
            if frame.as_ptr() == heartbeat.as_ptr() && frame.len() == heartbeat.len() {
                assert!(
                    is_event_boundary(&output),
                    "heartbeat inside an event, after {:?}",
                    String::from_utf8_lossy(&output)
                );
                heartbeat_before_content |= content.is_empty();
                heartbeats += 1;
            } else {
                content.extend_from_slice(&frame);
            }
            output.extend_from_slice(&frame);
        }
        if *step == Step::Idle {
            let expected = usize::from(boundary_before);
            assert_eq!(
                heartbeats,
                expected,
                "heartbeats after an idle step, after {:?}",
                String::from_utf8_lossy(&content)
            );
        }
    }

    drop(tx);
    let (frames, ended) = poll_ready_frames(body.as_mut());
    assert!(ended, "the body did not end after its inner body ended");
    for frame in frames {
        content.extend_from_slice(&frame);
        output.extend_from_slice(&frame);
    }

    let expected = match input.strip_prefix(BOM) {
        Some(rest) if heartbeat_before_content => rest,
        _ => &input[..],
    };
    assert!(
        content == expected,
        "output without heartbeats differs from the input: {:?} != {:?}",
        String::from_utf8_lossy(&content),
        String::from_utf8_lossy(expected)
    );
    assert_eq!(
        reference_events(&output),
        reference_events(&input),
        "a client dispatches other events from the output"
    );
}

/// Polls `body` until it is pending or ends. Returns the data frames it
/// sent, and true when it ended.
fn poll_ready_frames<B>(mut body: Pin<&mut B>) -> (Vec<Bytes>, bool)
where
    B: Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut frames = Vec::new();
    loop {
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    frames.push(data);
                }
            }
            Poll::Ready(Some(Err(error))) => panic!("the body failed: {error:?}"),
            Poll::Ready(None) => return (frames, true),
            Poll::Pending => return (frames, false),
        }
    }
}

/// Returns true when a client that received `prefix` is at an event
/// boundary: at the start (after a whole byte order mark), or right after a
/// line feed where every line since the last empty line is a comment.
///
/// Written from the WHATWG rules, apart from the parser, so that the body
/// check does not rely on the parser's own boundary state.
pub fn is_event_boundary(prefix: &[u8]) -> bool {
    let prefix = prefix.strip_prefix(BOM).unwrap_or(prefix);
    if prefix.is_empty() {
        return true;
    }
    if prefix.last() != Some(&b'\n') {
        return false;
    }
    let mut block_has_field = false;
    let mut line_start = 0;
    let mut index = 0;
    while index < prefix.len() {
        let byte = prefix[index];
        if byte == b'\r' || byte == b'\n' {
            let line = &prefix[line_start..index];
            if line.is_empty() {
                block_has_field = false;
            } else if line[0] != b':' {
                block_has_field = true;
            }
            if byte == b'\r' && prefix.get(index + 1) == Some(&b'\n') {
                index += 1;
            }
            line_start = index + 1;
        }
        index += 1;
    }
    !block_has_field
}

/// Straightforward implementation of the standard's algorithm on a whole input,
/// returning (event type, data, last event ID) per dispatched event.
pub fn reference_events(input: &[u8]) -> Vec<(String, String, String)> {
    let decoded = String::from_utf8_lossy(input);
    let text = decoded.strip_prefix('\u{FEFF}').unwrap_or(&decoded);

    let mut lines = Vec::new();
    let mut line_start = 0;
    let mut chars = text.char_indices().peekable();
    while let Some((index, character)) = chars.next() {
        if character == '\r' || character == '\n' {
            lines.push(&text[line_start..index]);
            line_start = index + 1;
            if character == '\r' && chars.peek().map(|&(_, next)| next) == Some('\n') {
                chars.next();
                line_start += 1;
            }
        }
    }

    let mut events = Vec::new();
    let mut event_type = String::new();
    let mut data = String::new();
    let mut last_event_id = String::new();
    for line in lines {
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                let dispatched_type = if event_type.is_empty() {
                    "message"
                } else {
                    &event_type
                };
                events.push((
                    dispatched_type.to_owned(),
                    data.clone(),
                    last_event_id.clone(),
                ));
            }
            data.clear();
            event_type.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (name, value) = match line.split_once(':') {
            Some((name, value)) => (name, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match name {
            "event" => {
                let mut cut = value.len().min(MAX_FIELD_VALUE_BYTES);
                while !value.is_char_boundary(cut) {
                    cut -= 1;
                }
                event_type = value[..cut].to_owned();
            }
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => {
                last_event_id = if value.len() > MAX_FIELD_VALUE_BYTES {
                    String::new()
                } else {
                    value.to_owned()
                };
            }
            _ => {}
        }
    }
    events
}

/// An inner body fed by a channel: pending while the channel is empty.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|bytes| bytes.map(|b| Ok(Frame::data(b))))
    }
}

/// A Redis connection that fails every command; the body check never
/// reaches Redis, since its stream is untracked.
#[derive(Clone)]
struct NoRedis;

impl ConnectionLike for NoRedis {
    fn req_packed_command<'a>(&'a mut self, _cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async { Err(std::io::Error::other("no redis in the fuzz checks").into()) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        _pipeline: &'a Pipeline,
        _offset: usize,
        _count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async { Err(std::io::Error::other("no redis in the fuzz checks").into()) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// Generators of event-stream-like input for the property tests.
#[cfg(test)]
pub(crate) mod strategy {
    use proptest::prelude::*;

    /// Byte strings that make generated inputs look like event streams.
    pub(crate) fn stream_piece() -> impl Strategy<Value = Vec<u8>> {
        let tokens: Vec<&'static [u8]> = vec![
            b"data:",
            b"data: ",
            b"data",
            b"event:",
            b"event: ",
            b"id:",
            b"id: ",
            b"retry: 5",
            b"type: ",
            b":",
            b": ",
            b" ",
            b"\t",
            b"\r",
            b"\n",
            b"\r\n",
            b"\n\n",
            b"\r\n\r\n",
            b"{\"type\":\"completed\"}",
            b"{\"text\":\"hello\"}",
            b"completed",
            b"abc",
            b"\xEF\xBB\xBF",
            b"\xEF",
            b"\xEF\xBB",
            b"\0",
            b"\xFF",
            b"\xC3\xA9",
            b"\xC3",
            b"\xE2\x82\xAC",
        ];
        prop_oneof![
            12 => proptest::sample::select(tokens).prop_map(<[u8]>::to_vec),
            2 => any::<u8>().prop_map(|byte| vec![byte]),
            1 => (600usize..1100).prop_map(|len| vec![b'x'; len]),
        ]
    }

    pub(crate) fn stream_input() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(stream_piece(), 0..80).prop_map(|pieces| pieces.concat())
    }

    /// Splits `input` at the given fractions of its length.
    pub(crate) fn split_input<'a>(input: &'a [u8], cuts: &[f64]) -> Vec<&'a [u8]> {
        let mut positions: Vec<usize> = cuts
            .iter()
            .map(|fraction| (fraction * input.len() as f64) as usize)
            .collect();
        positions.push(0);
        positions.push(input.len());
        positions.sort_unstable();
        positions
            .windows(2)
            .map(|pair| &input[pair[0]..pair[1]])
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Splits `input` into steps: frames cut at `cuts` (fractions of its
    /// length), with an idle step before the frames whose index is in `idle`.
    fn steps_of(input: &[u8], cuts: &[f64], idle: &[usize]) -> Vec<Step> {
        let chunks = strategy::split_input(input, cuts);
        let mut steps = Vec::new();
        for (index, chunk) in chunks.iter().enumerate() {
            for _ in idle.iter().filter(|&&at| at == index) {
                steps.push(Step::Idle);
            }
            steps.push(Step::Frame(chunk.to_vec()));
        }
        if idle.contains(&chunks.len()) {
            steps.push(Step::Idle);
        }
        steps
    }

    #[test]
    fn boundary_rules() {
        for (prefix, expected) in [
            (&b""[..], true),
            (b"\xEF\xBB\xBF", true),
            (b"\xEF\xBB", false),
            (b"data: a", false),
            (b"data: a\n", false),
            (b"data: a\n\n", true),
            (b"data: a\r", false),
            (b"data: a\r\n\r\n", true),
            (b": comment\n", true),
            (b"data: a\n: comment\n", false),
            (b"data: a\r\r\n", true),
            (b"\n", true),
        ] {
            assert_eq!(
                is_event_boundary(prefix),
                expected,
                "{:?}",
                String::from_utf8_lossy(prefix)
            );
        }
    }

    #[test]
    fn bom_split_after_heartbeat() {
        check_body_steps(&[
            Step::Idle,
            Step::Frame(b"\xEF".to_vec()),
            Step::Idle,
            Step::Frame(b"\xBB".to_vec()),
            Step::Frame(b"\xBFdata: a\n\n".to_vec()),
            Step::Idle,
        ]);
        check_body_steps(&[
            Step::Idle,
            Step::Frame(b"\xEF\xBB".to_vec()),
            Step::Frame(b"x\ndata: a\n\n".to_vec()),
        ]);
        check_body_steps(&[Step::Idle, Step::Frame(b"\xEF".to_vec())]);
    }

    #[test]
    fn second_bom_after_stripped_one() {
        // Only the first mark is removed: the second one is content that
        // starts a line, so no heartbeat may follow it.
        check_body_steps(&[
            Step::Idle,
            Step::Frame(b"\xEF\xBB\xBF".to_vec()),
            Step::Idle,
            Step::Frame(b"\xEF\xBB\xBF".to_vec()),
            Step::Idle,
            Step::Frame(b"data:i\n\n".to_vec()),
        ]);
    }

    #[test]
    fn many_frames_without_yield() {
        let mut steps = vec![Step::Frame(b"data: a\r".to_vec())];
        steps.extend((0..300).map(|_| Step::Frame(Vec::new())));
        steps.push(Step::Frame(b"\n\n".to_vec()));
        check_body_steps(&steps);
    }

    #[test]
    fn fuzz_input_decoding_runs() {
        check_parser(b"");
        check_parser(&[4, 2, 3, 0, 9, 0, b'd', b'a', b't', b'a', b':', b'\n', b'\n']);
        check_body(b"");
        check_body(&[0, 4 << 2 | 1, b'd', b'a', b't', b'a', 0, 200]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parser_property(
            input in strategy::stream_input(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            choice in 0..MAX_EVENT_BYTES_CHOICES.len(),
        ) {
            let cuts: Vec<usize> = cuts.iter().map(|cut| cut % (input.len() + 1)).collect();
            check_parser_chunks(&input, &cuts, MAX_EVENT_BYTES_CHOICES[choice]);
        }

        #[test]
        fn body_property(
            input in strategy::stream_input(),
            cuts in proptest::collection::vec(0.0f64..=1.0, 0..12),
            idle in proptest::collection::vec(0usize..14, 0..8),
        ) {
            check_body_steps(&steps_of(&input, &cuts, &idle));
        }
    }
}
