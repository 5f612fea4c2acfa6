//! Serving HTTP/1.1 the way every Wakegate listener must: nothing a client does can
//! exhaust the process.
//!
//! * [`Connections`] admits a connection only under a total cap and a per-IP cap (over
//!   either, the client gets a `503` and the socket is closed);
//! * [`Watched`] counts a stream's I/O so an idle connection is found without a clock
//!   read per read or write; [`serve_connection`] closes it gracefully after the idle
//!   timeout (a response in progress is finished first);
//! * [`AcceptBackoff`] keeps an accept loop from spinning when descriptors run out;
//! * [`serve`] puts these together for an axum [`Router`] (the waker, the agent
//!   endpoint); the edge uses the parts with its own per-thread runtimes;
//! * a [`CancellationToken`] shuts a listener down gracefully ([`serve_until`]): it
//!   stops accepting, every open connection finishes the response it is sending and
//!   closes, and what is still open after the grace period is dropped;
//! * [`supervise`] restarts a background task that panics (every background loop of
//!   waker and provisioner runs under it).
#![forbid(unsafe_code)]

mod conn;
pub mod supervise;

pub use conn::{AcceptBackoff, Admitted, Connections, Watched, OVER_CAPACITY};

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use tokio_util::sync::CancellationToken;
pub use tokio_util::task::TaskTracker;

/// Limits of one listener. The defaults suit a control-plane API.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection with no I/O for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections in all.
    pub max_connections: usize,
    /// Open connections from one IP address.
    pub max_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            // above the longest status long-poll (30 s)
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_per_ip: 512,
        }
    }
}

/// Serves `router` on `listener` until the task is dropped. Handlers can extract
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(listener: TcpListener, router: Router, limits: Limits) {
    serve_until(listener, router, limits, CancellationToken::new(), Duration::ZERO).await
}

/// [`serve`] until `shutdown` is cancelled, then gracefully: no new connections, the
/// open ones finish their responses and close; it returns once they have, or after
/// `grace` (what is still open then ends with the process).
pub async fn serve_until(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
    grace: Duration,
) {
    let conns = Connections::new(limits.max_connections, limits.max_per_ip);
    let tracker = TaskTracker::new();
    accept(listener, &conns, &shutdown, |stream, peer, admitted| {
        let router = router.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let ticks = Arc::new(AtomicU64::new(0));
            let io = TokioIo::new(Watched::new(stream, ticks.clone()));
            let svc = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                router.clone().oneshot(req)
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
            let served = builder.serve_connection(io, svc);
            serve_connection(served, ticks, limits.idle_timeout, &shutdown).await;
            drop(admitted);
        });
    })
    .await;
    tracker.close();
    let open = tracker.len();
    if open > 0 {
        tracing::info!(open, grace_secs = grace.as_secs_f64(), "stopped accepting; letting open connections finish");
    }
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(open = tracker.len(), "connections still open after the grace period are dropped");
    }
}

/// Accepts connections until `shutdown` is cancelled: each one under the caps is handed
/// to `on_conn` (with `TCP_NODELAY` set); one over them gets a 503 and is closed;
/// failed accepts back off.
pub async fn accept(
    listener: TcpListener,
    conns: &Arc<Connections>,
    shutdown: &CancellationToken,
    mut on_conn: impl FnMut(tokio::net::TcpStream, std::net::SocketAddr, Admitted),
) {
    let mut backoff = AcceptBackoff::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let Some(admitted) = conns.admit(peer.ip()) else {
                    // best effort: the socket closes either way
                    let _ = stream.try_write(OVER_CAPACITY);
                    continue;
                };
                // best effort: only latency depends on it
                let _ = stream.set_nodelay(true);
                on_conn(stream, peer, admitted);
            }
            Err(e) => backoff.failed(&e).await,
        }
    }
}

/// A hyper connection that can be shut down gracefully.
pub trait Graceful: Future {
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self)
    }
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self)
    }
}

/// Drives a connection until it ends; once its stream has seen no I/O for `idle`, or
/// `shutdown` is cancelled, it is shut down gracefully (a response in progress is
/// finished, then the socket closes).
pub async fn serve_connection<C: Graceful>(
    served: C,
    ticks: Arc<AtomicU64>,
    idle: Duration,
    shutdown: &CancellationToken,
) {
    tokio::pin!(served);
    let idle = idle.max(Duration::from_millis(10));
    let check = idle / 4;
    let (mut seen, mut quiet) = (ticks.load(Ordering::Relaxed), Duration::ZERO);
    let mut closing = false;
    let stopping = shutdown.cancelled();
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            biased;
            _ = served.as_mut() => return,
            () = &mut stopping, if !closing => {
                served.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = tokio::time::sleep(check), if !closing => {
                let now = ticks.load(Ordering::Relaxed);
                if now == seen {
                    quiet += check;
                } else {
                    (seen, quiet) = (now, Duration::ZERO);
                }
                if quiet >= idle {
                    served.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
