#![forbid(unsafe_code)]
#![deny(missing_docs)]
//! Resilient Server-Sent Events for tower services.

mod body;
mod config;
mod future;
mod guardian;
mod layer;
pub mod parser;
mod registry;
mod request;
mod service;
mod store;
mod terminal;
mod tracker;

pub use body::ResilientBody;
pub use config::*;
pub use future::ResponseFuture;
pub use guardian::{StreamGuardian, SweepReport};
pub use layer::SseResilienceLayer;
pub use parser::{Event, EventStreamParser};
pub use request::{
    InvalidId, MAX_OWNER_LEN, MAX_STREAM_ID_LEN, OwnerSource, StreamIdSource, StreamMetadata,
    StreamOwner, generate_stream_id, validate_stream_id,
};
pub use service::{STREAM_ID_HEADER, SseResilience};
pub use store::{INDEX_SHARDS, StoreError};
pub use terminal::{Outcome, TerminalRule};
