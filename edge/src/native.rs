//! The native front door (hyper): what a preview URL does on a machine without
//! Cloudflare.
//!
//! Per request: normalize the host (400 page on garbage) → `/_wakegate/*` (status
//! long-poll, rebuild form) → route lookup (cached while running) → [`decide`] → proxy /
//! page / hold / unavailable. Errors become pages or JSON in one place ([`EdgeError`]).

use crate::front::{self, context, status_json, MAX_FORM, STATUS_WAIT_MS};
use crate::{decide, Decision, PageKind, RequestInfo, RESERVED_PREFIX};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tracing::{debug, warn};
use wakegate_core::host::{normalize_host, Host};
use wakegate_core::route::{ActivityBatch, HostRequest, RouteRecord, RouteStatus};
use wakegate_core::sign::{self, Key};
use wakegate_core::{form, Millis};
use wakegate_splash::{render, Page};

pub type Body = BoxBody<Bytes, hyper::Error>;

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
    /// How long an API client is held while its preview wakes.
    pub hold_timeout: Duration,
    /// How often activity is reported to waker.
    pub activity_every: Duration,
    /// `X-Forwarded-Proto` for proxied requests.
    pub scheme: &'static str,
}

#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    #[error("waker unreachable: {0}")]
    Waker(String),
    #[error("waker answered {0}: {1}")]
    WakerStatus(u16, String),
    #[error("origin unreachable: {0}")]
    Origin(String),
}

fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Unique per request: a random per-process prefix and a counter (no syscall per
/// request). Authenticity comes from the HMAC; the nonce only has to be unique.
fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u64> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 8];
        getrandom::fill(&mut b).expect("OS randomness");
        u64::from_le_bytes(b)
    });
    format!("{prefix:016x}{:x}", COUNTER.fetch_add(1, Ordering::Relaxed))
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A page body that fires `sent` once it is dropped: after hyper has written it (or the
/// client went away). The wake waits on it, so the page always goes out first.
struct AfterSent {
    inner: Full<Bytes>,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl hyper::body::Body for AfterSent {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx).map_err(|never| match never {})
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AfterSent {
    fn drop(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Removes hop-by-hop headers, including any named by `Connection`. `Upgrade` stays
/// only for upgrades (WebSocket), with `Connection: upgrade` put back.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        if !(upgrade && n == header::UPGRADE) {
            headers.remove(n);
        }
    }
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade"))))
}

/// What every serving thread of one edge shares.
#[derive(Default)]
struct Shared {
    cache: RwLock<HashMap<Host, (Arc<RouteRecord>, Instant)>>,
    active: Mutex<HashSet<String>>,
}

/// One serving thread's edge: its own origin connection pool (connections live on the
/// runtime that made them), the shared route cache and activity batch.
pub struct Edge {
    cfg: EdgeConfig,
    client: Client<HttpConnector, Body>,
    shared: Arc<Shared>,
}

fn client() -> Client<HttpConnector, Body> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(connector)
}

impl Edge {
    pub fn new(cfg: EdgeConfig) -> Arc<Edge> {
        Arc::new(Edge { cfg, client: client(), shared: Arc::default() })
    }

    /// Another edge for another serving thread, sharing this one's cache and activity.
    pub fn sibling(&self) -> Arc<Edge> {
        Arc::new(Edge { cfg: self.cfg.clone(), client: client(), shared: self.shared.clone() })
    }

    /// Number of cached routes (for memory accounting).
    pub fn cached_routes(&self) -> usize {
        self.shared.cache.read().unwrap().len()
    }

    // ---------- waker calls ----------

    async fn waker(&self, method: Method, path: &str, body: Vec<u8>) -> Result<(u16, Bytes), EdgeError> {
        let sig = sign::sign(&self.cfg.edge_key, method.as_str(), path, &sign::body_digest(&body), now_ms(), &nonce());
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.cfg.waker_url, path))
            .header(sign::SIGNATURE_HEADER, sig)
            .header(header::CONTENT_TYPE, "application/json")
            .body(full(body))
            .map_err(|e| EdgeError::Waker(e.to_string()))?;
        let resp = tokio::time::timeout(Duration::from_millis(STATUS_WAIT_MS + 10_000), self.client.request(req))
            .await
            .map_err(|_| EdgeError::Waker("timed out".into()))?
            .map_err(|e| EdgeError::Waker(e.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await.map_err(|e| EdgeError::Waker(e.to_string()))?.to_bytes();
        Ok((status, bytes))
    }

    async fn waker_record(&self, path: &str) -> Result<Option<RouteRecord>, EdgeError> {
        let (status, body) = self.waker(Method::GET, path, Vec::new()).await?;
        match status {
            200 => serde_json::from_slice(&body).map(Some).map_err(|e| EdgeError::Waker(e.to_string())),
            404 => Ok(None),
            s => Err(EdgeError::WakerStatus(s, String::from_utf8_lossy(&body).into_owned())),
        }
    }

    /// The route for a host: from the cache while running and fresh, else from waker.
    pub async fn route(&self, host: &Host) -> Result<Option<Arc<RouteRecord>>, EdgeError> {
        if let Some((r, at)) = self.shared.cache.read().unwrap().get(host) {
            if at.elapsed() < self.cfg.route_ttl {
                return Ok(Some(r.clone()));
            }
        }
        let record = self.waker_record(&format!("/v1/edge/route?host={host}")).await?.map(Arc::new);
        let mut cache = self.shared.cache.write().unwrap();
        match &record {
            // only running routes are cached: everything else changes under the visitor
            Some(r) if matches!(r.status, RouteStatus::Running { .. }) => {
                cache.insert(host.clone(), (r.clone(), Instant::now()));
            }
            _ => {
                cache.remove(host);
            }
        }
        Ok(record)
    }

    fn forget(&self, host: &Host) {
        self.shared.cache.write().unwrap().remove(host);
    }

    async fn status(&self, host: &Host, after: u64, wait_ms: u64) -> Result<Option<RouteRecord>, EdgeError> {
        self.waker_record(&format!("/v1/edge/status?host={host}&after={after}&wait={wait_ms}")).await
    }

    async fn wake(&self, host: &Host) {
        let body = serde_json::to_vec(&HostRequest { host: host.to_string(), client_ip: None }).unwrap_or_default();
        match self.waker(Method::POST, "/v1/edge/wake", body).await {
            Ok((202, _)) => debug!(%host, "wake requested"),
            Ok((s, b)) => {
                warn!(%host, status = s, body = %String::from_utf8_lossy(&b), "wake refused")
            }
            Err(e) => warn!(%host, error = %e, "wake failed"),
        }
    }

    fn mark_active(&self, host: &Host) {
        let mut active = self.shared.active.lock().unwrap();
        if !active.contains(host.as_str()) {
            active.insert(host.to_string());
        }
    }

    /// Sends the hosts that saw traffic since the last flush, in one call.
    pub async fn flush_activity(&self) {
        let hosts: Vec<String> = std::mem::take(&mut *self.shared.active.lock().unwrap()).into_iter().collect();
        if hosts.is_empty() {
            return;
        }
        let body = serde_json::to_vec(&ActivityBatch { hosts }).unwrap_or_default();
        if let Err(e) = self.waker(Method::POST, "/v1/edge/activity", body).await {
            warn!(error = %e, "activity report failed");
        }
    }

    // ---------- request handling ----------

    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let raw = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| req.uri().authority().map(|a| a.to_string()))
            .unwrap_or_default();
        let host = match normalize_host(&raw) {
            Ok(h) => h,
            Err(e) => {
                return page(
                    &Page::BadRequest { reason: format!("The host name is not valid: {e}.") },
                    &Default::default(),
                )
            }
        };
        if req.uri().path().starts_with(RESERVED_PREFIX) {
            return self.reserved(req, host, peer).await;
        }
        let info = request_info(req.headers());
        match self.route(&host).await {
            Ok(Some(route)) => self.dispatch(req, host, route, info, peer).await,
            Ok(None) => page(&Page::NotFound { host: host.to_string() }, &Default::default()),
            Err(e) => error_response(&e),
        }
    }

    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        host: Host,
        route: Arc<RouteRecord>,
        info: RequestInfo,
        peer: SocketAddr,
    ) -> Response<Body> {
        match decide(&route, info) {
            Decision::Proxy { origin } => self.proxy(req, &host, &origin, info, peer).await,
            Decision::Page { page: kind, wake } => {
                let return_to = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
                self.page_then_wake(&kind, wake, host, &route, return_to)
            }
            Decision::Hold { wake } => self.hold(req, host, route, wake, info, peer).await,
            Decision::Unavailable { status, retry_after, state } => {
                let mut resp = json(status, &serde_json::json!({ "state": state, "preview": route.preview_id }));
                if let Some(s) = retry_after {
                    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
                }
                resp
            }
        }
    }

    /// A splash page; when `wake`, the wake starts once the page has been written.
    fn page_then_wake(
        self: &Arc<Self>,
        kind: &PageKind,
        wake: bool,
        host: Host,
        route: &RouteRecord,
        return_to: &str,
    ) -> Response<Body> {
        let p = self.page_for(kind, &host);
        let html = Bytes::from(render(&p, &context(route, return_to)));
        let mut resp = page_bytes(&p, html.clone());
        if wake {
            let (tx, rx) = tokio::sync::oneshot::channel();
            *resp.body_mut() = AfterSent { inner: Full::new(html), sent: Some(tx) }.boxed();
            let edge = self.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
                edge.wake(&host).await;
            });
        }
        resp
    }

    fn page_for(&self, kind: &PageKind, host: &Host) -> Page {
        front::page_for(kind, host, &self.cfg.csrf_key, now_ms())
    }

    /// API clients wait (bounded) while the preview wakes, then get the app or a 503.
    async fn hold(
        self: &Arc<Self>,
        req: Request<Incoming>,
        host: Host,
        route: Arc<RouteRecord>,
        wake: bool,
        info: RequestInfo,
        peer: SocketAddr,
    ) -> Response<Body> {
        if wake {
            self.wake(&host).await;
        }
        let deadline = Instant::now() + self.cfg.hold_timeout;
        let mut version = route.version;
        while let Some(left) = deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()) {
            let wait = (left.as_millis() as u64).min(STATUS_WAIT_MS);
            match self.status(&host, version, wait).await {
                Ok(Some(r)) => {
                    if let Some(origin) = r.status.origin() {
                        let origin = origin.to_string();
                        return self.proxy(req, &host, &origin, info, peer).await;
                    }
                    if matches!(r.status, RouteStatus::Failed { .. } | RouteStatus::Erased { .. } | RouteStatus::Gone) {
                        return json(503, &serde_json::json!({ "state": r.status.as_str(), "preview": r.preview_id }));
                    }
                    version = r.version;
                }
                Ok(None) => return json(404, &serde_json::json!({ "error": "no such preview" })),
                Err(e) => return error_response(&e),
            }
        }
        let mut resp = json(503, &serde_json::json!({ "state": "waking", "preview": route.preview_id }));
        resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        resp
    }

    async fn proxy(
        self: &Arc<Self>,
        req: Request<Incoming>,
        host: &Host,
        origin: &str,
        info: RequestInfo,
        peer: SocketAddr,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let upgrade = is_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            let mut shell = Request::from_parts(parts, ());
            let on = hyper::upgrade::on(&mut shell);
            parts = shell.into_parts().0;
            Some(on)
        } else {
            None
        };
        let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let uri = match format!("{origin}{pq}").parse::<http::Uri>() {
            Ok(u) => u,
            Err(e) => return error_response(&EdgeError::Origin(e.to_string())),
        };
        let sig =
            sign::sign(&self.cfg.origin_key, parts.method.as_str(), pq, sign::UNSIGNED_PAYLOAD, now_ms(), &nonce());
        // the client's headers move to the origin request, edited in place: no copies
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers, upgrade);
        let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip())),
            None => HeaderValue::from_str(&peer.ip().to_string()),
        };
        if let Ok(v) = xff {
            headers.insert("x-forwarded-for", v);
        }
        if let Ok(v) = HeaderValue::from_str(host.as_str()) {
            headers.insert("x-forwarded-host", v);
        }
        headers.insert("x-forwarded-proto", HeaderValue::from_static(self.cfg.scheme));
        if let Ok(v) = HeaderValue::from_str(&sig) {
            headers.insert(sign::ORIGIN_SIGNATURE_HEADER, v);
        }
        let mut out = Request::new(body.boxed());
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.headers_mut() = headers;
        let resp = match self.client.request(out).await {
            Ok(r) => r,
            Err(e) => {
                // the origin may have gone to sleep under a cached route: drop the route and
                // show a person the page for the state it is in now
                self.forget(host);
                warn!(%host, %origin, error = %e, "origin request failed");
                if let Ok(Some(fresh)) = self.route(host).await {
                    if let Decision::Page { page: kind, wake } = decide(&fresh, info) {
                        let return_to = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
                        return self.page_then_wake(&kind, wake, host.clone(), &fresh, return_to);
                    }
                }
                return error_response(&EdgeError::Origin(e.to_string()));
            }
        };
        self.finish(resp, host, info, client_upgrade)
    }

    fn finish(
        self: &Arc<Self>,
        mut resp: Response<Incoming>,
        host: &Host,
        info: RequestInfo,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<Body> {
        if !info.is_bot {
            self.mark_active(host);
        }
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let origin_upgrade = hyper::upgrade::on(&mut resp);
                let edge = self.clone();
                let host = host.clone();
                tokio::spawn(async move {
                    let (Ok(client), Ok(origin)) = (client_upgrade.await, origin_upgrade.await) else {
                        return;
                    };
                    let mut client = TokioIo::new(client);
                    let mut origin = TokioIo::new(origin);
                    // a long-lived socket is activity for as long as it stays open
                    let ticker = {
                        let edge = edge.clone();
                        let host = host.clone();
                        tokio::spawn(async move {
                            loop {
                                tokio::time::sleep(edge.cfg.activity_every).await;
                                edge.mark_active(&host);
                            }
                        })
                    };
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut origin).await;
                    ticker.abort();
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, empty());
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        Response::from_parts(parts, body.boxed())
    }

    async fn reserved(self: &Arc<Self>, req: Request<Incoming>, host: Host, peer: SocketAddr) -> Response<Body> {
        let path = req.uri().path().to_string();
        match (req.method().clone(), path.trim_start_matches(RESERVED_PREFIX)) {
            (Method::GET, "status") => {
                let pairs = form::parse_pairs(req.uri().query().unwrap_or(""));
                let after = form::get(&pairs, "after").and_then(|v| v.parse().ok()).unwrap_or(0);
                match self.status(&host, after, STATUS_WAIT_MS).await {
                    Ok(Some(r)) => json(200, &status_json(&r)),
                    Ok(None) => json(404, &serde_json::json!({ "error": "no such preview" })),
                    Err(e) => error_response(&e),
                }
            }
            (Method::POST, "rebuild") => self.rebuild(req, host, peer).await,
            _ => json(404, &serde_json::json!({ "error": "no such endpoint" })),
        }
    }

    /// The confirm-to-rebuild form: POST only, CSRF token bound to the host, same-origin.
    async fn rebuild(self: &Arc<Self>, req: Request<Incoming>, host: Host, peer: SocketAddr) -> Response<Body> {
        let info = request_info(req.headers());
        let origin = req.headers().get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string);
        let body = match Limited::new(req.into_body(), MAX_FORM).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                let mut r = page(&Page::BadRequest { reason: "The form is too large.".into() }, &Default::default());
                *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
                return r;
            }
        };
        let body = String::from_utf8_lossy(&body);
        let return_to =
            match front::check_rebuild_form(info, origin.as_deref(), &host, &body, &self.cfg.csrf_key, now_ms()) {
                Ok(r) => r,
                Err(refusal) => {
                    let mut r = page(&Page::BadRequest { reason: refusal.reason }, &Default::default());
                    *r.status_mut() = StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::FORBIDDEN);
                    return r;
                }
            };
        let body = serde_json::to_vec(&HostRequest { host: host.to_string(), client_ip: Some(peer.ip().to_string()) })
            .unwrap_or_default();
        self.forget(&host);
        match self.waker(Method::POST, "/v1/edge/rebuild", body).await {
            Ok((202, _)) => Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, return_to)
                .header(header::CACHE_CONTROL, "no-store")
                .body(empty())
                .expect("valid response"),
            Ok((410, _)) => page(&Page::Gone, &Default::default()),
            Ok((429, _)) => {
                let mut r = page(
                    &Page::BadRequest { reason: "Too many rebuilds were asked for. Try again later.".into() },
                    &Default::default(),
                );
                *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
                r
            }
            Ok((s, b)) => error_response(&EdgeError::WakerStatus(s, String::from_utf8_lossy(&b).into_owned())),
            Err(e) => error_response(&e),
        }
    }
}

fn request_info(headers: &HeaderMap) -> RequestInfo {
    front::request_info(|n| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string))
}

fn page(p: &Page, cx: &wakegate_splash::Context<'_>) -> Response<Body> {
    page_bytes(p, Bytes::from(render(p, cx)))
}

fn page_bytes(p: &Page, html: Bytes) -> Response<Body> {
    let mut b = Response::builder().status(p.status());
    for (k, v) in front::page_headers(p) {
        b = b.header(k, v);
    }
    b.body(full(html)).expect("valid response")
}

fn json(status: u16, v: &serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-store")
        .body(full(v.to_string()))
        .expect("valid response")
}

/// The one place edge errors become responses.
fn error_response(e: &EdgeError) -> Response<Body> {
    warn!(error = %e, "edge error");
    let (status, reason) = match e {
        EdgeError::Waker(_) | EdgeError::WakerStatus(..) => {
            (503, "Wakegate's control plane is not answering. Try again in a moment.")
        }
        EdgeError::Origin(_) => (502, "The preview did not answer. Try again in a moment."),
    };
    let mut r = page(&Page::BadRequest { reason: reason.into() }, &Default::default());
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

/// Serves the edge on `listener` in the current runtime; also reports activity every
/// `activity_every`.
pub async fn serve(listener: TcpListener, edge: Arc<Edge>) {
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _flusher = AbortOnDrop({
        let edge = edge.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(edge.cfg.activity_every).await;
                edge.flush_activity().await;
            }
        })
    });
    accept_loop(listener, edge).await
}

/// Serves the edge on `addr` with one single-threaded runtime per thread, each with its
/// own `SO_REUSEPORT` listener and origin pool, so a request never wakes another thread
/// (the cross-thread wakeups of a work-stealing pool were the largest cost in profiles).
/// Returns the bound address (resolving port 0) once every thread listens.
pub fn serve_threads(addr: SocketAddr, edge: Arc<Edge>, threads: usize) -> std::io::Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    let mut bound = addr;
    for i in 0..threads.max(1) {
        let edge = if i == 0 { edge.clone() } else { edge.sibling() };
        let tx = tx.clone();
        let at = bound;
        std::thread::Builder::new().name(format!("edge-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tx.send(Err(e)).unwrap_or(()),
            };
            rt.block_on(async move {
                let listener = (|| {
                    let socket =
                        if at.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                    socket.set_reuseaddr(true)?;
                    socket.set_reuseport(true)?;
                    socket.bind(at)?;
                    socket.listen(4096)
                })();
                match listener {
                    Ok(l) => {
                        let _ = tx.send(l.local_addr());
                        if i == 0 {
                            serve(l, edge).await
                        } else {
                            accept_loop(l, edge).await
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
        // the first thread resolves port 0; the others bind the same port
        bound = rx.recv().map_err(std::io::Error::other)??;
    }
    Ok(bound)
}

async fn accept_loop(listener: TcpListener, edge: Arc<Edge>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let edge = edge.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let edge = edge.clone();
                async move { Ok::<_, std::convert::Infallible>(edge.handle(req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades()
                .await;
        });
    }
}
