//! Wakegate's store: everything waker and provisioner share.
//!
//! * [`Store`] — the one trait: projects, preview records with versions and
//!   compare-and-set, the host index, TTL and activity indexes, an idempotent job queue
//!   with leases, and status waits (a long-poll on a record's version);
//! * [`embedded::EmbeddedStore`] — one process, memory plus an append-only file
//!   (`wakegate dev`, small installs);
//! * [`redis_store::RedisStore`] — Redis for several replicas: Lua scripts for CAS,
//!   a stream with a consumer group for jobs (leases are pending entries, reclaimed with
//!   `XAUTOCLAIM`), sorted sets for TTL and activity, pub/sub for status;
//! * [`conformance`] — the suite both must pass.
#![forbid(unsafe_code)]

pub mod conformance;
pub mod driver;
pub mod embedded;
pub mod logs;
pub mod redis_store;
pub mod secret;
pub mod stats;

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use wakegate_core::lifecycle::JobKind;
use wakegate_core::route::{Preview, Project};
use wakegate_core::Millis;

pub use embedded::EmbeddedStore;
pub use redis_store::RedisStore;

/// Wall-clock time in ms since the Unix epoch, as tokio's clock sees it. In production
/// this is the system clock. Under tokio's paused test clock (`start_paused`) it moves
/// with the simulated time only, so a simulation runs the real waker and provisioner
/// through simulated days. The waker, the provisioner and the Hetzner client read "now"
/// (as wall time) through this.
pub fn now_ms() -> Millis {
    let wall =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i128).unwrap_or(0);
    // tokio's now equals the monotonic now unless the clock is paused (then it is where
    // the simulation has moved it); the difference is the simulation's offset. Summed in
    // nanoseconds and rounded once.
    let tokio_now = tokio::time::Instant::now().into_std();
    let real_now = std::time::Instant::now();
    let offset = match tokio_now.checked_duration_since(real_now) {
        Some(ahead) => ahead.as_nanos() as i128,
        None => -(real_now.duration_since(tokio_now).as_nanos() as i128),
    };
    u64::try_from((wall + offset) / 1_000_000).unwrap_or(0)
}

/// A value with the version it was read at. Versions start at 1 and grow by one a write.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned<T> {
    pub version: u64,
    pub value: T,
}

/// The answer to an enqueue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub job_id: String,
    /// False when a job of this kind was already pending or running for the preview.
    pub created: bool,
}

/// Jobs are claimed per lane, so a wake never waits behind builds that take minutes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    /// Builds, and database pulls (both take minutes).
    Build,
    /// Wakes, sleeps and erases.
    Quick,
}

impl Lane {
    pub const ALL: [Lane; 2] = [Lane::Build, Lane::Quick];

    pub fn of(kind: JobKind) -> Lane {
        match kind {
            JobKind::Build | JobKind::PullDb | JobKind::RefreshDb => Lane::Build,
            JobKind::Wake | JobKind::Sleep | JobKind::Erase => Lane::Quick,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Build => "build",
            Lane::Quick => "quick",
        }
    }
}

/// A job claimed by a worker until the lease runs out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub preview_id: String,
    pub kind: JobKind,
    pub worker: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The record changed since it was read: read again and retry.
    #[error("version conflict")]
    Conflict,
    #[error("{0} already exists")]
    Exists(String),
    /// The job's lease ran out and another worker may have it.
    #[error("lease on job {0} was lost")]
    LeaseLost(String),
    #[error("corrupt record {key}: {reason}")]
    Corrupt { key: String, reason: String },
    /// The backend failed; retrying may help.
    #[error("store backend: {0}")]
    Backend(String),
}

impl StoreError {
    /// Whether trying again later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict | StoreError::Backend(_))
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The shared state of a Wakegate installation.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a project; its name must be unused.
    async fn create_project(&self, project: &Project) -> Result<()>;
    async fn get_project(&self, id: &str) -> Result<Option<Project>>;
    async fn project_by_name(&self, name: &str) -> Result<Option<Project>>;
    async fn list_projects(&self) -> Result<Vec<Project>>;

    async fn get_preview(&self, id: &str) -> Result<Option<Versioned<Preview>>>;
    /// Writes a preview if its stored version is `expected` (`None`: must not exist).
    /// Returns the new version and wakes status waiters.
    async fn put_preview(&self, preview: &Preview, expected: Option<u64>) -> Result<u64>;
    async fn list_previews(&self) -> Result<Vec<Versioned<Preview>>>;

    /// Points a normalized host at a preview. A host bound to another preview is `Exists`.
    async fn bind_host(&self, host: &str, preview_id: &str) -> Result<()>;
    async fn resolve_host(&self, host: &str) -> Result<Option<String>>;
    /// Unbinds a host, but only while it still points at `preview_id`; `true` when this
    /// call removed it.
    async fn unbind_host(&self, host: &str, preview_id: &str) -> Result<bool>;

    /// Sets or clears when a preview's TTL runs out.
    async fn set_expiry(&self, preview_id: &str, at: Option<Millis>) -> Result<()>;
    /// Previews whose expiry is at or before `now`, soonest first.
    async fn due_expiries(&self, now: Millis, limit: usize) -> Result<Vec<String>>;

    /// Records activity; a later time wins.
    async fn touch(&self, preview_ids: &[String], at: Millis) -> Result<()>;
    async fn last_activity(&self, preview_id: &str) -> Result<Option<Millis>>;
    /// Previews whose last activity is before `before`, oldest first.
    async fn idle_before(&self, before: Millis, limit: usize) -> Result<Vec<(String, Millis)>>;
    /// Drops a preview's activity entry if it still reads `at` (a touch since then
    /// keeps it): the idle sweeper clears entries of previews that are not running, so
    /// they never crowd running ones out of its batch.
    async fn forget_activity(&self, preview_id: &str, at: Millis) -> Result<()>;

    /// Counts one use of `key`'s budget of `limit` uses per `window` (GCRA: a burst of
    /// `limit`, then one use every `window / limit`); `false` when it is spent. Shared
    /// by every replica; an entry expires with its window, so memory stays bounded.
    async fn rate_limit(&self, key: &str, limit: u32, window: Duration, now: Millis) -> Result<bool>;
    /// Remembers a signature nonce until `until`; `false` when it was already seen, by
    /// any replica.
    async fn claim_nonce(&self, nonce: &str, until: Millis, now: Millis) -> Result<bool>;

    /// Adds a job unless one of this kind is already pending or leased for the preview.
    async fn enqueue(&self, preview_id: &str, kind: JobKind) -> Result<Enqueued>;
    /// Takes the oldest job of `lane` that is unleased or whose lease ran out.
    async fn claim(&self, worker: &str, lane: Lane, lease: Duration, now: Millis) -> Result<Option<Lease>>;
    /// Extends a lease; `LeaseLost` if another worker took the job.
    async fn renew(&self, lease: &Lease, duration: Duration, now: Millis) -> Result<()>;
    /// Removes a finished job, freeing its (preview, kind) slot.
    async fn complete(&self, lease: &Lease) -> Result<()>;
    /// Jobs pending or leased, as (preview, kind).
    async fn jobs(&self) -> Result<Vec<(String, JobKind)>>;

    /// Returns when a job may have been enqueued (anywhere, for Redis) or after
    /// `timeout`: workers wait on this instead of polling, so a wake starts at once.
    async fn wait_for_jobs(&self, timeout: Duration);

    /// Waits until the preview's version exceeds `after` or the timeout passes; returns
    /// the record as it is then.
    async fn wait_preview(&self, id: &str, after: u64, timeout: Duration) -> Result<Option<Versioned<Preview>>>;

    /// Small named tables that backends keep their bookkeeping in (pools of ready
    /// machines, which preview a machine works for). Sets `key` to `value`.
    async fn table_put(&self, table: &str, key: &str, value: &str) -> Result<()>;
    async fn table_get(&self, table: &str, key: &str) -> Result<Option<String>>;
    /// Removes a key; `true` only for the one caller whose call removed it, so removal
    /// doubles as an atomic take between replicas.
    async fn table_remove(&self, table: &str, key: &str) -> Result<bool>;
    async fn table_list(&self, table: &str) -> Result<Vec<(String, String)>>;
    /// Compare-and-set on a table row: writes `value` (`None` removes the row) only if
    /// the row still holds `expected` (`None`: absent). `false` when it did not, and
    /// nothing was written. Records kept as JSON in a table (orgs) are updated this way;
    /// a put with `expected = None` doubles as an atomic claim of a name.
    async fn table_swap(&self, table: &str, key: &str, expected: Option<&str>, value: Option<&str>) -> Result<bool>;
}

pub type SharedStore = Arc<dyn Store>;

/// Long-polls shared by both implementations: check, then wait for a change signal or a
/// short tick (so a lost notification only delays, never hangs), until the deadline.
pub(crate) async fn wait_with<S: Store + ?Sized>(
    store: &S,
    notify: &tokio::sync::Notify,
    id: &str,
    after: u64,
    timeout: Duration,
) -> Result<Option<Versioned<Preview>>> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let current = store.get_preview(id).await?;
        match &current {
            Some(v) if v.version > after => return Ok(current),
            None => return Ok(None),
            _ => {}
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(current);
        }
        let tick = (deadline - now).min(Duration::from_millis(500));
        let _ = tokio::time::timeout(tick, notified).await;
    }
}

/// One GCRA step: the new theoretical arrival time, or `None` when the budget is spent.
/// `tat` is the stored arrival time (0 for a new key).
pub fn gcra(tat: Millis, limit: u32, window: Duration, now: Millis) -> Option<Millis> {
    let window = window.as_millis().min(u64::MAX as u128) as Millis;
    let interval = (window / Millis::from(limit.max(1))).max(1);
    let next = tat.max(now).saturating_add(interval);
    (next - now <= window).then_some(next)
}

/// A random id: 16 hex chars with a prefix.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{}", random_hex::<8>())
}

/// `N` random bytes from the OS, as hex. The OS's generator fails only on a system
/// without one (no `getrandom` and no `/dev/urandom`), which nothing sent can cause.
pub fn random_hex<const N: usize>() -> String {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("OS randomness");
    hex::encode(b)
}

/// Rewrites the JSON record at `table`/`key` with what `f` makes of it, by compare and
/// swap, trying again when another writer got there first. `f` sees the record as it is
/// now and returns the new one, or `None` to leave it; the answer is what was written
/// (`None`: no record, or left as it was).
pub async fn edit_record<T: serde::Serialize + serde::de::DeserializeOwned>(
    store: &dyn Store,
    table: &str,
    key: &str,
    f: impl Fn(T) -> Option<T>,
) -> Result<Option<T>> {
    for _ in 0..16 {
        let Some(raw) = store.table_get(table, key).await? else { return Ok(None) };
        let old: T = serde_json::from_str(&raw)
            .map_err(|e| StoreError::Corrupt { key: format!("{table}/{key}"), reason: e.to_string() })?;
        let Some(new) = f(old) else { return Ok(None) };
        let new_raw = serde_json::to_string(&new)
            .map_err(|e| StoreError::Corrupt { key: format!("{table}/{key}"), reason: e.to_string() })?;
        if store.table_swap(table, key, Some(&raw), Some(&new_raw)).await? {
            return Ok(Some(new));
        }
    }
    Err(StoreError::Conflict)
}
