//! A private redis-server for one test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

impl RedisServer {
    /// Starts `redis-server` on a free 127.0.0.1 port with persistence off.
    pub async fn start() -> anyhow::Result<RedisServer> {
        let dir = crate::tempdir("redis");
        for _ in 0..5 {
            let port = crate::free_port();
            let child = Command::new("redis-server")
                .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| anyhow::anyhow!("cannot start redis-server (apt-get install redis-server): {e}"))?;
            let mut server = RedisServer { child, port, dir: dir.clone() };
            for _ in 0..100 {
                if let Ok(Some(_)) = server.child.try_wait() {
                    break; // port taken: try another
                }
                if ping(port).await {
                    return Ok(server);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        anyhow::bail!("redis-server did not come up")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

async fn ping(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(s.read(&mut buf).await, Ok(n) if n > 0 && buf.starts_with(b"+PONG"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
