//! The Worker under `wrangler dev` (workerd, local and offline) on a free port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Wrangler {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    /// How long from spawn until it answered HTTP.
    pub startup: Duration,
}

/// The repository root (this crate lives in `<root>/testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The built Worker, if `scripts/build-worker` has run.
pub fn built_worker() -> Option<PathBuf> {
    let shim = repo_root().join("edge/build/worker/shim.mjs");
    shim.exists().then_some(shim)
}

impl Wrangler {
    /// Starts `wrangler dev` for the built Worker with these vars. Several run in
    /// parallel in tests; a start that loses a port race is tried again.
    pub async fn start(vars: &[(&str, String)]) -> anyhow::Result<Wrangler> {
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(vars).await {
                Ok(w) => return Ok(w),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("tried"))
    }

    async fn start_once(vars: &[(&str, String)]) -> anyhow::Result<Wrangler> {
        let shim =
            built_worker().ok_or_else(|| anyhow::anyhow!("the Worker is not built: run scripts/build-worker"))?;
        let wrangler = repo_root().join("node_modules/.bin/wrangler");
        anyhow::ensure!(wrangler.exists(), "wrangler is not installed: run scripts/worker-tools");
        let dir = crate::tempdir("wrangler");
        // no [build]: the Worker is built already; no routes: local only
        std::fs::write(
            dir.join("wrangler.toml"),
            format!(
                "name = \"wakegate-edge-test\"\nmain = \"{}\"\ncompatibility_date = \"2025-06-01\"\n",
                shim.display()
            ),
        )?;
        let port = crate::free_port();
        let mut cmd = Command::new(&wrangler);
        cmd.arg("dev")
            .arg("--config")
            .arg(dir.join("wrangler.toml"))
            .args([
                "--ip",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "warn",
                "--show-interactive-dev-session=false",
            ])
            .args(["--inspector-port", &crate::free_port().to_string()])
            .arg("--persist-to")
            .arg(dir.join("state"))
            .env("CI", "true")
            .env("WRANGLER_SEND_METRICS", "false")
            .env("CLOUDFLARE_CF_FETCH_ENABLED", "false")
            .env("WRANGLER_LOG_PATH", dir.join("logs"))
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout.log"))?)
            .stderr(std::fs::File::create(dir.join("stderr.log"))?);
        for (k, v) in vars {
            cmd.arg("--var").arg(format!("{k}:{v}"));
        }
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let t0 = Instant::now();
        let child = cmd.spawn()?;
        let mut w = Wrangler { child, port, dir, startup: Duration::ZERO };
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        while t0.elapsed() < Duration::from_secs(60) {
            if let Ok(Some(status)) = w.child.try_wait() {
                let log = std::fs::read_to_string(w.dir.join("stderr.log")).unwrap_or_default();
                anyhow::bail!("wrangler dev exited ({status}): {log}");
            }
            if crate::http::send(addr, "GET", "wakegate-probe.invalid", "/", &[("user-agent", "probe-bot")], "")
                .await
                .is_ok()
            {
                w.startup = t0.elapsed();
                return Ok(w);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("wrangler dev did not answer within 60 s")
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Wrangler {
    fn drop(&mut self) {
        // wrangler starts workerd as a child: stop the whole process group we created
        let pgid = self.child.id();
        let _ = Command::new("kill").args(["-TERM", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).stderr(Stdio::null()).status();
        let _ = self.child.wait();
    }
}
