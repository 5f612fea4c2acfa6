//! A private S3-compatible server for one test: `s3s-fs` (it checks SigV4 and makes
//! AWS-style multipart ETags) on a free 127.0.0.1 port over a temporary directory.
//! `scripts/test` installs it into `~/.cache/wakegate/tools`; `WAKEGATE_S3S_FS` names
//! another binary.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const ACCESS_KEY: &str = "wakegate-test-access";
pub const SECRET_KEY: &str = "wakegate-test-secret-key-0123456789";
pub const VERSION: &str = "0.14.1";

pub struct S3Server {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

/// Where `s3s-fs` is.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("WAKEGATE_S3S_FS") {
        return PathBuf::from(p);
    }
    let cached = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default()
        .join(format!(".cache/wakegate/tools/s3s-fs-{VERSION}/bin/s3s-fs"));
    if cached.is_file() {
        cached
    } else {
        PathBuf::from("s3s-fs")
    }
}

impl S3Server {
    pub async fn start() -> anyhow::Result<S3Server> {
        let dir = crate::tempdir("s3");
        for _ in 0..5 {
            let port = crate::free_port();
            let child = Command::new(binary())
                .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY])
                .args(["--secret-key", SECRET_KEY])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start s3s-fs (scripts/test installs it): {e}"))?;
            let mut s = S3Server { child, port, dir: dir.clone() };
            for _ in 0..250 {
                if let Ok(Some(_)) = s.child.try_wait() {
                    break;
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return Ok(s);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = s.child.kill();
        }
        anyhow::bail!("s3s-fs did not come up")
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The `WAKEGATE_S3_*` settings that reach `bucket` here.
    pub fn settings(&self, bucket: &str) -> Vec<(String, String)> {
        [
            ("WAKEGATE_S3_ENDPOINT", self.endpoint()),
            ("WAKEGATE_S3_BUCKET", bucket.to_string()),
            ("WAKEGATE_S3_REGION", "us-east-1".into()),
            ("WAKEGATE_S3_PATH_STYLE", "true".into()),
            ("WAKEGATE_S3_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("WAKEGATE_S3_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
