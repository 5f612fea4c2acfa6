//! Request and response bodies, and the JSON extractor that names a bad field.

use crate::error::ApiError;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use wakegate_core::route::MachineSpec;

/// Longest body the API reads.
pub const MAX_BODY: usize = wakegate_core::route::MAX_API_BODY;
/// Shortest and longest idle timeout a project may set.
pub const IDLE_TIMEOUT_SECS: std::ops::RangeInclusive<u64> = 1..=30 * 24 * 3600;
/// Idle timeout when a project sets none.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 1800;

/// A JSON body read within [`MAX_BODY`]; a type or shape error is a 400 that names the
/// field (`machine.sleep_mode`, say).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::to_bytes(req.into_body(), MAX_BODY).await.map_err(|_| ApiError::TooLarge(MAX_BODY))?;
        parse(&bytes).map(Body)
    }
}

/// Parses JSON, naming the field a type error is in.
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        ApiError::BadRequest { field, message: format!("invalid JSON body: {}", e.inner()) }
    })
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewProject {
    /// 1–20 characters of a-z, 0-9 and inner `-`; unique.
    pub name: String,
    /// Any URL git can fetch from.
    pub git_url: String,
    /// Default TTL of its previews, 0 < h ≤ 8760 (default 72).
    #[serde(default)]
    pub ttl_hours: Option<f64>,
    /// A running preview idle this long sleeps: 1 s to 30 days (default 1800).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 2592000)]
    pub idle_timeout_secs: Option<u64>,
    #[serde(default)]
    pub machine: MachineSpec,
    /// The org that owns it, by name (default: `default`).
    #[serde(default)]
    pub org: Option<String>,
    /// The GitLab or GitHub project whose merge requests drive its previews (see
    /// `docs/forges.md`); secrets are named (`{"env": "VAR"}` or `{"file": "/path"}`),
    /// never given.
    #[serde(default)]
    pub forge: Option<wakegate_core::route::ForgeConfig>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewPreview {
    /// A branch (`main` and `refs/heads/main` are one preview) or a full ref name.
    #[serde(rename = "ref")]
    pub git_ref: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTtl {
    /// Hours, 0 < h ≤ 8760; `null` goes back to the project's TTL.
    pub ttl_hours: Option<f64>,
}

/// A preview as operators see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, ToSchema)]
pub struct PreviewView {
    pub id: String,
    pub project: String,
    pub git_ref: String,
    pub label: String,
    pub host: String,
    pub url: String,
    /// Where it also answers, under its org's preview bases.
    #[serde(default)]
    pub custom_hosts: Vec<wakegate_core::route::CustomHost>,
    #[serde(default)]
    pub custom_urls: Vec<String>,
    /// What Cloudflare for SaaS says of those names (when it is configured): a name is
    /// `live` once its hostname and certificate are both `active`.
    #[serde(default)]
    pub custom_hostnames: Vec<crate::saas::Registration>,
    pub state: String,
    pub phase: Option<String>,
    /// How far the current phase is, in bytes (the dump restored while `restoring_db`).
    #[serde(default)]
    pub progress: Option<wakegate_core::route::Progress>,
    /// Why it failed or was erased; for a failure, the full message (build output
    /// included), which only operators see.
    pub reason: Option<String>,
    pub pinned: bool,
    pub ttl_hours: f64,
    pub ttl_remaining_ms: Option<u64>,
    pub ttl_remaining: Option<String>,
    pub created_at: u64,
    /// When the version it runs (or builds) was asked for: the TTL counts from here.
    pub deployed_at: u64,
    /// When someone last visited it (bots do not count), if ever.
    #[serde(default)]
    pub last_visit_at: Option<u64>,
    pub last_error: Option<String>,
    pub version: u64,
}

/// Part of a preview's log.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LogSlice {
    /// Where `text` begins: above the `from` asked for when older bytes were dropped.
    pub start: u64,
    /// Where the log ends now: ask `from` here to follow it.
    pub end: u64,
    pub text: String,
}

/// Custom hostnames registered with Cloudflare for SaaS.
#[derive(Debug, Serialize, ToSchema)]
pub struct CustomHostnames {
    /// Whether Cloudflare for SaaS is configured.
    pub enabled: bool,
    /// One `*.<base>` per base rather than one per name.
    pub wildcard: bool,
    /// Hostnames in use on the zone.
    pub in_use: usize,
    /// How many the plan includes before they are billed.
    pub included: usize,
    pub hostnames: Vec<crate::saas::Registration>,
}

/// The answer to a wake or rebuild.
#[derive(Debug, Serialize, ToSchema)]
pub struct Accepted {
    pub state: String,
    pub version: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    pub ok: bool,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HostQuery {
    /// The public host name of a preview.
    pub host: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    pub host: String,
    /// Answer once the record's version is above this.
    pub after: Option<u64>,
    /// Longest wait in ms (at most 30000).
    pub wait: Option<u64>,
}
