//! Resuming and following streams from the event log, through real servers
//! and a real Redis: cut clients, a second instance, followers, gaps, ended
//! streams, assigned ids, owners and key TTLs. The resume, follow and gap
//! cases run on the memory store too, where a second instance is a second
//! layer on the same store.

mod common;
mod resume_support;

use std::{sync::Arc, time::Duration};

use common::*;
use http::HeaderName;
use resume_support::*;
use sse_resilience::{EventLog, SseResilienceLayer};

/// Poll interval of followers in these tests, short to keep them fast.
const FOLLOW_POLL: Duration = Duration::from_millis(20);

fn fast_log() -> EventLog {
    EventLog::new().follow_poll_interval(FOLLOW_POLL)
}

/// Opens `/sse?stream_id={id}` and takes the inner stream it started.
async fn open(server: &TestServer, id: &str) -> (reqwest::Response, ScriptedStream) {
    let response = server.get(&format!("/sse?stream_id={id}")).await;
    assert_eq!(response.status(), 200, "opening stream {id}");
    let stream = server.scripted.next_stream().await;
    (response, stream)
}

/// Runs stream `id` to its end with `events` and waits until it is recorded
/// and its terminal event is logged.
async fn run_to_end(
    server: &TestServer,
    backend: &Backend,
    id: &str,
    events: &[Vec<u8>],
) -> Vec<u8> {
    let (mut response, stream) = open(server, id).await;
    for event in events {
        stream.send(event.clone());
    }
    // The client's body ends when the inner body does.
    drop(stream);
    let received = strip_heartbeats(&read_to_end(&mut response).await);
    backend.wait_for_state(id, "completed").await;
    wait_for_terminal_logged_on(backend, id).await;
    received
}

/// Asserts that `event` is a gap event of stream `id` for `last_event_id`
/// with `reason`.
fn assert_gap(event: &ParsedEvent, id: &str, last_event_id: &str, reason: &str) {
    assert_eq!(event.event_type, "gap", "first event {}", show(&event.raw));
    assert_eq!(event.id, None, "gap event has an id: {}", show(&event.raw));
    assert!(
        !event.raw.starts_with(b"id:") && find(&event.raw, b"\nid:").is_none(),
        "gap event has an id line: {}",
        show(&event.raw)
    );
    let data: serde_json::Value = serde_json::from_str(&event.data)
        .unwrap_or_else(|e| panic!("gap data is not JSON ({e}): {:?}", event.data));
    assert_eq!(data["type"], "gap", "gap data {data}");
    assert_eq!(data["stream_id"], id, "gap data {data}");
    assert_eq!(data["last_event_id"], last_event_id, "gap data {data}");
    assert_eq!(data["reason"], reason, "gap data {data}");
}

/// What one cut client saw.
struct CutRun {
    id: String,
    cut_after: u32,
    first_status: u16,
    second_status: u16,
    second_content_type: String,
    seen: Vec<u8>,
}

backend_tests!(multi_thread: cut_clients_resume_exactly);

backend_tests!(
    resume_on_other_instance,
    follower_joins_mid_stream,
    unknown_id_gets_gap_event,
    trimmed_log_reports_gap,
    byte_limit_trims_log,
    follower_gets_recorded_failure,
);

async fn cut_clients_resume_exactly(backend: Backend) {
    const STREAMS: usize = 200;
    const TOKENS: u32 = 20;
    let layer = backend
        .layer()
        .heartbeat_interval(Duration::from_millis(50))
        .event_log(fast_log().assign_ids(false));
    let server = Arc::new(TestServer::start(layer).await);
    let events = run_events(TOKENS);
    let full_run = events.concat();
    let seed = Rng::random_seed();
    eprintln!("cut_clients_resume_exactly seed {seed}");

    // One producer per inner stream, seeded by its stream id, sends every
    // event as its own frame after a random pause.
    let scripted = server.scripted.clone();
    let producer_events = events.clone();
    let producers = tokio::spawn(async move {
        let mut tasks = Vec::new();
        for _ in 0..STREAMS {
            let stream = scripted.next_stream().await;
            let id = stream
                .stream_id
                .clone()
                .expect("inner stream without stream_id");
            let number: u64 = id.trim_start_matches("cut-").parse().unwrap();
            let mut rng = Rng::new(seed ^ (number + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let events = producer_events.clone();
            tasks.push(tokio::spawn(async move {
                for event in events {
                    tokio::time::sleep(rng.pause(12)).await;
                    stream.send(event);
                }
            }));
        }
        for task in tasks {
            task.await.expect("a producer panicked");
        }
    });

    let mut rng = Rng::new(seed);
    let mut clients = Vec::new();
    for number in 0..STREAMS {
        let id = format!("cut-{number}");
        let cut_after = 1 + rng.below(u64::from(TOKENS)) as u32;
        let server = server.clone();
        let backend = backend.clone();
        clients.push(tokio::spawn(async move {
            let mut first = server.get(&format!("/sse?stream_id={id}")).await;
            let first_status = first.status().as_u16();
            let last_seen = token(cut_after);
            let received = read_until(&mut first, |bytes| {
                contains(&strip_heartbeats(bytes), &last_seen)
            })
            .await;
            drop(first);
            let received = strip_heartbeats(&received);
            let start = find(&received, &last_seen).unwrap_or_else(|| {
                panic!("event {cut_after} of {id} is not in the received bytes")
            });
            let end = start + last_seen.len();
            let mut seen = received[..end].to_vec();

            // Log appends are asynchronous, so the client resumes once its last event is logged.
            wait_for_logged_on(&backend, &id, &cut_after.to_string()).await;
            let mut second = get_with(
                &server,
                &format!("/sse?stream_id={id}"),
                &[("last-event-id", &cut_after.to_string())],
            )
            .await;
            let second_status = second.status().as_u16();
            let second_content_type = content_type(&second);
            seen.extend(strip_heartbeats(&read_to_end(&mut second).await));
            CutRun {
                id,
                cut_after,
                first_status,
                second_status,
                second_content_type,
                seen,
            }
        }));
    }

    for client in clients {
        let run = client.await.expect("a client task panicked");
        let (id, k) = (&run.id, run.cut_after);
        assert_eq!(run.first_status, 200, "first request of {id}");
        assert_eq!(run.second_status, 200, "resume of {id} after event {k}");
        assert_eq!(
            run.second_content_type, "text/event-stream",
            "resume of {id} after event {k}"
        );
        assert!(
            run.seen == full_run,
            "stream {id} cut after event {k} (seed {seed}) saw {}",
            show(&run.seen)
        );
    }
    producers.await.expect("the producer dispatcher panicked");
    assert_eq!(server.scripted.calls(), STREAMS);
}

async fn resume_on_other_instance(backend: Backend) {
    let server_a = TestServer::start(backend.layer().event_log(fast_log())).await;
    let server_b = TestServer::start(backend.layer().event_log(fast_log())).await;
    let events = run_events(20);

    let (mut first, stream) = open(&server_a, "x1").await;
    for event in &events[..5] {
        stream.send(event.clone());
    }
    let received = read_until(&mut first, |bytes| {
        contains(&strip_heartbeats(bytes), &token(5))
    })
    .await;
    drop(first);
    assert!(
        strip_heartbeats(&received) == span(&events, 1, 5),
        "first connection {}",
        show(&received)
    );

    // A keeps producing while the client is away.
    stream.send(token(6));
    stream.send(token(7));
    wait_for_logged_on(&backend, "x1", "5").await;
    let mut resumed = get_with(&server_b, "/sse?stream_id=x1", &[("last-event-id", "5")]).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(content_type(&resumed), "text/event-stream");
    let early = read_until(&mut resumed, |bytes| {
        contains(&strip_heartbeats(bytes), &token(7))
    })
    .await;
    assert!(
        strip_heartbeats(&early) == span(&events, 6, 7),
        "resume before the rest was sent {}",
        show(&early)
    );

    for event in &events[7..] {
        stream.send(event.clone());
    }
    let mut rest = early;
    rest.extend(read_to_end(&mut resumed).await);
    let rest = strip_heartbeats(&rest);
    assert!(
        rest == span(&events, 6, 21),
        "resume on B received {}",
        show(&rest)
    );
    assert_eq!(server_b.scripted.calls(), 0);
    assert_eq!(server_a.scripted.calls(), 1);
    backend.wait_for_state("x1", "completed").await;
}

async fn follower_joins_mid_stream(backend: Backend) {
    let server = TestServer::start(backend.layer().event_log(fast_log())).await;
    let events = run_events(20);

    let (mut producer_client, stream) = open(&server, "f1").await;
    for event in &events[..5] {
        stream.send(event.clone());
    }
    let mut produced = read_until(&mut producer_client, |bytes| {
        contains(&strip_heartbeats(bytes), &token(5))
    })
    .await;
    wait_for_logged_on(&backend, "f1", "1").await;

    let mut follower = server.get("/sse?stream_id=f1").await;
    assert_eq!(follower.status(), 200);
    assert_eq!(content_type(&follower), "text/event-stream");
    let mut followed = read_until(&mut follower, |bytes| {
        contains(&strip_heartbeats(bytes), &token(5))
    })
    .await;
    assert!(
        strip_heartbeats(&followed) == span(&events, 1, 5),
        "follower before the rest was sent {}",
        show(&followed)
    );

    for event in &events[5..] {
        stream.send(event.clone());
    }
    drop(stream);
    followed.extend(read_to_end(&mut follower).await);
    produced.extend(read_to_end(&mut producer_client).await);
    let followed = strip_heartbeats(&followed);
    let produced = strip_heartbeats(&produced);
    assert!(
        followed == events.concat(),
        "follower received {}",
        show(&followed)
    );
    assert!(
        produced == events.concat(),
        "producing client received {}",
        show(&produced)
    );
    assert_eq!(server.scripted.calls(), 1);
}

async fn unknown_id_gets_gap_event(backend: Backend) {
    let server = TestServer::start(backend.layer().event_log(fast_log())).await;
    let events = run_events(20);

    let (_client, stream) = open(&server, "u1").await;
    for event in &events[..5] {
        stream.send(event.clone());
    }
    wait_for_logged_on(&backend, "u1", "5").await;

    let mut resumed = get_with(&server, "/sse?stream_id=u1", &[("last-event-id", "nope")]).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(content_type(&resumed), "text/event-stream");
    let mut received = read_until(&mut resumed, |bytes| {
        contains(&strip_heartbeats(bytes), &token(5))
    })
    .await;
    for event in &events[5..] {
        stream.send(event.clone());
    }
    received.extend(read_to_end(&mut resumed).await);
    let received = strip_heartbeats(&received);

    let parsed = parse_events(&received);
    assert!(!parsed.is_empty(), "no event in {}", show(&received));
    assert_gap(&parsed[0], "u1", "nope", "unknown_id");
    let after_gap = &received[parsed[0].raw.len()..];
    assert!(
        after_gap == events.concat(),
        "after the gap event {}",
        show(after_gap)
    );
    assert_eq!(server.scripted.calls(), 1);
}

async fn trimmed_log_reports_gap(backend: Backend) {
    let server = TestServer::start(backend.layer().event_log(fast_log().max_events(5))).await;
    // Nineteen tokens and the terminal event: twenty events in all.
    let events = run_events(19);
    run_to_end(&server, &backend, "t1", &events).await;

    let mut resumed = get_with(&server, "/sse?stream_id=t1", &[("last-event-id", "2")]).await;
    assert_eq!(resumed.status(), 200);
    let received = strip_heartbeats(&read_to_end(&mut resumed).await);
    let parsed = parse_events(&received);
    assert!(!parsed.is_empty(), "no event in {}", show(&received));
    assert_gap(&parsed[0], "t1", "2", "trimmed");
    let after_gap = &received[parsed[0].raw.len()..];
    assert!(
        after_gap == span(&events, 16, 20),
        "after the gap event {}",
        show(after_gap)
    );

    // An id still in the log resumes without a gap.
    let mut resumed = get_with(&server, "/sse?stream_id=t1", &[("last-event-id", "17")]).await;
    assert_eq!(resumed.status(), 200);
    let received = strip_heartbeats(&read_to_end(&mut resumed).await);
    assert!(
        received == span(&events, 18, 20),
        "resume after 17 {}",
        show(&received)
    );
    assert_eq!(server.scripted.calls(), 1);
}

async fn byte_limit_trims_log(backend: Backend) {
    let events = run_events(19);
    // Room for the terminal and three two-digit tokens, not four.
    let max_bytes = events[19].len() + 3 * token(10).len() + 1;
    let layer = backend.layer().event_log(fast_log().max_bytes(max_bytes));
    let server = TestServer::start(layer).await;
    run_to_end(&server, &backend, "b1", &events).await;

    let mut resumed = get_with(&server, "/sse?stream_id=b1", &[("last-event-id", "2")]).await;
    assert_eq!(resumed.status(), 200);
    let received = strip_heartbeats(&read_to_end(&mut resumed).await);
    let parsed = parse_events(&received);
    assert!(!parsed.is_empty(), "no event in {}", show(&received));
    assert_gap(&parsed[0], "b1", "2", "trimmed");
    let after_gap = &received[parsed[0].raw.len()..];
    assert!(
        after_gap == span(&events, 17, 20),
        "after the gap event {}",
        show(after_gap)
    );
}

async fn follower_gets_recorded_failure(backend: Backend) {
    let server = TestServer::start(backend.layer().event_log(fast_log())).await;

    let (_client, stream) = open(&server, "fail1").await;
    stream.send(token(1));
    wait_for_logged_on(&backend, "fail1", "1").await;
    let mut follower = server.get("/sse?stream_id=fail1").await;
    assert_eq!(follower.status(), 200);
    let mut followed = read_until(&mut follower, |bytes| {
        contains(&strip_heartbeats(bytes), &token(1))
    })
    .await;

    // The inner body fails, so the end is a synthetic event that is not in the log.
    stream.fail();
    followed.extend(read_to_end(&mut follower).await);
    let followed = strip_heartbeats(&followed);
    let parsed = parse_events(&followed);
    assert_eq!(parsed.len(), 2, "follower received {}", show(&followed));
    assert!(
        parsed[0].raw == token(1),
        "first event {}",
        show(&parsed[0].raw)
    );
    assert_eq!(parsed[1].event_type, "failed");
    let data: serde_json::Value = serde_json::from_str(&parsed[1].data).unwrap();
    assert_eq!(data["reason"], "body_error", "failure data {data}");
}

#[tokio::test]
async fn ended_stream_resumes_rest() {
    let prefix = unique_prefix("resume_ended");
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;
    let events = run_events(20);
    let received = run_to_end(
        &server,
        &Backend::redis_with_prefix(&prefix).await,
        "e1",
        &events,
    )
    .await;
    assert!(received == events.concat(), "first run {}", show(&received));

    let mut resumed = get_with(&server, "/sse?stream_id=e1", &[("last-event-id", "10")]).await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(content_type(&resumed), "text/event-stream");
    let rest = strip_heartbeats(&read_to_end(&mut resumed).await);
    assert!(
        rest == span(&events, 11, 21),
        "resume after 10 {}",
        show(&rest)
    );

    let terminal_id = get_with(&server, "/sse?stream_id=e1", &[("last-event-id", "21")]).await;
    assert_eq!(terminal_id.status(), 204);
    assert!(terminal_id.bytes().await.unwrap().is_empty());

    let mut replay = server.get("/sse?stream_id=e1").await;
    assert_eq!(replay.status(), 200);
    let replayed = read_to_end(&mut replay).await;
    assert!(replayed == completed(21), "replay {}", show(&replayed));
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn query_parameter_resumes() {
    let prefix = unique_prefix("resume_query");
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;
    let events = run_events(20);
    run_to_end(
        &server,
        &Backend::redis_with_prefix(&prefix).await,
        "q1",
        &events,
    )
    .await;

    let mut resumed = server.get("/sse?stream_id=q1&last_event_id=5").await;
    assert_eq!(resumed.status(), 200);
    assert_eq!(content_type(&resumed), "text/event-stream");
    let rest = strip_heartbeats(&read_to_end(&mut resumed).await);
    assert!(
        rest == span(&events, 6, 21),
        "resume after 5 {}",
        show(&rest)
    );

    let terminal_id = server.get("/sse?stream_id=q1&last_event_id=21").await;
    assert_eq!(terminal_id.status(), 204);

    let mut unknown = server.get("/sse?stream_id=q1&last_event_id=nope").await;
    assert_eq!(unknown.status(), 200);
    let received = strip_heartbeats(&read_to_end(&mut unknown).await);
    let parsed = parse_events(&received);
    assert!(!parsed.is_empty(), "no event in {}", show(&received));
    assert_gap(&parsed[0], "q1", "nope", "unknown_id");
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn assigned_ids_inserted() {
    let prefix = unique_prefix("resume_assign");
    let conn = redis().await;
    let layer = log_layer(&prefix, fast_log().assign_ids(true))
        .await
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    let sent: [&[u8]; 4] = [
        b"data: a\n\n",
        b"data: b\n\n",
        b"id: x\ndata: c\n\n",
        b"event: completed\ndata: {\"type\":\"completed\"}\n\n",
    ];

    let (mut client, stream) = open(&server, "a1").await;
    for event in sent {
        stream.send(event);
    }
    drop(stream);
    let received = read_to_end(&mut client).await;
    let parsed = parse_events(&received);
    assert_eq!(parsed.len(), 4, "events in {}", show(&received));
    assert_eq!(
        parsed[0].id.as_deref(),
        Some("1"),
        "first event {}",
        show(&parsed[0].raw)
    );
    assert_eq!(parsed[0].data, "a");
    assert_eq!(
        parsed[1].id.as_deref(),
        Some("2"),
        "second event {}",
        show(&parsed[1].raw)
    );
    assert_eq!(parsed[1].data, "b");
    assert!(
        parsed[0].raw == b"data: a\nid: 1\n\n",
        "first event {}",
        show(&parsed[0].raw)
    );

    // An event with its own id keeps it and gets no second id line.
    assert_eq!(parsed[2].id.as_deref(), Some("x"));
    assert_eq!(parsed[2].data, "c");
    assert!(
        parsed[2].raw == b"id: x\ndata: c\n\n",
        "event with its own id {}",
        show(&parsed[2].raw)
    );
    assert_eq!(parsed[3].event_type, "completed");
    assert_eq!(
        parsed[3].id.as_deref(),
        Some("4"),
        "terminal {}",
        show(&parsed[3].raw)
    );

    // The assigned ids are resume positions.
    wait_for_state(&conn, &prefix, "a1", "completed").await;
    wait_for_terminal_logged(&conn, &prefix, "a1").await;
    let mut resumed = get_with(&server, "/sse?stream_id=a1", &[("last-event-id", "1")]).await;
    assert_eq!(resumed.status(), 200);
    let rest = read_to_end(&mut resumed).await;
    let first_len = parsed[0].raw.len();
    assert!(
        rest == received[first_len..],
        "resume after 1 {}",
        show(&rest)
    );
}

#[tokio::test]
async fn assigned_ids_across_frames() {
    let prefix = unique_prefix("resume_assign_frames");
    let layer = log_layer(&prefix, fast_log().assign_ids(true))
        .await
        .without_heartbeats();
    let server = TestServer::start(layer).await;
    // A CRLF event, a comment block, an event whose blank line is its own frame,
    // and a terminal split inside its data line.
    let frames: [&[u8]; 6] = [
        b"data: a\r\n\r\n",
        b": note\n\n",
        b"data: b\n",
        b"\n",
        b"data: {\"type\":\"completed\"",
        b"}\n\n",
    ];

    let (mut client, stream) = open(&server, "af1").await;
    for frame in frames {
        stream.send(frame);
    }
    drop(stream);
    let received = read_to_end(&mut client).await;

    let parsed = parse_events(&received);
    assert_eq!(parsed.len(), 3, "events in {}", show(&received));
    assert_eq!(
        parsed[0].id.as_deref(),
        Some("1"),
        "first event {}",
        show(&received)
    );
    assert_eq!(parsed[0].data, "a");
    assert_eq!(
        parsed[1].id.as_deref(),
        Some("2"),
        "second event {}",
        show(&received)
    );
    assert_eq!(parsed[1].data, "b");
    assert_eq!(
        parsed[2].id.as_deref(),
        Some("3"),
        "terminal {}",
        show(&received)
    );
    assert_eq!(parsed[2].data, "{\"type\":\"completed\"}");
    assert!(
        contains(&received, b": note\n\n"),
        "comment block changed: {}",
        show(&received)
    );
    assert!(
        ends_at_event_boundary(&received),
        "output ends inside an event: {}",
        show(&received)
    );
}

#[tokio::test]
async fn other_owner_cannot_follow() {
    let prefix = unique_prefix("resume_owner");
    let conn = redis().await;
    let layer = log_layer(&prefix, fast_log())
        .await
        .owner_header(HeaderName::from_static("x-user-id"));
    let server = TestServer::start(layer).await;
    let events = run_events(3);

    let client = get_with(&server, "/sse?stream_id=o1", &[("x-user-id", "alice")]).await;
    assert_eq!(client.status(), 200);
    let stream = server.scripted.next_stream().await;
    stream.send(token(1));
    wait_for_logged(&conn, &prefix, "o1", "1").await;

    let follow = get_with(&server, "/sse?stream_id=o1", &[("x-user-id", "bob")]).await;
    assert_eq!(follow.status(), 404);
    let resume = get_with(
        &server,
        "/sse?stream_id=o1",
        &[("x-user-id", "bob"), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(resume.status(), 404);
    let by_query = get_with(
        &server,
        "/sse?stream_id=o1&last_event_id=1",
        &[("x-user-id", "bob")],
    )
    .await;
    assert_eq!(by_query.status(), 404);
    let anonymous = server.get("/sse?stream_id=o1").await;
    assert_eq!(anonymous.status(), 404);

    // The owner may follow.
    let mut own = get_with(
        &server,
        "/sse?stream_id=o1",
        &[("x-user-id", "alice"), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(own.status(), 200);
    for event in &events[1..] {
        stream.send(event.clone());
    }
    let rest = strip_heartbeats(&read_to_end(&mut own).await);
    assert!(rest == span(&events, 2, 4), "owner resume {}", show(&rest));
    drop(client);

    // Another owner still gets 404 once the stream ended.
    wait_for_state(&conn, &prefix, "o1", "completed").await;
    let ended = get_with(
        &server,
        "/sse?stream_id=o1",
        &[("x-user-id", "bob"), ("last-event-id", "1")],
    )
    .await;
    assert_eq!(ended.status(), 404);
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn log_keys_have_ttl() {
    let prefix = unique_prefix("resume_ttl");
    let mut conn = redis().await;
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;
    let key = log_key(&prefix, "l1");

    let (mut client, stream) = open(&server, "l1").await;
    stream.send(token(1));
    wait_for_logged(&conn, &prefix, "l1", "1").await;
    let live_ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(live_ttl > 0, "live log PTTL is {live_ttl}");

    stream.send(completed(2));
    drop(stream);
    read_to_end(&mut client).await;
    wait_for_state(&conn, &prefix, "l1", "completed").await;
    wait_for_terminal_logged(&conn, &prefix, "l1").await;
    let finished_ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(finished_ttl > 0, "finished log PTTL is {finished_ttl}");

    let logged = log_entries(&mut conn, &prefix, "l1").await;
    assert_eq!(logged.len(), 2, "log {logged:?}");
    assert_eq!(logged[0].event_id, "1");
    assert!(
        logged[0].event == token(1),
        "first entry {}",
        show(&logged[0].event)
    );
    assert!(!logged[0].terminal);
    assert_eq!(logged[1].event_id, "2");
    assert!(
        logged[1].event == completed(2),
        "terminal entry {}",
        show(&logged[1].event)
    );
    assert!(logged[1].terminal);
}

// Guards: behaviour without a log, and requests the log does not change.

#[tokio::test]
async fn without_log_live_id_conflicts() {
    let prefix = unique_prefix("resume_nolog");
    let mut conn = redis().await;
    let layer = SseResilienceLayer::new(conn.clone()).key_prefix(&prefix);
    let server = TestServer::start(layer).await;

    let (mut client, stream) = open(&server, "n1").await;
    stream.send(token(1));
    read_until(&mut client, |bytes| contains(bytes, &token(1))).await;

    let resume = get_with(&server, "/sse?stream_id=n1", &[("last-event-id", "1")]).await;
    assert_eq!(resume.status(), 409);
    let follow = server.get("/sse?stream_id=n1").await;
    assert_eq!(follow.status(), 409);

    stream.send(completed(2));
    drop(stream);
    read_to_end(&mut client).await;
    wait_for_state(&conn, &prefix, "n1", "completed").await;
    let keys = keys_under(&mut conn, &prefix).await;
    assert!(
        !keys.contains(&log_key(&prefix, "n1")),
        "a log key exists without an event log: {keys:?}"
    );
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn resume_of_new_id_starts_stream() {
    let prefix = unique_prefix("resume_new");
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;

    let mut client = get_with(&server, "/sse?stream_id=new1", &[("last-event-id", "5")]).await;
    assert_eq!(client.status(), 200);
    let stream = server.scripted.next_stream().await;
    stream.send(completed(1));
    drop(stream);
    let received = strip_heartbeats(&read_to_end(&mut client).await);
    assert!(received == completed(1), "new stream {}", show(&received));
    assert_eq!(server.scripted.calls(), 1);
}

#[tokio::test]
async fn invalid_id_resume_rejected() {
    let prefix = unique_prefix("resume_invalid");
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;

    let by_query = server.get("/sse?stream_id=bad%20id&last_event_id=1").await;
    assert_eq!(by_query.status(), 400);
    let by_header = get_with(
        &server,
        "/sse?stream_id=bad%20id",
        &[("last-event-id", "1")],
    )
    .await;
    assert_eq!(by_header.status(), 400);
    assert_eq!(server.scripted.calls(), 0);
}

#[tokio::test]
async fn missing_log_reports_gap_then_end() {
    let prefix = unique_prefix("resume_missing_log");
    let server = TestServer::start(log_layer(&prefix, fast_log()).await).await;
    let events = run_events(20);
    run_to_end(
        &server,
        &Backend::redis_with_prefix(&prefix).await,
        "m1",
        &events,
    )
    .await;

    // The hash outlives its log, as after an eviction.
    let mut conn = redis().await;
    let _: () = redis::cmd("DEL")
        .arg(format!("{prefix}{{m1}}:log"))
        .query_async(&mut conn)
        .await
        .unwrap();

    let mut resumed = get_with(&server, "/sse?stream_id=m1", &[("last-event-id", "10")]).await;
    assert_eq!(resumed.status(), 200);
    let received = strip_heartbeats(&read_to_end(&mut resumed).await);
    let parsed = parse_events(&received);
    assert_eq!(parsed.len(), 2, "events {}", show(&received));
    assert_gap(&parsed[0], "m1", "10", "unknown_id");
    assert_eq!(parsed[1].event_type, "completed");
    assert_eq!(server.scripted.calls(), 1);
}
