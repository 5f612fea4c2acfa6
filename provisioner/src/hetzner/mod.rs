//! The Hetzner Cloud backend.
//!
//! A *machine* is a name, `wg-<hex>`, chosen before anything is created and recorded
//! in the preview's state at once. The server for it is created with that name (server
//! names are unique per Hetzner project, so a retried create can never make a second
//! server for one preview) and labelled `managed-by=wakegate`, `machine`, `preview`,
//! `project`, and `pool` for pool machines. A hibernated machine is a snapshot image
//! with the same labels.
//!
//! Servers start from the pool image with cloud-init user data that installs the
//! Wakegate agent ([`userdata`]); the agent pulls its work from the control plane
//! ([`crate::agent_api`]) and reports phases and readiness there, authenticated by a
//! token made from the machine's name. Nothing connects to the VM but edge traffic on
//! 80/443, which the managed firewall allows from Cloudflare's ranges and the control
//! plane only.
//!
//! Bookkeeping lives in the store's tables: [`MACHINES`] (name → [`MachineRecord`]) and
//! one `pool:<key>` table per pool (ready machines; taking one is an atomic remove).

pub mod api;
pub mod bake;
pub mod userdata;

use crate::cloud::{Cloud, CloudError, DeploySpec, Listing, MachineInfo, Outcome, Progress};
use crate::now_ms;
use api::{ApiError, Client};
use async_trait::async_trait;
use hcloud::models;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};
use wakegate_core::lifecycle::{MachineId, State};
use wakegate_core::route::{Preview, Project, SleepMode};
use wakegate_core::sign::Key;
use wakegate_store::SharedStore;

/// The label every resource Wakegate makes carries.
pub const MANAGED_BY: &str = "managed-by";
pub const MANAGED_BY_VALUE: &str = "wakegate";
/// Store table: machine name → [`MachineRecord`].
pub const MACHINES: &str = "hetzner-machines";
/// Store table: machine name → [`PullOrder`], a database its agent is asked to dump.
pub const PULL_ORDERS: &str = "hetzner-pulls";
/// Longest a machine's agent may take to dump its database.
const PULL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Longest a running machine's agent may take to ask for a dump order.
const PULL_UNASKED: Duration = Duration::from_secs(60);

/// A database dump a machine's agent is asked for (`wakegate db pull`): it dumps the
/// database through gzip and PUTs it to a presigned URL for `key` it gets when it asks
/// (so an order left behind by a crash is worthless once its pull is over), then
/// reports the outcome.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PullOrder {
    /// The object's key, which names the order too.
    pub key: String,
    /// Whether the agent has asked for it: one that never does (an agent from before
    /// pulls, a hung machine) fails the pull in a minute rather than an hour.
    #[serde(default)]
    pub fetched: bool,
    #[serde(default)]
    pub outcome: Option<PullOutcome>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PullOutcome {
    Uploaded { size: u64 },
    Failed { reason: String },
}

/// Name of the firewall attached to every preview server.
pub const FIREWALL_NAME: &str = "wakegate-previews";

/// Cloudflare's published edge ranges (https://www.cloudflare.com/ips/).
pub const CLOUDFLARE_RANGES: &[&str] = &[
    "173.245.48.0/20",
    "103.21.244.0/22",
    "103.22.200.0/22",
    "103.31.4.0/22",
    "141.101.64.0/18",
    "108.162.192.0/18",
    "190.93.240.0/20",
    "188.114.96.0/20",
    "197.234.240.0/22",
    "198.41.128.0/17",
    "162.158.0.0/15",
    "104.16.0.0/13",
    "104.24.0.0/14",
    "172.64.0.0/13",
    "131.0.72.0/22",
    "2400:cb00::/32",
    "2606:4700::/32",
    "2803:f800::/32",
    "2405:b500::/32",
    "2405:8100::/32",
    "2a06:98c0::/29",
    "2c0f:f248::/32",
];

/// A pool of ready machines for one (image, server type, location), or for one
/// project's previews: those are made from the project's database image once one is
/// ready, so a preview taking one finds its database on the disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    pub server_type: String,
    pub location: String,
    /// `None`: the backend's image.
    #[serde(default)]
    pub image: Option<String>,
    /// The project (by name) whose previews this pool serves.
    #[serde(default)]
    pub project: Option<String>,
    pub min_ready: usize,
    pub max: usize,
    /// Ready machines older than this are replaced (fresh packages, no drift).
    pub max_age_secs: u64,
}

/// The backend's settings (`[hetzner]` in the config file).
#[derive(Clone, Debug)]
pub struct HetznerSettings {
    pub api: api::ClientOptions,
    /// Default image, server type and location of preview servers.
    pub image: String,
    pub server_type: String,
    pub location: String,
    /// Where agents reach the control plane, e.g. `https://control.example.com:8443`.
    pub control_url: String,
    /// Addresses allowed in besides the edge: the control plane's.
    pub control_plane_ips: Vec<String>,
    /// The edge's ranges; Cloudflare's by default.
    pub edge_ranges: Vec<String>,
    /// The port the agent serves the app on (behind the firewall's 80/443).
    pub app_port: u16,
    pub pools: Vec<PoolSpec>,
    /// Longest wait for a machine's agent to report ready.
    pub ready_timeout: Duration,
    /// Longest graceful shutdown before a hard power-off.
    pub shutdown_timeout: Duration,
}

/// What the store knows of a machine.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineRecord {
    /// The preview it works for; `None` while it waits in a pool.
    #[serde(default)]
    pub preview: Option<String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub server_id: Option<i64>,
    #[serde(default)]
    pub ip: Option<String>,
    /// The name the edge reaches the server by: Workers can fetch hostnames only (not
    /// IP addresses) and only on the scheme's default port. This is the server's
    /// reverse-DNS name, Hetzner's `static.<ip reversed>.clients.your-server.de`, which
    /// resolves to it; the IP address when there is none.
    #[serde(default)]
    pub host: Option<String>,
    pub created_at: u64,
}

impl MachineRecord {
    /// Host part of the machine's origin URL.
    pub fn origin_host(&self) -> Option<String> {
        let host = self.host.clone().or_else(|| self.ip.clone())?;
        Some(if host.contains(':') { format!("[{host}]") } else { host })
    }
}

/// The IPv4 address and its reverse-DNS name, as the API reports them.
fn address_of(s: &models::Server) -> (Option<String>, Option<String>) {
    let v4 = s.public_net.ipv4.as_ref();
    let ip = v4.map(|v| v.ip.clone());
    let name = v4.map(|v| v.dns_ptr.trim_end_matches('.').to_string()).filter(|n| {
        !n.is_empty() && n.parse::<std::net::IpAddr>().is_err() && wakegate_core::host::normalize_host(n).is_ok()
    });
    (ip, name)
}

/// Snapshot storage: EUR 0.0119 per GB and month (gross), per hour of a 730-hour month.
pub const SNAPSHOT_EUR_PER_GB_HOUR: f64 = 0.0119 / 730.0;

/// The store table of one pool's ready machines (machine → [`PoolEntry`]).
pub fn pool_table(key: &str) -> String {
    format!("hetzner-pool:{key}")
}

/// A ready machine of a pool: when it was made, and the database image it was made
/// from (a project's pool).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub born: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db_image: Option<String>,
}

impl PoolEntry {
    /// Reads an entry; one written before entries were records is its birth time.
    pub fn parse(raw: &str) -> PoolEntry {
        serde_json::from_str(raw)
            .unwrap_or_else(|_| PoolEntry { born: raw.trim().parse().unwrap_or(0), db_image: None })
    }
}

/// A label-safe key for a pool: `<image>.<type>.<location>`.
pub fn pool_key(image: &str, server_type: &str, location: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' }).collect()
    };
    let mut k = format!("{}.{}.{}", clean(image), clean(server_type), clean(location));
    k.truncate(63);
    k
}

/// Everything Wakegate made for one machine: its server, its snapshots.
fn machine_selector(machine: &str) -> String {
    format!("{MANAGED_BY}={MANAGED_BY_VALUE},machine={machine}")
}

fn backend(e: impl std::fmt::Display) -> CloudError {
    CloudError::Backend(e.to_string())
}

fn api_err(e: ApiError) -> CloudError {
    match e {
        ApiError::Action { .. } => CloudError::Failed(e.to_string()),
        ApiError::Api { status, .. } if (400..500).contains(&status) && status != 404 && status != 409 => {
            CloudError::Failed(e.to_string())
        }
        _ => CloudError::Backend(e.to_string()),
    }
}

pub struct HetznerCloud {
    client: Client,
    settings: HetznerSettings,
    store: SharedStore,
    key: Key,
    firewall: tokio::sync::OnceCell<i64>,
}

/// Label values: at most 63 of `[a-zA-Z0-9._-]`.
fn label_value(s: &str) -> String {
    let mut v: String =
        s.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    v.truncate(63);
    v
}

impl HetznerCloud {
    pub fn new(settings: HetznerSettings, store: SharedStore, key: Key) -> Result<HetznerCloud, CloudError> {
        let client = Client::new(settings.api.clone()).map_err(backend)?;
        Ok(HetznerCloud { client, settings, store, key, firewall: tokio::sync::OnceCell::new() })
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    pub fn settings(&self) -> &HetznerSettings {
        &self.settings
    }

    fn new_name() -> MachineId {
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).expect("OS randomness");
        format!("wg-{}", hex::encode(b))
    }

    async fn record(&self, machine: &str) -> Result<Option<MachineRecord>, CloudError> {
        match self.store.table_get(MACHINES, machine).await.map_err(backend)? {
            Some(raw) => Ok(Some(serde_json::from_str(&raw).map_err(backend)?)),
            None => Ok(None),
        }
    }

    async fn put_record(&self, machine: &str, r: &MachineRecord) -> Result<(), CloudError> {
        let raw = serde_json::to_string(r).map_err(backend)?;
        self.store.table_put(MACHINES, machine, &raw).await.map_err(backend)
    }

    /// A pool's key: its project's name or its image, with the type and location.
    fn pool_key_of(&self, spec: &PoolSpec) -> String {
        match &spec.project {
            Some(p) => pool_key(&format!("project-{p}"), &spec.server_type, &spec.location),
            None => pool_key(spec.image.as_deref().unwrap_or(&self.settings.image), &spec.server_type, &spec.location),
        }
    }

    /// What a pool's machines are made from now: a project's current database image
    /// (its snapshot, and the image's id) once one is ready, else the pool's image.
    /// `None` when the store cannot say (nothing is made this round).
    async fn pool_source(&self, spec: &PoolSpec) -> Option<(String, Option<String>)> {
        let plain = spec.image.clone().unwrap_or_else(|| self.settings.image.clone());
        let Some(name) = &spec.project else { return Some((plain, None)) };
        let Some(project) = self.store.project_by_name(name).await.ok()? else { return Some((plain, None)) };
        match wakegate_db::Images::new(self.store.clone()).current(&project.id).await.ok()? {
            Some(i) if !i.location.is_empty() => Some((i.location, Some(i.id))),
            _ => Some((plain, None)),
        }
    }

    fn spec_of(&self, project: &Project) -> (String, String, String) {
        (
            self.settings.image.clone(),
            project.machine.server_type.clone().unwrap_or_else(|| self.settings.server_type.clone()),
            project.machine.location.clone().unwrap_or_else(|| self.settings.location.clone()),
        )
    }

    /// The rules of the preview firewall: 80/443 from the edge and the control plane.
    pub fn firewall_rules(&self) -> Vec<models::Rule> {
        let mut sources = self.settings.edge_ranges.clone();
        sources.extend(self.settings.control_plane_ips.iter().cloned());
        ["80", "443"]
            .into_iter()
            .map(|port| models::Rule {
                description: Some(Some(format!(
                    "HTTP{} from the edge and control plane",
                    if port == "443" { "S" } else { "" }
                ))),
                destination_ips: None,
                direction: models::rule::Direction::In,
                port: Some(Some(port.into())),
                protocol: models::rule::Protocol::Tcp,
                source_ips: Some(sources.clone()),
            })
            .collect()
    }

    /// Finds or creates the managed firewall and brings its rules up to date.
    pub async fn ensure_firewall(&self) -> Result<i64, CloudError> {
        self.firewall
            .get_or_try_init(|| async {
                let rules = self.firewall_rules();
                let sel = format!("{MANAGED_BY}={MANAGED_BY_VALUE},role=previews");
                let existing = self.client.firewalls(&sel).await.map_err(api_err)?;
                if let Some(fw) = existing.into_iter().find(|f| f.name == FIREWALL_NAME) {
                    let same = fw.rules.len() == rules.len()
                        && fw.rules.iter().zip(&rules).all(|(have, want)| {
                            Some(&have.source_ips) == want.source_ips.as_ref()
                                && have.port.as_deref() == want.port.clone().flatten().as_deref()
                        });
                    if !same {
                        info!(firewall = fw.id, "updating the preview firewall's rules");
                        self.client.set_firewall_rules(fw.id, rules).await.map_err(api_err)?;
                    }
                    return Ok(fw.id);
                }
                let labels = HashMap::from([
                    (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
                    ("role".into(), "previews".into()),
                ]);
                let req = models::CreateFirewallRequest {
                    apply_to: None,
                    labels: Some(labels),
                    name: FIREWALL_NAME.into(),
                    rules: Some(rules),
                };
                match self.client.create_firewall(&req).await {
                    Ok(fw) => {
                        info!(firewall = fw.id, "created the preview firewall");
                        Ok(fw.id)
                    }
                    // another replica made it first
                    Err(e) if e.code() == Some("uniqueness_error") => {
                        let found = self.client.firewalls(&sel).await.map_err(api_err)?;
                        found.into_iter().find(|f| f.name == FIREWALL_NAME).map(|f| f.id).ok_or_else(|| api_err(e))
                    }
                    Err(e) => Err(api_err(e)),
                }
            })
            .await
            .copied()
    }

    fn labels(&self, machine: &str, record: &MachineRecord, project: Option<&str>) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
            ("machine".to_string(), machine.to_string()),
        ]);
        if let Some(p) = &record.preview {
            l.insert("preview".into(), label_value(p));
        }
        if let Some(p) = project {
            l.insert("project".into(), label_value(p));
        }
        if let Some(p) = &record.pool {
            l.insert("pool".into(), p.clone());
        }
        l
    }

    /// Creates the server for `machine` unless it exists (Hetzner answers a second create
    /// of the name with `uniqueness_error`); returns it once running.
    async fn ensure_server(
        &self,
        machine: &str,
        image: &str,
        server_type: &str,
        location: &str,
        record: &mut MachineRecord,
        labels: HashMap<String, String>,
    ) -> Result<models::Server, CloudError> {
        let firewall = self.ensure_firewall().await?;
        let user_data = userdata::cloud_config(&userdata::AgentConfig {
            control: self.settings.control_url.clone(),
            machine: machine.to_string(),
            token: wakegate_core::sign::machine_token(&self.key, machine),
            root: "/srv/wakegate".into(),
            port: self.settings.app_port,
        });
        let req = models::CreateServerRequest {
            firewalls: Some(vec![models::CreateServerRequestFirewalls { firewall }]),
            labels: Some(labels),
            location: Some(location.to_string()),
            start_after_create: Some(true),
            user_data: Some(user_data),
            ..models::CreateServerRequest::new(image.to_string(), machine.to_string(), server_type.to_string())
        };
        let created = match self.client.create_server(&req).await {
            Ok(c) => c,
            // created already, e.g. by an earlier attempt whose answer was lost
            Err(e) if e.code() == Some("uniqueness_error") => {
                let s = self.client.server_by_name(machine).await.map_err(api_err)?.ok_or_else(|| api_err(e))?;
                return self.note_server(machine, record, s).await;
            }
            Err(e) => return Err(api_err(e)),
        };
        info!(machine, server = created.server.id, image, server_type, location, "server created");
        record.server_id = Some(created.server.id);
        (record.ip, record.host) = address_of(&created.server);
        self.put_record(machine, record).await?;
        self.client.wait(*created.action).await.map_err(api_err)?;
        Ok(*created.server)
    }

    async fn note_server(
        &self,
        machine: &str,
        record: &mut MachineRecord,
        s: models::Server,
    ) -> Result<models::Server, CloudError> {
        let (ip, host) = address_of(&s);
        if record.server_id != Some(s.id) || record.ip != ip || record.host != host {
            record.server_id = Some(s.id);
            (record.ip, record.host) = (ip, host);
            self.put_record(machine, record).await?;
        }
        Ok(s)
    }

    /// Waits until the agent reports: the preview leaves `Building`/`Waking` on `machine`.
    async fn await_report(&self, preview: &str, machine: &str) -> Result<Outcome, CloudError> {
        let deadline = tokio::time::Instant::now() + self.settings.ready_timeout;
        let mut after = 0;
        loop {
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(CloudError::Failed(format!(
                    "machine {machine} did not report ready within {}s",
                    self.settings.ready_timeout.as_secs()
                )));
            }
            let Some(p) = self.store.wait_preview(preview, after, deadline - now).await.map_err(backend)? else {
                return Ok(Outcome::Reported);
            };
            after = p.version;
            match &p.value.state {
                State::Building { machine: Some(m), .. } | State::Waking { machine: m } if m == machine => {}
                _ => return Ok(Outcome::Reported),
            }
        }
    }

    /// Takes a ready machine from the pool for `key`, if any; exactly one caller gets it.
    /// Machines made from `db_image` come first, then the youngest (the oldest get
    /// recycled).
    async fn take_from_pool(
        &self,
        key: &str,
        preview: &Preview,
        project: &Project,
        db_image: Option<&str>,
    ) -> Option<MachineId> {
        let table = pool_table(key);
        let mut ready: Vec<(String, PoolEntry)> =
            self.store.table_list(&table).await.ok()?.into_iter().map(|(m, raw)| (m, PoolEntry::parse(&raw))).collect();
        ready.sort_by_key(|(_, e)| (std::cmp::Reverse(e.db_image.as_deref() == db_image), std::cmp::Reverse(e.born)));
        for (machine, entry) in ready {
            if !self.store.table_remove(&table, &machine).await.unwrap_or(false) {
                continue; // another build took it
            }
            let mut record = self.record(&machine).await.ok().flatten().unwrap_or_default();
            record.preview = Some(preview.id.clone());
            if self.put_record(&machine, &record).await.is_err() {
                continue;
            }
            if let Some(id) = record.server_id {
                let mut labels = self.labels(&machine, &record, Some(&project.name));
                if let Some(i) = &entry.db_image {
                    labels.insert("db-image".into(), i.clone());
                }
                if let Err(e) = self.client.set_server_labels(id, labels).await {
                    warn!(%machine, error = %e, "labelling a pool machine failed");
                }
            }
            info!(%machine, pool = key, preview = %preview.id, db_image = ?entry.db_image, "took a ready machine from the pool");
            return Some(machine);
        }
        None
    }

    /// One round of the pool keeper: recycle ready machines that are old or made from a
    /// database image the project has moved on from, refill to `min_ready` without
    /// passing `max`. Returns how many machines it created.
    pub async fn keep_pools(&self) -> usize {
        let mut created = 0;
        for spec in &self.settings.pools {
            let key = self.pool_key_of(spec);
            let Some((image, db_image)) = self.pool_source(spec).await else { continue };
            let table = pool_table(&key);
            let Ok(mut ready) = self.store.table_list(&table).await else { continue };
            let now = now_ms();
            let max_age = spec.max_age_secs.saturating_mul(1000);
            for (machine, raw) in ready.clone() {
                let entry = PoolEntry::parse(&raw);
                let old = now.saturating_sub(entry.born) >= max_age;
                // a project's new base: machines with the old data on their disks go
                let stale = spec.project.is_some() && entry.db_image != db_image;
                if (old || stale) && self.store.table_remove(&table, &machine).await.unwrap_or(false) {
                    let why = if old { "old" } else { "made from an older database image" };
                    info!(%machine, pool = %key, why, "recycling a pool machine");
                    ready.retain(|(m, _)| *m != machine);
                    if let Err(e) = self.delete(&machine).await {
                        warn!(%machine, error = %e, "deleting a recycled pool machine failed; the reaper will");
                    }
                }
            }
            metrics::gauge!(wakegate_core::metrics::POOL_READY, "pool" => key.clone()).set(ready.len() as f64);
            metrics::gauge!(wakegate_core::metrics::POOL_SIZE, "pool" => key.clone()).set(spec.min_ready as f64);
            if ready.len() >= spec.min_ready {
                continue;
            }
            // machines of this pool not assigned yet, including ones still booting
            let sel = format!("{MANAGED_BY}={MANAGED_BY_VALUE},pool={key},!preview");
            let Ok(existing) = self.client.servers(&sel).await else { continue };
            let room = spec.max.saturating_sub(existing.len());
            let want = (spec.min_ready - ready.len()).min(room);
            let jobs = (0..want).map(|_| self.add_to_pool(&key, &image, db_image.as_deref(), spec));
            created += futures_util::future::join_all(jobs).await.into_iter().filter(|ok| *ok).count();
        }
        created
    }

    async fn add_to_pool(&self, key: &str, image: &str, db_image: Option<&str>, spec: &PoolSpec) -> bool {
        let machine = Self::new_name();
        let mut record = MachineRecord { pool: Some(key.to_string()), created_at: now_ms(), ..Default::default() };
        if self.put_record(&machine, &record).await.is_err() {
            return false;
        }
        let mut labels = self.labels(&machine, &record, spec.project.as_deref());
        if let Some(i) = db_image {
            labels.insert("db-image".into(), i.to_string());
        }
        match self.ensure_server(&machine, image, &spec.server_type, &spec.location, &mut record, labels).await {
            Ok(_) => {
                let entry = PoolEntry { born: record.created_at, db_image: db_image.map(str::to_string) };
                let raw = serde_json::to_string(&entry).unwrap_or_default();
                self.store.table_put(&pool_table(key), &machine, &raw).await.is_ok()
            }
            Err(e) => {
                warn!(%machine, error = %e, "creating a pool machine failed");
                if let Err(e) = self.delete(&machine).await {
                    warn!(%machine, error = %e, "deleting the failed pool machine failed; the reaper will");
                }
                false
            }
        }
    }

    /// Runs the pool keeper every `every` until `stop` turns true.
    pub async fn run_pools(self: Arc<Self>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let n = self.keep_pools().await;
            if n > 0 {
                info!(created = n, "pool keeper refilled");
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn snapshots_of(&self, machine: &str) -> Result<Vec<models::Image>, CloudError> {
        let mut imgs = self.client.snapshots(&machine_selector(machine)).await.map_err(api_err)?;
        imgs.sort_by_key(|i| api::parse_time(&i.created).unwrap_or(0));
        Ok(imgs)
    }

    /// Waits for `machine`'s agent to carry out the order `table` holds for it:
    /// `read` says whether the agent has asked for it, and its outcome once there is one.
    /// Fails when the order goes, when the agent does not ask within `unasked`, or when
    /// it is not done within `timeout`; a store that fails a while is asked again.
    async fn await_order<O: serde::de::DeserializeOwned, T>(
        &self,
        table: &str,
        machine: &str,
        what: &str,
        unasked: Duration,
        timeout: Duration,
        read: impl Fn(O) -> (bool, Option<Result<T, CloudError>>),
    ) -> Result<T, CloudError> {
        let started = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.settings.api.action_poll.min(Duration::from_millis(250))).await;
            let raw = match self.store.table_get(table, machine).await {
                Ok(Some(raw)) => raw,
                Ok(None) => return Err(CloudError::Failed(format!("{what} for {machine} vanished"))),
                Err(e) if started.elapsed() < timeout => {
                    warn!(%machine, error = %e, "reading {what} failed; asking again");
                    continue;
                }
                Err(e) => return Err(backend(e)),
            };
            let (fetched, done) = read(serde_json::from_str(&raw).map_err(backend)?);
            if let Some(done) = done {
                return done;
            }
            if !fetched && started.elapsed() >= unasked {
                return Err(CloudError::Failed(format!(
                    "machine {machine}'s agent did not ask for {what} within {} s (an agent from an older \
                     release, or a machine that stopped answering)",
                    unasked.as_secs()
                )));
            }
            if started.elapsed() >= timeout {
                return Err(CloudError::Failed(format!(
                    "machine {machine} did not carry out {what} within {} min",
                    timeout.as_secs() / 60
                )));
            }
        }
    }

    async fn shutdown(&self, server: i64) -> Result<(), CloudError> {
        match tokio::time::timeout(self.settings.shutdown_timeout, self.client.server_action(server, "shutdown")).await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                warn!(server, error = %e, "graceful shutdown failed; powering off");
                self.client.server_action(server, "poweroff").await.map_err(api_err)
            }
            Err(_) => {
                warn!(server, "graceful shutdown timed out; powering off");
                self.client.server_action(server, "poweroff").await.map_err(api_err)
            }
        }
    }
}

#[async_trait]
impl Cloud for HetznerCloud {
    async fn create(&self, preview: &Preview, project: &Project) -> Result<MachineId, CloudError> {
        let (image, server_type, location) = self.spec_of(project);
        let fits = |p: &&PoolSpec| p.server_type == server_type && p.location == location;
        // the project's own pool first (its machines may hold its database), then the
        // pool of its image, type and location
        if let Some(spec) = self.settings.pools.iter().filter(fits).find(|p| p.project.as_ref() == Some(&project.name))
        {
            let db_image = self.pool_source(spec).await.and_then(|(_, i)| i);
            if let Some(m) = self.take_from_pool(&self.pool_key_of(spec), preview, project, db_image.as_deref()).await {
                return Ok(m);
            }
        }
        let key = pool_key(&image, &server_type, &location);
        if self.settings.pools.iter().any(|p| p.project.is_none() && self.pool_key_of(p) == key) {
            if let Some(m) = self.take_from_pool(&key, preview, project, None).await {
                return Ok(m);
            }
        }
        let machine = Self::new_name();
        let record = MachineRecord { preview: Some(preview.id.clone()), created_at: now_ms(), ..Default::default() };
        self.put_record(&machine, &record).await?;
        Ok(machine)
    }

    async fn deploy(
        &self,
        machine: &MachineId,
        spec: &DeploySpec,
        // the agent on the machine reports its phases itself
        _progress: &dyn Progress,
    ) -> Result<Outcome, CloudError> {
        let mut record = self.record(machine).await?.unwrap_or(MachineRecord {
            preview: Some(spec.preview_id.clone()),
            created_at: now_ms(),
            ..Default::default()
        });
        if record.preview.as_deref() != Some(spec.preview_id.as_str()) {
            record.preview = Some(spec.preview_id.clone());
            self.put_record(machine, &record).await?;
        }
        let (image, server_type, location) = self.spec_of(&spec.project);
        let labels = self.labels(machine, &record, Some(&spec.project.name));
        // a new server starts from the project's newest database image: its data is on
        // the disk (the agent checks that it fits the branch's recipe, else imports)
        let made = match spec.images.first() {
            Some(db) => {
                let mut labels = labels.clone();
                labels.insert("db-image".into(), db.id.clone());
                let made =
                    self.ensure_server(machine, &db.location, &server_type, &location, &mut record, labels).await;
                if let Err(e) = &made {
                    warn!(%machine, image = %db.id, error = %e, "creating the server from the database image failed; \
                        creating it from the plain image (the dump is imported)");
                }
                made.ok()
            }
            None => None,
        };
        if made.is_none() {
            self.ensure_server(machine, &image, &server_type, &location, &mut record, labels).await?;
        }
        self.await_report(&spec.preview_id, machine).await
    }

    fn wake_kind(&self, project: &Project) -> crate::cloud::WakeKind {
        match project.machine.sleep_mode {
            SleepMode::Stop => crate::cloud::WakeKind::Resume,
            SleepMode::Hibernate => crate::cloud::WakeKind::Cold,
        }
    }

    async fn start(&self, machine: &MachineId, project: &Project) -> Result<Outcome, CloudError> {
        let mut record = self.record(machine).await?.unwrap_or_default();
        let preview = record.preview.clone().ok_or_else(|| CloudError::NotFound(machine.clone()))?;
        match self.client.server_by_name(machine).await.map_err(api_err)? {
            Some(s) => {
                let s = self.note_server(machine, &mut record, s).await?;
                if s.status != models::server::Status::Running {
                    self.client.server_action(s.id, "poweron").await.map_err(api_err)?;
                }
            }
            None => {
                // hibernated: the newest snapshot becomes the server again
                let snaps = self.snapshots_of(machine).await?;
                let Some(snap) = snaps.last() else {
                    return Err(CloudError::NotFound(machine.clone()));
                };
                let (_, server_type, location) = self.spec_of(project);
                let image = snap.id.to_string();
                let labels = self.labels(machine, &record, Some(&project.name));
                self.ensure_server(machine, &image, &server_type, &location, &mut record, labels).await?;
            }
        }
        let outcome = self.await_report(&preview, machine).await?;
        // awake again: the snapshots are spent (the next hibernation makes a new one)
        if let Ok(snaps) = self.snapshots_of(machine).await {
            for s in snaps {
                if let Err(e) = self.client.delete_image(s.id).await {
                    warn!(%machine, image = s.id, error = %e, "deleting a used snapshot failed");
                }
            }
        }
        Ok(outcome)
    }

    async fn stop(&self, machine: &MachineId, project: &Project) -> Result<(), CloudError> {
        let record = self.record(machine).await?.unwrap_or_default();
        let Some(server) = self.client.server_by_name(machine).await.map_err(api_err)? else {
            // already hibernated by an earlier attempt?
            return if self.snapshots_of(machine).await?.is_empty() {
                Err(CloudError::NotFound(machine.clone()))
            } else {
                Ok(())
            };
        };
        if server.status != models::server::Status::Off {
            self.shutdown(server.id).await?;
        }
        if project.machine.sleep_mode == SleepMode::Hibernate {
            let mut labels = self.labels(machine, &record, Some(&project.name));
            labels.remove("pool");
            let description = format!("wakegate hibernation of {machine}");
            let image = self.client.create_snapshot(server.id, &description, labels).await.map_err(api_err)?;
            // keep only the snapshot just made
            for old in self.snapshots_of(machine).await? {
                if old.id != image {
                    self.client.delete_image(old.id).await.map_err(api_err)?;
                }
            }
            self.client.delete_server(server.id).await.map_err(api_err)?;
            info!(%machine, image, "hibernated: snapshot kept, server deleted");
        } else {
            info!(%machine, "stopped");
        }
        Ok(())
    }

    async fn delete(&self, machine: &MachineId) -> Result<(), CloudError> {
        // a managed image without a machine label is listed as `image-<id>`
        if let Some(id) = machine.strip_prefix("image-").and_then(|i| i.parse::<i64>().ok()) {
            return self.client.delete_image(id).await.map_err(api_err);
        }
        // every server Wakegate makes carries its machine label from creation on
        for s in self.client.servers(&machine_selector(machine)).await.map_err(api_err)? {
            self.client.delete_server(s.id).await.map_err(api_err)?;
        }
        for img in self.snapshots_of(machine).await? {
            self.client.delete_image(img.id).await.map_err(api_err)?;
        }
        if let Some(r) = self.record(machine).await? {
            if let Some(pool) = r.pool {
                if let Err(e) = self.store.table_remove(&pool_table(&pool), machine).await {
                    warn!(%machine, error = %e, "removing a deleted machine from its pool failed");
                }
            }
        }
        self.store.table_remove(PULL_ORDERS, machine).await.map_err(backend)?;
        self.store.table_remove(MACHINES, machine).await.map_err(backend)?;
        info!(%machine, "machine deleted");
        Ok(())
    }

    async fn bake_image(&self, order: &crate::cloud::BakeOrder) -> Result<crate::cloud::Baked, CloudError> {
        self.bake(order).await
    }

    /// Removes the image's snapshot and whatever a bake of it left. Servers made from
    /// the snapshot are their own disks: they are not touched.
    async fn drop_image(&self, id: &str, _location: &str) -> Result<bool, CloudError> {
        self.remove_image(id).await.map(|()| true)
    }

    async fn images(&self) -> Result<Vec<String>, CloudError> {
        self.image_ids().await
    }

    async fn refresh_db(
        &self,
        _machine: &MachineId,
        _images: &[crate::cloud::ImageSource],
        _dump: Option<&crate::cloud::DumpSource>,
    ) -> Result<crate::cloud::DbMade, CloudError> {
        // the image's directory became the preview's (renamed, not cloned: ext4 has no
        // reflink), so nothing on the machine is left to refresh from
        Err(CloudError::Failed(
            "refreshing a preview's data is not offered on Hetzner yet: rebuild the preview (its new server \
             starts from the current database image)"
                .into(),
        ))
    }

    async fn pull_db(
        &self,
        machine: &MachineId,
        bucket: &wakegate_db::s3::Bucket,
        key: &str,
    ) -> Result<u64, CloudError> {
        let order = PullOrder { key: key.to_string(), fetched: false, outcome: None };
        let raw = serde_json::to_string(&order).map_err(backend)?;
        self.store.table_put(PULL_ORDERS, machine, &raw).await.map_err(backend)?;
        let outcome = self
            .await_order(PULL_ORDERS, machine, "the dump order", PULL_UNASKED, PULL_TIMEOUT, |o: PullOrder| {
                if o.key != key {
                    return (true, Some(Err(CloudError::Failed("another pull replaced this one".into()))));
                }
                let done = o.outcome.map(|out| match out {
                    PullOutcome::Uploaded { size } => Ok(size),
                    PullOutcome::Failed { reason } => Err(CloudError::Failed(reason)),
                });
                (o.fetched, done)
            })
            .await;
        if let Err(e) = self.store.table_remove(PULL_ORDERS, machine).await {
            warn!(%machine, error = %e, "forgetting a dump order failed");
        }
        let size = outcome?;
        // the machine says it uploaded: S3 must agree
        match bucket.size(key).await.map_err(CloudError::Backend)? {
            Some(s) if s == size => Ok(size),
            Some(s) => Err(CloudError::Failed(format!("the machine reported {size} bytes, and S3 holds {s}"))),
            None => Err(CloudError::Failed("the machine reported an upload that S3 does not hold".into())),
        }
    }

    async fn list(&self) -> Result<Listing, CloudError> {
        let before = self.client.counters().requests;
        let sel = format!("{MANAGED_BY}={MANAGED_BY_VALUE}");
        let mut by_machine: BTreeMap<String, MachineInfo> = BTreeMap::new();
        let mut images_keep = std::collections::HashSet::new();
        let mut add = |labels: &HashMap<String, String>, fallback: &str, created: &str, status: &str, cost: f64| {
            let id = labels.get("machine").cloned().unwrap_or_else(|| fallback.to_string());
            // builders and database images are the image keeper's, not the reaper's
            if matches!(labels.get("role").map(String::as_str), Some(bake::ROLE_BAKE | bake::ROLE_IMAGE)) {
                images_keep.insert(id.clone());
            }
            let created_at = api::parse_time(created).unwrap_or(0);
            let e = by_machine.entry(id.clone()).or_insert(MachineInfo {
                id,
                preview_id: labels.get("preview").cloned().unwrap_or_default(),
                created_at,
                held: false,
                status: status.to_string(),
                hourly_cost: 0.0,
            });
            e.created_at = e.created_at.min(created_at);
            e.hourly_cost += cost;
        };
        for s in self.client.servers(&sel).await.map_err(api_err)? {
            // a server is billed whether it runs or not, at its type's price where it is
            let price = s
                .server_type
                .prices
                .iter()
                .find(|p| p.location == s.location.name)
                .and_then(|p| p.price_hourly.gross.parse::<f64>().ok())
                .unwrap_or(0.0);
            let status = serde_json::to_value(s.status).ok();
            let status = status.as_ref().and_then(|v| v.as_str()).unwrap_or("unknown");
            add(&s.labels, &s.name, &s.created, status, price);
        }
        for i in self.client.snapshots(&sel).await.map_err(api_err)? {
            let gb = i.image_size.unwrap_or(i.disk_size);
            add(&i.labels, &format!("image-{}", i.id), &i.created, "snapshot", gb * SNAPSHOT_EUR_PER_GB_HOUR);
        }
        // ready pool machines belong to the backend
        let mut held = std::collections::HashSet::new();
        for spec in &self.settings.pools {
            let table = pool_table(&self.pool_key_of(spec));
            for (m, _) in self.store.table_list(&table).await.map_err(backend)? {
                held.insert(m);
            }
        }
        let mut out: Vec<MachineInfo> = by_machine.into_values().collect();
        for m in &mut out {
            m.held = held.contains(&m.id) || images_keep.contains(&m.id);
        }
        let requests = self.client.counters().requests.saturating_sub(before);
        Ok(Listing { machines: out, requests: u32::try_from(requests).unwrap_or(u32::MAX) })
    }
}
