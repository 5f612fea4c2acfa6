//! The waker's state and the logic its handlers share.

use crate::error::ApiError;
use crate::model::{Accepted, PreviewView};
use crate::orgs::OrgSettings;
use crate::refs::RefChecker;
use std::sync::Arc;
use tracing::{info, warn};
use wakegate_core::host::normalize_host;
use wakegate_core::lifecycle::{Event, GoneWhy, State};
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
}

/// What the forge loops share.
pub struct ForgeState {
    pub settings: crate::forge::ForgeSettings,
    pub clients: Arc<dyn crate::forge::Clients>,
    /// Woken when a delivery lands in the inbox here.
    pub inbox: tokio::sync::Notify,
}

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
            clients: Arc::new(crate::forge::RealClients),
            inbox: tokio::sync::Notify::new(),
        };
        Waker { store, config, refs, orgs, saas: None, forge }
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

    /// Fills views' custom hostname statuses from Cloudflare's last answers (the
    /// registrations are read once for all of them).
    pub(crate) async fn with_saas_status(&self, views: &mut [PreviewView]) {
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

    pub(crate) async fn load(&self, id: &str) -> Result<(Versioned<Preview>, Project), ApiError> {
        let p = self.store.get_preview(id).await?.ok_or_else(|| ApiError::NotFound(format!("no preview {id}")))?;
        let project = self
            .store
            .get_project(&p.value.project_id)
            .await?
            .ok_or_else(|| ApiError::NotFound("the preview's project is gone".into()))?;
        Ok((p, project))
    }

    /// The edge's view; for erased and failed previews, asks git (cached) whether the
    /// ref still exists and records "gone" (or back) accordingly.
    pub(crate) async fn record(&self, p: Versioned<Preview>, project: &Project) -> RouteRecord {
        let mut p = p;
        let mut rebuildable = true;
        // a preview gone because its merge request closed or merged comes back only when
        // the forge says it reopened
        let asks_git = match &p.value.state {
            State::Erased { .. } | State::Failed { .. } => true,
            State::Gone { why } => *why == GoneWhy::RefDeleted,
            _ => false,
        };
        if asks_git {
            match self.refs.exists(&project.git_url, &p.value.git_ref).await {
                Ok(exists) => {
                    rebuildable = exists;
                    let event = match (&p.value.state, exists) {
                        (State::Gone { .. }, true) => Some(Event::RefRestored),
                        (State::Erased { .. } | State::Failed { .. }, false) => Some(Event::RefDeleted),
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
            status: RouteStatus::from_state(&p.value.state, rebuildable, p.value.change.as_ref()),
            version: p.version,
            ttl_remaining_ms: remaining,
            pinned: p.value.pinned,
        }
    }

    /// Rebuilds an erased or failed preview once git says its ref is still there.
    pub(crate) async fn rebuild(&self, p: Versioned<Preview>, project: &Project) -> Result<Accepted, ApiError> {
        if let State::Gone { why: why @ (GoneWhy::Closed | GoneWhy::Merged) } = p.value.state {
            return Err(ApiError::Gone(GoneInfo { why, change: p.value.change.clone() }));
        }
        match self.refs.exists(&project.git_url, &p.value.git_ref).await {
            Ok(false) => {
                if let Err(e) = apply(self.store.as_ref(), &p.value.id, &Event::RefDeleted, now_ms()).await {
                    warn!(preview = %p.value.id, error = %e, "recording the deleted ref failed");
                }
                return Err(ApiError::ref_gone());
            }
            Ok(true) => {}
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
}
