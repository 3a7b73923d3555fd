//! Followers: responses served from a stream's event log, for clients that
//! resume after their last event or join a live stream.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, Weak},
    time::Duration,
};

use bytes::Bytes;
use tokio::{sync::mpsc, time::Instant};

use crate::store::{FollowQuery, FollowReply, Store};

/// How long a follower looks for its Last-Event-ID in the log of a live
/// stream before it reports a gap: the event may still be on its way.
const SEEK_PATIENCE: Duration = Duration::from_secs(2);
/// Maximum entries one follower reads per poll.
const MAX_ENTRIES_PER_POLL: usize = 512;
/// Capacity of a follower's channel, in messages.
const FOLLOWER_CHANNEL: usize = 1024;

/// A message from the poller to one follower's body.
#[derive(Debug)]
pub(crate) enum FollowMessage {
    Event(Bytes),
    End,
}

/// Polls the logs of every follower of a layer: one pipeline per interval.
pub(crate) struct FollowPoller {
    store: Arc<dyn Store>,
    interval: Duration,
    state: Mutex<PollerState>,
    wake: Arc<tokio::sync::Notify>,
}

#[derive(Default)]
struct PollerState {
    followers: HashMap<u64, Follower>,
    next_key: u64,
    running: bool,
}

struct Follower {
    stream_id: Arc<str>,
    last_event_id: Option<Arc<str>>,
    cursor: u64,
    seek: Option<Arc<str>>,
    seek_deadline: Instant,
    /// Set when the follower first finds that the stream ended before all of its
    /// events were read: the last appends may still be on their way.
    end_deadline: Option<Instant>,
    tx: mpsc::Sender<FollowMessage>,
}

/// A follower's registration; dropping it stops the polling for it.
pub(crate) struct FollowerHandle {
    poller: Arc<FollowPoller>,
    key: u64,
}

impl Drop for FollowerHandle {
    fn drop(&mut self) {
        self.poller.lock().followers.remove(&self.key);
    }
}

impl FollowPoller {
    pub(crate) fn new(store: Arc<dyn Store>, interval: Duration) -> Self {
        Self {
            store,
            interval,
            state: Mutex::new(PollerState::default()),
            wake: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Registers a follower of `stream_id` that resumes after `last_event_id`
    /// (or reads from the start), and polls at once.
    pub(crate) fn follow(
        self: &Arc<Self>,
        stream_id: Arc<str>,
        last_event_id: Option<Arc<str>>,
    ) -> (FollowerHandle, mpsc::Receiver<FollowMessage>) {
        let (tx, rx) = mpsc::channel(FOLLOWER_CHANNEL);
        let (key, start) = {
            let mut state = self.lock();
            let key = state.next_key;
            state.next_key += 1;
            state.followers.insert(
                key,
                Follower {
                    stream_id,
                    seek: last_event_id.clone(),
                    last_event_id,
                    cursor: 0,
                    seek_deadline: Instant::now() + SEEK_PATIENCE,
                    end_deadline: None,
                    tx,
                },
            );
            (key, !std::mem::replace(&mut state.running, true))
        };
        if start {
            tokio::spawn(poll_loop(Arc::downgrade(self), self.wake.clone()));
        }
        self.wake.notify_one();
        (
            FollowerHandle {
                poller: self.clone(),
                key,
            },
            rx,
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PollerState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Polls every follower once. Returns false when there is none.
    async fn poll_all(&self) -> bool {
        let queries: Vec<(u64, FollowQuery)> = {
            let state = self.lock();
            state
                .followers
                .iter()
                // A follower whose channel is full waits for its client to read.
                .filter(|(_, f)| f.tx.capacity() > MAX_ENTRIES_PER_POLL / 4)
                .map(|(key, f)| {
                    (
                        *key,
                        FollowQuery {
                            id: f.stream_id.clone(),
                            cursor: f.cursor,
                            seek: f.seek.clone(),
                            max_entries: MAX_ENTRIES_PER_POLL
                                .min(f.tx.capacity().saturating_sub(2)),
                        },
                    )
                })
                .collect()
        };
        if queries.is_empty() {
            return !self.lock().followers.is_empty();
        }

        let (keys, queries): (Vec<u64>, Vec<FollowQuery>) = queries.into_iter().unzip();
        let replies = match self.store.follow(queries).await {
            Ok(replies) => replies,
            Err(error) => {
                tracing::warn!(%error, followers = keys.len(), "reading event logs failed; retrying");
                return true;
            }
        };

        let now = Instant::now();
        let mut state = self.lock();
        for (key, reply) in keys.into_iter().zip(replies) {
            let Some(follower) = state.followers.get_mut(&key) else {
                continue;
            };
            if follower.deliver(reply, now) {
                state.followers.remove(&key);
            }
        }
        true
    }
}

impl Follower {
    /// Sends what a poll found to the follower's body. Returns true when the
    /// follower is done.
    fn deliver(&mut self, reply: FollowReply, now: Instant) -> bool {
        let live = reply.state == "active";

        if self.seek.is_some() {
            match reply.found {
                Some(seq) if seq > 0 => {
                    self.seek = None;
                    self.cursor = seq;
                }
                _ if live && now < self.seek_deadline => return false,
                _ => {
                    let reason = if reply.first_seq > 1 {
                        "trimmed"
                    } else {
                        "unknown_id"
                    };
                    self.send(gap_event(
                        &self.stream_id,
                        self.last_event_id.as_deref(),
                        reason,
                    ));
                    self.seek = None;
                    self.cursor = 0;
                    // The next poll reads the log from its start.
                    return false;
                }
            }
        }

        for entry in reply.entries {
            let expected = self.cursor + 1;
            if entry.seq != expected && !(self.cursor == 0 && self.last_event_id.is_some()) {
                self.send(gap_event(
                    &self.stream_id,
                    self.last_event_id.as_deref(),
                    "trimmed",
                ));
            }
            self.cursor = entry.seq;
            self.send(entry.event);
            if entry.terminal {
                self.end();
                return true;
            }
        }

        if !live {
            // Events logged before the end may still be on their way to Redis:
            // wait for them, for a bounded time.
            if self.cursor < reply.log_seq {
                let deadline = *self.end_deadline.get_or_insert(now + SEEK_PATIENCE);
                if now < deadline {
                    return false;
                }
            }
            // The log has no terminal entry (the layer or a guardian recorded the
            // end), or the hash is gone: send the recorded end, then stop.
            if let Some(event) = reply.terminal_event {
                self.send(event);
            }
            self.end();
            return true;
        }
        false
    }

    fn send(&self, event: Bytes) {
        let _ = self.tx.try_send(FollowMessage::Event(event));
    }

    fn end(&self) {
        let _ = self.tx.try_send(FollowMessage::End);
    }
}

/// Builds the event that informs a client that events are missing before
/// the ones that follow: `event: gap` with JSON data, and no id.
pub(crate) fn gap_event(stream_id: &str, last_event_id: Option<&str>, reason: &str) -> Bytes {
    let data = serde_json::json!({
        "type": "gap",
        "stream_id": stream_id,
        "last_event_id": last_event_id.unwrap_or(""),
        "reason": reason,
    });
    Bytes::from(format!("event: gap\ndata: {data}\n\n"))
}

/// Clears the running flag when the poll task ends, so the next follower
/// starts a new task.
struct RunningFlag(Weak<FollowPoller>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        if let Some(poller) = self.0.upgrade() {
            poller.lock().running = false;
        }
    }
}

async fn poll_loop(poller: Weak<FollowPoller>, wake: Arc<tokio::sync::Notify>) {
    let _flag = RunningFlag(poller.clone());
    let Some(interval) = poller.upgrade().map(|p| p.interval) else {
        return;
    };
    loop {
        let Some(strong) = poller.upgrade() else {
            break;
        };
        if !strong.poll_all().await {
            // No followers: stop; the next follower starts the task again.
            let mut state = strong.lock();
            if state.followers.is_empty() {
                state.running = false;
                return;
            }
        }
        drop(strong);
        let _ = tokio::time::timeout(interval, wake.notified()).await;
    }
}
