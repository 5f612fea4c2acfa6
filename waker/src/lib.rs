//! Wakegate's waker: the control API, on axum.
//!
//! * [`app`] — the router, its tower layers (tracing, a request timeout above the longest
//!   long-poll, load shedding over a concurrency cap, body limits) and the OpenAPI
//!   document generated from the handlers' types ([`app::ApiDoc`]), served at
//!   `/openapi.json`;
//! * [`auth`] — edge calls are signed with HMAC ([`wakegate_core::sign`]; bad
//!   signatures, clock skew and replays, remembered in the store so every replica
//!   refuses them, are 401); operator calls carry a bearer token;
//! * [`edge`] — route by host, status long-poll, wake, rebuild (rate-limited per IP,
//!   preview and project in the store), batched activity;
//! * [`operator`] — projects, previews for a ref, list with TTL remaining, pin/unpin,
//!   TTL, sleep, wake, rebuild, erase; every field checked, a 400 names the bad one;
//! * [`orgs`] — orgs, the domains they prove (a TXT record looked up with [`dns`]),
//!   re-checked and suspended after a grace period, their preview bases (the rules in
//!   [`names`]: IDNA, look-alikes, the Public Suffix List, other orgs' bases) and the
//!   names every preview of theirs answers at under them;
//! * [`saas`] — custom names registered as Cloudflare for SaaS custom hostnames,
//!   their status followed until live;
//! * `dashboard` — the operators' page at `/dashboard`: a login with the operator
//!   token makes a session cookie; every preview and project, CSRF-protected actions;
//! * [`error`] — the one error enum and the one place a status is chosen;
//! * [`forge`] — GitLab and GitHub drive previews: verified, de-duplicated webhooks
//!   persisted and worked on after the answer, one comment per merge request edited in
//!   place, environments / deployments, and a paced reconciler;
//! * [`refs`] — "does this ref still exist?" via `git ls-remote`: cached (failures
//!   too), single-flight per ref, bounded, and a timed-out call ends its whole process
//!   group.
//!
//! Wake and rebuild are single-flight: the lifecycle moves once (compare-and-set) and
//! enqueue is idempotent per preview and kind, so any number of callers make one job.
#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
mod dashboard;
pub mod db;
pub mod dns;
pub mod edge;
pub mod error;
pub mod forge;
pub mod images;
pub mod model;
pub mod names;
pub mod operator;
pub mod orgs;
pub mod refs;
pub mod saas;
mod waker;

pub use app::{openapi_json, router};
pub use model::PreviewView;
pub use waker::{ForgeState, Waker, WakerConfig};

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, waker: std::sync::Arc<Waker>) {
    wakegate_serve::serve(listener, router(waker), wakegate_serve::Limits::default()).await
}

/// Serves the API until `shutdown` is cancelled, then lets the requests in flight
/// (long-polls included) finish within `grace`.
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    waker: std::sync::Arc<Waker>,
    shutdown: wakegate_serve::CancellationToken,
    grace: std::time::Duration,
) {
    wakegate_serve::serve_until(listener, router(waker), wakegate_serve::Limits::default(), shutdown, grace).await
}

/// Counts a call to a cloud API (`status` 0: no answer) and remembers the rate-limit
/// budget it reported.
pub(crate) fn record_call(api: &'static str, status: u16, remaining: Option<f64>) {
    use wakegate_core::metrics as m;
    metrics::counter!(m::CLOUD_REQUESTS, "api" => api, "outcome" => m::cloud_outcome(status)).increment(1);
    if let Some(r) = remaining {
        metrics::gauge!(m::CLOUD_RATELIMIT_REMAINING, "api" => api).set(r);
    }
}
