//! Wakegate's waker: the control API.
//!
//! * edge calls (`/v1/edge/*`), signed with HMAC ([`wakegate_core::sign`]; bad
//!   signatures, replays and clock skew are refused): route by host, status long-poll,
//!   wake, rebuild, batched activity;
//! * operator calls (`/v1/projects*`, `/v1/previews*`) with a bearer token: projects,
//!   previews for a ref, list with TTL remaining, pin/unpin, TTL, sleep, erase;
//! * `/healthz`, `/openapi.json` (the contract in `waker/openapi.json`, checked by a test).
//!
//! Wake and rebuild are single-flight: the lifecycle moves once (compare-and-set) and
//! enqueue is idempotent per preview and kind, so any number of callers make one job.
#![forbid(unsafe_code)]

mod api;
pub mod refs;
mod server;

pub use api::{PreviewView, Waker, WakerConfig};
pub use server::serve;

/// The OpenAPI description of this API.
pub const OPENAPI: &str = include_str!("../openapi.json");
