//! Database images on the local backend: a baked data directory under
//! `<machines root>/../db-images/<image id>/` (its `db/data` laid out like a machine's,
//! `image.json` with the image's credentials and engine version), cloned into a
//! machine's `db/data` by reflink where the filesystem has it (XFS, btrfs) and copied
//! where it does not.
//!
//! A clone holds a shared `flock` on the image's `lock` file; collecting an image needs
//! the exclusive one, so an image is never removed under a clone in progress.

use crate::cloud::CloudError;
use crate::localdb::{failed, DbFile};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wakegate_db::{CloneMethod, Engine};

/// `image.json`: how to reach the baked database, and what baked it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageFile {
    /// The image's credentials (a clone changes the passwords to its own at once).
    pub db: DbFile,
    /// The engine's version: a clone runs only under the same.
    pub version: String,
}

pub const FILE: &str = "image.json";
const LOCK: &str = "lock";
/// Blocks compared at a time when measuring divergence.
const BLOCK: usize = 64 * 1024;

/// The engine's version line (`postgres (PostgreSQL) 15.8`).
pub async fn version(engine: Engine) -> Result<String, CloudError> {
    type Seen = std::collections::BTreeMap<(std::path::PathBuf, Option<std::time::SystemTime>), String>;
    static SEEN: std::sync::Mutex<Seen> = std::sync::Mutex::new(std::collections::BTreeMap::new());
    let program = match engine {
        Engine::Postgres => "postgres",
        Engine::Mariadb => "mariadbd",
    };
    let path = crate::localdb::program(program)?;
    // asked once per binary: an upgrade replaces the file (a new modification time)
    let key = (path.clone(), tokio::fs::metadata(&path).await.and_then(|m| m.modified()).ok());
    if let Some(v) = SEEN.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(v.clone());
    }
    let mut cmd = tokio::process::Command::new(&path);
    cmd.arg("--version").stdin(std::process::Stdio::null()).kill_on_drop(true);
    let out = cmd.output().await.map_err(|e| failed(format!("{program} --version: {e}")))?;
    let line = String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().trim().to_string();
    if !out.status.success() || line.is_empty() {
        return Err(failed(format!("{program} --version said nothing ({})", out.status)));
    }
    SEEN.lock().unwrap_or_else(|e| e.into_inner()).insert(key, line.clone());
    Ok(line)
}

pub async fn read(image_dir: &Path) -> Option<ImageFile> {
    let raw = tokio::fs::read(image_dir.join(FILE)).await.ok()?;
    serde_json::from_slice(&raw).ok()
}

pub async fn write(image_dir: &Path, f: &ImageFile) -> Result<(), CloudError> {
    let raw = serde_json::to_vec_pretty(f).map_err(failed)?;
    crate::localdb::write_private(&image_dir.join(FILE), &raw).await
}

/// Stops the database server of `dir` cleanly and waits for it: PostgreSQL's fast
/// shutdown and MariaDB's normal one both write everything out and mark the data
/// directory shut down. An error when it did not stop in `wait`, or stopped without
/// its clean mark (its pid file left behind): such a directory is no image.
pub async fn shutdown(dir: &Path, engine: Engine, wait: Duration) -> Result<(), CloudError> {
    use nix::sys::signal::{kill, Signal};
    let pid = tokio::fs::read_to_string(dir.join("db.pid")).await.ok().and_then(|t| t.trim().parse::<i32>().ok());
    let Some(pid) = pid.filter(|p| *p > 1).map(nix::unistd::Pid::from_raw) else {
        return Err(failed("the database server has no pid file"));
    };
    let signal = if engine == Engine::Postgres { Signal::SIGINT } else { Signal::SIGTERM };
    kill(pid, signal).map_err(|e| failed(format!("stopping the database server: {e}")))?;
    let deadline = tokio::time::Instant::now() + wait;
    while kill(pid, None).is_ok() {
        if tokio::time::Instant::now() >= deadline {
            return Err(failed(format!("the database server did not stop within {} s", wait.as_secs())));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    crate::localdb::remove_logged(&dir.join("db.pid")).await;
    let left = match engine {
        Engine::Postgres => dir.join("db/data/postmaster.pid"),
        Engine::Mariadb => dir.join("db/mysqld.pid"),
    };
    if left.exists() {
        return Err(failed(format!(
            "the database server stopped without shutting down cleanly:\n{}",
            crate::local::log_tail(dir, "db.log").await
        )));
    }
    Ok(())
}

/// A shared hold on an image while it is cloned or compared; `None` when the image is
/// not there, or is being collected right now (never waits).
pub fn hold(image_dir: &Path) -> Option<nix::fcntl::Flock<File>> {
    let f = File::open(image_dir.join(LOCK)).ok()?;
    let held = nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockSharedNonblock).ok()?;
    // collected between the open and the lock: the lock is on a removed file
    image_dir.join(FILE).exists().then_some(held)
}

/// Takes the image for removal: `None` while a clone holds it.
pub fn take(image_dir: &Path) -> std::io::Result<Option<nix::fcntl::Flock<File>>> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(image_dir.join(LOCK))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Makes the lock file clones take (written once an image is whole).
pub fn make_lock(image_dir: &Path) -> std::io::Result<()> {
    std::fs::write(image_dir.join(LOCK), b"")
}

/// Whether an error of FICLONE means "this filesystem cannot" rather than a failure.
fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc_codes::EOPNOTSUPP | libc_codes::EXDEV | libc_codes::EINVAL | libc_codes::ENOTTY)
    ) || e.kind() == ErrorKind::Unsupported
}

mod libc_codes {
    pub const EXDEV: i32 = nix::errno::Errno::EXDEV as i32;
    pub const EINVAL: i32 = nix::errno::Errno::EINVAL as i32;
    pub const EOPNOTSUPP: i32 = nix::errno::Errno::EOPNOTSUPP as i32;
    pub const ENOTTY: i32 = nix::errno::Errno::ENOTTY as i32;
}

/// Copies the tree `from` to `to` (which must not exist), keeping modes, owners and
/// modification times; file by file by reflink while the filesystem takes it, by copy
/// otherwise. Returns how, and the bytes of the files.
pub fn clone_tree(from: &Path, to: &Path) -> std::io::Result<(CloneMethod, u64)> {
    let mut method = CloneMethod::Reflink;
    let mut bytes = 0u64;
    clone_dir(from, to, &mut method, &mut bytes)?;
    Ok((method, bytes))
}

fn clone_dir(from: &Path, to: &Path, method: &mut CloneMethod, bytes: &mut u64) -> std::io::Result<()> {
    let meta = std::fs::symlink_metadata(from)?;
    std::fs::create_dir(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type()?;
        if ty.is_dir() {
            clone_dir(&src, &dst, method, bytes)?;
        } else if ty.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            let m = std::fs::symlink_metadata(&src)?;
            std::os::unix::fs::lchown(&dst, Some(m.uid()), Some(m.gid()))?;
        } else if ty.is_file() {
            *bytes += clone_file(&src, &dst, method)?;
        }
        // sockets and pipes of a stopped server are not data
    }
    std::os::unix::fs::chown(to, Some(meta.uid()), Some(meta.gid()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    Ok(())
}

fn clone_file(src: &Path, dst: &Path, method: &mut CloneMethod) -> std::io::Result<u64> {
    let from = File::open(src)?;
    let meta = from.metadata()?;
    let to = std::fs::OpenOptions::new().write(true).create_new(true).mode(meta.mode() & 0o7777).open(dst)?;
    if *method == CloneMethod::Reflink {
        match reflink_copy::reflink_file(&from, &to) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => {
                tracing::info!(error = %e, "this filesystem cannot reflink: copying the image instead");
                *method = CloneMethod::Copy;
            }
            Err(e) => return Err(e),
        }
    }
    if *method == CloneMethod::Copy {
        // std's copy between files is copy_file_range on Linux: in the kernel, no
        // round trip through this process
        std::io::copy(&mut &from, &mut &to)?;
    }
    std::os::unix::fs::fchown(&to, Some(meta.uid()), Some(meta.gid()))?;
    // the image's times: an unchanged file is then known by its size and time alone
    to.set_modified(meta.modified()?)?;
    Ok(meta.len())
}

/// Bytes of `clone` that differ from `image` (what a preview's writes changed): files
/// whose size and time are the image's count nothing, others are compared block by
/// block, and files the image does not have count whole.
pub fn diverged(image: &Path, clone: &Path) -> std::io::Result<u64> {
    let mut total = 0u64;
    diverged_dir(image, clone, &mut total)?;
    Ok(total)
}

fn diverged_dir(image: &Path, clone: &Path, total: &mut u64) -> std::io::Result<()> {
    for entry in std::fs::read_dir(clone)? {
        let entry = match entry {
            Ok(e) => e,
            // the server removes files as it goes
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        let (ours, theirs) = (entry.path(), image.join(entry.file_name()));
        let ty = entry.file_type()?;
        let r = if ty.is_dir() {
            diverged_dir(&theirs, &ours, total)
        } else if ty.is_file() {
            diverged_file(&theirs, &ours).map(|n| *total += n)
        } else {
            Ok(())
        };
        match r {
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
}

fn diverged_file(image: &Path, clone: &Path) -> std::io::Result<u64> {
    let ours = clone.metadata()?;
    let theirs = match image.metadata() {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(ours.len()),
        Err(e) => return Err(e),
    };
    if ours.len() == theirs.len() && ours.modified()? == theirs.modified()? {
        return Ok(0);
    }
    let (mut a, mut b) = (std::io::BufReader::new(File::open(image)?), std::io::BufReader::new(File::open(clone)?));
    let (mut x, mut y) = (vec![0u8; BLOCK], vec![0u8; BLOCK]);
    let mut differ = 0u64;
    loop {
        let n = read_full(&mut b, &mut y)?;
        if n == 0 {
            break;
        }
        let m = read_full(&mut a, &mut x)?;
        if m < n || x[..n] != y[..n] {
            differ += n as u64;
        }
    }
    Ok(differ)
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes of the files under `path`.
pub fn size(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else { return 0 };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => size(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

/// The directory one attempt at baking `id` works in until it is whole (each attempt
/// its own: one taken over never shares a directory with the next).
pub fn baking_dir(images: &Path, id: &str, attempt: &str) -> PathBuf {
    images.join(format!("{id}.{attempt}.baking"))
}

/// The image an entry of the images directory is of: `i-…` or `i-….<attempt>.baking`.
pub fn id_of(name: &str) -> Option<&str> {
    let id = name.split('.').next()?;
    (id.starts_with("i-") && (id.len() == name.len() || name.ends_with(".baking"))).then_some(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(root: &Path) {
        std::fs::create_dir_all(root.join("base/1")).unwrap();
        std::fs::write(root.join("base/1/100"), vec![7u8; 3 * BLOCK + 10]).unwrap();
        std::fs::write(root.join("PG_VERSION"), b"15\n").unwrap();
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700)).unwrap();
    }

    #[test]
    fn a_clone_is_the_image_and_counts_only_what_changed() {
        let dir = wakegate_testkit::tempdir("clone");
        let (image, clone) = (dir.join("image"), dir.join("clone"));
        tree(&image);
        let (method, bytes) = clone_tree(&image, &clone).unwrap();
        assert!(matches!(method, CloneMethod::Reflink | CloneMethod::Copy));
        assert_eq!(bytes, 3 * BLOCK as u64 + 10 + 3);
        assert_eq!(std::fs::read(clone.join("base/1/100")).unwrap(), vec![7u8; 3 * BLOCK + 10]);
        assert_eq!(std::fs::metadata(&clone).unwrap().mode() & 0o777, 0o700, "the data directory's mode");
        assert_eq!(diverged(&image, &clone).unwrap(), 0);

        // one block rewritten: one block diverged, however the time moved
        use std::io::{Seek, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(clone.join("base/1/100")).unwrap();
        f.seek(std::io::SeekFrom::Start(BLOCK as u64 + 5)).unwrap();
        f.write_all(b"changed").unwrap();
        drop(f);
        assert_eq!(diverged(&image, &clone).unwrap(), BLOCK as u64);
        // a new file counts whole; the image is untouched
        std::fs::write(clone.join("base/1/200"), vec![1u8; 1000]).unwrap();
        assert_eq!(diverged(&image, &clone).unwrap(), BLOCK as u64 + 1000);
        assert_eq!(std::fs::read(image.join("base/1/100")).unwrap(), vec![7u8; 3 * BLOCK + 10]);
        assert!(!image.join("base/1/200").exists());
        // a file grown past the image's end: the new tail counts
        let mut f = std::fs::OpenOptions::new().append(true).open(clone.join("PG_VERSION")).unwrap();
        f.write_all(b"more").unwrap();
        drop(f);
        assert_eq!(diverged(&image, &clone).unwrap(), BLOCK as u64 + 1000 + 7);
    }

    #[test]
    fn an_image_held_by_a_clone_cannot_be_taken() {
        let dir = wakegate_testkit::tempdir("hold");
        make_lock(&dir).unwrap();
        std::fs::write(dir.join(FILE), b"{}").unwrap();
        let held = hold(&dir).expect("the lock file is there");
        assert!(take(&dir).unwrap().is_none(), "a clone holds it");
        drop(held);
        let taken = take(&dir).unwrap().expect("free once the clone is done");
        drop(taken);
        assert!(hold(&wakegate_testkit::tempdir("none").join("gone")).is_none());
        assert_eq!(id_of("i-0123456789abcdef"), Some("i-0123456789abcdef"));
        assert_eq!(id_of("i-0123456789abcdef.w-1-2.baking"), Some("i-0123456789abcdef"));
        assert_eq!(id_of("i-0123.json"), None);
        assert_eq!(id_of("lost+found"), None);
    }
}
