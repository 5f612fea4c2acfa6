//! Applying lifecycle events to stored previews: the one place that turns
//! [`transition`] into writes. Read → transition → compare-and-set (retried on conflict)
//! → then effects: jobs are enqueued here; machine deletions are handed back to the
//! caller (only the provisioner can perform them).

use crate::{Result, Store, StoreError, Versioned};
use wakegate_core::lifecycle::{transition, Effect, Event, MachineId, Rejected, State};
use wakegate_core::route::Preview;
use wakegate_core::Millis;

/// What happened when an event was applied.
#[derive(Debug)]
pub struct Applied {
    pub preview: Versioned<Preview>,
    /// Machines the caller must delete (idempotently).
    pub delete: Vec<MachineId>,
    /// The event belonged to work that is no longer wanted.
    pub stale: bool,
    /// The state changed.
    pub changed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no preview {0}")]
    NotFound(String),
    #[error(transparent)]
    Rejected(#[from] Rejected),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies `event` to preview `id` at time `now`.
pub async fn apply(store: &dyn Store, id: &str, event: &Event, now: Millis) -> Result<Applied, ApplyError> {
    apply_inner(store, id, event, now, None, &|_| {}).await?.ok_or(ApplyError::Store(StoreError::Conflict))
}

/// Applies `event` and, in the same write, `edit` to the record's other fields (the
/// commit a redeploy is for, say), so no crash can separate them.
pub async fn apply_editing(
    store: &dyn Store,
    id: &str,
    event: &Event,
    now: Millis,
    edit: &(dyn Fn(&mut Preview) + Sync),
) -> Result<Applied, ApplyError> {
    apply_inner(store, id, event, now, None, edit).await?.ok_or(ApplyError::Store(StoreError::Conflict))
}

/// Changes fields of a preview other than its state (compare-and-set, retried); the
/// state must not be touched by `edit`.
pub async fn edit(
    store: &dyn Store,
    id: &str,
    edit: &(dyn Fn(&mut Preview) + Sync),
) -> Result<Versioned<Preview>, ApplyError> {
    for _ in 0..64 {
        let current = store.get_preview(id).await?.ok_or_else(|| ApplyError::NotFound(id.to_string()))?;
        let mut next = current.value.clone();
        edit(&mut next);
        next.state = current.value.state.clone();
        if next == current.value {
            return Ok(current);
        }
        match store.put_preview(&next, Some(current.version)).await {
            Ok(version) => return Ok(Versioned { version, value: next }),
            Err(StoreError::Conflict) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict.into())
}

/// Applies `event` only if the preview is still at `version` (what the caller judged
/// from); `None` when it moved on.
pub async fn apply_at(
    store: &dyn Store,
    id: &str,
    event: &Event,
    now: Millis,
    version: u64,
) -> Result<Option<Applied>, ApplyError> {
    apply_inner(store, id, event, now, Some(version), &|_| {}).await
}

async fn apply_inner(
    store: &dyn Store,
    id: &str,
    event: &Event,
    now: Millis,
    expected: Option<u64>,
    edit: &(dyn Fn(&mut Preview) + Sync),
) -> Result<Option<Applied>, ApplyError> {
    for _ in 0..64 {
        let current = store.get_preview(id).await?.ok_or_else(|| ApplyError::NotFound(id.to_string()))?;
        if expected.is_some_and(|v| v != current.version) {
            return Ok(None);
        }
        let t = transition(&current.value.state, event, now)?;
        let changed = t.state != current.value.state;
        let mut next = current.value.clone();
        edit(&mut next);
        next.state = t.state.clone();
        let mut delete = Vec::new();
        for effect in &t.effects {
            match effect {
                Effect::ReportFailure { phase, reason } => {
                    next.last_error = Some(format!("{}: {reason}", phase.as_str()))
                }
                Effect::DeleteMachine { machine } => delete.push(machine.clone()),
                Effect::Schedule { .. } => {}
            }
        }
        if matches!(event, Event::BuildRequested | Event::Redeploy) && changed {
            next.built_at = now;
            next.last_error = None;
        }
        if changed {
            next.state_since = now;
            next.progress = None;
        }
        let version = if next != current.value {
            match store.put_preview(&next, Some(current.version)).await {
                Ok(v) => v,
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        } else {
            current.version
        };
        for effect in &t.effects {
            if let Effect::Schedule { job } = effect {
                store.enqueue(id, *job).await?;
            }
        }
        if changed {
            sync_indexes(store, &next, now).await?;
            crate::stats::observe(store, &current.value, &next, now).await;
        }
        return Ok(Some(Applied { preview: Versioned { version, value: next }, delete, stale: t.stale, changed }));
    }
    Err(StoreError::Conflict.into())
}

/// Keeps the TTL index in step with a preview, and starts its activity clock when it
/// begins to run (so a preview nobody visits still goes to sleep).
pub async fn sync_indexes(store: &dyn Store, preview: &Preview, now: Millis) -> Result<()> {
    let project = store.get_project(&preview.project_id).await?;
    let expiry = project.as_ref().and_then(|p| preview.expires_at(p));
    store.set_expiry(&preview.id, expiry).await?;
    if matches!(preview.state, State::Running { .. }) {
        store.touch(std::slice::from_ref(&preview.id), now).await?;
    }
    Ok(())
}
