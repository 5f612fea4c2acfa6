//! Database images: a project's base dump baked once into a stopped data directory (the
//! local backend) or a server snapshot (Hetzner), which every new preview of the
//! project clones instead of importing the dump again.
//!
//! * [`Recipe`] — what a preview's `wakegate.toml` asks of its database (engine, name,
//!   the sanitize SQL): builds record it, and an image is baked for a (dump, recipe);
//! * [`Image`] — one image and where it is in its life (`baking` → `ready`, or
//!   `failed`), with the worker baking it and its heartbeat, so a bake whose provisioner
//!   died is taken over and whatever it left is removed;
//! * [`ImageUse`] — which image a preview's database was cloned from, how, and how far
//!   it has diverged since: an image is collected only once nothing uses it.

use crate::{get_json, Engine, RecordError};
use serde::{Deserialize, Serialize};
use wakegate_core::Millis;
use wakegate_store::{SharedStore, StoreError};

/// Longest sanitize file an image is baked with; a project with a bigger one imports.
pub const MAX_SANITIZE: usize = 1 << 20;

/// What a preview's database is made of besides its dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipe {
    pub engine: Engine,
    /// The database's name (`[database] name`).
    pub name: String,
    /// The sanitize SQL run after the import, `None` when the project opted out.
    #[serde(default)]
    pub sanitize: Option<String>,
}

impl Recipe {
    /// A digest of everything that goes into an image besides the dump.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.engine.as_str());
        h.update([0]);
        h.update(&self.name);
        h.update([0]);
        match &self.sanitize {
            Some(sql) => {
                h.update([1]);
                h.update(sql);
            }
            None => h.update([0]),
        }
        hex::encode(&h.finalize()[..16])
    }

    /// The id of the image of `dump_sha256` made this way.
    pub fn image_id(&self, dump_sha256: &str) -> String {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(dump_sha256);
        h.update([0]);
        h.update(self.digest());
        format!("i-{}", hex::encode(&h.finalize()[..8]))
    }
}

/// Where an image is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageState {
    /// A worker is importing the dump (its heartbeat says it still is).
    Baking,
    /// Baked whole and stopped cleanly: previews clone it.
    Ready,
    /// The bake failed; previews import the dump. A new base or recipe bakes again.
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Baking => "baking",
            ImageState::Ready => "ready",
            ImageState::Failed => "failed",
        }
    }
}

/// One database image of a project.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    pub id: String,
    pub project_id: String,
    pub dump_id: String,
    /// The dump's SHA-256 (what the image is labelled with).
    pub dump_sha256: String,
    pub recipe: Recipe,
    pub state: ImageState,
    /// The engine's version it was baked with (`postgres (PostgreSQL) 15.8`).
    #[serde(default)]
    pub version: String,
    /// Where it is: a directory (local) or a snapshot id (Hetzner).
    #[serde(default)]
    pub location: String,
    /// Bytes on disk (the data directory, or the snapshot's size).
    #[serde(default)]
    pub size: u64,
    pub created_at: Millis,
    #[serde(default)]
    pub ready_at: Option<Millis>,
    /// How long the bake took, once ready.
    #[serde(default)]
    pub bake_ms: Option<u64>,
    /// The worker baking it, and when it last said it still is.
    #[serde(default)]
    pub worker: String,
    #[serde(default)]
    pub heartbeat: Millis,
    /// Bakes started for it (a taken-over bake is a second attempt).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default)]
    pub reason: Option<String>,
}

/// How a preview's database was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneMethod {
    /// The image's files cloned by reflink (copy-on-write: XFS, btrfs).
    Reflink,
    /// The image's files copied (a filesystem without reflink).
    Copy,
    /// The server was created from the image's snapshot (Hetzner).
    Snapshot,
    /// The dump imported (no image was ready).
    Import,
}

impl CloneMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CloneMethod::Reflink => "reflink",
            CloneMethod::Copy => "copy",
            CloneMethod::Snapshot => "snapshot",
            CloneMethod::Import => "import",
        }
    }
}

/// Which image a preview's database came from, and how it is doing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUse {
    /// `None` when it was imported from the dump.
    #[serde(default)]
    pub image: Option<String>,
    pub method: CloneMethod,
    /// The dump it holds.
    #[serde(default)]
    pub dump_id: Option<String>,
    /// When the database was made (cloned or imported), and how long it took.
    pub at: Millis,
    pub took_ms: u64,
    /// Bytes that differ from the image, when last measured (a clone only).
    #[serde(default)]
    pub diverged: Option<u64>,
    #[serde(default)]
    pub measured_at: Option<Millis>,
}

/// Where a refresh of a preview's data is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshState {
    Pending,
    Done,
    Failed,
}

impl RefreshState {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshState::Pending => "pending",
            RefreshState::Done => "done",
            RefreshState::Failed => "failed",
        }
    }
}

/// A preview's data made again from its image (`wakegate db refresh`), one at a time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refresh {
    pub id: String,
    pub state: RefreshState,
    pub asked_at: Millis,
    #[serde(default)]
    pub finished_at: Option<Millis>,
    #[serde(default)]
    pub method: Option<CloneMethod>,
    #[serde(default)]
    pub took_ms: Option<u64>,
    #[serde(default)]
    pub reason: Option<String>,
}

const IMAGES: &str = "db-images";
const REFRESHES: &str = "db-refreshes";
const RECIPES: &str = "db-recipes";
const USES: &str = "db-image-uses";

fn row(project_id: &str, id: &str) -> String {
    format!("{project_id}/{id}")
}

/// The records of images, recipes and uses, in the store's tables.
#[derive(Clone)]
pub struct Images {
    store: SharedStore,
}

fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("records of strings and numbers serialize")
}

impl Images {
    pub fn new(store: SharedStore) -> Images {
        Images { store }
    }

    pub async fn get(&self, project_id: &str, id: &str) -> Result<Option<Image>, StoreError> {
        get_json(&self.store, IMAGES, &row(project_id, id)).await
    }

    /// Every image (of one project, when given), newest first; a record that cannot be
    /// read is skipped and logged.
    pub async fn list(&self, project_id: Option<&str>) -> Result<Vec<Image>, StoreError> {
        let prefix = project_id.map(|p| format!("{p}/"));
        let mut out: Vec<Image> = Vec::new();
        for (k, v) in self.store.table_list(IMAGES).await? {
            if prefix.as_ref().is_some_and(|p| !k.starts_with(p.as_str())) {
                continue;
            }
            match serde_json::from_str(&v) {
                Ok(i) => out.push(i),
                Err(e) => tracing::warn!(key = %k, error = %e, "skipping an image record that cannot be read"),
            }
        }
        out.sort_by(|a, b| b.created_at.cmp(&a.created_at).then_with(|| b.id.cmp(&a.id)));
        Ok(out)
    }

    /// Writes a new record; `Conflict` when one with its id exists.
    pub async fn create(&self, i: &Image) -> Result<(), RecordError> {
        if !self.store.table_swap(IMAGES, &row(&i.project_id, &i.id), None, Some(&to_json(i))).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    /// Replaces `old` with `new` if the record still is `old`.
    pub async fn update(&self, old: &Image, new: &Image) -> Result<(), RecordError> {
        let key = row(&old.project_id, &old.id);
        if !self.store.table_swap(IMAGES, &key, Some(&to_json(old)), Some(&to_json(new))).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    /// Rewrites an image's record with what `f` makes of it (`None` leaves it), by
    /// compare and swap; the record as written.
    pub async fn edit(
        &self,
        project_id: &str,
        id: &str,
        f: impl Fn(Image) -> Option<Image>,
    ) -> Result<Option<Image>, StoreError> {
        wakegate_store::edit_record(self.store.as_ref(), IMAGES, &row(project_id, id), f).await
    }

    /// Removes `old` if the record still is `old`.
    pub async fn remove(&self, old: &Image) -> Result<(), RecordError> {
        if !self.store.table_swap(IMAGES, &row(&old.project_id, &old.id), Some(&to_json(old)), None).await? {
            return Err(RecordError::Conflict);
        }
        Ok(())
    }

    /// The project's current image, once ready: its base dump baked with the recipe its
    /// newest build recorded.
    pub async fn current(&self, project_id: &str) -> Result<Option<Image>, StoreError> {
        let Some(base) = crate::Dumps::new(self.store.clone()).base(project_id).await? else { return Ok(None) };
        let Some(recipe) = self.recipe(project_id).await? else { return Ok(None) };
        let id = recipe.image_id(&base.sha256);
        Ok(self.get(project_id, &id).await?.filter(|i| i.state == ImageState::Ready))
    }

    /// The recipe a project's newest build recorded.
    pub async fn recipe(&self, project_id: &str) -> Result<Option<Recipe>, StoreError> {
        get_json(&self.store, RECIPES, project_id).await
    }

    /// Records the recipe of a project's newest build; `true` when it changed.
    pub async fn set_recipe(&self, project_id: &str, r: &Recipe) -> Result<bool, StoreError> {
        if self.recipe(project_id).await?.as_ref() == Some(r) {
            return Ok(false);
        }
        self.store.table_put(RECIPES, project_id, &to_json(r)).await?;
        Ok(true)
    }

    pub async fn uses(&self) -> Result<Vec<(String, ImageUse)>, StoreError> {
        let mut out = Vec::new();
        for (k, v) in self.store.table_list(USES).await? {
            match serde_json::from_str(&v) {
                Ok(u) => out.push((k, u)),
                Err(e) => tracing::warn!(key = %k, error = %e, "skipping an image use that cannot be read"),
            }
        }
        Ok(out)
    }

    pub async fn use_of(&self, preview: &str) -> Result<Option<ImageUse>, StoreError> {
        get_json(&self.store, USES, preview).await
    }

    pub async fn set_use(&self, preview: &str, u: &ImageUse) -> Result<(), StoreError> {
        self.store.table_put(USES, preview, &to_json(u)).await
    }

    /// Records how far a preview's database has diverged, if it still holds `at`'s copy.
    pub async fn set_diverged(&self, preview: &str, at: Millis, bytes: u64, now: Millis) -> Result<(), StoreError> {
        let r = wakegate_store::edit_record(self.store.as_ref(), USES, preview, |mut u: ImageUse| {
            (u.at == at).then(|| {
                u.diverged = Some(bytes);
                u.measured_at = Some(now);
                u
            })
        })
        .await;
        match r {
            Ok(_) | Err(StoreError::Conflict) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn drop_use(&self, preview: &str) -> Result<(), StoreError> {
        self.store.table_remove(USES, preview).await.map(|_| ())
    }

    pub async fn refresh(&self, preview: &str) -> Result<Option<Refresh>, StoreError> {
        get_json(&self.store, REFRESHES, preview).await
    }

    /// The preview's refresh still to be done, if one is.
    pub async fn pending_refresh(&self, preview: &str) -> Result<Option<Refresh>, StoreError> {
        Ok(self.refresh(preview).await?.filter(|r| r.state == RefreshState::Pending))
    }

    /// Asks for a refresh: `Ok(false)` when one is pending already.
    pub async fn ask_refresh(&self, preview: &str, now: Millis) -> Result<bool, StoreError> {
        let old = self.store.table_get(REFRESHES, preview).await?;
        if let Some(raw) = &old {
            if serde_json::from_str::<Refresh>(raw).is_ok_and(|r| r.state == RefreshState::Pending) {
                return Ok(false);
            }
        }
        let r = Refresh {
            id: wakegate_store::new_id("r-"),
            state: RefreshState::Pending,
            asked_at: now,
            finished_at: None,
            method: None,
            took_ms: None,
            reason: None,
        };
        if !self.store.table_swap(REFRESHES, preview, old.as_deref(), Some(&to_json(&r))).await? {
            return Err(StoreError::Conflict);
        }
        Ok(true)
    }

    /// Records how the pending refresh `id` ended.
    pub async fn finish_refresh(&self, preview: &str, id: &str, f: impl Fn(&mut Refresh)) -> Result<(), StoreError> {
        let r = wakegate_store::edit_record(self.store.as_ref(), REFRESHES, preview, |mut r: Refresh| {
            (r.id == id && r.state == RefreshState::Pending).then(|| {
                f(&mut r);
                r
            })
        })
        .await;
        r.map(|_| ())
    }

    /// An erased preview's records go.
    pub async fn forget(&self, preview: &str) -> Result<(), StoreError> {
        self.store.table_remove(USES, preview).await?;
        self.store.table_remove(REFRESHES, preview).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(sanitize: Option<&str>) -> Recipe {
        Recipe { engine: Engine::Postgres, name: "app".into(), sanitize: sanitize.map(str::to_string) }
    }

    #[test]
    fn an_image_is_named_by_its_dump_and_recipe() {
        let a = recipe(Some("UPDATE users SET email = 'x';"));
        assert_eq!(a.image_id("abc"), a.clone().image_id("abc"));
        assert_ne!(a.image_id("abc"), a.image_id("abd"), "another dump");
        assert_ne!(a.image_id("abc"), recipe(None).image_id("abc"), "no sanitize");
        assert_ne!(recipe(Some("")).digest(), recipe(None).digest(), "an empty sanitize is not none");
        let mut other = a.clone();
        other.name = "shop".into();
        assert_ne!(a.digest(), other.digest());
        other = a.clone();
        other.engine = Engine::Mariadb;
        assert_ne!(a.digest(), other.digest());
        assert!(a.image_id("abc").starts_with("i-") && a.image_id("abc").len() == 18);
    }
}
