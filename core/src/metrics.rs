//! The names of Wakegate's Prometheus metrics, in one place: the parts that record them
//! (through the `metrics` facade) and the exporter that describes them share these.
//!
//! Conventions: a `wakegate_` prefix, seconds for durations, `_total` for counters,
//! and labels of small fixed sets only (never a preview id or a hostname).

/// `(name, kind, help)` of every metric, for the exporter's descriptions and the docs.
pub const ALL: &[(&str, Kind, &str)] = &[
    (EDGE_REQUEST_SECONDS, Kind::Histogram, "Time the native edge took to answer a request (to the response head), by answer."),
    (EDGE_REQUESTS, Kind::Counter, "Requests the edge answered, by edge (native, worker) and answer; the Worker's come batched with its activity reports."),
    (BOTS_REFUSED, Kind::Counter, "Requests to a sleeping preview refused a wake because they may not wake anything (bots, unfurlers, prefetches, HEAD), by edge."),
    (RATE_LIMITED, Kind::Counter, "Requests and connections refused by a limit, by where (waker: a rate limit such as rebuilds per hour; waker_overload: too many requests in flight; connections, connections_per_ip: a front door's connection caps)."),
    (BUILDS, Kind::Counter, "Builds that ended, by result (ok, failed)."),
    (BUILD_SECONDS, Kind::Histogram, "Time from a build being asked for to the preview running or failing, by result."),
    (BUILD_PHASE_SECONDS, Kind::Histogram, "Time a build spent in each phase, by phase."),
    (WAKE_SECONDS, Kind::Histogram, "Time from a wake being asked for to the preview answering (queue included), by kind (warm, resume, cold; from the backend and the project's sleep mode) and result (ok, failed)."),
    (WAKE_PHASE_SECONDS, Kind::Histogram, "Time a wake spent in each phase (queued: waiting for a provisioner; start: the machine starting), by phase."),
    (SLEEPS, Kind::Counter, "Previews put to sleep, by reason (idle, manual, shutdown)."),
    (ERASES, Kind::Counter, "Previews erased, by reason (ttl, manual, closed, merged)."),
    (PREVIEWS, Kind::Gauge, "Previews by state."),
    (POOL_READY, Kind::Gauge, "Ready machines waiting in a warm pool, by pool (image.server_type.location)."),
    (POOL_SIZE, Kind::Gauge, "Machines a warm pool keeps ready (its min_ready), by pool."),
    (SERVERS, Kind::Gauge, "The cloud's servers Wakegate manages, by state."),
    (CLOUD_REQUESTS, Kind::Counter, "Calls to cloud APIs, by api (hetzner, cloudflare, gitlab, github) and outcome (ok, client_error, server_error, rate_limited, transport)."),
    (CLOUD_RATELIMIT_REMAINING, Kind::Gauge, "Requests left in the cloud API's rate-limit budget (its RateLimit-Remaining), by api."),
    (REF_CHECKS, Kind::Counter, "Checks through git ls-remote whether a branch exists (forge projects ask the forge's API, counted in wakegate_cloud_requests_total), by result (exists, missing, error)."),
    (COST_PER_HOUR, Kind::Gauge, "Estimated cost per hour of the servers and snapshots Wakegate manages now (a stopped server is billed too), in the cloud's currency (EUR gross for Hetzner), from the server types' prices."),
    (JOBS, Kind::Counter, "Provisioner jobs that ended, by kind and result (ok, retry)."),
    (DB_BAKE_SECONDS, Kind::Histogram, "Time a database image took to bake (download, import, sanitize, clean shutdown), by result (ok, failed)."),
    (DB_RESTORE_SECONDS, Kind::Histogram, "Time from a preview's database being started on to it answering, by method (reflink, copy, snapshot: from the project's image; import: from the dump)."),
];

/// The `answer` label of the edge's request metrics, in the edge's `Served` order.
pub const EDGE_ANSWERS: [&str; 7] = ["proxy", "page", "hold", "status", "rebuild", "other", "error"];

/// What kind of metric a name is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

pub const EDGE_REQUEST_SECONDS: &str = "wakegate_edge_request_duration_seconds";
pub const EDGE_REQUESTS: &str = "wakegate_edge_requests_total";
pub const BOTS_REFUSED: &str = "wakegate_bot_visits_refused_total";
pub const RATE_LIMITED: &str = "wakegate_rate_limited_total";
pub const BUILDS: &str = "wakegate_builds_total";
pub const BUILD_SECONDS: &str = "wakegate_build_duration_seconds";
pub const BUILD_PHASE_SECONDS: &str = "wakegate_build_phase_duration_seconds";
pub const WAKE_SECONDS: &str = "wakegate_wake_duration_seconds";
pub const WAKE_PHASE_SECONDS: &str = "wakegate_wake_phase_duration_seconds";
pub const SLEEPS: &str = "wakegate_sleeps_total";
pub const ERASES: &str = "wakegate_erases_total";
pub const PREVIEWS: &str = "wakegate_previews";
pub const POOL_READY: &str = "wakegate_pool_ready";
pub const POOL_SIZE: &str = "wakegate_pool_size";
pub const SERVERS: &str = "wakegate_servers";
pub const CLOUD_REQUESTS: &str = "wakegate_cloud_requests_total";
pub const CLOUD_RATELIMIT_REMAINING: &str = "wakegate_cloud_ratelimit_remaining";
pub const REF_CHECKS: &str = "wakegate_ref_checks_total";
pub const COST_PER_HOUR: &str = "wakegate_running_cost_per_hour";
pub const JOBS: &str = "wakegate_jobs_total";
pub const DB_BAKE_SECONDS: &str = "wakegate_db_image_bake_duration_seconds";
pub const DB_RESTORE_SECONDS: &str = "wakegate_db_restore_duration_seconds";

/// The outcome label of a cloud API call with HTTP status `status` (0: no answer).
pub fn cloud_outcome(status: u16) -> &'static str {
    match status {
        0 => "transport",
        429 => "rate_limited",
        s if s < 400 => "ok",
        s if s < 500 => "client_error",
        _ => "server_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for (name, kind, help) in ALL {
            assert!(seen.insert(*name), "{name} listed twice");
            assert!(name.starts_with("wakegate_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_lowercase() || c == '_'), "{name}");
            assert_eq!(
                *kind == Kind::Counter,
                name.ends_with("_total"),
                "{name}: counters and only counters end in _total"
            );
            if *kind == Kind::Histogram {
                assert!(name.ends_with("_seconds"), "{name}: durations are in seconds");
            }
            assert!(!help.is_empty());
        }
    }
}
