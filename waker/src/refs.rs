//! "Does this ref still exist?", answered with `git ls-remote`.
//!
//! Every visit to an erased or failed preview asks, so the answer must be cheap and
//! the question must never multiply processes: answers are cached (a failure too, a
//! little longer, so an unreachable remote is not asked again on every visit),
//! concurrent questions about one ref share one `git` process, at most
//! [`MAX_CONCURRENT`] run at once, and a call that times out (or whose callers all go
//! away) ends its whole process group, `git-remote-http` helpers included.

use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[async_trait]
pub trait RefChecker: Send + Sync + 'static {
    /// `Ok(false)` only when the remote says the ref is not there.
    async fn exists(&self, git_url: &str, git_ref: &str) -> Result<bool, String>;
}

/// Most `git ls-remote` processes at once.
pub const MAX_CONCURRENT: usize = 8;
/// Longest one may run.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(20);
/// Remotes and refs remembered.
const CACHE_ENTRIES: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();

type Key = (String, String);
type Answer = Result<bool, String>;

struct Inner {
    ttl: Duration,
    failure_ttl: Duration,
    timeout: Duration,
    cache: TtlCache<Key, Answer>,
    inflight: Mutex<HashMap<Key, Shared<BoxFuture<'static, Answer>>>>,
    slots: tokio::sync::Semaphore,
}

/// `git ls-remote` behind a bounded cache and single flight.
#[derive(Clone)]
pub struct GitRefs {
    inner: Arc<Inner>,
}

impl GitRefs {
    /// Answers are kept for `ttl`; failures for `max(ttl, 10 s)`.
    pub fn new(ttl: Duration) -> GitRefs {
        GitRefs::with_timeout(ttl, DEFAULT_TIMEOUT)
    }

    pub fn with_timeout(ttl: Duration, timeout: Duration) -> GitRefs {
        GitRefs {
            inner: Arc::new(Inner {
                ttl,
                failure_ttl: ttl.max(Duration::from_secs(10)),
                timeout,
                cache: TtlCache::new(CACHE_ENTRIES),
                inflight: Mutex::default(),
                slots: tokio::sync::Semaphore::new(MAX_CONCURRENT),
            }),
        }
    }
}

#[async_trait]
impl RefChecker for GitRefs {
    async fn exists(&self, git_url: &str, git_ref: &str) -> Answer {
        let key = (git_url.to_string(), git_ref.to_string());
        let inner = &self.inner;
        if let Some(answer) = inner.cache.get(&key, |a| if a.is_ok() { inner.ttl } else { inner.failure_ttl }) {
            return answer;
        }
        let flight = {
            let mut inflight = lock(&inner.inflight);
            inflight
                .entry(key.clone())
                .or_insert_with(|| {
                    let inner = self.inner.clone();
                    let key = key.clone();
                    async move {
                        let answer = match inner.slots.acquire().await {
                            Ok(_permit) => ls_remote(&key.0, &key.1, inner.timeout).await,
                            Err(_) => Err("closed".to_string()),
                        };
                        let result = match &answer {
                            Ok(true) => "exists",
                            Ok(false) => "missing",
                            Err(_) => "error",
                        };
                        metrics::counter!(wakegate_core::metrics::REF_CHECKS, "result" => result).increment(1);
                        inner.cache.put(key.clone(), answer.clone());
                        lock(&inner.inflight).remove(&key);
                        answer
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        flight.await
    }
}

/// A bounded map of answers, each good for a while (how long may depend on the answer):
/// the ref checks' cache, through git or through a forge.
pub(crate) struct TtlCache<K, V> {
    entries: Mutex<lru::LruCache<K, (V, Instant)>>,
}

impl<K: std::hash::Hash + Eq, V: Clone> TtlCache<K, V> {
    pub(crate) fn new(capacity: NonZeroUsize) -> TtlCache<K, V> {
        TtlCache { entries: Mutex::new(lru::LruCache::new(capacity)) }
    }

    /// The answer for `key` if it is younger than `ttl(answer)`.
    pub(crate) fn get(&self, key: &K, ttl: impl Fn(&V) -> Duration) -> Option<V> {
        let mut entries = lock(&self.entries);
        entries.get(key).filter(|(v, at)| at.elapsed() < ttl(v)).map(|(v, _)| v.clone())
    }

    pub(crate) fn put(&self, key: K, value: V) {
        lock(&self.entries).put(key, (value, Instant::now()));
    }
}

/// The maps hold plain data: one left by a panicking holder is still consistent.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kills a process group when dropped, unless disarmed.
struct GroupGuard(Option<nix::unistd::Pid>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (already gone) is the only expected failure
            let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}

async fn ls_remote(git_url: &str, git_ref: &str, timeout: Duration) -> Answer {
    let full = if git_ref.starts_with("refs/") { git_ref.to_string() } else { format!("refs/heads/{git_ref}") };
    let child = tokio::process::Command::new("git")
        .args(["ls-remote", "--", git_url, &full])
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ASKPASS", "true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    let mut guard = GroupGuard(child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32)));
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| format!("git ls-remote timed out after {}s", timeout.as_secs()))?
        .map_err(|e| e.to_string())?;
    // git waited for its helpers; nothing of the group is left to end
    guard.0 = None;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(err.trim().chars().take(500).collect());
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split('\t').nth(1) == Some(full.as_str())))
}
