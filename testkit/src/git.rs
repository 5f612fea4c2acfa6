//! Real git repositories for tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs git in `dir`, panicking with its stderr on failure.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .current_dir(dir)
        .args([
            "-c",
            "user.name=Wakegate Test",
            "-c",
            "user.email=test@wakegate.invalid",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A bare repository plus a working clone to commit from.
pub struct Repo {
    pub bare: PathBuf,
    pub work: PathBuf,
}

impl Repo {
    /// Creates a bare repo whose `main` holds `files`.
    pub fn new(files: &[(&str, &str)]) -> Repo {
        let root = crate::tempdir("git");
        let bare = root.join("repo.git");
        let work = root.join("work");
        std::fs::create_dir_all(&bare).unwrap();
        git(&bare, &["init", "--bare", "-q", "-b", "main"]);
        std::fs::create_dir_all(&work).unwrap();
        git(&work, &["init", "-q", "-b", "main"]);
        let repo = Repo { bare, work };
        repo.commit(files, "initial");
        git(&repo.work, &["remote", "add", "origin", repo.bare.to_str().unwrap()]);
        git(&repo.work, &["push", "-q", "origin", "main"]);
        repo
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    /// Writes files and commits them on the current branch.
    pub fn commit(&self, files: &[(&str, &str)], message: &str) {
        for (path, content) in files {
            let p = self.work.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, content).unwrap();
        }
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", message]);
    }

    /// Creates `branch` from main with `files` changed, and pushes it.
    pub fn branch(&self, branch: &str, files: &[(&str, &str)]) {
        git(&self.work, &["checkout", "-q", "-B", branch, "main"]);
        self.commit(files, &format!("on {branch}"));
        git(&self.work, &["push", "-q", "-f", "origin", branch]);
        git(&self.work, &["checkout", "-q", "main"]);
    }

    /// Deletes a branch from the bare repository.
    pub fn delete_branch(&self, branch: &str) {
        git(&self.work, &["push", "-q", "origin", "--delete", branch]);
    }
}
