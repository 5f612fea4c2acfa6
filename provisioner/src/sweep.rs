//! Periodic work: TTL expiry, idle sleep, and reconciliation with the cloud.

use crate::now_ms;
use crate::runner::Provisioner;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tracing::{info, warn};
use wakegate_core::lifecycle::{EraseReason, Event, State};
use wakegate_store::driver::{apply, sync_indexes};

/// Most items one sweep handles; the rest wait for the next one.
const BATCH: usize = 500;

/// What one reconciliation did (also logged).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub expired: usize,
    pub slept: usize,
    pub requeued: usize,
    pub reaped: usize,
    pub lost: usize,
}

impl Provisioner {
    /// Runs the sweepers every `sweep_every` until `stop` turns true.
    pub async fn run_sweeps(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let r = self.sweep_once().await;
            if r != Report::default() {
                info!(?r, "sweep");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.sweep_every) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One pass of every sweeper.
    pub async fn sweep_once(&self) -> Report {
        let mut r = Report::default();
        self.expire(&mut r).await;
        self.sleep_idle(&mut r).await;
        self.reconcile(&mut r).await;
        r
    }

    async fn expire(&self, r: &mut Report) {
        let now = now_ms();
        let Ok(due) = self.store.due_expiries(now, BATCH).await else {
            return;
        };
        for id in due {
            let Ok(Some(p)) = self.store.get_preview(&id).await else { continue };
            let Ok(project) = self.store.get_project(&p.value.project_id).await else { continue };
            match project.as_ref().and_then(|pr| p.value.expires_at(pr)) {
                Some(at) if at <= now => {
                    match apply(self.store.as_ref(), &id, &Event::EraseRequested { reason: EraseReason::Ttl }, now)
                        .await
                    {
                        Ok(_) => {
                            info!(preview = %id, "TTL expired: erasing");
                            r.expired += 1;
                        }
                        Err(e) => warn!(preview = %id, error = %e, "TTL erase failed"),
                    }
                }
                // pinned, already erased, or the TTL moved: fix the index
                _ => {
                    let _ = sync_indexes(self.store.as_ref(), &p.value, now).await;
                }
            }
        }
    }

    async fn sleep_idle(&self, r: &mut Report) {
        let now = now_ms();
        let Ok(projects) = self.store.list_projects().await else {
            return;
        };
        let Some(min_idle) = projects.iter().map(|p| p.idle_timeout_secs).min() else {
            return;
        };
        let timeouts: HashMap<String, u64> = projects.into_iter().map(|p| (p.id, p.idle_timeout_secs * 1000)).collect();
        let Ok(idle) = self.store.idle_before(now.saturating_sub(min_idle * 1000), BATCH).await else {
            return;
        };
        for (id, last) in idle {
            let Ok(Some(p)) = self.store.get_preview(&id).await else {
                continue;
            };
            if !matches!(p.value.state, State::Running { .. }) {
                continue;
            }
            let Some(timeout) = timeouts.get(&p.value.project_id) else {
                continue;
            };
            if now.saturating_sub(last) >= *timeout
                && apply(self.store.as_ref(), &id, &Event::SleepRequested, now).await.is_ok()
            {
                info!(preview = %id, idle_ms = now - last, "idle: going to sleep");
                r.slept += 1;
            }
        }
    }

    /// Compares the store with the cloud and repairs: re-enqueues the job a
    /// transitional state waits on, deletes machines no record references (after the
    /// grace period), and fails previews whose machine vanished.
    pub async fn reconcile(&self, r: &mut Report) {
        // machines first: one created after this listing is not judged this round
        let machines = match self.cloud.list().await {
            Ok(m) => m,
            Err(e) => return warn!(error = %e, "listing machines failed"),
        };
        let (Ok(previews), Ok(jobs)) = (self.store.list_previews().await, self.store.jobs().await) else {
            return;
        };
        let jobs: HashSet<_> = jobs.into_iter().collect();
        let mut referenced = HashSet::new();
        for p in &previews {
            for m in p.value.state.machines() {
                referenced.insert(m.clone());
            }
            if let Some(kind) = p.value.state.pending_job() {
                if !jobs.contains(&(p.value.id.clone(), kind)) && self.store.enqueue(&p.value.id, kind).await.is_ok() {
                    info!(preview = %p.value.id, kind = kind.as_str(), "re-enqueued a lost job");
                    r.requeued += 1;
                }
            }
        }
        let now = now_ms();
        let grace = self.settings.orphan_grace.as_millis() as u64;
        let existing: HashSet<_> = machines.iter().map(|m| m.id.clone()).collect();
        for m in &machines {
            if !m.held && !referenced.contains(&m.id) && now.saturating_sub(m.created_at) >= grace {
                match self.cloud.delete(&m.id).await {
                    Ok(()) => {
                        info!(machine = %m.id, preview = %m.preview_id, "reaped an orphaned machine");
                        r.reaped += 1;
                    }
                    Err(e) => warn!(machine = %m.id, error = %e, "reaping failed"),
                }
            }
        }
        for p in &previews {
            let machine = match &p.value.state {
                State::Running { machine, .. } | State::Sleeping { machine } => machine,
                _ => continue,
            };
            if !existing.contains(machine) {
                let event = Event::MachineLost { machine: machine.clone(), reason: "the machine disappeared".into() };
                if apply(self.store.as_ref(), &p.value.id, &event, now).await.is_ok() {
                    warn!(preview = %p.value.id, %machine, "machine lost: preview marked failed");
                    r.lost += 1;
                }
            }
        }
    }
}
