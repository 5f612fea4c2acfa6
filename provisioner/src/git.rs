//! The git operations the provisioner needs, through the `git` command (any URL git
//! understands: file://, https://, git://, ssh). Whether a ref still exists is waker's
//! question (`wakegate_waker::refs`).

use std::path::Path;
use std::time::Duration;
use tokio::process::Command;

const GIT_TIMEOUT: Duration = Duration::from_secs(120);

async fn run(dir: Option<&Path>, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new("git");
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    cmd.args(args).env("GIT_TERMINAL_PROMPT", "0").kill_on_drop(true);
    let out = tokio::time::timeout(GIT_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("git {} timed out", args.first().unwrap_or(&"")))?
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Fetches `git_ref` from `url` into a new repository at `dir` and checks it out.
pub async fn checkout(url: &str, git_ref: &str, dir: &Path) -> Result<(), String> {
    tokio::fs::create_dir_all(dir).await.map_err(|e| e.to_string())?;
    run(Some(dir), &["init", "-q"]).await?;
    run(Some(dir), &["fetch", "-q", "--depth", "1", "--", url, git_ref])
        .await
        .map_err(|e| format!("cannot fetch {git_ref}: {e}"))?;
    run(Some(dir), &["checkout", "-q", "--detach", "FETCH_HEAD"]).await?;
    Ok(())
}
