//! A preview's own database server on the local backend: a PostgreSQL or MariaDB data
//! directory inside the machine's directory (`db/`), a server on a reserved loopback
//! port in its own process group (`db.pid`), a superuser only Wakegate knows and an app
//! user with its own password, both in `db.json`.
//!
//! Everything lives and dies with the machine: sleep stops the server and keeps the
//! data, wake starts it again, erase deletes the directory. An import streams the dump
//! from its presigned URL through gunzip into the engine's client (`import.pid`), with
//! the bytes reported as progress; a deploy retried after a crash starts from a fresh
//! data directory, so a half-imported database is never served.

use crate::cloud::{CloudError, DumpSource, Progress};
use crate::manifest::{Database, DbEnv};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use wakegate_db::Engine;

/// `db.json`: what the server and the app need to find each other.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DbFile {
    pub engine: Engine,
    pub name: String,
    pub env: DbEnv,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub admin_password: String,
}

pub const FILE: &str = "db.json";
const USER: &str = "app";
const ADMIN: &str = "wakegate";

pub(crate) fn failed(e: impl std::fmt::Display) -> CloudError {
    CloudError::Failed(e.to_string())
}

fn random_password() -> Result<String, CloudError> {
    let mut b = [0u8; 18];
    getrandom::fill(&mut b).map_err(|e| CloudError::Backend(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Finds an engine's program: on the PATH, or in the newest PostgreSQL's `bin`.
pub(crate) fn program(name: &str) -> Result<PathBuf, CloudError> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Ok(rd) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = rd.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        dirs.extend(versions.into_iter().rev());
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| failed(format!("`{name}` is not installed on this machine (the preview's database needs it)")))
}

/// PostgreSQL refuses to run as root: its server and tools run as the `postgres`
/// account then, which owns the data directory.
fn pg_account() -> Result<Option<nix::unistd::User>, CloudError> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name("postgres") {
        Ok(Some(u)) => Ok(Some(u)),
        _ => Err(failed("running as root, PostgreSQL needs a `postgres` account to run as; none exists")),
    }
}

fn command(engine: Engine, program_name: &str) -> Result<tokio::process::Command, CloudError> {
    let mut cmd = tokio::process::Command::new(program(program_name)?);
    if engine == Engine::Postgres {
        if let Some(u) = pg_account()? {
            cmd.uid(u.uid.as_raw()).gid(u.gid.as_raw());
        }
    }
    cmd.stdin(Stdio::null()).kill_on_drop(true).env("LC_ALL", "C");
    Ok(cmd)
}

async fn run(mut cmd: tokio::process::Command, what: &str) -> Result<String, CloudError> {
    let out =
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().await.map_err(|e| failed(format!("{what}: {e}")))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(failed(format!("{what} failed ({}): {}", out.status, err.trim())));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn data(dir: &Path) -> PathBuf {
    dir.join("db")
}

/// MariaDB's socket: beside its data, or where that path is too long for a socket
/// (108 bytes on Linux), in a private directory under the system's temporary one,
/// named by a digest of the data's path.
fn socket(dir: &Path) -> PathBuf {
    let beside = data(dir).join("mysqld.sock");
    if beside.as_os_str().len() <= 100 {
        return beside;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes());
    std::env::temp_dir().join("wakegate-sockets").join(format!("{}.sock", hex::encode(&digest[..12])))
}

/// Makes the directory of `dir`'s socket, when it is not beside the data (only this
/// account may enter it).
fn socket_dir(dir: &Path) -> Result<(), CloudError> {
    use std::os::unix::fs::DirBuilderExt;
    let sock = socket(dir);
    let Some(parent) = sock.parent().filter(|p| !p.starts_with(dir)) else { return Ok(()) };
    match std::fs::DirBuilder::new().mode(0o700).create(parent) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(failed(format!("{}: {e}", parent.display())))
        }
        _ => {}
    }
    // made by someone else first, it could hand the server's socket to them
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(parent).map_err(failed)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(failed(format!(
            "{} is not a private directory of this account: remove it, or use a shorter data directory",
            parent.display()
        )));
    }
    Ok(())
}

/// The account Wakegate runs as: MariaDB's superuser over the socket.
fn os_user() -> Result<String, CloudError> {
    match nix::unistd::User::from_uid(nix::unistd::geteuid()) {
        Ok(Some(u)) => Ok(u.name),
        _ => Err(failed("the account Wakegate runs as has no name (MariaDB's superuser is named after it)")),
    }
}

pub(crate) fn chown_to_pg(path: &Path) -> Result<(), CloudError> {
    if let Some(u) = pg_account()? {
        std::os::unix::fs::chown(path, Some(u.uid.as_raw()), Some(u.gid.as_raw())).map_err(failed)?;
    }
    Ok(())
}

/// The MariaDB server's own temporary directory, beside its data.
async fn private_tmp(dir: &Path) -> Result<PathBuf, CloudError> {
    let tmp = data(dir).join("tmp");
    tokio::fs::create_dir_all(&tmp).await.map_err(failed)?;
    Ok(tmp)
}

/// Removes a file or directory; one that is not there is fine.
async fn remove(path: &Path) -> std::io::Result<()> {
    let r = if path.is_dir() { tokio::fs::remove_dir_all(path).await } else { tokio::fs::remove_file(path).await };
    match r {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// [`remove`], logging a failure (what is left is harmless, and reported).
pub(crate) async fn remove_logged(path: &Path) {
    if let Err(e) = remove(path).await {
        tracing::warn!(path = %path.display(), error = %e, "removing a file failed");
    }
}

/// A fresh, empty data directory for `db` (whatever an earlier attempt left goes).
/// With `keep`, the new database gets its port and passwords (a running preview's
/// refresh: the app's settings name them).
pub async fn init(dir: &Path, db: &Database, keep: Option<&DbFile>) -> Result<DbFile, CloudError> {
    crate::local::stop_group(dir, "import.pid").await;
    crate::local::stop_group(dir, "db.pid").await;
    let d = data(dir);
    remove(&d).await.map_err(|e| failed(format!("removing an earlier attempt's database: {e}")))?;
    tokio::fs::create_dir_all(&d).await.map_err(failed)?;
    let file = DbFile {
        engine: db.engine,
        name: db.name.clone(),
        env: db.env,
        port: 0,
        user: USER.into(),
        password: random_password()?,
        admin_password: random_password()?,
    };
    let file = match keep {
        Some(k) => {
            DbFile { port: k.port, password: k.password.clone(), admin_password: k.admin_password.clone(), ..file }
        }
        None => file,
    };
    match db.engine {
        Engine::Postgres => {
            chown_to_pg(&d)?;
            let pwfile = dir.join("db.pw");
            tokio::fs::write(&pwfile, &file.admin_password).await.map_err(failed)?;
            chown_to_pg(&pwfile)?;
            let mut cmd = command(Engine::Postgres, "initdb")?;
            cmd.arg("-D").arg(d.join("data")).args([
                "-U",
                ADMIN,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ]);
            cmd.arg(format!("--pwfile={}", pwfile.display()));
            let r = run(cmd, "initdb").await;
            // the superuser's password is in db.json only
            remove_logged(&pwfile).await;
            r?;
        }
        Engine::Mariadb => {
            if socket(dir).as_os_str().len() > 100 {
                return Err(failed(format!(
                    "the temporary directory is too deep for a socket path: {}",
                    socket(dir).display()
                )));
            }
            socket_dir(dir)?;
            let mut cmd = command(Engine::Mariadb, "mariadb-install-db")?;
            // a temporary directory of its own: two bootstraps sharing /tmp can take
            // each other's temporary tables
            let tmp = private_tmp(dir).await?;
            cmd.env("TMPDIR", &tmp)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", d.join("data").display()))
                // the superuser answers only on the server's socket, to this account:
                // no password another preview's app could try over TCP
                .args(["--auth-root-authentication-method=socket", "--skip-test-db"])
                .arg(format!("--auth-root-socket-user={}", os_user()?));
            if nix::unistd::geteuid().is_root() {
                cmd.arg("--user=root");
            }
            run(cmd, "mariadb-install-db").await?;
        }
    }
    Ok(file)
}

pub async fn read(dir: &Path) -> Option<DbFile> {
    let raw = tokio::fs::read(dir.join(FILE)).await.ok()?;
    serde_json::from_slice(&raw).ok()
}

pub async fn write(dir: &Path, f: &DbFile) -> Result<(), CloudError> {
    write_private(&dir.join(FILE), &serde_json::to_vec_pretty(f).map_err(failed)?).await
}

/// Writes a file only this account may read (it holds passwords), whole or not at all.
pub(crate) async fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CloudError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (path, bytes) = (path.to_path_buf(), bytes.to_vec());
    tokio::task::spawn_blocking(move || {
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&bytes)?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(failed)?
    .map_err(failed)
}

/// Starts the server on `f.port` (the caller reserved it) and waits until it answers.
pub async fn start(dir: &Path, f: &DbFile) -> Result<(), CloudError> {
    crate::local::stop_group(dir, "db.pid").await;
    let d = data(dir).join("data");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("db.log")).map_err(failed)?;
    let mut cmd = match f.engine {
        Engine::Postgres => {
            let mut cmd = command(Engine::Postgres, "postgres")?;
            cmd.arg("-D").arg(&d).args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                &format!("port={}", f.port),
                "-c",
                "unix_socket_directories=",
                "-c",
                "shared_buffers=16MB",
                "-c",
                "max_connections=30",
            ]);
            cmd
        }
        Engine::Mariadb => {
            socket_dir(dir)?;
            let mut cmd = command(Engine::Mariadb, "mariadbd")?;
            cmd.arg("--no-defaults")
                .arg(format!("--datadir={}", d.display()))
                .arg(format!("--tmpdir={}", private_tmp(dir).await?.display()))
                .arg(format!("--socket={}", socket(dir).display()))
                .arg(format!("--port={}", f.port))
                .arg(format!("--pid-file={}", data(dir).join("mysqld.pid").display()))
                .args([
                    "--bind-address=127.0.0.1",
                    "--skip-name-resolve",
                    "--innodb-buffer-pool-size=16M",
                    "--performance-schema=OFF",
                    "--skip-log-bin",
                ]);
            if nix::unistd::geteuid().is_root() {
                cmd.arg("--user=root");
            }
            cmd
        }
    };
    cmd.stdout(log.try_clone().map_err(failed)?).stderr(log).process_group(0).kill_on_drop(false);
    let mut child = cmd.spawn().map_err(|e| failed(format!("starting the database server: {e}")))?;
    let pid = child.id().ok_or_else(|| failed("the database server has no pid"))?;
    tokio::fs::write(dir.join("db.pid"), pid.to_string()).await.map_err(failed)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(failed(format!(
                "the database server exited ({status}):\n{}",
                crate::local::log_tail(dir, "db.log").await
            )));
        }
        if accepting(dir, f, pid).await {
            tokio::spawn(async move {
                let _ = child.wait().await;
            });
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            crate::local::stop_group(dir, "db.pid").await;
            return Err(failed(format!(
                "the database server did not answer within 60 s:\n{}",
                crate::local::log_tail(dir, "db.log").await
            )));
        }
        // a file read or a connect a round: cheap enough to ask often
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Whether the server `pid` accepts connections: PostgreSQL says so in its pid file (the
/// postmaster's status line turns `ready`; a file a killed server left names another
/// process), MariaDB once its socket takes a connection and a query is answered on it.
async fn accepting(dir: &Path, f: &DbFile, pid: u32) -> bool {
    match f.engine {
        Engine::Postgres => tokio::fs::read_to_string(data(dir).join("data/postmaster.pid")).await.is_ok_and(|file| {
            let lines: Vec<&str> = file.lines().collect();
            lines.first().is_some_and(|p| p.trim() == pid.to_string())
                && lines.get(7).is_some_and(|status| status.trim() == "ready")
        }),
        Engine::Mariadb => {
            tokio::net::UnixStream::connect(socket(dir)).await.is_ok() && admin(dir, f, "SELECT 1").await.is_ok()
        }
    }
}

/// Runs SQL as the superuser.
async fn admin(dir: &Path, f: &DbFile, sql: &str) -> Result<String, CloudError> {
    let mut cmd = match f.engine {
        Engine::Postgres => {
            let mut cmd = command(Engine::Postgres, "psql")?;
            cmd.args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                ADMIN,
                "-d",
                "postgres",
            ])
            .arg("-p")
            .arg(f.port.to_string())
            .arg("-c")
            .arg(sql)
            .env("PGPASSWORD", &f.admin_password)
            .env("PGCONNECT_TIMEOUT", "2");
            cmd
        }
        Engine::Mariadb => {
            let mut cmd = command(Engine::Mariadb, "mariadb")?;
            cmd.arg("--no-defaults")
                .arg(format!("--socket={}", socket(dir).display()))
                .arg("-u")
                .arg(os_user()?)
                .args(["--batch", "--skip-column-names", "--connect-timeout=2", "-e"])
                .arg(sql);
            cmd
        }
    };
    cmd.current_dir(dir);
    run(cmd, "the database").await
}

/// New passwords for the app's user and the superuser.
pub fn fresh_passwords(f: &mut DbFile) -> Result<(), CloudError> {
    (f.password, f.admin_password) = (random_password()?, random_password()?);
    Ok(())
}

/// Changes the passwords of the server `f` reaches (a clone of an image, which has the
/// image's) to `to`'s.
pub async fn set_passwords(dir: &Path, f: &DbFile, to: &DbFile) -> Result<(), CloudError> {
    let (user, pw) = (&f.user, &to.password);
    match f.engine {
        Engine::Postgres => {
            let sql = format!(
                "ALTER ROLE \"{user}\" PASSWORD '{pw}'; ALTER ROLE \"{ADMIN}\" PASSWORD '{}'",
                to.admin_password
            );
            admin(dir, f, &sql).await?;
        }
        Engine::Mariadb => {
            admin(dir, f, &format!("ALTER USER '{user}'@'%' IDENTIFIED BY '{pw}'; FLUSH PRIVILEGES;")).await?;
        }
    }
    Ok(())
}

/// Makes the app's user and database.
pub async fn create(dir: &Path, f: &DbFile) -> Result<(), CloudError> {
    let (user, pw, name) = (&f.user, &f.password, &f.name);
    match f.engine {
        Engine::Postgres => {
            admin(dir, f, &format!("CREATE ROLE \"{user}\" LOGIN PASSWORD '{pw}'")).await?;
            admin(dir, f, &format!("CREATE DATABASE \"{name}\" OWNER \"{user}\"")).await?;
        }
        Engine::Mariadb => {
            admin(
                dir,
                f,
                &format!(
                    "CREATE DATABASE `{name}`; CREATE USER '{user}'@'%' IDENTIFIED BY '{pw}'; \
                     GRANT ALL ON `{name}`.* TO '{user}'@'%'; FLUSH PRIVILEGES;"
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// The engine's client, connected as the app's user to its database, reading SQL from
/// stdin (`-`) or a file.
fn client(f: &DbFile, file: Option<&Path>) -> Result<tokio::process::Command, CloudError> {
    let mut cmd = match f.engine {
        Engine::Postgres => {
            let mut cmd = command(Engine::Postgres, "psql")?;
            cmd.args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "--single-transaction", "-h", "127.0.0.1", "-U"])
                .arg(&f.user)
                .arg("-d")
                .arg(&f.name)
                .arg("-p")
                .arg(f.port.to_string())
                .env("PGPASSWORD", &f.password)
                .stdout(Stdio::null());
            if let Some(file) = file {
                cmd.arg("-f").arg(file);
            }
            cmd
        }
        Engine::Mariadb => {
            let mut cmd = command(Engine::Mariadb, "mariadb")?;
            cmd.args(["--no-defaults", "-h", "127.0.0.1", "--batch"])
                .arg(format!("--port={}", f.port))
                .arg("-u")
                .arg(&f.user)
                .arg(&f.name)
                .env("MYSQL_PWD", &f.password)
                .stdout(Stdio::null());
            if let Some(file) = file {
                cmd.arg("-e").arg(format!("source {}", file.display()));
            }
            cmd
        }
    };
    cmd.process_group(0);
    Ok(cmd)
}

/// The error of a dump for another engine than the database's.
pub fn wrong_engine(engine: Engine, dump: &DumpSource) -> CloudError {
    failed(format!(
        "wakegate.toml says the database is {}, and the dump {} is a {} dump",
        engine.label(),
        dump.id,
        dump.engine.label()
    ))
}

/// Streams the dump from its URL into the database, reporting compressed bytes read.
pub async fn import(dir: &Path, f: &DbFile, dump: &DumpSource, progress: &dyn Progress) -> Result<(), CloudError> {
    if dump.engine != f.engine {
        return Err(wrong_engine(f.engine, dump));
    }
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(failed)?;
    let resp = http.get(&dump.url).send().await.map_err(|e| failed(format!("downloading the dump: {e}")))?;
    if !resp.status().is_success() {
        return Err(failed(format!("downloading the dump: S3 answered {}", resp.status())));
    }
    let total = resp.content_length().unwrap_or(dump.size);
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("import.log")).map_err(failed)?;
    let mut cmd = client(f, None)?;
    cmd.stdin(Stdio::piped()).stderr(log).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| failed(format!("starting the import: {e}")))?;
    if let Some(pid) = child.id() {
        tokio::fs::write(dir.join("import.pid"), pid.to_string()).await.map_err(failed)?;
    }
    let mut stdin = child.stdin.take().ok_or_else(|| failed("the import has no stdin"))?;
    let done = std::sync::atomic::AtomicU64::new(0);
    let stream = resp
        .bytes_stream()
        .inspect_ok(|chunk| {
            done.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
        })
        .map_err(std::io::Error::other);
    let reader = tokio_util::io::StreamReader::new(stream);
    let gzip = dump.gzip;
    let copy = async {
        let r = if gzip {
            let mut gz = async_compression::tokio::bufread::GzipDecoder::new(reader);
            gz.multiple_members(true);
            tokio::io::copy(&mut gz, &mut stdin).await
        } else {
            let mut reader = reader;
            tokio::io::copy(&mut reader, &mut stdin).await
        };
        (r, stdin)
    };
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let (copied, mut stdin) = loop {
        tokio::select! {
            r = &mut copy => break r,
            _ = tick.tick() => progress.detail(done.load(std::sync::atomic::Ordering::Relaxed), total).await,
        }
    };
    if copied.is_err() {
        // a download cut short must not reach the end of input, which commits it
        if let Err(e) = child.kill().await {
            tracing::warn!(error = %e, "stopping the import client after a cut download failed");
        }
    } else if let Err(e) = stdin.shutdown().await {
        // end of input: the client finishes (and commits); its exit status says how
        tracing::warn!(error = %e, "closing the import client's input failed");
    }
    drop(stdin);
    let status = child.wait().await.map_err(failed)?;
    remove_logged(&dir.join("import.pid")).await;
    progress.detail(done.load(std::sync::atomic::Ordering::Relaxed), total).await;
    match copied {
        // the client stopped first: its own error says more than the broken pipe
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(failed(format!("reading the dump: {e}")));
        }
        _ if !status.success() => {
            let tail = crate::local::log_tail(dir, "import.log").await;
            return Err(failed(format!("importing the dump failed ({status}):\n{tail}")));
        }
        Err(e) => return Err(failed(format!("reading the dump: {e}"))),
        Ok(_) => {}
    }
    Ok(())
}

/// Runs the sanitize file from the checkout.
pub async fn sanitize(dir: &Path, f: &DbFile, file: &Path) -> Result<(), CloudError> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("import.log")).map_err(failed)?;
    let mut cmd = client(f, Some(file))?;
    cmd.stderr(log).kill_on_drop(true);
    let status = cmd.status().await.map_err(failed)?;
    if !status.success() {
        let tail = crate::local::log_tail(dir, "import.log").await;
        return Err(failed(format!("the sanitize script failed ({status}):\n{tail}")));
    }
    Ok(())
}

/// What the app is told.
pub fn app_env(f: &DbFile) -> Vec<(String, String)> {
    match f.env {
        DbEnv::Url => {
            let scheme = if f.engine == Engine::Postgres { "postgres" } else { "mysql" };
            vec![(
                "DATABASE_URL".into(),
                format!("{scheme}://{}:{}@127.0.0.1:{}/{}", f.user, f.password, f.port, f.name),
            )]
        }
        DbEnv::Vars => vec![
            ("DB_HOST".into(), "127.0.0.1".into()),
            ("DB_PORT".into(), f.port.to_string()),
            ("DB_NAME".into(), f.name.clone()),
            ("DB_USER".into(), f.user.clone()),
            ("DB_PASSWORD".into(), f.password.clone()),
        ],
    }
}

/// Dumps the database through gzip into S3 at `key` (`wakegate db pull`), one part in
/// memory at a time; the bytes written. A dump that fails leaves no object.
pub async fn pull(dir: &Path, f: &DbFile, bucket: &wakegate_db::s3::Bucket, key: &str) -> Result<u64, CloudError> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("pull.log")).map_err(failed)?;
    let mut cmd = dump_command(f)?;
    cmd.stderr(log);
    let mut child = cmd.spawn().map_err(|e| failed(format!("starting the dump: {e}")))?;
    let out = child.stdout.take().ok_or_else(|| failed("the dump has no stdout"))?;
    let gz = async_compression::tokio::bufread::GzipEncoder::new(tokio::io::BufReader::new(out));
    let uploaded = bucket.upload_reader(key, gz, 8 << 20).await;
    let status = child.wait().await.map_err(failed)?;
    if !status.success() || uploaded.is_err() {
        if let Err(e) = bucket.delete(key).await {
            tracing::warn!(%key, error = %e, "removing a failed pull's object failed");
        }
    }
    if !status.success() {
        let tail = crate::local::log_tail(dir, "pull.log").await;
        return Err(failed(format!("dumping the database failed ({status}):\n{tail}")));
    }
    uploaded.map_err(failed)
}

/// The engine's dump program, as the app's user, writing SQL to stdout.
pub fn dump_command(f: &DbFile) -> Result<tokio::process::Command, CloudError> {
    let mut cmd = match f.engine {
        Engine::Postgres => {
            let mut cmd = command(Engine::Postgres, "pg_dump")?;
            cmd.args(["--no-owner", "--no-privileges", "-h", "127.0.0.1", "-U"])
                .arg(&f.user)
                .arg("-p")
                .arg(f.port.to_string())
                .arg(&f.name)
                .env("PGPASSWORD", &f.password);
            cmd
        }
        Engine::Mariadb => {
            let mut cmd = command(Engine::Mariadb, "mariadb-dump")?;
            cmd.args(["--no-defaults", "-h", "127.0.0.1", "--single-transaction", "--routines", "--triggers"])
                .arg(format!("--port={}", f.port))
                .arg("-u")
                .arg(&f.user)
                .arg(&f.name)
                .env("MYSQL_PWD", &f.password);
            cmd
        }
    };
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    Ok(cmd)
}
