//! Request handling for the waker API.

use crate::refs::RefChecker;
use bytes::Bytes;
use http::request::Parts;
use http::Method;
use http_body_util::Full;
use hyper::Response;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};
use wakegate_core::host::{normalize_host, preview_label};
use wakegate_core::lifecycle::{EraseReason, Event, Rejected, State};
use wakegate_core::route::{ActivityBatch, HostRequest, Preview, Project, RouteRecord, RouteStatus};
use wakegate_core::sign::{self, Key, ReplayGuard};
use wakegate_core::{ttl, Millis};
use wakegate_store::driver::{apply, sync_indexes, ApplyError};
use wakegate_store::{SharedStore, StoreError, Versioned};

/// Longest status long-poll.
pub const MAX_WAIT_MS: u64 = 30_000;
/// Rebuilds one client IP may ask for in an hour.
pub const REBUILDS_PER_IP_HOUR: usize = 20;
/// Rebuilds one preview may get in an hour.
pub const REBUILDS_PER_PREVIEW_HOUR: usize = 30;

fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

#[derive(Clone, Debug)]
pub struct WakerConfig {
    /// Shared with the edge: signs edge → waker calls.
    pub edge_key: Key,
    /// Bearer token for operator calls.
    pub operator_token: String,
    /// Previews answer at `<label>.<preview_base>`.
    pub preview_base: String,
    /// The public URL of a preview; `{label}` is replaced.
    pub preview_url_template: String,
}

pub struct Waker {
    store: SharedStore,
    config: WakerConfig,
    refs: Arc<dyn RefChecker>,
    replay: Mutex<ReplayGuard>,
    limits: Mutex<HashMap<String, VecDeque<Millis>>>,
}

/// A preview as operators see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PreviewView {
    pub id: String,
    pub project: String,
    pub git_ref: String,
    pub label: String,
    pub host: String,
    pub url: String,
    pub state: String,
    pub phase: Option<String>,
    pub reason: Option<String>,
    pub pinned: bool,
    pub ttl_hours: f64,
    pub ttl_remaining_ms: Option<u64>,
    pub ttl_remaining: Option<String>,
    pub created_at: u64,
    pub last_error: Option<String>,
    pub version: u64,
}

type Resp = Response<Full<Bytes>>;

pub(crate) fn json_response(status: u16, body: &serde_json::Value) -> Resp {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("valid response")
}

pub(crate) fn json_error(status: u16, message: &str) -> Resp {
    json_response(status, &json!({ "error": message }))
}

/// An error answer: its status and message. Becomes JSON in [`ApiError::response`].
#[derive(Debug)]
pub(crate) struct ApiError {
    status: u16,
    message: String,
}

impl ApiError {
    fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    fn store(e: StoreError) -> ApiError {
        warn!(error = %e, "store error");
        match e {
            StoreError::Exists(what) => ApiError::new(409, format!("{what} already exists")),
            StoreError::Conflict => ApiError::new(409, "concurrent update, try again"),
            e => ApiError::new(503, format!("store unavailable: {e}")),
        }
    }

    fn response(self) -> Resp {
        json_error(self.status, &self.message)
    }
}

fn ok<T: Serialize>(status: u16, v: &T) -> Resp {
    json_response(status, &serde_json::to_value(v).unwrap_or_default())
}

fn store_error(e: StoreError) -> Resp {
    ApiError::store(e).response()
}

fn apply_error(e: ApplyError) -> Resp {
    match e {
        ApplyError::NotFound(id) => json_error(404, &format!("no preview {id}")),
        ApplyError::Rejected(Rejected::Gone) => json_error(410, "the branch no longer exists"),
        ApplyError::Rejected(r) => json_error(409, &r.to_string()),
        ApplyError::Store(e) => store_error(e),
    }
}

fn query(parts: &Parts) -> HashMap<String, String> {
    wakegate_core::form::parse_pairs(parts.uri.query().unwrap_or("")).into_iter().collect()
}

fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::new(400, format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewProject {
    name: String,
    git_url: String,
    #[serde(default)]
    ttl_hours: Option<f64>,
    #[serde(default)]
    idle_timeout_secs: Option<u64>,
    #[serde(default)]
    machine: wakegate_core::route::MachineSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewPreview {
    #[serde(rename = "ref")]
    git_ref: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetTtl {
    ttl_hours: Option<f64>,
}

impl Waker {
    pub fn new(store: SharedStore, config: WakerConfig, refs: Arc<dyn RefChecker>) -> Waker {
        Waker { store, config, refs, replay: Mutex::new(ReplayGuard::default()), limits: Mutex::new(HashMap::new()) }
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// Routes one request. The body is already read (bounded).
    pub async fn handle(&self, parts: &Parts, body: Bytes) -> Resp {
        let path = parts.uri.path();
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        match (&parts.method, segs.as_slice()) {
            (&Method::GET, ["healthz"]) => json_response(200, &json!({"ok": true})),
            (&Method::GET, ["openapi.json"]) => Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(crate::OPENAPI.as_bytes())))
                .expect("valid response"),
            (_, ["v1", "edge", ..]) => {
                if let Err(e) = self.verify_edge(parts, &body) {
                    return e.response();
                }
                match (&parts.method, &segs[2..]) {
                    (&Method::GET, ["route"]) => self.route(parts).await,
                    (&Method::GET, ["status"]) => self.status(parts).await,
                    (&Method::POST, ["wake"]) => self.wake(&body).await,
                    (&Method::POST, ["rebuild"]) => self.rebuild_from_edge(&body).await,
                    (&Method::POST, ["activity"]) => self.activity(&body).await,
                    _ => json_error(404, "no such edge endpoint"),
                }
            }
            (_, ["v1", ..]) => {
                let token = parts
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                if !token.is_some_and(|t| constant_eq(t.as_bytes(), self.config.operator_token.as_bytes())) {
                    return json_error(401, "operator token required (Authorization: Bearer …)");
                }
                match (&parts.method, &segs[1..]) {
                    (&Method::GET, ["projects"]) => match self.store.list_projects().await {
                        Ok(p) => ok(200, &p),
                        Err(e) => store_error(e),
                    },
                    (&Method::POST, ["projects"]) => self.create_project(&body).await,
                    (&Method::GET, ["projects", name]) => match self.store.project_by_name(name).await {
                        Ok(Some(p)) => ok(200, &p),
                        Ok(None) => json_error(404, &format!("no project {name}")),
                        Err(e) => store_error(e),
                    },
                    (&Method::POST, ["projects", name, "previews"]) => self.create_preview(name, &body).await,
                    (&Method::GET, ["previews"]) => self.list_previews().await,
                    (&Method::GET, ["previews", id]) => self.show(id).await,
                    (&Method::POST, ["previews", id, action]) => self.action(id, action).await,
                    (&Method::PUT, ["previews", id, "ttl"]) => self.set_ttl(id, &body).await,
                    _ => json_error(404, "no such endpoint"),
                }
            }
            _ => json_error(404, "no such endpoint"),
        }
    }

    fn verify_edge(&self, parts: &Parts, body: &[u8]) -> Result<(), ApiError> {
        let header = parts.headers.get(sign::SIGNATURE_HEADER).and_then(|v| v.to_str().ok());
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let now = now_ms();
        let signed =
            sign::verify(&self.config.edge_key, header, parts.method.as_str(), path, &sign::body_digest(body), now)
                .map_err(|e| ApiError::new(401, e.to_string()))?;
        self.replay.lock().unwrap().check(&signed, now).map_err(|e| ApiError::new(401, e.to_string()))
    }

    fn host_of(&self, label: &str) -> String {
        format!("{label}.{}", self.config.preview_base)
    }

    async fn find_by_host(&self, raw: &str) -> Result<(Versioned<Preview>, Project), ApiError> {
        let host = normalize_host(raw).map_err(|e| ApiError::new(400, format!("bad host: {e}")))?;
        let id = self.store.resolve_host(host.as_str()).await.map_err(ApiError::store)?;
        let id = id.ok_or_else(|| ApiError::new(404, format!("no preview at {host}")))?;
        self.load(&id).await
    }

    async fn load(&self, id: &str) -> Result<(Versioned<Preview>, Project), ApiError> {
        let p = self
            .store
            .get_preview(id)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::new(404, format!("no preview {id}")))?;
        let project = self
            .store
            .get_project(&p.value.project_id)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::new(404, "the preview's project is gone"))?;
        Ok((p, project))
    }

    /// The edge's view; for erased previews, asks git whether the ref still exists and
    /// records "gone" (or back) accordingly.
    async fn record(&self, p: Versioned<Preview>, project: &Project) -> RouteRecord {
        let mut p = p;
        let mut rebuildable = true;
        if matches!(p.value.state, State::Erased { .. } | State::Failed { .. } | State::Gone) {
            match self.refs.exists(&project.git_url, &p.value.git_ref).await {
                Ok(exists) => {
                    rebuildable = exists;
                    let event = match (&p.value.state, exists) {
                        (State::Gone, true) => Some(Event::RefRestored),
                        (State::Erased { .. } | State::Failed { .. }, false) => Some(Event::RefDeleted),
                        _ => None,
                    };
                    if let Some(event) = event {
                        if let Ok(a) = apply(self.store.as_ref(), &p.value.id, &event, now_ms()).await {
                            info!(preview = %p.value.id, state = a.preview.value.state.as_str(), "ref check");
                            p = a.preview;
                        }
                    }
                }
                Err(e) => {
                    warn!(preview = %p.value.id, error = %e, "cannot ask the remote; assuming the ref exists")
                }
            }
        }
        let remaining = p.value.expires_at(project).map(|at| ttl::remaining(at, now_ms()));
        RouteRecord {
            preview_id: p.value.id.clone(),
            project: p.value.project.clone(),
            git_ref: p.value.git_ref.clone(),
            status: RouteStatus::from_state(&p.value.state, rebuildable),
            version: p.version,
            ttl_remaining_ms: remaining,
            pinned: p.value.pinned,
        }
    }

    async fn route(&self, parts: &Parts) -> Resp {
        let q = query(parts);
        let Some(host) = q.get("host") else {
            return json_error(400, "host is required");
        };
        match self.find_by_host(host).await {
            Ok((p, project)) => ok(200, &self.record(p, &project).await),
            Err(e) => e.response(),
        }
    }

    async fn status(&self, parts: &Parts) -> Resp {
        let q = query(parts);
        let Some(host) = q.get("host") else {
            return json_error(400, "host is required");
        };
        let after: u64 = q.get("after").and_then(|v| v.parse().ok()).unwrap_or(0);
        let wait = q.get("wait").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0).min(MAX_WAIT_MS);
        let (p, project) = match self.find_by_host(host).await {
            Ok(x) => x,
            Err(e) => return e.response(),
        };
        let p = if p.version <= after && wait > 0 {
            match self.store.wait_preview(&p.value.id, after, Duration::from_millis(wait)).await {
                Ok(Some(p)) => p,
                Ok(None) => return json_error(404, "preview removed"),
                Err(e) => return store_error(e),
            }
        } else {
            p
        };
        ok(200, &self.record(p, &project).await)
    }

    /// The body of a wake or rebuild call and the preview its host names.
    async fn host_request(&self, body: &[u8]) -> Result<(HostRequest, Versioned<Preview>, Project), ApiError> {
        let req: HostRequest = parse(body)?;
        let (p, project) = self.find_by_host(&req.host).await?;
        Ok((req, p, project))
    }

    async fn wake(&self, body: &[u8]) -> Resp {
        let (_, p, _) = match self.host_request(body).await {
            Ok(x) => x,
            Err(e) => return e.response(),
        };
        match apply(self.store.as_ref(), &p.value.id, &Event::WakeRequested, now_ms()).await {
            Ok(a) => {
                json_response(202, &json!({"state": a.preview.value.state.as_str(), "version": a.preview.version}))
            }
            Err(e) => apply_error(e),
        }
    }

    /// Counts an action against a key's hourly budget.
    fn within_limit(&self, key: String, per_hour: usize) -> bool {
        let now = now_ms();
        let mut limits = self.limits.lock().unwrap();
        let q = limits.entry(key).or_default();
        while q.front().is_some_and(|t| now.saturating_sub(*t) > 3_600_000) {
            q.pop_front();
        }
        if q.len() >= per_hour {
            return false;
        }
        q.push_back(now);
        true
    }

    async fn rebuild_from_edge(&self, body: &[u8]) -> Resp {
        let (req, p, project) = match self.host_request(body).await {
            Ok(x) => x,
            Err(e) => return e.response(),
        };
        if !matches!(p.value.state, State::Erased { .. } | State::Failed { .. }) {
            // already building or running: single flight, nothing new to do
            return json_response(202, &json!({"state": p.value.state.as_str(), "version": p.version}));
        }
        if let Some(ip) = &req.client_ip {
            if !self.within_limit(format!("ip:{ip}"), REBUILDS_PER_IP_HOUR) {
                return json_error(429, "too many rebuilds from this address; try again later");
            }
        }
        if !self.within_limit(format!("preview:{}", p.value.id), REBUILDS_PER_PREVIEW_HOUR) {
            return json_error(429, "too many rebuilds of this preview; try again later");
        }
        self.rebuild(p, &project).await
    }

    async fn rebuild(&self, p: Versioned<Preview>, project: &Project) -> Resp {
        match self.refs.exists(&project.git_url, &p.value.git_ref).await {
            Ok(false) => {
                let _ = apply(self.store.as_ref(), &p.value.id, &Event::RefDeleted, now_ms()).await;
                return json_error(410, "the branch no longer exists");
            }
            Ok(true) => {}
            Err(e) => warn!(error = %e, "cannot ask the remote; building anyway"),
        }
        match apply(self.store.as_ref(), &p.value.id, &Event::BuildRequested, now_ms()).await {
            Ok(a) => {
                info!(preview = %p.value.id, "rebuild requested");
                json_response(202, &json!({"state": a.preview.value.state.as_str(), "version": a.preview.version}))
            }
            Err(e) => apply_error(e),
        }
    }

    async fn activity(&self, body: &[u8]) -> Resp {
        let batch: ActivityBatch = match parse(body) {
            Ok(b) => b,
            Err(e) => return e.response(),
        };
        if batch.hosts.len() > 10_000 {
            return json_error(413, "at most 10000 hosts a batch");
        }
        let mut ids = Vec::with_capacity(batch.hosts.len());
        for h in &batch.hosts {
            let Ok(host) = normalize_host(h) else {
                continue;
            };
            if let Ok(Some(id)) = self.store.resolve_host(host.as_str()).await {
                ids.push(id);
            }
        }
        match self.store.touch(&ids, now_ms()).await {
            Ok(()) => Response::builder().status(204).body(Full::new(Bytes::new())).expect("valid response"),
            Err(e) => store_error(e),
        }
    }

    async fn create_project(&self, body: &[u8]) -> Resp {
        let req: NewProject = match parse(body) {
            Ok(r) => r,
            Err(e) => return e.response(),
        };
        let name = wakegate_core::host::slugify(&req.name, 20);
        if name != req.name || name.is_empty() {
            return json_error(400, "name must be 1–20 characters of a-z, 0-9 and inner '-'");
        }
        if req.git_url.trim().is_empty() || req.git_url.starts_with('-') {
            return json_error(400, "git_url is required");
        }
        let ttl_hours = match ttl::validate_hours(req.ttl_hours.unwrap_or(ttl::DEFAULT_TTL_HOURS)) {
            Ok(h) => h,
            Err(e) => return json_error(400, &e.to_string()),
        };
        let project = Project {
            id: wakegate_store::new_id("p"),
            name,
            git_url: req.git_url,
            ttl_hours,
            idle_timeout_secs: req.idle_timeout_secs.unwrap_or(1800).max(1),
            created_at: now_ms(),
            machine: req.machine,
        };
        match self.store.create_project(&project).await {
            Ok(()) => ok(201, &project),
            Err(e) => store_error(e),
        }
    }

    fn view(&self, p: &Versioned<Preview>, project: &Project) -> PreviewView {
        let v = &p.value;
        let remaining = v.expires_at(project).map(|at| ttl::remaining(at, now_ms()));
        let (phase, reason) = match &v.state {
            State::Building { phase, .. } => (Some(phase.as_str().to_string()), None),
            State::Failed { phase, reason } => (Some(phase.as_str().to_string()), Some(reason.clone())),
            State::Erased { reason } | State::Erasing { reason, .. } => (None, Some(reason.as_str().to_string())),
            _ => (None, None),
        };
        PreviewView {
            id: v.id.clone(),
            project: v.project.clone(),
            git_ref: v.git_ref.clone(),
            label: v.label.clone(),
            host: self.host_of(&v.label),
            url: self.config.preview_url_template.replace("{label}", &v.label),
            state: v.state.as_str().to_string(),
            phase,
            reason,
            pinned: v.pinned,
            ttl_hours: v.effective_ttl_hours(project),
            ttl_remaining_ms: remaining,
            ttl_remaining: remaining.map(ttl::format_remaining),
            created_at: v.created_at,
            last_error: v.last_error.clone(),
            version: p.version,
        }
    }

    async fn create_preview(&self, project_name: &str, body: &[u8]) -> Resp {
        let req: NewPreview = match parse(body) {
            Ok(r) => r,
            Err(e) => return e.response(),
        };
        let git_ref = req.git_ref.trim().to_string();
        if git_ref.is_empty()
            || git_ref.starts_with('-')
            || git_ref.len() > 250
            || git_ref.contains("..")
            || git_ref.chars().any(|c| c.is_control() || c == ' ')
        {
            return json_error(400, "ref must be a valid git ref name");
        }
        let project = match self.store.project_by_name(project_name).await {
            Ok(Some(p)) => p,
            Ok(None) => return json_error(404, &format!("no project {project_name}")),
            Err(e) => return store_error(e),
        };
        let label = preview_label(&project.name, &project.id, &git_ref);
        let host = self.host_of(&label);
        let id = format!("pv-{}", wakegate_core::host::ref_hash(&project.id, &git_ref));
        if let Ok(Some(existing)) = self.store.get_preview(&id).await {
            // a crash between writing the record and binding its host is repaired here:
            // binding is idempotent
            if let Err(e) = self.store.bind_host(&host, &id).await {
                return store_error(e);
            }
            return ok(200, &self.view(&existing, &project));
        }
        match self.refs.exists(&project.git_url, &git_ref).await {
            Ok(false) => return json_error(422, &format!("{git_ref} does not exist in {}", project.git_url)),
            Ok(true) => {}
            Err(e) => return json_error(502, &format!("cannot reach the repository: {e}")),
        }
        let now = now_ms();
        let preview = Preview {
            id: id.clone(),
            project_id: project.id.clone(),
            project: project.name.clone(),
            git_ref,
            label,
            state: State::queued(),
            state_since: now,
            created_at: now,
            built_at: now,
            ttl_hours: None,
            pinned: false,
            last_error: None,
        };
        // the record first, then the host, then the job: a crash in between leaves a
        // Building record whose job the reconciler re-enqueues
        let version = match self.store.put_preview(&preview, None).await {
            Ok(v) => v,
            Err(StoreError::Conflict) => {
                return match self.store.get_preview(&id).await {
                    Ok(Some(existing)) => ok(200, &self.view(&existing, &project)),
                    _ => json_error(409, "created concurrently; try again"),
                }
            }
            Err(e) => return store_error(e),
        };
        if let Err(e) = self.store.bind_host(&host, &id).await {
            return store_error(e);
        }
        let _ = sync_indexes(self.store.as_ref(), &preview, now).await;
        if let Err(e) = self.store.enqueue(&id, wakegate_core::lifecycle::JobKind::Build).await {
            return store_error(e);
        }
        info!(preview = %id, %host, "preview created");
        ok(201, &self.view(&Versioned { version, value: preview }, &project))
    }

    async fn list_previews(&self) -> Resp {
        let (previews, projects) = match (self.store.list_previews().await, self.store.list_projects().await) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return store_error(e),
        };
        let projects: HashMap<String, Project> = projects.into_iter().map(|p| (p.id.clone(), p)).collect();
        let views: Vec<PreviewView> =
            previews.iter().filter_map(|p| projects.get(&p.value.project_id).map(|pr| self.view(p, pr))).collect();
        ok(200, &views)
    }

    async fn show(&self, id: &str) -> Resp {
        match self.load(id).await {
            Ok((p, project)) => ok(200, &self.view(&p, &project)),
            Err(e) => e.response(),
        }
    }

    async fn update(&self, id: &str, f: impl Fn(&mut Preview)) -> Resp {
        for _ in 0..16 {
            let (p, project) = match self.load(id).await {
                Ok(x) => x,
                Err(e) => return e.response(),
            };
            let mut next = p.value.clone();
            f(&mut next);
            match self.store.put_preview(&next, Some(p.version)).await {
                Ok(version) => {
                    let _ = sync_indexes(self.store.as_ref(), &next, now_ms()).await;
                    return ok(200, &self.view(&Versioned { version, value: next }, &project));
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return store_error(e),
            }
        }
        json_error(409, "too much contention; try again")
    }

    async fn action(&self, id: &str, action: &str) -> Resp {
        let event = match action {
            "pin" => return self.update(id, |p| p.pinned = true).await,
            "unpin" => return self.update(id, |p| p.pinned = false).await,
            "sleep" => Event::SleepRequested,
            "wake" => Event::WakeRequested,
            "erase" => Event::EraseRequested { reason: EraseReason::Manual },
            "rebuild" => {
                return match self.load(id).await {
                    Ok((p, project)) => self.rebuild(p, &project).await,
                    Err(e) => e.response(),
                }
            }
            _ => return json_error(404, &format!("no action {action}")),
        };
        match apply(self.store.as_ref(), id, &event, now_ms()).await {
            Ok(a) => match self.store.get_project(&a.preview.value.project_id).await {
                Ok(Some(project)) => ok(202, &self.view(&a.preview, &project)),
                Ok(None) => json_error(404, "project gone"),
                Err(e) => store_error(e),
            },
            Err(e) => apply_error(e),
        }
    }

    async fn set_ttl(&self, id: &str, body: &[u8]) -> Resp {
        let req: SetTtl = match parse(body) {
            Ok(r) => r,
            Err(e) => return e.response(),
        };
        if let Some(h) = req.ttl_hours {
            if let Err(e) = ttl::validate_hours(h) {
                return json_error(400, &e.to_string());
            }
        }
        self.update(id, |p| p.ttl_hours = req.ttl_hours).await
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
