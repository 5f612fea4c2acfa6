//! Preview databases: the engines, the dumps a project keeps in S3 and their records in
//! the store, and the checks a dump passes before anything imports it.
//!
//! * [`s3::Bucket`] — the dumps' bucket (aws-sdk-s3; any S3-compatible store): multipart
//!   uploads through presigned part URLs (the CLI sends the bytes straight to S3),
//!   streamed reads, presigned downloads for builds;
//! * [`check::Checker`] — SHA-256, gzip and SQL checks over a stream;
//! * [`Dumps`] — the records: every dump of a project, and which one is its base.
#![forbid(unsafe_code)]

pub mod check;
pub mod image;
pub mod s3;

pub use image::{CloneMethod, Image, ImageState, ImageUse, Images, Recipe, Refresh, RefreshState};

use serde::{Deserialize, Serialize};
use wakegate_core::Millis;
use wakegate_store::{SharedStore, StoreError};

/// A database engine previews can have.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Engine {
    Postgres,
    /// MariaDB (and what speaks MySQL's protocol).
    #[serde(alias = "mysql")]
    Mariadb,
}

impl Engine {
    pub fn as_str(self) -> &'static str {
        match self {
            Engine::Postgres => "postgres",
            Engine::Mariadb => "mariadb",
        }
    }

    pub fn parse(s: &str) -> Option<Engine> {
        match s.trim().to_ascii_lowercase().as_str() {
            "postgres" | "postgresql" | "pg" => Some(Engine::Postgres),
            "mariadb" | "mysql" => Some(Engine::Mariadb),
            _ => None,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Engine::Postgres => "PostgreSQL",
            Engine::Mariadb => "MariaDB",
        }
    }
}

/// Where a dump is in its life.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DumpState {
    /// Parts are arriving in S3.
    Uploading,
    /// Whole in S3; being read back and checked.
    Verifying,
    /// Checked and whole: it can be a base or go into a preview.
    Ready,
    /// Refused; the object was deleted.
    Rejected,
}

/// One dump of a project.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    pub id: String,
    pub project_id: String,
    pub engine: Engine,
    /// What the pusher called it (a file name, or `-` for stdin).
    pub name: String,
    /// The object's key in the bucket.
    pub key: String,
    /// The multipart upload, while uploading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload_id: Option<String>,
    pub state: DumpState,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Of the object (compressed when it is).
    pub size: u64,
    pub sha256: String,
    pub gzip: bool,
    pub sql_bytes: u64,
    pub created_at: Millis,
    /// Pushed for one preview only (`--target`), not as a base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// What the pusher says it sent (checked against what S3 holds).
    #[serde(default)]
    pub claimed: Option<Claim>,
    /// Bytes checked so far, and when the checker last said so (a checker that stopped
    /// saying is taken over).
    #[serde(default)]
    pub verified: u64,
    #[serde(default)]
    pub heartbeat: Millis,
    /// Whether it became the base (or went into its target) once ready: a crash in
    /// between is finished by the next completion call.
    #[serde(default)]
    pub applied: bool,
}

/// The size and digest a pusher computed while sending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub size: u64,
    pub sha256: String,
}

impl Dump {
    pub fn new(project_id: &str, engine: Engine, name: &str, prefix: &str, now: Millis) -> Dump {
        let id = wakegate_store::new_id("d-");
        let key = format!("{prefix}dumps/{project_id}/{id}");
        Dump {
            id,
            project_id: project_id.to_string(),
            engine,
            name: name.to_string(),
            key,
            upload_id: None,
            state: DumpState::Uploading,
            reason: None,
            size: 0,
            sha256: String::new(),
            gzip: false,
            sql_bytes: 0,
            created_at: now,
            target: None,
            claimed: None,
            verified: 0,
            heartbeat: 0,
            applied: false,
        }
    }
}

const DUMPS: &str = "db-dumps";
const BASES: &str = "db-base";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the record changed meanwhile; try again")]
    Conflict,
}

/// The records of dumps, in the store's tables (`db-dumps`, `db-base`).
#[derive(Clone)]
pub struct Dumps {
    store: SharedStore,
}

fn row(project_id: &str, id: &str) -> String {
    format!("{project_id}/{id}")
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), reason: e.to_string() }
}

/// The JSON record at `table`/`key`, if any; one that cannot be read is `Corrupt`.
async fn get_json<T: serde::de::DeserializeOwned>(
    store: &SharedStore,
    table: &str,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match store.table_get(table, key).await? {
        Some(raw) => Ok(Some(serde_json::from_str(&raw).map_err(|e| corrupt(key, e))?)),
        None => Ok(None),
    }
}

impl Dumps {
    pub fn new(store: SharedStore) -> Dumps {
        Dumps { store }
    }

    pub async fn get(&self, project_id: &str, id: &str) -> Result<Option<Dump>, StoreError> {
        get_json(&self.store, DUMPS, &row(project_id, id)).await
    }

    /// Writes a new record.
    pub async fn create(&self, d: &Dump) -> Result<(), RecordError> {
        let raw = serde_json::to_string(d).expect("serializable");
        if !self.store.table_swap(DUMPS, &row(&d.project_id, &d.id), None, Some(&raw)).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    /// Replaces `old` with `new` if the record still is `old`.
    pub async fn update(&self, old: &Dump, new: &Dump) -> Result<(), RecordError> {
        let (a, b) =
            (serde_json::to_string(old).expect("serializable"), serde_json::to_string(new).expect("serializable"));
        if !self.store.table_swap(DUMPS, &row(&old.project_id, &old.id), Some(&a), Some(&b)).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    pub async fn remove(&self, d: &Dump) -> Result<bool, StoreError> {
        self.store.table_remove(DUMPS, &row(&d.project_id, &d.id)).await
    }

    /// A project's dumps, newest first. A record that cannot be read is skipped and
    /// logged, never fatal to the listing.
    pub async fn list(&self, project_id: &str) -> Result<Vec<Dump>, StoreError> {
        let prefix = format!("{project_id}/");
        let mut out: Vec<Dump> = Vec::new();
        for (k, v) in self.store.table_list(DUMPS).await? {
            if !k.starts_with(&prefix) {
                continue;
            }
            match serde_json::from_str(&v) {
                Ok(d) => out.push(d),
                Err(e) => tracing::warn!(key = %k, error = %e, "skipping a dump record that cannot be read"),
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    /// The id of the project's base dump.
    pub async fn base_id(&self, project_id: &str) -> Result<Option<String>, StoreError> {
        self.store.table_get(BASES, project_id).await
    }

    /// The project's base dump.
    pub async fn base(&self, project_id: &str) -> Result<Option<Dump>, StoreError> {
        match self.base_id(project_id).await? {
            Some(id) => self.get(project_id, &id).await,
            None => Ok(None),
        }
    }

    /// Makes `id` the base if the base is still `expected`.
    pub async fn set_base(&self, project_id: &str, expected: Option<&str>, id: &str) -> Result<(), RecordError> {
        if !self.store.table_swap(BASES, project_id, expected, Some(id)).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }
}

/// Where a pull is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullState {
    /// Asked for; the provisioner has not started yet.
    Pending,
    /// The database is being dumped into S3.
    Dumping,
    /// In S3 at `key`, for the asker to download.
    Ready,
    Failed,
}

/// A copy of a preview's database on its way out as `.sql.gz` (`wakegate db pull`):
/// the provisioner dumps the database into S3 at `key`, the CLI downloads it through a
/// presigned URL and then removes it. One per preview at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pull {
    pub id: String,
    pub preview: String,
    pub key: String,
    pub state: PullState,
    /// Bytes of `.sql.gz` written so far (all of them once ready).
    #[serde(default)]
    pub size: u64,
    #[serde(default)]
    pub reason: Option<String>,
    pub created_at: Millis,
    #[serde(default)]
    pub finished_at: Option<Millis>,
}

impl Pull {
    pub fn new(preview: &str, prefix: &str, now: Millis) -> Pull {
        let id = wakegate_store::new_id("p-");
        let key = format!("{prefix}pulls/{preview}/{id}.sql.gz");
        Pull {
            id,
            preview: preview.to_string(),
            key,
            state: PullState::Pending,
            size: 0,
            reason: None,
            created_at: now,
            finished_at: None,
        }
    }

    /// Whether it is still to come (not ready, not failed).
    pub fn under_way(&self) -> bool {
        matches!(self.state, PullState::Pending | PullState::Dumping)
    }
}

const PULLS: &str = "db-pulls";

/// The records of pulls, one per preview (`db-pulls`).
#[derive(Clone)]
pub struct Pulls {
    store: SharedStore,
}

impl Pulls {
    pub fn new(store: SharedStore) -> Pulls {
        Pulls { store }
    }

    pub async fn get(&self, preview: &str) -> Result<Option<Pull>, StoreError> {
        get_json(&self.store, PULLS, preview).await
    }

    /// Replaces the preview's pull if it still is `old` (`None`: there was none).
    pub async fn swap(&self, preview: &str, old: Option<&Pull>, new: Option<&Pull>) -> Result<(), RecordError> {
        let a = old.map(|p| serde_json::to_string(p).expect("serializable"));
        let b = new.map(|p| serde_json::to_string(p).expect("serializable"));
        if !self.store.table_swap(PULLS, preview, a.as_deref(), b.as_deref()).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    /// Applies `f` to the preview's pull `id`, if it still is that pull; retried on a
    /// concurrent change. Returns the pull as written.
    pub async fn edit(&self, preview: &str, id: &str, f: impl Fn(&mut Pull)) -> Result<Option<Pull>, RecordError> {
        let edited = wakegate_store::edit_record(self.store.as_ref(), PULLS, preview, |mut p: Pull| {
            (p.id == id).then(|| {
                f(&mut p);
                p
            })
        })
        .await;
        match edited {
            Err(StoreError::Conflict) => Err(RecordError::Conflict),
            r => Ok(r?),
        }
    }
}
