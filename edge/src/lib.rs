//! Wakegate's edge.
//!
//! * [`decide`] — the routing decision, pure and total: a route record and what we know
//!   about the request in, a [`Decision`] out (proxy, a splash page and whether to wake,
//!   hold an API client until the preview is up, or a plain unavailable answer). Builds
//!   for wasm32: the Cloudflare Worker and the native edge share it;
//! * [`bots`] — who must never wake or rebuild anything (crawlers, unfurlers, probes,
//!   prefetches);
//! * [`front`] — what both front doors do alike without I/O (request classification,
//!   pages, status JSON, the rebuild form check);
//! * `native` — the hyper front door (not on wasm32): route cache, proxy with streaming
//!   and WebSocket pass-through, splash pages, wake after the page is sent, batched
//!   activity;
//! * `worker` — the same as a Cloudflare Worker (wasm32 only), see `wrangler.toml`.
#![forbid(unsafe_code)]

pub mod bots;
mod decide;
pub mod front;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
#[cfg(target_arch = "wasm32")]
mod worker;

pub use decide::{decide, Decision, PageKind, RequestInfo};

/// Paths under this prefix belong to Wakegate on every preview host.
pub const RESERVED_PREFIX: &str = "/_wakegate/";
