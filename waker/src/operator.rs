//! Operator calls (`/v1/projects*`, `/v1/previews*`), with a bearer token.

use crate::error::{ApiError, ErrorBody};
use crate::model::{
    Accepted, Body, NewPreview, NewProject, PreviewView, SetTtl, DEFAULT_IDLE_TIMEOUT_SECS, IDLE_TIMEOUT_SECS,
};
use crate::waker::{now_ms, Waker};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use std::collections::HashMap;
use std::sync::Arc;
use tracing::{info, warn};
use wakegate_core::host::preview_label;
use wakegate_core::lifecycle::{EraseReason, Event, JobKind, State as Lifecycle};
use wakegate_core::route::{Preview, Project};
use wakegate_core::ttl;
use wakegate_store::driver::{apply, sync_indexes};
use wakegate_store::{StoreError, Versioned};

/// Longest git URL accepted.
pub const MAX_GIT_URL: usize = 2048;

type Created<T> = (StatusCode, Json<T>);

/// Every project.
#[utoipa::path(get, path = "/v1/projects", tag = "operator", security(("operator_token" = [])),
    responses((status = 200, body = Vec<Project>), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_projects(State(w): State<Arc<Waker>>) -> Result<Json<Vec<Project>>, ApiError> {
    Ok(Json(w.store.list_projects().await?))
}

/// Checks a new project; every error names its field.
fn validate_project(req: NewProject) -> Result<Project, ApiError> {
    let name = wakegate_core::host::slugify(&req.name, 20);
    if name != req.name || name.is_empty() {
        return Err(ApiError::bad("name", "name must be 1–20 characters of a-z, 0-9 and inner '-'"));
    }
    let url = req.git_url.trim();
    if url.is_empty() || url.starts_with('-') || url.len() > MAX_GIT_URL || url.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "git_url",
            format!("git_url must be a URL git can fetch (1–{MAX_GIT_URL} bytes, no leading '-')"),
        ));
    }
    let ttl_hours = ttl::validate_hours(req.ttl_hours.unwrap_or(ttl::DEFAULT_TTL_HOURS))
        .map_err(|e| ApiError::bad("ttl_hours", e.to_string()))?;
    let idle = req.idle_timeout_secs.unwrap_or(DEFAULT_IDLE_TIMEOUT_SECS);
    if !IDLE_TIMEOUT_SECS.contains(&idle) {
        return Err(ApiError::bad(
            "idle_timeout_secs",
            format!(
                "idle_timeout_secs must be between {} and {} seconds",
                IDLE_TIMEOUT_SECS.start(),
                IDLE_TIMEOUT_SECS.end()
            ),
        ));
    }
    for (field, value) in
        [("machine.server_type", &req.machine.server_type), ("machine.location", &req.machine.location)]
    {
        if value
            .as_ref()
            .is_some_and(|v| v.is_empty() || v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
        {
            return Err(ApiError::bad(field, format!("{field} must be 1–64 characters of a-z, 0-9 and '-'")));
        }
    }
    if let Some(forge) = &req.forge {
        crate::forge::check_config(forge).map_err(|(field, message)| ApiError::bad(field, message))?;
    }
    Ok(Project {
        id: wakegate_store::new_id("p"),
        name,
        git_url: url.to_string(),
        ttl_hours,
        idle_timeout_secs: idle,
        created_at: now_ms(),
        machine: req.machine,
        org_id: wakegate_core::route::DEFAULT_ORG_ID.into(),
        forge: req.forge,
    })
}

/// Creates a project.
#[utoipa::path(post, path = "/v1/projects", tag = "operator", request_body = NewProject,
    security(("operator_token" = [])),
    responses(
        (status = 201, body = Project), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create_project(
    State(w): State<Arc<Waker>>,
    Body(req): Body<NewProject>,
) -> Result<Created<Project>, ApiError> {
    let org = req.org.clone().unwrap_or_else(|| "default".into());
    let mut project = validate_project(req)?;
    project.org_id = w
        .org_by_name(&org)
        .await
        .map_err(|e| match e {
            ApiError::NotFound(m) => ApiError::bad("org", m),
            e => e,
        })?
        .id;
    w.store.create_project(&project).await?;
    info!(project = %project.name, "project created");
    Ok((StatusCode::CREATED, Json(project)))
}

/// One project by name.
#[utoipa::path(get, path = "/v1/projects/{name}", tag = "operator", security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name")),
    responses(
        (status = 200, body = Project), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn get_project(State(w): State<Arc<Waker>>, Path(name): Path<String>) -> Result<Json<Project>, ApiError> {
    w.project_named(&name).await.map(Json)
}

/// The preview of a ref, created and built if it does not exist (200 when it does).
#[utoipa::path(post, path = "/v1/projects/{name}/previews", tag = "operator", request_body = NewPreview,
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name")),
    responses(
        (status = 200, body = PreviewView), (status = 201, body = PreviewView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 502, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn create_preview(
    State(w): State<Arc<Waker>>,
    Path(name): Path<String>,
    Body(req): Body<NewPreview>,
) -> Result<Created<PreviewView>, ApiError> {
    let git_ref = wakegate_core::gitref::normalize(&req.git_ref).map_err(|e| ApiError::bad("ref", e.to_string()))?;
    let project = w.project_named(&name).await?;
    let (current, created) = w.ensure_preview(&project, &git_ref, true, |_| {}).await?;
    let mut view = w.view(&current, &project);
    w.complete_views(std::slice::from_mut(&mut view)).await;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)))
}

impl Waker {
    /// The preview of `git_ref` (already normalized), created and queued to build when
    /// there is none (`true`). `check_ref`: ask the remote first whether the ref exists
    /// (a forge's event already says so). `setup` fills a new record's other fields.
    pub(crate) async fn ensure_preview(
        &self,
        project: &Project,
        git_ref: &str,
        check_ref: bool,
        setup: impl FnOnce(&mut Preview),
    ) -> Result<(Versioned<Preview>, bool), ApiError> {
        let w = self;
        let label = preview_label(&project.name, &project.id, git_ref);
        let host = w.host_of(&label);
        let id = format!("pv-{}", wakegate_core::host::ref_hash(&project.id, git_ref));
        // an existing record answers only if it is this project's preview of this ref
        let same = |p: &Preview| p.project_id == project.id && p.git_ref == git_ref;
        if let Some(existing) = w.store.get_preview(&id).await? {
            if !same(&existing.value) {
                return Err(ApiError::Conflict(format!("preview id {id} is taken by another ref; report this")));
            }
            // a crash between writing the record and binding its host is repaired here:
            // binding is idempotent
            w.store.bind_host(&host, &id).await?;
            if let Err(e) = crate::orgs::sync_hosts(w, &id).await {
                warn!(preview = %id, error = %e, "binding custom names; the periodic sync will retry");
            }
            let existing = w.store.get_preview(&id).await?.unwrap_or(existing);
            return Ok((existing, false));
        }
        if check_ref {
            match w.refs.exists(&project.git_url, git_ref).await {
                Ok(false) => {
                    return Err(ApiError::Unprocessable(format!("{git_ref} does not exist in {}", project.git_url)))
                }
                Ok(true) => {}
                Err(e) => return Err(ApiError::Upstream(e)),
            }
        }
        let now = now_ms();
        let mut preview = Preview {
            id: id.clone(),
            project_id: project.id.clone(),
            project: project.name.clone(),
            git_ref: git_ref.to_string(),
            label,
            state: Lifecycle::queued(),
            state_since: now,
            created_at: now,
            built_at: now,
            ttl_hours: None,
            pinned: false,
            last_error: None,
            custom_hosts: Vec::new(),
            change: None,
            commit: None,
            dump: None,
            progress: None,
        };
        setup(&mut preview);
        // the record first, then the host, then the job: a crash in between leaves a
        // Building record whose job the reconciler re-enqueues
        let version = match w.store.put_preview(&preview, None).await {
            Ok(v) => v,
            Err(StoreError::Conflict) => {
                return match w.store.get_preview(&id).await? {
                    Some(existing) if same(&existing.value) => Ok((existing, false)),
                    _ => Err(ApiError::Conflict("created concurrently; try again".into())),
                }
            }
            Err(e) => return Err(e.into()),
        };
        w.store.bind_host(&host, &id).await?;
        sync_indexes(w.store.as_ref(), &preview, now).await?;
        // names under the org's bases, before the build starts; a failure here is
        // repaired by the periodic sync
        if let Err(e) = crate::orgs::sync_hosts(w, &id).await {
            warn!(preview = %id, error = %e, "binding custom names; the periodic sync will retry");
        }
        w.store.enqueue(&id, JobKind::Build).await?;
        info!(preview = %id, %host, "preview created");
        let current = w.store.get_preview(&id).await?.unwrap_or(Versioned { version, value: preview });
        Ok((current, true))
    }
}

/// Every preview, with TTL remaining.
#[utoipa::path(get, path = "/v1/previews", tag = "operator", security(("operator_token" = [])),
    responses((status = 200, body = Vec<PreviewView>), (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list_previews(State(w): State<Arc<Waker>>) -> Result<Json<Vec<PreviewView>>, ApiError> {
    let previews = w.store.list_previews().await?;
    let projects: HashMap<String, Project> =
        w.store.list_projects().await?.into_iter().map(|p| (p.id.clone(), p)).collect();
    let mut views: Vec<PreviewView> =
        previews.iter().filter_map(|p| projects.get(&p.value.project_id).map(|pr| w.view(p, pr))).collect();
    w.complete_views(&mut views).await;
    Ok(Json(views))
}

/// One preview.
#[utoipa::path(get, path = "/v1/previews/{id}", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PreviewView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn show(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Json<PreviewView>, ApiError> {
    let (p, project) = w.load(&id).await?;
    let mut view = w.view(&p, &project);
    w.complete_views(std::slice::from_mut(&mut view)).await;
    Ok(Json(view))
}

/// Custom hostnames on Cloudflare for SaaS: how many are in use (the plan includes
/// [`crate::saas::INCLUDED`]) and what Cloudflare says of each.
#[utoipa::path(get, path = "/v1/custom-hostnames", tag = "operator", security(("operator_token" = [])),
    responses((status = 200, body = crate::model::CustomHostnames), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn custom_hostnames(State(w): State<Arc<Waker>>) -> Result<Json<crate::model::CustomHostnames>, ApiError> {
    let hostnames: Vec<_> = crate::saas::registrations(&w).await.into_values().collect();
    Ok(Json(crate::model::CustomHostnames {
        enabled: w.saas.is_some(),
        wildcard: w.saas.as_ref().is_some_and(|s| s.wildcard),
        in_use: hostnames.iter().filter(|r| r.id.is_some()).count(),
        included: crate::saas::INCLUDED,
        hostnames,
    }))
}

/// Changes a preview's settings with compare-and-set, then its indexes.
async fn update(w: &Waker, id: &str, f: impl Fn(&mut Preview)) -> Result<Json<PreviewView>, ApiError> {
    for _ in 0..16 {
        let (p, project) = w.load(id).await?;
        let mut next = p.value.clone();
        f(&mut next);
        match w.store.put_preview(&next, Some(p.version)).await {
            Ok(version) => {
                // the change is stored; an index left behind is repaired by the TTL
                // sweeper, but say so
                if let Err(e) = sync_indexes(w.store.as_ref(), &next, now_ms()).await {
                    warn!(preview = %id, error = %e, "updating the TTL index failed; the sweeper will repair it");
                }
                let mut view = w.view(&Versioned { version, value: next }, &project);
                w.complete_views(std::slice::from_mut(&mut view)).await;
                return Ok(Json(view));
            }
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("too much contention; try again".into()))
}

async fn event(w: &Waker, id: &str, event: Event) -> Result<Created<PreviewView>, ApiError> {
    let a = apply(w.store.as_ref(), id, &event, now_ms()).await?;
    if event == Event::SleepRequested && a.changed {
        metrics::counter!(wakegate_core::metrics::SLEEPS, "reason" => "manual").increment(1);
    }
    let project = w
        .store
        .get_project(&a.preview.value.project_id)
        .await?
        .ok_or_else(|| ApiError::NotFound("the preview's project is gone".into()))?;
    let mut view = w.view(&a.preview, &project);
    w.complete_views(std::slice::from_mut(&mut view)).await;
    Ok((StatusCode::ACCEPTED, Json(view)))
}

/// Keeps a preview past its TTL until unpinned.
#[utoipa::path(post, path = "/v1/previews/{id}/pin", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PreviewView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pin(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Json<PreviewView>, ApiError> {
    update(&w, &id, |p| p.pinned = true).await
}

/// Lets the TTL count again.
#[utoipa::path(post, path = "/v1/previews/{id}/unpin", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PreviewView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn unpin(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Json<PreviewView>, ApiError> {
    update(&w, &id, |p| p.pinned = false).await
}

/// Sets or clears the preview's own TTL.
#[utoipa::path(put, path = "/v1/previews/{id}/ttl", tag = "operator", request_body = SetTtl,
    security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PreviewView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn set_ttl(
    State(w): State<Arc<Waker>>,
    Path(id): Path<String>,
    Body(req): Body<SetTtl>,
) -> Result<Json<PreviewView>, ApiError> {
    let hours =
        req.ttl_hours.map(ttl::validate_hours).transpose().map_err(|e| ApiError::bad("ttl_hours", e.to_string()))?;
    update(&w, &id, |p| p.ttl_hours = hours).await
}

macro_rules! lifecycle_action {
    ($name:ident, $path:literal, $doc:literal, $event:expr) => {
        #[doc = $doc]
        #[utoipa::path(post, path = $path, tag = "operator", security(("operator_token" = [])),
            params(("id" = String, Path, description = "preview id")),
            responses(
                (status = 202, body = PreviewView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
                (status = 409, body = ErrorBody), (status = 410, body = ErrorBody), (status = 503, body = ErrorBody)))]
        pub async fn $name(
            State(w): State<Arc<Waker>>,
            Path(id): Path<String>,
        ) -> Result<Created<PreviewView>, ApiError> {
            event(&w, &id, $event).await
        }
    };
}

lifecycle_action!(sleep, "/v1/previews/{id}/sleep", "Puts a running preview to sleep.", Event::SleepRequested);
lifecycle_action!(wake, "/v1/previews/{id}/wake", "Wakes a sleeping preview.", Event::WakeRequested);
lifecycle_action!(
    erase,
    "/v1/previews/{id}/erase",
    "Erases a preview's machine; its URL offers a rebuild.",
    Event::EraseRequested { reason: EraseReason::Manual }
);

/// Rebuilds the preview from its ref.
#[utoipa::path(post, path = "/v1/previews/{id}/rebuild", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 202, body = Accepted), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 410, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn rebuild(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Created<Accepted>, ApiError> {
    let (p, project) = w.load(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(w.rebuild(p, &project).await?)))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// `build` (checkout, database restore, build command) or `app` (its output).
    pub stream: String,
    /// The stream offset to read from: 0, or the `end` of the last answer to follow it.
    #[serde(default)]
    pub from: u64,
}

/// A preview's build or app log from an offset (the newest 256 KiB are kept; erasing
/// a preview drops them).
#[utoipa::path(get, path = "/v1/previews/{id}/logs", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id"), LogsQuery),
    responses(
        (status = 200, body = crate::model::LogSlice), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn logs(
    State(w): State<Arc<Waker>>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Result<Json<crate::model::LogSlice>, ApiError> {
    let stream = wakegate_store::logs::Stream::parse(&q.stream)
        .ok_or_else(|| ApiError::bad("stream", "stream must be build or app"))?;
    w.load(&id).await?;
    let s = wakegate_store::logs::read(w.store.as_ref(), &id, stream, q.from).await?;
    Ok(Json(crate::model::LogSlice { start: s.start, end: s.end, text: s.text }))
}
