//! Test support for Wakegate: real parts on 127.0.0.1.
//!
//! * [`redis::RedisServer`] — a private `redis-server` on a free port, killed on drop;
//! * [`git`] — real repositories made with the `git` command;
//! * [`hetzner`] — a stateful fake of the Hetzner Cloud API with fault injection;
//! * [`http`] — a small HTTP/1.1 client that sets `Host` (so `*.localhost` previews can
//!   be reached through one listening socket);
//! * [`browser::Browser`] — headless Chromium driven through chromedriver (WebDriver);
//! * [`wrangler::Wrangler`] — the edge Worker under `wrangler dev` (workerd).
//!
//! Every process started here is stopped by PID when its handle drops.

pub mod browser;
pub mod cloudflare;
pub mod dns;
pub mod fake_api;
pub mod forges;
pub mod git;
pub mod hetzner;
pub mod http;
pub mod redis;
pub mod rng;
pub mod s3;

pub use rng::Rng;
pub mod wrangler;

use std::path::PathBuf;

/// A fresh directory under the system temp dir (not removed, so failures can be read).
pub fn tempdir(tag: &str) -> PathBuf {
    // the clock alone repeats for two calls close enough together (seen once): a
    // counter makes each name of this process its own
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("wakegate-{tag}-{}-{nanos}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A child process, killed (by its PID) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stops the process group whose id a provisioner recorded in `pidfile` (apps it
/// started live in their own group and outlive a killed provisioner).
pub fn kill_recorded_group(pidfile: &std::path::Path) {
    if let Some(pgid) = std::fs::read_to_string(pidfile).ok().and_then(|s| s.trim().parse::<u32>().ok()) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", "--", &format!("-{pgid}")])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
