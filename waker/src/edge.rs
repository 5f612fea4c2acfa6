//! The edge's calls (`/v1/edge/*`), all signed (see [`crate::auth::edge`]).

use crate::error::{ApiError, ErrorBody};
use crate::model::{Accepted, Body, HostQuery, StatusQuery};
use crate::waker::{now_ms, Waker};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::Json;
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::host::normalize_host;
use wakegate_core::lifecycle::{Event, State as Lifecycle};
use wakegate_core::route::{ActivityBatch, HostRequest, RouteRecord};
use wakegate_store::driver::apply;

/// Longest status long-poll.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Rebuilds one client IP may ask for in an hour.
pub const REBUILDS_PER_IP_HOUR: u32 = 20;
/// Rebuilds one preview may get in an hour.
pub const REBUILDS_PER_PREVIEW_HOUR: u32 = 30;
/// Rebuilds one project's previews may get together in an hour.
pub const REBUILDS_PER_PROJECT_HOUR: u32 = 200;
/// Most hosts in one activity batch.
pub const MAX_ACTIVITY_HOSTS: usize = 10_000;

const HOUR: Duration = Duration::from_secs(3600);

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(q)| q).map_err(|e| ApiError::BadRequest { field: None, message: e.body_text() })
}

/// The route record for a host.
#[utoipa::path(get, path = "/v1/edge/route", tag = "edge", params(HostQuery),
    security(("edge_signature" = [])),
    responses(
        (status = 200, body = RouteRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn route(
    State(w): State<Arc<Waker>>,
    q: Result<Query<HostQuery>, QueryRejection>,
) -> Result<Json<RouteRecord>, ApiError> {
    let q = query(q)?;
    let (p, project) = w.find_by_host(&q.host).await?;
    let suspended = w.suspended_domain(&q.host, &p.value, &project).await?;
    Ok(Json(suspend(w.record(p, &project).await, suspended)))
}

/// A custom name under a suspended domain shows that, whatever the preview's state.
fn suspend(mut r: RouteRecord, domain: Option<String>) -> RouteRecord {
    if let Some(domain) = domain {
        r.status = wakegate_core::route::RouteStatus::Suspended { domain };
    }
    r
}

/// Wakes and rebuilds are refused at a custom name whose domain is suspended.
async fn refuse_suspended(
    w: &Waker,
    host: &str,
    p: &wakegate_core::route::Preview,
    project: &wakegate_core::route::Project,
) -> Result<(), ApiError> {
    match w.suspended_domain(host, p, project).await? {
        Some(domain) => Err(ApiError::Conflict(format!("{host} is under {domain}, which is suspended"))),
        None => Ok(()),
    }
}

/// The route record once its version passes `after`, or after `wait` ms.
#[utoipa::path(get, path = "/v1/edge/status", tag = "edge", params(StatusQuery),
    security(("edge_signature" = [])),
    responses(
        (status = 200, body = RouteRecord), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn status(
    State(w): State<Arc<Waker>>,
    q: Result<Query<StatusQuery>, QueryRejection>,
) -> Result<Json<RouteRecord>, ApiError> {
    let q = query(q)?;
    let after = q.after.unwrap_or(0);
    let wait = q.wait.unwrap_or(0).min(MAX_WAIT_MS);
    let (p, project) = w.find_by_host(&q.host).await?;
    let suspended = w.suspended_domain(&q.host, &p.value, &project).await?;
    let p = if p.version <= after && wait > 0 && suspended.is_none() {
        let waited = tokio::select! {
            biased;
            // stopping: the record as it is now; the edge asks again
            () = w.stopping.cancelled() => Some(p),
            r = w.store.wait_preview(&p.value.id, after, Duration::from_millis(wait)) => r?,
        };
        waited.ok_or_else(|| ApiError::NotFound("preview removed".into()))?
    } else {
        p
    };
    Ok(Json(suspend(w.record(p, &project).await, suspended)))
}

/// Wakes a sleeping preview (single-flight).
#[utoipa::path(post, path = "/v1/edge/wake", tag = "edge", request_body = HostRequest,
    security(("edge_signature" = [])),
    responses(
        (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn wake(
    State(w): State<Arc<Waker>>,
    Body(req): Body<HostRequest>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (p, project) = w.find_by_host(&req.host).await?;
    refuse_suspended(&w, &req.host, &p.value, &project).await?;
    let a = apply(w.store.as_ref(), &p.value.id, &Event::WakeRequested, now_ms()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Accepted { state: a.preview.value.state.as_str().to_string(), version: a.preview.version }),
    ))
}

/// Rebuilds an erased or failed preview a visitor confirmed; limited per IP, preview
/// and project.
#[utoipa::path(post, path = "/v1/edge/rebuild", tag = "edge", request_body = HostRequest,
    security(("edge_signature" = [])),
    responses(
        (status = 202, body = Accepted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 410, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn rebuild(
    State(w): State<Arc<Waker>>,
    Body(req): Body<HostRequest>,
) -> Result<(StatusCode, Json<Accepted>), ApiError> {
    let (p, project) = w.find_by_host(&req.host).await?;
    refuse_suspended(&w, &req.host, &p.value, &project).await?;
    if !matches!(p.value.state, Lifecycle::Erased { .. } | Lifecycle::Failed { .. }) {
        // already building or running: single flight, nothing new to do
        let a = Accepted { state: p.value.state.as_str().to_string(), version: p.version };
        return Ok((StatusCode::ACCEPTED, Json(a)));
    }
    let now = now_ms();
    let mut budgets = vec![
        (format!("rebuild:preview:{}", p.value.id), REBUILDS_PER_PREVIEW_HOUR, "this preview"),
        (format!("rebuild:project:{}", project.id), REBUILDS_PER_PROJECT_HOUR, "this project"),
    ];
    if let Some(ip) = &req.client_ip {
        let ip: std::net::IpAddr = ip.parse().map_err(|_| ApiError::bad("client_ip", "not an IP address"))?;
        budgets.insert(0, (format!("rebuild:ip:{ip}"), REBUILDS_PER_IP_HOUR, "this address"));
    }
    for (key, limit, what) in budgets {
        if !w.store.rate_limit(&key, limit, HOUR, now).await? {
            return Err(ApiError::TooManyRequests(format!("too many rebuilds of {what}; try again later")));
        }
    }
    Ok((StatusCode::ACCEPTED, Json(w.rebuild(p, &project).await?)))
}

/// Hosts that saw traffic since the last report.
#[utoipa::path(post, path = "/v1/edge/activity", tag = "edge", request_body = ActivityBatch,
    security(("edge_signature" = [])),
    responses(
        (status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn activity(State(w): State<Arc<Waker>>, Body(batch): Body<ActivityBatch>) -> Result<StatusCode, ApiError> {
    if batch.hosts.len() > MAX_ACTIVITY_HOSTS {
        return Err(ApiError::bad("hosts", format!("at most {MAX_ACTIVITY_HOSTS} hosts a batch")));
    }
    let mut ids = Vec::with_capacity(batch.hosts.len());
    for h in &batch.hosts {
        let Ok(host) = normalize_host(h) else {
            continue;
        };
        if let Some(id) = w.store.resolve_host(host.as_str()).await? {
            ids.push(id);
        }
    }
    // the Worker's counts (the native edge serves its own metrics); only known answers
    for (answer, n) in &batch.served {
        if let Some(a) = wakegate_core::metrics::EDGE_ANSWERS.iter().find(|a| **a == answer.as_str()) {
            metrics::counter!(wakegate_core::metrics::EDGE_REQUESTS, "edge" => "worker", "answer" => *a).increment(*n);
        }
    }
    if batch.refused_wakes > 0 {
        metrics::counter!(wakegate_core::metrics::BOTS_REFUSED, "edge" => "worker").increment(batch.refused_wakes);
    }
    let now = now_ms();
    w.store.touch(&ids, now).await?;
    wakegate_store::stats::record_visits(w.store.as_ref(), &ids, now).await?;
    Ok(StatusCode::NO_CONTENT)
}
