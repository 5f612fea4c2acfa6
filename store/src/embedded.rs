//! The embedded store: state in memory, every change appended to one file and replayed
//! at start. The file is rewritten compactly when it has grown to several times the live
//! state. One process owns the file.
//!
//! Each record is one line, `<crc32 as 8 hex digits> <json>\n`. At start a last line
//! without its newline is a write torn by a crash and is dropped; any other line that
//! fails its checksum or does not parse stops the start with an error naming the file and
//! line, because it was acknowledged and dropping it would lose data silently. A write
//! that fails part-way (a full disk) is cut back off the file before the error is
//! returned, so the next record starts on a clean line. Rate-limit counters and nonces
//! live in memory only (one process, nothing to share).

use crate::{Enqueued, Lane, Lease, Result, Store, StoreError, Versioned};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use wakegate_core::lifecycle::JobKind;
use wakegate_core::route::{Preview, Project};
use wakegate_core::Millis;

/// Rewrite the log once it holds this many more entries than the live state needs.
const COMPACT_SLACK: usize = 10_000;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op {
    Project { project: Project },
    Preview { version: u64, preview: Preview },
    Host { host: String, preview: String },
    Unhost { host: String },
    Expiry { preview: String, at: Option<Millis> },
    Touch { preview: String, at: Millis },
    Forget { preview: String, at: Millis },
    Job { job: Job },
    JobDone { id: u64 },
    Table { table: String, key: String, value: Option<String> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Job {
    id: u64,
    preview: String,
    kind: JobKind,
    worker: Option<String>,
    lease_until: Millis,
}

#[derive(Default)]
struct State {
    projects: BTreeMap<String, Project>,
    previews: BTreeMap<String, Versioned<Preview>>,
    hosts: HashMap<String, String>,
    expiry_of: HashMap<String, Millis>,
    expiry: BTreeSet<(Millis, String)>,
    activity_of: HashMap<String, Millis>,
    activity: BTreeSet<(Millis, String)>,
    jobs: BTreeMap<u64, Job>,
    job_keys: HashMap<(String, JobKind), u64>,
    next_job: u64,
    tables: BTreeMap<String, BTreeMap<String, String>>,
}

impl State {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Project { project } => {
                self.projects.insert(project.id.clone(), project);
            }
            Op::Preview { version, preview } => {
                self.previews.insert(preview.id.clone(), Versioned { version, value: preview });
            }
            Op::Host { host, preview } => {
                self.hosts.insert(host, preview);
            }
            Op::Unhost { host } => {
                self.hosts.remove(&host);
            }
            Op::Expiry { preview, at } => {
                if let Some(old) = self.expiry_of.remove(&preview) {
                    self.expiry.remove(&(old, preview.clone()));
                }
                if let Some(at) = at {
                    self.expiry.insert((at, preview.clone()));
                    self.expiry_of.insert(preview, at);
                }
            }
            Op::Touch { preview, at } => {
                let old = self.activity_of.get(&preview).copied();
                if old.is_some_and(|old| old >= at) {
                    return;
                }
                if let Some(old) = old {
                    self.activity.remove(&(old, preview.clone()));
                }
                self.activity.insert((at, preview.clone()));
                self.activity_of.insert(preview, at);
            }
            Op::Forget { preview, at } => {
                if self.activity_of.get(&preview) == Some(&at) {
                    self.activity_of.remove(&preview);
                    self.activity.remove(&(at, preview));
                }
            }
            Op::Job { job } => {
                self.next_job = self.next_job.max(job.id + 1);
                self.job_keys.insert((job.preview.clone(), job.kind), job.id);
                self.jobs.insert(job.id, job);
            }
            Op::Table { table, key, value } => match value {
                Some(v) => {
                    self.tables.entry(table).or_default().insert(key, v);
                }
                None => {
                    if let Some(t) = self.tables.get_mut(&table) {
                        t.remove(&key);
                        if t.is_empty() {
                            self.tables.remove(&table);
                        }
                    }
                }
            },
            Op::JobDone { id } => {
                if let Some(job) = self.jobs.remove(&id) {
                    if self.job_keys.get(&(job.preview.clone(), job.kind)) == Some(&id) {
                        self.job_keys.remove(&(job.preview, job.kind));
                    }
                }
            }
        }
    }

    /// The ops that rebuild this state.
    fn snapshot(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        ops.extend(self.projects.values().map(|p| Op::Project { project: p.clone() }));
        ops.extend(self.previews.values().map(|v| Op::Preview { version: v.version, preview: v.value.clone() }));
        ops.extend(self.hosts.iter().map(|(h, p)| Op::Host { host: h.clone(), preview: p.clone() }));
        ops.extend(self.expiry_of.iter().map(|(p, at)| Op::Expiry { preview: p.clone(), at: Some(*at) }));
        ops.extend(self.activity_of.iter().map(|(p, at)| Op::Touch { preview: p.clone(), at: *at }));
        ops.extend(self.jobs.values().map(|j| Op::Job { job: j.clone() }));
        for (table, rows) in &self.tables {
            ops.extend(rows.iter().map(|(k, v)| Op::Table {
                table: table.clone(),
                key: k.clone(),
                value: Some(v.clone()),
            }));
        }
        ops
    }
}

struct Log {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    /// Bytes of whole records in the file: a failed append is cut back to here.
    len: u64,
    entries: usize,
    /// A failed append could not be cut back: the next commit rewrites the file first.
    dirty: bool,
}

impl Log {
    fn memory() -> Log {
        Log { path: None, file: None, len: 0, entries: 0, dirty: false }
    }
}

/// Most rate-limit keys kept; the least recently used beyond it are forgotten.
const MAX_LIMIT_KEYS: std::num::NonZeroUsize = std::num::NonZeroUsize::new(100_000).unwrap();

/// In-memory only: rate-limit arrival times and signature nonces.
struct Ephemeral {
    limits: lru::LruCache<String, Millis>,
    nonces: HashMap<String, Millis>,
    nonce_expiry: BTreeSet<(Millis, String)>,
}

impl Default for Ephemeral {
    fn default() -> Ephemeral {
        Ephemeral { limits: lru::LruCache::new(MAX_LIMIT_KEYS), nonces: HashMap::new(), nonce_expiry: BTreeSet::new() }
    }
}

/// Memory plus an append-only file. `open(None)` keeps everything in memory only.
pub struct EmbeddedStore {
    inner: Mutex<(State, Log)>,
    ephemeral: Mutex<Ephemeral>,
    notify: Notify,
    jobs_notify: Notify,
}

/// One record as a line: checksum, space, JSON, newline.
fn encode(op: &Op, out: &mut Vec<u8>) -> Result<()> {
    let json = serde_json::to_vec(op).map_err(|e| StoreError::Backend(e.to_string()))?;
    out.extend_from_slice(format!("{:08x} ", crc32fast::hash(&json)).as_bytes());
    out.extend_from_slice(&json);
    out.push(b'\n');
    Ok(())
}

/// Reads one line (without its newline). Lines of a log written before checksums
/// (`legacy`) are plain JSON.
fn decode(line: &[u8], legacy: bool) -> std::result::Result<Op, String> {
    let json = if legacy {
        line
    } else {
        let (sum, json) = match line.split_first_chunk::<9>() {
            Some((head, json)) if head[8] == b' ' => (&head[..8], json),
            _ => return Err("no checksum".into()),
        };
        let sum = std::str::from_utf8(sum).ok().and_then(|s| u32::from_str_radix(s, 16).ok());
        if sum != Some(crc32fast::hash(json)) {
            return Err("checksum mismatch".into());
        }
        json
    };
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

fn io_err(e: std::io::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EmbeddedStore {
    /// A store that lives in memory only.
    pub fn in_memory() -> EmbeddedStore {
        EmbeddedStore {
            inner: Mutex::new((State::default(), Log::memory())),
            ephemeral: Mutex::default(),
            notify: Notify::new(),
            jobs_notify: Notify::new(),
        }
    }

    /// Opens (or creates) the store file at `path`, replaying it. A torn last line (a
    /// crash mid-write, no newline) is dropped; any other bad line is an error naming it.
    pub fn open(path: &Path) -> Result<EmbeddedStore> {
        let mut state = State::default();
        let mut entries = 0;
        if path.exists() {
            let data = std::fs::read(path).map_err(io_err)?;
            let legacy = data.first() == Some(&b'{');
            let mut rest = &data[..];
            let mut line_no = 0;
            while !rest.is_empty() {
                line_no += 1;
                let Some(end) = rest.iter().position(|b| *b == b'\n') else {
                    tracing::warn!(path = %path.display(), line = line_no, "dropping a torn last record (no newline)");
                    break;
                };
                let (line, tail) = (&rest[..end], &rest[end + 1..]);
                rest = tail;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match decode(line, legacy) {
                    Ok(op) => {
                        state.apply(op);
                        entries += 1;
                    }
                    Err(reason) => {
                        return Err(StoreError::Corrupt { key: format!("{}:{line_no}", path.display()), reason })
                    }
                }
            }
        } else if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io_err)?;
        }
        let mut log = Log::memory();
        log.path = Some(path.to_path_buf());
        log.entries = entries;
        let store = EmbeddedStore {
            inner: Mutex::new((state, log)),
            ephemeral: Mutex::default(),
            notify: Notify::new(),
            jobs_notify: Notify::new(),
        };
        store.compact()?;
        Ok(store)
    }

    /// Rewrites the file from the live state (write to a temporary file, fsync, rename).
    fn compact(&self) -> Result<()> {
        let mut guard = self.inner.lock().unwrap();
        let (state, log) = &mut *guard;
        Self::rewrite(state, log)
    }

    fn rewrite(state: &State, log: &mut Log) -> Result<()> {
        let Some(path) = log.path.clone() else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let ops = state.snapshot();
        let mut buf = Vec::new();
        for op in &ops {
            encode(op, &mut buf)?;
        }
        {
            let mut f = std::fs::File::create(&tmp).map_err(io_err)?;
            f.write_all(&buf).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        std::fs::rename(&tmp, &path).map_err(io_err)?;
        log.file = Some(std::fs::OpenOptions::new().append(true).open(&path).map_err(io_err)?);
        log.entries = ops.len();
        log.len = buf.len() as u64;
        log.dirty = false;
        Ok(())
    }

    /// Applies ops in memory and appends them to the file, under one lock.
    fn commit<T>(&self, f: impl FnOnce(&mut State) -> Result<(Vec<Op>, T)>) -> Result<T> {
        let mut guard = self.inner.lock().unwrap();
        let (state, log) = &mut *guard;
        let (ops, out) = f(state)?;
        if ops.is_empty() {
            return Ok(out);
        }
        if log.dirty {
            Self::rewrite(state, log)?;
        }
        if let Some(file) = log.file.as_mut() {
            let mut buf = Vec::new();
            for op in &ops {
                encode(op, &mut buf)?;
            }
            if let Err(e) = file.write_all(&buf) {
                // cut the partial record off so the next one starts on a clean line;
                // if even that fails, the next commit rewrites the whole file
                if file.set_len(log.len).is_err() {
                    log.dirty = true;
                }
                return Err(io_err(e));
            }
            log.len += buf.len() as u64;
            log.entries += ops.len();
        }
        for op in ops {
            state.apply(op);
        }
        let live = state.previews.len() + state.projects.len() + state.jobs.len() + state.hosts.len();
        let needs_compaction = log.file.is_some() && log.entries > 4 * live + COMPACT_SLACK;
        drop(guard);
        if needs_compaction {
            self.compact()?;
        }
        Ok(out)
    }

    fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.inner.lock().unwrap().0)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn create_project(&self, project: &Project) -> Result<()> {
        self.commit(|s| {
            if s.projects.contains_key(&project.id) || s.projects.values().any(|p| p.name == project.name) {
                return Err(StoreError::Exists(format!("project {}", project.name)));
            }
            Ok((vec![Op::Project { project: project.clone() }], ()))
        })
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>> {
        Ok(self.read(|s| s.projects.get(id).cloned()))
    }

    async fn project_by_name(&self, name: &str) -> Result<Option<Project>> {
        Ok(self.read(|s| s.projects.values().find(|p| p.name == name).cloned()))
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        Ok(self.read(|s| s.projects.values().cloned().collect()))
    }

    async fn get_preview(&self, id: &str) -> Result<Option<Versioned<Preview>>> {
        Ok(self.read(|s| s.previews.get(id).cloned()))
    }

    async fn put_preview(&self, preview: &Preview, expected: Option<u64>) -> Result<u64> {
        let v = self.commit(|s| {
            let current = s.previews.get(&preview.id).map(|v| v.version);
            if current != expected {
                return Err(StoreError::Conflict);
            }
            let version = current.unwrap_or(0) + 1;
            Ok((vec![Op::Preview { version, preview: preview.clone() }], version))
        })?;
        self.notify.notify_waiters();
        Ok(v)
    }

    async fn list_previews(&self) -> Result<Vec<Versioned<Preview>>> {
        Ok(self.read(|s| s.previews.values().cloned().collect()))
    }

    async fn bind_host(&self, host: &str, preview_id: &str) -> Result<()> {
        self.commit(|s| match s.hosts.get(host) {
            Some(p) if p == preview_id => Ok((vec![], ())),
            Some(_) => Err(StoreError::Exists(format!("host {host}"))),
            None => Ok((vec![Op::Host { host: host.to_string(), preview: preview_id.to_string() }], ())),
        })
    }

    async fn resolve_host(&self, host: &str) -> Result<Option<String>> {
        Ok(self.read(|s| s.hosts.get(host).cloned()))
    }

    async fn unbind_host(&self, host: &str, preview_id: &str) -> Result<bool> {
        self.commit(|s| match s.hosts.get(host) {
            Some(p) if p == preview_id => Ok((vec![Op::Unhost { host: host.to_string() }], true)),
            _ => Ok((vec![], false)),
        })
    }

    async fn set_expiry(&self, preview_id: &str, at: Option<Millis>) -> Result<()> {
        self.commit(|s| {
            if s.expiry_of.get(preview_id).copied() == at {
                return Ok((vec![], ()));
            }
            Ok((vec![Op::Expiry { preview: preview_id.to_string(), at }], ()))
        })
    }

    async fn due_expiries(&self, now: Millis, limit: usize) -> Result<Vec<String>> {
        Ok(self
            .read(|s| s.expiry.iter().take_while(|(at, _)| *at <= now).take(limit).map(|(_, p)| p.clone()).collect()))
    }

    async fn touch(&self, preview_ids: &[String], at: Millis) -> Result<()> {
        self.commit(|s| {
            let ops = preview_ids
                .iter()
                .filter(|p| s.activity_of.get(*p).is_none_or(|old| *old < at))
                .map(|p| Op::Touch { preview: p.clone(), at })
                .collect();
            Ok((ops, ()))
        })
    }

    async fn last_activity(&self, preview_id: &str) -> Result<Option<Millis>> {
        Ok(self.read(|s| s.activity_of.get(preview_id).copied()))
    }

    async fn idle_before(&self, before: Millis, limit: usize) -> Result<Vec<(String, Millis)>> {
        Ok(self.read(|s| {
            s.activity.iter().take_while(|(at, _)| *at < before).take(limit).map(|(at, p)| (p.clone(), *at)).collect()
        }))
    }

    async fn forget_activity(&self, preview_id: &str, at: Millis) -> Result<()> {
        self.commit(|s| {
            if s.activity_of.get(preview_id) != Some(&at) {
                return Ok((vec![], ()));
            }
            Ok((vec![Op::Forget { preview: preview_id.to_string(), at }], ()))
        })
    }

    async fn rate_limit(&self, key: &str, limit: u32, window: Duration, now: Millis) -> Result<bool> {
        let mut e = self.ephemeral.lock().unwrap();
        let tat = e.limits.get(key).copied().unwrap_or(0);
        match crate::gcra(tat, limit, window, now) {
            Some(next) => {
                e.limits.put(key.to_string(), next);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn claim_nonce(&self, nonce: &str, until: Millis, now: Millis) -> Result<bool> {
        let mut guard = self.ephemeral.lock().unwrap();
        let e = &mut *guard;
        while let Some(first) = e.nonce_expiry.first() {
            if first.0 > now {
                break;
            }
            let (_, n) = e.nonce_expiry.pop_first().expect("non-empty");
            e.nonces.remove(&n);
        }
        if e.nonces.contains_key(nonce) {
            return Ok(false);
        }
        e.nonces.insert(nonce.to_string(), until);
        e.nonce_expiry.insert((until, nonce.to_string()));
        Ok(true)
    }

    async fn enqueue(&self, preview_id: &str, kind: JobKind) -> Result<Enqueued> {
        let enqueued = self.commit(|s| {
            if let Some(id) = s.job_keys.get(&(preview_id.to_string(), kind)) {
                return Ok((vec![], Enqueued { job_id: id.to_string(), created: false }));
            }
            let id = s.next_job.max(1);
            let job = Job { id, preview: preview_id.to_string(), kind, worker: None, lease_until: 0 };
            Ok((vec![Op::Job { job }], Enqueued { job_id: id.to_string(), created: true }))
        })?;
        if enqueued.created {
            self.jobs_notify.notify_waiters();
        }
        Ok(enqueued)
    }

    async fn wait_for_jobs(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.jobs_notify.notified()).await;
    }

    async fn claim(&self, worker: &str, lane: Lane, lease: Duration, now: Millis) -> Result<Option<Lease>> {
        self.commit(|s| {
            let Some(job) =
                s.jobs.values().find(|j| Lane::of(j.kind) == lane && (j.worker.is_none() || j.lease_until <= now))
            else {
                return Ok((vec![], None));
            };
            let mut job = job.clone();
            job.worker = Some(worker.to_string());
            job.lease_until = now + lease.as_millis() as Millis;
            let lease = Lease {
                job_id: job.id.to_string(),
                preview_id: job.preview.clone(),
                kind: job.kind,
                worker: worker.to_string(),
            };
            Ok((vec![Op::Job { job }], Some(lease)))
        })
    }

    async fn renew(&self, lease: &Lease, duration: Duration, now: Millis) -> Result<()> {
        let id: u64 = lease.job_id.parse().map_err(|_| StoreError::LeaseLost(lease.job_id.clone()))?;
        self.commit(|s| match s.jobs.get(&id) {
            Some(job) if job.worker.as_deref() == Some(lease.worker.as_str()) => {
                let mut job = job.clone();
                job.lease_until = now + duration.as_millis() as Millis;
                Ok((vec![Op::Job { job }], ()))
            }
            _ => Err(StoreError::LeaseLost(lease.job_id.clone())),
        })
    }

    async fn complete(&self, lease: &Lease) -> Result<()> {
        let id: u64 = lease.job_id.parse().map_err(|_| StoreError::LeaseLost(lease.job_id.clone()))?;
        self.commit(|s| if s.jobs.contains_key(&id) { Ok((vec![Op::JobDone { id }], ())) } else { Ok((vec![], ())) })
    }

    async fn jobs(&self) -> Result<Vec<(String, JobKind)>> {
        Ok(self.read(|s| s.jobs.values().map(|j| (j.preview.clone(), j.kind)).collect()))
    }

    async fn wait_preview(&self, id: &str, after: u64, timeout: Duration) -> Result<Option<Versioned<Preview>>> {
        crate::wait_with(self, &self.notify, id, after, timeout).await
    }

    async fn table_put(&self, table: &str, key: &str, value: &str) -> Result<()> {
        self.commit(|s| {
            if s.tables.get(table).and_then(|t| t.get(key)).is_some_and(|v| v == value) {
                return Ok((vec![], ()));
            }
            Ok((vec![Op::Table { table: table.into(), key: key.into(), value: Some(value.into()) }], ()))
        })
    }

    async fn table_get(&self, table: &str, key: &str) -> Result<Option<String>> {
        Ok(self.read(|s| s.tables.get(table).and_then(|t| t.get(key)).cloned()))
    }

    async fn table_remove(&self, table: &str, key: &str) -> Result<bool> {
        self.commit(|s| {
            if s.tables.get(table).is_some_and(|t| t.contains_key(key)) {
                Ok((vec![Op::Table { table: table.into(), key: key.into(), value: None }], true))
            } else {
                Ok((vec![], false))
            }
        })
    }

    async fn table_list(&self, table: &str) -> Result<Vec<(String, String)>> {
        Ok(self.read(|s| {
            s.tables.get(table).map(|t| t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
        }))
    }

    async fn table_swap(&self, table: &str, key: &str, expected: Option<&str>, value: Option<&str>) -> Result<bool> {
        self.commit(|s| {
            let current = s.tables.get(table).and_then(|t| t.get(key)).map(String::as_str);
            if current != expected {
                return Ok((vec![], false));
            }
            if current == value {
                return Ok((vec![], true));
            }
            Ok((vec![Op::Table { table: table.into(), key: key.into(), value: value.map(str::to_string) }], true))
        })
    }
}
