//! Database images on Hetzner: a *builder* server imports the project's base dump into
//! a fresh data directory, sanitizes it and stops the engine cleanly; its snapshot is the
//! image. Pool machines of the project are created from that snapshot, so a preview
//! taking one finds its database on the disk and only starts the server.
//!
//! Every resource of a bake carries `managed-by=wakegate` and `image=<id>`: the builder
//! `role=db-bake`, the snapshot `role=db-image` with the project, the dump and the
//! recipe. A bake begins by removing whatever an earlier attempt at the same image left
//! (a dead provisioner's builder or snapshot), and ends by deleting its builder whether
//! it succeeded or not; what a crash leaves is removed by the next attempt, or, once no
//! record names the image, by the keeper's collection ([`super::HetznerCloud::images`]).
//! The reaper leaves both alone (they are listed as held).
//!
//! The builder's agent finds its order in [`BAKES`] when it asks for work, and reports
//! the outcome there (`/v1/agent/baked`).

use super::{api_err, backend, label_value, HetznerCloud, MachineRecord, MACHINES, MANAGED_BY, MANAGED_BY_VALUE};
use crate::cloud::{BakeOrder, Baked, Cloud, CloudError, DumpSource};
use crate::now_ms;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Duration;
use tracing::{info, warn};

/// Store table: builder machine name → [`BakeWork`].
pub const BAKES: &str = "hetzner-bakes";
/// The builder's role label, and the image snapshot's.
pub const ROLE_BAKE: &str = "db-bake";
pub const ROLE_IMAGE: &str = "db-image";
/// Longest a builder's agent may take to ask for its order after the server runs.
const UNASKED: Duration = Duration::from_secs(600);
/// Longest a bake may take once the agent has its order (a many-GB import).
const BAKE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

/// What a builder is asked to bake, and how it went.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BakeWork {
    pub image: String,
    pub project: String,
    pub recipe: wakegate_db::Recipe,
    pub dump: DumpSource,
    /// Whether the agent has asked for it.
    #[serde(default)]
    pub fetched: bool,
    #[serde(default)]
    pub outcome: Option<BakeOutcome>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BakeOutcome {
    /// The data directory is complete and its server stopped cleanly.
    Baked {
        size: u64,
        version: String,
    },
    Failed {
        reason: String,
    },
}

/// The builder of one attempt at an image: the same name for a retried create, so one
/// attempt never makes two servers.
pub fn builder_name(image: &str, attempt: &str) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(format!("{image}/{attempt}"));
    format!("wgb-{}", hex::encode(&h[..6]))
}

fn selector(role: &str, image: Option<&str>) -> String {
    match image {
        Some(i) => format!("{MANAGED_BY}={MANAGED_BY_VALUE},role={role},image={i}"),
        None => format!("{MANAGED_BY}={MANAGED_BY_VALUE},role={role}"),
    }
}

impl HetznerCloud {
    pub(super) async fn bake(&self, order: &BakeOrder) -> Result<Baked, CloudError> {
        // an earlier attempt's builder and snapshot are not the image until recorded
        self.remove_image(&order.image_id).await?;
        let builder = builder_name(&order.image_id, &order.attempt);
        let work = BakeWork {
            image: order.image_id.clone(),
            project: order.project.name.clone(),
            recipe: order.recipe.clone(),
            dump: order.dump.clone(),
            fetched: false,
            outcome: None,
        };
        let raw = serde_json::to_string(&work).map_err(backend)?;
        self.store.table_put(BAKES, &builder, &raw).await.map_err(backend)?;
        let mut baked = self.bake_on(&builder, order).await;
        // the builder goes whatever happened; its snapshot stays only if it is the image.
        // A builder that cannot be deleted fails the bake: the next attempt starts by
        // removing it (a ready image would keep it for ever)
        if let Err(e) = self.delete(&builder).await {
            warn!(%builder, error = %e, "deleting the builder failed; the next attempt removes it");
            if baked.is_ok() {
                baked = Err(CloudError::Backend(format!("deleting the builder {builder}: {e}")));
            }
        }
        if let Err(e) = self.store.table_remove(BAKES, &builder).await {
            warn!(%builder, error = %e, "forgetting the bake order failed");
        }
        if baked.is_err() {
            let this_attempt = format!("{},builder={builder}", selector(ROLE_IMAGE, Some(&order.image_id)));
            for s in self.client.snapshots(&this_attempt).await.map_err(api_err)? {
                self.client.delete_image(s.id).await.map_err(api_err)?;
            }
        }
        baked
    }

    async fn bake_on(&self, builder: &str, order: &BakeOrder) -> Result<Baked, CloudError> {
        let (_, server_type, location) = self.spec_of(&order.project);
        let mut record = MachineRecord { created_at: now_ms(), ..Default::default() };
        self.put_record(builder, &record).await?;
        let mut labels = self.labels(builder, &record, Some(&order.project.name));
        labels.insert("role".into(), ROLE_BAKE.into());
        labels.insert("image".into(), order.image_id.clone());
        let image = self.settings.image.clone();
        let server = self.ensure_server(builder, &image, &server_type, &location, &mut record, labels).await?;
        info!(%builder, image = %order.image_id, server = server.id, "builder server up; baking");
        let (size, version) = self.await_bake(builder).await?;
        // the agent stopped the database cleanly and synced; the machine is off before
        // its snapshot (a shutdown action ends when the request is sent, not when the
        // machine is off)
        self.shutdown(server.id).await?;
        self.await_off(builder, server.id).await?;
        let mut labels = HashMap::from([
            (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
            ("role".to_string(), ROLE_IMAGE.to_string()),
            ("image".to_string(), order.image_id.clone()),
            ("project".to_string(), label_value(&order.project.name)),
            ("dump".to_string(), label_value(&order.dump.id)),
            ("recipe".to_string(), order.recipe.digest()),
            ("builder".to_string(), builder.to_string()),
        ]);
        if let Some(sha) = self.dump_sha256(order).await {
            labels.insert("dump-sha256".into(), sha[..sha.len().min(63)].to_string());
        }
        let description = format!("wakegate database image {} of {}", order.image_id, order.project.name);
        let snapshot = self.client.create_snapshot(server.id, &description, labels).await.map_err(api_err)?;
        info!(image = %order.image_id, snapshot, size, "database image snapshotted");
        Ok(Baked { location: snapshot.to_string(), size, version })
    }

    async fn dump_sha256(&self, order: &BakeOrder) -> Option<String> {
        let dumps = wakegate_db::Dumps::new(self.store.clone());
        dumps.get(&order.project.id, &order.dump.id).await.ok().flatten().map(|d| d.sha256)
    }

    /// Waits until the server says it is off; powers it off after the shutdown timeout.
    async fn await_off(&self, builder: &str, server: i64) -> Result<(), CloudError> {
        let deadline = tokio::time::Instant::now() + self.settings.shutdown_timeout;
        loop {
            let s = self.client.server_by_name(builder).await.map_err(api_err)?;
            match s {
                Some(s) if s.status != hcloud::models::server::Status::Off => {}
                _ => return Ok(()),
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(%builder, "the builder did not power off after its shutdown; powering it off");
                return self.client.server_action(server, "poweroff").await.map_err(api_err);
            }
            tokio::time::sleep(self.settings.api.action_poll).await;
        }
    }

    /// Waits for the builder's agent to report its bake.
    async fn await_bake(&self, builder: &str) -> Result<(u64, String), CloudError> {
        let unasked = UNASKED.min(self.settings.ready_timeout * 4);
        self.await_order(BAKES, builder, "the bake order", unasked, BAKE_TIMEOUT, |w: BakeWork| {
            let done = w.outcome.map(|out| match out {
                BakeOutcome::Baked { size, version } => Ok((size, version)),
                BakeOutcome::Failed { reason } => Err(CloudError::Failed(reason)),
            });
            (w.fetched, done)
        })
        .await
    }

    /// Removes every builder and snapshot of image `id`, and their bookkeeping.
    pub(super) async fn remove_image(&self, id: &str) -> Result<(), CloudError> {
        for s in self.client.servers(&selector(ROLE_BAKE, Some(id))).await.map_err(api_err)? {
            let name = s.labels.get("machine").cloned().unwrap_or(s.name.clone());
            self.delete(&name).await?;
        }
        for s in self.client.snapshots(&selector(ROLE_IMAGE, Some(id))).await.map_err(api_err)? {
            self.client.delete_image(s.id).await.map_err(api_err)?;
            info!(image = %id, snapshot = s.id, "removed a database image's snapshot");
        }
        // orders whose builder was never created
        for (builder, raw) in self.store.table_list(BAKES).await.map_err(backend)? {
            if serde_json::from_str::<BakeWork>(&raw).is_ok_and(|w| w.image == id) {
                self.store.table_remove(BAKES, &builder).await.map_err(backend)?;
                self.store.table_remove(MACHINES, &builder).await.map_err(backend)?;
            }
        }
        Ok(())
    }

    /// The ids of the images Hetzner holds: snapshots and builders.
    pub(super) async fn image_ids(&self) -> Result<Vec<String>, CloudError> {
        let mut out = std::collections::BTreeSet::new();
        for s in self.client.servers(&selector(ROLE_BAKE, None)).await.map_err(api_err)? {
            out.extend(s.labels.get("image").cloned());
        }
        for s in self.client.snapshots(&selector(ROLE_IMAGE, None)).await.map_err(api_err)? {
            out.extend(s.labels.get("image").cloned());
        }
        // an order whose builder a crash kept from being created
        for (_, raw) in self.store.table_list(BAKES).await.map_err(backend)? {
            if let Ok(w) = serde_json::from_str::<BakeWork>(&raw) {
                out.insert(w.image);
            }
        }
        Ok(out.into_iter().collect())
    }
}
