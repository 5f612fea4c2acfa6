//! Turning what forges say into previews, and previews back into what forges show.
//!
//! One function, [`sync_change`], brings one merge request's preview in line with the
//! merge request as the forge's API describes it now; deliveries, the reconciler and
//! nothing else call it, so a lost, repeated or reordered delivery changes nothing the
//! next call would not repair:
//!
//! * open (and not a draft, and changing something, unless the project wants those) →
//!   the preview of its source ref exists and builds its head commit: a new commit
//!   redeploys (restarting a build of an older one), an open / reopen / ready event
//!   wakes or rebuilds it; a draft gets nothing;
//! * closed or merged → erased into *gone*, with the merge request linked.
//!
//! Then [`publish`] edits the one comment (found by a hidden marker when its id was
//! lost, made again when someone deleted it, deleted when the merge request ends) and
//! the environment / deployment. Both run under a per-merge-request lock in the store,
//! so concurrent deliveries on several replicas post one comment.

use super::hooks::{Delivery, HookEvent, INBOX, SEEN};
use super::{ChangeInfo, ChangeState, EnvState, EnvView, Forge, ForgeError, Views};
use crate::error::ApiError;
use crate::waker::{now_ms, Waker};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use wakegate_core::lifecycle::{EraseReason, Event, State};
use wakegate_core::route::{ForgeKind, Preview, Project};
use wakegate_core::{ttl, Millis};
use wakegate_store::driver::apply_editing;
use wakegate_store::StoreError;

/// What Wakegate keeps per merge request, by `<project id>/<number>`.
pub const CHANGES: &str = "forge-changes";
/// Per-merge-request locks, by the same key: `<owner>:<expires ms>`.
pub const LOCKS: &str = "forge-locks";
/// A lock not released (its holder crashed) is free after this: longer than the longest
/// a holder's work can take (a few forge calls, each at most a few tries of
/// [`super::api::MAX_RATE_WAIT`] and the request timeout).
const LOCK_TTL: Duration = Duration::from_secs(15 * 60);
/// Longest a delivery waits for another holder of its merge request's lock.
const LOCK_WAIT: Duration = Duration::from_secs(10);
/// Tries at a delivery before it is dropped (the reconciler repairs what it missed).
pub const MAX_ATTEMPTS: u32 = 8;
/// The hidden marker the comment is found by.
const MARKER: &str = "<!-- wakegate:preview";

/// The hidden first line of a merge request's comment.
fn marker(project_id: &str, number: u64) -> String {
    format!("{MARKER} {project_id}/{number} -->")
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Forge(#[from] ForgeError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("another worker holds merge request {0}")]
    Busy(String),
    #[error("the forge does not know merge request {0} (deleted, or the token cannot see it)")]
    Unknown(u64),
}

impl From<wakegate_store::driver::ApplyError> for SyncError {
    fn from(e: wakegate_store::driver::ApplyError) -> SyncError {
        SyncError::Api(e.into())
    }
}

/// A merge request as Wakegate follows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChangeRecord {
    pub project_id: String,
    pub number: u64,
    #[serde(default)]
    pub preview_id: Option<String>,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub git_ref: String,
    /// `None` until it is known; the comment and views are removed once it is not open.
    #[serde(default)]
    pub state: Option<ChangeState>,
    #[serde(default)]
    pub comment_id: Option<u64>,
    /// The body last written, so an unchanged comment is not edited.
    #[serde(default)]
    pub comment_body: Option<String>,
    #[serde(default)]
    pub views: Views,
}

fn key(project_id: &str, number: u64) -> String {
    format!("{project_id}/{number}")
}

async fn load(w: &Waker, key: &str) -> Result<Option<ChangeRecord>, StoreError> {
    Ok(w.store.table_get(CHANGES, key).await?.and_then(|raw| serde_json::from_str(&raw).ok()))
}

async fn save(w: &Waker, r: &ChangeRecord) -> Result<(), StoreError> {
    let json = serde_json::to_string(r).map_err(|e| StoreError::Backend(e.to_string()))?;
    w.store.table_put(CHANGES, &key(&r.project_id, r.number), &json).await
}

/// A held lock on one merge request.
struct Lock {
    key: String,
    value: String,
}

async fn try_lock(w: &Waker, key: &str) -> Result<Option<Lock>, StoreError> {
    let now = now_ms();
    let current = w.store.table_get(LOCKS, key).await?;
    let expired = |v: &str| v.rsplit_once(':').and_then(|(_, t)| t.parse::<Millis>().ok()).is_none_or(|t| t <= now);
    if current.as_deref().is_some_and(|v| !expired(v)) {
        return Ok(None);
    }
    let value = format!("{}:{}", wakegate_store::new_id("l"), now + LOCK_TTL.as_millis() as Millis);
    let won = w.store.table_swap(LOCKS, key, current.as_deref(), Some(&value)).await?;
    Ok(won.then(|| Lock { key: key.to_string(), value }))
}

async fn lock(w: &Waker, key: &str, wait: Duration) -> Result<Option<Lock>, StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(l) = try_lock(w, key).await? {
            return Ok(Some(l));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn unlock(w: &Waker, l: Lock) {
    if let Err(e) = w.store.table_swap(LOCKS, &l.key, Some(&l.value), None).await {
        warn!(lock = %l.key, error = %e, "releasing a merge request lock failed; it expires");
    }
}

/// Brings merge request `number` of `project` in line with what the forge says of it now
/// (read here, under the lock, so nothing acts on a stale view), then its comment and
/// views. `wake`: it was just opened, reopened or marked ready. `refresh`: write the
/// comment again even if unchanged (the reconciler: one someone deleted comes back).
pub async fn sync_change(
    w: &Waker,
    project: &Project,
    forge: &dyn Forge,
    number: u64,
    wake: bool,
    refresh: bool,
) -> Result<(), SyncError> {
    let k = key(&project.id, number);
    let Some(l) = lock(w, &k, LOCK_WAIT).await? else { return Err(SyncError::Busy(k)) };
    let result = async {
        // a 404 is not taken for "closed": a token that lost its access says the same
        let info = forge.change(number).await?.ok_or(SyncError::Unknown(number))?;
        apply_change(w, project, forge, number, &info, wake, refresh).await
    }
    .await;
    unlock(w, l).await;
    result
}

fn eligible(project: &Project, info: &ChangeInfo) -> bool {
    let Some(cfg) = &project.forge else { return false };
    (!info.draft || cfg.drafts) && (info.has_changes != Some(false) || cfg.empty) && (!info.from_fork || cfg.forks)
}

async fn apply_change(
    w: &Waker,
    project: &Project,
    forge: &dyn Forge,
    number: u64,
    info: &ChangeInfo,
    wake: bool,
    refresh: bool,
) -> Result<(), SyncError> {
    let kind = forge.kind();
    let k = key(&project.id, number);
    let mut record =
        load(w, &k).await?.unwrap_or(ChangeRecord { project_id: project.id.clone(), number, ..Default::default() });
    if refresh {
        // the reconciler writes the comment again: one someone deleted is made anew
        record.comment_body = None;
    }
    if info.state == ChangeState::Open {
        if !eligible(project, info) {
            // drafts and empty merge requests get nothing (an existing preview stays)
            info!(project = %project.name, number, draft = info.draft, "merge request not previewed");
            return Ok(());
        }
        let git_ref = wakegate_core::gitref::normalize(&info.preview_ref(kind))
            .map_err(|e| ApiError::Unprocessable(format!("merge request {number}: {e}")))?;
        let link = info.link(kind);
        let sha = (!info.head_sha.is_empty()).then(|| info.head_sha.clone());
        let (p, created) = w
            .ensure_preview(project, &git_ref, false, |p: &mut Preview| {
                p.change = Some(link.clone());
                p.commit = sha.clone();
            })
            .await?;
        if created {
            info!(project = %project.name, number, preview = %p.value.id, "preview created for a merge request");
        } else {
            let new_commit = sha.as_deref().is_some_and(|s| p.value.commit.as_deref().is_some_and(|c| c != s));
            let edit = |q: &mut Preview| {
                q.change = Some(link.clone());
                if let Some(s) = &sha {
                    q.commit = Some(s.clone());
                }
            };
            follow(w, &p.value, wanted(&p.value.state, new_commit, wake), &edit).await?;
        }
        record.preview_id = Some(p.value.id.clone());
        record.git_ref = git_ref;
    } else if let Some(id) = &record.preview_id {
        // closed or merged. A merge request Wakegate never saw open has no preview here
        // (one made for its ref by hand is left alone).
        let reason = if info.state == ChangeState::Merged { EraseReason::Merged } else { EraseReason::Closed };
        let link = info.link(kind);
        let edit = |p: &mut Preview| p.change = Some(link.clone());
        match apply_editing(w.store.as_ref(), id, &Event::EraseRequested { reason }, now_ms(), &edit).await {
            Ok(a) if a.changed => {
                info!(project = %project.name, number, preview = %id, reason = reason.as_str(), "merge request ended: preview erased")
            }
            Ok(_) | Err(wakegate_store::driver::ApplyError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    record.url = info.url.clone();
    record.state = Some(info.state);
    save(w, &record).await?;
    publish(w, project, forge, &mut record).await
}

/// What an existing preview must do to follow its ref: `new_commit` was pushed, `wake`
/// (its merge request was just opened, reopened or marked ready).
fn wanted(state: &State, new_commit: bool, wake: bool) -> Option<Event> {
    match state {
        // its merge request is open again (a reopen whose delivery was lost, too), or
        // a gone branch is back with new commits
        State::Gone { why } if wake || new_commit || *why != wakegate_core::lifecycle::GoneWhy::RefDeleted => {
            Some(Event::BuildRequested)
        }
        State::Gone { .. } => None,
        // erased to save money: a visit offers the rebuild; only an open / ready event
        // builds it again
        State::Erased { .. } | State::Erasing { .. } if wake => Some(Event::BuildRequested),
        State::Erased { .. } | State::Erasing { .. } => None,
        State::Failed { .. } if wake || new_commit => Some(Event::BuildRequested),
        _ if new_commit => Some(Event::Redeploy),
        State::Sleeping { .. } | State::Stopping { .. } if wake => Some(Event::WakeRequested),
        _ => None,
    }
}

/// Applies `event` (if any) to an existing preview with `edit` (its link, its commit)
/// in the same write, so no crash separates them; a gone preview is restored first.
async fn follow(
    w: &Waker,
    p: &Preview,
    event: Option<Event>,
    edit: &(dyn Fn(&mut Preview) + Sync),
) -> Result<(), SyncError> {
    let Some(e) = event else {
        wakegate_store::driver::edit(w.store.as_ref(), &p.id, edit).await?;
        return Ok(());
    };
    if matches!(p.state, State::Gone { .. }) {
        apply_editing(w.store.as_ref(), &p.id, &Event::RefRestored, now_ms(), &|_| {}).await?;
    }
    let a = apply_editing(w.store.as_ref(), &p.id, &e, now_ms(), edit).await?;
    if a.changed {
        info!(preview = %p.id, event = ?e, state = a.preview.value.state.as_str(), "preview follows its ref");
    }
    Ok(())
}

/// The comment for a preview in this state.
pub fn comment_body(w: &Waker, project: &Project, record: &ChangeRecord, p: Option<&Preview>) -> String {
    let marker = marker(&record.project_id, record.number);
    let Some(p) = p else {
        return format!("{marker}\n**Wakegate preview** · waiting for a builder.");
    };
    let urls = wakegate_core::route::preview_urls(&w.config.preview_url_template, &p.label, &p.custom_hosts);
    let url = urls.first().cloned().unwrap_or_default();
    let commit = p
        .commit
        .as_deref()
        .map(|c| format!(" (commit `{}`)", c.chars().take(8).collect::<String>()))
        .unwrap_or_default();
    let remaining = p.expires_at(project).map(|at| ttl::remaining(at, now_ms()));
    let ttl_line = match (p.pinned, remaining) {
        (true, _) => "Pinned: it is not erased by time.".to_string(),
        (false, Some(ms)) => format!("Erased in about {} unless it is pinned.", coarse(ms)),
        (false, None) => String::new(),
    };
    let (headline, detail) = match &p.state {
        State::Building { phase, serving, .. } => (
            format!("🔨 **Building**{commit}: {}.", phase.label().to_lowercase()),
            if serving.is_some() {
                format!("The previous version keeps answering at {url} until this one is ready.")
            } else {
                format!("It will answer at {url}.")
            },
        ),
        State::Running { .. } => (format!("✅ **Ready**{commit}: {url}"), ttl_line),
        State::Stopping { .. } | State::Sleeping { .. } | State::Waking { .. } => {
            (format!("💤 **Asleep**{commit}: {url}"), format!("The first visit wakes it. {ttl_line}"))
        }
        State::Failed { phase, .. } => (
            format!("❌ **Failed**{commit}: {}", phase.failure_summary()),
            "A new push builds it again; operators see the build output in the API.".to_string(),
        ),
        State::Erasing { .. } | State::Erased { .. } => {
            (format!("🗑️ **Erased** to save resources: {url}"), "Visiting it offers a one-click rebuild.".to_string())
        }
        State::Gone { .. } => ("**Gone.**".to_string(), String::new()),
    };
    let mut body = format!("{marker}\n**Wakegate preview** · {headline}\n");
    if !detail.trim().is_empty() {
        body.push_str(&format!("\n{}\n", detail.trim()));
    }
    if urls.len() > 1 {
        body.push_str(&format!("\nAlso at: {}\n", urls[1..].join(", ")));
    }
    body
}

/// Time left in whole hours (comments change at most hourly for it).
fn coarse(ms: Millis) -> String {
    let hours = ms.div_ceil(3_600_000);
    if hours <= 1 {
        "an hour".into()
    } else {
        format!("{hours} hours")
    }
}

fn env_state(state: &State) -> EnvState {
    match state {
        State::Building { .. } | State::Waking { .. } => EnvState::InProgress,
        State::Running { .. } | State::Sleeping { .. } | State::Stopping { .. } => EnvState::Ready,
        State::Failed { .. } => EnvState::Failed,
        // erased: the URL still offers a rebuild
        State::Erasing { .. } | State::Erased { .. } => EnvState::Ready,
        State::Gone { .. } => EnvState::Stopped,
    }
}

/// Brings the comment and the forge's view in line with the preview (or removes them
/// when the merge request ended). Call under the merge request's lock.
async fn publish(w: &Waker, project: &Project, forge: &dyn Forge, r: &mut ChangeRecord) -> Result<(), SyncError> {
    let preview = match &r.preview_id {
        Some(id) => w.store.get_preview(id).await?.map(|v| v.value),
        None => None,
    };
    let kind = forge.kind();
    if r.state != Some(ChangeState::Open) {
        // the merge request ended: no comment, the view stopped, and the record goes
        let found = match r.comment_id {
            Some(id) => Some(id),
            None if r.preview_id.is_some() => find_comment(forge, r).await?,
            None => None,
        };
        if let Some(id) = found {
            forge.delete_comment(r.number, id).await?;
            info!(number = r.number, comment = id, "merge request ended: comment deleted");
        }
        r.comment_id = None;
        save(w, r).await?;
        if r.views.id.is_some() {
            let view = env_view(w, kind, r, preview.as_ref(), EnvState::Stopped);
            forge.publish(&view, &mut r.views).await?;
        }
        w.store.table_remove(CHANGES, &key(&r.project_id, r.number)).await?;
        return Ok(());
    }
    let Some(p) = preview else { return Ok(()) };
    let body = comment_body(w, project, r, Some(&p));
    if r.comment_body.as_deref() != Some(body.as_str()) {
        let edited = match r.comment_id {
            Some(id) => forge.edit_comment(r.number, id, &body).await?,
            None => false,
        };
        if !edited {
            // lost its id (a crash after the forge made it) or someone deleted it
            match find_comment(forge, r).await? {
                Some(id) => {
                    forge.edit_comment(r.number, id, &body).await?;
                    r.comment_id = Some(id);
                }
                None => {
                    let id = forge.create_comment(r.number, &body).await?;
                    info!(number = r.number, comment = id, "comment posted");
                    r.comment_id = Some(id);
                }
            }
        }
        r.comment_body = Some(body);
        save(w, r).await?;
    }
    // each forge's publish calls only when its view differs from what it last wrote
    let view = env_view(w, kind, r, Some(&p), env_state(&p.state));
    let before = r.views.clone();
    forge.publish(&view, &mut r.views).await?;
    if r.views != before {
        save(w, r).await?;
    }
    Ok(())
}

fn env_view(w: &Waker, kind: ForgeKind, r: &ChangeRecord, p: Option<&Preview>, state: EnvState) -> EnvView {
    let url = p.map(|p| w.config.preview_url_template.replace("{label}", &p.label)).unwrap_or_default();
    let short = wakegate_core::host::short_ref(&r.git_ref);
    let name = match kind {
        ForgeKind::Gitlab => format!("review/{short}"),
        ForgeKind::Github => format!("preview/{short}"),
    };
    EnvView { name, url, state, sha: p.and_then(|p| p.commit.clone()), git_ref: r.git_ref.clone() }
}

async fn find_comment(forge: &dyn Forge, r: &ChangeRecord) -> Result<Option<u64>, ForgeError> {
    let marker = marker(&r.project_id, r.number);
    Ok(forge.comments(r.number).await?.into_iter().find(|c| c.body.starts_with(&marker)).map(|c| c.id))
}

/// Works on one delivery.
async fn handle(w: &Waker, project: &Project, forge: &dyn Forge, event: &HookEvent) -> Result<(), SyncError> {
    match event {
        HookEvent::Change { number, wake } => sync_change(w, project, forge, *number, *wake, false).await,
        HookEvent::Push { branch, after } => {
            if after.bytes().all(|b| b == b'0') {
                // a deleted branch: its merge request's own event says what happens
                return Ok(());
            }
            let Ok(git_ref) = wakegate_core::gitref::normalize(branch) else { return Ok(()) };
            let id = format!("pv-{}", wakegate_core::host::ref_hash(&project.id, &git_ref));
            let Some(p) = w.store.get_preview(&id).await? else { return Ok(()) };
            if let Some(change) = &p.value.change {
                // the merge request's own view decides (its head is this push now)
                return sync_change(w, project, forge, change.number, false, false).await;
            }
            // a branch preview follows every push it has not built (one made by hand
            // knows no commit yet); an erased or gone one waits for a visitor
            let stale = p.value.commit.as_deref() != Some(after.as_str());
            if stale && !matches!(p.value.state, State::Gone { .. } | State::Erased { .. } | State::Erasing { .. }) {
                let edit = |q: &mut Preview| q.commit = Some(after.clone());
                follow(w, &p.value, wanted(&p.value.state, true, false), &edit).await?;
                info!(preview = %id, commit = %after, "push: redeploying");
            }
            Ok(())
        }
    }
}

/// Reads the inbox until the waker stops: each delivery is worked on in arrival order,
/// retried with back-off when the forge or the store fails, and dropped after
/// [`MAX_ATTEMPTS`] (the reconciler repairs it).
pub async fn inbox_loop(w: Arc<Waker>) {
    let mut last_prune = 0;
    loop {
        let notified = w.forge.inbox.notified();
        if let Err(e) = inbox_once(&w).await {
            warn!(error = %e, "reading the forge inbox failed");
        }
        let now = now_ms();
        if now.saturating_sub(last_prune) > 3_600_000 {
            last_prune = now;
            prune_seen(&w, now).await;
        }
        tokio::select! {
            () = notified => {}
            () = tokio::time::sleep(w.forge.settings.inbox_every) => {}
        }
    }
}

/// How long a worker holds a delivery it took.
const INBOX_LEASE: Duration = LOCK_TTL;

/// One pass over the inbox, oldest delivery first. Each is taken with a lease (a
/// compare-and-set on its row), so one replica works on it; it is removed when done, or
/// put back with back-off when its work failed.
pub async fn inbox_once(w: &Waker) -> Result<(), StoreError> {
    let mut rows: Vec<(String, String, Delivery)> = Vec::new();
    for (k, raw) in w.store.table_list(INBOX).await? {
        match serde_json::from_str::<Delivery>(&raw) {
            Ok(d) => rows.push((k, raw, d)),
            Err(_) => {
                warn!(key = %k, "dropping an unreadable delivery");
                w.store.table_swap(INBOX, &k, Some(&raw), None).await?;
            }
        }
    }
    rows.sort_by_key(|(k, _, d)| (d.received_at, k.clone()));
    let to_json = |d: &Delivery| serde_json::to_string(d).map_err(|e| StoreError::Backend(e.to_string()));
    for (k, raw, mut d) in rows {
        let now = now_ms();
        if d.not_before > now || d.lease_until > now {
            continue;
        }
        d.lease_until = now + INBOX_LEASE.as_millis() as Millis;
        let leased = to_json(&d)?;
        if !w.store.table_swap(INBOX, &k, Some(&raw), Some(&leased)).await? {
            continue; // another replica took it, or it changed
        }
        let result = match w.store.get_project(&d.project_id).await? {
            None => Ok(()),
            Some(project) => match w.forge.clients.client(&project) {
                Ok(Some(forge)) => handle(w, &project, forge.as_ref(), &d.event).await,
                Ok(None) => Ok(()),
                Err(e) => Err(e.into()),
            },
        };
        let next = match result {
            Ok(()) => None,
            Err(e) => {
                d.attempts += 1;
                d.lease_until = 0;
                if d.attempts >= MAX_ATTEMPTS {
                    warn!(delivery = %d.delivery, error = %e, "giving up on a delivery; the reconciler repairs it");
                    None
                } else {
                    let backoff = match &e {
                        SyncError::Forge(ForgeError::RateLimited { retry_after }) => *retry_after,
                        _ => Duration::from_secs(1 << d.attempts.min(8)),
                    };
                    warn!(delivery = %d.delivery, attempt = d.attempts, error = %e, "delivery failed; retrying later");
                    d.not_before = now_ms() + backoff.as_millis() as Millis;
                    Some(to_json(&d)?)
                }
            }
        };
        w.store.table_swap(INBOX, &k, Some(&leased), next.as_deref()).await?;
    }
    Ok(())
}

/// Forgets delivery ids older than the retention.
async fn prune_seen(w: &Waker, now: Millis) {
    let keep = w.forge.settings.remember.as_millis() as Millis;
    match w.store.table_list(SEEN).await {
        Ok(rows) => {
            for (k, at) in rows {
                if at.parse::<Millis>().is_ok_and(|at| now.saturating_sub(at) > keep) {
                    if let Err(e) = w.store.table_swap(SEEN, &k, Some(&at), None).await {
                        // the next hourly pass tries again
                        return warn!(error = %e, "forgetting old delivery ids failed");
                    }
                }
            }
        }
        Err(e) => warn!(error = %e, "pruning delivery ids failed"),
    }
}

/// Keeps comments and views in step with previews until the waker stops.
pub async fn status_loop(w: Arc<Waker>) {
    loop {
        tokio::time::sleep(w.forge.settings.status_every).await;
        if let Err(e) = status_once(&w).await {
            warn!(error = %e, "updating merge request comments failed");
        }
    }
}

/// One pass of comment and view updates; a merge request whose lock is held is left
/// for the next pass.
pub async fn status_once(w: &Waker) -> Result<(), StoreError> {
    let records = w.store.table_list(CHANGES).await?;
    if records.is_empty() {
        return Ok(());
    }
    // projects once a pass, not once a merge request
    let projects: std::collections::HashMap<String, Project> =
        w.store.list_projects().await?.into_iter().map(|p| (p.id.clone(), p)).collect();
    for (k, raw) in records {
        let Ok(mut r) = serde_json::from_str::<ChangeRecord>(&raw) else { continue };
        let Some(project) = projects.get(&r.project_id) else { continue };
        let forge = match w.forge.clients.client(project) {
            Ok(Some(f)) => f,
            Ok(None) => continue,
            Err(e) => {
                warn!(project = %project.name, error = %e, "no forge client");
                continue;
            }
        };
        let Some(l) = try_lock(w, &k).await? else { continue };
        // read again under the lock: a delivery may have moved it on, or ended it
        match load(w, &k).await? {
            Some(fresh) => r = fresh,
            None => {
                unlock(w, l).await;
                continue;
            }
        }
        if let Err(e) = publish(w, project, forge.as_ref(), &mut r).await {
            warn!(project = %project.name, number = r.number, error = %e, "updating a merge request failed");
        }
        unlock(w, l).await;
    }
    Ok(())
}

/// Lists open merge requests of every project with a forge, paced, until the waker
/// stops; one replica does each pass.
pub async fn reconcile_loop(w: Arc<Waker>) {
    loop {
        tokio::time::sleep(w.forge.settings.reconcile_every).await;
        if !crate::orgs::my_turn(&w, "forge-reconcile", w.forge.settings.reconcile_every).await {
            continue;
        }
        reconcile_once(&w).await;
    }
}

/// One reconciling pass over every project with a forge.
pub async fn reconcile_once(w: &Waker) {
    let projects = match w.store.list_projects().await {
        Ok(p) => p,
        Err(e) => return warn!(error = %e, "reconcile: listing projects failed"),
    };
    for project in projects.iter().filter(|p| p.forge.is_some()) {
        if let Err(e) = reconcile_project(w, project).await {
            warn!(project = %project.name, error = %e, "reconciling merge requests failed");
        }
    }
}

async fn reconcile_project(w: &Waker, project: &Project) -> Result<(), SyncError> {
    let Some(forge) = w.forge.clients.client(project)? else { return Ok(()) };
    let open = forge.open_changes().await?;
    let mut seen = std::collections::HashSet::new();
    for info in &open {
        seen.insert(info.number);
        // read again one by one under the lock: the listing may be stale by then, and
        // lists leave out whether a merge request changes anything
        if let Err(e) = sync_change(w, project, forge.as_ref(), info.number, false, true).await {
            warn!(project = %project.name, number = info.number, error = %e, "reconciling a merge request failed");
        }
    }
    // followed as open, but no longer listed: closed or merged while nobody heard
    let prefix = format!("{}/", project.id);
    for (k, raw) in w.store.table_list(CHANGES).await? {
        let Some(number) = k.strip_prefix(&prefix).and_then(|n| n.parse::<u64>().ok()) else { continue };
        let followed = serde_json::from_str::<ChangeRecord>(&raw).is_ok_and(|r| r.state == Some(ChangeState::Open));
        if followed && !seen.contains(&number) {
            if let Err(e) = sync_change(w, project, forge.as_ref(), number, false, false).await {
                warn!(project = %project.name, number, error = %e, "reconciling a merge request failed");
            }
        }
    }
    Ok(())
}
