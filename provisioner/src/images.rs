//! The database image keeper: bakes each project's base dump once (with the recipe its
//! newest build recorded), hands ready images to builds and refreshes, measures how far
//! clones have diverged, and collects images nothing uses.
//!
//! A bake is recorded `baking` with the worker and a heartbeat before anything is made;
//! a bake whose heartbeat stops (its provisioner died) is taken over: what it left is
//! removed and it starts again. An image is `ready` only once the backend says it is
//! whole, so a half-baked one is never cloned. What the backend holds without a record
//! (a crash between making and recording) is removed too.

use crate::cloud::{BakeOrder, DbMade, ImageSource};
use crate::now_ms;
use crate::runner::{dump_source, Provisioner};
use std::time::Duration;
use tracing::{info, warn};
use wakegate_core::lifecycle::{MachineId, State};
use wakegate_core::metrics as m;
use wakegate_db::{CloneMethod, Image, ImageState, ImageUse, Images, RefreshState};

/// How long a bake's dump URL works (a bake of many GB downloads for a while).
const BAKE_URL_TTL: Duration = Duration::from_secs(6 * 3600);
/// Most attempts at baking one image; a failed one is tried again after
/// `RETRY_AFTER` times its attempts.
const MAX_ATTEMPTS: u32 = 4;
const RETRY_AFTER: Duration = Duration::from_secs(300);

impl Provisioner {
    fn images(&self) -> Images {
        Images::new(self.store.clone())
    }

    pub(crate) async fn offered_images(&self, preview: &wakegate_core::route::Preview) -> (Vec<ImageSource>, bool) {
        offered(&self.store, preview, self.settings.db_images).await
    }

    pub(crate) async fn record_made(&self, preview: &str, project_id: &str, made: &DbMade, on_base: bool) {
        record_made(&self.store, preview, project_id, made, on_base).await
    }

    /// Makes a running preview's database again from the current image (the dump when
    /// none is ready): the refresh asked for, recorded as done or failed.
    pub(crate) async fn refresh(&self, id: &str, machine: &MachineId) -> Result<(), wakegate_store::StoreError> {
        let images = self.images();
        let Some(asked) = images.pending_refresh(id).await? else { return Ok(()) };
        let Some(preview) = self.store.get_preview(id).await? else { return Ok(()) };
        let (offered, _) = self.offered_images(&preview.value).await;
        let result = match dump_source(&self.store, self.dumps.as_ref(), &preview.value, BAKE_URL_TTL).await {
            Err(reason) => Err(reason),
            Ok(dump) => self.cloud.refresh_db(machine, &offered, dump.as_ref()).await.map_err(|e| e.to_string()),
        };
        match &result {
            Ok(made) => {
                info!(preview = %id, method = made.method.as_str(), took_ms = made.took_ms, "database refreshed");
                self.record_made(id, &preview.value.project_id, made, false).await;
            }
            Err(reason) => warn!(preview = %id, %reason, "refreshing the database failed"),
        }
        images
            .finish_refresh(id, &asked.id, |r| {
                r.finished_at = Some(now_ms());
                match &result {
                    Ok(made) => {
                        (r.state, r.method, r.took_ms) = (RefreshState::Done, Some(made.method), Some(made.took_ms))
                    }
                    Err(reason) => (r.state, r.reason) = (RefreshState::Failed, Some(reason.clone())),
                }
            })
            .await
    }

    /// Runs the keeper every `sweep_every` until `stop` turns true.
    pub async fn run_images(self: std::sync::Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            self.clone().keep_images().await;
            tokio::select! {
                _ = tokio::time::sleep(self.settings.sweep_every) => {}
                _ = stop.changed() => {}
            }
        }
    }

    /// One round: bake what is missing, take over dead bakes, collect what nothing
    /// uses, measure clones.
    pub async fn keep_images(self: std::sync::Arc<Self>) {
        let images = self.images();
        let all = match images.list(None).await {
            Ok(a) => a,
            Err(e) => return warn!(error = %e, "images: reading the records failed"),
        };
        let uses = match images.uses().await {
            Ok(u) => u,
            Err(e) => return warn!(error = %e, "images: reading the uses failed"),
        };
        let projects = match self.store.list_projects().await {
            Ok(p) => p,
            Err(e) => return warn!(error = %e, "images: listing projects failed"),
        };
        // the image each project wants now: its base dump with its newest recipe
        let dumps = wakegate_db::Dumps::new(self.store.clone());
        let mut wanted: Vec<(wakegate_core::route::Project, wakegate_db::Dump, wakegate_db::Recipe)> = Vec::new();
        if self.dumps.is_some() && self.settings.db_images {
            for p in projects {
                let (Ok(Some(base)), Ok(Some(recipe))) = (dumps.base(&p.id).await, images.recipe(&p.id).await) else {
                    continue;
                };
                if base.state == wakegate_db::DumpState::Ready && base.engine == recipe.engine {
                    wanted.push((p, base, recipe));
                }
            }
        }
        let now = now_ms();
        // one bake at a time per provisioner: a bake not started is not recorded
        let mut free = self.bakes_here().is_empty();
        for (project, dump, recipe) in &wanted {
            let id = recipe.image_id(&dump.sha256);
            match all.iter().find(|i| i.id == id && i.project_id == project.id) {
                None if free => {
                    let image = Image {
                        id,
                        project_id: project.id.clone(),
                        dump_id: dump.id.clone(),
                        dump_sha256: dump.sha256.clone(),
                        recipe: recipe.clone(),
                        state: ImageState::Baking,
                        version: String::new(),
                        location: String::new(),
                        size: 0,
                        created_at: now,
                        ready_at: None,
                        bake_ms: None,
                        worker: self.worker.clone(),
                        heartbeat: now,
                        attempts: 1,
                        reason: None,
                    };
                    if images.create(&image).await.is_ok() {
                        free = false;
                        self.clone().start_bake(project.clone(), image);
                    }
                }
                Some(i) if i.state == ImageState::Baking && i.attempts >= MAX_ATTEMPTS && self.stale(i, now) => {
                    // a dump that kills its baker (memory, disk) is not tried for ever
                    let mut failed = i.clone();
                    let why =
                        format!("the bake stopped {} times without finishing (see the provisioner's log)", i.attempts);
                    (failed.state, failed.reason, failed.heartbeat) = (ImageState::Failed, Some(why), now);
                    if images.update(i, &failed).await.is_ok() {
                        warn!(image = %i.id, "giving up baking the image: builds import");
                        // what the dead attempts left goes now: a failed image is kept
                        // until its project moves on
                        if let Err(e) = self.cloud.drop_image(&i.id, &i.location).await {
                            warn!(image = %i.id, error = %e, "removing what the bakes left failed");
                        }
                    }
                }
                Some(i) if free && self.due(i, now) => {
                    let mut taken = i.clone();
                    (taken.state, taken.worker, taken.heartbeat, taken.reason) =
                        (ImageState::Baking, self.worker.clone(), now, None);
                    taken.attempts += 1;
                    if images.update(i, &taken).await.is_ok() {
                        free = false;
                        info!(image = %i.id, attempt = taken.attempts, "taking the image's bake up again");
                        self.clone().start_bake(project.clone(), taken);
                    }
                }
                _ => {}
            }
        }
        self.collect(&all, &uses, &wanted).await;
        self.measure(&uses).await;
    }

    /// Whether an image's bake should start again: its baker stopped saying it bakes,
    /// or it failed a while ago and has attempts left.
    fn due(&self, i: &Image, now: u64) -> bool {
        match i.state {
            ImageState::Ready => false,
            ImageState::Baking => self.stale(i, now),
            ImageState::Failed => {
                let wait = RETRY_AFTER.as_millis() as u64 * u64::from(i.attempts);
                i.attempts < MAX_ATTEMPTS && now.saturating_sub(i.heartbeat) > wait
            }
        }
    }

    /// Whether a baking image's baker stopped saying it bakes.
    fn stale(&self, i: &Image, now: u64) -> bool {
        now.saturating_sub(i.heartbeat) > self.settings.lease.as_millis() as u64 && !self.bakes_here().contains(&i.id)
    }

    fn bakes_here(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.bakes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts baking `image` unless this provisioner bakes one already (a bake takes a
    /// core and a dump's size of disk; the next round starts the next).
    fn start_bake(self: std::sync::Arc<Self>, project: wakegate_core::route::Project, image: Image) {
        {
            let mut here = self.bakes_here();
            if !here.is_empty() {
                return;
            }
            here.insert(image.id.clone());
        }
        tokio::spawn(async move {
            let id = image.id.clone();
            self.bake(project, image).await;
            self.bakes_here().remove(&id);
        });
    }

    /// Bakes `image`, keeping its heartbeat; stops if another worker takes it over.
    async fn bake(&self, project: wakegate_core::route::Project, image: Image) {
        let images = self.images();
        info!(image = %image.id, project = %project.name, dump = %image.dump_id, "baking a database image");
        let began = std::time::Instant::now();
        let source = match self.bake_source(&image).await {
            Ok(s) => s,
            Err(reason) => return self.bake_ended(&image, Err(reason), began).await,
        };
        let order = BakeOrder {
            image_id: image.id.clone(),
            attempt: format!("{}-{}", self.worker, image.attempts),
            project,
            recipe: image.recipe.clone(),
            dump: source,
        };
        let mut current = image.clone();
        let every = self.settings.lease / 3;
        let heartbeat = async {
            loop {
                tokio::time::sleep(every).await;
                let mut next = current.clone();
                next.heartbeat = now_ms();
                match images.update(&current, &next).await {
                    Ok(()) => current = next,
                    Err(wakegate_db::RecordError::Conflict) => return,
                    // the store is down: the bake goes on, its outcome checked when recorded
                    Err(e) => warn!(image = %image.id, error = %e, "the bake's heartbeat failed"),
                }
            }
        };
        let result = tokio::select! {
            r = self.cloud.bake_image(&order) => r.map_err(|e| e.to_string()),
            () = heartbeat => {
                warn!(image = %image.id, "the image's bake was taken over; stopping this one");
                return;
            }
        };
        self.bake_ended(&image, result, began).await
    }

    /// Where a bake reads the image's dump from.
    async fn bake_source(&self, image: &Image) -> Result<crate::cloud::DumpSource, String> {
        let dumps = wakegate_db::Dumps::new(self.store.clone());
        let d = dumps
            .get(&image.project_id, &image.dump_id)
            .await
            .map_err(|e| e.to_string())?
            .filter(|d| d.state == wakegate_db::DumpState::Ready)
            .ok_or_else(|| format!("the dump {} is gone", image.dump_id))?;
        crate::runner::presigned(self.dumps.as_ref(), d, BAKE_URL_TTL).await
    }

    /// Records how a bake ended, if the image is still this worker's.
    async fn bake_ended(&self, image: &Image, result: Result<crate::cloud::Baked, String>, began: std::time::Instant) {
        let images = self.images();
        let took = began.elapsed();
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        metrics::histogram!(m::DB_BAKE_SECONDS, "result" => outcome).record(took.as_secs_f64());
        let worker = self.worker.clone();
        let r = images
            .edit(&image.project_id, &image.id, |mut i: Image| {
                (i.worker == worker && i.state == ImageState::Baking).then(|| {
                    i.heartbeat = now_ms();
                    match &result {
                        Ok(b) => {
                            (i.state, i.location, i.size, i.version) =
                                (ImageState::Ready, b.location.clone(), b.size, b.version.clone());
                            (i.ready_at, i.bake_ms) = (Some(now_ms()), Some(took.as_millis() as u64));
                        }
                        Err(reason) => (i.state, i.reason) = (ImageState::Failed, Some(reason.clone())),
                    }
                    i
                })
            })
            .await;
        match (&result, r) {
            (Ok(b), Ok(Some(_))) => {
                info!(image = %image.id, size = b.size, took_ms = took.as_millis() as u64, "database image ready")
            }
            (Err(reason), Ok(Some(_))) => warn!(image = %image.id, %reason, "baking the database image failed"),
            (_, Ok(None)) => {
                warn!(image = %image.id, "the image changed hands during the bake; this bake is not recorded")
            }
            (_, Err(e)) => warn!(image = %image.id, error = %e, "recording the bake failed; it is taken up again"),
        }
    }

    /// Removes images nothing wants or uses, uses of previews that are gone, and what
    /// the backend holds without a record.
    async fn collect(
        &self,
        all: &[Image],
        uses: &[(String, ImageUse)],
        wanted: &[(wakegate_core::route::Project, wakegate_db::Dump, wakegate_db::Recipe)],
    ) {
        let images = self.images();
        let mut live = std::collections::HashSet::new();
        for (preview, u) in uses {
            match self.store.get_preview(preview).await {
                Ok(Some(p)) if !matches!(p.value.state, State::Erased { .. }) => {
                    if let Some(i) = &u.image {
                        live.insert(i.clone());
                    }
                }
                Ok(_) => {
                    if let Err(e) = images.forget(preview).await {
                        warn!(%preview, error = %e, "forgetting a gone preview's database failed");
                    }
                }
                Err(e) => {
                    warn!(error = %e, "images: reading a preview failed; collecting nothing this round");
                    return;
                }
            }
        }
        let current: std::collections::HashSet<String> = wanted.iter().map(|(_, d, r)| r.image_id(&d.sha256)).collect();
        for i in all {
            // an image being baked is collected once its bake is over (or its baker died)
            let baking = i.state == ImageState::Baking && !self.stale(i, now_ms());
            if current.contains(&i.id) || live.contains(&i.id) || baking {
                continue;
            }
            match self.cloud.drop_image(&i.id, &i.location).await {
                Ok(true) => match images.remove(i).await {
                    Ok(()) => info!(image = %i.id, "collected a database image nothing uses"),
                    Err(e) => warn!(image = %i.id, error = %e, "removing a collected image's record failed"),
                },
                Ok(false) => {}
                Err(e) => warn!(image = %i.id, error = %e, "collecting an image failed; trying again"),
            }
        }
        // what the backend holds that no record names
        let held = match self.cloud.images().await {
            Ok(held) => held,
            Err(e) => return warn!(error = %e, "images: listing the backend's images failed"),
        };
        let known: std::collections::HashSet<&str> = all.iter().map(|i| i.id.as_str()).collect();
        let unknown: Vec<&String> = held.iter().filter(|id| !known.contains(id.as_str())).collect();
        if unknown.is_empty() {
            return;
        }
        // a bake recorded after the listing above is not an orphan: read the records again
        let Ok(now) = images.list(None).await else { return };
        for id in unknown {
            if self.bakes_here().contains(id) || now.iter().any(|i| &i.id == id) {
                continue;
            }
            match self.cloud.drop_image(id, "").await {
                Ok(true) => info!(image = %id, "removed a database image no record names"),
                Ok(false) => {}
                Err(e) => warn!(image = %id, error = %e, "removing an unrecorded image failed"),
            }
        }
    }

    /// Measures how far running clones have diverged from their images.
    async fn measure(&self, uses: &[(String, ImageUse)]) {
        let images = self.images();
        let now = now_ms();
        for (preview, u) in uses {
            if !matches!(u.method, CloneMethod::Reflink | CloneMethod::Copy) {
                continue;
            }
            // every ten rounds: a walk over the data directory is not free
            let every = (self.settings.sweep_every * 10).as_millis() as u64;
            if u.measured_at.is_some_and(|t| now.saturating_sub(t) < every) {
                continue;
            }
            let Ok(Some(p)) = self.store.get_preview(preview).await else { continue };
            let State::Running { machine, .. } = &p.value.state else { continue };
            match self.cloud.db_diverged(machine).await {
                Ok(Some(bytes)) => {
                    if let Err(e) = images.set_diverged(preview, u.at, bytes, now).await {
                        warn!(%preview, error = %e, "recording the database's divergence failed");
                    }
                }
                Ok(None) => {}
                Err(e) => warn!(%preview, error = %e, "measuring the database's divergence failed"),
            }
        }
    }
}

/// The ready images a build of `preview` may clone (the newest first), and whether one
/// of its dump is being baked. Only a preview on the project's base dump clones.
pub async fn offered(
    store: &wakegate_store::SharedStore,
    preview: &wakegate_core::route::Preview,
    enabled: bool,
) -> (Vec<ImageSource>, bool) {
    if preview.dump.is_some() || !enabled {
        return (Vec::new(), false);
    }
    let dumps = wakegate_db::Dumps::new(store.clone());
    let Ok(Some(base)) = dumps.base_id(&preview.project_id).await else { return (Vec::new(), false) };
    let Ok(mut images) = Images::new(store.clone()).list(Some(&preview.project_id)).await else {
        return (Vec::new(), false);
    };
    images.sort_by_key(|i| std::cmp::Reverse(i.ready_at));
    let of_base = images.into_iter().filter(|i| i.dump_id == base);
    let (mut ready, mut baking) = (Vec::new(), false);
    for i in of_base {
        match i.state {
            ImageState::Ready => ready.push(ImageSource {
                recipe_digest: i.recipe.digest(),
                id: i.id,
                location: i.location,
                dump_id: i.dump_id,
            }),
            ImageState::Baking => baking = true,
            ImageState::Failed => {}
        }
    }
    (ready, baking)
}

/// Records how a preview's database was made: the image it came from and, from a build
/// on the project's base dump, its recipe (the project's image is baked with it; a
/// build without a dump may lack its sanitize file, and a refresh is no news).
pub async fn record_made(
    store: &wakegate_store::SharedStore,
    preview: &str,
    project_id: &str,
    made: &DbMade,
    on_base: bool,
) {
    let images = Images::new(store.clone());
    if let Some(recipe) = made.recipe.as_ref().filter(|_| on_base && made.dump_id.is_some()) {
        match images.set_recipe(project_id, recipe).await {
            Ok(true) => {
                info!(project = %project_id, digest = %recipe.digest(), "the project's database recipe changed")
            }
            Ok(false) => {}
            Err(e) => warn!(project = %project_id, error = %e, "recording the database recipe failed"),
        }
    }
    let u = ImageUse {
        image: made.image.clone(),
        method: made.method,
        dump_id: made.dump_id.clone(),
        at: now_ms(),
        took_ms: made.took_ms,
        // a server made from a snapshot is not compared with it (Hetzner cannot tell)
        diverged: made
            .image
            .as_ref()
            .filter(|_| matches!(made.method, CloneMethod::Reflink | CloneMethod::Copy))
            .map(|_| 0),
        measured_at: None,
    };
    if let Err(e) = images.set_use(preview, &u).await {
        warn!(%preview, error = %e, "recording the database's image failed");
    }
    metrics::histogram!(m::DB_RESTORE_SECONDS, "method" => made.method.as_str()).record(made.took_ms as f64 / 1000.0);
}
