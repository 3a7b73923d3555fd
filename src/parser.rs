//! Incremental scanner for the `text/event-stream` format.
//!
//! [`EventStreamParser`] follows the algorithm of the WHATWG HTML Living Standard,
//! section "Interpreting an event stream". It is built for a body wrapper that
//! forwards every frame unchanged, so it never rewrites bytes. It only finds where
//! events end, which events a client would dispatch, and whether extra bytes (such
//! as a `:heartbeat\n\n` comment) can be inserted between two frames without changing
//! what the client dispatches.
//!
//! # What the parser follows
//!
//! - Lines end with CR, LF or CRLF. A CRLF split between two chunks is one line end,
//!   and a lone CR ends a line by itself.
//! - One UTF-8 byte order mark is removed at the start of the stream, also when it
//!   is split between chunks. A byte order mark anywhere else is content.
//! - Comment lines (starting with `:`) are ignored. The fields `data`, `event` and
//!   `id` are applied. `retry` and unknown fields are ignored.
//! - An empty line dispatches the block when it had at least one `data` line. The
//!   last event ID is kept across events, and an unterminated last block is never
//!   dispatched.
//!
//! # Limits
//!
//! - An `event` value is cut to its first [`MAX_FIELD_VALUE_BYTES`] bytes, at a
//!   character boundary.
//! - An `id` value longer than [`MAX_FIELD_VALUE_BYTES`] bytes cannot be kept, and
//!   keeping an older ID would make a reconnecting client resume from the wrong
//!   place. Such a line therefore clears the last event ID to `""`, and
//!   [`Event::id`] returns `None` for its block.
//! - Invalid UTF-8 in `event` and `id` values is replaced with U+FFFD, as a client
//!   that decodes the stream as UTF-8 does. Lengths are measured after decoding.
//! - [`Event::raw`] keeps at most `max_event_bytes` bytes of a block.
//!
//! # Memory
//!
//! Whatever the input, the heap kept by one parser (see
//! [`EventStreamParser::buffered_bytes`]) is at most
//! `max_event_bytes + 3 * MAX_FIELD_VALUE_BYTES + 3` bytes. The terms are the
//! accumulator for blocks that span chunks, the event type, the last event ID, and a
//! scratch buffer for an `event` or `id` value that spans chunks. The scratch buffer
//! is needed because an `id` line must not replace the last event ID before its end
//! shows that it has no NUL. Field names are matched in a fixed 5-byte array, and
//! nothing is kept for `data`, comment or unknown field bytes except in the
//! accumulator. After each block the accumulator is cleared, and its capacity is cut
//! back to 64 KiB when it grew larger.

use std::borrow::Cow;
use std::fmt;

use memchr::{memchr, memchr2};

/// Default number of bytes of one event block kept for [`Event::raw`] (1 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 1024 * 1024;

/// Maximum number of bytes kept for an `event` or `id` value, measured in UTF-8
/// after decoding.
pub const MAX_FIELD_VALUE_BYTES: usize = 1024;

/// UTF-8 byte order mark, removed once at the start of the stream.
const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// Length of the longest field name the parser acts on (`event`).
const MAX_FIELD_NAME_BYTES: usize = 5;

/// Number of raw bytes kept for an `event` or `id` value that spans chunks.
///
/// Decoded UTF-8 is never shorter than its input, and an incomplete sequence has at
/// most 3 bytes. Three bytes more than the limit therefore decide the first
/// `MAX_FIELD_VALUE_BYTES` decoded bytes exactly.
const VALUE_SCRATCH_BYTES: usize = MAX_FIELD_VALUE_BYTES + 3;

/// Accumulator capacity kept after a block, so an idle stream keeps little memory.
const RETAINED_ACCUMULATOR_BYTES: usize = 64 * 1024;

/// Smallest capacity requested when the accumulator grows.
const MIN_ACCUMULATOR_GROWTH: usize = 256;

/// Incremental `text/event-stream` parser that scans chunks for dispatched events.
///
/// Feed every chunk of the body in order with [`feed`](Self::feed). There is no end
/// of stream call, because an unterminated last block is never dispatched.
#[derive(Clone)]
pub struct EventStreamParser {
    max_event_bytes: usize,
    bom: BomState,
    /// A CR ended the last line at the end of a chunk, so a leading LF of the next
    /// chunk is part of that line end.
    pending_cr: bool,
    line: LineState,
    /// The current block has a `data` line.
    has_data: bool,
    /// The current block has a line other than a comment.
    has_field_line: bool,
    /// The current block has a valid `id` line that was kept, so [`Event::id`] is
    /// the last event ID.
    has_block_id: bool,
    /// Bytes of the current block arrived in earlier chunks and are in `accumulator`.
    block_spans_chunks: bool,
    /// The current block, as far as seen, is longer than `max_event_bytes`.
    block_truncated: bool,
    /// Event type buffer of the current block, already decoded and cut.
    event_type: String,
    /// Last event ID buffer, kept across blocks.
    last_event_id: String,
    /// Raw bytes of an `event` or `id` value that spans chunks.
    value_scratch: Vec<u8>,
    /// The value in `value_scratch` is longer than `VALUE_SCRATCH_BYTES`.
    value_overflow: bool,
    /// The value in `value_scratch` contains a NUL byte.
    value_has_nul: bool,
    /// Copy of the current block's bytes when it spans chunks.
    accumulator: Vec<u8>,
    /// Address of the chunk passed to the running `feed` call, to report where in
    /// it an event's empty line is.
    chunk_address: usize,
}

/// One dispatched event, borrowed from the parser and the current chunk.
pub struct Event<'a> {
    event_type: &'a str,
    id: Option<&'a str>,
    last_event_id: &'a str,
    raw: &'a [u8],
    truncated: bool,
    empty_line: std::ops::Range<usize>,
}

/// Progress of the byte order mark check at the start of the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BomState {
    /// This many leading bytes of the stream match the start of a byte order mark.
    Matched(u8),
    /// The check is over, because the mark was removed or the stream starts otherwise.
    Done,
}

/// Field that a line sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    Data,
    Event,
    Id,
    /// `retry` or an unknown field, both ignored.
    Ignored,
}

/// Position inside a line that continues in the next chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LineState {
    /// No byte of the current line was seen yet.
    Start,
    /// Field name bytes seen so far, with no colon yet.
    Name {
        bytes: [u8; MAX_FIELD_NAME_BYTES],
        len: u8,
    },
    /// After the colon. `at_value_start` is true until the first value byte shows
    /// whether it is the one space that is removed.
    Value { field: Field, at_value_start: bool },
    /// Inside a comment or a field whose name is longer than any known name.
    Skipped,
}

impl EventStreamParser {
    /// Creates a parser that keeps up to `max_event_bytes` bytes of one event block
    /// for [`Event::raw`].
    ///
    /// Blocks longer than that are still parsed in full, but `raw()` returns only
    /// their first `max_event_bytes` bytes and `is_truncated()` returns true. Zero
    /// is allowed and keeps no block bytes at all.
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            max_event_bytes,
            bom: BomState::Matched(0),
            pending_cr: false,
            line: LineState::Start,
            has_data: false,
            has_field_line: false,
            has_block_id: false,
            block_spans_chunks: false,
            block_truncated: false,
            event_type: String::new(),
            last_event_id: String::new(),
            value_scratch: Vec::new(),
            value_overflow: false,
            value_has_nul: false,
            accumulator: Vec::new(),
            chunk_address: 0,
        }
    }

    /// Scans one chunk and calls `on_event` once per dispatched event, in order.
    ///
    /// An event is dispatched when the empty line that ends its block arrives. A
    /// chunk can dispatch several events or none. Empty chunks change nothing.
    pub fn feed<F: FnMut(&Event<'_>)>(&mut self, chunk: &[u8], mut on_event: F) {
        self.chunk_address = chunk.as_ptr() as usize;
        let mut chunk = chunk;
        if let BomState::Matched(matched_before) = self.bom {
            let matched_before = usize::from(matched_before);
            let mut matched = matched_before;
            let mut consumed = 0;
            while matched < BOM.len() && consumed < chunk.len() && chunk[consumed] == BOM[matched] {
                matched += 1;
                consumed += 1;
            }

            if matched == BOM.len() {
                self.bom = BomState::Done;
                chunk = &chunk[consumed..];
            } else if consumed == chunk.len() {
                // Every byte so far matches the mark, so the next chunk decides.
                self.bom = BomState::Matched(matched as u8);
                return;
            } else {
                // The stream does not start with a mark. Bytes held back from
                // earlier chunks are content, and so is this whole chunk.
                self.bom = BomState::Done;
                self.scan(&BOM[..matched_before], &mut on_event);
            }
        }
        self.scan(chunk, &mut on_event);
    }

    /// Returns true when extra bytes such as a comment line `:heartbeat\n\n` can be
    /// inserted between the chunks fed so far and the next one without changing what
    /// a client dispatches.
    ///
    /// It is true at the very start and after the empty line that ends a block. It
    /// is false while a possible byte order mark is incomplete, inside a line, right
    /// after a CR whose LF may still arrive, and when the current block has a line
    /// other than a comment. Comment lines alone keep it true, because a block of
    /// only comments has no event content.
    pub fn is_at_event_boundary(&self) -> bool {
        let bom_pending = matches!(self.bom, BomState::Matched(matched) if matched > 0);
        !bom_pending && !self.pending_cr && self.line == LineState::Start && !self.has_field_line
    }

    /// Returns the last event ID buffer, which is kept across events as the standard
    /// requires.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Returns the number of bytes the parser keeps on the heap right now, counted
    /// as buffer capacities.
    pub fn buffered_bytes(&self) -> usize {
        self.accumulator.capacity()
            + self.event_type.capacity()
            + self.last_event_id.capacity()
            + self.value_scratch.capacity()
    }
}

impl Default for EventStreamParser {
    /// Creates a parser with [`DEFAULT_MAX_EVENT_BYTES`].
    fn default() -> Self {
        Self::new(DEFAULT_MAX_EVENT_BYTES)
    }
}

impl fmt::Debug for EventStreamParser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventStreamParser")
            .field("max_event_bytes", &self.max_event_bytes)
            .field("at_event_boundary", &self.is_at_event_boundary())
            .field("pending_cr", &self.pending_cr)
            .field("line", &self.line)
            .field("has_data", &self.has_data)
            .field("event_type_len", &self.event_type.len())
            .field("last_event_id_len", &self.last_event_id.len())
            .field("accumulated_bytes", &self.accumulator.len())
            .field("buffered_bytes", &self.buffered_bytes())
            .finish()
    }
}

impl<'a> Event<'a> {
    /// Returns the event type, which is `message` when the block had no `event`
    /// field or only empty ones.
    pub fn event_type(&self) -> &'a str {
        self.event_type
    }

    /// Returns the value of the last `id` line of this block, or `None` when the
    /// block had no `id` line that set the last event ID.
    ///
    /// It is also `None` when the last such line was longer than
    /// [`MAX_FIELD_VALUE_BYTES`] and cleared the last event ID.
    pub fn id(&self) -> Option<&'a str> {
        self.id
    }

    /// Returns the last event ID buffer at dispatch time, which can come from an
    /// earlier block.
    pub fn last_event_id(&self) -> &'a str {
        self.last_event_id
    }

    /// Returns the block's bytes exactly as received, or their first
    /// `max_event_bytes` bytes when the block was truncated.
    ///
    /// A block starts right after the previous block's empty line, or after the
    /// byte order mark at the start of the stream. It includes comment lines and
    /// ends with the line terminator of its empty line. When that terminator is a
    /// CR whose LF arrives in the next chunk, the LF belongs to no block. So the
    /// same block ends with CR when a chunk split falls inside its final CRLF, and
    /// with CRLF otherwise.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Returns true when the block was longer than `max_event_bytes`.
    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    /// Returns the byte range, in the chunk passed to the `feed` call that
    /// dispatched this event, of the empty line that ended the event.
    ///
    /// Bytes inserted at its start (an `id:` line, say) become part of the
    /// event, since every line before the empty line ends with its own line end.
    pub fn empty_line(&self) -> std::ops::Range<usize> {
        self.empty_line.clone()
    }

    /// Builds the event data from [`raw`](Self::raw): the values of the `data`
    /// lines joined with LF, with invalid UTF-8 replaced by U+FFFD.
    ///
    /// The result borrows from the raw bytes when the block has a single `data`
    /// line of valid UTF-8. For a truncated event it is built from the kept prefix
    /// only, so it can be incomplete.
    pub fn data(&self) -> Cow<'a, str> {
        let mut first_value: Option<&'a [u8]> = None;
        let mut joined: Option<Vec<u8>> = None;
        let lines = RawLines { rest: self.raw };
        for line in lines {
            let Some(value) = data_value(line) else {
                continue;
            };
            if let Some(buffer) = joined.as_mut() {
                buffer.push(b'\n');
                buffer.extend_from_slice(value);
            } else if let Some(first) = first_value {
                let mut buffer = Vec::with_capacity(first.len() + 1 + value.len());
                buffer.extend_from_slice(first);
                buffer.push(b'\n');
                buffer.extend_from_slice(value);
                joined = Some(buffer);
            } else {
                first_value = Some(value);
            }
        }

        match (joined, first_value) {
            (Some(buffer), _) => match String::from_utf8(buffer) {
                Ok(text) => Cow::Owned(text),
                Err(error) => Cow::Owned(String::from_utf8_lossy(error.as_bytes()).into_owned()),
            },
            (None, Some(value)) => String::from_utf8_lossy(value),
            (None, None) => Cow::Borrowed(""),
        }
    }
}

impl fmt::Debug for Event<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("event_type", &self.event_type)
            .field("id", &self.id)
            .field("last_event_id", &self.last_event_id)
            .field("raw_len", &self.raw.len())
            .field("truncated", &self.truncated)
            .finish()
    }
}

impl EventStreamParser {
    /// Scans stream bytes that follow the byte order mark check.
    fn scan<F: FnMut(&Event<'_>)>(&mut self, chunk: &[u8], on_event: &mut F) {
        if chunk.is_empty() {
            return;
        }

        let mut pos = 0;
        if self.pending_cr {
            self.pending_cr = false;
            if chunk[0] == b'\n' {
                pos = 1;
            }
        }
        // A leading LF that completes a pending CR stays in the current block when
        // that CR ended one of its lines. When the CR ended a block, no bytes of the
        // current block were seen yet, and the LF belongs to no block.
        let mut block_start = if self.block_spans_chunks { 0 } else { pos };

        if self.line != LineState::Start {
            match memchr2(b'\r', b'\n', &chunk[pos..]) {
                Some(offset) => {
                    let line_end = pos + offset;
                    self.continue_line(&chunk[pos..line_end]);
                    self.finish_line();
                    pos = self.skip_line_terminator(chunk, line_end);
                }
                None => {
                    self.continue_line(&chunk[pos..]);
                    self.keep_block_bytes(&chunk[block_start..]);
                    return;
                }
            }
        }

        loop {
            // Empty lines are checked before the search, because in typical streams
            // every event ends with one right after its last field line.
            let line_end = match chunk.get(pos) {
                Some(b'\r' | b'\n') => pos,
                Some(_) => match memchr2(b'\r', b'\n', &chunk[pos + 1..]) {
                    Some(offset) => pos + 1 + offset,
                    None => {
                        self.continue_line(&chunk[pos..]);
                        self.keep_block_bytes(&chunk[block_start..]);
                        return;
                    }
                },
                None => {
                    self.keep_block_bytes(&chunk[block_start..]);
                    return;
                }
            };
            let next = self.skip_line_terminator(chunk, line_end);
            if line_end == pos {
                self.end_block(&chunk[block_start..next], on_event);
                block_start = next;
            } else {
                self.process_line(&chunk[pos..line_end]);
            }
            pos = next;
        }
    }

    /// Returns the position after the line terminator at `line_end`, and records a
    /// CR at the end of the chunk whose LF may still arrive.
    fn skip_line_terminator(&mut self, chunk: &[u8], line_end: usize) -> usize {
        if chunk[line_end] == b'\n' {
            return line_end + 1;
        }
        match chunk.get(line_end + 1) {
            Some(b'\n') => line_end + 2,
            Some(_) => line_end + 1,
            None => {
                self.pending_cr = true;
                line_end + 1
            }
        }
    }

    /// Applies one complete, non-empty line that lies inside one chunk.
    fn process_line(&mut self, line: &[u8]) {
        if line[0] == b':' {
            return;
        }
        self.has_field_line = true;
        if line.starts_with(b"data:") {
            self.has_data = true;
            return;
        }

        // A name the parser acts on has at most 5 bytes, so its colon, if any, is
        // within the first 6 bytes.
        let head = &line[..line.len().min(MAX_FIELD_NAME_BYTES + 1)];
        let (name, value) = match head.iter().position(|&byte| byte == b':') {
            Some(colon) => (&line[..colon], &line[colon + 1..]),
            None if line.len() <= MAX_FIELD_NAME_BYTES => (line, &line[line.len()..]),
            None => return,
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);

        match classify_field(name) {
            Field::Data => self.has_data = true,
            Field::Event => {
                let kept = &value[..value.len().min(VALUE_SCRATCH_BYTES)];
                store_event_type(&mut self.event_type, kept);
            }
            Field::Id => {
                let has_nul = contains_nul(value);
                let too_long = value.len() > MAX_FIELD_VALUE_BYTES;
                let kept = &value[..value.len().min(VALUE_SCRATCH_BYTES)];
                self.store_id(kept, has_nul, too_long);
            }
            Field::Ignored => {}
        }
    }

    /// Advances the state of a line that spans chunks over `piece`, which contains
    /// no line terminator.
    fn continue_line(&mut self, mut piece: &[u8]) {
        while !piece.is_empty() {
            match &mut self.line {
                LineState::Start => {
                    if piece[0] == b':' {
                        self.line = LineState::Skipped;
                        return;
                    }
                    self.has_field_line = true;
                    self.line = LineState::Name {
                        bytes: [0; MAX_FIELD_NAME_BYTES],
                        len: 0,
                    };
                }
                LineState::Name { bytes, len } => {
                    let Some((&byte, rest)) = piece.split_first() else {
                        return;
                    };
                    piece = rest;
                    if byte == b':' {
                        let field = classify_field(&bytes[..usize::from(*len)]);
                        self.start_value(field);
                    } else if usize::from(*len) == MAX_FIELD_NAME_BYTES {
                        self.line = LineState::Skipped;
                        return;
                    } else {
                        bytes[usize::from(*len)] = byte;
                        *len += 1;
                    }
                }
                LineState::Value {
                    field,
                    at_value_start,
                } => {
                    if *at_value_start {
                        *at_value_start = false;
                        if piece[0] == b' ' {
                            piece = &piece[1..];
                            continue;
                        }
                    }
                    if matches!(field, Field::Event | Field::Id) {
                        self.append_value_bytes(piece);
                    }
                    return;
                }
                LineState::Skipped => return,
            }
        }
    }

    /// Enters the value of a line that spans chunks, after its colon.
    fn start_value(&mut self, field: Field) {
        match field {
            Field::Data => self.has_data = true,
            Field::Event | Field::Id => {
                self.value_scratch.clear();
                self.value_overflow = false;
                self.value_has_nul = false;
            }
            Field::Ignored => {}
        }
        self.line = LineState::Value {
            field,
            at_value_start: true,
        };
    }

    /// Copies value bytes into the scratch buffer, up to `VALUE_SCRATCH_BYTES`.
    fn append_value_bytes(&mut self, piece: &[u8]) {
        if contains_nul(piece) {
            self.value_has_nul = true;
        }
        let room = VALUE_SCRATCH_BYTES - self.value_scratch.len();
        if piece.len() > room {
            self.value_overflow = true;
        }
        if self.value_scratch.capacity() < VALUE_SCRATCH_BYTES {
            self.value_scratch
                .reserve_exact(VALUE_SCRATCH_BYTES - self.value_scratch.len());
        }
        self.value_scratch
            .extend_from_slice(&piece[..piece.len().min(room)]);
    }

    /// Applies a line that spans chunks once its terminator arrives.
    fn finish_line(&mut self) {
        match self.line {
            LineState::Start | LineState::Skipped => {}
            LineState::Name { bytes, len } => {
                // A line without a colon is a field name with an empty value.
                match classify_field(&bytes[..usize::from(len)]) {
                    Field::Data => self.has_data = true,
                    Field::Event => self.event_type.clear(),
                    Field::Id => self.store_id(b"", false, false),
                    Field::Ignored => {}
                }
            }
            LineState::Value { field, .. } => match field {
                Field::Event => store_event_type(&mut self.event_type, &self.value_scratch),
                Field::Id => {
                    let scratch = std::mem::take(&mut self.value_scratch);
                    let too_long = self.value_overflow || scratch.len() > MAX_FIELD_VALUE_BYTES;
                    self.store_id(&scratch, self.value_has_nul, too_long);
                    self.value_scratch = scratch;
                }
                Field::Data | Field::Ignored => {}
            },
        }
        self.line = LineState::Start;
    }

    /// Applies an `id` value. `raw_value` is its first `VALUE_SCRATCH_BYTES` bytes.
    fn store_id(&mut self, raw_value: &[u8], has_nul: bool, too_long: bool) {
        if has_nul {
            return;
        }
        if !too_long {
            let decoded = decode_lossy(raw_value);
            if decoded.len() <= MAX_FIELD_VALUE_BYTES {
                replace_bounded(&mut self.last_event_id, &decoded);
                self.has_block_id = true;
                return;
            }
        }
        self.last_event_id.clear();
        self.has_block_id = false;
    }

    /// Ends the current block at its empty line, dispatches it when it has data, and
    /// resets the block state. `tail` is the block's part in the current chunk,
    /// including the empty line's terminator.
    fn end_block<F: FnMut(&Event<'_>)>(&mut self, tail: &[u8], on_event: &mut F) {
        if self.has_data {
            if self.block_spans_chunks {
                self.append_to_accumulator(tail);
            }
            let (raw, truncated) = if self.block_spans_chunks {
                (&self.accumulator[..], self.block_truncated)
            } else if tail.len() > self.max_event_bytes {
                (&tail[..self.max_event_bytes], true)
            } else {
                (tail, false)
            };
            let event_type = if self.event_type.is_empty() {
                "message"
            } else {
                self.event_type.as_str()
            };
            // The empty line is the block's last line, so it ends the tail; a CR and
            // an LF there are one line end.
            let end = tail.as_ptr() as usize + tail.len() - self.chunk_address;
            let empty_line_len = if tail.ends_with(b"\r\n") { 2 } else { 1 };
            let event = Event {
                event_type,
                id: self.has_block_id.then_some(self.last_event_id.as_str()),
                last_event_id: &self.last_event_id,
                raw,
                truncated,
                empty_line: end.saturating_sub(empty_line_len)..end,
            };
            on_event(&event);
        }

        self.has_data = false;
        self.has_field_line = false;
        self.has_block_id = false;
        self.event_type.clear();
        if self.block_spans_chunks {
            self.block_spans_chunks = false;
            self.block_truncated = false;
            self.accumulator.clear();
            if self.accumulator.capacity() > RETAINED_ACCUMULATOR_BYTES {
                self.accumulator.shrink_to(RETAINED_ACCUMULATOR_BYTES);
            }
        }
    }

    /// Keeps the current block's bytes at the end of a chunk, because the block
    /// continues in the next chunk.
    fn keep_block_bytes(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.block_spans_chunks = true;
        self.append_to_accumulator(bytes);
    }

    /// Copies block bytes into the accumulator, up to `max_event_bytes` in total.
    fn append_to_accumulator(&mut self, bytes: &[u8]) {
        let room = self.max_event_bytes - self.accumulator.len();
        let kept = bytes.len().min(room);
        if kept < bytes.len() {
            self.block_truncated = true;
        }
        if kept == 0 {
            return;
        }

        // Growth is requested exactly so that the capacity never passes
        // `max_event_bytes`, which amortized doubling could do.
        let needed = self.accumulator.len() + kept;
        if needed > self.accumulator.capacity() {
            let target = (self.accumulator.capacity() * 2)
                .max(MIN_ACCUMULATOR_GROWTH)
                .min(self.max_event_bytes)
                .max(needed);
            self.accumulator
                .reserve_exact(target - self.accumulator.len());
        }
        self.accumulator.extend_from_slice(&bytes[..kept]);
    }
}

/// Length up to which `contains_nul` checks bytes in a plain loop: a call
/// into `memchr` costs more than that on the short values of `id` lines.
const SHORT_SCAN_BYTES: usize = 32;

/// Returns true when `bytes` contains a NUL byte.
// `<[u8]>::contains` calls the standard library's memchr, which also costs
// more than this loop on values of a few bytes (callgrind).
#[allow(clippy::manual_contains)]
fn contains_nul(bytes: &[u8]) -> bool {
    if bytes.len() <= SHORT_SCAN_BYTES {
        bytes.iter().any(|&byte| byte == 0)
    } else {
        memchr(0, bytes).is_some()
    }
}

/// Returns the field a name sets.
fn classify_field(name: &[u8]) -> Field {
    match name {
        b"data" => Field::Data,
        b"event" => Field::Event,
        b"id" => Field::Id,
        _ => Field::Ignored,
    }
}

/// Stores an `event` value, decoded lossily and cut to `MAX_FIELD_VALUE_BYTES` at a
/// character boundary. `raw_value` is its first `VALUE_SCRATCH_BYTES` bytes.
fn store_event_type(event_type: &mut String, raw_value: &[u8]) {
    let decoded = decode_lossy(raw_value);
    let mut cut = decoded.len().min(MAX_FIELD_VALUE_BYTES);
    while !decoded.is_char_boundary(cut) {
        cut -= 1;
    }
    replace_bounded(event_type, &decoded[..cut]);
}

/// Decodes UTF-8 with invalid sequences replaced by U+FFFD, as
/// `String::from_utf8_lossy` does. Valid input, the common case, takes the
/// faster `str::from_utf8` check, since the lossy decoder's chunk iterator
/// costs more than the check on the short values of `id` and `event` lines.
fn decode_lossy(raw: &[u8]) -> Cow<'_, str> {
    match std::str::from_utf8(raw) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(raw),
    }
}

/// Replaces the contents of `target` and grows its capacity only to `value.len()`.
fn replace_bounded(target: &mut String, value: &str) {
    target.clear();
    target.reserve_exact(value.len());
    target.push_str(value);
}

/// Returns the value of a `data` line, or `None` for any other line.
fn data_value(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"data")?;
    match rest.split_first() {
        None => Some(rest),
        Some((b':', value)) => Some(value.strip_prefix(b" ").unwrap_or(value)),
        Some(_) => None,
    }
}

/// Iterator over the lines of a block's raw bytes, without their terminators.
struct RawLines<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RawLines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.rest.is_empty() {
            return None;
        }
        let Some(end) = memchr2(b'\r', b'\n', self.rest) else {
            // Only a truncated block ends without a terminator.
            let line = self.rest;
            self.rest = &[];
            return Some(line);
        };
        let line = &self.rest[..end];
        let terminator_len = if self.rest[end..].starts_with(b"\r\n") {
            2
        } else {
            1
        };
        self.rest = &self.rest[end + terminator_len..];
        Some(line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{
        reference_events,
        strategy::{split_input, stream_input},
    };
    use proptest::prelude::*;

    /// Owned copy of a dispatched event, for comparisons.
    #[derive(Clone, Debug, PartialEq, Eq)]
    struct Dispatched {
        event_type: String,
        data: String,
        id: Option<String>,
        last_event_id: String,
        raw: Vec<u8>,
        truncated: bool,
    }

    impl Dispatched {
        fn from_event(event: &Event<'_>) -> Self {
            Self {
                event_type: event.event_type().to_owned(),
                data: event.data().into_owned(),
                id: event.id().map(str::to_owned),
                last_event_id: event.last_event_id().to_owned(),
                raw: event.raw().to_vec(),
                truncated: event.is_truncated(),
            }
        }
    }

    /// Feeds one chunk and returns the events it dispatched.
    fn feed_chunk(parser: &mut EventStreamParser, chunk: &[u8]) -> Vec<Dispatched> {
        let mut events = Vec::new();
        parser.feed(chunk, |event| events.push(Dispatched::from_event(event)));
        events
    }

    /// Feeds chunks to a new default parser and returns all dispatched events.
    fn feed_chunks(chunks: &[&[u8]]) -> Vec<Dispatched> {
        let mut parser = EventStreamParser::default();
        chunks
            .iter()
            .flat_map(|chunk| feed_chunk(&mut parser, chunk))
            .collect()
    }

    /// Feeds chunks to a new default parser and returns, per chunk, the events it
    /// dispatched and the boundary state after it.
    fn feed_frames(chunks: &[&[u8]]) -> Vec<(Vec<Dispatched>, bool)> {
        let mut parser = EventStreamParser::default();
        chunks
            .iter()
            .map(|chunk| {
                let events = feed_chunk(&mut parser, chunk);
                (events, parser.is_at_event_boundary())
            })
            .collect()
    }

    fn types_of(events: &[Dispatched]) -> Vec<&str> {
        events
            .iter()
            .map(|event| event.event_type.as_str())
            .collect()
    }

    fn data_of(events: &[Dispatched]) -> Vec<&str> {
        events.iter().map(|event| event.data.as_str()).collect()
    }

    /// Upper bound of `buffered_bytes()` stated in the module documentation.
    fn memory_bound(max_event_bytes: usize) -> usize {
        max_event_bytes + 3 * MAX_FIELD_VALUE_BYTES + 3
    }

    /// Size of the long inputs fed to the memory tests (100 MB).
    const STRESS_BYTES: usize = 100_000_000;

    #[test]
    fn crlf_split_across_frames() {
        let frames = feed_frames(&[b"data: A\r\n", b"data: B\r", b"\n", b"data: C\r\n", b"\n"]);

        let boundaries: Vec<bool> = frames.iter().map(|(_, boundary)| *boundary).collect();
        assert_eq!(boundaries, [false, false, false, false, true]);
        let events: Vec<Dispatched> = frames.into_iter().flat_map(|(events, _)| events).collect();
        assert_eq!(types_of(&events), ["message"]);
        assert_eq!(data_of(&events), ["A\nB\nC"]);
        assert_eq!(events[0].raw, b"data: A\r\ndata: B\r\ndata: C\r\n\n");
    }

    #[test]
    fn crlf_split_before_pause() {
        let frames = feed_frames(&[
            b"event: completed\r\ndata: {\"type\":\r",
            b"\ndata: \"completed\"}\r\n",
            b"\r\n",
        ]);

        // After a lone CR the next byte may be the LF of the same line end.
        assert!(!frames[0].1, "boundary after a pending CR");
        assert!(!frames[1].1, "boundary between field lines");
        assert!(frames[2].1, "boundary after the empty line");
        assert!(frames[0].0.is_empty());
        assert!(frames[1].0.is_empty());
        let events = &frames[2].0;
        assert_eq!(types_of(events), ["completed"]);
        assert_eq!(data_of(events), ["{\"type\":\n\"completed\"}"]);
    }

    #[test]
    fn type_field_is_not_event() {
        let frames = feed_frames(&[
            b"id: 9\ndata: {\"type\":\"completed\"}\ntype: failed\n",
            b"\n",
        ]);

        assert!(frames[0].0.is_empty(), "dispatched before the empty line");
        assert!(!frames[0].1, "boundary after an unknown field line");
        assert!(frames[1].1);
        let events = &frames[1].0;
        assert_eq!(types_of(events), ["message"]);
        assert_eq!(data_of(events), ["{\"type\":\"completed\"}"]);
        assert_eq!(events[0].last_event_id, "9");
        assert_eq!(events[0].id.as_deref(), Some("9"));
    }

    #[test]
    fn several_events_in_one_frame() {
        let frames = feed_frames(&[
            b"data: {\"type\":\"progress\"}\n\nevent: completed\ndata: {\"type\":\"completed\"}\n\ndata: {\"ty",
            b"pe\":\"x\"}\n\n",
        ]);

        assert_eq!(types_of(&frames[0].0), ["message", "completed"]);
        assert_eq!(
            data_of(&frames[0].0),
            ["{\"type\":\"progress\"}", "{\"type\":\"completed\"}"]
        );
        assert!(!frames[0].1, "boundary inside a data line");
        assert_eq!(types_of(&frames[1].0), ["message"]);
        assert_eq!(data_of(&frames[1].0), ["{\"type\":\"x\"}"]);
        assert!(frames[1].1);
        assert_eq!(frames[1].0[0].raw, b"data: {\"type\":\"x\"}\n\n");
    }

    #[test]
    fn pause_inside_data_line() {
        let frames = feed_frames(&[
            b"data: {\"type\":\"delta\",\"text\":\"hel",
            b"lo\"}\n\n",
            b"event: completed\ndata: {\"type\":\"completed\"}\n\n",
        ]);

        assert!(!frames[0].1, "boundary inside a line");
        assert!(frames[1].1);
        assert!(frames[2].1);
        assert!(frames[0].0.is_empty());
        assert_eq!(
            data_of(&frames[1].0),
            ["{\"type\":\"delta\",\"text\":\"hello\"}"]
        );
        assert_eq!(types_of(&frames[2].0), ["completed"]);
    }

    #[test]
    fn unterminated_last_block_dropped() {
        let mut parser = EventStreamParser::default();
        let events = feed_chunk(
            &mut parser,
            b"data: {\"type\":\"progress\"}\n\ndata: {\"type\":\"completed\"}\n",
        );

        assert_eq!(data_of(&events), ["{\"type\":\"progress\"}"]);
        assert!(!parser.is_at_event_boundary());
    }

    #[test]
    fn final_lone_cr_dispatches() {
        let mut parser = EventStreamParser::default();
        let events = feed_chunk(&mut parser, b"data: {\"type\":\"completed\"}\r\n\r");

        assert_eq!(data_of(&events), ["{\"type\":\"completed\"}"]);
        assert_eq!(events[0].raw, b"data: {\"type\":\"completed\"}\r\n\r");
        assert!(
            !parser.is_at_event_boundary(),
            "boundary after a pending CR"
        );

        let events = feed_chunk(&mut parser, b"\n");
        assert!(events.is_empty());
        assert!(parser.is_at_event_boundary());
    }

    #[test]
    fn comments_between_data_lines() {
        let long_comment = "x".repeat(2048);
        let input = format!(
            "data:1\r:\0\n:\r\ndata:2\n:{long_comment}\rdata:3\n:data:fail\r:{long_comment}\ndata:4\n\n"
        );

        let whole = feed_chunks(&[input.as_bytes()]);
        assert_eq!(types_of(&whole), ["message"]);
        assert_eq!(data_of(&whole), ["1\n2\n3\n4"]);

        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        let byte_by_byte = feed_chunks(&bytes);
        assert_eq!(byte_by_byte, whole);
    }

    #[test]
    fn comments_never_set_fields() {
        let events = feed_chunks(&[
            b"data: {\"type\":\"progress\"}\n:event: completed\n: {\"type\":\"failed\"}\n\n",
        ]);

        assert_eq!(types_of(&events), ["message"]);
        assert_eq!(data_of(&events), ["{\"type\":\"progress\"}"]);
    }

    #[test]
    fn comment_lines_keep_boundary() {
        let frames = feed_frames(&[
            b":heartbeat\n",
            b": x\r\n",
            b":",
            b"y\n",
            b"retry: 10\n",
            b"\n",
            b"type: x\n",
        ]);
        let boundaries: Vec<bool> = frames.iter().map(|(_, boundary)| *boundary).collect();

        assert_eq!(boundaries, [true, true, false, true, false, true, false]);
    }

    #[test]
    fn event_without_data_not_dispatched() {
        let mut parser = EventStreamParser::default();
        assert!(feed_chunk(&mut parser, b"event: completed\n\n").is_empty());

        // The event type is reset even though nothing was dispatched.
        let events = feed_chunk(&mut parser, b"data: x\n\n");
        assert_eq!(types_of(&events), ["message"]);
    }

    #[test]
    fn empty_data_dispatches() {
        let events = feed_chunks(&[b"event: completed\ndata:\n\n"]);

        assert_eq!(types_of(&events), ["completed"]);
        assert_eq!(data_of(&events), [""]);
    }

    #[test]
    fn bare_data_lines_add_newlines() {
        let events = feed_chunks(&[b"data:\n\ndata\ndata\n\ndata:test\n\n\n"]);

        assert_eq!(types_of(&events), ["message", "message", "message"]);
        assert_eq!(data_of(&events), ["", "\n", "test"]);
    }

    #[test]
    fn tab_kept_space_removed() {
        let events = feed_chunks(&[b"data:\ttest\rdata: \ndata:test\n\n\n"]);

        assert_eq!(data_of(&events), ["\ttest\n\ntest"]);
    }

    #[test]
    fn only_one_space_removed() {
        let events = feed_chunks(&[b"event:  x\ndata:  y\nid:  z\n\n"]);

        assert_eq!(types_of(&events), [" x"]);
        assert_eq!(data_of(&events), [" y"]);
        assert_eq!(events[0].last_event_id, " z");
    }

    #[test]
    fn mixed_line_ends() {
        let events = feed_chunks(&[b"data:test\r\ndata\ndata:test\r\n\r\n"]);

        assert_eq!(data_of(&events), ["test\n\ntest"]);
    }

    #[test]
    fn crlf_event_line() {
        let events = feed_chunks(&[b"event: completed\r\ndata: {\"type\":\"completed\"}\n\n"]);

        assert_eq!(types_of(&events), ["completed"]);
        assert_eq!(data_of(&events), ["{\"type\":\"completed\"}"]);
    }

    #[test]
    fn empty_event_field_means_message() {
        let events = feed_chunks(&[b"event: x\nevent\ndata: 1\n\nevent:\ndata: 2\n\n"]);

        assert_eq!(types_of(&events), ["message", "message"]);
    }

    #[test]
    fn field_without_colon_in_pieces() {
        let events = feed_chunks(&[b"event: x\neve", b"nt\nda", b"ta\nid: 1\ni", b"d\n\n"]);

        assert_eq!(types_of(&events), ["message"]);
        assert_eq!(data_of(&events), [""]);
        assert_eq!(events[0].id.as_deref(), Some(""));
        assert_eq!(events[0].last_event_id, "");
    }

    #[test]
    fn long_field_names_ignored() {
        let events = feed_chunks(&[b"dataa: 1\nevents: x\nidx: 2\nretry: 3\ndata: 4\n\n"]);

        assert_eq!(types_of(&events), ["message"]);
        assert_eq!(data_of(&events), ["4"]);
        assert_eq!(events[0].id, None);
    }

    #[test]
    fn bom_stripped_at_start() {
        let events = feed_chunks(&[b"\xEF\xBB\xBFdata: a\n\n"]);

        assert_eq!(data_of(&events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\n\n");
    }

    #[test]
    fn bom_split_over_three_chunks() {
        let frames = feed_frames(&[b"\xEF", b"\xBB", b"\xBF", b"data: a\n\n"]);
        let boundaries: Vec<bool> = frames.iter().map(|(_, boundary)| *boundary).collect();

        assert_eq!(boundaries, [false, false, true, true]);
        let events = &frames[3].0;
        assert_eq!(data_of(events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\n\n");
    }

    #[test]
    fn bom_split_inside_chunk() {
        let events = feed_chunks(&[b"\xEF\xBB", b"\xBFdata: a\n\n"]);

        assert_eq!(data_of(&events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\n\n");
    }

    #[test]
    fn bom_kept_after_start() {
        // Only the first mark is removed, so the field names are U+FEFF "data" and
        // are unknown.
        let events = feed_chunks(&[b"data: a\n\n\xEF\xBB\xBFdata: b\n\n"]);
        assert_eq!(data_of(&events), ["a"]);

        let events = feed_chunks(&[b"\xEF\xBB\xBF\xEF\xBB\xBFdata: a\n\n"]);
        assert!(events.is_empty());

        let events = feed_chunks(&[b"\xEF\xBB\xBF", b"\xEF\xBB\xBFdata: a\n\n"]);
        assert!(events.is_empty());
    }

    #[test]
    fn bom_inside_value_kept() {
        let events = feed_chunks(&[b"data: \xEF\xBB\xBFa\n\n"]);

        assert_eq!(data_of(&events), ["\u{FEFF}a"]);
    }

    #[test]
    fn false_bom_prefix_kept() {
        let expected_raw = b"\xEFA\ndata: x\n\n";

        let events = feed_chunks(&[b"\xEFA\ndata: x\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].raw, expected_raw);

        let frames = feed_frames(&[b"\xEF", b"A\ndata: x\n\n"]);
        assert!(!frames[0].1, "boundary while a mark prefix is pending");
        assert_eq!(frames[1].0.len(), 1);
        assert_eq!(frames[1].0[0].raw, expected_raw);

        let events = feed_chunks(&[b"\xEF\xBB", b"A\ndata: x\n\n"]);
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].raw, b"\xEF\xBBA\ndata: x\n\n");
    }

    #[test]
    fn false_bom_prefix_as_field_name() {
        // "\xEF" followed by "data" is an unknown field name, not a stripped mark.
        let events = feed_chunks(&[b"\xEF", b"data: x\n\n"]);

        assert!(events.is_empty());
    }

    #[test]
    fn empty_chunks_change_nothing() {
        let mut parser = EventStreamParser::default();
        assert!(feed_chunk(&mut parser, b"").is_empty());
        assert!(parser.is_at_event_boundary());

        feed_chunk(&mut parser, b"\xEF");
        feed_chunk(&mut parser, b"");
        feed_chunk(&mut parser, b"\xBB\xBF");
        feed_chunk(&mut parser, b"data: a\r");
        feed_chunk(&mut parser, b"");
        let events = feed_chunk(&mut parser, b"\n\n");
        assert_eq!(data_of(&events), ["a"]);
        assert_eq!(events[0].raw, b"data: a\r\n\n");
    }

    #[test]
    fn id_with_nul_ignored() {
        let events = feed_chunks(&[b"id: 1\ndata: a\n\nid: 2\0x\ndata: b\n\n"]);

        assert_eq!(events[1].last_event_id, "1");
        assert_eq!(events[1].id, None);

        let events = feed_chunks(&[b"id: 1\ndata: a\n\nid: 2", b"\0", b"x\ndata: b\n\n"]);
        assert_eq!(events[1].last_event_id, "1");
        assert_eq!(events[1].id, None);
    }

    #[test]
    fn id_only_for_block_ids() {
        let events = feed_chunks(&[b"id: 7\ndata: a\n\ndata: b\n\nid\ndata: c\n\ndata: d\n\n"]);

        let ids: Vec<Option<&str>> = events.iter().map(|event| event.id.as_deref()).collect();
        let last_ids: Vec<&str> = events
            .iter()
            .map(|event| event.last_event_id.as_str())
            .collect();
        assert_eq!(ids, [Some("7"), None, Some(""), None]);
        assert_eq!(last_ids, ["7", "7", "", ""]);
    }

    #[test]
    fn id_sticky_without_dispatch() {
        let mut parser = EventStreamParser::default();
        assert!(feed_chunk(&mut parser, b"id: 5\n\n").is_empty());
        assert_eq!(parser.last_event_id(), "5");

        let events = feed_chunk(&mut parser, b"data: a\n\n");
        assert_eq!(events[0].last_event_id, "5");
        assert_eq!(events[0].id, None);
    }

    #[test]
    fn last_id_line_wins() {
        let events = feed_chunks(&[b"id: 1\nid: 2\ndata: a\nid: 3\n\n"]);

        assert_eq!(events[0].id.as_deref(), Some("3"));
        assert_eq!(events[0].last_event_id, "3");
    }

    #[test]
    fn overlong_id_clears_last_id() {
        let limit_id = "i".repeat(MAX_FIELD_VALUE_BYTES);
        let long_id = "i".repeat(MAX_FIELD_VALUE_BYTES + 1);
        let input = format!("id: {limit_id}\ndata: a\n\nid: {long_id}\ndata: b\n\n");

        let events = feed_chunks(&[input.as_bytes()]);
        assert_eq!(events[0].id.as_deref(), Some(limit_id.as_str()));
        assert_eq!(events[0].last_event_id, limit_id);
        assert_eq!(events[1].id, None);
        assert_eq!(events[1].last_event_id, "");

        let bytes: Vec<&[u8]> = input.as_bytes().chunks(7).collect();
        assert_eq!(feed_chunks(&bytes), events);
    }

    #[test]
    fn overlong_decoded_id_clears() {
        // 400 invalid bytes decode to 400 U+FFFD, which is 1200 bytes of UTF-8.
        let mut input = b"id: 1\ndata: a\n\nid: ".to_vec();
        input.extend(std::iter::repeat_n(0xFF, 400));
        input.extend_from_slice(b"\ndata: b\n\n");

        let events = feed_chunks(&[&input]);
        assert_eq!(events[1].id, None);
        assert_eq!(events[1].last_event_id, "");
    }

    #[test]
    fn long_event_type_cut() {
        let long_type = "e".repeat(3000);
        let input = format!("event: {long_type}\ndata: a\n\n");

        let events = feed_chunks(&[input.as_bytes()]);
        assert_eq!(events[0].event_type, long_type[..MAX_FIELD_VALUE_BYTES]);

        let bytes: Vec<&[u8]> = input.as_bytes().chunks(100).collect();
        assert_eq!(feed_chunks(&bytes), events);
    }

    #[test]
    fn event_type_cut_at_char_boundary() {
        // "é" is 2 bytes, so 1023 ASCII bytes leave no room for it.
        let input = format!(
            "event: {}é\ndata: a\n\n",
            "e".repeat(MAX_FIELD_VALUE_BYTES - 1)
        );

        let events = feed_chunks(&[input.as_bytes()]);
        assert_eq!(events[0].event_type.len(), MAX_FIELD_VALUE_BYTES - 1);
    }

    #[test]
    fn invalid_utf8_replaced() {
        let events = feed_chunks(&[b"event: a\xFFb\nid: \xFE\ndata: \xC3\n\n"]);

        assert_eq!(events[0].event_type, "a\u{FFFD}b");
        assert_eq!(events[0].id.as_deref(), Some("\u{FFFD}"));
        assert_eq!(events[0].last_event_id, "\u{FFFD}");
        assert_eq!(events[0].data, "\u{FFFD}");
    }

    #[test]
    fn utf8_split_across_chunks() {
        let events = feed_chunks(&[
            b"event: \xC3",
            b"\xA9\nid: \xE2\x82",
            b"\xAC\ndata: \xF0\x9F",
            b"\x98\x80\n\n",
        ]);

        assert_eq!(events[0].event_type, "é");
        assert_eq!(events[0].last_event_id, "€");
        assert_eq!(events[0].data, "😀");
    }

    #[test]
    fn data_borrowed_for_single_line() {
        let mut parser = EventStreamParser::default();
        let mut kinds = Vec::new();
        parser.feed(
            b"data: one\n\ndata: a\ndata: b\n\ndata: \xFF\n\n",
            |event| {
                kinds.push(matches!(event.data(), Cow::Borrowed(_)));
            },
        );

        assert_eq!(kinds, [true, false, false]);
    }

    #[test]
    fn raw_exact_inside_chunk() {
        let events = feed_chunks(&[b"data: a\r\n\r\n:c\ndata: b\r\rid: 1\nevent: e\ndata: c\n\n"]);
        let raws: Vec<&[u8]> = events.iter().map(|event| event.raw.as_slice()).collect();

        let expected: [&[u8]; 3] = [
            b"data: a\r\n\r\n",
            b":c\ndata: b\r\r",
            b"id: 1\nevent: e\ndata: c\n\n",
        ];
        assert_eq!(raws, expected);
        assert!(events.iter().all(|event| !event.truncated));
    }

    #[test]
    fn raw_excludes_discarded_block() {
        // A block without data is discarded, and the next block starts after it.
        let events = feed_chunks(&[b"event: x\n\n:c\ndata: y\n\n"]);

        assert_eq!(events[0].raw, b":c\ndata: y\n\n");
    }

    #[test]
    fn raw_exact_across_chunks() {
        let events = feed_chunks(&[
            b"data: a\r\n",
            b"\r",
            b"\ndata: b\r",
            b"\n",
            b"\r",
            b"data: c\n",
            b"\n",
        ]);
        let raws: Vec<&[u8]> = events.iter().map(|event| event.raw.as_slice()).collect();

        // The LF after the CR that ended the first block belongs to no block.
        let expected: [&[u8]; 3] = [b"data: a\r\n\r", b"data: b\r\n\r", b"data: c\n\n"];
        assert_eq!(raws, expected);
    }

    #[test]
    fn raw_lf_after_block_cr() {
        let events = feed_chunks(&[b"data: a\n\r", b"\ndata: b\n\n"]);
        let raws: Vec<&[u8]> = events.iter().map(|event| event.raw.as_slice()).collect();

        let expected: [&[u8]; 2] = [b"data: a\n\r", b"data: b\n\n"];
        assert_eq!(raws, expected);
    }

    #[test]
    fn raw_crlf_depends_on_split() {
        let input: &[u8] = b"data: a\r\n\r\ndata: b\n\n";
        let whole = feed_chunks(&[input]);
        let split = feed_chunks(&[&input[..10], &input[10..]]);

        assert_eq!(whole[0].raw, b"data: a\r\n\r\n");
        assert_eq!(split[0].raw, b"data: a\r\n\r");
        assert_eq!(whole[1].raw, split[1].raw);
        assert_eq!(whole[0].data, split[0].data);
    }

    #[test]
    fn raw_truncated_over_limit() {
        let input: &[u8] = b"data: 0123456789abcdef\n\n";
        let mut parser = EventStreamParser::new(16);
        let whole = feed_chunk(&mut parser, input);

        assert_eq!(whole.len(), 1);
        assert!(whole[0].truncated);
        assert_eq!(whole[0].raw, &input[..16]);
        assert_eq!(whole[0].data, "0123456789");

        let mut parser = EventStreamParser::new(16);
        let split: Vec<Dispatched> = [&input[..5], &input[5..20], &input[20..]]
            .iter()
            .flat_map(|chunk| feed_chunk(&mut parser, chunk))
            .collect();
        assert_eq!(split, whole);
    }

    #[test]
    fn raw_at_limit_not_truncated() {
        let input: &[u8] = b"data: 0123456789\n\n";
        let mut parser = EventStreamParser::new(input.len());
        let events = feed_chunk(&mut parser, input);

        assert!(!events[0].truncated);
        assert_eq!(events[0].raw, input);

        let mut parser = EventStreamParser::new(input.len());
        feed_chunk(&mut parser, &input[..8]);
        let events = feed_chunk(&mut parser, &input[8..]);
        assert!(!events[0].truncated);
        assert_eq!(events[0].raw, input);
    }

    #[test]
    fn zero_limit_keeps_no_raw() {
        let mut parser = EventStreamParser::new(0);
        let mut events = feed_chunk(&mut parser, b"event: e\ndata: x\n\ndata:");
        events.extend(feed_chunk(&mut parser, b" y\n\n"));

        assert_eq!(types_of(&events), ["e", "message"]);
        assert!(events.iter().all(|event| event.raw.is_empty()));
        assert!(events.iter().all(|event| event.truncated));
        // Only the one-byte event type buffer is allocated, never the accumulator.
        assert!(
            parser.buffered_bytes() < MIN_ACCUMULATOR_GROWTH,
            "{}",
            parser.buffered_bytes()
        );
    }

    #[test]
    fn memory_bounded_for_long_line() {
        let chunk = vec![b'a'; 64 * 1024];
        let mut parser = EventStreamParser::default();
        let mut dispatched = 0;
        let mut max_buffered = 0;
        for _ in 0..STRESS_BYTES / chunk.len() {
            parser.feed(&chunk, |_| dispatched += 1);
            max_buffered = max_buffered.max(parser.buffered_bytes());
        }

        assert_eq!(dispatched, 0);
        assert!(
            max_buffered <= memory_bound(DEFAULT_MAX_EVENT_BYTES),
            "{max_buffered}"
        );
        assert!(!parser.is_at_event_boundary());
    }

    #[test]
    fn memory_bounded_for_large_data() {
        let chunk = vec![b'a'; 64 * 1024];
        let mut parser = EventStreamParser::default();
        let mut max_buffered = 0;
        parser.feed(b"data: ", |_| {});
        for _ in 0..STRESS_BYTES / chunk.len() {
            parser.feed(&chunk, |_| {});
            max_buffered = max_buffered.max(parser.buffered_bytes());
        }
        let mut events = Vec::new();
        parser.feed(b"\n\n", |event| {
            events.push((event.raw().len(), event.is_truncated()));
        });

        assert!(
            max_buffered <= memory_bound(DEFAULT_MAX_EVENT_BYTES),
            "{max_buffered}"
        );
        assert_eq!(events, [(DEFAULT_MAX_EVENT_BYTES, true)]);
        assert!(
            parser.buffered_bytes() <= RETAINED_ACCUMULATOR_BYTES,
            "{}",
            parser.buffered_bytes()
        );
        assert!(parser.is_at_event_boundary());
    }

    #[test]
    fn memory_bounded_for_tiny_events() {
        let event: &[u8] = b"data:x\n\n";
        let chunk = event.repeat(8 * 1024);
        let mut parser = EventStreamParser::default();
        let mut dispatched = 0usize;
        let mut wrong_data = 0usize;
        let mut max_buffered = 0;
        // The chunk size is not a multiple of a line, so events also span chunks.
        let chunk = &chunk[..chunk.len() - 3];
        let total_events = 1_000_000;
        let mut fed_events = 0;
        while fed_events < total_events {
            parser.feed(chunk, |event| {
                dispatched += 1;
                if event.data() != "x" {
                    wrong_data += 1;
                }
            });
            parser.feed(&event[event.len() - 3..], |_| dispatched += 1);
            fed_events += chunk.len().div_ceil(event.len());
            max_buffered = max_buffered.max(parser.buffered_bytes());
        }

        assert_eq!(dispatched, fed_events);
        assert_eq!(wrong_data, 0);
        assert!(max_buffered <= 1024, "{max_buffered}");
    }

    #[test]
    fn memory_bounded_for_cr_only() {
        let chunk = vec![b'\r'; 64 * 1024];
        let mut parser = EventStreamParser::default();
        let mut dispatched = 0;
        let total = 10_000_000;
        for _ in 0..total / chunk.len() {
            parser.feed(&chunk, |_| dispatched += 1);
            assert_eq!(parser.buffered_bytes(), 0);
        }

        assert_eq!(dispatched, 0);
        assert!(
            !parser.is_at_event_boundary(),
            "boundary after a pending CR"
        );
    }

    #[test]
    fn memory_bounded_for_long_values() {
        let chunk = vec![b'v'; 64 * 1024];
        for prefix in [&b"event: "[..], b"id: ", b": ", b"retry: "] {
            let mut parser = EventStreamParser::new(4096);
            parser.feed(prefix, |_| {});
            for _ in 0..64 {
                parser.feed(&chunk, |_| {});
                assert!(
                    parser.buffered_bytes() <= memory_bound(4096),
                    "{}",
                    parser.buffered_bytes()
                );
            }
            parser.feed(b"\ndata: x\n\n", |_| {});
            assert!(
                parser.buffered_bytes() <= memory_bound(4096),
                "{}",
                parser.buffered_bytes()
            );
        }
    }

    #[test]
    fn accumulator_shrinks_after_block() {
        let mut parser = EventStreamParser::default();
        let large = vec![b'a'; 512 * 1024];
        parser.feed(b"data: ", |_| {});
        parser.feed(&large, |_| {});
        assert!(parser.buffered_bytes() > RETAINED_ACCUMULATOR_BYTES);

        parser.feed(b"\n\n", |_| {});
        assert!(parser.buffered_bytes() <= RETAINED_ACCUMULATOR_BYTES);
    }

    #[test]
    fn debug_output_is_short() {
        let mut parser = EventStreamParser::default();
        parser.feed(b"data: ", |_| {});
        parser.feed(&[b'a'; 10_000], |_| {});
        let mut event_debug = String::new();
        parser.feed(b"\n\n", |event| event_debug = format!("{event:?}"));

        assert!(format!("{parser:?}").len() < 400);
        assert!(event_debug.len() < 200, "{event_debug}");
    }

    /// Returns `event` as dispatched when the LF of its final CRLF is cut off into
    /// the next chunk, or `None` when its raw bytes do not end with CRLF.
    /// `split_event` decides the one case the whole-input event does not show:
    /// whether the block without its LF still exceeds `max_event_bytes`.
    fn without_final_lf(event: &Dispatched, split_event: &Dispatched) -> Option<Dispatched> {
        let mut expected = event.clone();
        if !event.truncated {
            if !event.raw.ends_with(b"\r\n") {
                return None;
            }
            expected.raw.pop();
        } else if !split_event.truncated {
            // The block is exactly max_event_bytes long without its LF.
            if !event.raw.ends_with(b"\r") {
                return None;
            }
            expected.truncated = false;
        }
        Some(expected)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn chunking_does_not_change_events(
            input in stream_input(),
            cuts in proptest::collection::vec(0.0f64..=1.0, 0..12),
            max_event_bytes in prop_oneof![Just(0usize), Just(7), Just(64), Just(DEFAULT_MAX_EVENT_BYTES)],
        ) {
            let mut whole_parser = EventStreamParser::new(max_event_bytes);
            let whole = feed_chunk(&mut whole_parser, &input);

            let mut split_parser = EventStreamParser::new(max_event_bytes);
            let mut split = Vec::new();
            let mut lf_split_off = Vec::new();
            let chunks = split_input(&input, &cuts);
            for (index, chunk) in chunks.iter().enumerate() {
                let events = feed_chunk(&mut split_parser, chunk);
                let next_byte = chunks[index + 1..].iter().find_map(|next| next.first());
                let lf_follows = chunk.ends_with(b"\r") && next_byte == Some(&b'\n');
                for position in 0..events.len() {
                    lf_split_off.push(lf_follows && position + 1 == events.len());
                }
                split.extend(events);
                prop_assert!(split_parser.buffered_bytes() <= memory_bound(max_event_bytes));
            }

            prop_assert_eq!(split.len(), whole.len());
            for ((split_event, whole_event), lf_split_off) in split.iter().zip(&whole).zip(lf_split_off) {
                if lf_split_off && split_event != whole_event {
                    // When the chunk ended with the CR of this block's empty line,
                    // the LF arrived in the next chunk and is not part of the block.
                    let expected = without_final_lf(whole_event, split_event);
                    prop_assert_eq!(Some(split_event), expected.as_ref());
                } else {
                    prop_assert_eq!(split_event, whole_event);
                }
            }
            prop_assert_eq!(split_parser.last_event_id(), whole_parser.last_event_id());
            prop_assert_eq!(split_parser.is_at_event_boundary(), whole_parser.is_at_event_boundary());
        }

        #[test]
        fn matches_reference_algorithm(
            input in stream_input(),
            cuts in proptest::collection::vec(0.0f64..=1.0, 0..12),
        ) {
            let mut parser = EventStreamParser::default();
            let mut events = Vec::new();
            for chunk in split_input(&input, &cuts) {
                events.extend(feed_chunk(&mut parser, chunk));
            }
            let summaries: Vec<(String, String, String)> = events
                .into_iter()
                .map(|event| (event.event_type, event.data, event.last_event_id))
                .collect();

            prop_assert_eq!(summaries, reference_events(&input));
        }
    }

    /// Prints the scan rate for typical token events. Run it in release mode with
    /// `cargo test --release --lib parser::tests::throughput -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn throughput_token_events() {
        let event: &[u8] = b"data: {\"type\":\"token\",\"text\":\"hello\"}\n\n";
        let body = event.repeat(64 * 1024 * 1024 / event.len());
        let mut parser = EventStreamParser::default();
        let mut dispatched = 0usize;

        let started = std::time::Instant::now();
        for chunk in body.chunks(16 * 1024) {
            parser.feed(chunk, |event| dispatched += event.raw().len());
        }
        let elapsed = started.elapsed();

        assert_eq!(dispatched, body.len());
        let mb_per_second = body.len() as f64 / 1e6 / elapsed.as_secs_f64();
        println!(
            "scanned {} bytes in {elapsed:?}: {mb_per_second:.0} MB/s",
            body.len()
        );
    }

    #[test]
    fn empty_line_range_in_chunk() {
        let cases: [(&[u8], std::ops::Range<usize>); 5] = [
            (b"data: a\n\n", 8..9),
            (b"data: a\r\n\r\n", 9..11),
            (b"data: a\r\r", 8..9),
            (b"data: a\n\r\n", 8..10),
            (b":c\ndata: a\n\ndata: b\n\n", 11..12),
        ];
        for (input, expected) in cases {
            let mut parser = EventStreamParser::default();
            let mut ranges = Vec::new();
            parser.feed(input, |event| ranges.push(event.empty_line()));
            assert_eq!(
                ranges.first(),
                Some(&expected),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn empty_line_range_after_split() {
        let mut parser = EventStreamParser::default();
        let mut ranges = Vec::new();
        parser.feed(b"data: a\r", |event| ranges.push(event.empty_line()));
        parser.feed(b"\n\ndata: b\n\n", |event| ranges.push(event.empty_line()));
        assert_eq!(ranges, vec![1..2, 10..11]);
    }
}
