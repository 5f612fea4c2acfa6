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
pub mod dump;
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
pub mod xfs;

use std::path::PathBuf;

/// A fresh directory under the system temp dir, removed when the test that made it has
/// passed: when the thread that asked for it ends (libtest runs each test on a thread of
/// its own, and its locals, the servers using the directory among them, are dropped by
/// then) without a panic on it. A failed test's directories are kept, and named on
/// stderr, so the failure can be read; `WAKEGATE_KEEP_TEMP=1` keeps every one.
pub fn tempdir(tag: &str) -> PathBuf {
    // the clock alone repeats for two calls close enough together (seen once): a
    // counter makes each name of this process its own
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let dir = std::env::temp_dir().join(format!("wakegate-{tag}-{}-{nanos}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    scratch::remove_when_passed(dir.clone());
    dir
}

/// The directories [`tempdir`] made on this thread, and whether a panic happened on it.
mod scratch {
    use std::cell::{Cell, RefCell};
    use std::path::PathBuf;

    #[derive(Default)]
    struct Made {
        dirs: RefCell<Vec<PathBuf>>,
        panicked: Cell<bool>,
    }

    thread_local! {
        static MADE: Made = Made::default();
    }

    impl Drop for Made {
        fn drop(&mut self) {
            let dirs = self.dirs.take();
            if self.panicked.get() || std::env::var_os("WAKEGATE_KEEP_TEMP").is_some() {
                for dir in &dirs {
                    eprintln!("kept for reading: {}", dir.display());
                }
                return;
            }
            for dir in dirs {
                // a server the test leaked may still be writing: what it adds is gone
                // with the next try, and a directory that will not go is only disk
                for _ in 0..3 {
                    if std::fs::remove_dir_all(&dir).is_ok() || !dir.exists() {
                        break;
                    }
                }
            }
        }
    }

    pub(super) fn remove_when_passed(dir: PathBuf) {
        // libtest catches a failed test's panic, so the thread ends normally: a hook
        // (wrapping the one that prints the message) marks the thread it happened on
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let print = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = MADE.try_with(|m| m.panicked.set(true));
                print(info);
            }));
        });
        // a thread past its locals (a destructor making a directory) keeps it
        let _ = MADE.try_with(|m| m.dirs.borrow_mut().push(dir));
    }
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

/// Writes `body` as the section `name` of BENCHMARKS.md, between its markers, keeping
/// the other benchmarks' sections (each `cargo bench` target writes its own). A file
/// from before the markers is kept as the `edge` section.
pub fn write_benchmarks_section(name: &str, body: &str) {
    let path = wrangler::repo_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    std::fs::write(&path, benchmarks_with(&old, name, body)).unwrap();
}

fn benchmarks_with(old: &str, name: &str, body: &str) -> String {
    const TITLE: &str = "# Benchmarks\n\n";
    let marked = |n: &str| (format!("<!-- begin {n} -->\n"), format!("<!-- end {n} -->\n"));
    let mut sections: Vec<(String, String)> = Vec::new();
    let mut rest = old.strip_prefix(TITLE).unwrap_or(old);
    if !rest.is_empty() && !rest.contains("<!-- begin ") {
        sections
            .push(("edge".into(), rest.strip_prefix("Measured").map_or(rest.to_string(), |r| format!("Measured{r}"))));
        rest = "";
    }
    while let Some(at) = rest.find("<!-- begin ") {
        let after = &rest[at + "<!-- begin ".len()..];
        let Some(close) = after.find(" -->\n") else { break };
        let n = after[..close].to_string();
        let (_, end) = marked(&n);
        let content = &after[close + " -->\n".len()..];
        let Some(stop) = content.find(&end) else { break };
        sections.push((n, content[..stop].to_string()));
        rest = &content[stop + end.len()..];
    }
    let body = if body.ends_with('\n') { body.to_string() } else { format!("{body}\n") };
    match sections.iter_mut().find(|(n, _)| n == name) {
        Some(s) => s.1 = body,
        None => sections.push((name.to_string(), body)),
    }
    let mut out = TITLE.to_string();
    for (n, content) in sections {
        let (begin, end) = marked(&n);
        out.push_str(&begin);
        out.push_str(&content);
        out.push_str(&end);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod benchmarks_tests {
    use super::benchmarks_with;

    #[test]
    fn sections_replace_their_own_and_keep_the_others() {
        let old = "# Benchmarks\n\nMeasured by the edge.\n| a | b |\n";
        let one = benchmarks_with(old, "db-images", "## Database images\nfast\n");
        assert!(one.contains("<!-- begin edge -->\nMeasured by the edge.\n| a | b |\n<!-- end edge -->"), "{one}");
        assert!(one.contains("<!-- begin db-images -->\n## Database images\nfast\n<!-- end db-images -->"), "{one}");
        let two = benchmarks_with(&one, "edge", "Measured again.\n");
        assert!(two.contains("<!-- begin edge -->\nMeasured again.\n<!-- end edge -->"), "{two}");
        assert!(two.contains("## Database images\nfast\n"), "{two}");
        assert_eq!(benchmarks_with(&two, "edge", "Measured again.\n"), two, "stable");
        assert!(benchmarks_with("", "x", "y").starts_with("# Benchmarks\n\n<!-- begin x -->\ny\n<!-- end x -->"));
    }
}
