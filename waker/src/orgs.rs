//! Orgs, the domains they prove they own, their preview bases, and the names their
//! previews answer at under those bases.
//!
//! * An org adds a domain and gets the TXT record to create
//!   (`_wakegate-challenge.<domain>`, `wakegate-verify=<token>`, the token random and
//!   the org's own); verify looks it up with a real resolver ([`crate::dns`]) and says
//!   what it found when it fails. A domain is claimed by one org when it is verified.
//! * Verified domains are re-checked on a schedule; one whose record has been missing
//!   for the grace period is suspended (its previews' names there show a page that says
//!   so) and resumes when the record is back. A lookup that fails (timeout, SERVFAIL)
//!   is not evidence either way and changes nothing.
//! * A base must pass [`crate::names::base`] and be a strict subdomain of one of the
//!   org's verified domains; no other base, of any org, may be it, under it or above
//!   it (claimed in the store, then checked again, so two orgs racing both lose rather
//!   than both win).
//! * Every preview of the org answers at `<project>-<ref-slug>.<base>` under each base;
//!   a name another ref of the project holds gets a hash suffix, and the preview's view
//!   says so. [`sync_hosts`] binds and unbinds to match the preview's life (a gone
//!   preview and a removed base unbind; a tombstone keeps its names) and is run after
//!   every change and by the periodic sweep, which repairs what a crash left half-done.
//!
//! Orgs are JSON rows in the store's `orgs` table, changed with compare-and-set; names,
//! verified domains and bases are claimed in their own tables.

use crate::dns::{Lookup, TxtResolver};
use crate::error::{ApiError, ErrorBody};
use crate::model::Body;
use crate::names::{self, is_strictly_under, is_within, NameError};
use crate::waker::{now_ms, Waker};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use utoipa::ToSchema;
use wakegate_core::host::{custom_label, ref_hash, MAX_LABEL};
use wakegate_core::lifecycle::State as Lifecycle;
use wakegate_core::route::{CustomHost, Preview, Project, DEFAULT_ORG_ID};
use wakegate_core::Millis;
use wakegate_store::StoreError;

/// The name of the DNS record that proves ownership of `domain`.
pub fn challenge_name(domain: &str) -> String {
    format!("_wakegate-challenge.{domain}")
}

/// The value that record must hold for `token`.
pub fn challenge_value(token: &str) -> String {
    format!("wakegate-verify={token}")
}

const ORGS: &str = "orgs";
const ORG_NAMES: &str = "org-names";
const DOMAINS: &str = "org-domains";
const BASES: &str = "org-bases";

/// How domains are checked.
#[derive(Clone)]
pub struct OrgSettings {
    pub dns: Arc<dyn TxtResolver>,
    /// What an org's wildcard record under a base points at (`*.<base> CNAME <this>`).
    pub custom_host_target: String,
    /// How long a verified domain's record may be missing before it is suspended.
    pub grace: Duration,
    /// How often domains are re-checked and custom names repaired.
    pub recheck_every: Duration,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub id: String,
    /// 1–40 characters of a-z, 0-9 and inner '-'; unique.
    pub name: String,
    pub created_at: Millis,
    #[serde(default)]
    pub domains: Vec<Domain>,
    #[serde(default)]
    pub bases: Vec<Base>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DomainStatus {
    /// Added; its record has not been seen yet.
    Pending,
    /// The record was seen; its bases serve.
    Verified,
    /// The record has been missing for longer than the grace period; its bases show a
    /// page that says so until it is back.
    Suspended,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Domain {
    pub name: String,
    pub token: String,
    pub status: DomainStatus,
    pub added_at: Millis,
    pub verified_at: Option<Millis>,
    pub checked_at: Option<Millis>,
    /// When checks first found the record missing, while they still do.
    pub missing_since: Option<Millis>,
    /// What the last check found.
    pub last_check: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Base {
    pub name: String,
    /// The verified domain it is under.
    pub domain: String,
    pub added_at: Millis,
}

/// A DNS record for the org to create.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub value: String,
}

/// A domain as operators see it, with the record that proves it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DomainView {
    pub name: String,
    pub status: DomainStatus,
    pub added_at: Millis,
    pub verified_at: Option<Millis>,
    pub checked_at: Option<Millis>,
    pub missing_since: Option<Millis>,
    pub last_check: Option<String>,
    /// The record that proves ownership.
    pub challenge: DnsRecord,
}

/// A preview base as operators see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BaseView {
    pub name: String,
    /// The verified domain it is under.
    pub domain: String,
    pub added_at: Millis,
    /// The record that sends the base's names to Wakegate.
    pub dns: DnsRecord,
    /// Whether its domain is suspended (its names do not answer until it is back).
    pub suspended: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrgView {
    pub id: String,
    pub name: String,
    pub created_at: Millis,
    pub domains: Vec<DomainView>,
    pub bases: Vec<BaseView>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewOrg {
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDomain {
    /// A domain the org controls, e.g. `acme.com` (IDNA allowed).
    pub domain: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBase {
    /// A strict subdomain of a verified domain, e.g. `previews.acme.com`.
    pub base: String,
}

impl Org {
    fn domain(&self, name: &str) -> Option<&Domain> {
        self.domains.iter().find(|d| d.name == name)
    }

    /// Whether the base's domain is suspended.
    pub fn base_suspended(&self, base: &Base) -> bool {
        self.domain(&base.domain).is_none_or(|d| d.status != DomainStatus::Verified)
    }
}

impl Waker {
    pub(crate) fn org_view(&self, org: &Org) -> OrgView {
        OrgView {
            id: org.id.clone(),
            name: org.name.clone(),
            created_at: org.created_at,
            domains: org.domains.iter().map(domain_view).collect(),
            bases: org.bases.iter().map(|b| self.base_view(org, b)).collect(),
        }
    }

    fn base_view(&self, org: &Org, b: &Base) -> BaseView {
        BaseView {
            name: b.name.clone(),
            domain: b.domain.clone(),
            added_at: b.added_at,
            dns: DnsRecord {
                name: format!("*.{}", b.name),
                kind: "CNAME".into(),
                value: self.orgs.custom_host_target.clone(),
            },
            suspended: org.base_suspended(b),
        }
    }

    /// The view of the org's base `name`; 404 if another call removed it meanwhile.
    fn base_view_of(&self, org: &Org, name: &str) -> Result<BaseView, ApiError> {
        let b = org.bases.iter().find(|b| b.name == name);
        b.map(|b| self.base_view(org, b))
            .ok_or_else(|| ApiError::NotFound(format!("{name} is not one of {}'s bases", org.name)))
    }

    /// An org by id (the default org is made on first use).
    pub(crate) async fn org(&self, id: &str) -> Result<Option<Org>, ApiError> {
        match read_org(self, id).await? {
            None if id == DEFAULT_ORG_ID => {
                self.default_org().await?;
                read_org(self, id).await
            }
            found => Ok(found),
        }
    }

    pub(crate) async fn org_by_name(&self, name: &str) -> Result<Org, ApiError> {
        let id = match self.store.table_get(ORG_NAMES, name).await? {
            None if name == "default" => Some(DEFAULT_ORG_ID.to_string()),
            id => id,
        };
        let org = match id {
            Some(id) => self.org(&id).await?,
            None => None,
        };
        org.ok_or_else(|| ApiError::NotFound(format!("no org {name}")))
    }

    async fn default_org(&self) -> Result<(), ApiError> {
        if self.store.table_get(ORGS, DEFAULT_ORG_ID).await?.is_some() {
            return Ok(());
        }
        let org = Org { id: DEFAULT_ORG_ID.into(), name: "default".into(), created_at: now_ms(), ..Org::default() };
        create_org(self, org).await.map(|_| ()).or_else(|e| match e {
            ApiError::Conflict(_) => Ok(()),
            e => Err(e),
        })
    }

    /// Changes an org with compare-and-set (re-read and retried on a conflict).
    pub(crate) async fn update_org<T>(
        &self,
        id: &str,
        mut f: impl FnMut(&mut Org) -> Result<T, ApiError>,
    ) -> Result<(Org, T), ApiError> {
        for _ in 0..16 {
            let Some(current) = self.store.table_get(ORGS, id).await? else {
                return Err(ApiError::NotFound(format!("no org {id}")));
            };
            let mut org: Org = decode(&current)?;
            let out = f(&mut org)?;
            let next = serde_json::to_string(&org).map_err(|e| ApiError::Conflict(e.to_string()))?;
            if next == current || self.store.table_swap(ORGS, id, Some(&current), Some(&next)).await? {
                return Ok((org, out));
            }
        }
        Err(ApiError::Conflict("too much contention; try again".into()))
    }
}

fn domain_view(d: &Domain) -> DomainView {
    DomainView {
        name: d.name.clone(),
        status: d.status,
        added_at: d.added_at,
        verified_at: d.verified_at,
        checked_at: d.checked_at,
        missing_since: d.missing_since,
        last_check: d.last_check.clone(),
        challenge: DnsRecord { name: challenge_name(&d.name), kind: "TXT".into(), value: challenge_value(&d.token) },
    }
}

/// The view of the org's domain `name`; 404 if another call removed it meanwhile.
fn domain_view_of(org: &Org, name: &str) -> Result<DomainView, ApiError> {
    org.domain(name)
        .map(domain_view)
        .ok_or_else(|| ApiError::NotFound(format!("{name} is not one of {}'s domains", org.name)))
}

fn decode(json: &str) -> Result<Org, ApiError> {
    serde_json::from_str(json)
        .map_err(|e| ApiError::Unavailable(StoreError::Corrupt { key: "org".into(), reason: e.to_string() }))
}

async fn read_org(w: &Waker, id: &str) -> Result<Option<Org>, ApiError> {
    match w.store.table_get(ORGS, id).await? {
        Some(json) => Ok(Some(decode(&json)?)),
        None => Ok(None),
    }
}

async fn create_org(w: &Waker, org: Org) -> Result<Org, ApiError> {
    if !w.store.table_swap(ORG_NAMES, &org.name, None, Some(&org.id)).await? {
        // the name is taken, unless a crash left our own claim without the org
        if w.store.table_get(ORG_NAMES, &org.name).await?.as_deref() != Some(&org.id) {
            return Err(ApiError::Conflict(format!("org {} exists", org.name)));
        }
    }
    let json = serde_json::to_string(&org).map_err(|e| ApiError::Conflict(e.to_string()))?;
    if !w.store.table_swap(ORGS, &org.id, None, Some(&json)).await? {
        return Err(ApiError::Conflict(format!("org {} exists", org.name)));
    }
    Ok(org)
}

fn name_error(field: &str, e: NameError) -> ApiError {
    ApiError::bad(field, e.to_string())
}

// ---------- handlers ----------

/// Every org.
#[utoipa::path(get, path = "/v1/orgs", tag = "operator", security(("operator_token" = [])),
    responses((status = 200, body = Vec<OrgView>), (status = 401, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn list(State(w): State<Arc<Waker>>) -> Result<Json<Vec<OrgView>>, ApiError> {
    w.default_org().await?;
    let mut orgs = Vec::new();
    for (_, json) in w.store.table_list(ORGS).await? {
        orgs.push(w.org_view(&decode(&json)?));
    }
    orgs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Json(orgs))
}

/// Creates an org.
#[utoipa::path(post, path = "/v1/orgs", tag = "operator", request_body = NewOrg, security(("operator_token" = [])),
    responses((status = 201, body = OrgView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(w): State<Arc<Waker>>,
    Body(req): Body<NewOrg>,
) -> Result<(StatusCode, Json<OrgView>), ApiError> {
    let name = wakegate_core::host::slugify(&req.name, 40);
    if name != req.name || name.is_empty() {
        return Err(ApiError::bad("name", "name must be 1–40 characters of a-z, 0-9 and inner '-'"));
    }
    w.default_org().await?;
    let org = Org { id: wakegate_store::new_id("org-"), name, created_at: now_ms(), ..Org::default() };
    let org = create_org(&w, org).await?;
    info!(org = %org.name, "org created");
    Ok((StatusCode::CREATED, Json(w.org_view(&org))))
}

/// One org.
#[utoipa::path(get, path = "/v1/orgs/{org}", tag = "operator", security(("operator_token" = [])),
    params(("org" = String, Path, description = "org name")),
    responses((status = 200, body = OrgView), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn show(State(w): State<Arc<Waker>>, Path(org): Path<String>) -> Result<Json<OrgView>, ApiError> {
    Ok(Json(w.org_view(&w.org_by_name(&org).await?)))
}

/// Adds a domain to prove; the answer holds the TXT record to create.
#[utoipa::path(post, path = "/v1/orgs/{org}/domains", tag = "operator", request_body = NewDomain,
    security(("operator_token" = [])), params(("org" = String, Path, description = "org name")),
    responses((status = 201, body = DomainView), (status = 200, body = DomainView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn add_domain(
    State(w): State<Arc<Waker>>,
    Path(org): Path<String>,
    Body(req): Body<NewDomain>,
) -> Result<(StatusCode, Json<DomainView>), ApiError> {
    let name = names::domain(&req.domain).map_err(|e| name_error("domain", e))?;
    let org = w.org_by_name(&org).await?;
    if let Some(owner) = w.store.table_get(DOMAINS, &name).await? {
        if owner != org.id {
            return Err(ApiError::Conflict(format!("{name} is verified by another org")));
        }
    }
    let (org, created) = w
        .update_org(&org.id, |o| {
            if o.domain(&name).is_some() {
                return Ok(false);
            }
            o.domains.push(Domain {
                name: name.clone(),
                token: format!("{}{}", wakegate_store::new_id(""), wakegate_store::new_id("")),
                status: DomainStatus::Pending,
                added_at: now_ms(),
                verified_at: None,
                checked_at: None,
                missing_since: None,
                last_check: None,
            });
            Ok(true)
        })
        .await?;
    let view = domain_view_of(&org, &name)?;
    Ok((if created { StatusCode::CREATED } else { StatusCode::OK }, Json(view)))
}

/// Looks the challenge record up now; 422 says what was found and what was expected.
#[utoipa::path(post, path = "/v1/orgs/{org}/domains/{domain}/verify", tag = "operator",
    security(("operator_token" = [])),
    params(("org" = String, Path, description = "org name"), ("domain" = String, Path, description = "domain")),
    responses((status = 200, body = DomainView), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn verify(
    State(w): State<Arc<Waker>>,
    Path((org, domain)): Path<(String, String)>,
) -> Result<Json<DomainView>, ApiError> {
    let name = names::domain(&domain).map_err(|e| name_error("domain", e))?;
    let org = w.org_by_name(&org).await?;
    let Some(d) = org.domain(&name).cloned() else {
        return Err(ApiError::NotFound(format!("{name} is not one of {}'s domains", org.name)));
    };
    let found = check(&*w.orgs.dns, &d).await;
    let org = record_check(&w, &org.id, &name, &found, now_ms()).await?;
    let view = domain_view_of(&org, &name)?;
    match found {
        Found::Present => {
            if view.status != DomainStatus::Verified {
                // found, but another org holds the claim
                return Err(ApiError::Conflict(format!("{name} is verified by another org")));
            }
            Ok(Json(view))
        }
        Found::Missing(what) | Found::Unknown(what) => Err(ApiError::Unprocessable(what)),
    }
}

/// Removes a domain (refused while bases are under it).
#[utoipa::path(delete, path = "/v1/orgs/{org}/domains/{domain}", tag = "operator",
    security(("operator_token" = [])),
    params(("org" = String, Path, description = "org name"), ("domain" = String, Path, description = "domain")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove_domain(
    State(w): State<Arc<Waker>>,
    Path((org, domain)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = names::domain(&domain).map_err(|e| name_error("domain", e))?;
    let org = w.org_by_name(&org).await?;
    w.update_org(&org.id, |o| {
        if let Some(b) = o.bases.iter().find(|b| b.domain == name) {
            return Err(ApiError::Conflict(format!("{} is under {name}; remove the base first", b.name)));
        }
        let before = o.domains.len();
        o.domains.retain(|d| d.name != name);
        if o.domains.len() == before {
            return Err(ApiError::NotFound(format!("{name} is not one of {}'s domains", o.name)));
        }
        Ok(())
    })
    .await?;
    w.store.table_swap(DOMAINS, &name, Some(&org.id), None).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Adds a preview base; every preview of the org then also answers under it.
#[utoipa::path(post, path = "/v1/orgs/{org}/bases", tag = "operator", request_body = NewBase,
    security(("operator_token" = [])), params(("org" = String, Path, description = "org name")),
    responses((status = 201, body = BaseView), (status = 200, body = BaseView),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 413, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn add_base(
    State(w): State<Arc<Waker>>,
    Path(org): Path<String>,
    Body(req): Body<NewBase>,
) -> Result<(StatusCode, Json<BaseView>), ApiError> {
    let name = names::base(&req.base).map_err(|e| name_error("base", e))?;
    let org = w.org_by_name(&org).await?;
    if org.bases.iter().any(|b| b.name == name) {
        let view = w.base_view_of(&org, &name)?;
        return Ok((StatusCode::OK, Json(view)));
    }
    let default_base = &w.config.preview_base;
    if is_within(&name, default_base) || is_within(default_base, &name) {
        return Err(ApiError::bad(
            "base",
            format!("{name:?} overlaps this installation's preview base {default_base}"),
        ));
    }
    let domain = parent_domain(&org, &name)?;
    conflicts(&w, &org, &name).await?;
    // claim, then check again: of two orgs adding nested bases at once, at least the
    // later sees the other's claim
    if !w.store.table_swap(BASES, &name, None, Some(&org.id)).await? {
        return Err(ApiError::Conflict(format!("{name:?} is a preview base of another org")));
    }
    if let Err(e) = conflicts(&w, &org, &name).await {
        w.store.table_swap(BASES, &name, Some(&org.id), None).await?;
        return Err(e);
    }
    let added = w
        .update_org(&org.id, |o| {
            if !o.bases.iter().any(|b| b.name == name) {
                o.bases.push(Base { name: name.clone(), domain: domain.clone(), added_at: now_ms() });
            }
            Ok(())
        })
        .await;
    let (org, ()) = match added {
        Ok(x) => x,
        Err(e) => {
            w.store.table_swap(BASES, &name, Some(&org.id), None).await?;
            return Err(e);
        }
    };
    info!(org = %org.name, base = %name, "preview base added");
    sync_org(&w, &org.id).await;
    let view = w.base_view_of(&org, &name)?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Removes a base; its names stop answering.
#[utoipa::path(delete, path = "/v1/orgs/{org}/bases/{base}", tag = "operator",
    security(("operator_token" = [])),
    params(("org" = String, Path, description = "org name"), ("base" = String, Path, description = "base")),
    responses((status = 204), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
        (status = 503, body = ErrorBody)))]
pub async fn remove_base(
    State(w): State<Arc<Waker>>,
    Path((org, base)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let name = names::base(&base).map_err(|e| name_error("base", e))?;
    let org = w.org_by_name(&org).await?;
    w.update_org(&org.id, |o| {
        let before = o.bases.len();
        o.bases.retain(|b| b.name != name);
        if o.bases.len() == before {
            return Err(ApiError::NotFound(format!("{name} is not one of {}'s bases", o.name)));
        }
        Ok(())
    })
    .await?;
    sync_org(&w, &org.id).await;
    w.store.table_swap(BASES, &name, Some(&org.id), None).await?;
    info!(org = %org.name, base = %name, "preview base removed");
    Ok(StatusCode::NO_CONTENT)
}

/// The verified domain `base` is strictly under, or why there is none.
fn parent_domain(org: &Org, base: &str) -> Result<String, ApiError> {
    let mut under: Vec<&Domain> = org.domains.iter().filter(|d| is_strictly_under(base, &d.name)).collect();
    // the closest parent first
    under.sort_by_key(|d| std::cmp::Reverse(d.name.len()));
    if let Some(d) = under.iter().find(|d| d.status == DomainStatus::Verified) {
        return Ok(d.name.clone());
    }
    if let Some(d) = under.first() {
        let why = match d.status {
            DomainStatus::Pending => "is not verified yet: create its TXT record and verify it",
            _ => "is suspended: its TXT record is missing",
        };
        return Err(ApiError::bad("base", format!("{base:?} is under {}, which {why}", d.name)));
    }
    let verified: Vec<&str> =
        org.domains.iter().filter(|d| d.status == DomainStatus::Verified).map(|d| d.name.as_str()).collect();
    let have = if verified.is_empty() { "none yet".to_string() } else { verified.join(", ") };
    Err(ApiError::bad(
        "base",
        format!("{base:?} is not a strict subdomain of a domain {} has verified ({have})", org.name),
    ))
}

/// Refuses a base that is another base, or above or under one (any org's, this org's
/// own included: a preview's name under one would be the other).
async fn conflicts(w: &Waker, org: &Org, base: &str) -> Result<(), ApiError> {
    for (other, owner) in w.store.table_list(BASES).await? {
        if other == base && owner == org.id {
            continue;
        }
        let whose = if owner == org.id { "another base of this org" } else { "a preview base of another org" };
        if other == base {
            return Err(ApiError::Conflict(format!("{base:?} is {whose}")));
        }
        if is_strictly_under(&other, base) {
            return Err(ApiError::Conflict(format!("{base:?} is a parent of {other}, {whose}")));
        }
        if is_strictly_under(base, &other) {
            return Err(ApiError::Conflict(format!("{base:?} is under {other}, {whose}")));
        }
    }
    Ok(())
}

// ---------- checking domains ----------

/// What a lookup of the challenge record showed.
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    Present,
    /// The record is not there (or holds something else): what was found instead.
    Missing(String),
    /// The lookup itself failed: no evidence either way.
    Unknown(String),
}

/// Looks up `d`'s challenge record.
pub async fn check(dns: &dyn TxtResolver, d: &Domain) -> Found {
    let name = challenge_name(&d.name);
    let expected = challenge_value(&d.token);
    match dns.txt(&name).await {
        Lookup::Records(values) if values.iter().any(|v| v.trim() == expected) => Found::Present,
        Lookup::Records(values) => Found::Missing(format!(
            "{name} has TXT {}, expected \"{expected}\"",
            values.iter().map(|v| format!("{v:?}")).collect::<Vec<_>>().join(", ")
        )),
        Lookup::NoRecords => Found::Missing(format!("{name} exists but has no TXT record, expected \"{expected}\"")),
        Lookup::NoSuchName => {
            Found::Missing(format!("{name} does not exist (NXDOMAIN); create TXT \"{expected}\" there"))
        }
        Lookup::Failed(why) => Found::Unknown(format!("looking up {name} failed: {why}")),
    }
}

/// Stores what a check found: verifies (and claims) on the first sighting, starts the
/// grace clock when a verified record goes missing, suspends after it, resumes when the
/// record is back.
pub async fn record_check(w: &Waker, org_id: &str, domain: &str, found: &Found, now: Millis) -> Result<Org, ApiError> {
    let claimed = match found {
        Found::Present => {
            w.store.table_swap(DOMAINS, domain, None, Some(org_id)).await?
                || w.store.table_get(DOMAINS, domain).await?.as_deref() == Some(org_id)
        }
        _ => false,
    };
    let grace = w.orgs.grace.as_millis() as Millis;
    let (org, ()) = w
        .update_org(org_id, |o| {
            let Some(d) = o.domains.iter_mut().find(|d| d.name == domain) else {
                return Ok(());
            };
            d.checked_at = Some(now);
            match found {
                Found::Present if claimed => {
                    if d.status != DomainStatus::Verified {
                        d.verified_at = Some(now);
                    }
                    d.status = DomainStatus::Verified;
                    d.missing_since = None;
                    d.last_check = Some("found the challenge record".into());
                }
                Found::Present => {
                    d.last_check = Some(format!("found the record, but {domain} is verified by another org"))
                }
                Found::Missing(what) => {
                    d.last_check = Some(what.clone());
                    if d.status != DomainStatus::Pending {
                        let since = *d.missing_since.get_or_insert(now);
                        if now.saturating_sub(since) >= grace {
                            d.status = DomainStatus::Suspended;
                        }
                    }
                }
                Found::Unknown(what) => d.last_check = Some(what.clone()),
            }
            Ok(())
        })
        .await?;
    Ok(org)
}

/// One pass: re-checks every domain of every org and repairs every preview's custom
/// names. Errors are logged; the next pass tries again.
pub async fn recheck_all(w: &Waker) {
    let orgs = match w.store.table_list(ORGS).await {
        Ok(rows) => rows,
        Err(e) => return warn!(error = %e, "listing orgs for the domain check"),
    };
    for (id, json) in orgs {
        let Ok(org) = decode(&json) else {
            warn!(org = %id, "unreadable org record");
            continue;
        };
        for d in &org.domains {
            let found = check(&*w.orgs.dns, d).await;
            let before = d.status;
            match record_check(w, &org.id, &d.name, &found, now_ms()).await {
                Ok(after) => {
                    let now = after.domain(&d.name).map(|d| d.status);
                    if now != Some(before) {
                        info!(org = %org.name, domain = %d.name, from = ?before, to = ?now, "domain status");
                    }
                }
                Err(e) => warn!(org = %org.name, domain = %d.name, error = %e, "recording a domain check"),
            }
        }
    }
    sync_all(w).await;
}

/// Runs [`recheck_all`] every `recheck_every`, for as long as the task lives.
/// With several waker replicas, one of them does each pass (a budget of one pass per
/// interval in the store); if it dies, another takes the next.
pub async fn recheck_loop(w: Arc<Waker>) {
    loop {
        tokio::time::sleep(w.orgs.recheck_every).await;
        if my_turn(&w, "orgs:recheck", w.orgs.recheck_every).await {
            recheck_all(&w).await;
        }
    }
}

/// Whether this replica takes this interval's pass of `what`. A store that cannot be
/// asked says yes: a pass twice is safe, a pass skipped is not.
pub(crate) async fn my_turn(w: &Waker, what: &str, every: Duration) -> bool {
    // a little under the interval, so the replica on time keeps its turn
    let window = every.mul_f64(0.9).max(Duration::from_millis(1));
    w.store.rate_limit(what, 1, window, now_ms()).await.unwrap_or(true)
}

// ---------- custom names ----------

/// Binds and unbinds a preview's names under its org's bases to match its life.
pub async fn sync_hosts(w: &Waker, preview_id: &str) -> Result<(), ApiError> {
    for _ in 0..16 {
        let (p, project) = w.load(preview_id).await?;
        let org = w.org(&project.org_id).await?;
        let bases: Vec<String> = match (&p.value.state, &org) {
            (Lifecycle::Gone { .. }, _) | (_, None) => Vec::new(),
            (_, Some(org)) => org.bases.iter().map(|b| b.name.clone()).collect(),
        };
        let hosts = desired_hosts(w, &p.value, &project, &bases).await?;
        if hosts == p.value.custom_hosts {
            return Ok(());
        }
        let mut next = p.value.clone();
        next.custom_hosts = hosts;
        match w.store.put_preview(&next, Some(p.version)).await {
            Ok(_) => {
                // names the record no longer lists are unbound after it is written, so
                // a crash in between leaves a bound name the next sync finds and frees
                for old in &p.value.custom_hosts {
                    if !next.custom_hosts.iter().any(|h| h.host == old.host) {
                        w.store.unbind_host(&old.host, preview_id).await?;
                    }
                }
                return Ok(());
            }
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict("too much contention; try again".into()))
}

/// The names a preview should have under `bases`, bound (binding is idempotent).
async fn desired_hosts(
    w: &Waker,
    p: &Preview,
    project: &Project,
    bases: &[String],
) -> Result<Vec<CustomHost>, ApiError> {
    let mut out = Vec::new();
    for base in bases {
        if let Some(h) = p.custom_hosts.iter().find(|h| &h.base == base) {
            // already has a name there: keep it (bound again, in case a crash lost it)
            match w.store.bind_host(&h.host, &p.id).await {
                Ok(()) => {
                    out.push(h.clone());
                    continue;
                }
                Err(StoreError::Exists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let label = custom_label(&project.name, &p.git_ref);
        let plain = format!("{label}.{base}");
        match w.store.bind_host(&plain, &p.id).await {
            Ok(()) => out.push(CustomHost { host: plain, base: base.clone(), note: None }),
            Err(StoreError::Exists(_)) => {
                let hash = &ref_hash(&project.id, &p.git_ref)[..8];
                let short = label.get(..MAX_LABEL - hash.len() - 1).unwrap_or(&label).trim_end_matches('-');
                let host = format!("{short}-{hash}.{base}");
                match w.store.bind_host(&host, &p.id).await {
                    Ok(()) => out.push(CustomHost {
                        host,
                        base: base.clone(),
                        note: Some(format!(
                            "{plain} belongs to another ref of {}, so this one has a hash suffix",
                            project.name
                        )),
                    }),
                    Err(StoreError::Exists(_)) => warn!(preview = %p.id, %host, "custom name taken twice; skipped"),
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Syncs every preview of the org's projects.
pub async fn sync_org(w: &Waker, org_id: &str) {
    let projects = match w.store.list_projects().await {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "listing projects to sync custom names"),
    };
    let ids: Vec<&str> = projects.iter().filter(|p| p.org_id == org_id).map(|p| p.id.as_str()).collect();
    sync_previews(w, |p| ids.contains(&p.project_id.as_str())).await;
}

async fn sync_all(w: &Waker) {
    sync_previews(w, |_| true).await;
}

async fn sync_previews(w: &Waker, which: impl Fn(&Preview) -> bool) {
    let previews = match w.store.list_previews().await {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "listing previews to sync custom names"),
    };
    // oldest first: the first ref to a name keeps it
    let mut previews: Vec<_> = previews.into_iter().filter(|p| which(&p.value)).collect();
    previews.sort_by_key(|p| p.value.created_at);
    for p in previews {
        if let Err(e) = sync_hosts(w, &p.value.id).await {
            warn!(preview = %p.value.id, error = %e, "syncing custom names");
        }
    }
}
