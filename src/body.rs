//! The response body of the layer.

use std::{
    fmt,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use crate::tracker::{FailureReason, Tracker, spawn_drain};

const BOM: &[u8] = b"\xEF\xBB\xBF";

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
    lifetime_deadline: Instant,
    data_seen: bool,
    heartbeat_before_data: bool,
}

impl<B> ResilientBody<B> {
    pub(crate) fn passthrough(body: B) -> Self {
        Self {
            kind: Kind::Passthrough { body },
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
                    lifetime_deadline,
                    data_seen: false,
                    heartbeat_before_data: false,
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
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Passthrough { body } => body.is_end_stream(),
            Kind::Full { data } => data.is_none(),
            Kind::Tracked { stream } => stream.body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Passthrough { body } => body.size_hint(),
            Kind::Full { data } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            // Heartbeats add bytes the inner body cannot know of.
            Kind::Tracked { .. } => SizeHint::default(),
        }
    }
}

impl<B> fmt::Debug for ResilientBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Passthrough { .. } => "passthrough",
            Kind::Full { .. } => "full",
            Kind::Tracked { .. } => "tracked",
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
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(None);
            };

            match body.as_mut().poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => return Poll::Ready(Some(Ok(self.on_frame(frame)))),
                Poll::Ready(Some(Err(error))) => {
                    self.end(Some(FailureReason::BodyError));
                    return Poll::Ready(Some(Err(error)));
                }
                Poll::Ready(None) => {
                    self.end(Some(FailureReason::NoTerminalEvent));
                    return Poll::Ready(None);
                }
                Poll::Pending => {}
            }

            let now = Instant::now();
            if now >= self.lifetime_deadline {
                tracing::warn!("stream reached its maximum lifetime; ending it");
                self.end(Some(FailureReason::MaxLifetimeExceeded));
                return Poll::Ready(None);
            }

            let at_boundary = self
                .tracker
                .as_ref()
                .is_some_and(Tracker::is_at_event_boundary);
            let mut deadline = self.lifetime_deadline;
            if let Some((interval, frame)) = &self.heartbeat {
                let due = self.last_activity + *interval;
                if at_boundary {
                    if now >= due {
                        let frame = frame.clone();
                        self.last_activity = now;
                        self.heartbeat_before_data |= !self.data_seen;
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
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    fn on_frame(&mut self, frame: Frame<Bytes>) -> Frame<Bytes> {
        match frame.into_data() {
            Ok(mut data) => {
                if data.is_empty() {
                    return Frame::data(data);
                }
                // A heartbeat before the first byte would move a leading BOM off the
                // start of the stream, where a client no longer strips it.
                if !self.data_seen && self.heartbeat_before_data && data.starts_with(BOM) {
                    data = data.slice(BOM.len()..);
                }
                self.data_seen = true;
                self.last_activity = Instant::now();
                if let Some(tracker) = self.tracker.as_mut() {
                    tracker.observe(&data);
                }
                Frame::data(data)
            }
            Err(other) => other,
        }
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
        if self.drain_timeout.is_zero() {
            tracker.fail(FailureReason::ClientDisconnected);
            return;
        }
        (self.drain)(body, tracker, self.drain_timeout, self.lifetime_deadline);
    }
}

/// Returns `now + after`, or a deadline about thirty years away when that overflows.
fn far_deadline(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(60 * 60 * 24 * 365 * 30))
}
