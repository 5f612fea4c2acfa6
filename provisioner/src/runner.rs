//! The job loop: claim, do, report, complete.

use crate::cloud::{Cloud, CloudError, DeploySpec, Outcome, Progress};
use crate::{now_ms, Settings};
use async_trait::async_trait;
use std::sync::Arc;
use tracing::{info, instrument, warn};
use wakegate_core::lifecycle::{Event, MachineId, Phase, State};
use wakegate_store::driver::{apply, Applied, ApplyError};
use wakegate_store::{Lease, SharedStore};

/// Most jobs run at once by one provisioner.
pub const MAX_CONCURRENT_JOBS: usize = 8;

pub struct Provisioner {
    pub store: SharedStore,
    pub cloud: Arc<dyn Cloud>,
    pub settings: Settings,
    pub worker: String,
}

struct StoreProgress<'a> {
    p: &'a Provisioner,
    preview: &'a str,
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
}

impl Provisioner {
    pub fn new(store: SharedStore, cloud: Arc<dyn Cloud>, settings: Settings) -> Provisioner {
        let worker = wakegate_store::new_id("w-");
        Provisioner { store, cloud, settings, worker }
    }

    /// Claims and runs jobs until `stop` turns true.
    pub async fn run_jobs(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_JOBS));
        loop {
            if *stop.borrow() {
                return;
            }
            let permit = slots.clone().acquire_owned().await.expect("semaphore open");
            match self.store.claim(&self.worker, self.settings.lease, now_ms()).await {
                Ok(Some(lease)) => {
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
    /// failed (then the lease runs out and the job is retried).
    pub async fn run_job(&self, lease: Lease) {
        let renew = {
            let store = self.store.clone();
            let lease = lease.clone();
            let every = self.settings.lease / 3;
            let duration = self.settings.lease;
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = store.renew(&lease, duration, now_ms()).await {
                        warn!(job = %lease.job_id, error = %e, "lease renewal failed");
                    }
                }
            })
        };
        let result = self.handle(&lease).await;
        renew.abort();
        match result {
            Ok(()) => {
                if let Err(e) = self.store.complete(&lease).await {
                    warn!(job = %lease.job_id, error = %e, "completing job failed");
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
            (State::Building { .. }, wakegate_core::lifecycle::JobKind::Build) => self.build(&current.value).await,
            (State::Waking { machine }, wakegate_core::lifecycle::JobKind::Wake) => {
                let Some(project) = self.store.get_project(&current.value.project_id).await? else {
                    return Ok(());
                };
                let event = match self.cloud.start(machine, &project).await {
                    Ok(Outcome::Ready(origin)) => Event::Ready { machine: machine.clone(), origin },
                    Ok(Outcome::Reported) => return Ok(()),
                    Err(CloudError::NotFound(_)) => Event::MachineLost {
                        machine: machine.clone(),
                        reason: "the machine disappeared while asleep".into(),
                    },
                    Err(e) => Event::BuildFailed { reason: e.to_string() },
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
                self.event(id, Event::MachinesDeleted).await.map(|_| ())
            }
            // the state moved on since the job was queued: nothing to do
            _ => Ok(()),
        }
    }

    async fn build(&self, preview: &wakegate_core::route::Preview) -> Result<(), ApplyError> {
        let id = preview.id.as_str();
        let Some(project) = self.store.get_project(&preview.project_id).await? else {
            return self
                .event(id, Event::BuildFailed { reason: "the project no longer exists".into() })
                .await
                .map(|_| ());
        };
        // a build retried after a crash goes on with the machine it already recorded
        let machine = match &preview.state {
            State::Building { machine: Some(m), .. } => m.clone(),
            _ => {
                let machine = match self.cloud.create(preview, &project).await {
                    Ok(m) => m,
                    Err(e) => return self.event(id, Event::BuildFailed { reason: e.to_string() }).await.map(|_| ()),
                };
                info!(%machine, "machine assigned");
                let assigned = self.event(id, Event::MachineAssigned { machine: machine.clone() }).await?;
                if assigned.stale {
                    return Ok(());
                }
                machine
            }
        };
        let spec = DeploySpec {
            preview_id: id.to_string(),
            git_url: project.git_url.clone(),
            git_ref: preview.git_ref.clone(),
            preview_url: self.settings.preview_url_template.replace("{label}", &preview.label),
            project,
        };
        let event = match self.cloud.deploy(&machine, &spec, &StoreProgress { p: self, preview: id }).await {
            Ok(Outcome::Ready(origin)) => Event::Ready { machine, origin },
            Ok(Outcome::Reported) => return Ok(()),
            Err(e) => Event::BuildFailed { reason: e.to_string() },
        };
        self.event(id, event).await.map(|_| ())
    }
}
