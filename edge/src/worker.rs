//! The edge as a Cloudflare Worker (wasm32 only). Same `decide`, pages, signing and cache
//! policy as the native edge; I/O through the Workers runtime:
//!
//! * the route cache and the activity batch live in the isolate (`thread_local!`): each
//!   isolate caches running routes for `ROUTE_CACHE_SECS`, like the native edge;
//! * the splash page is returned first and the wake is fired with `ctx.wait_until`;
//! * proxying is `new Request(origin + path, request)`: method, headers and the body
//!   stream go through untouched, and a WebSocket upgrade comes back as the origin's own
//!   101 response, returned as it is;
//! * time is `Date.now()`: nothing here reads `std::time`.
//!
//! Bindings: vars `WAKER_URL`, optional `ROUTE_CACHE_SECS`, `HOLD_SECS`,
//! `ACTIVITY_SECS`; secrets `EDGE_KEY`, `CSRF_KEY`, `ORIGIN_KEY`.

use crate::front::{self, context, status_json, MAX_FORM, STATUS_WAIT_MS};
use crate::{decide, Decision, RequestInfo, RESERVED_PREFIX};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use wakegate_core::host::{normalize_host, Host};
use wakegate_core::route::{ActivityBatch, HostRequest, RouteRecord, RouteStatus};
use wakegate_core::sign::{self, Key};
use wakegate_core::{form, Millis};
use wakegate_splash::{render, Page};
use wasm_bindgen::{JsCast, JsValue};
use worker::{event, Context, Date, Env, Fetch, Headers, Method, Request, RequestInit, Response, Result};

thread_local! {
    static ROUTES: RefCell<HashMap<Host, (RouteRecord, Millis)>> = RefCell::new(HashMap::new());
    static ACTIVE: RefCell<(HashSet<String>, Millis)> = RefCell::new((HashSet::new(), 0));
    static COUNTER: Cell<u64> = const { Cell::new(0) };
    // bindings cannot change within an isolate: read them once, not per request
    static CONFIG: RefCell<Option<Cfg>> = const { RefCell::new(None) };
}

#[derive(Clone)]
struct Cfg {
    waker_url: String,
    edge_key: Key,
    csrf_key: Key,
    origin_key: Key,
    route_ttl_ms: u64,
    hold_ms: u64,
    activity_every_ms: u64,
}

fn string_binding(env: &Env, name: &str) -> Option<String> {
    env.secret(name).ok().map(|s| s.to_string()).or_else(|| env.var(name).ok().map(|v| v.to_string()))
}

fn millis_binding(env: &Env, name: &str, default_secs: f64) -> u64 {
    let secs =
        string_binding(env, name).and_then(|v| v.parse::<f64>().ok()).filter(|v| *v > 0.0).unwrap_or(default_secs);
    (secs * 1000.0) as u64
}

impl Cfg {
    fn from_env(env: &Env) -> std::result::Result<Cfg, String> {
        let key = |name: &str| {
            string_binding(env, name).map(|s| Key::new(s.into_bytes())).ok_or(format!("{name} is not set"))
        };
        Ok(Cfg {
            waker_url: string_binding(env, "WAKER_URL")
                .ok_or("WAKER_URL is not set")?
                .trim_end_matches('/')
                .to_string(),
            edge_key: key("EDGE_KEY")?,
            csrf_key: key("CSRF_KEY")?,
            origin_key: key("ORIGIN_KEY")?,
            route_ttl_ms: millis_binding(env, "ROUTE_CACHE_SECS", 2.0),
            hold_ms: millis_binding(env, "HOLD_SECS", 30.0),
            activity_every_ms: millis_binding(env, "ACTIVITY_SECS", 1.0),
        })
    }
}

fn now() -> Millis {
    Date::now().as_millis()
}

/// Unique per request; the HMAC provides authenticity, the nonce only uniqueness.
fn nonce() -> String {
    let n = COUNTER.with(|c| {
        c.set(c.get() + 1);
        c.get()
    });
    format!("{:x}{:x}{:x}", now(), n, (js_sys::Math::random() * 1e15) as u64)
}

fn header(req: &Request, name: &str) -> Option<String> {
    req.headers().get(name).ok().flatten()
}

fn page(p: &Page, cx: &wakegate_splash::Context<'_>) -> Result<Response> {
    let headers = Headers::new();
    for (k, v) in front::page_headers(p) {
        headers.set(k, v)?;
    }
    Ok(Response::from_html(render(p, cx))?.with_status(p.status()).with_headers(headers))
}

fn plain_page(status: u16, reason: &str) -> Result<Response> {
    Ok(page(&Page::BadRequest { reason: reason.to_string() }, &Default::default())?.with_status(status))
}

fn json(status: u16, v: &serde_json::Value, retry_after: Option<u32>) -> Result<Response> {
    let headers = Headers::new();
    headers.set("content-type", "application/json")?;
    headers.set("cache-control", "no-store")?;
    if let Some(s) = retry_after {
        headers.set("retry-after", &s.to_string())?;
    }
    Ok(Response::ok(v.to_string())?.with_status(status).with_headers(headers))
}

/// The one place failures to reach waker or an origin become answers.
fn unavailable(what: &str, e: impl std::fmt::Display) -> Result<Response> {
    worker::console_warn!("{what}: {e}");
    let (status, reason) = if what == "origin" {
        (502, "The preview did not answer. Try again in a moment.")
    } else {
        (503, "Wakegate's control plane is not answering. Try again in a moment.")
    };
    let mut r = plain_page(status, reason)?;
    r.headers_mut().set("retry-after", "5")?;
    Ok(r)
}

async fn waker(cfg: &Cfg, method: Method, path: &str, body: String) -> Result<(u16, String)> {
    let sig = sign::sign(&cfg.edge_key, method.as_ref(), path, &sign::body_digest(body.as_bytes()), now(), &nonce());
    let headers = Headers::new();
    headers.set(sign::SIGNATURE_HEADER, &sig)?;
    headers.set("content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(headers);
    if !body.is_empty() {
        init.with_body(Some(JsValue::from_str(&body)));
    }
    let req = Request::new_with_init(&format!("{}{}", cfg.waker_url, path), &init)?;
    let mut resp = Fetch::Request(req).send().await?;
    Ok((resp.status_code(), resp.text().await?))
}

async fn waker_record(cfg: &Cfg, path: &str) -> Result<Option<RouteRecord>> {
    match waker(cfg, Method::Get, path, String::new()).await? {
        (200, body) => serde_json::from_str(&body).map(Some).map_err(|e| worker::Error::RustError(e.to_string())),
        (404, _) => Ok(None),
        (s, body) => Err(worker::Error::RustError(format!("waker answered {s}: {body}"))),
    }
}

async fn route(cfg: &Cfg, host: &Host) -> Result<Option<RouteRecord>> {
    let t = now();
    if let Some(r) = ROUTES.with(|c| c.borrow().get(host).filter(|(_, exp)| *exp > t).map(|(r, _)| r.clone())) {
        return Ok(Some(r));
    }
    let record = waker_record(cfg, &format!("/v1/edge/route?host={host}")).await?;
    ROUTES.with(|c| {
        let mut c = c.borrow_mut();
        match &record {
            Some(r) if matches!(r.status, RouteStatus::Running { .. }) => {
                c.insert(host.clone(), (r.clone(), t + cfg.route_ttl_ms));
            }
            _ => {
                c.remove(host);
            }
        }
    });
    Ok(record)
}

fn forget(host: &Host) {
    ROUTES.with(|c| c.borrow_mut().remove(host));
}

async fn wake(cfg: &Cfg, host: &Host) {
    let body = serde_json::to_string(&HostRequest { host: host.to_string(), client_ip: None }).unwrap_or_default();
    if let Err(e) = waker(cfg, Method::Post, "/v1/edge/wake", body).await {
        worker::console_warn!("wake {host}: {e}");
    }
}

/// Records activity; at most every `ACTIVITY_SECS` the batch goes to waker in the
/// background.
fn mark_active(cfg: &Cfg, ctx: &Context, host: &Host) {
    let t = now();
    let batch = ACTIVE.with(|a| {
        let mut a = a.borrow_mut();
        a.0.insert(host.to_string());
        if t.saturating_sub(a.1) >= cfg.activity_every_ms {
            a.1 = t;
            Some(std::mem::take(&mut a.0).into_iter().collect::<Vec<_>>())
        } else {
            None
        }
    });
    if let Some(hosts) = batch {
        let cfg = cfg.clone();
        ctx.wait_until(async move {
            let body = serde_json::to_string(&ActivityBatch { hosts }).unwrap_or_default();
            if let Err(e) = waker(&cfg, Method::Post, "/v1/edge/activity", body).await {
                worker::console_warn!("activity: {e}");
            }
        });
    }
}

async fn proxy(
    cfg: &Cfg,
    ctx: &Context,
    req: &Request,
    host: &Host,
    origin: &str,
    info: RequestInfo,
) -> Result<Response> {
    let url = req.url()?;
    let pq = path_and_query(&url);
    // `new Request(url, request)`: same method, headers, body stream and redirect mode
    let init: &web_sys::RequestInit = req.inner().unchecked_ref();
    let out = web_sys::Request::new_with_str_and_init(&format!("{origin}{pq}"), init)
        .map_err(|e| worker::Error::RustError(format!("{e:?}")))?;
    let headers = out.headers();
    let set = |k: &str, v: &str| headers.set(k, v).map_err(|e| worker::Error::RustError(format!("{e:?}")));
    // hop-by-hop headers (and any a client names in `Connection`) never reach a Worker:
    // the runtime consumes them
    let client_ip = header(req, "cf-connecting-ip").unwrap_or_default();
    let xff = match header(req, "x-forwarded-for") {
        Some(prev) if !client_ip.is_empty() => format!("{prev}, {client_ip}"),
        Some(prev) => prev,
        None => client_ip,
    };
    if !xff.is_empty() {
        set("x-forwarded-for", &xff)?;
    }
    set("x-forwarded-host", host.as_str())?;
    set("x-forwarded-proto", url.scheme())?;
    let sig = sign::sign(&cfg.origin_key, req.method().as_ref(), &pq, sign::UNSIGNED_PAYLOAD, now(), &nonce());
    set(sign::ORIGIN_SIGNATURE_HEADER, &sig)?;
    match Fetch::Request(out.into()).send().await {
        Ok(resp) => {
            if !info.is_bot {
                mark_active(cfg, ctx, host);
            }
            // a WebSocket upgrade is the origin's 101 with its socket: returned as it is
            Ok(resp)
        }
        Err(e) => {
            // the origin may have gone to sleep under a cached route: look again, and show
            // the page (and start the wake) for the state it is in now
            forget(host);
            if let Ok(Some(fresh)) = route(cfg, host).await {
                if let Decision::Page { page: kind, wake: wake_it } = decide(&fresh, info) {
                    return page_then_wake(cfg, ctx, &kind, wake_it, host, &fresh, &pq);
                }
            }
            unavailable("origin", e)
        }
    }
}

fn path_and_query(url: &worker::Url) -> String {
    match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    }
}

/// A splash page; when `wake`, the wake runs after the response, outside the request.
fn page_then_wake(
    cfg: &Cfg,
    ctx: &Context,
    kind: &crate::PageKind,
    wake_it: bool,
    host: &Host,
    route: &RouteRecord,
    return_to: &str,
) -> Result<Response> {
    let p = front::page_for(kind, host, &cfg.csrf_key, now());
    let resp = page(&p, &context(route, return_to));
    if wake_it {
        let cfg = cfg.clone();
        let host = host.clone();
        ctx.wait_until(async move { wake(&cfg, &host).await });
    }
    resp
}

async fn hold(
    cfg: &Cfg,
    ctx: &Context,
    req: &Request,
    host: &Host,
    route: &RouteRecord,
    wake_first: bool,
    info: RequestInfo,
) -> Result<Response> {
    if wake_first {
        wake(cfg, host).await;
    }
    let deadline = now() + cfg.hold_ms;
    let mut version = route.version;
    while now() < deadline {
        let wait = (deadline - now()).min(STATUS_WAIT_MS);
        match waker_record(cfg, &format!("/v1/edge/status?host={host}&after={version}&wait={wait}")).await {
            Ok(Some(r)) => {
                if let Some(origin) = r.status.origin() {
                    return proxy(cfg, ctx, req, host, origin, info).await;
                }
                if matches!(r.status, RouteStatus::Failed { .. } | RouteStatus::Erased { .. } | RouteStatus::Gone) {
                    return json(
                        503,
                        &serde_json::json!({ "state": r.status.as_str(), "preview": r.preview_id }),
                        None,
                    );
                }
                version = r.version;
            }
            Ok(None) => return json(404, &serde_json::json!({ "error": "no such preview" }), None),
            Err(e) => return unavailable("waker", e),
        }
    }
    json(503, &serde_json::json!({ "state": "waking", "preview": route.preview_id }), Some(5))
}

async fn reserved(cfg: &Cfg, mut req: Request, host: &Host) -> Result<Response> {
    let url = req.url()?;
    match (req.method(), url.path().trim_start_matches(RESERVED_PREFIX)) {
        (Method::Get, "status") => {
            let pairs = form::parse_pairs(url.query().unwrap_or(""));
            let after: u64 = form::get(&pairs, "after").and_then(|v| v.parse().ok()).unwrap_or(0);
            match waker_record(cfg, &format!("/v1/edge/status?host={host}&after={after}&wait={STATUS_WAIT_MS}")).await {
                Ok(Some(r)) => json(200, &status_json(&r), None),
                Ok(None) => json(404, &serde_json::json!({ "error": "no such preview" }), None),
                Err(e) => unavailable("waker", e),
            }
        }
        (Method::Post, "rebuild") => {
            let info = front::request_info(|n| header(&req, n));
            let origin = header(&req, "origin");
            let too_large =
                header(&req, "content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > MAX_FORM);
            let body = if too_large { None } else { Some(req.text().await?) };
            let Some(body) = body.filter(|b| b.len() <= MAX_FORM) else {
                return plain_page(413, "The form is too large.");
            };
            let return_to = match front::check_rebuild_form(info, origin.as_deref(), host, &body, &cfg.csrf_key, now())
            {
                Ok(r) => r,
                Err(refusal) => return plain_page(refusal.status, &refusal.reason),
            };
            let client_ip = header(&req, "cf-connecting-ip");
            let call = serde_json::to_string(&HostRequest { host: host.to_string(), client_ip }).unwrap_or_default();
            forget(host);
            match waker(cfg, Method::Post, "/v1/edge/rebuild", call).await {
                Ok((202, _)) => {
                    let headers = Headers::new();
                    headers.set("location", &return_to)?;
                    headers.set("cache-control", "no-store")?;
                    Ok(Response::empty()?.with_status(303).with_headers(headers))
                }
                Ok((410, _)) => page(&Page::Gone, &Default::default()),
                Ok((429, _)) => plain_page(429, "Too many rebuilds were asked for. Try again later."),
                Ok((s, b)) => unavailable("waker", format!("{s}: {b}")),
                Err(e) => unavailable("waker", e),
            }
        }
        _ => json(404, &serde_json::json!({ "error": "no such endpoint" }), None),
    }
}

#[event(fetch)]
pub async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let cached = CONFIG.with(|c| c.borrow().clone());
    let cfg = match cached {
        Some(c) => c,
        None => match Cfg::from_env(&env) {
            Ok(c) => {
                CONFIG.with(|slot| *slot.borrow_mut() = Some(c.clone()));
                c
            }
            Err(e) => return plain_page(500, &format!("This edge is misconfigured: {e}.")),
        },
    };
    let url = req.url()?;
    let raw_host = header(&req, "host").or_else(|| url.host_str().map(str::to_string)).unwrap_or_default();
    let host = match normalize_host(&raw_host) {
        Ok(h) => h,
        Err(e) => return plain_page(400, &format!("The host name is not valid: {e}.")),
    };
    if url.path().starts_with(RESERVED_PREFIX) {
        return reserved(&cfg, req, &host).await;
    }
    let info = front::request_info(|n| header(&req, n));
    let route = match route(&cfg, &host).await {
        Ok(Some(r)) => r,
        Ok(None) => return page(&Page::NotFound { host: host.to_string() }, &Default::default()),
        Err(e) => return unavailable("waker", e),
    };
    match decide(&route, info) {
        Decision::Proxy { origin } => proxy(&cfg, &ctx, &req, &host, &origin, info).await,
        Decision::Page { page: kind, wake: wake_it } => {
            page_then_wake(&cfg, &ctx, &kind, wake_it, &host, &route, &path_and_query(&url))
        }
        Decision::Hold { wake: wake_first } => hold(&cfg, &ctx, &req, &host, &route, wake_first, info).await,
        Decision::Unavailable { status, retry_after, state } => {
            json(status, &serde_json::json!({ "state": state, "preview": route.preview_id }), retry_after)
        }
    }
}
