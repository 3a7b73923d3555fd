//! The browser client, `sse-resilience.js`, shipped with the crate so that an
//! app can serve it from its own origin.
//!
//! The client is a dependency-free ES module that exports `ResilientStream`,
//! an `EventTarget` around `EventSource`. Before it connects, it requests the
//! stream's recovery status, and an ended stream is shown from that response
//! without streaming. It reconnects with exponential backoff and jitter for a
//! bounded number of attempts, and resumes after the last event id (the
//! `last_event_id` query parameter, read by the layer when its event log is
//! on). It stops at the terminal event. Its status is one of `idle`,
//! `connecting`, `streaming`, `completed`, `failed`, `error` and `closed`.
//! The file's header documents its options and events.
//!
//! # Example
//!
//! Serve the module with axum:
//!
//! ```no_run
//! use axum::{Router, http::header, routing::get};
//!
//! let app: Router = Router::new().route(
//!     "/sse-resilience.js",
//!     get(|| async {
//!         (
//!             [(header::CONTENT_TYPE, sse_resilience::client::JS_CONTENT_TYPE)],
//!             sse_resilience::client::JS,
//!         )
//!     }),
//! );
//! ```
//!
//! and use it from a page:
//!
//! ```html
//! <script type="module">
//!   import { ResilientStream } from "/sse-resilience.js";
//!   const stream = new ResilientStream("/api/stream/abc", {
//!     statusUrl: "/api/status/abc",
//!     events: ["token"],
//!   });
//!   stream.addEventListener("token", (e) => console.log(e.lastEventId, e.data));
//!   stream.addEventListener("statuschange", (e) => console.log(e.detail.status));
//!   stream.start();
//! </script>
//! ```

/// The source of `sse-resilience.js`, an ES module.
pub const JS: &str = include_str!("sse-resilience.js");

/// The `Content-Type` to serve [`JS`] with. Browsers load a module script
/// only when its type is a JavaScript MIME type.
pub const JS_CONTENT_TYPE: &str = "text/javascript; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_exports_the_client() {
        assert!(JS.contains("export class ResilientStream extends EventTarget"));
        assert!(JS.contains("export function backoffDelay("));
        assert!(JS.contains("export function defaultTerminal("));
    }

    #[test]
    fn module_has_no_imports() {
        assert!(
            !JS.lines()
                .any(|line| line.trim_start().starts_with("import ")),
            "the client must stay dependency-free"
        );
    }
}
