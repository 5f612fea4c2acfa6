//! The Redis store, for several waker and provisioner replicas.
//!
//! Layout (all keys under a prefix, `wg:` by default):
//! * `project:{id}` JSON, `project-name:{name}` → id, `projects` set;
//! * `preview:{id}` hash `{v, d}`, written only by the CAS script, which also publishes
//!   the new version on `status:{id}`; `previews` set;
//! * `host:{host}` → preview id;
//! * `expiry`, `activity` sorted sets (score = ms);
//! * `jobs:build` and `jobs:quick` streams (one per [`Lane`]) with consumer group
//!   `workers`; `jobkey:{preview}:{kind}` → entry id makes enqueue idempotent (a key
//!   whose entry is gone, after a Redis that lost data, no longer counts). A claimed job is a pending entry; one idle longer than
//!   the lease is taken over by the next claim (its worker died);
//! * `limit:{key}` → GCRA arrival time and `nonce:{nonce}`, both expiring with their
//!   window, so rate limits and replay protection hold across replicas.
//!
//! Commands go through a [`ConnectionManager`], which reconnects after Redis restarts or
//! the network drops: calls fail while Redis is away (callers see `Backend` and retry
//! later) and work again once it is back, without restarting the process.

use crate::{Enqueued, Lane, Lease, Result, Store, StoreError, Versioned};
use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use wakegate_core::lifecycle::JobKind;
use wakegate_core::route::{Preview, Project};
use wakegate_core::Millis;

const GROUP: &str = "workers";

/// Deletes a host key only while it names the preview.
const UNBIND_HOST: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Compare-and-set on a hash field: ARGV = field, has-expected, expected, has-value, value.
const TABLE_SWAP: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[3] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[5])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
end
return 1
"#;

const CAS: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'v')
if ARGV[1] == '' then
  if cur then return -1 end
elseif cur ~= ARGV[1] then
  return -1
end
local nv = (tonumber(cur) or 0) + 1
redis.call('HSET', KEYS[1], 'v', nv, 'd', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', KEYS[3], nv)
return nv
"#;

const ENQUEUE: &str = r#"
local existing = redis.call('GET', KEYS[1])
if existing and #redis.call('XRANGE', KEYS[2], existing, existing) > 0 then return {existing, 0} end
local id = redis.call('XADD', KEYS[2], '*', 'preview', ARGV[1], 'kind', ARGV[2])
redis.call('SET', KEYS[1], id)
redis.call('PUBLISH', KEYS[3], id)
return {id, 1}
"#;

const CLAIM: &str = r#"
local p = redis.call('XPENDING', KEYS[1], 'workers', 'IDLE', ARGV[2], '-', '+', 1)
if #p > 0 then
  local id = p[1][1]
  local c = redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], ARGV[2], id)
  if #c > 0 and c[1] then return {c[1][1], c[1][2]} end
  redis.call('XACK', KEYS[1], 'workers', id)
end
local r = redis.call('XREADGROUP', 'GROUP', 'workers', ARGV[1], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
if r and r[1] and r[1][2][1] then
  local e = r[1][2][1]
  return {e[1], e[2]}
end
return false
"#;

const RENEW: &str = r#"
local p = redis.call('XPENDING', KEYS[1], 'workers', ARGV[2], ARGV[2], 1)
if #p == 0 or p[1][2] ~= ARGV[1] then return 0 end
redis.call('XCLAIM', KEYS[1], 'workers', ARGV[1], 0, ARGV[2], 'JUSTID')
return 1
"#;

const COMPLETE: &str = r#"
redis.call('XACK', KEYS[1], 'workers', ARGV[1])
redis.call('XDEL', KEYS[1], ARGV[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"#;

const FORGET: &str = r#"
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == ARGV[2] then redis.call('ZREM', KEYS[1], ARGV[1]) end
return 1
"#;

const GCRA: &str = r#"
local tat = tonumber(redis.call('GET', KEYS[1])) or 0
local now, interval, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local nxt = math.max(tat, now) + interval
if nxt - now > window then return 0 end
redis.call('SET', KEYS[1], string.format('%d', nxt), 'PX', math.max(1, nxt - now))
return 1
"#;

const CREATE_PROJECT: &str = r#"
if redis.call('SETNX', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"#;

const TOUCH: &str = r#"
for i, k in ipairs(ARGV) do
  if i > 1 then redis.call('ZADD', KEYS[1], 'GT', ARGV[1], k) end
end
return 1
"#;

/// Redis-backed [`Store`].
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    notify: Arc<Notify>,
    jobs_notify: Arc<Notify>,
    listener: tokio::task::JoinHandle<()>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

fn be(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(key: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), reason: e.to_string() }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Parses `{id, {field, value, ...}}` as returned by the claim script.
fn parse_entry(v: &Value) -> Option<(String, String, JobKind)> {
    let Value::Array(parts) = v else { return None };
    let id = as_string(parts.first()?)?;
    let Value::Array(fields) = parts.get(1)? else {
        return None;
    };
    let (mut preview, mut kind) = (None, None);
    for pair in fields.chunks(2) {
        match (pair.first().and_then(as_string).as_deref(), pair.get(1).and_then(as_string)) {
            (Some("preview"), Some(p)) => preview = Some(p),
            (Some("kind"), Some(k)) => kind = JobKind::parse(&k),
            _ => {}
        }
    }
    Some((id, preview?, kind?))
}

impl RedisStore {
    /// Connects, creates the job group if needed and starts the status listener.
    pub async fn connect(url: &str, prefix: &str) -> Result<RedisStore> {
        let client = redis::Client::open(url).map_err(be)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_max_delay(Duration::from_secs(2))
            .set_number_of_retries(3);
        let mut conn = ConnectionManager::new_with_config(client.clone(), config).await.map_err(be)?;
        for lane in Lane::ALL {
            ensure_group(&mut conn, &format!("{prefix}jobs:{}", lane.as_str())).await?;
        }
        let notify = Arc::new(Notify::new());
        let jobs_notify = Arc::new(Notify::new());
        let pattern = format!("{prefix}status:*");
        let jobs_channel = format!("{prefix}status:jobs");
        let listener = tokio::spawn(listen(client, pattern, jobs_channel, notify.clone(), jobs_notify.clone()));
        Ok(RedisStore { conn, prefix: prefix.to_string(), notify, jobs_notify, listener })
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        k.push_str(&parts.join(":"));
        k
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }
}

/// Creates the job stream's consumer group unless it exists (also after a Redis that
/// lost its data came back: claims then see `NOGROUP` and call this again).
async fn ensure_group(conn: &mut ConnectionManager, stream: &str) -> Result<()> {
    let created: redis::RedisResult<()> =
        redis::cmd("XGROUP").arg("CREATE").arg(stream).arg(GROUP).arg("0").arg("MKSTREAM").query_async(conn).await;
    match created {
        Err(e) if e.code() != Some("BUSYGROUP") => Err(be(e)),
        _ => Ok(()),
    }
}

/// Forwards status publications to local waiters; reconnects after errors. Waiters also
/// poll on a short tick, so a gap here only delays them.
async fn listen(client: redis::Client, pattern: String, jobs_channel: String, notify: Arc<Notify>, jobs: Arc<Notify>) {
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.psubscribe(&pattern).await.is_ok() {
                    let mut messages = pubsub.on_message();
                    while let Some(m) = messages.next().await {
                        if m.get_channel_name() == jobs_channel {
                            jobs.notify_waiters();
                        } else {
                            notify.notify_waiters();
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "status subscription failed; retrying"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_project(&self, project: &Project) -> Result<()> {
        let json = serde_json::to_string(project).map_err(|e| StoreError::Backend(e.to_string()))?;
        let created: i64 = Script::new(CREATE_PROJECT)
            .key(self.key(&["project-name", &project.name]))
            .key(self.key(&["project", &project.id]))
            .key(self.key(&["projects"]))
            .arg(&project.id)
            .arg(json)
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        if created == 0 {
            return Err(StoreError::Exists(format!("project {}", project.name)));
        }
        Ok(())
    }

    async fn get_project(&self, id: &str) -> Result<Option<Project>> {
        let key = self.key(&["project", id]);
        let raw: Option<String> = self.conn().get(&key).await.map_err(be)?;
        raw.map(|r| serde_json::from_str(&r).map_err(|e| corrupt(&key, e))).transpose()
    }

    async fn project_by_name(&self, name: &str) -> Result<Option<Project>> {
        let id: Option<String> = self.conn().get(self.key(&["project-name", name])).await.map_err(be)?;
        match id {
            Some(id) => self.get_project(&id).await,
            None => Ok(None),
        }
    }

    async fn list_projects(&self) -> Result<Vec<Project>> {
        let ids: Vec<String> = self.conn().smembers(self.key(&["projects"])).await.map_err(be)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(p) = self.get_project(&id).await? {
                out.push(p);
            }
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn get_preview(&self, id: &str) -> Result<Option<Versioned<Preview>>> {
        let key = self.key(&["preview", id]);
        let (v, d): (Option<u64>, Option<String>) =
            redis::cmd("HMGET").arg(&key).arg("v").arg("d").query_async(&mut self.conn()).await.map_err(be)?;
        match (v, d) {
            (Some(version), Some(d)) => {
                Ok(Some(Versioned { version, value: serde_json::from_str(&d).map_err(|e| corrupt(&key, e))? }))
            }
            _ => Ok(None),
        }
    }

    async fn put_preview(&self, preview: &Preview, expected: Option<u64>) -> Result<u64> {
        let json = serde_json::to_string(preview).map_err(|e| StoreError::Backend(e.to_string()))?;
        let v: i64 = Script::new(CAS)
            .key(self.key(&["preview", &preview.id]))
            .key(self.key(&["previews"]))
            .key(self.key(&["status", &preview.id]))
            .arg(expected.map(|e| e.to_string()).unwrap_or_default())
            .arg(json)
            .arg(&preview.id)
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        if v < 0 {
            return Err(StoreError::Conflict);
        }
        Ok(v as u64)
    }

    async fn list_previews(&self) -> Result<Vec<Versioned<Preview>>> {
        let mut ids: Vec<String> = self.conn().smembers(self.key(&["previews"])).await.map_err(be)?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(256) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("HMGET").arg(self.key(&["preview", id])).arg("v").arg("d");
            }
            let rows: Vec<(Option<u64>, Option<String>)> = pipe.query_async(&mut self.conn()).await.map_err(be)?;
            for (id, row) in chunk.iter().zip(rows) {
                if let (Some(version), Some(d)) = row {
                    let value = serde_json::from_str(&d).map_err(|e| corrupt(id, e))?;
                    out.push(Versioned { version, value });
                }
            }
        }
        Ok(out)
    }

    async fn bind_host(&self, host: &str, preview_id: &str) -> Result<()> {
        let key = self.key(&["host", host]);
        let set: bool = self.conn().set_nx(&key, preview_id).await.map_err(be)?;
        if set {
            return Ok(());
        }
        let current: Option<String> = self.conn().get(&key).await.map_err(be)?;
        if current.as_deref() == Some(preview_id) {
            Ok(())
        } else {
            Err(StoreError::Exists(format!("host {host}")))
        }
    }

    async fn resolve_host(&self, host: &str) -> Result<Option<String>> {
        self.conn().get(self.key(&["host", host])).await.map_err(be)
    }

    async fn unbind_host(&self, host: &str, preview_id: &str) -> Result<bool> {
        let removed: i64 = Script::new(UNBIND_HOST)
            .key(self.key(&["host", host]))
            .arg(preview_id)
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(removed == 1)
    }

    async fn set_expiry(&self, preview_id: &str, at: Option<Millis>) -> Result<()> {
        let key = self.key(&["expiry"]);
        match at {
            Some(at) => self.conn().zadd::<_, _, _, ()>(key, preview_id, at).await.map_err(be),
            None => self.conn().zrem::<_, _, ()>(key, preview_id).await.map_err(be),
        }
    }

    async fn due_expiries(&self, now: Millis, limit: usize) -> Result<Vec<String>> {
        self.conn().zrangebyscore_limit(self.key(&["expiry"]), "-inf", now, 0, limit as isize).await.map_err(be)
    }

    async fn touch(&self, preview_ids: &[String], at: Millis) -> Result<()> {
        if preview_ids.is_empty() {
            return Ok(());
        }
        let script = Script::new(TOUCH);
        let mut invocation = script.key(self.key(&["activity"]));
        invocation.arg(at);
        for id in preview_ids {
            invocation.arg(id);
        }
        invocation.invoke_async::<i64>(&mut self.conn()).await.map_err(be)?;
        Ok(())
    }

    async fn last_activity(&self, preview_id: &str) -> Result<Option<Millis>> {
        let score: Option<f64> = self.conn().zscore(self.key(&["activity"]), preview_id).await.map_err(be)?;
        Ok(score.map(|s| s as Millis))
    }

    async fn idle_before(&self, before: Millis, limit: usize) -> Result<Vec<(String, Millis)>> {
        let rows: Vec<(String, f64)> = self
            .conn()
            .zrangebyscore_limit_withscores(self.key(&["activity"]), "-inf", format!("({before}"), 0, limit as isize)
            .await
            .map_err(be)?;
        Ok(rows.into_iter().map(|(id, s)| (id, s as Millis)).collect())
    }

    async fn forget_activity(&self, preview_id: &str, at: Millis) -> Result<()> {
        // scores are doubles; ms timestamps are exact in them and print as integers
        Script::new(FORGET)
            .key(self.key(&["activity"]))
            .arg(preview_id)
            .arg(at.to_string())
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(())
    }

    async fn rate_limit(&self, key: &str, limit: u32, window: Duration, now: Millis) -> Result<bool> {
        let window = window.as_millis().min(u64::MAX as u128) as u64;
        let interval = (window / u64::from(limit.max(1))).max(1);
        let ok: i64 = Script::new(GCRA)
            .key(self.key(&["limit", key]))
            .arg(now)
            .arg(interval)
            .arg(window)
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(ok == 1)
    }

    async fn claim_nonce(&self, nonce: &str, until: Millis, now: Millis) -> Result<bool> {
        let ttl = until.saturating_sub(now).max(1);
        let set: Option<String> = redis::cmd("SET")
            .arg(self.key(&["nonce", nonce]))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl)
            .query_async(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(set.is_some())
    }

    async fn enqueue(&self, preview_id: &str, kind: JobKind) -> Result<Enqueued> {
        let (job_id, created): (String, i64) = Script::new(ENQUEUE)
            .key(self.key(&["jobkey", preview_id, kind.as_str()]))
            .key(self.key(&["jobs", Lane::of(kind).as_str()]))
            .key(self.key(&["status", "jobs"]))
            .arg(preview_id)
            .arg(kind.as_str())
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(Enqueued { job_id, created: created == 1 })
    }

    async fn claim(&self, worker: &str, lane: Lane, lease: Duration, _now: Millis) -> Result<Option<Lease>> {
        // lease expiry is Redis's own idle time of the pending entry, on Redis's clock
        let stream = self.key(&["jobs", lane.as_str()]);
        let claim = || async {
            Script::new(CLAIM)
                .key(&stream)
                .arg(worker)
                .arg(lease.as_millis() as u64)
                .invoke_async::<Value>(&mut self.conn())
                .await
        };
        let v = match claim().await {
            Err(e) if e.code() == Some("NOGROUP") => {
                ensure_group(&mut self.conn(), &stream).await?;
                claim().await.map_err(be)?
            }
            r => r.map_err(be)?,
        };
        if matches!(v, Value::Nil) {
            return Ok(None);
        }
        let (job_id, preview_id, kind) = parse_entry(&v).ok_or_else(|| corrupt("jobs", format!("{v:?}")))?;
        Ok(Some(Lease { job_id, preview_id, kind, worker: worker.to_string() }))
    }

    async fn renew(&self, lease: &Lease, _duration: Duration, _now: Millis) -> Result<()> {
        let ok: i64 = Script::new(RENEW)
            .key(self.key(&["jobs", Lane::of(lease.kind).as_str()]))
            .arg(&lease.worker)
            .arg(&lease.job_id)
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        if ok == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost(lease.job_id.clone()))
        }
    }

    async fn complete(&self, lease: &Lease) -> Result<()> {
        Script::new(COMPLETE)
            .key(self.key(&["jobs", Lane::of(lease.kind).as_str()]))
            .key(self.key(&["jobkey", &lease.preview_id, lease.kind.as_str()]))
            .arg(&lease.job_id)
            .invoke_async::<i64>(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(())
    }

    async fn jobs(&self) -> Result<Vec<(String, JobKind)>> {
        let mut out = Vec::new();
        for lane in Lane::ALL {
            let v: Value = redis::cmd("XRANGE")
                .arg(self.key(&["jobs", lane.as_str()]))
                .arg("-")
                .arg("+")
                .query_async(&mut self.conn())
                .await
                .map_err(be)?;
            if let Value::Array(entries) = v {
                out.extend(entries.iter().filter_map(parse_entry).map(|(_, p, k)| (p, k)));
            }
        }
        Ok(out)
    }

    async fn wait_preview(&self, id: &str, after: u64, timeout: Duration) -> Result<Option<Versioned<Preview>>> {
        crate::wait_with(self, &self.notify, id, after, timeout).await
    }

    async fn wait_for_jobs(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.jobs_notify.notified()).await;
    }

    async fn table_put(&self, table: &str, key: &str, value: &str) -> Result<()> {
        self.conn().hset::<_, _, _, ()>(self.key(&["table", table]), key, value).await.map_err(be)
    }

    async fn table_get(&self, table: &str, key: &str) -> Result<Option<String>> {
        self.conn().hget(self.key(&["table", table]), key).await.map_err(be)
    }

    async fn table_remove(&self, table: &str, key: &str) -> Result<bool> {
        let removed: u64 = self.conn().hdel(self.key(&["table", table]), key).await.map_err(be)?;
        Ok(removed == 1)
    }

    async fn table_list(&self, table: &str) -> Result<Vec<(String, String)>> {
        let all: Vec<(String, String)> = self.conn().hgetall(self.key(&["table", table])).await.map_err(be)?;
        Ok(all)
    }

    async fn table_swap(&self, table: &str, key: &str, expected: Option<&str>, value: Option<&str>) -> Result<bool> {
        let swapped: i64 = Script::new(TABLE_SWAP)
            .key(self.key(&["table", table]))
            .arg(key)
            .arg(u8::from(expected.is_some()))
            .arg(expected.unwrap_or(""))
            .arg(u8::from(value.is_some()))
            .arg(value.unwrap_or(""))
            .invoke_async(&mut self.conn())
            .await
            .map_err(be)?;
        Ok(swapped == 1)
    }
}
