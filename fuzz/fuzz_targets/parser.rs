//! Feeds arbitrary bytes, split into arbitrary chunks, to the event-stream
//! parser: it must not panic, must stay within its memory bound, and must
//! dispatch what the WHATWG algorithm dispatches on the whole input.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sse_resilience::fuzzing::check_parser(data);
});
