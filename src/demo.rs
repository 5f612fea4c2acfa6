//! The demo repository `wakegate dev` serves: `examples/demo-app` committed on `main`,
//! and a `feature/blue` branch with different content.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::process::Command;

const APP: &str = include_str!("../examples/demo-app/app.py");
const MANIFEST: &str = include_str!("../examples/demo-app/wakegate.toml");
const CONTENT_MAIN: &str = include_str!("../examples/demo-app/content.html");
const CONTENT_BLUE: &str = include_str!("../examples/demo-app/content-blue.html");

/// The branches of the demo repository.
pub const BRANCHES: [&str; 2] = ["main", "feature/blue"];

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Wakegate Demo",
            "-c",
            "user.email=demo@wakegate.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .context("running git")?;
    anyhow::ensure!(out.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Creates (once) a bare repository under `data_dir` and returns its file:// URL.
pub fn ensure_repo(data_dir: &Path) -> anyhow::Result<String> {
    let bare: PathBuf = std::path::absolute(data_dir.join("demo.git"))?;
    let url = format!("file://{}", bare.display());
    if bare.join("HEAD").exists() {
        return Ok(url);
    }
    let work = data_dir.join("demo-work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    std::fs::create_dir_all(&bare)?;
    git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
    git(&work, &["init", "-q", "-b", "main"])?;
    std::fs::write(work.join("app.py"), APP)?;
    std::fs::write(work.join("wakegate.toml"), MANIFEST)?;
    std::fs::write(work.join("content.html"), CONTENT_MAIN)?;
    git(&work, &["add", "-A"])?;
    git(&work, &["commit", "-q", "-m", "demo app"])?;
    git(&work, &["checkout", "-q", "-b", "feature/blue"])?;
    std::fs::write(work.join("content.html"), CONTENT_BLUE)?;
    git(&work, &["commit", "-q", "-am", "blue content"])?;
    let bare_s = bare.to_string_lossy().into_owned();
    git(&work, &["push", "-q", &bare_s, "main", "feature/blue"])?;
    std::fs::remove_dir_all(&work)?;
    Ok(url)
}
