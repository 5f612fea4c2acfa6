//! Periodic work: TTL expiry, idle sleep, liveness of running apps, and reconciliation
//! with the cloud.
//!
//! Every step survives bad data and a store that is down: arithmetic on operator values
//! saturates, a failed read is logged (once a sweep) and the step tries again next time.
//! Listing the cloud costs API requests, so the reconciler's listings are paced to
//! [`Settings::cloud_requests_per_hour`](crate::Settings), come every
//! [`Settings::list_every`](crate::Settings) otherwise, and come early (never more
//! often than a sweep) when something suggests drift: a delete that failed, a machine
//! found dead.

use crate::now_ms;
use crate::runner::Provisioner;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};
use wakegate_core::lifecycle::{EraseReason, Event, MachineId, State};
use wakegate_core::metrics as m;
use wakegate_core::route::Preview;
use wakegate_store::driver::{apply, apply_at, sync_indexes};
use wakegate_store::Versioned;

/// Every preview state, so a gauge drops to 0 when its last preview leaves it.
const PREVIEW_STATES: [&str; 9] =
    ["building", "running", "stopping", "sleeping", "waking", "failed", "erasing", "erased", "gone"];
/// The server statuses Hetzner reports (and `snapshot` for a hibernated machine).
const SERVER_STATUSES: [&str; 10] = [
    "running",
    "initializing",
    "starting",
    "stopping",
    "off",
    "deleting",
    "migrating",
    "rebuilding",
    "unknown",
    "snapshot",
];

/// Most items one batch handles.
const BATCH: usize = 500;
/// Most batches one sweep of the idle index reads (a backlog drains over sweeps).
const MAX_BATCHES: usize = 20;

/// What one reconciliation did (also logged).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub expired: usize,
    pub slept: usize,
    pub requeued: usize,
    pub reaped: usize,
    pub lost: usize,
    /// Running previews whose app was found dead.
    pub dead: usize,
    /// Cloud listings made.
    pub listed: usize,
}

/// When the cloud may be listed next.
#[derive(Default)]
pub struct Pace {
    next_list: Mutex<Option<tokio::time::Instant>>,
    soon: AtomicBool,
}

impl Provisioner {
    /// Runs the sweepers every `sweep_every` until `stop` turns true.
    pub async fn run_sweeps(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let r = self.sweep_once().await;
            // a sweep that only listed the cloud is not news
            if r != (Report { listed: r.listed, ..Report::default() }) {
                info!(?r, "sweep");
            }
            tokio::select! {
                _ = tokio::time::sleep(self.settings.sweep_every) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Checks running apps every `liveness_every` until `stop` turns true.
    pub async fn run_liveness(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let mut r = Report::default();
            self.liveness(&mut r).await;
            tokio::select! {
                _ = tokio::time::sleep(self.settings.liveness_every) => {}
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

    /// Asks for a cloud listing as soon as the pace allows.
    pub fn reconcile_soon(&self) {
        self.pace.soon.store(true, Ordering::Release);
    }

    async fn expire(&self, r: &mut Report) {
        let now = now_ms();
        let due = match self.store.due_expiries(now, BATCH).await {
            Ok(due) => due,
            Err(e) => return warn!(error = %e, "TTL sweep: reading due expiries failed"),
        };
        for id in due {
            let p = match self.store.get_preview(&id).await {
                Ok(Some(p)) => p,
                Ok(None) => {
                    // an index entry without a record
                    if let Err(e) = self.store.set_expiry(&id, None).await {
                        warn!(preview = %id, error = %e, "TTL sweep: clearing a stale entry failed");
                    }
                    continue;
                }
                Err(e) => return warn!(error = %e, "TTL sweep: reading a preview failed"),
            };
            let project = match self.store.get_project(&p.value.project_id).await {
                Ok(p) => p,
                Err(e) => return warn!(error = %e, "TTL sweep: reading a project failed"),
            };
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
                    if let Err(e) = sync_indexes(self.store.as_ref(), &p.value, now).await {
                        warn!(preview = %id, error = %e, "TTL sweep: repairing the index failed");
                    }
                }
            }
        }
    }

    async fn sleep_idle(&self, r: &mut Report) {
        let now = now_ms();
        let projects = match self.store.list_projects().await {
            Ok(p) => p,
            Err(e) => return warn!(error = %e, "idle sweep: listing projects failed"),
        };
        let Some(min_idle) = projects.iter().map(|p| p.idle_timeout_secs).min() else {
            return;
        };
        // saturating: a project stored before values were checked cannot overflow this
        let ms = |secs: u64| secs.saturating_mul(1000);
        let timeouts: HashMap<String, u64> = projects.into_iter().map(|p| (p.id, ms(p.idle_timeout_secs))).collect();
        let before = now.saturating_sub(ms(min_idle));
        for _ in 0..MAX_BATCHES {
            let idle = match self.store.idle_before(before, BATCH).await {
                Ok(idle) => idle,
                Err(e) => return warn!(error = %e, "idle sweep: reading the activity index failed"),
            };
            let full = idle.len() == BATCH;
            let mut progressed = false;
            for (id, last) in idle {
                let p = match self.store.get_preview(&id).await {
                    Ok(p) => p,
                    Err(e) => return warn!(error = %e, "idle sweep: reading a preview failed"),
                };
                let running = p.as_ref().filter(|p| matches!(p.value.state, State::Running { .. }));
                let Some(p) = running else {
                    // not running (or gone): its entry only crowds the batch. A touch
                    // since `last` keeps it.
                    match self.store.forget_activity(&id, last).await {
                        Ok(()) => progressed = true,
                        Err(e) => warn!(preview = %id, error = %e, "idle sweep: forgetting an entry failed"),
                    }
                    continue;
                };
                let timeout = timeouts.get(&p.value.project_id).copied().unwrap_or(0);
                if now.saturating_sub(last) >= timeout {
                    match apply(self.store.as_ref(), &id, &Event::SleepRequested, now).await {
                        Ok(a) => {
                            if a.changed {
                                metrics::counter!(m::SLEEPS, "reason" => "idle").increment(1);
                            }
                            info!(preview = %id, idle_ms = now.saturating_sub(last), "idle: going to sleep");
                            r.slept += 1;
                            progressed = true;
                        }
                        Err(e) => warn!(preview = %id, error = %e, "idle sweep: sleeping failed"),
                    }
                }
            }
            // a full batch of running previews with longer timeouts than the shortest
            // cannot shrink: stop, the next sweep reads them again
            if !full || !progressed {
                return;
            }
        }
    }

    /// Checks that running previews' apps are alive; a dead one marks its preview
    /// failed with the reason (its last log lines, for operators).
    pub async fn liveness(&self, r: &mut Report) {
        let previews = match self.store.list_previews().await {
            Ok(p) => p,
            Err(e) => return warn!(error = %e, "liveness: listing previews failed"),
        };
        let running: Vec<_> = previews
            .into_iter()
            .filter_map(|p| match &p.value.state {
                State::Running { machine, .. } => Some((p.value.id.clone(), p.version, machine.clone())),
                _ => None,
            })
            .collect();
        if running.is_empty() {
            return;
        }
        let machines: Vec<_> = running.iter().map(|(_, _, m)| m.clone()).collect();
        let dead = match self.cloud.dead(&machines).await {
            Ok(d) => d,
            Err(e) => return warn!(error = %e, "liveness: checking machines failed"),
        };
        for (machine, reason) in dead {
            let Some((id, version, _)) = running.iter().find(|(_, _, m)| *m == machine) else { continue };
            let event = Event::MachineLost { machine: machine.clone(), reason: reason.clone() };
            // only if nothing changed since the read: a sleep that stopped the app on
            // purpose in between must not be taken for a crash
            match apply_at(self.store.as_ref(), id, &event, now_ms(), *version).await {
                Ok(Some(a)) => {
                    warn!(preview = %id, %machine, reason = %reason, "the app died: preview marked failed");
                    for m in &a.delete {
                        if let Err(e) = self.cloud.delete(m).await {
                            warn!(machine = %m, error = %e, "delete failed; the reaper will retry");
                            self.reconcile_soon();
                        }
                    }
                    r.dead += 1;
                }
                Ok(None) => {}
                Err(e) => warn!(preview = %id, error = %e, "liveness: recording a dead app failed"),
            }
        }
    }

    /// Whether the cloud may be listed now; if so, books the listing.
    fn may_list(&self) -> bool {
        let now = tokio::time::Instant::now();
        let next = *self.pace.next_list.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match next {
            None => true,
            Some(at) if now >= at => true,
            // early, if asked, once a sweep interval has passed since the last listing
            Some(_) => self.pace.soon.load(Ordering::Acquire),
        }
    }

    /// Spaces the next listing so listings stay within the hourly request budget.
    fn listed(&self, requests: u32) {
        let budget = self.settings.cloud_requests_per_hour.max(1);
        let spacing = Duration::from_secs(3600).mul_f64(f64::from(requests) / f64::from(budget));
        let spacing = spacing.max(self.settings.list_every).max(self.settings.sweep_every);
        *self.pace.next_list.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some(tokio::time::Instant::now() + spacing);
        self.pace.soon.store(false, Ordering::Release);
    }

    /// Servers by state, and what they cost per hour (in total, and per project for the
    /// dashboard).
    async fn record_listing(&self, previews: &[Versioned<Preview>], machines: &[crate::cloud::MachineInfo]) {
        let mut by_status: HashMap<&str, usize> = SERVER_STATUSES.iter().map(|s| (*s, 0)).collect();
        for m in machines {
            *by_status.entry(m.status.as_str()).or_default() += 1;
        }
        for (status, n) in by_status {
            metrics::gauge!(m::SERVERS, "state" => status.to_string()).set(n as f64);
        }
        metrics::gauge!(m::COST_PER_HOUR).set(machines.iter().map(|m| m.hourly_cost).sum::<f64>());
        let project_of: HashMap<&str, &str> =
            previews.iter().map(|p| (p.value.id.as_str(), p.value.project_id.as_str())).collect();
        let mut costs: HashMap<String, f64> = HashMap::new();
        for m in machines.iter().filter(|m| m.hourly_cost > 0.0) {
            if let Some(project) = project_of.get(m.preview_id.as_str()) {
                *costs.entry(project.to_string()).or_default() += m.hourly_cost;
            }
        }
        if let Err(e) = wakegate_store::stats::set_costs(self.store.as_ref(), &costs).await {
            warn!(error = %e, "recording projects' costs failed");
        }
    }

    /// Compares the store with the cloud and repairs: re-enqueues the job a
    /// transitional state waits on (every sweep), and, when the pace allows, deletes
    /// machines no record references (after the grace period) and fails previews whose
    /// machine vanished.
    pub async fn reconcile(&self, r: &mut Report) {
        let (previews, jobs) = match (self.store.list_previews().await, self.store.jobs().await) {
            (Ok(p), Ok(j)) => (p, j),
            (Err(e), _) | (_, Err(e)) => return warn!(error = %e, "reconcile: reading the store failed"),
        };
        let mut by_state: HashMap<&str, usize> = PREVIEW_STATES.iter().map(|s| (*s, 0)).collect();
        for p in &previews {
            *by_state.entry(p.value.state.as_str()).or_default() += 1;
        }
        for (state, n) in by_state {
            metrics::gauge!(m::PREVIEWS, "state" => state).set(n as f64);
        }
        let jobs: HashSet<_> = jobs.into_iter().collect();
        for p in &previews {
            if let Some(kind) = p.value.state.pending_job() {
                if !jobs.contains(&(p.value.id.clone(), kind)) {
                    match self.store.enqueue(&p.value.id, kind).await {
                        Ok(_) => {
                            info!(preview = %p.value.id, kind = kind.as_str(), "re-enqueued a lost job");
                            r.requeued += 1;
                        }
                        Err(e) => warn!(preview = %p.value.id, error = %e, "re-enqueueing a lost job failed"),
                    }
                }
            }
        }
        // records, then the cloud, then the records again. A preview that runs in the
        // first read had its machine before the listing, so a machine missing from the
        // listing is lost. A listed machine no record in the second read holds existed
        // before that read, so nothing being built is taken for an orphan (the grace
        // period is a second guard, not the only one).
        if !self.may_list() {
            return;
        }
        let crate::cloud::Listing { machines, requests } = match self.cloud.list().await {
            Ok(l) => l,
            Err(e) => {
                self.listed(1);
                return warn!(error = %e, "listing machines failed");
            }
        };
        self.listed(requests);
        r.listed += 1;
        self.record_listing(&previews, &machines).await;
        let referenced: HashSet<MachineId> = match self.store.list_previews().await {
            Ok(fresh) => fresh.iter().flat_map(|p| p.value.state.machines().into_iter().cloned()).collect(),
            Err(e) => return warn!(error = %e, "reconcile: reading the store failed"),
        };
        let now = now_ms();
        let grace = self.settings.orphan_grace.as_millis().min(u64::MAX as u128) as u64;
        let existing: HashSet<_> = machines.iter().map(|m| m.id.clone()).collect();
        for m in &machines {
            if !m.held && !referenced.contains(&m.id) && now.saturating_sub(m.created_at) >= grace {
                match self.cloud.delete(&m.id).await {
                    Ok(()) => {
                        info!(machine = %m.id, preview = %m.preview_id, "reaped an orphaned machine");
                        r.reaped += 1;
                    }
                    Err(e) => {
                        warn!(machine = %m.id, error = %e, "reaping failed");
                        self.reconcile_soon();
                    }
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
                match apply_at(self.store.as_ref(), &p.value.id, &event, now, p.version).await {
                    Ok(Some(_)) => {
                        warn!(preview = %p.value.id, %machine, "machine lost: preview marked failed");
                        r.lost += 1;
                    }
                    Ok(None) => {}
                    Err(e) => warn!(preview = %p.value.id, error = %e, "recording a lost machine failed"),
                }
            }
        }
    }
}
