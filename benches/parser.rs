//! Throughput of `EventStreamParser` on realistic bodies cut into frames of
//! 1 B, 100 B and 16 KiB. The baseline, in the same run, is a `memchr2`
//! search for the line ends of the same frames: the least work any line
//! scanner does.
//!
//! Run with `cargo bench --bench parser`. The summary at the end prints each
//! parser time as a ratio to its baseline.

mod support;

use std::{hint::black_box, time::Duration, time::SystemTime};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use sse_resilience::EventStreamParser;
use support::{FRAME_SIZES, Ratio, Workload, frames, print_ratios};

/// Bytes of each body; large enough that one body is many events.
const BODY_BYTES: usize = 1024 * 1024;

fn frame_label(size: usize) -> String {
    if size >= 1024 {
        format!("{}KiB", size / 1024)
    } else {
        format!("{size}B")
    }
}

fn bench_parser(c: &mut Criterion) {
    for workload in Workload::ALL {
        let body = workload.body(BODY_BYTES);
        let mut group = c.benchmark_group(format!("parser_{}", workload.name()));
        group.throughput(Throughput::Bytes(body.len() as u64));
        for frame_size in FRAME_SIZES {
            let chunks: Vec<Bytes> = frames(&body, frame_size);
            let label = frame_label(frame_size);

            group.bench_with_input(BenchmarkId::new("parser", &label), &chunks, |b, chunks| {
                b.iter(|| {
                    let mut parser = EventStreamParser::default();
                    let mut events = 0usize;
                    for chunk in chunks {
                        parser.feed(chunk, |event| {
                            events += 1;
                            black_box(event.event_type());
                        });
                    }
                    black_box(events)
                })
            });

            group.bench_with_input(
                BenchmarkId::new("line_search", &label),
                &chunks,
                |b, chunks| {
                    b.iter(|| {
                        let mut line_ends = 0usize;
                        for chunk in chunks {
                            line_ends += memchr::memchr2_iter(b'\r', b'\n', chunk).count();
                        }
                        black_box(line_ends)
                    })
                },
            );
        }
        group.finish();
    }
}

fn main() {
    let started = SystemTime::now();
    let mut criterion = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .configure_from_args();
    bench_parser(&mut criterion);
    criterion.final_summary();

    let mut ratios = Vec::new();
    for workload in Workload::ALL {
        for frame_size in FRAME_SIZES {
            let group = format!("parser_{}", workload.name());
            let label = frame_label(frame_size);
            ratios.push(Ratio {
                label: format!("{} {label}", workload.name()),
                measured: format!("{group}/parser/{label}"),
                baseline: format!("{group}/line_search/{label}"),
            });
        }
    }
    print_ratios(
        "Parser time against a memchr2 line search of the same frames (baseline / parser)",
        started,
        &ratios,
    );
    print_throughput(started);
}

/// Prints the parser's throughput in GB/s (10^9 bytes per second) for each
/// workload and frame size, from the times written in this run.
fn print_throughput(started: SystemTime) {
    println!();
    println!("Parser throughput (GB/s, 10^9 bytes per second)");
    for workload in Workload::ALL {
        let bytes = workload.body(BODY_BYTES).len() as f64;
        for frame_size in FRAME_SIZES {
            let id = format!(
                "parser_{}/parser/{}",
                workload.name(),
                frame_label(frame_size)
            );
            if let Some(ns) = support::time_ns_of(&id, started) {
                println!(
                    "{:<24} {:>8.2}",
                    format!("{} {}", workload.name(), frame_label(frame_size)),
                    bytes / ns
                );
            }
        }
    }
}
