//! The machine-making trait the provisioner drives.

use async_trait::async_trait;
use wakegate_core::lifecycle::{MachineId, Phase};
use wakegate_core::route::{Preview, Project};
use wakegate_core::Millis;

/// What to deploy on a machine.
#[derive(Clone, Debug)]
pub struct DeploySpec {
    pub preview_id: String,
    pub git_url: String,
    pub git_ref: String,
    pub preview_url: String,
    /// The default URL and one per custom name (the app's `PREVIEW_URLS`).
    pub preview_urls: Vec<String>,
    pub project: Project,
    /// A private repository's credentials (the project's forge token).
    pub git_auth: Option<crate::git::GitAuth>,
    /// The dump the preview's database is filled from, when the project has one.
    pub dump: Option<DumpSource>,
    /// Ready images of that dump: the build clones the one whose recipe is its own.
    pub images: Vec<ImageSource>,
    /// Whether an image of the dump is being baked (an import says so).
    pub baking: bool,
}

/// A database image a build may clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSource {
    pub id: String,
    /// The digest of the recipe it was baked with: only a build with the same recipe
    /// clones it.
    pub recipe_digest: String,
    /// Where the backend keeps it (a directory, a snapshot id).
    pub location: String,
    pub dump_id: String,
}

/// A bake: import `dump` the `recipe`'s way into a stopped data directory.
#[derive(Clone, Debug)]
pub struct BakeOrder {
    pub image_id: String,
    /// Names this attempt (its worker and number): its work is its own.
    pub attempt: String,
    pub project: Project,
    pub recipe: wakegate_db::Recipe,
    pub dump: DumpSource,
}

/// What a bake made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Baked {
    pub location: String,
    pub size: u64,
    /// The engine's version (`postgres (PostgreSQL) 15.8`).
    pub version: String,
}

/// How a preview's database was made: its recipe (recorded so the project's image can
/// be baked), and the image and method.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DbMade {
    /// `None` when it cannot be baked (a sanitize file too big to keep).
    pub recipe: Option<wakegate_db::Recipe>,
    pub dump_id: Option<String>,
    pub image: Option<String>,
    pub method: wakegate_db::CloneMethod,
    pub took_ms: u64,
}

/// Where a build downloads a dump from: a short-lived presigned URL, never the
/// bucket's credentials.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct DumpSource {
    pub id: String,
    pub engine: wakegate_db::Engine,
    pub url: String,
    pub size: u64,
    pub gzip: bool,
}

/// A machine as the backend sees it (labels are the ground truth for what exists).
#[derive(Clone, Debug, PartialEq)]
pub struct MachineInfo {
    pub id: MachineId,
    pub preview_id: String,
    pub created_at: Millis,
    /// Held by the backend itself (a ready machine in a pool): not an orphan.
    pub held: bool,
    /// What the cloud says it is doing (`running`, `off`, `snapshot`, …).
    pub status: String,
    /// What it costs per hour, estimated from the cloud's prices (0 when free).
    pub hourly_cost: f64,
}

/// Every machine a backend manages, and what finding out cost.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Listing {
    pub machines: Vec<MachineInfo>,
    /// Cloud API requests the listing made (0 for a local backend); the reconciler
    /// paces listings by it.
    pub requests: u32,
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
    /// How far the current phase is (bytes of a dump restored); shown on the splash.
    async fn detail(&self, _done: u64, _total: u64) {}
    /// How the database is being made (shown with the bytes).
    async fn restoring(&self, _how: wakegate_core::route::Restore) {}
    /// The preview's database is made.
    async fn database(&self, _made: DbMade) {}
}

/// How a wake starts a preview again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WakeKind {
    /// Processes start again on a host that is up, their build and data on its disk
    /// (the local backend).
    Warm,
    /// A stopped server powers on with its disk.
    Resume,
    /// A server is created again from its hibernation snapshot.
    Cold,
}

impl WakeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WakeKind::Warm => "warm",
            WakeKind::Resume => "resume",
            WakeKind::Cold => "cold",
        }
    }
}

/// How a deploy or start ended when it did not fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Healthy at this origin: the job reports it.
    Ready(String),
    /// The machine reported its outcome to the control plane itself (ready or failed),
    /// and the preview's state already says so.
    Reported,
}

#[async_trait]
pub trait Cloud: Send + Sync + 'static {
    /// Picks the machine a preview will run on: a ready one from a pool, or a new id.
    /// It returns before anything slow happens, so the id is recorded at once.
    async fn create(&self, preview: &Preview, project: &Project) -> Result<MachineId, CloudError>;
    /// Makes sure the machine exists, then checks out, builds and starts the preview.
    /// Safe to call again for the same machine after a crash.
    async fn deploy(
        &self,
        machine: &MachineId,
        spec: &DeploySpec,
        progress: &dyn Progress,
    ) -> Result<Outcome, CloudError>;
    /// How this backend wakes a preview of `project` (the wake metrics' `kind`).
    fn wake_kind(&self, project: &Project) -> WakeKind;
    /// Starts a sleeping machine again.
    async fn start(&self, machine: &MachineId, project: &Project) -> Result<Outcome, CloudError>;
    /// Puts a machine to sleep the project's way, keeping what it needs to start again.
    async fn stop(&self, machine: &MachineId, project: &Project) -> Result<(), CloudError>;
    /// Deletes a machine and everything on it. Deleting a missing machine succeeds.
    async fn delete(&self, machine: &MachineId) -> Result<(), CloudError>;
    /// Every machine this backend manages.
    async fn list(&self) -> Result<Listing, CloudError>;
    /// Dumps the machine's database as `.sql.gz` into `bucket` at `key` (`wakegate db
    /// pull`); returns the bytes written. The machine must be running.
    async fn pull_db(
        &self,
        _machine: &MachineId,
        _bucket: &wakegate_db::s3::Bucket,
        _key: &str,
    ) -> Result<u64, CloudError> {
        Err(CloudError::Failed("this backend keeps no preview databases".into()))
    }
    /// Bakes a database image. A bake cut short leaves what [`Cloud::drop_image`]
    /// removes; it is never ready.
    async fn bake_image(&self, _order: &BakeOrder) -> Result<Baked, CloudError> {
        Err(CloudError::Failed("this backend keeps no database images".into()))
    }
    /// Removes an image and whatever a bake of it left (a missing one is fine). `false`
    /// when a clone holds it right now: ask again later.
    async fn drop_image(&self, _id: &str, _location: &str) -> Result<bool, CloudError> {
        Ok(true)
    }
    /// The ids of the images this backend holds, whole or being baked (what a crash
    /// may have left without a record is found here).
    async fn images(&self) -> Result<Vec<String>, CloudError> {
        Ok(Vec::new())
    }
    /// Makes a running machine's database again, from the image among `images` that
    /// fits (else from `dump`, imported), without rebuilding or stopping the app.
    async fn refresh_db(
        &self,
        _machine: &MachineId,
        _images: &[ImageSource],
        _dump: Option<&DumpSource>,
    ) -> Result<DbMade, CloudError> {
        Err(CloudError::Failed("this backend keeps no preview databases".into()))
    }
    /// Bytes a machine's database differs from the image it was cloned from; `None`
    /// when it was not cloned, or this backend cannot tell.
    async fn db_diverged(&self, _machine: &MachineId) -> Result<Option<u64>, CloudError> {
        Ok(None)
    }
    /// Which of these running machines' apps have died, with the reason. Backends whose
    /// machines report for themselves (an agent) answer none.
    async fn dead(&self, _machines: &[MachineId]) -> Result<Vec<(MachineId, String)>, CloudError> {
        Ok(Vec::new())
    }
}
