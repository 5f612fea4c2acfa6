//! The local backend: a machine is a directory `<root>/<machine id>/` holding
//!
//! * `owner` — the preview id (the equivalent of a cloud label), written first;
//! * `src/` — the checkout of the preview's ref;
//! * `machine.json` — the manifest and port, so the app can start again after sleep;
//! * `build.pid`, `app.pid` — process-group ids of what runs there, so a provisioner
//!   that restarts after a crash can stop what an earlier one started;
//! * `build.log`, `app.log`.
//!
//! Processes run in their own process group on 127.0.0.1 with `PORT` and `PREVIEW_URL`
//! set; stopping sends SIGTERM to the group, then SIGKILL. Every start gets a fresh port
//! below the kernel's ephemeral range, reserved by a file in `ports/` beside the machines
//! root (shared by every provisioner on that root) and given back when the app stops.

use crate::cloud::{
    BakeOrder, Baked, Cloud, CloudError, DbMade, DeploySpec, ImageSource, Listing, MachineInfo, Outcome, Progress,
};
use crate::localimage;
use crate::manifest::Manifest;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wakegate_core::lifecycle::{MachineId, Phase};
use wakegate_core::route::Restore;
use wakegate_core::route::{Preview, Project};
use wakegate_db::CloneMethod;

#[derive(Serialize, Deserialize)]
struct MachineFile {
    manifest: Manifest,
    port: u16,
    preview_url: String,
    /// Machines written before custom names had none.
    #[serde(default)]
    preview_urls: Vec<String>,
    /// Environment variables the project's secrets are in (its forge token): the app
    /// and its build never see them.
    #[serde(default)]
    hidden_env: Vec<String>,
}

pub struct LocalCloud {
    root: PathBuf,
    /// Port reservations (`<port>` files), beside the machines: shared by every
    /// provisioner using this root.
    ports: PathBuf,
}

fn backend(e: impl std::fmt::Display) -> CloudError {
    CloudError::Backend(e.to_string())
}

impl LocalCloud {
    pub fn new(root: impl Into<PathBuf>) -> std::io::Result<LocalCloud> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        let ports = root.parent().map_or_else(|| root.join(".ports"), |p| p.join("ports"));
        std::fs::create_dir_all(&ports)?;
        Ok(LocalCloud { root, ports })
    }

    fn dir(&self, machine: &MachineId) -> Result<PathBuf, CloudError> {
        if machine.is_empty() || !machine.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err(CloudError::NotFound(machine.clone()));
        }
        Ok(self.root.join(machine))
    }

    async fn spawn(
        &self,
        dir: &Path,
        command: &str,
        pidfile: &str,
        log: &str,
        env: &[(String, String)],
        hidden: &[String],
    ) -> Result<tokio::process::Child, CloudError> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(log)).map_err(backend)?;
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(command)
            .current_dir(dir.join("src"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(backend)?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        // the code being previewed is not trusted with Wakegate's own settings and keys
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("WAKEGATE_") {
                cmd.env_remove(k);
            }
        }
        for k in hidden {
            cmd.env_remove(k);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().map_err(|e| CloudError::Failed(format!("cannot start `{command}`: {e}")))?;
        let pid = child.id().ok_or_else(|| backend("child has no pid"))?;
        tokio::fs::write(dir.join(pidfile), pid.to_string()).await.map_err(backend)?;
        Ok(child)
    }

    async fn start_app(&self, machine: &MachineId, dir: &Path, mf: &MachineFile) -> Result<String, CloudError> {
        stop_group(dir, "app.pid").await;
        let env = full_env(dir, mf).await;
        let mut child = self.spawn(dir, &mf.manifest.run, "app.pid", "app.log", &env, &mf.hidden_env).await?;
        let origin = format!("http://127.0.0.1:{}", mf.port);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(mf.manifest.start_timeout_secs);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = log_tail(dir, "app.log").await;
                return Err(CloudError::Failed(format!("the app exited ({status}) before answering:\n{tail}")));
            }
            if health_ok(mf.port, &mf.manifest.health).await {
                // reap the child whenever it ends; we track it by its pid file from now on
                tokio::spawn(async move {
                    let _ = child.wait().await;
                });
                tracing::info!(machine = %machine, %origin, "app healthy");
                return Ok(origin);
            }
            if tokio::time::Instant::now() >= deadline {
                stop_group(dir, "app.pid").await;
                let tail = log_tail(dir, "app.log").await;
                return Err(CloudError::Failed(format!(
                    "GET {} did not answer within {}s:\n{tail}",
                    mf.manifest.health, mf.manifest.start_timeout_secs
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The environment variables a project's forge secrets are read from.
fn secret_vars(project: &wakegate_core::route::Project) -> Vec<String> {
    let Some(f) = &project.forge else { return Vec::new() };
    [Some(&f.token), f.webhook_secret.as_ref(), f.signing_secret.as_ref()]
        .into_iter()
        .flatten()
        .filter_map(|s| match s {
            wakegate_core::route::SecretRef::Env(name) => Some(name.clone()),
            wakegate_core::route::SecretRef::File(_) => None,
        })
        .collect()
}

fn app_env(mf: &MachineFile) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = mf.manifest.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    env.push(("PORT".into(), mf.port.to_string()));
    env.push(("HOST".into(), "127.0.0.1".into()));
    env.push(("PREVIEW_URL".into(), mf.preview_url.clone()));
    let urls = if mf.preview_urls.is_empty() { vec![mf.preview_url.clone()] } else { mf.preview_urls.clone() };
    env.push(("PREVIEW_URLS".into(), urls.join(",")));
    env
}

/// The app's environment with its database's, when it has one.
async fn full_env(dir: &Path, mf: &MachineFile) -> Vec<(String, String)> {
    let mut env = app_env(mf);
    if let Some(db) = crate::localdb::read(dir).await {
        env.extend(crate::localdb::app_env(&db));
    }
    env
}

/// Gives the database's port back (its server has stopped).
async fn release_db_port(ports: &Path, dir: &Path) {
    if let Some(db) = crate::localdb::read(dir).await.filter(|d| d.port != 0) {
        unreserve_port(ports, db.port).await;
    }
}

impl LocalCloud {
    /// Starts the machine's database server, if it has one, on a fresh port.
    async fn start_db(&self, dir: &Path) -> Result<(), CloudError> {
        let Some(mut db) = crate::localdb::read(dir).await else { return Ok(()) };
        stop_group(dir, "db.pid").await;
        let old = std::mem::replace(&mut db.port, reserve_port(&self.ports)?);
        crate::localdb::write(dir, &db).await?;
        if old != 0 {
            unreserve_port(&self.ports, old).await;
        }
        crate::localdb::start(dir, &db).await
    }

    /// Stops the machine's database server and gives its port back.
    async fn stop_db(&self, dir: &Path) {
        stop_group(dir, "import.pid").await;
        stop_group(dir, "db.pid").await;
        release_db_port(&self.ports, dir).await;
    }

    /// The preview's database: cloned from the project's image when one fits its
    /// recipe, else a fresh one filled from its dump and sanitized.
    async fn restore_db(
        &self,
        dir: &Path,
        db: &crate::manifest::Database,
        spec: &DeploySpec,
        progress: &dyn Progress,
    ) -> Result<(), CloudError> {
        if !progress.phase(Phase::RestoringDb).await {
            return Err(CloudError::Failed("cancelled".into()));
        }
        self.stop_db(dir).await;
        let how = if spec.baking { Restore::ImportWhileBaking } else { Restore::Import };
        let made = self.make_db(dir, db, &spec.images, spec.dump.as_ref(), None, how, progress).await?;
        tracing::info!(preview = %spec.preview_id, method = made.method.as_str(), took_ms = made.took_ms, "database made");
        Ok(())
    }

    /// Makes the machine's database: a clone of the image among `images` that fits the
    /// checkout's recipe, else a fresh one filled from `dump` (empty without one). With
    /// `keep` (a running preview's refresh), its port and passwords stay. Reported to
    /// `progress` while a clone still holds its image.
    #[allow(clippy::too_many_arguments)]
    async fn make_db(
        &self,
        dir: &Path,
        db: &crate::manifest::Database,
        images: &[ImageSource],
        dump: Option<&crate::cloud::DumpSource>,
        keep: Option<&crate::localdb::DbFile>,
        how: Restore,
        progress: &dyn Progress,
    ) -> Result<DbMade, CloudError> {
        if let Some(dump) = dump.filter(|d| d.engine != db.engine) {
            return Err(crate::localdb::wrong_engine(db.engine, dump));
        }
        let recipe = recipe_of(dir, db, dump.is_some()).await?;
        let began = std::time::Instant::now();
        let dump_id = dump.map(|d| d.id.clone());
        let image = dump.and_then(|d| fitting(images, recipe.as_ref(), &d.id));
        if let Some(image) = image {
            match self.clone_image(dir, db, image, keep, progress).await {
                Ok((method, _hold)) => {
                    let took_ms = began.elapsed().as_millis() as u64;
                    let made = DbMade { recipe, dump_id, image: Some(image.id.clone()), method, took_ms };
                    progress.database(made.clone()).await;
                    return Ok(made);
                }
                Err(e) => {
                    let why =
                        format!("cloning the database image {} failed, importing the dump instead: {e}", image.id);
                    tracing::warn!(dir = %dir.display(), "{why}");
                    append_log(dir, &why).await;
                    // what the clone started and reserved goes first
                    crate::local::stop_group(dir, "db.pid").await;
                    if keep.is_none() {
                        release_db_port(&self.ports, dir).await;
                    }
                }
            }
        }
        let mut f = crate::localdb::init(dir, db, keep).await?;
        crate::localdb::remove_logged(&dir.join(CLONED)).await;
        if keep.is_none() {
            f.port = reserve_port(&self.ports)?;
            crate::localdb::write(dir, &f).await?;
        }
        crate::localdb::start(dir, &f).await?;
        crate::localdb::create(dir, &f).await?;
        if let Some(dump) = dump {
            progress.restoring(how).await;
            fill(dir, &f, dump, db, progress).await?;
        }
        let took_ms = began.elapsed().as_millis() as u64;
        let made = DbMade { recipe, dump_id, image: None, method: CloneMethod::Import, took_ms };
        progress.database(made.clone()).await;
        Ok(made)
    }

    fn images_dir(&self) -> PathBuf {
        images_dir(&self.root)
    }

    /// Clones `image` into the machine's database and starts its server, with fresh
    /// credentials and port (or `keep`'s, when refreshing a running preview's). The
    /// returned hold keeps the image from being collected until dropped.
    async fn clone_image(
        &self,
        dir: &Path,
        db: &crate::manifest::Database,
        image: &ImageSource,
        keep: Option<&crate::localdb::DbFile>,
        progress: &dyn Progress,
    ) -> Result<(CloneMethod, nix::fcntl::Flock<std::fs::File>), CloudError> {
        let from = PathBuf::from(&image.location);
        let hold = localimage::hold(&from)
            .ok_or_else(|| CloudError::Failed(format!("the image {} was collected", image.id)))?;
        let Some(file) = localimage::read(&from).await else {
            return Err(CloudError::Failed(format!("the image {} is not on this machine", image.id)));
        };
        let version = localimage::version(db.engine).await?;
        if file.version != version {
            return Err(CloudError::Failed(format!(
                "the image was baked under {}, and this machine runs {version}",
                file.version
            )));
        }
        progress.restoring(Restore::Clone).await;
        crate::local::stop_group(dir, "import.pid").await;
        crate::local::stop_group(dir, "db.pid").await;
        crate::localdb::remove_logged(&dir.join(CLONED)).await;
        let data = dir.join("db");
        if data.exists() {
            tokio::fs::remove_dir_all(&data)
                .await
                .map_err(|e| CloudError::Failed(format!("removing the old database: {e}")))?;
        }
        tokio::fs::create_dir_all(&data).await.map_err(backend)?;
        crate::localdb::chown_to_pg(&data)?;
        let (src, dst) = (from.join("db/data"), data.join("data"));
        let (method, bytes) = tokio::task::spawn_blocking(move || localimage::clone_tree(&src, &dst))
            .await
            .map_err(backend)?
            .map_err(|e| CloudError::Failed(format!("cloning the image: {e}")))?;
        progress.detail(bytes, bytes).await;
        // the image's credentials until the server is up, then the preview's own
        let mut theirs = file.db.clone();
        let ours = match keep {
            Some(k) => k.clone(),
            None => {
                let mut ours =
                    crate::localdb::DbFile { env: db.env, port: reserve_port(&self.ports)?, ..file.db.clone() };
                crate::localdb::fresh_passwords(&mut ours)?;
                crate::localdb::write(dir, &ours).await?;
                ours
            }
        };
        theirs.port = ours.port;
        crate::localdb::start(dir, &theirs).await?;
        crate::localdb::set_passwords(dir, &theirs, &ours).await?;
        tokio::fs::write(dir.join(CLONED), image.location.as_bytes()).await.map_err(backend)?;
        Ok((method, hold))
    }

    /// A bake's work in `work`, moved to `done` once whole.
    async fn bake_in(&self, work: &Path, done: &Path, order: &BakeOrder) -> Result<Baked, CloudError> {
        let db = crate::manifest::Database {
            engine: order.recipe.engine,
            name: order.recipe.name.clone(),
            env: crate::manifest::DbEnv::Url,
            sanitize: None,
        };
        let mut f = crate::localdb::init(work, &db, None).await?;
        f.port = reserve_port(&self.ports)?;
        crate::localdb::write(work, &f).await?;
        let baked = async {
            crate::localdb::start(work, &f).await?;
            crate::localdb::create(work, &f).await?;
            crate::localdb::import(work, &f, &order.dump, &Quiet).await?;
            if let Some(sql) = &order.recipe.sanitize {
                let file = work.join("sanitize.sql");
                tokio::fs::write(&file, sql).await.map_err(backend)?;
                crate::localdb::sanitize(work, &f, &file).await?;
            }
            localimage::shutdown(work, db.engine, Duration::from_secs(600)).await
        }
        .await;
        // the port is given back only once no file names it
        let port = std::mem::replace(&mut f.port, 0);
        let written = crate::localdb::write(work, &f).await;
        unreserve_port(&self.ports, port).await;
        baked?;
        written?;
        let version = localimage::version(db.engine).await?;
        localimage::write(work, &localimage::ImageFile { db: f, version: version.clone() }).await?;
        localimage::make_lock(work).map_err(backend)?;
        let size = localimage::size(&work.join("db/data"));
        // never over another attempt's whole image
        if done.exists() {
            return Err(CloudError::Failed("another attempt finished this image first".into()));
        }
        tokio::fs::rename(work, done).await.map_err(backend)?;
        Ok(Baked { location: done.display().to_string(), size, version })
    }

    /// Stops what a bake in `d` runs and removes the directory.
    async fn clear_dir(&self, d: &Path) {
        stop_group(d, "import.pid").await;
        stop_group(d, "db.pid").await;
        release_db_port(&self.ports, d).await;
        crate::localdb::remove_logged(d).await;
    }

    /// Stops what every bake of `id` runs and removes what they left, whole or not.
    async fn clear_image(&self, id: &str) {
        let images = self.images_dir();
        let mut dirs = vec![images.join(id)];
        if let Ok(mut rd) = tokio::fs::read_dir(&images).await {
            while let Ok(Some(e)) = rd.next_entry().await {
                if localimage::id_of(&e.file_name().to_string_lossy()) == Some(id) {
                    dirs.push(e.path());
                }
            }
        }
        for d in dirs {
            self.clear_dir(&d).await;
        }
    }
}

/// The machine's file naming the image its database was cloned from.
const CLONED: &str = "db-image";

/// Where images live: beside the machines root.
fn images_dir(root: &Path) -> PathBuf {
    root.parent().map_or_else(|| root.join(".db-images"), |p| p.join("db-images"))
}

/// Serializes what changes a machine's database (a refresh, a stop, a delete), across
/// provisioners sharing the root: an exclusive `flock` on `<machine>/db.lock`, taken off
/// the runtime's threads. `None` when the machine is gone.
async fn db_lock(dir: &Path) -> Option<nix::fcntl::Flock<std::fs::File>> {
    let path = dir.join("db.lock");
    tokio::task::spawn_blocking(move || {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).ok()?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).ok()
    })
    .await
    .ok()
    .flatten()
}

/// Adds a line to the machine's build log (what `wakegate logs` shows).
async fn append_log(dir: &Path, line: &str) {
    use tokio::io::AsyncWriteExt;
    if let Ok(mut f) = tokio::fs::OpenOptions::new().create(true).append(true).open(dir.join("build.log")).await {
        if let Err(e) = f.write_all(format!("{line}\n").as_bytes()).await {
            tracing::debug!(error = %e, "writing the build log failed");
        }
    }
}

/// What the preview's database is made of besides its dump: `None` when its sanitize
/// file is too big to keep in an image's record (it imports then). A missing sanitize
/// file fails a database that has a dump to import; one that leads out of the checkout
/// (a symbolic link) is refused.
async fn recipe_of(
    dir: &Path,
    db: &crate::manifest::Database,
    has_dump: bool,
) -> Result<Option<wakegate_db::Recipe>, CloudError> {
    let sanitize = match db.sanitize_path() {
        None => None,
        Some(path) => {
            let src = dir.join("src");
            let inside = match (tokio::fs::canonicalize(src.join(path)).await, tokio::fs::canonicalize(&src).await) {
                (Ok(file), Ok(root)) if file.starts_with(&root) => Some(file),
                (Ok(_), Ok(_)) => {
                    return Err(CloudError::Failed(format!("{path} leads out of the repository: it is not read")))
                }
                _ => None,
            };
            match inside {
                Some(file) => match tokio::fs::read(&file).await {
                    Ok(sql) if sql.len() > wakegate_db::image::MAX_SANITIZE => return Ok(None),
                    Ok(sql) => Some(String::from_utf8_lossy(&sql).into_owned()),
                    Err(e) => return Err(CloudError::Failed(format!("reading {path}: {e}"))),
                },
                None if has_dump => {
                    return Err(CloudError::Failed(format!(
                        "{path} is not in the repository: add the SQL that sanitizes an imported dump, or set \
                         `sanitize = false` under [database] in {}",
                        crate::manifest::FILE
                    )))
                }
                None => None,
            }
        }
    };
    Ok(Some(wakegate_db::Recipe { engine: db.engine, name: db.name.clone(), sanitize }))
}

/// The image of `dump_id` baked with this recipe, if one is offered.
fn fitting<'a>(
    images: &'a [ImageSource],
    recipe: Option<&wakegate_db::Recipe>,
    dump_id: &str,
) -> Option<&'a ImageSource> {
    let digest = recipe?.digest();
    images.iter().find(|i| i.recipe_digest == digest && i.dump_id == dump_id)
}

/// Imports the dump into the started server and runs the sanitize file.
async fn fill(
    dir: &Path,
    f: &crate::localdb::DbFile,
    dump: &crate::cloud::DumpSource,
    db: &crate::manifest::Database,
    progress: &dyn Progress,
) -> Result<(), CloudError> {
    crate::localdb::import(dir, f, dump, progress).await?;
    match db.sanitize_path() {
        Some(path) => crate::localdb::sanitize(dir, f, &dir.join("src").join(path)).await,
        None => {
            tracing::info!("sanitize = false: the dump is used as it is");
            Ok(())
        }
    }
}

/// A bake's progress goes nowhere: nobody waits on it.
struct Quiet;

#[async_trait]
impl Progress for Quiet {
    async fn phase(&self, _: Phase) -> bool {
        true
    }
}

/// Ports apps get: below the kernel's ephemeral range, so no outgoing connection takes
/// one between the check and the app's bind (a health check would then reach someone
/// else), and reserved with a file in `ports`, so two provisioners sharing a machines
/// root never hand out the same one.
fn reserve_port(ports: &Path) -> Result<u16, CloudError> {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 10_000;
    for _ in 0..256 {
        let port = if ephemeral_start > LOWEST + 1000 {
            let mut b = [0u8; 2];
            getrandom::fill(&mut b).map_err(backend)?;
            LOWEST + u16::from_le_bytes(b) % (ephemeral_start - LOWEST)
        } else {
            std::net::TcpListener::bind("127.0.0.1:0").map_err(backend)?.local_addr().map_err(backend)?.port()
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        match std::fs::OpenOptions::new().write(true).create_new(true).open(ports.join(port.to_string())) {
            Ok(_) => return Ok(port),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(backend(e)),
        }
    }
    Err(backend("no free port for the app"))
}

/// Gives a port back. A reservation that is already gone is fine; any other failure
/// only keeps the port out of use, and is logged.
async fn unreserve_port(ports: &Path, port: u16) {
    match tokio::fs::remove_file(ports.join(port.to_string())).await {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            tracing::warn!(port, error = %e, "giving a port back failed; it stays reserved")
        }
        _ => {}
    }
}

/// Gives a machine's port back (its app has stopped).
async fn release_port(ports: &Path, dir: &Path) {
    let port = tokio::fs::read(dir.join("machine.json"))
        .await
        .ok()
        .and_then(|raw| serde_json::from_slice::<MachineFile>(&raw).ok())
        .map(|mf| mf.port);
    if let Some(port) = port {
        unreserve_port(ports, port).await;
    }
}

async fn health_ok(port: u16, path: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(("127.0.0.1", port))).await
    else {
        return false;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nUser-Agent: wakegate-health\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    match tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await {
        Ok(Ok(_)) => buf.starts_with(b"HTTP/1.") && (buf[9] == b'2' || buf[9] == b'3'),
        _ => false,
    }
}

pub(crate) async fn log_tail(dir: &Path, log: &str) -> String {
    let text = tokio::fs::read_to_string(dir.join(log)).await.unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

async fn kill(signal: &str, pgid: u32) -> bool {
    tokio::process::Command::new("kill")
        .args([signal, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Stops the process group recorded in `dir/pidfile`, if any; waits up to 5 s for it.
pub(crate) async fn stop_group(dir: &Path, pidfile: &str) {
    let Ok(text) = tokio::fs::read_to_string(dir.join(pidfile)).await else {
        return;
    };
    let Ok(pgid) = text.trim().parse::<u32>() else {
        return;
    };
    if pgid > 1 && kill("-TERM", pgid).await {
        for _ in 0..50 {
            if !kill("-0", pgid).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        kill("-KILL", pgid).await;
    }
    let _ = tokio::fs::remove_file(dir.join(pidfile)).await;
}

/// Stops every process any machine under `root` records, synchronously (for shutdown
/// paths that cannot await, such as `Drop`). Machines and checkouts stay.
pub fn kill_all_blocking(root: &Path) {
    let images = images_dir(root);
    let entries = [root, images.as_path()].into_iter().filter_map(|d| std::fs::read_dir(d).ok());
    for e in entries.flatten().flatten() {
        for pidfile in ["build.pid", "app.pid", "import.pid", "db.pid"] {
            let pgid = std::fs::read_to_string(e.path().join(pidfile)).ok().and_then(|s| s.trim().parse::<u32>().ok());
            if let Some(pgid) = pgid.filter(|p| *p > 1) {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Whether the process group in `dir/pidfile` is alive.
pub async fn group_alive(dir: &Path, pidfile: &str) -> bool {
    match tokio::fs::read_to_string(dir.join(pidfile)).await.ok().and_then(|t| t.trim().parse::<u32>().ok()) {
        Some(pgid) if pgid > 1 => kill("-0", pgid).await,
        _ => false,
    }
}

#[async_trait]
impl Cloud for LocalCloud {
    async fn create(&self, preview: &Preview, _: &Project) -> Result<MachineId, CloudError> {
        let preview_id = preview.id.as_str();
        let mut b = [0u8; 6];
        getrandom::fill(&mut b).map_err(backend)?;
        let id = format!("m-{}", hex::encode(b));
        let dir = self.dir(&id)?;
        tokio::fs::create_dir_all(&dir).await.map_err(backend)?;
        tokio::fs::write(dir.join("owner"), preview_id).await.map_err(backend)?;
        Ok(id)
    }

    async fn deploy(
        &self,
        machine: &MachineId,
        spec: &DeploySpec,
        progress: &dyn Progress,
    ) -> Result<Outcome, CloudError> {
        let dir = self.dir(machine)?;
        if !dir.exists() {
            return Err(CloudError::NotFound(machine.clone()));
        }
        // a deploy retried after a crash: what the earlier attempt started goes first
        stop_group(&dir, "build.pid").await;
        stop_group(&dir, "app.pid").await;
        if !progress.phase(Phase::Checkout).await {
            return Err(CloudError::Failed("cancelled".into()));
        }
        crate::git::checkout(&spec.git_url, &spec.git_ref, &dir.join("src"), spec.git_auth.as_ref())
            .await
            .map_err(CloudError::Failed)?;
        let text = tokio::fs::read_to_string(dir.join("src").join(crate::manifest::FILE))
            .await
            .map_err(|_| CloudError::Failed(format!("the repository has no {} at its root", crate::manifest::FILE)))?;
        let manifest = Manifest::parse(&text).map_err(CloudError::Failed)?;
        release_port(&self.ports, &dir).await;
        let mf = MachineFile {
            manifest,
            port: reserve_port(&self.ports)?,
            preview_url: spec.preview_url.clone(),
            preview_urls: spec.preview_urls.clone(),
            hidden_env: secret_vars(&spec.project),
        };
        tokio::fs::write(dir.join("machine.json"), serde_json::to_vec_pretty(&mf).map_err(backend)?)
            .await
            .map_err(backend)?;
        match &mf.manifest.database {
            Some(db) => self.restore_db(&dir, db, spec, progress).await?,
            None => {
                // a branch that dropped its database
                self.stop_db(&dir).await;
                crate::localdb::remove_logged(&dir.join(crate::localdb::FILE)).await;
            }
        }

        if let Some(build) = mf.manifest.build.clone() {
            if !progress.phase(Phase::Build).await {
                return Err(CloudError::Failed("cancelled".into()));
            }
            let env = full_env(&dir, &mf).await;
            let mut child = self.spawn(&dir, &build, "build.pid", "build.log", &env, &mf.hidden_env).await?;
            let status =
                match tokio::time::timeout(Duration::from_secs(mf.manifest.build_timeout_secs), child.wait()).await {
                    Ok(status) => status.map_err(backend)?,
                    Err(_) => {
                        stop_group(&dir, "build.pid").await;
                        return Err(CloudError::Failed(format!(
                            "build timed out after {}s",
                            mf.manifest.build_timeout_secs
                        )));
                    }
                };
            let _ = tokio::fs::remove_file(dir.join("build.pid")).await;
            if !status.success() {
                let tail = log_tail(&dir, "build.log").await;
                return Err(CloudError::Failed(format!("build failed ({status}):\n{tail}")));
            }
        }
        if !progress.phase(Phase::Start).await {
            return Err(CloudError::Failed("cancelled".into()));
        }
        // health checking is part of starting; report it as its own phase
        let _ = progress.phase(Phase::Health).await;
        self.start_app(machine, &dir, &mf).await.map(Outcome::Ready)
    }

    fn wake_kind(&self, _: &Project) -> crate::cloud::WakeKind {
        crate::cloud::WakeKind::Warm
    }

    async fn start(&self, machine: &MachineId, _: &Project) -> Result<Outcome, CloudError> {
        let dir = self.dir(machine)?;
        let raw = tokio::fs::read(dir.join("machine.json")).await.map_err(|_| CloudError::NotFound(machine.clone()))?;
        let mut mf: MachineFile = serde_json::from_slice(&raw).map_err(backend)?;
        // a fresh port for every start: while the app slept, its old port may have gone
        // to another preview's app, and a health check there would pass for the wrong app.
        // The old one is given back once start_app has stopped whatever held it.
        let old = std::mem::replace(&mut mf.port, reserve_port(&self.ports)?);
        tokio::fs::write(dir.join("machine.json"), serde_json::to_vec_pretty(&mf).map_err(backend)?)
            .await
            .map_err(backend)?;
        let started = match self.start_db(&dir).await {
            Ok(()) => self.start_app(machine, &dir, &mf).await,
            Err(e) => Err(e),
        };
        unreserve_port(&self.ports, old).await;
        started.map(Outcome::Ready)
    }

    async fn stop(&self, machine: &MachineId, _: &Project) -> Result<(), CloudError> {
        let dir = self.dir(machine)?;
        if !dir.exists() {
            return Err(CloudError::NotFound(machine.clone()));
        }
        stop_group(&dir, "app.pid").await;
        release_port(&self.ports, &dir).await;
        // asleep, the database keeps its data and frees its memory
        self.stop_db(&dir).await;
        Ok(())
    }

    async fn delete(&self, machine: &MachineId) -> Result<(), CloudError> {
        let dir = self.dir(machine)?;
        if !dir.exists() {
            return Ok(());
        }
        stop_group(&dir, "build.pid").await;
        stop_group(&dir, "app.pid").await;
        release_port(&self.ports, &dir).await;
        self.stop_db(&dir).await;
        tokio::fs::remove_dir_all(&dir).await.map_err(backend)?;
        tracing::info!(%machine, "machine deleted");
        Ok(())
    }

    async fn list(&self) -> Result<Listing, CloudError> {
        let mut out = Vec::new();
        let mut rd = tokio::fs::read_dir(&self.root).await.map_err(backend)?;
        while let Some(entry) = rd.next_entry().await.map_err(backend)? {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !id.starts_with("m-") {
                continue;
            }
            // another provisioner may delete a machine while this one lists
            let meta = match entry.metadata().await {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(backend(e)),
            };
            let created_at = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let preview_id = tokio::fs::read_to_string(entry.path().join("owner")).await.unwrap_or_default();
            let status = if group_alive(&entry.path(), "app.pid").await { "running" } else { "off" };
            out.push(MachineInfo { id, preview_id, created_at, held: false, status: status.into(), hourly_cost: 0.0 });
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Listing { machines: out, requests: 0 })
    }

    async fn bake_image(&self, order: &BakeOrder) -> Result<Baked, CloudError> {
        let images = self.images_dir();
        let work = localimage::baking_dir(&images, &order.image_id, &order.attempt);
        let done = images.join(&order.image_id);
        // whatever an earlier attempt left, whole or not, is not an image until recorded
        self.clear_image(&order.image_id).await;
        tokio::fs::create_dir_all(&work).await.map_err(backend)?;
        let baked = self.bake_in(&work, &done, order).await;
        if baked.is_err() {
            // this attempt's directory only: another worker's may be the one wanted
            self.clear_dir(&work).await;
        }
        baked
    }

    async fn drop_image(&self, id: &str, _location: &str) -> Result<bool, CloudError> {
        let dir = self.images_dir().join(id);
        // held while it is removed: a clone starting now finds it gone
        let _taken = match localimage::take(&dir) {
            Ok(None) => return Ok(false),
            Ok(Some(l)) => Some(l),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(backend(e)),
        };
        self.clear_image(id).await;
        Ok(true)
    }

    async fn images(&self) -> Result<Vec<String>, CloudError> {
        let mut out = std::collections::BTreeSet::new();
        let mut rd = match tokio::fs::read_dir(self.images_dir()).await {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(backend(e)),
        };
        while let Some(e) = rd.next_entry().await.map_err(backend)? {
            if let Some(id) = localimage::id_of(&e.file_name().to_string_lossy()) {
                out.insert(id.to_string());
            }
        }
        Ok(out.into_iter().collect())
    }

    async fn refresh_db(
        &self,
        machine: &MachineId,
        images: &[ImageSource],
        dump: Option<&crate::cloud::DumpSource>,
    ) -> Result<DbMade, CloudError> {
        let dir = self.dir(machine)?;
        // one change to the database at a time: a sleep or erase waits for this
        let Some(_held) = db_lock(&dir).await else { return Err(CloudError::NotFound(machine.clone())) };
        let Some(old) = crate::localdb::read(&dir).await.filter(|d| d.port != 0) else {
            return Err(CloudError::Failed("this preview has no database running".into()));
        };
        if !group_alive(&dir, "db.pid").await {
            return Err(CloudError::Failed("this preview's database is not running".into()));
        }
        let raw = tokio::fs::read(dir.join("machine.json")).await.map_err(|_| CloudError::NotFound(machine.clone()))?;
        let mf: MachineFile = serde_json::from_slice(&raw).map_err(backend)?;
        let Some(db) = &mf.manifest.database else {
            return Err(CloudError::Failed("this preview has no database".into()));
        };
        // the port and passwords stay the preview's: the app's settings name them
        self.make_db(&dir, db, images, dump, Some(&old), Restore::Import, &Quiet).await
    }

    async fn db_diverged(&self, machine: &MachineId) -> Result<Option<u64>, CloudError> {
        let dir = self.dir(machine)?;
        let Ok(image) = tokio::fs::read_to_string(dir.join(CLONED)).await else { return Ok(None) };
        let image = PathBuf::from(image);
        let Some(hold) = localimage::hold(&image) else { return Ok(None) };
        let n = tokio::task::spawn_blocking(move || {
            let n = localimage::diverged(&image.join("db/data"), &dir.join("db/data"));
            drop(hold);
            n
        })
        .await
        .map_err(backend)?;
        match n {
            Ok(n) => Ok(Some(n)),
            // erased meanwhile
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(backend(e)),
        }
    }

    async fn pull_db(
        &self,
        machine: &MachineId,
        bucket: &wakegate_db::s3::Bucket,
        key: &str,
    ) -> Result<u64, CloudError> {
        let dir = self.dir(machine)?;
        let Some(db) = crate::localdb::read(&dir).await.filter(|d| d.port != 0) else {
            return Err(CloudError::Failed("this preview has no database".into()));
        };
        crate::localdb::pull(&dir, &db, bucket, key).await
    }

    /// An app is dead when the process group its pid file names has no process left
    /// (one signal-0 per machine, no process spawned).
    async fn dead(&self, machines: &[MachineId]) -> Result<Vec<(MachineId, String)>, CloudError> {
        let mut out = Vec::new();
        for m in machines {
            let Ok(dir) = self.dir(m) else { continue };
            let pgid =
                tokio::fs::read_to_string(dir.join("app.pid")).await.ok().and_then(|t| t.trim().parse::<i32>().ok());
            let alive = match pgid {
                Some(pgid) if pgid > 1 => nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), None).is_ok(),
                _ => false,
            };
            if !alive {
                let tail = log_tail(&dir, "app.log").await;
                out.push((m.clone(), format!("the app exited while running; the end of its log:\n{tail}")));
            }
        }
        Ok(out)
    }
}

/// Ships the machines' build and app logs under `root` into the store every `every`
/// until `stop` (what the Hetzner agent does on its machine), so `wakegate logs` works
/// from any waker. Where each file was shipped to is remembered here and, after a
/// restart, read back from the store.
pub async fn ship_logs(
    root: PathBuf,
    store: wakegate_store::SharedStore,
    every: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use wakegate_store::logs::{self, Stream};
    let mut shipped: std::collections::HashMap<(String, Stream), u64> = std::collections::HashMap::new();
    loop {
        let mut seen = std::collections::HashSet::new();
        if let Ok(mut rd) = tokio::fs::read_dir(&root).await {
            while let Ok(Some(entry)) = rd.next_entry().await {
                let machine = entry.file_name().to_string_lossy().into_owned();
                if !machine.starts_with("m-") {
                    continue;
                }
                let Ok(preview) = tokio::fs::read_to_string(entry.path().join("owner")).await else { continue };
                // only the machine the preview shows: not one serving on during a
                // redeploy, nor one on its way out
                match store.get_preview(&preview).await {
                    Ok(Some(p)) if logs::current_machine(&p.value.state) == Some(machine.as_str()) => {}
                    _ => continue,
                }
                for stream in Stream::ALL {
                    let key = (machine.clone(), stream);
                    seen.insert(key.clone());
                    let Ok(mut file) = tokio::fs::File::open(entry.path().join(stream.file())).await else { continue };
                    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
                    let at = match shipped.get(&key) {
                        Some(at) => *at,
                        None => match logs::shipped(store.as_ref(), &preview, stream, &machine).await {
                            Ok(at) => at,
                            Err(_) => continue,
                        },
                    };
                    // the files only grow; one shorter than shipped is not ours to resend
                    if len <= at {
                        shipped.insert(key, at);
                        continue;
                    }
                    use tokio::io::AsyncSeekExt;
                    let mut buf = vec![0; (len - at).min(logs::MAX_CHUNK as u64) as usize];
                    if file.seek(std::io::SeekFrom::Start(at)).await.is_err()
                        || file.read_exact(&mut buf).await.is_err()
                    {
                        continue;
                    }
                    match logs::append(store.as_ref(), &preview, stream, &machine, at, &buf).await {
                        Ok(now) => {
                            shipped.insert(key, now);
                        }
                        Err(e) => tracing::debug!(%machine, error = %e, "shipping a log failed; trying again"),
                    }
                }
            }
        }
        // machines that are gone
        shipped.retain(|k, _| seen.contains(k));
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => {}
        }
        if *stop.borrow() {
            return;
        }
    }
}
