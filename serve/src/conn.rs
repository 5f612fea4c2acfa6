//! Connection admission, I/O-counting streams and accept backoff.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::warn;

/// Answer to a connection over the caps, written without waiting, before it is closed.
pub const OVER_CAPACITY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n";

/// Open connections, all threads together, and per IP.
pub struct Connections {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max_total: usize,
    max_per_ip: usize,
}

/// One admitted connection; gives its place back when dropped.
pub struct Admitted {
    conns: Arc<Connections>,
    ip: IpAddr,
}

impl Connections {
    /// Caps below 1 are taken as 1.
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Connections> {
        Arc::new(Connections {
            total: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            max_total: max_total.max(1),
            max_per_ip: max_per_ip.max(1),
        })
    }

    /// A place for a connection from `ip`, or `None` when a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let refused = |cap: &'static str| {
            metrics::counter!(wakegate_core::metrics::RATE_LIMITED, "where" => cap).increment(1);
            None
        };
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return refused("connections");
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = per_ip.entry(ip).or_insert(0);
        if *n >= self.max_per_ip {
            drop(per_ip);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return refused("connections_per_ip");
        }
        *n += 1;
        Some(Admitted { conns: self.clone(), ip })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.conns.total.fetch_sub(1, Ordering::AcqRel);
        let mut per_ip = self.conns.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

/// Waits after failed accepts (out of descriptors or memory) instead of spinning, from
/// 5 ms doubling to 1 s, and logs the first failure and every 100th.
pub struct AcceptBackoff {
    delay: Duration,
    failures: u64,
}

impl Default for AcceptBackoff {
    fn default() -> AcceptBackoff {
        AcceptBackoff { delay: Duration::from_millis(5), failures: 0 }
    }
}

impl AcceptBackoff {
    pub fn reset(&mut self) {
        self.delay = Duration::from_millis(5);
    }

    pub async fn failed(&mut self, e: &std::io::Error) {
        self.failures += 1;
        if self.failures == 1 || self.failures.is_multiple_of(100) {
            warn!(error = %e, failures = self.failures, backoff_ms = self.delay.as_millis() as u64, "accept failed; backing off");
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(1));
    }
}

/// A TCP stream that counts its reads and writes, so an idle connection can be found
/// without a clock read per I/O.
pub struct Watched {
    inner: TcpStream,
    // Arc (not Rc) because an upgraded connection's IO must be `Send`; only this stream
    // writes it, so a relaxed load and store (no locked instruction) is enough
    ticks: Arc<AtomicU64>,
}

impl Watched {
    pub fn new(inner: TcpStream, ticks: Arc<AtomicU64>) -> Watched {
        Watched { inner, ticks }
    }

    fn tick(&self) {
        self.ticks.store(self.ticks.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }
}

impl AsyncRead for Watched {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if r.is_ready() {
            this.tick();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if r.is_ready() {
            this.tick();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if r.is_ready() {
            this.tick();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
