//! The pure domain of Wakegate.
//!
//! Nothing here does I/O, reads a clock or spawns a task, so the crate builds for
//! `wasm32-unknown-unknown` and every rule in it is unit-tested without mocks:
//!
//! * [`host`] — the strict normalizer for `Host` headers and the hostname scheme
//!   (`<project>-<ref-slug>-<hash>` under the preview base);
//! * [`lifecycle`] — a preview's [`lifecycle::State`], the [`lifecycle::Event`]s that move
//!   it and the pure [`lifecycle::transition`] that returns the next state plus the
//!   [`lifecycle::Effect`]s a driver must perform;
//! * [`metrics`] — the names of the Prometheus metrics the parts record;
//! * [`redirect`] — the one `return_to` sanitizer (same-origin paths only);
//! * [`route`] — the record the edge routes on, and the wire types edge and waker share;
//! * [`sign`] — HMAC request signing (edge → waker, edge → origin) and CSRF tokens;
//! * [`ttl`] — TTL arithmetic in fractional hours.
//!
//! Time is always an argument ([`Millis`], milliseconds since the Unix epoch).
#![forbid(unsafe_code)]

pub mod form;
pub mod gitref;
pub mod host;
pub mod lifecycle;
pub mod metrics;
pub mod redirect;
pub mod route;
pub mod sign;
pub mod ttl;

/// Milliseconds since the Unix epoch. Passed in by drivers; never read inside `core`.
pub type Millis = u64;
