//! Wakegate's integration tests, in one binary: one link instead of one per file, and
//! the test threads are shared by every file's tests. Each module is one area; run one
//! with `cargo test --test it <module>::`, for example `cargo test --test it databases::`.
//!
//! `tests/metrics.rs` stays its own binary: the metrics recorder is global to a process,
//! and its counts would take in every other test's builds and visits.

#[path = "../common/mod.rs"]
mod common;

mod api;
mod browser;
mod cli;
mod control_plane;
mod crash;
mod custom_domains;
mod dashboard;
mod databases;
mod db_crash;
mod e2e;
mod edge_limits;
mod forges;
mod hetzner;
mod hetzner_crash;
mod parts;
mod soak;
mod terraform;
