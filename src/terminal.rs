//! Rules that decide which event ends a stream.

use std::{
    fmt,
    sync::{Arc, LazyLock},
};

use memchr::memmem::Finder;

use crate::parser::Event;

/// The outcome of a finished stream, as recorded in the completion store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The service sent its result.
    Completed,
    /// The service reported a failure, or the layer recorded one on its behalf.
    Failed,
}

impl Outcome {
    /// Returns the state name stored in Redis: `completed` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rule that recognizes a stream's terminal event.
///
/// The default rule treats as terminal an event whose type is `completed` or
/// `failed`, and a `message` event whose data is a JSON object with a `type`
/// field equal to `completed` or `failed`.
///
/// # Example
///
/// ```
/// use sse_resilience::{Outcome, TerminalRule};
///
/// // `done` completes a stream, `error` fails it.
/// let rule = TerminalRule::event_types(["done"], ["error"]);
///
/// // Any rule can be written as a function of the dispatched event.
/// let custom = TerminalRule::custom(|event| {
///     (event.event_type() == "end").then_some(Outcome::Completed)
/// });
/// # let _ = (rule, custom);
/// ```
#[derive(Clone, Default)]
pub struct TerminalRule {
    kind: RuleKind,
}

type Predicate = dyn Fn(&Event<'_>) -> Option<Outcome> + Send + Sync;

#[derive(Clone, Default)]
enum RuleKind {
    #[default]
    Default,
    EventTypes {
        completed: Arc<[String]>,
        failed: Arc<[String]>,
    },
    Custom(Arc<Predicate>),
}

impl TerminalRule {
    /// Creates a rule that ends a stream on the given event types.
    ///
    /// Events of a type in `completed` end it as completed, types in `failed`
    /// end it as failed. Data is not inspected.
    pub fn event_types<C, F>(completed: C, failed: F) -> Self
    where
        C: IntoIterator,
        C::Item: Into<String>,
        F: IntoIterator,
        F::Item: Into<String>,
    {
        let completed: Vec<String> = completed.into_iter().map(Into::into).collect();
        let failed: Vec<String> = failed.into_iter().map(Into::into).collect();
        Self {
            kind: RuleKind::EventTypes {
                completed: completed.into(),
                failed: failed.into(),
            },
        }
    }

    /// Creates a rule from a predicate that returns the outcome of a terminal
    /// event and `None` for every other event.
    ///
    /// The predicate runs for every dispatched event of every stream, so it
    /// should be cheap.
    pub fn custom<F>(predicate: F) -> Self
    where
        F: Fn(&Event<'_>) -> Option<Outcome> + Send + Sync + 'static,
    {
        Self {
            kind: RuleKind::Custom(Arc::new(predicate)),
        }
    }

    /// Returns the outcome when `event` ends the stream, else `None`.
    pub fn classify(&self, event: &Event<'_>) -> Option<Outcome> {
        match &self.kind {
            RuleKind::Default => classify_default(event),
            RuleKind::EventTypes { completed, failed } => {
                let event_type = event.event_type();
                if completed.iter().any(|t| t == event_type) {
                    Some(Outcome::Completed)
                } else if failed.iter().any(|t| t == event_type) {
                    Some(Outcome::Failed)
                } else {
                    None
                }
            }
            RuleKind::Custom(predicate) => predicate(event),
        }
    }
}

impl fmt::Debug for TerminalRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            RuleKind::Default => f.write_str("TerminalRule::Default"),
            RuleKind::EventTypes { completed, failed } => f
                .debug_struct("TerminalRule::EventTypes")
                .field("completed", completed)
                .field("failed", failed)
                .finish(),
            RuleKind::Custom(_) => f.write_str("TerminalRule::Custom(..)"),
        }
    }
}

/// Reason stored with a terminal event that was too large to keep whole.
pub(crate) const TRUNCATED_REASON: &str = "truncated";

/// Builds the event stored in place of a terminal event larger than
/// `max_event_bytes`: the same event type and id, with data
/// `{"type":<outcome>,"reason":"truncated","stream_id":<id>}`.
///
/// The first bytes of the original cannot be replayed: a client would never
/// dispatch an event cut before its blank line, and a cut JSON payload would
/// not parse. The parser already removed CR and LF from `event_type` and `id`.
pub(crate) fn truncated_terminal_event(
    event_type: &str,
    id: Option<&str>,
    outcome: Outcome,
    stream_id: &str,
) -> bytes::Bytes {
    let data = serde_json::json!({
        "type": outcome.as_str(),
        "reason": TRUNCATED_REASON,
        "stream_id": stream_id,
    });
    let mut event = String::new();
    if event_type != "message" {
        event.push_str("event: ");
        event.push_str(event_type);
        event.push('\n');
    }
    if let Some(id) = id {
        event.push_str("id: ");
        event.push_str(id);
        event.push('\n');
    }
    event.push_str("data: ");
    event.push_str(&data.to_string());
    event.push_str("\n\n");
    bytes::Bytes::from(event)
}

fn outcome_of_name(name: &str) -> Option<Outcome> {
    match name {
        "completed" => Some(Outcome::Completed),
        "failed" => Some(Outcome::Failed),
        _ => None,
    }
}

static COMPLETED_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("completed"));
static FAILED_FINDER: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new("failed"));

fn classify_default(event: &Event<'_>) -> Option<Outcome> {
    let event_type = event.event_type();
    if event_type != "message" {
        return outcome_of_name(event_type);
    }

    // Most `message` events are progress; a substring check spares the JSON parse.
    // The searchers are built once: building one costs more than searching a
    // small event.
    let raw = event.raw();
    let has_completed = COMPLETED_FINDER.find(raw).is_some();
    if !has_completed && FAILED_FINDER.find(raw).is_none() {
        return None;
    }
    let data = event.data();
    let value: serde_json::Value = serde_json::from_str(&data).ok()?;
    outcome_of_name(value.as_object()?.get("type")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::EventStreamParser;

    fn classify_all(rule: &TerminalRule, input: &str) -> Vec<Option<Outcome>> {
        let mut parser = EventStreamParser::default();
        let mut outcomes = Vec::new();
        parser.feed(input.as_bytes(), |event| {
            outcomes.push(rule.classify(event))
        });
        outcomes
    }

    #[test]
    fn default_rule_event_types() {
        let rule = TerminalRule::default();
        let outcomes = classify_all(
            &rule,
            "event: completed\ndata: x\n\nevent: failed\ndata: y\n\nevent: progress\ndata: z\n\n",
        );
        assert_eq!(
            outcomes,
            vec![Some(Outcome::Completed), Some(Outcome::Failed), None]
        );
    }

    #[test]
    fn default_rule_json_message_type() {
        let rule = TerminalRule::default();
        let outcomes = classify_all(
            &rule,
            "data: {\"type\":\"completed\"}\n\ndata: {\"type\": \"failed\", \"e\": 1}\n\n\
             data: {\"type\":\"progress\",\"note\":\"completed\"}\n\ndata: [\"completed\"]\n\n\
             data: \"completed\"\n\n",
        );
        assert_eq!(
            outcomes,
            vec![
                Some(Outcome::Completed),
                Some(Outcome::Failed),
                None,
                None,
                None
            ]
        );
    }

    #[test]
    fn default_rule_empty_completed_data() {
        let rule = TerminalRule::default();
        assert_eq!(
            classify_all(&rule, "event: completed\ndata:\n\n"),
            vec![Some(Outcome::Completed)]
        );
    }

    #[test]
    fn default_rule_ignores_other_json_events() {
        let rule = TerminalRule::default();
        assert_eq!(
            classify_all(&rule, "event: delta\ndata: {\"type\":\"completed\"}\n\n"),
            vec![None]
        );
    }

    #[test]
    fn event_type_list_rule() {
        let rule = TerminalRule::event_types(["done"], ["error"]);
        let outcomes = classify_all(
            &rule,
            "event: done\ndata: 1\n\nevent: error\ndata: 2\n\nevent: completed\ndata: 3\n\n",
        );
        assert_eq!(
            outcomes,
            vec![Some(Outcome::Completed), Some(Outcome::Failed), None]
        );
    }

    #[test]
    fn custom_rule_sees_data() {
        let rule =
            TerminalRule::custom(|event| (event.data() == "bye").then_some(Outcome::Completed));
        assert_eq!(
            classify_all(&rule, "data: hi\n\ndata: bye\n\n"),
            vec![None, Some(Outcome::Completed)]
        );
    }

    #[test]
    fn truncated_event_keeps_type_and_id() {
        let event = truncated_terminal_event("done", Some("7"), Outcome::Completed, "s1");
        let mut parser = EventStreamParser::default();
        let mut seen = Vec::new();
        parser.feed(&event, |event| {
            seen.push((
                event.event_type().to_owned(),
                event.id().map(str::to_owned),
                event.data().into_owned(),
            ))
        });
        assert_eq!(
            seen,
            vec![(
                "done".to_owned(),
                Some("7".to_owned()),
                r#"{"reason":"truncated","stream_id":"s1","type":"completed"}"#.to_owned()
            )]
        );
    }

    #[test]
    fn truncated_message_event_stays_terminal() {
        let event = truncated_terminal_event("message", None, Outcome::Failed, "s2");
        assert!(!event.starts_with(b"event:"));
        assert_eq!(
            classify_all(
                &TerminalRule::default(),
                std::str::from_utf8(&event).unwrap()
            ),
            vec![Some(Outcome::Failed)]
        );
    }
}
