//! Simulations that run Wakegate's own waker and provisioner on simulated time.
//!
//! * [`workload`] — a week of previews: arrivals, review sessions, merges; the stated
//!   cloud timings;
//! * [`costsim`] — that week through the real control plane against the fake Hetzner
//!   API, once per way of sleeping: billed server-hours, API requests, wake waits.
#![forbid(unsafe_code)]

pub mod costsim;
pub mod workload;
