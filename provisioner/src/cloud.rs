//! The machine-making trait the provisioner drives.

use async_trait::async_trait;
use wakegate_core::lifecycle::{MachineId, Phase};
use wakegate_core::Millis;

/// What to deploy on a machine.
#[derive(Clone, Debug)]
pub struct DeploySpec {
    pub preview_id: String,
    pub git_url: String,
    pub git_ref: String,
    pub preview_url: String,
}

/// A machine as the backend sees it (labels are the ground truth for what exists).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineInfo {
    pub id: MachineId,
    pub preview_id: String,
    pub created_at: Millis,
}

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    /// The work failed in a way a user can act on (bad ref, build error, health timeout).
    #[error("{0}")]
    Failed(String),
    #[error("machine {0} does not exist")]
    NotFound(MachineId),
    /// The backend itself failed; retrying may help.
    #[error("backend: {0}")]
    Backend(String),
}

/// Progress callback for builds: returns false when the build is no longer wanted.
#[async_trait]
pub trait Progress: Send + Sync {
    async fn phase(&self, phase: Phase) -> bool;
}

#[async_trait]
pub trait Cloud: Send + Sync + 'static {
    /// Makes a new, empty machine for a preview. Its id is returned at once so it can be
    /// recorded before anything slow happens.
    async fn create(&self, preview_id: &str) -> Result<MachineId, CloudError>;
    /// Checks out, builds and starts the preview; returns its origin once healthy.
    async fn deploy(
        &self,
        machine: &MachineId,
        spec: &DeploySpec,
        progress: &dyn Progress,
    ) -> Result<String, CloudError>;
    /// Starts a sleeping machine again; returns its origin once healthy.
    async fn start(&self, machine: &MachineId) -> Result<String, CloudError>;
    /// Stops a machine, keeping what it needs to start again.
    async fn stop(&self, machine: &MachineId) -> Result<(), CloudError>;
    /// Deletes a machine and everything on it. Deleting a missing machine succeeds.
    async fn delete(&self, machine: &MachineId) -> Result<(), CloudError>;
    /// Every machine this backend manages.
    async fn list(&self) -> Result<Vec<MachineInfo>, CloudError>;
}
