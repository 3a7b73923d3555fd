//! The response body of the layer.

use std::{
    collections::VecDeque,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::{
    sync::mpsc,
    time::{Instant, Sleep},
};
use tokio_util::sync::WaitForCancellationFutureOwned;

use crate::{
    follow::{FollowMessage, FollowerHandle},
    layer::Shared,
    tracker::{FailureReason, Tracker, spawn_drain},
};

const BOM: &[u8; 3] = b"\xEF\xBB\xBF";

/// Frames read in a row, without the body waiting, between two checks of the
/// lifetime and idle deadlines: the clock is not read for every frame.
const DEADLINE_CHECK_FRAMES: u32 = 64;

pin_project! {
    /// Response body of [`SseResilience`](crate::SseResilience).
    ///
    /// For an event stream the layer claimed, every frame of the inner body
    /// passes through unchanged. The body adds heartbeat comments at event
    /// boundaries while the stream is idle, records the terminal event, and
    /// drains the inner body when it is dropped early. Other responses pass
    /// through untouched, and responses of the layer itself (replays, 400, 404,
    /// 409) are a single frame.
    pub struct ResilientBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Passthrough {
            #[pin]
            body: B,
        },
        Full {
            data: Option<Bytes>,
        },
        Tracked {
            stream: Box<TrackedStream<B>>,
        },
        Follow {
            stream: Box<FollowStream>,
        },
    }
}

/// A claimed event stream: the inner body, its tracker and its timers.
struct TrackedStream<B> {
    body: Option<Pin<Box<B>>>,
    tracker: Option<Tracker>,
    drain: fn(Pin<Box<B>>, Tracker, Duration, Instant),
    drain_timeout: Duration,
    heartbeat: Option<(Duration, Bytes)>,
    timer: Pin<Box<Sleep>>,
    timer_deadline: Instant,
    last_activity: Instant,
    /// Data went out since `last_activity` was set. The time is read only
    /// when the inner body is idle: a clock read per frame would cost more
    /// than the rest of the frame's handling when frames are small.
    active: bool,
    /// Frames received since the deadlines were last checked.
    frames_unchecked: u32,
    lifetime_deadline: Instant,
    data_seen: bool,
    heartbeat_before_data: bool,
    /// Pieces of the current frame still to send, around inserted `id:` lines,
    /// and the shutdown hint.
    pending: VecDeque<Bytes>,
    shutdown: ShutdownWatch,
    /// The response was ended by a shutdown; the inner body is still read by a drain.
    closed: bool,
    /// Number of leading bytes of a byte order mark held back after a
    /// heartbeat went first (see `strip_leading_bom`).
    bom_held: u8,
    /// A deadline passed while frames kept coming: the stream ends at the
    /// next poll, after the frame already taken is sent.
    overdue: Option<FailureReason>,
}

impl<B> ResilientBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
        }
    }

    pub(crate) fn follow(stream: Box<FollowStream>) -> Self {
        Self {
            kind: Kind::Follow { stream },
        }
    }

    pub(crate) fn full(data: Bytes) -> Self {
        Self {
            kind: Kind::Full {
                data: (!data.is_empty()).then_some(data),
            },
        }
    }
}

impl<B> ResilientBody<B>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: fmt::Display,
{
    pub(crate) fn tracked(
        body: B,
        tracker: Tracker,
        heartbeat: Option<(Duration, Bytes)>,
        max_lifetime: Duration,
        drain_timeout: Duration,
    ) -> Self {
        let shutdown = ShutdownWatch::new(tracker.shared());
        let now = Instant::now();
        let lifetime_deadline = far_deadline(now, max_lifetime);
        let first_deadline = match &heartbeat {
            Some((interval, _)) => far_deadline(now, *interval).min(lifetime_deadline),
            None => lifetime_deadline,
        };
        Self {
            kind: Kind::Tracked {
                stream: Box::new(TrackedStream {
                    body: Some(Box::pin(body)),
                    tracker: Some(tracker),
                    drain: spawn_drain::<B>,
                    drain_timeout,
                    heartbeat,
                    timer: Box::pin(tokio::time::sleep_until(first_deadline)),
                    timer_deadline: first_deadline,
                    last_activity: now,
                    active: false,
                    frames_unchecked: 0,
                    lifetime_deadline,
                    data_seen: false,
                    heartbeat_before_data: false,
                    pending: VecDeque::new(),
                    shutdown,
                    closed: false,
                    bom_held: 0,
                    overdue: None,
                }),
            },
        }
    }
}

impl<B> Body for ResilientBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Passthrough { body } => body.poll_frame(cx),
            KindProj::Full { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            KindProj::Tracked { stream } => stream.poll_frame(cx),
            KindProj::Follow { stream } => stream.poll_frame(cx).map(|f| f.map(Ok)),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Tracked { stream } => {
                stream.pending.is_empty() && (stream.closed || stream.body.is_none())
            }
            Kind::Follow { stream } => stream.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            // Heartbeats add bytes the inner body cannot know of.
            Kind::Tracked { .. } | Kind::Follow { .. } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ResilientBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Full { .. } => "full",
            Kind::Tracked { .. } => "tracked",
            Kind::Follow { .. } => "follow",
        };
        f.debug_struct("ResilientBody")
            .field("kind", &kind)
            .finish()
    }
}

impl<B> TrackedStream<B>
where
    B: Body<Data = Bytes>,
{
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            if let Some(piece) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(Frame::data(piece))));
            }
            // A response closed by a shutdown ends here; dropping it hands the
            // inner body to a drain.
            if self.closed {
                return Poll::Ready(None);
            }
            if let Some(reason) = self.overdue.take() {
                self.expire(reason);
                return Poll::Ready(None);
            }
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(None);
            };

            if self.shutdown.is_begun() {
                let at_boundary = self
                    .tracker
                    .as_ref()
                    .is_none_or(Tracker::is_at_event_boundary);
                if at_boundary {
                    self.pending.push_back(self.shutdown.retry_frame().clone());
                    self.closed = true;
                    continue;
                }
                if self.shutdown.poll_forced(cx) {
                    // The grace period is over and the stream is still inside an
                    // event: end it anyway, the client drops the partial event.
                    self.closed = true;
                    continue;
                }
            }

            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let first = self.on_frame(frame);
                    // A body that always has a frame ready would never reach
                    // the deadline checks below, so every DEADLINE_CHECK_FRAMES
                    // frames the clock is read here too.
                    self.frames_unchecked += 1;
                    if self.frames_unchecked >= DEADLINE_CHECK_FRAMES {
                        self.frames_unchecked = 0;
                        self.overdue = self.passed_deadline(Instant::now());
                    }
                    match first {
                        Some(first) => return Poll::Ready(Some(Ok(first))),
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(error))) => {
                    self.end(Some(FailureReason::BodyError));
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    if self.bom_held > 0 {
                        // The stream ended inside what looked like a byte order mark.
                        let held = &BOM[..usize::from(self.bom_held)];
                        self.pending.push_back(Bytes::from_static(held));
                        self.bom_held = 0;
                    }
                    self.end(Some(FailureReason::NoTerminalEvent));
                    continue;
                }
                Poll::Pending => {}
            }

            let now = Instant::now();
            if std::mem::take(&mut self.active) {
                self.last_activity = now;
            }
            if let Some(reason) = self.passed_deadline(now) {
                self.expire(reason);
                return Poll::Ready(None);
            }

            let at_boundary = self
                .tracker
                .as_ref()
                .is_some_and(Tracker::is_at_event_boundary);
            let mut deadline = self.lifetime_deadline;
            if let Some(idle) = self.tracker.as_ref().and_then(Tracker::idle_deadline) {
                deadline = deadline.min(idle);
            }
            if let Some((interval, frame)) = &self.heartbeat {
                let due = self.last_activity + *interval;
                if at_boundary {
                    if now >= due {
                        let frame = frame.clone();
                        self.last_activity = now;
                        self.heartbeat_before_data |= !self.data_seen;
                        crate::metrics::heartbeat_sent();
                        return Poll::Ready(Some(Ok(Frame::data(frame))));
                    }
                    deadline = deadline.min(due);
                }
                // Inside an event a heartbeat waits for the event's next bytes, which wake this task.
            }

            if deadline != self.timer_deadline {
                self.timer.as_mut().reset(deadline);
                self.timer_deadline = deadline;
            }
            let timer_fired = self.timer.as_mut().poll(cx).is_ready();
            // Once the shutdown began, the check at the top of the loop handles it.
            let shutdown_begun = !self.shutdown.is_begun() && self.shutdown.poll_begun(cx);
            if !timer_fired && !shutdown_begun {
                return Poll::Pending;
            }
        }
    }

    /// Returns the reason to end the stream when its lifetime or its idle
    /// timeout ran out at `now`.
    fn passed_deadline(&self, now: Instant) -> Option<FailureReason> {
        if now >= self.lifetime_deadline {
            return Some(FailureReason::MaxLifetimeExceeded);
        }
        let idle = self.tracker.as_ref().and_then(Tracker::idle_deadline)?;
        (now >= idle).then_some(FailureReason::IdleTimeout)
    }

    /// Ends the response and records `reason`, for a deadline that passed.
    fn expire(&mut self, reason: FailureReason) {
        let stream_id = self.tracker.as_ref().map_or("", Tracker::stream_id);
        match reason {
            FailureReason::IdleTimeout => tracing::warn!(
                stream_id,
                "stream dispatched no event within its idle timeout; ending it"
            ),
            _ => tracing::warn!(stream_id, "stream reached its maximum lifetime; ending it"),
        }
        self.end(Some(reason));
    }

    /// Scans a frame of the inner body and returns the first piece to send;
    /// the rest (around inserted `id:` lines) waits in `pending`. Returns
    /// `None` when nothing is to be sent yet.
    fn on_frame(&mut self, frame: Frame<Bytes>) -> Option<Frame<Bytes>> {
        let mut data = match frame.into_data() {
            Ok(data) => data,
            Err(other) => return Some(other),
        };
        if data.is_empty() {
            return Some(Frame::data(data));
        }

        if !self.data_seen && self.heartbeat_before_data {
            data = self.strip_leading_bom(data)?;
        }
        self.data_seen = true;
        self.active = true;
        let Some(tracker) = self.tracker.as_mut() else {
            return Some(Frame::data(data));
        };
        let insertions = tracker.observe(&data);
        if insertions.is_empty() {
            return Some(Frame::data(data));
        }

        let mut start = 0;
        for insertion in insertions {
            if insertion.offset > start {
                self.pending.push_back(data.slice(start..insertion.offset));
            }
            self.pending.push_back(insertion.line);
            start = insertion.offset;
        }
        if start < data.len() {
            self.pending.push_back(data.slice(start..));
        }
        Some(Frame::data(self.pending.pop_front().unwrap_or_default()))
    }

    /// Removes the byte order mark that starts the inner body, once a
    /// heartbeat went out before it: a client strips a mark only at the very
    /// start of what it receives.
    ///
    /// A mark split between frames is held back until the frame that decides
    /// it. Returns the bytes to send, or `None` (nothing yet) while held.
    fn strip_leading_bom(&mut self, data: Bytes) -> Option<Bytes> {
        let held = usize::from(self.bom_held);
        let matched = data
            .iter()
            .zip(&BOM[held..])
            .take_while(|(byte, expected)| byte == expected)
            .count();
        if held + matched == BOM.len() {
            self.bom_held = 0;
            // The parser still receives the mark, so that it counts it as the
            // stream's one leading mark and a second one as content.
            if let Some(tracker) = self.tracker.as_mut() {
                tracker.observe(&Bytes::from_static(BOM));
            }
            let rest = data.slice(matched..);
            if rest.is_empty() {
                self.data_seen = true;
                return None;
            }
            return Some(rest);
        }
        if matched == data.len() {
            self.bom_held = (held + matched) as u8;
            return None;
        }
        // Not a mark: the bytes held back are content.
        self.bom_held = 0;
        if held == 0 {
            return Some(data);
        }
        let mut content = Vec::with_capacity(held + data.len());
        content.extend_from_slice(&BOM[..held]);
        content.extend_from_slice(&data);
        Some(Bytes::from(content))
    }

    /// Ends the stream: records `failure` unless a terminal event was already
    /// recorded, and drops the inner body.
    fn end(&mut self, failure: Option<FailureReason>) {
        if let (Some(mut tracker), Some(reason)) = (self.tracker.take(), failure) {
            tracker.fail(reason);
        }
        self.body = None;
    }
}

impl<B> Drop for TrackedStream<B> {
    fn drop(&mut self) {
        let (Some(body), Some(mut tracker)) = (self.body.take(), self.tracker.take()) else {
            return;
        };
        if tracker.is_finished() {
            return;
        }
        if self.bom_held > 0 {
            // The drain reads on from here, so its parser must see the held bytes.
            tracker.observe(&Bytes::from_static(&BOM[..usize::from(self.bom_held)]));
        }
        if self.drain_timeout.is_zero() {
            let reason = if self.shutdown.is_begun() {
                FailureReason::Shutdown
            } else {
                FailureReason::ClientDisconnected
            };
            tracker.fail(reason);
            return;
        }
        (self.drain)(body, tracker, self.drain_timeout, self.lifetime_deadline);
    }
}

/// A response served from a stream's event log.
pub(crate) struct FollowStream {
    rx: mpsc::Receiver<FollowMessage>,
    _handle: FollowerHandle,
    heartbeat: Option<(Duration, Bytes)>,
    timer: Pin<Box<Sleep>>,
    timer_deadline: Instant,
    last_activity: Instant,
    shutdown: ShutdownWatch,
    ended: bool,
}

impl FollowStream {
    pub(crate) fn new(
        shared: Arc<Shared>,
        handle: FollowerHandle,
        rx: mpsc::Receiver<FollowMessage>,
        heartbeat: Option<(Duration, Bytes)>,
    ) -> Self {
        let now = Instant::now();
        let deadline = far_deadline(now, heartbeat.as_ref().map_or(Duration::MAX, |(i, _)| *i));
        Self {
            rx,
            _handle: handle,
            heartbeat,
            timer: Box::pin(tokio::time::sleep_until(deadline)),
            timer_deadline: deadline,
            last_activity: now,
            shutdown: ShutdownWatch::new(&shared),
            ended: false,
        }
    }

    /// Polls the next frame. Every point between two log entries is an event
    /// boundary, so heartbeats and the shutdown hint go out whenever they are due.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame<Bytes>>> {
        loop {
            if self.ended {
                return Poll::Ready(None);
            }
            if self.shutdown.is_begun() {
                self.ended = true;
                return Poll::Ready(Some(Frame::data(self.shutdown.retry_frame().clone())));
            }

            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(FollowMessage::Event(event))) => {
                    self.last_activity = Instant::now();
                    return Poll::Ready(Some(Frame::data(event)));
                }
                Poll::Ready(Some(FollowMessage::End) | None) => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }

            if let Some((interval, frame)) = &self.heartbeat {
                let now = Instant::now();
                let due = self.last_activity + *interval;
                if now >= due {
                    self.last_activity = now;
                    crate::metrics::heartbeat_sent();
                    return Poll::Ready(Some(Frame::data(frame.clone())));
                }
                if due != self.timer_deadline {
                    self.timer.as_mut().reset(due);
                    self.timer_deadline = due;
                }
            }
            let timer_fired = self.timer.as_mut().poll(cx).is_ready();
            // Once the shutdown began, the check at the top of the loop handles it.
            let shutdown_begun = !self.shutdown.is_begun() && self.shutdown.poll_begun(cx);
            if !timer_fired && !shutdown_begun {
                return Poll::Pending;
            }
        }
    }
}

/// A body's view of the layer's shutdown: atomic flags on the hot path, and
/// per-body cancellation futures that wake an idle body.
struct ShutdownWatch {
    shared: Arc<Shared>,
    begun: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    forced: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

impl ShutdownWatch {
    fn new(shared: &Arc<Shared>) -> Self {
        Self {
            shared: shared.clone(),
            begun: None,
            forced: None,
        }
    }

    fn is_begun(&self) -> bool {
        self.shared.shutdown.begun.load(Ordering::Relaxed)
    }

    fn retry_frame(&self) -> &Bytes {
        &self.shared.retry_frame
    }

    /// Registers the task to be woken when the shutdown begins; returns true
    /// when it has.
    fn poll_begun(&mut self, cx: &mut Context<'_>) -> bool {
        let token = &self.shared.shutdown.begin;
        let future = self
            .begun
            .get_or_insert_with(|| Box::pin(token.child_token().cancelled_owned()));
        future.as_mut().poll(cx).is_ready()
    }

    /// Registers the task to be woken when the grace period ends; returns true
    /// when it has.
    fn poll_forced(&mut self, cx: &mut Context<'_>) -> bool {
        let token = &self.shared.shutdown.force;
        let future = self
            .forced
            .get_or_insert_with(|| Box::pin(token.child_token().cancelled_owned()));
        future.as_mut().poll(cx).is_ready()
    }
}

/// Returns `now + after`, or a deadline about thirty years away when that overflows.
fn far_deadline(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}
