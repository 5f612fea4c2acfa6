//! Operator calls for a project's database dumps (`/v1/projects/{name}/dumps*`).
//!
//! A push is a multipart upload the CLI makes straight to S3 through presigned part
//! URLs: `POST …/dumps` starts it, `POST …/dumps/{id}/parts/{n}` presigns a part, `GET
//! …/dumps/{id}/parts` says which parts are there (resuming), and `POST
//! …/dumps/{id}/complete` finishes it. The dump is then read back from S3 and checked
//! ([`wakegate_db::check`]) before it becomes the base (or goes into its one target
//! preview); a refused dump is deleted and the base stays what it was. Checking runs
//! after the answer (a dump of many GB takes longer than a request may), with a
//! heartbeat in the record: the CLI polls the record, and a completion call finds a
//! checker that stopped (a crashed waker) and starts it again.

use crate::error::{ApiError, ErrorBody};
use crate::model::Body;
use crate::waker::{now_ms, Waker};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use wakegate_core::lifecycle::Event;
use wakegate_core::route::Project;
use wakegate_db::s3::{Bucket, Part, MAX_PARTS};
use wakegate_db::{Claim, Dump, DumpState, Dumps, Engine, RecordError};

/// What the dumps calls need: the bucket and the records.
pub struct DbState {
    pub bucket: Bucket,
    pub dumps: Dumps,
}

/// How long a presigned part URL works.
const PART_URL_TTL: Duration = Duration::from_secs(3600);
/// Smallest part the CLI is told to send (S3's floor is 5 MiB, but for the last).
pub const MIN_PART: u64 = 8 << 20;
/// A checker that has not said anything for this long has stopped.
const STALE_CHECK_MS: u64 = 60_000;
/// How often a checker says how far it is.
const HEARTBEAT: Duration = Duration::from_secs(2);

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDump {
    /// What to call it in listings (a file name).
    pub name: String,
    /// `postgres` or `mariadb`; needed for a project's first dump, and must match the
    /// base's engine after that.
    #[serde(default)]
    pub engine: Option<String>,
    /// The size, when known: the part size is chosen so it fits in S3's 10,000 parts.
    #[serde(default)]
    pub size: Option<u64>,
    /// A preview id: the dump goes into that preview only, and is not made the base.
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DumpView {
    pub id: String,
    pub project: String,
    pub engine: String,
    pub name: String,
    /// `uploading`, `verifying`, `ready` or `rejected`.
    pub state: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub size: u64,
    pub sha256: String,
    pub gzip: bool,
    pub sql_bytes: u64,
    /// Bytes checked so far while verifying.
    pub verified: u64,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Whether it is the project's base now.
    pub base: bool,
    /// Whether it became the base, or went into its target, once ready.
    pub applied: bool,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UploadStarted {
    pub dump: DumpView,
    /// Bytes in every part but the last.
    pub part_size: u64,
    pub max_parts: i32,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PartUrl {
    /// PUT the part's bytes here; the answer's `ETag` names the part.
    pub url: String,
    pub expires_in_secs: u64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PartView {
    pub number: i32,
    pub etag: String,
    pub size: u64,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// Bytes sent, and their SHA-256 (hex): what S3 holds must match.
    pub size: u64,
    pub sha256: String,
    /// The parts with the ETags their uploads answered (S3 checks them); without
    /// them, the parts S3 lists are used.
    #[serde(default)]
    pub parts: Option<Vec<SentPart>>,
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SentPart {
    pub number: i32,
    pub etag: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DumpList {
    pub base: Option<String>,
    pub dumps: Vec<DumpView>,
}

fn view(d: &Dump, project: &Project, base: Option<&str>) -> DumpView {
    DumpView {
        id: d.id.clone(),
        project: project.name.clone(),
        engine: d.engine.as_str().into(),
        name: d.name.clone(),
        state: match d.state {
            DumpState::Uploading => "uploading",
            DumpState::Verifying => "verifying",
            DumpState::Ready => "ready",
            DumpState::Rejected => "rejected",
        }
        .into(),
        reason: d.reason.clone(),
        size: d.size,
        sha256: d.sha256.clone(),
        gzip: d.gzip,
        sql_bytes: d.sql_bytes,
        verified: d.verified,
        created_at: d.created_at,
        target: d.target.clone(),
        base: base == Some(d.id.as_str()),
        applied: d.applied,
    }
}

impl From<RecordError> for ApiError {
    fn from(e: RecordError) -> ApiError {
        match e {
            RecordError::Store(e) => e.into(),
            RecordError::Conflict => ApiError::Conflict("the dump changed meanwhile; try again".into()),
        }
    }
}

impl Waker {
    fn db(&self) -> Result<&Arc<DbState>, ApiError> {
        self.db.as_ref().ok_or_else(|| {
            ApiError::Conflict(
                "this installation keeps no database dumps: set WAKEGATE_S3_BUCKET (and the other WAKEGATE_S3_* settings)"
                    .into(),
            )
        })
    }

    async fn dump_of(&self, project: &Project, id: &str) -> Result<Dump, ApiError> {
        self.db()?
            .dumps
            .get(&project.id, id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no dump {id} in {}", project.name)))
    }
}

/// Starts a push: answers the dump's id and the part size to send.
#[utoipa::path(post, path = "/v1/projects/{name}/dumps", tag = "operator", request_body = NewDump,
    security(("operator_token" = [])), params(("name" = String, Path, description = "project name")),
    responses(
        (status = 201, body = UploadStarted), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 413, body = ErrorBody),
        (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn start(
    State(w): State<Arc<Waker>>,
    Path(name): Path<String>,
    Body(req): Body<NewDump>,
) -> Result<(StatusCode, Json<UploadStarted>), ApiError> {
    let project = w.project_named(&name).await?;
    let db = w.db()?;
    let dump_name = req.name.trim();
    if dump_name.is_empty() || dump_name.len() > 200 || dump_name.chars().any(char::is_control) {
        return Err(ApiError::bad("name", "name must be 1–200 printable characters"));
    }
    let asked = match req.engine.as_deref() {
        Some(e) => Some(Engine::parse(e).ok_or_else(|| ApiError::bad("engine", "engine must be postgres or mariadb"))?),
        None => None,
    };
    let base = db.dumps.base(&project.id).await?;
    let engine = match (asked, base.as_ref().map(|b| b.engine)) {
        (Some(a), Some(b)) if a != b => {
            return Err(ApiError::Conflict(format!(
                "the project's dumps are {} dumps (its base {} is); this one says {}",
                b.label(),
                base.as_ref().map(|d| d.id.as_str()).unwrap_or_default(),
                a.label()
            )))
        }
        (Some(e), _) | (None, Some(e)) => e,
        (None, None) => {
            return Err(ApiError::bad("engine", "the project has no dump yet: say which engine (postgres or mariadb)"))
        }
    };
    if let Some(t) = &req.target {
        let (p, _) = w.load(t).await.map_err(|_| ApiError::bad("target", format!("no preview {t}")))?;
        if p.value.project_id != project.id {
            return Err(ApiError::bad("target", format!("preview {t} is not in project {}", project.name)));
        }
    }
    // parts of at least MIN_PART, whole MiB, enough of them for the size (or for a
    // stream of unknown size, up to 160 GB)
    let size = req.size.unwrap_or(2 * MIN_PART * MAX_PARTS as u64);
    let part_size = size.div_ceil(MAX_PARTS as u64 - 1).max(MIN_PART).next_multiple_of(1 << 20);
    if part_size > 5 << 30 {
        return Err(ApiError::bad("size", "a dump may be at most 50 TB"));
    }
    let prefix = db.bucket.config.prefix.clone();
    let mut dump = Dump::new(&project.id, engine, dump_name, &prefix, now_ms());
    dump.target = req.target.clone();
    dump.upload_id = Some(db.bucket.start_upload(&dump.key).await.map_err(ApiError::Upstream)?);
    db.dumps.create(&dump).await?;
    info!(project = %project.name, dump = %dump.id, engine = engine.as_str(), "dump upload started");
    let base_id = base.map(|b| b.id);
    Ok((
        StatusCode::CREATED,
        Json(UploadStarted { dump: view(&dump, &project, base_id.as_deref()), part_size, max_parts: MAX_PARTS }),
    ))
}

/// The project's dumps, newest first, and which is the base.
#[utoipa::path(get, path = "/v1/projects/{name}/dumps", tag = "operator",
    security(("operator_token" = [])), params(("name" = String, Path, description = "project name")),
    responses(
        (status = 200, body = DumpList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn list(State(w): State<Arc<Waker>>, Path(name): Path<String>) -> Result<Json<DumpList>, ApiError> {
    let project = w.project_named(&name).await?;
    let db = w.db()?;
    let base = db.dumps.base_id(&project.id).await?;
    let dumps = db.dumps.list(&project.id).await?.iter().map(|d| view(d, &project, base.as_deref())).collect();
    Ok(Json(DumpList { base, dumps }))
}

/// One dump (the CLI polls this while it is checked).
#[utoipa::path(get, path = "/v1/projects/{name}/dumps/{id}", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id")),
    responses(
        (status = 200, body = DumpView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(
    State(w): State<Arc<Waker>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<DumpView>, ApiError> {
    let project = w.project_named(&name).await?;
    let d = w.dump_of(&project, &id).await?;
    let base = w.db()?.dumps.base_id(&project.id).await?;
    Ok(Json(view(&d, &project, base.as_deref())))
}

async fn uploading(w: &Waker, name: &str, id: &str) -> Result<(Project, Dump, String), ApiError> {
    let project = w.project_named(name).await?;
    let d = w.dump_of(&project, id).await?;
    match (&d.state, d.upload_id.clone()) {
        (DumpState::Uploading, Some(upload)) => Ok((project, d, upload)),
        _ => Err(ApiError::Conflict(format!("dump {id} is no longer uploading"))),
    }
}

/// The parts S3 holds so far (to resume an upload).
#[utoipa::path(get, path = "/v1/projects/{name}/dumps/{id}/parts", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id")),
    responses(
        (status = 200, body = Vec<PartView>), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn parts(
    State(w): State<Arc<Waker>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Vec<PartView>>, ApiError> {
    let (_, d, upload) = uploading(&w, &name, &id).await?;
    let parts = w.db()?.bucket.parts(&d.key, &upload).await.map_err(ApiError::Upstream)?;
    Ok(Json(parts.into_iter().map(|p| PartView { number: p.number, etag: p.etag, size: p.size }).collect()))
}

/// A presigned URL to PUT one part to.
#[utoipa::path(post, path = "/v1/projects/{name}/dumps/{id}/parts/{number}", tag = "operator",
    security(("operator_token" = [])),
    params(
        ("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id"),
        ("number" = i32, Path, description = "part number, 1–10000")),
    responses(
        (status = 200, body = PartUrl), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn part_url(
    State(w): State<Arc<Waker>>,
    Path((name, id, number)): Path<(String, String, String)>,
) -> Result<Json<PartUrl>, ApiError> {
    let number: i32 = number
        .parse()
        .ok()
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| ApiError::bad("number", format!("a part number is 1–{MAX_PARTS}")))?;
    let (_, d, upload) = uploading(&w, &name, &id).await?;
    let url = w.db()?.bucket.presign_part(&d.key, &upload, number, PART_URL_TTL).await.map_err(ApiError::Upstream)?;
    Ok(Json(PartUrl { url, expires_in_secs: PART_URL_TTL.as_secs() }))
}

/// Finishes a push: S3 joins the parts, then the dump is checked (202 while it is; poll
/// the dump). Calling again is safe: a checker that stopped is started again, and a
/// ready dump that did not yet become the base becomes it.
#[utoipa::path(post, path = "/v1/projects/{name}/dumps/{id}/complete", tag = "operator",
    request_body = Completion, security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id")),
    responses(
        (status = 200, body = DumpView), (status = 202, body = DumpView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 422, body = ErrorBody), (status = 502, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn complete(
    State(w): State<Arc<Waker>>,
    Path((name, id)): Path<(String, String)>,
    Body(req): Body<Completion>,
) -> Result<(StatusCode, Json<DumpView>), ApiError> {
    if req.sha256.len() != 64 || !req.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad("sha256", "sha256 must be 64 hex digits"));
    }
    let project = w.project_named(&name).await?;
    let db = w.db()?.clone();
    let d = w.dump_of(&project, &id).await?;
    let now = now_ms();
    let d = match d.state {
        DumpState::Uploading => {
            let upload = d.upload_id.clone().unwrap_or_default();
            let parts: Vec<Part> = match &req.parts {
                Some(sent) => {
                    let ordered = sent.windows(2).all(|w| w[0].number < w[1].number);
                    if !ordered || sent.iter().any(|p| !(1..=MAX_PARTS).contains(&p.number) || p.etag.len() > 200) {
                        return Err(ApiError::bad("parts", "parts must be in ascending order, numbered 1–10000"));
                    }
                    sent.iter().map(|p| Part { number: p.number, etag: p.etag.clone(), size: 0 }).collect()
                }
                None => db.bucket.parts(&d.key, &upload).await.map_err(ApiError::Upstream)?,
            };
            if parts.is_empty() {
                return Err(ApiError::Unprocessable("no part was uploaded".into()));
            }
            db.bucket.complete(&d.key, &upload, &parts).await.map_err(ApiError::Upstream)?;
            let mut next = d.clone();
            next.state = DumpState::Verifying;
            next.upload_id = None;
            next.claimed = Some(Claim { size: req.size, sha256: req.sha256.to_ascii_lowercase() });
            next.heartbeat = now;
            db.dumps.update(&d, &next).await?;
            spawn_check(w.clone(), db.clone(), project.clone(), next.clone());
            next
        }
        DumpState::Verifying if now.saturating_sub(d.heartbeat) > STALE_CHECK_MS => {
            let mut next = d.clone();
            next.heartbeat = now;
            next.verified = 0;
            db.dumps.update(&d, &next).await?;
            warn!(dump = %d.id, "the dump's checker stopped; checking it again");
            spawn_check(w.clone(), db.clone(), project.clone(), next.clone());
            next
        }
        DumpState::Verifying => d,
        DumpState::Ready if !d.applied => finish(&w, &db, &project, d).await?,
        DumpState::Ready => d,
        DumpState::Rejected => {
            return Err(ApiError::Unprocessable(format!(
                "the dump was refused: {}",
                d.reason.as_deref().unwrap_or("no reason recorded")
            )))
        }
    };
    let base = db.dumps.base_id(&project.id).await?;
    let status = if d.state == DumpState::Ready { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok((status, Json(view(&d, &project, base.as_deref()))))
}

fn spawn_check(w: Arc<Waker>, db: Arc<DbState>, project: Project, d: Dump) {
    tokio::spawn(async move {
        let id = d.id.clone();
        if let Err(e) = check(&w, &db, &project, d).await {
            // the record stays `verifying`; the next completion call starts it again
            warn!(dump = %id, error = %e, "checking a dump failed");
        }
    });
}

/// Reads the dump back from S3 through the checks, then makes it ready and applies
/// it, or refuses it and deletes the object.
async fn check(w: &Waker, db: &DbState, project: &Project, mut d: Dump) -> Result<(), ApiError> {
    let mut stream = db.bucket.read(&d.key).await.map_err(ApiError::Upstream)?;
    let mut checker = wakegate_db::check::Checker::new(d.engine);
    let mut last = tokio::time::Instant::now();
    let mut read = 0u64;
    while let Some(chunk) = stream.try_next().await.map_err(|e| ApiError::Upstream(format!("reading the dump: {e}")))? {
        read += chunk.len() as u64;
        // hashing and inflating is CPU work: off the async threads
        checker = tokio::task::spawn_blocking(move || {
            checker.update(&chunk);
            checker
        })
        .await
        .map_err(|e| ApiError::Misconfigured(format!("the checker panicked: {e}")))?;
        if last.elapsed() >= HEARTBEAT {
            last = tokio::time::Instant::now();
            let mut next = d.clone();
            next.verified = read;
            next.heartbeat = now_ms();
            // another checker took over: this one stops
            db.dumps.update(&d, &next).await?;
            d = next;
        }
    }
    let verdict = checker.finish().and_then(|c| match &d.claimed {
        Some(claim) if claim.size != c.size || claim.sha256 != c.sha256 => Err(format!(
            "S3 holds {} bytes with SHA-256 {}, but {} bytes with SHA-256 {} were sent",
            c.size, c.sha256, claim.size, claim.sha256
        )),
        _ => Ok(c),
    });
    let mut next = d.clone();
    next.verified = read;
    next.heartbeat = now_ms();
    match verdict {
        Ok(c) => {
            next.state = DumpState::Ready;
            next.size = c.size;
            next.sha256 = c.sha256;
            next.gzip = c.gzip;
            next.sql_bytes = c.sql_bytes;
            db.dumps.update(&d, &next).await?;
            info!(project = %project.name, dump = %next.id, bytes = c.size, statements = c.statements, "dump checked");
            finish(w, db, project, next).await?;
        }
        Err(reason) => {
            info!(project = %project.name, dump = %next.id, %reason, "dump refused");
            next.state = DumpState::Rejected;
            next.reason = Some(reason);
            db.dumps.update(&d, &next).await?;
            if let Err(e) = db.bucket.delete(&next.key).await {
                warn!(dump = %next.id, error = %e, "deleting a refused dump failed");
            }
        }
    }
    Ok(())
}

/// A ready dump becomes the base, or goes into its target preview (which is rebuilt
/// with it); then it is marked applied.
async fn finish(w: &Waker, db: &DbState, project: &Project, d: Dump) -> Result<Dump, ApiError> {
    match &d.target {
        Some(t) => {
            let dump = d.id.clone();
            wakegate_store::driver::apply_editing(w.store.as_ref(), t, &Event::Redeploy, now_ms(), &|p| {
                p.dump = Some(dump.clone())
            })
            .await?;
            info!(preview = %t, dump = %d.id, "the preview is rebuilt with its own dump");
        }
        None => {
            let current = db.dumps.base_id(&project.id).await?;
            if current.as_deref() != Some(d.id.as_str()) {
                db.dumps.set_base(&project.id, current.as_deref(), &d.id).await?;
            }
            info!(project = %project.name, dump = %d.id, "new base dump");
        }
    }
    let mut next = d.clone();
    next.applied = true;
    db.dumps.update(&d, &next).await?;
    Ok(next)
}

/// Makes a ready dump the base again (`wakegate db use`).
#[utoipa::path(post, path = "/v1/projects/{name}/dumps/{id}/use", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id")),
    responses(
        (status = 200, body = DumpView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn use_dump(
    State(w): State<Arc<Waker>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<DumpView>, ApiError> {
    let project = w.project_named(&name).await?;
    let db = w.db()?;
    let d = w.dump_of(&project, &id).await?;
    if d.state != DumpState::Ready {
        return Err(ApiError::Conflict(format!("dump {id} is not ready (it is {:?})", d.state).to_lowercase()));
    }
    let current = db.dumps.base_id(&project.id).await?;
    if current.as_deref() != Some(id.as_str()) {
        db.dumps.set_base(&project.id, current.as_deref(), &id).await?;
        info!(project = %project.name, dump = %id, "base dump chosen");
    }
    Ok(Json(view(&d, &project, Some(&id))))
}

/// Deletes a dump (not the base; an upload under way is aborted).
#[utoipa::path(delete, path = "/v1/projects/{name}/dumps/{id}", tag = "operator",
    security(("operator_token" = [])),
    params(("name" = String, Path, description = "project name"), ("id" = String, Path, description = "dump id")),
    responses(
        (status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn remove(
    State(w): State<Arc<Waker>>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let project = w.project_named(&name).await?;
    let db = w.db()?;
    let d = w.dump_of(&project, &id).await?;
    if db.dumps.base_id(&project.id).await?.as_deref() == Some(id.as_str()) {
        return Err(ApiError::Conflict(format!(
            "dump {id} is the base of {}: choose another first (db use)",
            project.name
        )));
    }
    let previews = w.store.list_previews().await?;
    if let Some(p) = previews.iter().find(|p| p.value.dump.as_deref() == Some(id.as_str())) {
        return Err(ApiError::Conflict(format!("preview {} uses dump {id}", p.value.id)));
    }
    if let Some(upload) = &d.upload_id {
        db.bucket.abort(&d.key, upload).await.map_err(ApiError::Upstream)?;
    }
    db.bucket.delete(&d.key).await.map_err(ApiError::Upstream)?;
    db.dumps.remove(&d).await?;
    info!(project = %project.name, dump = %id, "dump removed");
    Ok(StatusCode::NO_CONTENT)
}

/// How long a pulled database's download URL works.
const PULL_URL_TTL: Duration = Duration::from_secs(900);

#[derive(Serialize, utoipa::ToSchema)]
pub struct PullView {
    pub id: String,
    pub preview: String,
    /// `pending`, `dumping`, `ready` or `failed`.
    pub state: String,
    /// Bytes of `.sql.gz` (once ready).
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Once ready: GET the `.sql.gz` here (a presigned URL, good for 15 minutes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub created_at: u64,
}

async fn pull_view(db: &DbState, p: &wakegate_db::Pull) -> Result<PullView, ApiError> {
    use wakegate_db::PullState;
    let url = match p.state {
        PullState::Ready => Some(db.bucket.presign_get(&p.key, PULL_URL_TTL).await.map_err(ApiError::Upstream)?),
        _ => None,
    };
    Ok(PullView {
        id: p.id.clone(),
        preview: p.preview.clone(),
        state: match p.state {
            PullState::Pending => "pending",
            PullState::Dumping => "dumping",
            PullState::Ready => "ready",
            PullState::Failed => "failed",
        }
        .into(),
        size: p.size,
        reason: p.reason.clone(),
        url,
        created_at: p.created_at,
    })
}

/// Removes a finished pull's object (a new pull, or the asker is done with it).
async fn drop_pull_object(db: &DbState, p: &wakegate_db::Pull) {
    if let Err(e) = db.bucket.delete(&p.key).await {
        warn!(pull = %p.id, key = %p.key, error = %e, "removing a pulled database failed; S3's lifecycle rules must");
    }
}

/// Dumps a running preview's database as `.sql.gz` into S3 (`wakegate db pull`): 202
/// with the pull to poll, or the pull already under way. A preview that is not running
/// is a 409 (wake it first).
#[utoipa::path(post, path = "/v1/previews/{id}/db/pull", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PullView), (status = 202, body = PullView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 502, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn pull(
    State(w): State<Arc<Waker>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<PullView>), ApiError> {
    let (p, _project) = w.load(&id).await?;
    let db = w.db()?;
    if !matches!(p.value.state, wakegate_core::lifecycle::State::Running { .. }) {
        return Err(ApiError::Conflict(format!(
            "{id} is {}: its database can be pulled while it runs (wake it first)",
            p.value.state.as_str()
        )));
    }
    // a pull counts as a visit: the idle sweep does not put the preview to sleep mid-dump
    w.store.touch(std::slice::from_ref(&id), now_ms()).await?;
    let pulls = wakegate_db::Pulls::new(w.store.clone());
    let old = pulls.get(&id).await?;
    if let Some(old) = old.as_ref().filter(|o| o.under_way()) {
        // its job may have been lost (a crash between the record and the queue): the
        // queue keeps one per preview, so asking again costs nothing
        w.store.enqueue(&id, wakegate_core::lifecycle::JobKind::PullDb).await?;
        return Ok((StatusCode::OK, Json(pull_view(db, old).await?)));
    }
    let new = wakegate_db::Pull::new(&id, &db.bucket.config.prefix, now_ms());
    pulls.swap(&id, old.as_ref(), Some(&new)).await?;
    if let Some(old) = &old {
        drop_pull_object(db, old).await;
    }
    w.store.enqueue(&id, wakegate_core::lifecycle::JobKind::PullDb).await?;
    info!(preview = %id, pull = %new.id, "database pull asked for");
    Ok((StatusCode::ACCEPTED, Json(pull_view(db, &new).await?)))
}

/// The preview's latest pull: how far it is, and once ready where to download it.
#[utoipa::path(get, path = "/v1/previews/{id}/db/pull", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = PullView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 502, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pull_status(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Json<PullView>, ApiError> {
    let db = w.db()?;
    let p = wakegate_db::Pulls::new(w.store.clone())
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no pull of {id}'s database")))?;
    Ok(Json(pull_view(db, &p).await?))
}

/// Done with the pull: its object in S3 goes (a pull under way is left alone: 409).
#[utoipa::path(delete, path = "/v1/previews/{id}/db/pull", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn pull_done(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    let db = w.db()?;
    let pulls = wakegate_db::Pulls::new(w.store.clone());
    let p = pulls.get(&id).await?.ok_or_else(|| ApiError::NotFound(format!("no pull of {id}'s database")))?;
    if p.under_way() {
        return Err(ApiError::Conflict("the pull is under way".into()));
    }
    pulls.swap(&id, Some(&p), None).await?;
    drop_pull_object(db, &p).await;
    Ok(StatusCode::NO_CONTENT)
}
