//! The job loops: claim, do, report, complete.
//!
//! Builds and quick jobs (wake, sleep, erase) are claimed from separate lanes with
//! separate slots, so a wake never queues behind builds. A job's lease is renewed by a
//! helper that ends with the job (an abort-on-drop handle, also when the job panics);
//! when the lease is lost to another worker, the job is cancelled at its next await
//! point so it makes no more cloud calls. A panicking job is logged, not completed: its
//! lease runs out and it is retried.

use crate::cloud::{Cloud, CloudError, DeploySpec, Outcome, Progress};
use crate::{now_ms, Settings};
use async_trait::async_trait;
use futures_util::FutureExt;
use std::sync::Arc;
use tokio_util::task::AbortOnDropHandle;
use tracing::{error, info, instrument, warn};
use wakegate_core::lifecycle::{Event, MachineId, Phase, State};
use wakegate_core::metrics as m;
use wakegate_store::driver::{apply, Applied, ApplyError};
use wakegate_store::{Lane, Lease, SharedStore, StoreError};

/// The credentials a project's forge token gives git, read now (a rotated token takes
/// effect at the next build).
pub fn git_auth(project: &wakegate_core::route::Project) -> Result<Option<crate::git::GitAuth>, String> {
    let Some(forge) = &project.forge else { return Ok(None) };
    // only over HTTPS, and only to the repository's own host
    let Some(origin) = https_origin(&project.git_url) else { return Ok(None) };
    let token = wakegate_store::secret::resolve(&forge.token).map_err(|e| format!("the forge token: {e}"))?;
    Ok(Some(crate::git::GitAuth { origin, username: forge.git_username().to_string(), token }))
}

/// `https://host[:port]` of an https URL.
fn https_origin(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://")?;
    let authority = rest.split('/').next()?;
    // credentials in the URL itself are the operator's choice; the origin is what follows
    let host = authority.rsplit('@').next()?;
    (!host.is_empty()).then(|| format!("https://{host}"))
}

/// Most times one build job starts again because newer code was pushed.
const MAX_RESTARTS: usize = 16;

pub struct Provisioner {
    pub store: SharedStore,
    pub cloud: Arc<dyn Cloud>,
    pub settings: Settings,
    pub worker: String,
    /// When the reconciler may list the cloud again, and whether it should as soon as
    /// that allows.
    pub(crate) pace: crate::sweep::Pace,
    /// The dumps' bucket, when S3 is configured: builds get presigned download URLs.
    pub dumps: Option<wakegate_db::s3::Bucket>,
    /// Database images this provisioner is baking.
    pub(crate) bakes: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// How long a build's dump URL works: long enough for a checkout and a slow download
/// to start.
const DUMP_URL_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// The dump a preview's database comes from: its own (`--target`), else the project's
/// base. `Ok(None)` when there is none; `Err` is a reason the build fails with.
pub async fn dump_source(
    store: &SharedStore,
    bucket: Option<&wakegate_db::s3::Bucket>,
    preview: &wakegate_core::route::Preview,
    ttl: std::time::Duration,
) -> Result<Option<crate::cloud::DumpSource>, String> {
    let Some(d) = preview_dump(store, preview).await? else { return Ok(None) };
    presigned(bucket, d, ttl).await.map(Some)
}

/// The dump a preview's database is made from, once ready: its own (`push --target`),
/// else its project's base.
pub(crate) async fn preview_dump(
    store: &SharedStore,
    preview: &wakegate_core::route::Preview,
) -> Result<Option<wakegate_db::Dump>, String> {
    let dumps = wakegate_db::Dumps::new(store.clone());
    let dump = match &preview.dump {
        Some(id) => dumps.get(&preview.project_id, id).await.map_err(|e| e.to_string())?,
        None => dumps.base(&preview.project_id).await.map_err(|e| e.to_string())?,
    };
    Ok(dump.filter(|d| d.state == wakegate_db::DumpState::Ready))
}

/// Where a build or a bake downloads `d` from, for `ttl`.
pub(crate) async fn presigned(
    bucket: Option<&wakegate_db::s3::Bucket>,
    d: wakegate_db::Dump,
    ttl: std::time::Duration,
) -> Result<crate::cloud::DumpSource, String> {
    let Some(bucket) = bucket else {
        return Err(format!("the project's database dump {} is in S3, and this provisioner has no S3 settings", d.id));
    };
    let url = bucket.presign_get(&d.key, ttl).await?;
    Ok(crate::cloud::DumpSource { id: d.id, engine: d.engine, url, size: d.size, gzip: d.gzip })
}

struct StoreProgress<'a> {
    p: &'a Provisioner,
    preview: &'a str,
    project_id: &'a str,
    /// Whether the build's dump is the project's base (not its own `--target` one).
    on_base: bool,
    how: std::sync::Mutex<Option<wakegate_core::route::Restore>>,
}

#[async_trait]
impl Progress for StoreProgress<'_> {
    async fn phase(&self, phase: Phase) -> bool {
        match apply(self.p.store.as_ref(), self.preview, &Event::PhaseReached { phase }, now_ms()).await {
            Ok(a) => !a.stale,
            Err(ApplyError::Store(e)) if e.is_retryable() => true,
            Err(_) => false,
        }
    }

    async fn detail(&self, done: u64, total: u64) {
        let how = *self.how.lock().unwrap_or_else(|e| e.into_inner());
        record_progress(&self.p.store, self.preview, done, total, how).await
    }

    async fn restoring(&self, how: wakegate_core::route::Restore) {
        *self.how.lock().unwrap_or_else(|e| e.into_inner()) = Some(how);
        record_progress(&self.p.store, self.preview, 0, 0, Some(how)).await
    }

    async fn database(&self, made: crate::cloud::DbMade) {
        self.p.record_made(self.preview, self.project_id, &made, self.on_base).await
    }
}

fn record(e: wakegate_db::RecordError) -> ApplyError {
    match e {
        wakegate_db::RecordError::Store(e) => ApplyError::Store(e),
        wakegate_db::RecordError::Conflict => ApplyError::Store(StoreError::Conflict),
    }
}

/// Records how far a database restore is, while the preview is restoring one.
pub(crate) async fn record_progress(
    store: &SharedStore,
    preview: &str,
    done: u64,
    total: u64,
    how: Option<wakegate_core::route::Restore>,
) {
    let r = wakegate_store::driver::edit(store.as_ref(), preview, &|p| {
        if matches!(p.state, State::Building { phase: Phase::RestoringDb, restart: false, .. }) {
            // a report of bytes alone keeps how the database is being made
            let how = how.or(p.progress.as_ref().and_then(|x| x.how));
            p.progress = Some(wakegate_core::route::Progress { done, total, how });
        }
    })
    .await;
    if let Err(e) = r {
        tracing::debug!(%preview, error = %e, "recording progress failed");
    }
}

impl Provisioner {
    pub fn new(store: SharedStore, cloud: Arc<dyn Cloud>, settings: Settings) -> Provisioner {
        let worker = wakegate_store::new_id("w-");
        Provisioner { store, cloud, settings, worker, pace: Default::default(), dumps: None, bakes: Default::default() }
    }

    /// Starts the job lanes, the sweepers and the liveness checks, each supervised
    /// (restarted if it panics), until `stop` turns true.
    pub fn spawn_all(self: &Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        let jobs = {
            let (me, stop) = (self.clone(), stop.clone());
            crate::supervise::supervise("jobs", move || me.clone().run_jobs(stop.clone()))
        };
        let sweeps = {
            let (me, stop) = (self.clone(), stop.clone());
            crate::supervise::supervise("sweeps", move || me.clone().run_sweeps(stop.clone()))
        };
        let images = {
            let (me, stop) = (self.clone(), stop.clone());
            crate::supervise::supervise("images", move || me.clone().run_images(stop.clone()))
        };
        let liveness = {
            let me = self.clone();
            crate::supervise::supervise("liveness", move || me.clone().run_liveness(stop.clone()))
        };
        vec![tokio::spawn(jobs), tokio::spawn(sweeps), tokio::spawn(images), tokio::spawn(liveness)]
    }

    /// Claims and runs jobs of both lanes until `stop` turns true.
    pub async fn run_jobs(self: Arc<Self>, stop: tokio::sync::watch::Receiver<bool>) {
        let build = self.clone().run_lane(Lane::Build, self.settings.max_builds, stop.clone());
        let quick = self.clone().run_lane(Lane::Quick, self.settings.max_quick_jobs, stop);
        tokio::join!(build, quick);
    }

    /// Claims and runs one lane's jobs, at most `slots` at once.
    /// Once told to stop, it claims no more and gives the jobs in flight
    /// `settings.shutdown_grace` to finish (one cut short keeps its lease until it runs
    /// out; another worker then takes the job up).
    pub async fn run_lane(self: Arc<Self>, lane: Lane, slots: usize, mut stop: tokio::sync::watch::Receiver<bool>) {
        let total = slots.max(1);
        let slots = Arc::new(tokio::sync::Semaphore::new(total));
        loop {
            if *stop.borrow() {
                let all = u32::try_from(total).unwrap_or(u32::MAX);
                let running = total - slots.available_permits();
                if running > 0 {
                    info!(lane = lane.as_str(), running, "stopping: letting the jobs in flight finish");
                }
                if tokio::time::timeout(self.settings.shutdown_grace, slots.acquire_many(all)).await.is_err() {
                    warn!(lane = lane.as_str(), "jobs still running after the grace period are left to their leases");
                }
                return;
            }
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
                _ = stop.changed() => continue,
            };
            match self.store.claim(&self.worker, lane, self.settings.lease, now_ms()).await {
                Ok(Some(lease)) => {
                    tracing::debug!(job = %lease.job_id, kind = lease.kind.as_str(), preview = %lease.preview_id, "claimed a job");
                    let me = self.clone();
                    tokio::spawn(async move {
                        me.run_job(lease).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "claiming a job failed"),
            }
            drop(permit);
            tokio::select! {
                _ = self.store.wait_for_jobs(self.settings.poll) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// Runs one claimed job with its lease kept alive; completes it unless the store
    /// failed, the lease was lost or the job panicked (then the lease runs out and the
    /// job is retried).
    pub async fn run_job(&self, lease: Lease) {
        let (lost_tx, lost) = tokio::sync::oneshot::channel::<()>();
        // ends with this function, whether it returns, is cancelled or unwinds
        let _renew = {
            let store = self.store.clone();
            let lease = lease.clone();
            let every = self.settings.lease / 3;
            let duration = self.settings.lease;
            AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    match store.renew(&lease, duration, now_ms()).await {
                        Ok(()) => {}
                        Err(StoreError::LeaseLost(_)) => {
                            warn!(job = %lease.job_id, "lease lost to another worker; cancelling the job");
                            // the job may have just finished: nobody to tell then
                            let _ = lost_tx.send(());
                            return;
                        }
                        Err(e) => warn!(job = %lease.job_id, error = %e, "lease renewal failed"),
                    }
                }
            }))
        };
        let work = std::panic::AssertUnwindSafe(self.handle(&lease)).catch_unwind();
        let result = tokio::select! {
            r = work => r,
            _ = lost => return,
        };
        let result = match result {
            Ok(r) => r,
            Err(panic) => {
                let message = crate::supervise::panic_message(panic.as_ref());
                error!(job = %lease.job_id, kind = lease.kind.as_str(), panic = %message, "job panicked; it will be retried when its lease runs out");
                return;
            }
        };
        let outcome = if result.is_ok() { "ok" } else { "retry" };
        metrics::counter!(m::JOBS, "kind" => lease.kind.as_str(), "result" => outcome).increment(1);
        match result {
            Ok(()) => {
                if let Err(e) = self.store.complete(&lease).await {
                    warn!(job = %lease.job_id, error = %e, "completing job failed");
                }
                // a request that came while this job held the slot (a push restarting a
                // build) found it taken: queue it now rather than at the next reconcile
                if let Ok(Some(p)) = self.store.get_preview(&lease.preview_id).await {
                    if p.value.state.pending_job() == Some(lease.kind)
                        && matches!(p.value.state, State::Building { restart: true, .. })
                    {
                        if let Err(e) = self.store.enqueue(&lease.preview_id, lease.kind).await {
                            warn!(preview = %lease.preview_id, error = %e, "re-enqueueing a restarted build failed");
                        }
                    }
                }
                // likewise a pull or a refresh asked for while this one's job was finishing
                let again = match lease.kind {
                    wakegate_core::lifecycle::JobKind::PullDb => {
                        let pulls = wakegate_db::Pulls::new(self.store.clone());
                        matches!(pulls.get(&lease.preview_id).await, Ok(Some(p)) if p.state == wakegate_db::PullState::Pending)
                    }
                    wakegate_core::lifecycle::JobKind::RefreshDb => {
                        let images = wakegate_db::Images::new(self.store.clone());
                        matches!(images.pending_refresh(&lease.preview_id).await, Ok(Some(_)))
                    }
                    _ => false,
                };
                if again {
                    if let Err(e) = self.store.enqueue(&lease.preview_id, lease.kind).await {
                        warn!(preview = %lease.preview_id, error = %e, "re-enqueueing a database job failed");
                    }
                }
            }
            Err(e) => {
                warn!(job = %lease.job_id, kind = lease.kind.as_str(), error = %e, "job failed; it will be retried")
            }
        }
    }

    async fn event(&self, preview: &str, event: Event) -> Result<Applied, ApplyError> {
        let applied = apply(self.store.as_ref(), preview, &event, now_ms()).await?;
        self.delete_machines(&applied.delete).await;
        Ok(applied)
    }

    async fn delete_machines(&self, machines: &[MachineId]) {
        for m in machines {
            if let Err(e) = self.cloud.delete(m).await {
                // the reaper deletes it later: nothing stays unreferenced for good
                warn!(machine = %m, error = %e, "delete failed");
            }
        }
    }

    #[instrument(skip(self, lease), fields(preview = %lease.preview_id, kind = lease.kind.as_str()))]
    async fn handle(&self, lease: &Lease) -> Result<(), ApplyError> {
        let id = lease.preview_id.as_str();
        let Some(current) = self.store.get_preview(id).await? else {
            return Ok(());
        };
        match (&current.value.state, lease.kind) {
            (State::Building { .. }, wakegate_core::lifecycle::JobKind::Build) => {
                // a push restarts the build while this job holds the build slot (the
                // queue keeps one build job per preview): the job goes round again
                let mut preview = current.value;
                for _ in 0..MAX_RESTARTS {
                    self.build(&preview).await?;
                    match self.store.get_preview(id).await? {
                        Some(p) if matches!(p.value.state, State::Building { restart: true, .. }) => {
                            info!("newer code was pushed: building again");
                            preview = p.value;
                        }
                        _ => return Ok(()),
                    }
                }
                // the job completes; the reconciler re-enqueues the build the state still wants
                warn!("restarted {MAX_RESTARTS} times in one job; the reconciler starts it again");
                Ok(())
            }
            (State::Waking { machine }, wakegate_core::lifecycle::JobKind::Wake) => {
                let Some(project) = self.store.get_project(&current.value.project_id).await? else {
                    return Ok(());
                };
                let kind = self.cloud.wake_kind(&project).as_str();
                let queued = now_ms().saturating_sub(current.value.state_since);
                metrics::histogram!(m::WAKE_PHASE_SECONDS, "phase" => "queued").record(queued as f64 / 1000.0);
                let began = std::time::Instant::now();
                let started = self.cloud.start(machine, &project).await;
                let took = began.elapsed().as_secs_f64();
                metrics::histogram!(m::WAKE_PHASE_SECONDS, "phase" => "start").record(took);
                let result = match &started {
                    Ok(Outcome::Ready(_)) => "ok",
                    // the machine reported itself: its state says how it went
                    Ok(Outcome::Reported) => match self.store.get_preview(id).await {
                        Ok(Some(p)) if matches!(p.value.state, State::Running { .. }) => "ok",
                        _ => "failed",
                    },
                    Err(_) => "failed",
                };
                metrics::histogram!(m::WAKE_SECONDS, "kind" => kind, "result" => result)
                    .record(took + queued as f64 / 1000.0);
                let event = match started {
                    Ok(Outcome::Ready(origin)) => Event::Ready { machine: machine.clone(), origin },
                    Ok(Outcome::Reported) => return Ok(()),
                    Err(CloudError::NotFound(_)) => Event::MachineLost {
                        machine: machine.clone(),
                        reason: "the machine disappeared while asleep".into(),
                    },
                    Err(e) => Event::BuildFailed { reason: e.to_string(), machine: Some(machine.clone()) },
                };
                self.event(id, event).await.map(|_| ())
            }
            (State::Stopping { machine, .. }, wakegate_core::lifecycle::JobKind::Sleep) => {
                let Some(project) = self.store.get_project(&current.value.project_id).await? else {
                    return Ok(());
                };
                let event = match self.cloud.stop(machine, &project).await {
                    Ok(()) => Event::Stopped,
                    Err(CloudError::NotFound(_)) => {
                        Event::MachineLost { machine: machine.clone(), reason: "the machine disappeared".into() }
                    }
                    Err(e) => return Err(ApplyError::Store(wakegate_store::StoreError::Backend(e.to_string()))),
                };
                self.event(id, event).await.map(|_| ())
            }
            (State::Erasing { .. }, wakegate_core::lifecycle::JobKind::Erase) => {
                // its logs go with the transition to erased (wakegate_store::stats::observe)
                self.drop_pull(id).await?;
                wakegate_db::Images::new(self.store.clone()).forget(id).await?;
                self.event(id, Event::MachinesDeleted).await.map(|_| ())
            }
            (State::Running { machine, .. }, wakegate_core::lifecycle::JobKind::PullDb) => {
                self.pull(id, machine, current.version).await
            }
            (State::Running { machine, .. }, wakegate_core::lifecycle::JobKind::RefreshDb) => {
                self.refresh(id, machine).await.map_err(ApplyError::Store)
            }
            (state, wakegate_core::lifecycle::JobKind::RefreshDb) => {
                let images = wakegate_db::Images::new(self.store.clone());
                let Some(r) = images.pending_refresh(id).await? else { return Ok(()) };
                let reason = format!("the preview is {}, not running: wake it and refresh again", state.as_str());
                images
                    .finish_refresh(id, &r.id, |r| {
                        (r.state, r.reason, r.finished_at) =
                            (wakegate_db::RefreshState::Failed, Some(reason.clone()), Some(now_ms()))
                    })
                    .await
                    .map_err(ApplyError::Store)
            }
            (state, wakegate_core::lifecycle::JobKind::PullDb) => {
                let reason = format!("the preview is {}, not running: wake it and pull again", state.as_str());
                match wakegate_db::Pulls::new(self.store.clone()).get(id).await? {
                    Some(p) if p.under_way() => self.finish_pull(id, &p, Err(reason)).await,
                    _ => Ok(()),
                }
            }
            // the state moved on since the job was queued: nothing to do
            _ => Ok(()),
        }
    }

    /// Dumps the preview's database into S3 for the pull asked for (`wakegate db pull`).
    /// A failure to read or record the pull fails the job (it is retried); a pull
    /// cut short by a crash is under way still, and its retried job dumps it again.
    async fn pull(&self, id: &str, machine: &MachineId, version: u64) -> Result<(), ApplyError> {
        let pulls = wakegate_db::Pulls::new(self.store.clone());
        let Some(pull) = pulls.get(id).await?.filter(|p| p.under_way()) else { return Ok(()) };
        let Some(bucket) = &self.dumps else {
            let reason = "this provisioner has no S3 settings (WAKEGATE_S3_*)".to_string();
            return self.finish_pull(id, &pull, Err(reason)).await;
        };
        let Some(pull) =
            pulls.edit(id, &pull.id, |p| p.state = wakegate_db::PullState::Dumping).await.map_err(record)?
        else {
            return Ok(());
        };
        info!(%machine, pull = %pull.id, "dumping the database");
        let runs_on = |s: &State| matches!(s, State::Running { machine: m, .. } if m == machine);
        let result = tokio::select! {
            r = self.cloud.pull_db(machine, bucket, &pull.key) => r.map_err(|e| e.to_string()),
            () = self.moved_on(id, version, runs_on) => Err("the preview stopped running during the dump".into()),
        };
        self.finish_pull(id, &pull, result).await
    }

    /// Records how a pull ended; a failed one leaves no object behind.
    async fn finish_pull(
        &self,
        id: &str,
        pull: &wakegate_db::Pull,
        result: Result<u64, String>,
    ) -> Result<(), ApplyError> {
        match &result {
            Ok(size) => info!(pull = %pull.id, size, "database pulled"),
            Err(reason) => {
                warn!(pull = %pull.id, %reason, "pulling the database failed");
                if let Some(bucket) = &self.dumps {
                    if let Err(e) = bucket.delete(&pull.key).await {
                        warn!(key = %pull.key, error = %e, "removing a failed pull's object failed");
                    }
                }
            }
        }
        wakegate_db::Pulls::new(self.store.clone())
            .edit(id, &pull.id, |p| {
                p.finished_at = Some(now_ms());
                match &result {
                    Ok(size) => (p.state, p.size) = (wakegate_db::PullState::Ready, *size),
                    Err(reason) => (p.state, p.reason) = (wakegate_db::PullState::Failed, Some(reason.clone())),
                }
            })
            .await
            .map_err(record)?;
        Ok(())
    }

    /// An erased preview's pull goes with it, its object too.
    async fn drop_pull(&self, id: &str) -> Result<(), ApplyError> {
        let pulls = wakegate_db::Pulls::new(self.store.clone());
        let Some(pull) = pulls.get(id).await? else { return Ok(()) };
        if let Some(bucket) = &self.dumps {
            if let Err(e) = bucket.delete(&pull.key).await {
                warn!(key = %pull.key, error = %e, "removing an erased preview's pulled database failed");
            }
        }
        match pulls.swap(id, Some(&pull), None).await {
            Ok(()) | Err(wakegate_db::RecordError::Conflict) => Ok(()),
            Err(e) => Err(record(e)),
        }
    }

    /// Returns once the preview no longer builds on `machine` (a restart, an erase, a
    /// finished build): the attempt's work is not wanted any more.
    async fn abandoned(&self, id: &str, machine: &MachineId, after: u64) {
        let ours = |s: &State| matches!(s, State::Building { machine: Some(m), restart: false, .. } if m == machine);
        self.moved_on(id, after, ours).await
    }

    /// Returns once the preview's state (newer than version `after`) is no longer `ours`.
    async fn moved_on(&self, id: &str, mut after: u64, ours: impl Fn(&State) -> bool) {
        loop {
            match self.store.wait_preview(id, after, std::time::Duration::from_secs(30)).await {
                Ok(Some(p)) => {
                    if !ours(&p.value.state) {
                        return;
                    }
                    after = p.version;
                }
                Ok(None) => return,
                // the store is down: keep building; the outcome is checked when applied
                Err(_) => tokio::time::sleep(std::time::Duration::from_secs(1)).await,
            }
        }
    }

    async fn build(&self, preview: &wakegate_core::route::Preview) -> Result<(), ApplyError> {
        let id = preview.id.as_str();
        let Some(project) = self.store.get_project(&preview.project_id).await? else {
            return self
                .event(id, Event::BuildFailed { reason: "the project no longer exists".into(), machine: None })
                .await
                .map(|_| ());
        };
        // a build retried after a crash goes on with the machine it already recorded; a
        // restarted one gets a new machine (whose assignment deletes the old)
        let (machine, version) = match &preview.state {
            State::Building { machine: Some(m), restart: false, .. } => {
                let version = self.store.get_preview(id).await?.map(|p| p.version).unwrap_or(0);
                (m.clone(), version)
            }
            _ => {
                let machine = match self.cloud.create(preview, &project).await {
                    Ok(m) => m,
                    Err(e) => {
                        let failed = Event::BuildFailed { reason: e.to_string(), machine: None };
                        return self.event(id, failed).await.map(|_| ());
                    }
                };
                info!(%machine, "machine assigned");
                let assigned = self.event(id, Event::MachineAssigned { machine: machine.clone() }).await?;
                if assigned.stale {
                    return Ok(());
                }
                (machine, assigned.preview.version)
            }
        };
        let git_auth = match git_auth(&project) {
            Ok(a) => a,
            Err(reason) => {
                let failed = Event::BuildFailed { reason, machine: Some(machine) };
                return self.event(id, failed).await.map(|_| ());
            }
        };
        let dump = match dump_source(&self.store, self.dumps.as_ref(), preview, DUMP_URL_TTL).await {
            Ok(d) => d,
            Err(reason) => {
                let failed = Event::BuildFailed { reason, machine: Some(machine) };
                return self.event(id, failed).await.map(|_| ());
            }
        };
        let (images, baking) = if dump.is_some() { self.offered_images(preview).await } else { (Vec::new(), false) };
        let spec = DeploySpec {
            dump,
            images,
            baking,
            git_auth,
            preview_id: id.to_string(),
            git_url: project.git_url.clone(),
            git_ref: preview.git_ref.clone(),
            preview_url: self.settings.preview_url_template.replace("{label}", &preview.label),
            preview_urls: wakegate_core::route::preview_urls(
                &self.settings.preview_url_template,
                &preview.label,
                &preview.custom_hosts,
            ),
            project,
        };
        let progress = StoreProgress {
            p: self,
            preview: id,
            project_id: &preview.project_id,
            on_base: preview.dump.is_none(),
            how: Default::default(),
        };
        let deploy = self.cloud.deploy(&machine, &spec, &progress);
        let result = tokio::select! {
            r = deploy => r,
            // a push (or an erase) took the build off this machine: stop at once; the
            // machine is deleted by whoever moved on (the next assignment, the erase)
            () = self.abandoned(id, &machine, version) => {
                info!(%machine, "build abandoned: the preview moved on");
                return Ok(());
            }
        };
        let event = match result {
            Ok(Outcome::Ready(origin)) => Event::Ready { machine, origin },
            Ok(Outcome::Reported) => return Ok(()),
            // tied to the machine: if a rebuild or an erase has moved on, it is stale
            Err(e) => Event::BuildFailed { reason: e.to_string(), machine: Some(machine) },
        };
        self.event(id, event).await.map(|_| ())
    }
}
