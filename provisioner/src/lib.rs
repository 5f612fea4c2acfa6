//! Wakegate's provisioner: it carries out what the lifecycle schedules.
//!
//! * [`cloud`] — the [`cloud::Cloud`] trait machines are made through, and
//!   [`local::LocalCloud`], where a machine is a working directory plus a child process
//!   on 127.0.0.1 running the project's own commands from its `wakegate.toml`;
//! * [`runner`] — claims jobs (build, wake, sleep, erase) from the store, keeps their
//!   leases alive, and reports progress as lifecycle events;
//! * [`sweep`] — the TTL sweeper, the idle sweeper and the reconciler (re-enqueues the
//!   job a transitional state waits on; reaps machines no record references; marks
//!   previews whose machine vanished as failed);
//! * [`hetzner`] — the Hetzner Cloud backend: servers from cloud-init, pools of ready
//!   machines, a managed firewall, `stop` and `hibernate` sleep modes;
//! * [`agent_api`] — the endpoint machines' agents pull work from and report to;
//! * [`git`] — checking out a ref from any git URL.
#![forbid(unsafe_code)]

pub mod agent_api;
pub mod cloud;
pub mod git;
pub mod hetzner;
pub mod images;
pub mod local;
pub mod localdb;
pub mod localimage;
pub mod manifest;
pub mod runner;
pub use wakegate_serve::supervise;
pub mod sweep;

use std::time::Duration;

/// Wall-clock now in ms (tokio's clock: simulated time under a paused test clock).
/// Only drivers read the clock; `core` never does.
pub use wakegate_store::now_ms;

/// Tunables; `wakegate::config::Config` builds these from its settings, and these
/// defaults are its defaults.
#[derive(Clone, Debug)]
pub struct Settings {
    /// How long a claimed job is ours without renewal.
    pub lease: Duration,
    /// Longest wait for work when idle; an enqueue wakes the loop at once, this only
    /// bounds how late a missed notification is noticed.
    pub poll: Duration,
    /// How often the TTL and idle sweepers and the reconciler run.
    pub sweep_every: Duration,
    /// A machine no record references is deleted once it is this old.
    pub orphan_grace: Duration,
    /// The base of preview URLs, e.g. `http://{label}.localhost:8080`, for `PREVIEW_URL`.
    pub preview_url_template: String,
    /// Cloud API requests the reconciler's listings may spend an hour (Hetzner allows
    /// 3,600; the default is a tenth). Listings are spaced to fit, and come early (never
    /// more often than `sweep_every`) when something suggests the cloud drifted.
    pub cloud_requests_per_hour: u32,
    /// The usual gap between the reconciler's cloud listings (the budget may space them
    /// further; drift brings one sooner). Orphans are reaped within this plus
    /// `orphan_grace`.
    pub list_every: Duration,
    /// How often running previews' apps are checked for life.
    pub liveness_every: Duration,
    /// Builds run at once by one provisioner.
    pub max_builds: usize,
    /// Wakes, sleeps and erases run at once, beside the builds (so a wake never queues
    /// behind long builds).
    pub max_quick_jobs: usize,
    /// How long jobs in flight may finish once the provisioner is told to stop.
    pub shutdown_grace: Duration,
    /// Whether base dumps are baked into database images that previews clone.
    pub db_images: bool,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            lease: Duration::from_secs(30),
            poll: Duration::from_millis(500),
            sweep_every: Duration::from_secs(5),
            orphan_grace: Duration::from_secs(120),
            preview_url_template: "http://{label}.localhost:8080".into(),
            cloud_requests_per_hour: 360,
            list_every: Duration::from_secs(60),
            liveness_every: Duration::from_secs(2),
            max_builds: 4,
            max_quick_jobs: 16,
            shutdown_grace: Duration::from_secs(20),
            db_images: true,
        }
    }
}
