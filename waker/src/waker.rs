//! The waker's state and the logic its handlers share.

use crate::error::ApiError;
use crate::model::{Accepted, PreviewView};
use crate::orgs::OrgSettings;
use crate::refs::RefChecker;
use std::sync::Arc;
use tracing::{info, warn};
use wakegate_core::host::normalize_host;
use wakegate_core::lifecycle::{EraseReason, Event, GoneWhy, State};
use wakegate_core::route::{GoneInfo, Preview, Project, RouteRecord, RouteStatus};
use wakegate_core::sign::Key;
use wakegate_core::ttl;
use wakegate_store::driver::apply;
use wakegate_store::{SharedStore, Versioned};

pub(crate) use wakegate_store::now_ms;

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
    pub(crate) store: SharedStore,
    pub(crate) config: WakerConfig,
    pub(crate) refs: Arc<dyn RefChecker>,
    pub(crate) orgs: OrgSettings,
    /// Cloudflare for SaaS, when configured.
    pub(crate) saas: Option<crate::saas::SaasConfig>,
    pub(crate) forge: ForgeState,
    /// The dumps' bucket and records, when S3 is configured.
    pub(crate) db: Option<Arc<crate::db::DbState>>,
    /// Cancelled when the process stops: status long-polls answer at once (the edge
    /// asks again, of a replica that stays) instead of holding the shutdown up.
    pub(crate) stopping: wakegate_serve::CancellationToken,
}

/// What a ref check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RefStatus {
    Exists,
    /// The branch is gone.
    Deleted,
    /// The merge request closed or merged.
    Ended(EraseReason),
}

/// What the forge loops share.
pub struct ForgeState {
    pub settings: crate::forge::ForgeSettings,
    pub clients: Arc<dyn crate::forge::Clients>,
    /// Woken when a delivery lands in the inbox here.
    pub inbox: tokio::sync::Notify,
    /// Ref checks through the forge's API, kept briefly.
    pub(crate) refs: RefCache,
}

/// Recent forge ref checks, bounded, each kept [`REF_TTL`].
pub(crate) type RefCache = crate::refs::TtlCache<(String, String), RefStatus>;

/// Forge ref checks remembered.
const REF_ENTRIES: std::num::NonZeroUsize = std::num::NonZeroUsize::new(10_000).unwrap();

/// Longest a ref check waits for the forge.
const FORGE_REF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// How long a forge's answer about a ref is kept.
const REF_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl Waker {
    /// A waker with the default org settings: the system's resolver, a day's grace, an
    /// hourly re-check ([`Waker::with_orgs`] changes them).
    pub fn new(store: SharedStore, config: WakerConfig, refs: Arc<dyn RefChecker>) -> Waker {
        let orgs = OrgSettings {
            dns: Arc::new(crate::dns::HickoryTxt::system()),
            custom_host_target: config.preview_base.clone(),
            grace: std::time::Duration::from_secs(24 * 3600),
            recheck_every: std::time::Duration::from_secs(3600),
        };
        let forge = ForgeState {
            settings: Default::default(),
            clients: Arc::new(crate::forge::RealClients::default()),
            inbox: tokio::sync::Notify::new(),
            refs: RefCache::new(REF_ENTRIES),
        };
        Waker { store, config, refs, orgs, saas: None, forge, db: None, stopping: Default::default() }
    }

    /// Long-polls end when `stopping` is cancelled (see [`crate::serve_until`]).
    pub fn with_stopping(mut self, stopping: wakegate_serve::CancellationToken) -> Waker {
        self.stopping = stopping;
        self
    }

    /// Keeps database dumps in this bucket (none: the dumps calls say S3 is not set).
    pub fn with_dumps(mut self, bucket: Option<wakegate_db::s3::Bucket>) -> Waker {
        self.db = bucket
            .map(|bucket| Arc::new(crate::db::DbState { bucket, dumps: wakegate_db::Dumps::new(self.store.clone()) }));
        self
    }

    /// How often the forge loops run ([`crate::forge::sync`]).
    pub fn with_forge(mut self, settings: crate::forge::ForgeSettings) -> Waker {
        self.forge.settings = settings;
        self
    }

    /// Forge clients made by `clients` instead of from each project's configuration.
    pub fn with_forge_clients(mut self, clients: Arc<dyn crate::forge::Clients>) -> Waker {
        self.forge.clients = clients;
        self
    }

    /// Starts the forge loops (inbox, comments and views, reconciler); they end with
    /// the returned handles.
    pub fn spawn_forge(self: &Arc<Self>) -> Vec<tokio_util::task::AbortOnDropHandle<()>> {
        use crate::forge::sync;
        use wakegate_serve::supervise::supervise;
        let (a, b, c) = (self.clone(), self.clone(), self.clone());
        [
            tokio::spawn(supervise("forge-inbox", move || sync::inbox_loop(a.clone()))),
            tokio::spawn(supervise("forge-status", move || sync::status_loop(b.clone()))),
            tokio::spawn(supervise("forge-reconcile", move || sync::reconcile_loop(c.clone()))),
        ]
        .into_iter()
        .map(tokio_util::task::AbortOnDropHandle::new)
        .collect()
    }

    /// Registers custom names with Cloudflare for SaaS ([`crate::saas::sync_loop`] does
    /// the work; this makes views show what Cloudflare says).
    pub fn with_saas(mut self, saas: Option<crate::saas::SaasConfig>) -> Waker {
        self.saas = saas;
        self
    }

    /// Fills what views take from elsewhere than the record: last visits, and custom
    /// hostname statuses from Cloudflare's last answers (each read once for all views).
    pub(crate) async fn complete_views(&self, views: &mut [PreviewView]) {
        // one preview's action reads its own visit, not the whole table
        let visits = match views {
            [one] => wakegate_store::stats::last_visit(self.store.as_ref(), &one.id)
                .await
                .map(|v| v.map(|at| (one.id.clone(), at)).into_iter().collect()),
            _ => wakegate_store::stats::last_visits(self.store.as_ref()).await,
        };
        match visits {
            Ok(visits) => {
                for view in views.iter_mut() {
                    view.last_visit_at = visits.get(&view.id).copied();
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading last visits failed; views go without"),
        }
        let Some(saas) = &self.saas else { return };
        let regs = crate::saas::registrations(self).await;
        for view in views {
            view.custom_hostnames = view
                .custom_hosts
                .iter()
                .filter_map(|h| regs.get(&crate::saas::covering(&h.host, &h.base, saas.wildcard)).cloned())
                .collect();
        }
    }

    pub fn with_orgs(mut self, orgs: OrgSettings) -> Waker {
        self.orgs = orgs;
        self
    }

    pub fn org_settings(&self) -> &OrgSettings {
        &self.orgs
    }

    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    pub(crate) fn host_of(&self, label: &str) -> String {
        format!("{label}.{}", self.config.preview_base)
    }

    pub(crate) async fn find_by_host(&self, raw: &str) -> Result<(Versioned<Preview>, Project), ApiError> {
        let host = normalize_host(raw).map_err(|e| ApiError::bad("host", format!("bad host: {e}")))?;
        let id = self.store.resolve_host(host.as_str()).await?;
        let id = id.ok_or_else(|| ApiError::NotFound(format!("no preview at {host}")))?;
        self.load(&id).await
    }

    /// The domain `host` is under when it is one of the preview's custom names and that
    /// domain is no longer proven (or its base is gone): such a name shows the suspended
    /// page and wakes nothing.
    pub(crate) async fn suspended_domain(
        &self,
        raw_host: &str,
        p: &Preview,
        project: &Project,
    ) -> Result<Option<String>, ApiError> {
        let Ok(host) = normalize_host(raw_host) else { return Ok(None) };
        let Some(custom) = p.custom_hosts.iter().find(|h| h.host == host.as_str()) else {
            return Ok(None);
        };
        let org = self.org(&project.org_id).await?;
        let base = org.as_ref().and_then(|o| o.bases.iter().find(|b| b.name == custom.base).map(|b| (o, b)));
        Ok(match base {
            Some((o, b)) if !o.base_suspended(b) => None,
            Some((_, b)) => Some(b.domain.clone()),
            None => Some(custom.base.clone()),
        })
    }

    /// A project by name; 404 when there is none.
    pub(crate) async fn project_named(&self, name: &str) -> Result<Project, ApiError> {
        self.store.project_by_name(name).await?.ok_or_else(|| ApiError::NotFound(format!("no project {name}")))
    }

    pub(crate) async fn load(&self, id: &str) -> Result<(Versioned<Preview>, Project), ApiError> {
        let p = self.store.get_preview(id).await?.ok_or_else(|| ApiError::NotFound(format!("no preview {id}")))?;
        let project = self
            .store
            .get_project(&p.value.project_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("the preview's project is gone".into()))?;
        Ok((p, project))
    }

    /// Whether the preview's ref (or merge request) is still there: through the forge's
    /// API when the project has a forge (the merge request's state, or the branch),
    /// else `git ls-remote`. Both are cached.
    pub(crate) async fn ref_status(&self, project: &Project, p: &Preview) -> Result<RefStatus, String> {
        let plain_git = p.change.is_none() && p.git_ref.starts_with("refs/");
        if project.forge.is_some() && !plain_git {
            let key = (project.id.clone(), p.id.clone());
            if let Some(answer) = self.forge.refs.get(&key, |_| REF_TTL) {
                return Ok(answer);
            }
            let forge = match self.forge.clients.client(project) {
                Ok(Some(f)) => f,
                Ok(None) => return Err("no forge".into()),
                Err(e) => return Err(e.to_string()),
            };
            let ask = async {
                Ok::<_, String>(match &p.change {
                    Some(c) => match forge.change(c.number).await.map_err(|e| e.to_string())? {
                        Some(i) if i.state == crate::forge::ChangeState::Open => RefStatus::Exists,
                        Some(i) if i.state == crate::forge::ChangeState::Merged => {
                            RefStatus::Ended(EraseReason::Merged)
                        }
                        Some(_) => RefStatus::Ended(EraseReason::Closed),
                        // a token that lost its access gets 404 too: unknown, not closed
                        None => return Err(format!("the forge does not know merge request {}", c.number)),
                    },
                    None => match forge.branch_exists(&p.git_ref).await.map_err(|e| e.to_string())? {
                        true => RefStatus::Exists,
                        false => RefStatus::Deleted,
                    },
                })
            };
            // a visitor waits on this: a slow or rate-limited forge is "unknown"
            let answer = tokio::time::timeout(FORGE_REF_TIMEOUT, ask)
                .await
                .map_err(|_| "the forge did not answer in time".to_string())??;
            self.forge.refs.put(key, answer);
            return Ok(answer);
        }
        Ok(match self.refs.exists(&project.git_url, &p.git_ref).await? {
            true => RefStatus::Exists,
            false => RefStatus::Deleted,
        })
    }

    /// The edge's view; for erased and failed previews, asks (cached) whether the ref or
    /// merge request is still there and records "gone" (or back) accordingly.
    pub(crate) async fn record(&self, p: Versioned<Preview>, project: &Project) -> RouteRecord {
        let mut p = p;
        let mut rebuildable = true;
        // a preview gone because its merge request closed or merged comes back only when
        // the forge says it reopened (its events and reconciler do that)
        let asks = match &p.value.state {
            State::Erased { .. } | State::Failed { .. } => true,
            State::Gone { why } => *why == GoneWhy::RefDeleted,
            _ => false,
        };
        if asks {
            match self.ref_status(project, &p.value).await {
                Ok(status) => {
                    rebuildable = status == RefStatus::Exists;
                    let event = match (&p.value.state, status) {
                        (State::Gone { .. }, RefStatus::Exists) => Some(Event::RefRestored),
                        (State::Erased { .. } | State::Failed { .. }, RefStatus::Deleted) => Some(Event::RefDeleted),
                        (_, RefStatus::Ended(reason)) => Some(Event::EraseRequested { reason }),
                        _ => None,
                    };
                    if let Some(event) = event {
                        match apply(self.store.as_ref(), &p.value.id, &event, now_ms()).await {
                            Ok(a) => {
                                info!(preview = %p.value.id, state = a.preview.value.state.as_str(), "ref check");
                                p = a.preview;
                                // gone frees its custom names; back from gone takes them again
                                if let Err(e) = crate::orgs::sync_hosts(self, &p.value.id).await {
                                    warn!(preview = %p.value.id, error = %e, "syncing custom names");
                                }
                            }
                            Err(e) => warn!(preview = %p.value.id, error = %e, "recording the ref check failed"),
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
            status: RouteStatus::from_state(&p.value.state, rebuildable, p.value.change.as_ref(), p.value.progress),
            version: p.version,
            ttl_remaining_ms: remaining,
            pinned: p.value.pinned,
        }
    }

    /// Rebuilds an erased or failed preview once git (or the forge) says its ref is
    /// still there.
    pub(crate) async fn rebuild(&self, p: Versioned<Preview>, project: &Project) -> Result<Accepted, ApiError> {
        if let State::Gone { why: why @ (GoneWhy::Closed | GoneWhy::Merged) } = p.value.state {
            return Err(ApiError::Gone(GoneInfo { why, change: p.value.change.clone() }));
        }
        match self.ref_status(project, &p.value).await {
            Ok(RefStatus::Deleted) => {
                if let Err(e) = apply(self.store.as_ref(), &p.value.id, &Event::RefDeleted, now_ms()).await {
                    warn!(preview = %p.value.id, error = %e, "recording the deleted ref failed");
                }
                return Err(ApiError::ref_gone());
            }
            Ok(RefStatus::Ended(reason)) => {
                let event = Event::EraseRequested { reason };
                if let Err(e) = apply(self.store.as_ref(), &p.value.id, &event, now_ms()).await {
                    warn!(preview = %p.value.id, error = %e, "recording the ended merge request failed");
                }
                let why = if reason == EraseReason::Merged { GoneWhy::Merged } else { GoneWhy::Closed };
                return Err(ApiError::Gone(GoneInfo { why, change: p.value.change.clone() }));
            }
            Ok(RefStatus::Exists) => {}
            Err(e) => warn!(error = %e, "cannot ask the remote; building anyway"),
        }
        let a = apply(self.store.as_ref(), &p.value.id, &Event::BuildRequested, now_ms()).await?;
        info!(preview = %p.value.id, "rebuild requested");
        Ok(Accepted { state: a.preview.value.state.as_str().to_string(), version: a.preview.version })
    }

    pub(crate) fn view(&self, p: &Versioned<Preview>, project: &Project) -> PreviewView {
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
            custom_urls: wakegate_core::route::preview_urls(
                &self.config.preview_url_template,
                &v.label,
                &v.custom_hosts,
            )
            .into_iter()
            .skip(1)
            .collect(),
            custom_hosts: v.custom_hosts.clone(),
            custom_hostnames: Vec::new(),
            state: v.state.as_str().to_string(),
            phase,
            progress: v.progress,
            reason,
            pinned: v.pinned,
            ttl_hours: v.effective_ttl_hours(project),
            ttl_remaining_ms: remaining,
            ttl_remaining: remaining.map(ttl::format_remaining),
            created_at: v.created_at,
            deployed_at: v.built_at,
            last_visit_at: None,
            last_error: v.last_error.clone(),
            version: p.version,
        }
    }
}
