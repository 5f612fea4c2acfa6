//! The native front door (hyper): what a preview URL does on a machine without
//! Cloudflare. Only platform glue lives here; the request pipeline is
//! [`crate::pipeline`].
//!
//! * `mod.rs` — the server: one single-threaded runtime per core, each with its own
//!   `SO_REUSEPORT` listener, origin pool, route cache and activity set (a request never
//!   touches another thread, and takes no lock); the accept loop with total and per-IP
//!   connection caps and a back-off on errors such as `EMFILE`; per connection a
//!   header-read timeout, an idle timeout and hyper's head limits;
//! * `platform.rs` — the [`Platform`](crate::pipeline::Platform) hooks: forwarding,
//!   waker calls, answers, work after the response;
//! * `pool.rs` — the thread's connections to origins and the waker;
//! * `body.rs` — the body types (enums, not boxes).

mod body;
mod platform;
mod pool;
mod spin;

use crate::cache::{CachePolicy, DEFAULT_CAPACITY, DEFAULT_NEGATIVE_TTL_MS};
use crate::pipeline::{Limits, Pipeline, Settings, State};
use http::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use ipnet::IpNet;
use platform::Native;
use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use wakegate_core::sign::Key;
use wakegate_serve::{Admitted, Connections, Watched};

pub use body::ResponseBody;

/// Default time a client has to send a request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may go without a byte either way before it is closed
/// (a response in progress is finished first).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on open client connections, all threads together.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default cap on open connections from one IP address.
pub const DEFAULT_MAX_PER_IP: usize = 256;

/// Default busy-poll window after an edge thread's last event.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(100);

/// How the native edge serves.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Base URL of waker, e.g. `http://127.0.0.1:7001`.
    pub waker_url: String,
    pub edge_key: Key,
    pub csrf_key: Key,
    /// Signs requests to origins so they can tell the edge from the internet.
    pub origin_key: Key,
    /// How long a running route is cached.
    pub route_ttl: Duration,
    /// How long "no preview at this host" is cached.
    pub negative_ttl: Duration,
    /// Most hosts cached per thread.
    pub cache_capacity: usize,
    /// How long an API client is held while its preview wakes.
    pub hold_timeout: Duration,
    /// How often activity is reported to waker.
    pub activity_every: Duration,
    /// `X-Forwarded-Proto` for proxied requests: `http`, or `https` behind a TLS
    /// terminator.
    pub scheme: &'static str,
    /// Peers whose `X-Forwarded-*` / `Forwarded` headers are kept (and appended to).
    pub trusted_proxies: Vec<IpNet>,
    pub limits: Limits,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_per_ip: usize,
    /// How long an edge thread polls for work instead of sleeping after its last
    /// request or origin response ([`spin`]); zero never spins.
    pub busy_poll: Duration,
}

impl EdgeConfig {
    /// The defaults, with the waker address and the three keys.
    pub fn new(waker_url: impl Into<String>, edge_key: Key, csrf_key: Key, origin_key: Key) -> EdgeConfig {
        EdgeConfig {
            waker_url: waker_url.into().trim_end_matches('/').to_string(),
            edge_key,
            csrf_key,
            origin_key,
            route_ttl: Duration::from_secs(2),
            negative_ttl: Duration::from_millis(DEFAULT_NEGATIVE_TTL_MS),
            cache_capacity: DEFAULT_CAPACITY,
            hold_timeout: Duration::from_secs(30),
            activity_every: Duration::from_secs(1),
            scheme: "http",
            trusted_proxies: Vec::new(),
            limits: Limits::default(),
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_ip: DEFAULT_MAX_PER_IP,
            busy_poll: DEFAULT_BUSY_POLL,
        }
    }

    fn settings(&self) -> Settings {
        Settings {
            edge_key: self.edge_key.clone(),
            csrf_key: self.csrf_key.clone(),
            origin_key: self.origin_key.clone(),
            cache: CachePolicy {
                route_ttl_ms: self.route_ttl.as_millis() as u64,
                negative_ttl_ms: self.negative_ttl.as_millis() as u64,
                capacity: self.cache_capacity,
            },
            hold_ms: self.hold_timeout.as_millis() as u64,
            activity_every_ms: self.activity_every.as_millis() as u64,
            limits: self.limits,
        }
    }
}

/// What the pipeline knows of a request's connection, computed once per connection.
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer is a trusted proxy.
    pub trusted: bool,
    /// The peer's address as a header value.
    ip_value: HeaderValue,
    /// `Forwarded: for=…;proto=…` for this peer.
    forwarded: HeaderValue,
}

impl ConnInfo {
    fn new(peer: SocketAddr, cfg: &EdgeConfig) -> ConnInfo {
        let ip = peer.ip();
        let node = match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("\"[{v6}]\""),
        };
        ConnInfo {
            peer,
            trusted: cfg.trusted_proxies.iter().any(|n| n.contains(&ip)),
            ip_value: HeaderValue::from_str(&ip.to_string()).unwrap_or(HeaderValue::from_static("unknown")),
            forwarded: HeaderValue::from_str(&format!("for={node};proto={}", cfg.scheme))
                .unwrap_or(HeaderValue::from_static("for=unknown")),
        }
    }
}

thread_local! {
    /// This serving thread's pipeline (for work that outlives a request, e.g. WebSocket
    /// activity).
    static PIPELINE: RefCell<Option<Rc<Pipeline<Native>>>> = const { RefCell::new(None) };
}

fn with_state(f: impl FnOnce(&State)) {
    PIPELINE.with(|p| {
        if let Some(p) = p.borrow().as_ref() {
            f(&p.platform.state)
        }
    })
}

/// A running native edge. [`EdgeServer::shutdown`] stops it gracefully; dropping it
/// stops every thread at once.
pub struct EdgeServer {
    pub addr: SocketAddr,
    /// `Some(grace)` once stopping: open connections get that long to finish.
    stop: tokio::sync::watch::Sender<Option<Duration>>,
    cached: Vec<Arc<AtomicUsize>>,
    conns: Arc<Connections>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EdgeServer {
    /// Serves on `addr` with `threads` single-threaded runtimes, each with its own
    /// `SO_REUSEPORT` listener (port 0 is resolved by the first). Returns once every
    /// thread listens.
    pub fn start(addr: SocketAddr, cfg: EdgeConfig, threads: usize) -> std::io::Result<EdgeServer> {
        let (stop, stop_rx) = tokio::sync::watch::channel(None);
        let cfg = Arc::new(cfg);
        let conns = Connections::new(cfg.max_connections, cfg.max_per_ip);
        let waker = platform::WakerAddr::parse(&cfg.waker_url)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let gate = spin::Gate::new();
        let mut bound = addr;
        let mut cached = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads.max(1) {
            let at = bound;
            let bind = move || -> std::io::Result<std::net::TcpListener> {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(at),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.set_reuse_address(true)?;
                socket.set_reuse_port(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&at.into())?;
                socket.listen(4096)?;
                Ok(socket.into())
            };
            let listener = bind()?;
            bound = listener.local_addr()?;
            let (count, handle) =
                spawn_thread(i, listener, cfg.clone(), waker.clone(), conns.clone(), gate.clone(), stop_rx.clone())?;
            cached.push(count);
            handles.push(handle);
        }
        Ok(EdgeServer { addr: bound, stop, cached, conns, threads: handles })
    }

    /// Stops gracefully: no new connections; open ones finish the response they are
    /// sending (within `grace`) and close; the visits seen are reported to the waker.
    /// Returns once every thread has ended.
    pub async fn shutdown(mut self, grace: Duration) {
        // no receiver left means every thread has ended already
        let _ = self.stop.send(Some(grace));
        let threads = std::mem::take(&mut self.threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("an edge thread panicked while stopping");
                }
            }
        });
        if let Err(e) = joined.await {
            tracing::error!(error = %e, "waiting for the edge threads failed");
        }
    }

    /// Cached hosts over all threads (as of each thread's last activity tick).
    pub fn cached_routes(&self) -> usize {
        self.cached.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Open client connections.
    pub fn connections(&self) -> usize {
        self.conns.open()
    }
}

impl Drop for EdgeServer {
    fn drop(&mut self) {
        // at once, unless a graceful stop is under way
        self.stop.send_if_modified(|s| {
            let fresh = s.is_none();
            if fresh {
                *s = Some(Duration::ZERO);
            }
            fresh
        });
    }
}

fn spawn_thread(
    i: usize,
    listener: std::net::TcpListener,
    cfg: Arc<EdgeConfig>,
    waker: platform::WakerAddr,
    conns: Arc<Connections>,
    gate: Arc<spin::Gate>,
    mut stop: tokio::sync::watch::Receiver<Option<Duration>>,
) -> std::io::Result<(Arc<AtomicUsize>, std::thread::JoinHandle<()>)> {
    let cached = Arc::new(AtomicUsize::new(0));
    let report = cached.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let handle = std::thread::Builder::new().name(format!("edge-{i}")).spawn(move || {
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return tracing::warn!(error = %e, "edge listener"),
            };
            let mut prefix = [0u8; 8];
            if getrandom::fill(&mut prefix).is_err() {
                prefix = (std::process::id() as u64 ^ ((i as u64) << 40)).to_le_bytes();
            }
            let settings = cfg.settings();
            let spin = spin::Spin::new(cfg.busy_poll, gate.clone());
            tokio::task::spawn_local(spin.clone().run());
            if i == 0 && !cfg.busy_poll.is_zero() {
                // one sampler for all the threads
                tokio::task::spawn_local(gate.sampler());
            }
            let native = Native {
                spin,
                cfg: cfg.clone(),
                pool: platform::pool(),
                waker,
                state: State::new(settings.cache, u64::from_le_bytes(prefix)),
                metrics: platform::Metrics::new(),
            };
            let pipeline = Pipeline::new(native, settings);
            PIPELINE.with(|p| *p.borrow_mut() = Some(pipeline.clone()));
            let flusher = {
                let pipeline = pipeline.clone();
                let every = cfg.activity_every.max(Duration::from_millis(10));
                async move {
                    loop {
                        tokio::time::sleep(every).await;
                        pipeline.flush_activity().await;
                        pipeline.platform.pool.sweep();
                        report.store(pipeline.platform.state.cached_routes(), Ordering::Relaxed);
                    }
                }
            };
            let shutdown = wakegate_serve::CancellationToken::new();
            let tracker = wakegate_serve::TaskTracker::new();
            let grace = tokio::select! {
                _ = accept_loop(listener, pipeline.clone(), cfg, conns, &shutdown, &tracker) => Duration::ZERO,
                _ = flusher => Duration::ZERO,
                g = stop.wait_for(|s| s.is_some()) => g.ok().and_then(|g| *g).unwrap_or_default(),
            };
            // stopping: the listener is closed with the accept loop; open connections
            // finish what they are sending, then the visits seen are reported
            shutdown.cancel();
            tracker.close();
            if !grace.is_zero() {
                if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
                    tracing::warn!(open = tracker.len(), "connections still open after the grace period are cut");
                }
                // bounded: a waker that does not answer must not hold the exit up
                if tokio::time::timeout(Duration::from_secs(3), pipeline.flush_activity()).await.is_err() {
                    tracing::warn!("the waker did not take the last visits within 3 s; they are lost");
                }
            }
            PIPELINE.with(|p| p.borrow_mut().take());
        });
    })?;
    Ok((cached, handle))
}

async fn accept_loop(
    listener: TcpListener,
    pipeline: Rc<Pipeline<Native>>,
    cfg: Arc<EdgeConfig>,
    conns: Arc<Connections>,
    shutdown: &wakegate_serve::CancellationToken,
    tracker: &wakegate_serve::TaskTracker,
) {
    wakegate_serve::accept(listener, &conns, shutdown, |stream, peer, admitted| {
        let conn = serve_connection(stream, peer, pipeline.clone(), cfg.clone(), admitted, shutdown.clone());
        tracker.spawn_local(conn);
    })
    .await
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    pipeline: Rc<Pipeline<Native>>,
    cfg: Arc<EdgeConfig>,
    _admitted: Admitted,
    shutdown: wakegate_serve::CancellationToken,
) {
    let conn = Rc::new(ConnInfo::new(peer, &cfg));
    let ticks = Arc::new(AtomicU64::new(0));
    let io = TokioIo::new(Watched::new(stream, ticks.clone()));
    let svc = service_fn(move |req| {
        pipeline.platform.spin.touch();
        let pipeline = pipeline.clone();
        let conn = conn.clone();
        async move { Ok::<_, std::convert::Infallible>(pipeline.handle(&conn, req).await) }
    });
    let limits = cfg.limits;
    // room for a head somewhat over the limits, so the pipeline can answer it with the
    // edge's own 414/431 page; beyond this hyper answers 431 itself
    let buffer = (limits.max_head + limits.max_uri + 64 * 1024).max(8192);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(cfg.header_read_timeout).max_buf_size(buffer);
    let served = builder.serve_connection(io, svc).with_upgrades();
    wakegate_serve::serve_connection(served, ticks, cfg.idle_timeout, &shutdown).await;
}
