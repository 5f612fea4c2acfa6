//! "Does this ref still exist?", answered with `git ls-remote` and cached briefly.

use async_trait::async_trait;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[async_trait]
pub trait RefChecker: Send + Sync + 'static {
    /// `Ok(false)` only when the remote says the ref is not there.
    async fn exists(&self, git_url: &str, git_ref: &str) -> Result<bool, String>;
}

/// `git ls-remote` with a short positive and negative cache.
pub struct GitRefs {
    ttl: Duration,
    cache: Mutex<HashMap<(String, String), (bool, Instant)>>,
}

impl GitRefs {
    pub fn new(ttl: Duration) -> GitRefs {
        GitRefs { ttl, cache: Mutex::new(HashMap::new()) }
    }
}

#[async_trait]
impl RefChecker for GitRefs {
    async fn exists(&self, git_url: &str, git_ref: &str) -> Result<bool, String> {
        let key = (git_url.to_string(), git_ref.to_string());
        if let Some((v, at)) = self.cache.lock().unwrap().get(&key) {
            if at.elapsed() < self.ttl {
                return Ok(*v);
            }
        }
        let full = if git_ref.starts_with("refs/") { git_ref.to_string() } else { format!("refs/heads/{git_ref}") };
        let out = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::process::Command::new("git")
                .args(["ls-remote", "--", git_url, &full])
                .env("GIT_TERMINAL_PROMPT", "0")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .map_err(|_| "git ls-remote timed out".to_string())?
        .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let exists = String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split('\t').nth(1) == Some(full.as_str()));
        self.cache.lock().unwrap().insert(key, (exists, Instant::now()));
        Ok(exists)
    }
}
