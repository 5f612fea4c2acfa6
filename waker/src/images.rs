//! Database images, seen by operators: every project's images (`wakegate db images`),
//! one preview's database (which image, how it was made, how far it has diverged), and
//! refreshing a running preview's data from the current image (`wakegate db refresh`).

use crate::error::ApiError;
use crate::error::ErrorBody;
use crate::waker::{now_ms, Waker};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;
use std::sync::Arc;
use tracing::info;
use wakegate_core::lifecycle::{JobKind, State as Lifecycle};
use wakegate_db::{Image, Images, Refresh};

#[derive(Serialize, utoipa::ToSchema)]
pub struct ImageView {
    pub id: String,
    /// The project's name.
    pub project: String,
    /// `postgres` or `mariadb`.
    pub engine: String,
    /// The engine's version it was baked with.
    pub version: String,
    /// The dump it holds, and its SHA-256.
    pub dump: String,
    pub dump_sha256: String,
    /// `baking`, `ready` or `failed`.
    pub state: String,
    /// Whether it is the project's current image (its base dump, its newest recipe).
    pub current: bool,
    /// Bytes of its data directory.
    pub size: u64,
    /// Where it is: its directory (local backend) or its snapshot's id (Hetzner).
    pub location: String,
    pub created_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bake_ms: Option<u64>,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Previews whose database was cloned from it.
    pub previews: Vec<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ImageList {
    pub images: Vec<ImageView>,
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImagesQuery {
    /// Only this project's images (by name).
    pub project: Option<String>,
}

/// Every database image (of one project), newest first, with the previews using each.
#[utoipa::path(get, path = "/v1/db/images", tag = "operator", security(("operator_token" = [])),
    params(ImagesQuery),
    responses(
        (status = 200, body = ImageList), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list(State(w): State<Arc<Waker>>, Query(q): Query<ImagesQuery>) -> Result<Json<ImageList>, ApiError> {
    let images = Images::new(w.store.clone());
    let project = match &q.project {
        Some(name) => Some(w.project_named(name).await?),
        None => None,
    };
    let all: Vec<Image> = images.list(project.as_ref().map(|p| p.id.as_str())).await?;
    let uses = images.uses().await?;
    let projects = w.store.list_projects().await?;
    let dumps = wakegate_db::Dumps::new(w.store.clone());
    // each project's base and recipe, read once
    let mut wanted = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(all.len());
    for i in all {
        let name =
            projects.iter().find(|p| p.id == i.project_id).map_or_else(|| i.project_id.clone(), |p| p.name.clone());
        if !wanted.contains_key(&i.project_id) {
            let now = (dumps.base_id(&i.project_id).await?, images.recipe(&i.project_id).await?);
            wanted.insert(i.project_id.clone(), now);
        }
        let (base, recipe) = &wanted[&i.project_id];
        let current = base.as_deref() == Some(i.dump_id.as_str()) && recipe.as_ref() == Some(&i.recipe);
        let mut previews: Vec<String> =
            uses.iter().filter(|(_, u)| u.image.as_deref() == Some(i.id.as_str())).map(|(p, _)| p.clone()).collect();
        previews.sort();
        out.push(ImageView {
            engine: i.recipe.engine.as_str().into(),
            project: name,
            version: i.version,
            dump: i.dump_id,
            dump_sha256: i.dump_sha256,
            location: i.location,
            state: i.state.as_str().into(),
            current,
            size: i.size,
            created_at: i.created_at,
            ready_at: i.ready_at,
            bake_ms: i.bake_ms,
            attempts: i.attempts,
            reason: i.reason,
            previews,
            id: i.id,
        });
    }
    Ok(Json(ImageList { images: out }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct RefreshView {
    pub id: String,
    /// `pending`, `done` or `failed`.
    pub state: String,
    pub asked_at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<u64>,
    /// How the data was made again: `reflink`, `copy`, `snapshot` or `import`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// From the server stopping to the new data answering.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn refresh_view(r: &Refresh) -> RefreshView {
    RefreshView {
        id: r.id.clone(),
        state: r.state.as_str().into(),
        asked_at: r.asked_at,
        finished_at: r.finished_at,
        method: r.method.map(|m| m.as_str().to_string()),
        took_ms: r.took_ms,
        reason: r.reason.clone(),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DatabaseView {
    pub preview: String,
    /// The image it was cloned from; none when the dump was imported.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// `reflink`, `copy`, `snapshot` (from the image) or `import` (from the dump).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dump: Option<String>,
    /// When the database was made, and how long that took.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub made_at: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub took_ms: Option<u64>,
    /// Bytes that differ from the image, when last measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diverged_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_at: Option<u64>,
    /// The latest refresh.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh: Option<RefreshView>,
}

/// A preview's database: which image it came from and how, how far it has diverged,
/// and its latest refresh.
#[utoipa::path(get, path = "/v1/previews/{id}/db", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = DatabaseView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn show(State(w): State<Arc<Waker>>, Path(id): Path<String>) -> Result<Json<DatabaseView>, ApiError> {
    w.load(&id).await?;
    let images = Images::new(w.store.clone());
    let (u, r) = (images.use_of(&id).await?, images.refresh(&id).await?);
    if u.is_none() && r.is_none() {
        return Err(ApiError::NotFound(format!("{id} has no database")));
    }
    Ok(Json(DatabaseView {
        preview: id,
        image: u.as_ref().and_then(|u| u.image.clone()),
        method: u.as_ref().map(|u| u.method.as_str().to_string()),
        dump: u.as_ref().and_then(|u| u.dump_id.clone()),
        made_at: u.as_ref().map(|u| u.at),
        took_ms: u.as_ref().map(|u| u.took_ms),
        diverged_bytes: u.as_ref().and_then(|u| u.diverged),
        measured_at: u.as_ref().and_then(|u| u.measured_at),
        refresh: r.as_ref().map(refresh_view),
    }))
}

/// Makes a running preview's data again from the project's current image (from its
/// dump when no image is ready) without rebuilding the app: 202 with the refresh to
/// poll (200: one is pending already). A preview that is not running is a 409.
#[utoipa::path(post, path = "/v1/previews/{id}/db/refresh", tag = "operator", security(("operator_token" = [])),
    params(("id" = String, Path, description = "preview id")),
    responses(
        (status = 200, body = RefreshView), (status = 202, body = RefreshView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn refresh(
    State(w): State<Arc<Waker>>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RefreshView>), ApiError> {
    let (p, _) = w.load(&id).await?;
    w.refresh_db(&id, &p.value.state).await
}

impl Waker {
    /// Asks for a refresh of a running preview's database (the API and the dashboard).
    pub(crate) async fn refresh_db(
        &self,
        id: &str,
        state: &Lifecycle,
    ) -> Result<(StatusCode, Json<RefreshView>), ApiError> {
        if !matches!(state, Lifecycle::Running { .. }) {
            return Err(ApiError::Conflict(format!(
                "{id} is {}: its data can be refreshed while it runs (wake it first)",
                state.as_str()
            )));
        }
        let images = Images::new(self.store.clone());
        if images.use_of(id).await?.is_none() {
            return Err(ApiError::Conflict(format!("{id} has no database to refresh")));
        }
        let fresh = match images.ask_refresh(id, now_ms()).await {
            Ok(fresh) => fresh,
            Err(wakegate_store::StoreError::Conflict) => false,
            Err(e) => return Err(e.into()),
        };
        // asked again: its job may have been lost; the queue keeps one per preview
        self.store.enqueue(id, JobKind::RefreshDb).await?;
        let r = images.refresh(id).await?.ok_or_else(|| ApiError::Conflict("the refresh changed meanwhile".into()))?;
        if fresh {
            info!(preview = %id, refresh = %r.id, "database refresh asked for");
        }
        let status = if fresh { StatusCode::ACCEPTED } else { StatusCode::OK };
        Ok((status, Json(refresh_view(&r))))
    }
}
