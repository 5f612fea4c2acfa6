//! Wakegate's edge.
//!
//! * [`pipeline`] — the one request pipeline both front doors run: limits, host,
//!   reserved paths, route (cache, single-flight), decision, proxy / page / hold, the
//!   stale-route step, the rebuild form, activity. A front door supplies only the
//!   platform hooks ([`pipeline::Platform`]);
//! * [`decide`] — the routing decision, pure and total: a route record and what we know
//!   about the request in, a [`Decision`] out;
//! * [`cache`] — the bounded route cache (LRU, negative entries, prepared origins);
//! * [`answer`] — pages, JSON and redirects as data, and the one place errors become
//!   statuses;
//! * [`bots`] — who must never wake or rebuild anything (crawlers, unfurlers, probes,
//!   prefetches), as data with sources;
//! * [`front`] — the pure steps (request classification, pages, status JSON, the rebuild
//!   form check);
//! * `native` — the hyper front door (not on wasm32): threads, accept loop, connection
//!   limits and timeouts, forwarding;
//! * `worker` — the Cloudflare Worker front door (wasm32 only), see `wrangler.toml`.
#![forbid(unsafe_code)]

pub mod answer;
pub mod bots;
pub mod cache;
mod decide;
pub mod front;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
pub mod pipeline;
#[cfg(target_arch = "wasm32")]
mod worker;

pub use decide::{decide, Decision, PageKind, RequestInfo};

/// Paths under this prefix belong to Wakegate on every preview host.
pub const RESERVED_PREFIX: &str = "/_wakegate/";
