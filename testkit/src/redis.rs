//! A private redis-server for one test.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct RedisServer {
    child: Child,
    pub port: u16,
    pub dir: PathBuf,
    persistent: bool,
}

fn spawn(port: u16, dir: &std::path::Path, persistent: bool) -> anyhow::Result<Child> {
    let aof =
        if persistent { ["--appendonly", "yes", "--appendfsync", "always"] } else { ["--appendonly", "no", "", ""] };
    Command::new("redis-server")
        .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", ""])
        .args(aof.iter().filter(|a| !a.is_empty()))
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start redis-server (apt-get install redis-server): {e}"))
}

impl RedisServer {
    /// Starts `redis-server` on a free 127.0.0.1 port with persistence off.
    pub async fn start() -> anyhow::Result<RedisServer> {
        Self::start_with(false).await
    }

    /// Starts one that writes every change to its append-only file before answering,
    /// so a [`restart`](Self::restart) loses nothing.
    pub async fn start_persistent() -> anyhow::Result<RedisServer> {
        Self::start_with(true).await
    }

    async fn start_with(persistent: bool) -> anyhow::Result<RedisServer> {
        let dir = crate::tempdir("redis");
        for _ in 0..5 {
            let port = crate::free_port();
            let child = spawn(port, &dir, persistent)?;
            let mut server = RedisServer { child, port, dir: dir.clone(), persistent };
            if server.wait_up().await {
                return Ok(server);
            }
        }
        anyhow::bail!("redis-server did not come up")
    }

    async fn wait_up(&mut self) -> bool {
        for _ in 0..250 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false; // port taken
            }
            if ping(self.port).await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Kills the server (SIGKILL: every client's connection breaks at once), waits
    /// `down`, and starts it again on the same port and directory.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        tokio::time::sleep(down).await;
        for _ in 0..50 {
            self.child = spawn(self.port, &self.dir, self.persistent)?;
            if self.wait_up().await {
                return Ok(());
            }
            // the port may linger a moment
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        anyhow::bail!("redis-server did not come back on port {}", self.port)
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
