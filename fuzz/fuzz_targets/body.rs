//! Runs the body wrapper over arbitrary frames and idle points: its output
//! must be the input plus heartbeats, each at an event boundary.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sse_resilience::fuzzing::check_body(data);
});
