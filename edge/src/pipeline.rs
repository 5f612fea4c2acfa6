//! The one request pipeline, written once for both front doors (in the spirit of
//! pingora's `ProxyHttp`: one driver, per-platform hooks).
//!
//! Per request: limits (URL, head size, one `Host`, no body on `GET`/`HEAD`) → host
//! normalization → `/_wakegate/*` (status long-poll, rebuild form) → route (cache,
//! negative cache, single-flight) → [`decide`] → proxy / page (+ wake after the response)
//! / hold / unavailable → on a failed proxy under a stale route, the page for the state
//! the preview is in now → activity. Errors become answers in one place
//! ([`EdgeError::answer`]).
//!
//! A front door implements [`Platform`]: how to read its request, how to call waker and
//! the origin, how to turn an [`Answer`] into a response, and how to run work after the
//! response. The hooks are `?Send`: the Worker is single-threaded, and the native edge
//! runs one single-threaded runtime per core, so per-thread state needs no locks.
#![allow(async_fn_in_trait)] // the futures are !Send on purpose (see above)

use crate::answer::{Answer, EdgeError};
use crate::cache::{CachePolicy, Known, Route, RouteCache};
use crate::front::{self, context, status_json, MAX_FORM, STATUS_WAIT_MS};
use crate::{decide, Decision, PageKind, RequestInfo, RESERVED_PREFIX};
use futures_util::future::{FutureExt, LocalBoxFuture, Shared};
use http::HeaderValue;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use wakegate_core::host::{canonical_host, normalize_host, Host};
use wakegate_core::route::{ActivityBatch, GoneInfo, HostRequest, RouteRecord, RouteStatus};
use wakegate_core::sign::{self, Key};
use wakegate_core::{form, Millis};
use wakegate_splash::{Context, Page};

/// Default longest request target (path and query); nginx's default buffer is 8 KiB.
pub const DEFAULT_MAX_URI: usize = 8 * 1024;
/// Default largest request head (all header names and values).
pub const DEFAULT_MAX_HEAD: usize = 32 * 1024;

/// Limits on what a client may send.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Longest path and query, in bytes (414 beyond).
    pub max_uri: usize,
    /// Largest sum of header names and values, in bytes (431 beyond).
    pub max_head: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_uri: DEFAULT_MAX_URI, max_head: DEFAULT_MAX_HEAD }
    }
}

/// What the pipeline needs to know, the same on both front doors.
#[derive(Clone, Debug)]
pub struct Settings {
    pub edge_key: Key,
    pub csrf_key: Key,
    /// Signs requests to origins so they can tell the edge from the internet.
    pub origin_key: Key,
    pub cache: CachePolicy,
    /// How long an API client is held while its preview wakes.
    pub hold_ms: Millis,
    /// How often activity is reported to waker.
    pub activity_every_ms: Millis,
    pub limits: Limits,
}

/// What the pipeline reads of a request, borrowed from the platform's request.
#[derive(Clone, Copy, Debug)]
pub struct Head<'r> {
    pub method: &'r str,
    /// Path and query as the client sent them (`/` when empty).
    pub path_and_query: &'r str,
    /// The `Host` header (first of them).
    pub host: Option<&'r str>,
    /// How many `Host` headers there were.
    pub host_headers: usize,
    /// The authority of an absolute-form request target, if any.
    pub authority: Option<&'r str>,
    /// Sum of header name and value lengths; 0 where the platform enforces its own limit.
    pub head_bytes: usize,
    /// The request announces a body (`Content-Length` > 0 or `Transfer-Encoding`).
    pub has_body: bool,
}

/// Why forwarding failed, where the visitor was going (for the page shown instead),
/// and the request itself when none of it reached the origin (a connect that failed):
/// the pipeline may then still hold it while the preview wakes.
#[derive(Debug)]
pub struct Failed<R> {
    pub error: EdgeError,
    pub return_to: String,
    pub unsent: Option<R>,
}

/// A signed origin request's extra header, made by the pipeline.
pub struct Forward<'a> {
    pub route: &'a Route,
    pub info: RequestInfo,
    /// `x-wakegate-origin-signature`.
    pub signature: HeaderValue,
}

/// The platform parts of a front door.
pub trait Platform: Sized + 'static {
    /// The client's request, body included.
    type Request;
    type Response;
    /// What a request carries besides itself (the connection; the Worker's context).
    type Cx;

    fn now(&self) -> Millis;
    /// The per-thread (native) or per-isolate (Worker) state.
    fn state(&self) -> &State;
    fn head<'r>(&self, req: &'r Self::Request) -> Head<'r>;
    /// A request header by lowercase name.
    fn header<'r>(&self, req: &'r Self::Request, name: &str) -> Option<&'r str>;
    /// The visitor's address, for per-IP limits.
    fn client_ip(&self, cx: &Self::Cx, req: &Self::Request) -> Option<String>;
    /// Calls waker: the request is already signed; returns status and body.
    async fn call_waker(
        &self,
        method: &'static str,
        path: &str,
        signature: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), EdgeError>;
    /// Reads the body, at most `limit` bytes ([`EdgeError::BodyTooLarge`] beyond).
    async fn read_body(&self, req: Self::Request, limit: usize) -> Result<Vec<u8>, EdgeError>;
    /// Forwards the request to `to.route`'s origin and returns its response (a
    /// WebSocket upgrade included).
    async fn forward(
        &self,
        cx: &Self::Cx,
        req: Self::Request,
        to: Forward<'_>,
    ) -> Result<Self::Response, Failed<Self::Request>>;
    fn respond(&self, answer: Answer) -> Self::Response;
    /// Responds, then runs `after` once the response has been sent.
    fn respond_then(&self, cx: &Self::Cx, answer: Answer, after: LocalBoxFuture<'static, ()>) -> Self::Response;
    /// Runs `work` in the background (it may outlive the request).
    fn spawn(&self, cx: &Self::Cx, work: LocalBoxFuture<'static, ()>);
    fn warn(&self, what: &str, error: &EdgeError);
    /// When a request began, if this platform has a monotonic clock to time it with.
    fn began(&self) -> Option<std::time::Instant> {
        None
    }
    /// Notes what a request got. By default it is counted in [`State`] and reported to
    /// waker with the activity (the Worker); the native edge records metrics itself.
    fn served(&self, what: Served, _began: Option<std::time::Instant>) {
        self.state().count(what);
    }
    /// Notes a request refused a wake because it may not wake anything (a bot, a
    /// prefetch, a `HEAD`); counted like [`Platform::served`].
    fn refused_wake(&self) {
        let s = self.state();
        s.refused.set(s.refused.get() + 1);
    }
    /// Whether a request may await I/O another request started. The native edge: yes.
    /// A Worker: no (workerd refuses I/O on behalf of another request), so there each
    /// request does its own waker calls instead of joining one in flight.
    fn shares_io_between_requests(&self) -> bool {
        true
    }
}

/// What a request got, for metrics: a small fixed set (the `answer` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    Proxy,
    Page,
    Hold,
    Status,
    Rebuild,
    /// A plain answer: no such preview or endpoint, a preview unavailable to this
    /// client (a bot at a sleeping one), a refused request (bad host, too large).
    Other,
    /// The edge failed a request itself (the waker unreachable, say). An origin that
    /// fails a proxied or held request is counted under `proxy` or `hold`.
    Error,
}

impl Served {
    pub const ALL: [Served; 7] =
        [Served::Proxy, Served::Page, Served::Hold, Served::Status, Served::Rebuild, Served::Other, Served::Error];

    pub fn as_str(self) -> &'static str {
        wakegate_core::metrics::EDGE_ANSWERS[self as usize]
    }
}

type Lookup = Result<Option<Rc<Route>>, EdgeError>;
type Flights<K, T> = RefCell<HashMap<K, Shared<LocalBoxFuture<'static, T>>>>;

/// The state one thread (or isolate) keeps: route cache, lookups in flight, activity
/// not yet reported, and what signing needs.
pub struct State {
    cache: RefCell<RouteCache>,
    /// Route lookups in flight, by host.
    inflight: Flights<Host, Lookup>,
    /// Status long-polls in flight, by (host, version after): held API clients of one
    /// preview share one.
    waiting: Flights<(Host, u64), Result<Option<RouteRecord>, EdgeError>>,
    /// Wake calls in flight, by host.
    waking: Flights<Host, ()>,
    active: RefCell<HashSet<Host>>,
    last_flush: Cell<Millis>,
    nonce_prefix: u64,
    counter: Cell<u64>,
    signature: RefCell<String>,
    /// Requests by [`Served`] since the last activity report (the Worker's metrics).
    served: Cell<[u64; Served::ALL.len()]>,
    refused: Cell<u64>,
}

impl State {
    /// `nonce_prefix` must differ between threads and processes (random).
    pub fn new(policy: CachePolicy, nonce_prefix: u64) -> State {
        State {
            cache: RefCell::new(RouteCache::new(policy)),
            inflight: RefCell::default(),
            waiting: RefCell::default(),
            waking: RefCell::default(),
            active: RefCell::default(),
            last_flush: Cell::new(0),
            nonce_prefix,
            counter: Cell::new(0),
            signature: RefCell::new(String::with_capacity(128)),
            served: Cell::new([0; Served::ALL.len()]),
            refused: Cell::new(0),
        }
    }

    /// Counts a request for the next activity report.
    pub fn count(&self, what: Served) {
        let mut c = self.served.get();
        c[what as usize] += 1;
        self.served.set(c);
    }

    /// Whether requests were counted since the last report.
    fn has_counts(&self) -> bool {
        self.refused.get() > 0 || self.served.get().iter().any(|n| *n > 0)
    }

    /// Takes the counts kept since the last report.
    fn take_counts(&self) -> (std::collections::BTreeMap<String, u64>, u64) {
        let c = self.served.replace([0; Served::ALL.len()]);
        let served = Served::ALL.iter().zip(c).filter(|(_, n)| *n > 0).map(|(s, n)| (s.as_str().into(), n)).collect();
        (served, self.refused.replace(0))
    }

    /// Cached hosts (for memory accounting).
    pub fn cached_routes(&self) -> usize {
        self.cache.borrow().len()
    }

    /// Records that `host` saw a person's traffic.
    pub fn mark_active(&self, host: &Host) {
        let mut active = self.active.borrow_mut();
        if !active.contains(host.as_str()) {
            active.insert(host.clone());
        }
    }

    /// Writes a fresh nonce (unique per thread and process: prefix + counter).
    fn nonce(&self, out: &mut [u8; 32]) {
        let n = self.counter.get().wrapping_add(1);
        self.counter.set(n);
        let v = (u128::from(self.nonce_prefix) << 64) | u128::from(n);
        let hex = b"0123456789abcdef";
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = hex[((v >> (124 - 4 * i)) & 0xf) as usize];
        }
    }

    /// Signs into the reused buffer and hands the header value to `f`.
    fn sign<R>(&self, key: &Key, method: &str, path: &str, digest: &str, now: Millis, f: impl FnOnce(&str) -> R) -> R {
        let mut nonce = [0u8; 32];
        self.nonce(&mut nonce);
        let nonce = std::str::from_utf8(&nonce).unwrap_or("0");
        let mut buf = self.signature.borrow_mut();
        sign::sign_into(key, method, path, digest, now, nonce, &mut buf);
        f(&buf)
    }
}

/// What a request turned out to need, decided before its body is touched.
enum Plan {
    Answer(Answer),
    Page { answer: Answer, wake: Option<Host> },
    Proxy { route: Rc<Route>, info: RequestInfo, signature: HeaderValue },
    Hold { route: Rc<Route>, wake: bool, info: RequestInfo },
    Status { host: Host, after: u64 },
    Rebuild { host: Host, info: RequestInfo, origin: Option<String> },
}

/// The pipeline of one thread (or isolate).
pub struct Pipeline<P: Platform> {
    pub platform: P,
    pub settings: Settings,
}

impl<P: Platform> Pipeline<P> {
    pub fn new(platform: P, settings: Settings) -> Rc<Self> {
        Rc::new(Pipeline { platform, settings })
    }

    fn state(&self) -> &State {
        self.platform.state()
    }

    /// Answers one request.
    pub async fn handle(self: &Rc<Self>, cx: &P::Cx, req: P::Request) -> P::Response {
        let began = self.platform.began();
        // the counts of earlier requests (kept only where nothing else reports them)
        if self.state().has_counts() {
            self.flush_if_due(cx);
        }
        let plan = {
            let head = self.platform.head(&req);
            self.plan(&req, head).await
        };
        let (what, result) = match plan {
            Ok(Plan::Answer(a)) => return self.answered(a, Served::Other, began),
            Ok(Plan::Page { answer, wake }) => {
                self.platform.served(Served::Page, began);
                return self.page_then_wake(cx, answer, wake);
            }
            Ok(Plan::Proxy { route, info, signature }) => {
                let r = self.proxy(cx, req, route, info, signature).await;
                self.platform.served(Served::Proxy, began);
                return r;
            }
            Ok(Plan::Hold { route, wake, info }) => {
                let r = self.hold(cx, req, route, wake, info).await;
                self.platform.served(Served::Hold, began);
                return r;
            }
            Ok(Plan::Status { host, after }) => (
                Served::Status,
                self.status(&host, after, STATUS_WAIT_MS).await.map(|r| match r {
                    Some(r) => Answer::json(200, &status_json(&r)),
                    None => Answer::json(404, &serde_json::json!({ "error": "no such preview" })),
                }),
            ),
            Ok(Plan::Rebuild { host, info, origin }) => {
                (Served::Rebuild, self.rebuild(cx, req, host, info, origin).await)
            }
            Err(e) => (Served::Other, Err(e)),
        };
        match result {
            Ok(a) => {
                self.platform.served(what, began);
                self.platform.respond(a)
            }
            Err(e) => {
                self.warn_ours(&e);
                let what = if e.is_ours() { Served::Error } else { Served::Other };
                self.answered(e.answer(), what, began)
            }
        }
    }

    /// A plain answer, counted as `what`.
    fn answered(&self, a: Answer, what: Served, began: Option<std::time::Instant>) -> P::Response {
        self.platform.served(what, began);
        self.platform.respond(a)
    }

    fn warn_ours(&self, e: &EdgeError) {
        if e.is_ours() {
            self.platform.warn("edge", e);
        }
    }

    /// An error inside a proxied or held request (counted as that).
    fn fail(&self, e: &EdgeError) -> P::Response {
        self.warn_ours(e);
        self.platform.respond(e.answer())
    }

    async fn plan(self: &Rc<Self>, req: &P::Request, head: Head<'_>) -> Result<Plan, EdgeError> {
        let limits = self.settings.limits;
        if head.path_and_query.len() > limits.max_uri {
            return Err(EdgeError::UriTooLong(limits.max_uri));
        }
        if head.head_bytes > limits.max_head {
            return Err(EdgeError::HeadTooLarge(limits.max_head));
        }
        if head.host_headers > 1 {
            return Err(EdgeError::AmbiguousHost);
        }
        let host = match (head.host, head.authority) {
            (Some(h), Some(a)) => {
                let (h, a) = (canonical_host(h), canonical_host(a));
                if h != a {
                    return Err(EdgeError::AmbiguousHost);
                }
                h
            }
            (Some(raw), None) | (None, Some(raw)) => canonical_host(raw),
            (None, None) => canonical_host(""),
        }
        .map_err(EdgeError::BadHost)?;
        if head.has_body && (head.method == "GET" || head.method == "HEAD") {
            return Err(EdgeError::BodyNotAllowed(if head.method == "GET" { "GET" } else { "HEAD" }));
        }
        let header = |n: &str| self.platform.header(req, n);
        let info = front::request_info(head.method, header);
        if let Some(rest) = head.path_and_query.strip_prefix(RESERVED_PREFIX) {
            let (endpoint, query) = rest.split_once('?').unwrap_or((rest, ""));
            let host = normalize_host(&host).map_err(EdgeError::BadHost)?;
            return Ok(match (head.method, endpoint) {
                ("GET", "status") => {
                    let pairs = form::parse_pairs(query);
                    Plan::Status { host, after: form::get(&pairs, "after").and_then(|v| v.parse().ok()).unwrap_or(0) }
                }
                ("POST", "rebuild") => Plan::Rebuild { host, info, origin: header("origin").map(str::to_string) },
                _ => Plan::Answer(Answer::json(404, &serde_json::json!({ "error": "no such endpoint" }))),
            });
        }
        let Some(route) = self.route(&host).await? else {
            return Ok(Plan::Answer(Answer::page(&Page::NotFound { host: host.into_owned() }, &Context::default())));
        };
        Ok(match self.decide(&route.record, info) {
            Decision::Proxy => Plan::Proxy { signature: self.origin_signature(head), route, info },
            Decision::Page { page, wake } => Plan::Page {
                answer: self.page(&page, &route, head.path_and_query),
                wake: wake.then(|| route.host.clone()),
            },
            Decision::Hold { wake } => Plan::Hold { route, wake, info },
            Decision::Unavailable { status, retry_after, state } => {
                let a =
                    Answer::json(status, &serde_json::json!({ "state": state, "preview": route.record.preview_id }));
                Plan::Answer(match retry_after {
                    Some(s) => a.retry_after(s),
                    None => a,
                })
            }
        })
    }

    /// [`decide`], noting a request that may not wake the sleeping preview it asks for.
    fn decide(&self, record: &RouteRecord, info: RequestInfo) -> Decision {
        if !info.may_wake && matches!(record.status, wakegate_core::route::RouteStatus::Sleeping) {
            self.platform.refused_wake();
        }
        decide(record, info)
    }

    fn page(&self, kind: &PageKind, route: &Route, return_to: &str) -> Answer {
        let page = front::page_for(kind, &route.host, &self.settings.csrf_key, self.platform.now());
        Answer::page(&page, &context(&route.record, return_to))
    }

    /// A page; when `wake` names a host, its wake starts once the page has been sent.
    fn page_then_wake(self: &Rc<Self>, cx: &P::Cx, answer: Answer, wake: Option<Host>) -> P::Response {
        match wake {
            None => self.platform.respond(answer),
            Some(host) => {
                let me = self.clone();
                self.platform.respond_then(cx, answer, async move { me.wake(&host).await }.boxed_local())
            }
        }
    }

    // ---------- routes ----------

    /// The route for a canonical host: cached, or looked up once however many requests
    /// ask at the same time.
    pub async fn route(self: &Rc<Self>, host: &str) -> Lookup {
        let now = self.platform.now();
        match self.state().cache.borrow_mut().get(host, now) {
            Some(Known::Route(r)) => return Ok(Some(r)),
            Some(Known::NotFound) => return Ok(None),
            None => {}
        }
        let host = normalize_host(host).map_err(EdgeError::BadHost)?;
        self.once(|s| &s.inflight, host.clone(), |me| async move { me.fetch_route(host).await }.boxed_local()).await
    }

    async fn fetch_route(&self, host: Host) -> Lookup {
        let record = self.waker_record(&format!("/v1/edge/route?host={host}")).await?;
        Ok(self.state().cache.borrow_mut().put(host, record, self.platform.now()))
    }

    /// Drops what is cached for `host`.
    pub fn forget(&self, host: &str) {
        self.state().cache.borrow_mut().forget(host);
    }

    // ---------- waker ----------

    async fn waker(&self, method: &'static str, path: &str, body: Vec<u8>) -> Result<(u16, Vec<u8>), EdgeError> {
        let digest = sign::body_digest(&body);
        let sig =
            self.state().sign(&self.settings.edge_key, method, path, &digest, self.platform.now(), str::to_string);
        self.platform.call_waker(method, path, &sig, body).await
    }

    async fn waker_record(&self, path: &str) -> Result<Option<RouteRecord>, EdgeError> {
        match self.waker("GET", path, Vec::new()).await? {
            (200, body) => serde_json::from_slice(&body).map(Some).map_err(|e| EdgeError::Waker(e.to_string())),
            (404, _) => Ok(None),
            (s, body) => Err(EdgeError::WakerStatus(s, String::from_utf8_lossy(&body).into_owned())),
        }
    }

    /// Runs `work` once per `key` however many callers ask at the same time (the others
    /// await its outcome), in the flight table `table` picks.
    async fn once<K, T>(
        self: &Rc<Self>,
        table: fn(&State) -> &Flights<K, T>,
        key: K,
        work: impl FnOnce(Rc<Self>) -> LocalBoxFuture<'static, T>,
    ) -> T
    where
        K: std::hash::Hash + Eq + Clone + 'static,
        T: Clone + 'static,
    {
        if !self.platform.shares_io_between_requests() {
            return work(self.clone()).await;
        }
        let flight = {
            let mut flights = table(self.state()).borrow_mut();
            match flights.get(&key) {
                Some(f) => f.clone(),
                None => {
                    let me = self.clone();
                    let done = key.clone();
                    let run = work(self.clone());
                    let f = async move {
                        let out = run.await;
                        table(me.state()).borrow_mut().remove(&done);
                        out
                    }
                    .boxed_local()
                    .shared();
                    flights.insert(key, f.clone());
                    f
                }
            }
        };
        flight.await
    }

    /// The record once its version passes `after` (or after `wait_ms`); one long-poll
    /// per (host, version) however many held clients wait on it.
    async fn status(self: &Rc<Self>, host: &Host, after: u64, wait_ms: u64) -> Result<Option<RouteRecord>, EdgeError> {
        let path = format!("/v1/edge/status?host={host}&after={after}&wait={wait_ms}");
        self.once(|s| &s.waiting, (host.clone(), after), |me| async move { me.waker_record(&path).await }.boxed_local())
            .await
    }

    /// Asks waker to wake `host`; one call however many requests ask at once.
    async fn wake(self: &Rc<Self>, host: &Host) {
        let key = host.clone();
        self.once(
            |s| &s.waking,
            key,
            |me| {
                let host = host.clone();
                async move { me.wake_now(&host).await }.boxed_local()
            },
        )
        .await
    }

    async fn wake_now(&self, host: &Host) {
        let body = serde_json::to_vec(&HostRequest { host: host.to_string(), client_ip: None }).unwrap_or_default();
        match self.waker("POST", "/v1/edge/wake", body).await {
            Ok((202, _)) => {}
            Ok((s, b)) => {
                self.platform.warn("wake refused", &EdgeError::WakerStatus(s, String::from_utf8_lossy(&b).into_owned()))
            }
            Err(e) => self.platform.warn("wake", &e),
        }
    }

    // ---------- activity ----------

    /// Records a person's traffic; at most every `activity_every_ms` the batch goes to
    /// waker in the background.
    fn note_activity(self: &Rc<Self>, cx: &P::Cx, host: &Host) {
        self.state().mark_active(host);
        self.flush_if_due(cx);
    }

    /// Sends the report in the background when the last one is `activity_every_ms` old.
    /// A Worker has no timers between requests: its reports ride on requests.
    fn flush_if_due(self: &Rc<Self>, cx: &P::Cx) {
        let state = self.state();
        let now = self.platform.now();
        if now.saturating_sub(state.last_flush.get()) >= self.settings.activity_every_ms {
            let me = self.clone();
            self.platform.spawn(cx, async move { me.flush_activity().await }.boxed_local());
        }
    }

    /// Sends the hosts that saw traffic since the last report, in one call.
    pub async fn flush_activity(&self) {
        let state = self.state();
        state.last_flush.set(self.platform.now());
        let hosts: Vec<String> = state.active.borrow_mut().drain().map(|h| h.to_string()).collect();
        let (served, refused_wakes) = state.take_counts();
        if hosts.is_empty() && served.is_empty() && refused_wakes == 0 {
            return;
        }
        let body = serde_json::to_vec(&ActivityBatch { hosts, served, refused_wakes }).unwrap_or_default();
        if let Err(e) = self.waker("POST", "/v1/edge/activity", body).await {
            self.platform.warn("activity report", &e);
        }
    }

    // ---------- proxy and hold ----------

    /// `x-wakegate-origin-signature` for a request with this head, signed now.
    fn origin_signature(&self, head: Head<'_>) -> HeaderValue {
        let now = self.platform.now();
        self.state().sign(
            &self.settings.origin_key,
            head.method,
            head.path_and_query,
            sign::UNSIGNED_PAYLOAD,
            now,
            |s| HeaderValue::from_str(s).unwrap_or(HeaderValue::from_static("")),
        )
    }

    async fn proxy(
        self: &Rc<Self>,
        cx: &P::Cx,
        req: P::Request,
        route: Rc<Route>,
        info: RequestInfo,
        signature: HeaderValue,
    ) -> P::Response {
        match self.platform.forward(cx, req, Forward { route: &route, info, signature }).await {
            Ok(resp) => {
                if info.may_wake {
                    self.note_activity(cx, &route.host);
                }
                resp
            }
            Err(Failed { error: error @ EdgeError::ClientBody(_), .. }) => self.fail(&error),
            Err(Failed { error, return_to, unsent }) => {
                // the origin may have gone to sleep under a cached route: look again and
                // show a person the page for the state it is in now (waking it if asked),
                // or hold an API client whose request never left while it wakes
                self.platform.warn("origin", &error);
                self.forget(route.host.as_str());
                if let Ok(Some(fresh)) = self.route(route.host.as_str()).await {
                    match (self.decide(&fresh.record, info), unsent) {
                        (Decision::Page { page, wake }, _) => {
                            let answer = self.page(&page, &fresh, &return_to);
                            return self.page_then_wake(cx, answer, wake.then(|| fresh.host.clone()));
                        }
                        (Decision::Hold { wake }, Some(req)) => {
                            // boxed: hold proxies in turn
                            return self.hold(cx, req, fresh, wake, info).boxed_local().await;
                        }
                        _ => {}
                    }
                }
                self.fail(&error)
            }
        }
    }

    /// API clients wait (bounded) while the preview wakes, then get the app or a 503.
    async fn hold(
        self: &Rc<Self>,
        cx: &P::Cx,
        req: P::Request,
        route: Rc<Route>,
        wake: bool,
        info: RequestInfo,
    ) -> P::Response {
        if wake {
            self.wake(&route.host).await;
        }
        let deadline = self.platform.now().saturating_add(self.settings.hold_ms);
        let mut version = route.record.version;
        loop {
            let left = deadline.saturating_sub(self.platform.now());
            if left == 0 {
                break;
            }
            match self.status(&route.host, version, left.min(STATUS_WAIT_MS)).await {
                Ok(Some(r)) => {
                    if r.status.origin().is_some() {
                        let fresh = Rc::new(Route::new(route.host.clone(), r));
                        let signature = self.origin_signature(self.platform.head(&req));
                        return self.proxy(cx, req, fresh, info, signature).await;
                    }
                    if matches!(
                        r.status,
                        RouteStatus::Failed { .. }
                            | RouteStatus::Erased { .. }
                            | RouteStatus::Gone { .. }
                            | RouteStatus::Suspended { .. }
                    ) {
                        return self.platform.respond(Answer::json(
                            503,
                            &serde_json::json!({ "state": r.status.as_str(), "preview": r.preview_id }),
                        ));
                    }
                    version = r.version;
                }
                Ok(None) => {
                    return self.platform.respond(Answer::json(404, &serde_json::json!({ "error": "no such preview" })))
                }
                Err(e) => return self.fail(&e),
            }
        }
        let a = Answer::json(503, &serde_json::json!({ "state": "waking", "preview": route.record.preview_id }));
        self.platform.respond(a.retry_after(5))
    }

    // ---------- the rebuild form ----------

    /// The confirm-to-rebuild form: POST only, CSRF token bound to the host, same-origin.
    async fn rebuild(
        self: &Rc<Self>,
        cx: &P::Cx,
        req: P::Request,
        host: Host,
        info: RequestInfo,
        origin: Option<String>,
    ) -> Result<Answer, EdgeError> {
        let client_ip = self.platform.client_ip(cx, &req);
        let body = self.platform.read_body(req, MAX_FORM).await?;
        let body = String::from_utf8_lossy(&body);
        let now = self.platform.now();
        let return_to = front::check_rebuild_form(info, origin.as_deref(), &host, &body, &self.settings.csrf_key, now)
            .map_err(|refusal| EdgeError::Forbidden(refusal.reason))?;
        let call = serde_json::to_vec(&HostRequest { host: host.to_string(), client_ip }).unwrap_or_default();
        self.forget(host.as_str());
        match self.waker("POST", "/v1/edge/rebuild", call).await? {
            (202, _) => Ok(Answer::see_other(&return_to)),
            (410, b) => {
                // the waker says why (a closed or merged merge request) when it knows
                #[derive(serde::Deserialize)]
                struct GoneBody {
                    gone: Option<GoneInfo>,
                }
                let gone = serde_json::from_slice::<GoneBody>(&b).ok().and_then(|g| g.gone).unwrap_or_default();
                Ok(Answer::page(&Page::Gone { why: gone.why, change: gone.change }, &Context::default()))
            }
            (429, _) => Err(EdgeError::TooManyRebuilds),
            (s, b) => Err(EdgeError::WakerStatus(s, String::from_utf8_lossy(&b).into_owned())),
        }
    }
}
