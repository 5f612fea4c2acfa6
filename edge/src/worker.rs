//! The Cloudflare Worker front door (wasm32 only): only platform glue; the request
//! pipeline is [`crate::pipeline`].
//!
//! * one [`Pipeline`] per isolate (`thread_local!`), built from the bindings on the
//!   first request: its route cache and activity batch live in the isolate;
//! * work after the response (the wake behind a splash page, activity reports) goes to
//!   `ctx.wait_until`;
//! * proxying is `new Request(origin + path, request)`: method, headers and the body
//!   stream go through, with the forwarding headers replaced by the edge's own (the
//!   visitor's address is `CF-Connecting-IP`); a WebSocket upgrade comes back as the
//!   origin's own 101 response, returned as it is. Hop-by-hop headers never reach a
//!   Worker (the runtime consumes them), and Cloudflare enforces its own head limits;
//! * time is `Date.now()`: nothing here reads `std::time`.
//!
//! Bindings: vars `WAKER_URL`, optional `ROUTE_CACHE_SECS`, `NEGATIVE_CACHE_SECS`,
//! `HOLD_SECS`, `ACTIVITY_SECS`; secrets `EDGE_KEY`, `CSRF_KEY`, `ORIGIN_KEY`.

use crate::answer::{Answer, EdgeError};
use crate::bots::PURPOSE_HEADERS;
use crate::cache::{CachePolicy, DEFAULT_CAPACITY, DEFAULT_NEGATIVE_TTL_MS};
use crate::pipeline::{Failed, Forward, Head, Limits, Pipeline, Platform, Settings, State};
use futures_util::future::LocalBoxFuture;
use std::cell::RefCell;
use std::rc::Rc;
use wakegate_core::sign::{self, Key};
use wakegate_core::Millis;
use wasm_bindgen::{JsCast, JsValue};
use worker::{event, Context, Date, Env, Fetch, Headers, Method, Request, RequestInit, Response, Result};

thread_local! {
    static PIPELINE: RefCell<Option<Rc<Pipeline<Workers>>>> = const { RefCell::new(None) };
}

/// Headers the pipeline may ask about; read once per request.
const READ: [&str; 7] =
    ["accept", "user-agent", "origin", "cf-connecting-ip", "content-length", "transfer-encoding", "host"];

/// Forwarding headers only the edge sets.
const CLIENT_IDENTITY: [&str; 5] =
    ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "forwarded", "x-real-ip"];

/// A Worker request with what the pipeline reads of it, owned (the runtime hands out
/// header values as new strings).
pub struct WorkerRequest {
    req: Request,
    method: String,
    path_and_query: String,
    scheme: String,
    heads: Vec<(&'static str, String)>,
}

impl WorkerRequest {
    fn new(req: Request) -> Result<WorkerRequest> {
        let url = req.url()?;
        let path_and_query = match url.query() {
            Some(q) => format!("{}?{q}", url.path()),
            None => url.path().to_string(),
        };
        let mut heads = Vec::new();
        let names = READ.iter().copied().chain(PURPOSE_HEADERS.iter().map(|(n, _, _)| *n));
        for name in names {
            if let Ok(Some(v)) = req.headers().get(name) {
                heads.push((name, v));
            }
        }
        Ok(WorkerRequest {
            method: req.method().as_ref().to_string(),
            path_and_query,
            scheme: url.scheme().to_string(),
            heads,
            req,
        })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.heads.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }
}

pub struct Workers {
    waker_url: String,
    state: State,
}

fn string_binding(env: &Env, name: &str) -> Option<String> {
    env.secret(name).ok().map(|s| s.to_string()).or_else(|| env.var(name).ok().map(|v| v.to_string()))
}

fn millis_binding(env: &Env, name: &str, default_ms: u64) -> u64 {
    string_binding(env, name)
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite() && *v > 0.0 && *v < 1e9)
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(default_ms)
}

fn pipeline(env: &Env) -> std::result::Result<Rc<Pipeline<Workers>>, String> {
    if let Some(p) = PIPELINE.with(|p| p.borrow().clone()) {
        return Ok(p);
    }
    let key =
        |name: &str| string_binding(env, name).map(|s| Key::new(s.into_bytes())).ok_or(format!("{name} is not set"));
    let settings = Settings {
        edge_key: key("EDGE_KEY")?,
        csrf_key: key("CSRF_KEY")?,
        origin_key: key("ORIGIN_KEY")?,
        cache: CachePolicy {
            route_ttl_ms: millis_binding(env, "ROUTE_CACHE_SECS", 2_000),
            negative_ttl_ms: millis_binding(env, "NEGATIVE_CACHE_SECS", DEFAULT_NEGATIVE_TTL_MS),
            capacity: DEFAULT_CAPACITY,
        },
        hold_ms: millis_binding(env, "HOLD_SECS", 30_000),
        activity_every_ms: millis_binding(env, "ACTIVITY_SECS", 1_000),
        limits: Limits::default(),
    };
    let waker_url = string_binding(env, "WAKER_URL").ok_or("WAKER_URL is not set")?.trim_end_matches('/').to_string();
    let prefix = (js_sys::Math::random() * 9.0e15) as u64 ^ Date::now().as_millis();
    let state = State::new(settings.cache, prefix);
    let p = Pipeline::new(Workers { waker_url, state }, settings);
    PIPELINE.with(|slot| *slot.borrow_mut() = Some(p.clone()));
    Ok(p)
}

fn js_error(e: JsValue) -> String {
    format!("{e:?}")
}

impl Platform for Workers {
    type Request = WorkerRequest;
    type Response = Response;
    type Cx = Context;

    fn now(&self) -> Millis {
        Date::now().as_millis()
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn head<'r>(&self, req: &'r WorkerRequest) -> Head<'r> {
        let host = req.get("host");
        Head {
            method: &req.method,
            path_and_query: &req.path_and_query,
            host,
            host_headers: usize::from(host.is_some()),
            authority: None,
            head_bytes: 0,
            has_body: req.get("transfer-encoding").is_some() || req.get("content-length").is_some_and(|l| l != "0"),
        }
    }

    fn header<'r>(&self, req: &'r WorkerRequest, name: &str) -> Option<&'r str> {
        req.get(name)
    }

    fn client_ip(&self, _cx: &Context, req: &WorkerRequest) -> Option<String> {
        req.get("cf-connecting-ip").map(str::to_string)
    }

    async fn call_waker(
        &self,
        method: &'static str,
        path: &str,
        signature: &str,
        body: Vec<u8>,
    ) -> std::result::Result<(u16, Vec<u8>), EdgeError> {
        let call = async {
            let headers = Headers::new();
            headers.set(sign::SIGNATURE_HEADER, signature)?;
            headers.set("content-type", "application/json")?;
            let mut init = RequestInit::new();
            init.with_method(if method == "POST" { Method::Post } else { Method::Get }).with_headers(headers);
            if !body.is_empty() {
                init.with_body(Some(js_sys::Uint8Array::from(body.as_slice()).into()));
            }
            let req = Request::new_with_init(&format!("{}{}", self.waker_url, path), &init)?;
            let mut resp = Fetch::Request(req).send().await?;
            Ok::<_, worker::Error>((resp.status_code(), resp.bytes().await?))
        };
        call.await.map_err(|e| EdgeError::Waker(e.to_string()))
    }

    async fn read_body(&self, mut req: WorkerRequest, limit: usize) -> std::result::Result<Vec<u8>, EdgeError> {
        if req.get("content-length").and_then(|l| l.parse::<usize>().ok()).is_some_and(|l| l > limit) {
            return Err(EdgeError::BodyTooLarge(limit));
        }
        let body = req.req.bytes().await.map_err(|e| EdgeError::ClientBody(e.to_string()))?;
        if body.len() > limit {
            return Err(EdgeError::BodyTooLarge(limit));
        }
        Ok(body)
    }

    async fn forward(
        &self,
        _cx: &Context,
        req: WorkerRequest,
        to: Forward<'_>,
    ) -> std::result::Result<Response, Failed<WorkerRequest>> {
        let fail = |error: EdgeError| Failed { error, return_to: req.path_and_query.clone(), unsent: None };
        let Some(origin) = to.route.origin.as_ref() else {
            return Err(fail(EdgeError::Origin("the route names no valid origin".into())));
        };
        // `new Request(url, request)`: same method, headers, body stream and redirect mode
        let init: &web_sys::RequestInit = req.req.inner().unchecked_ref();
        let out = web_sys::Request::new_with_str_and_init(&format!("{}{}", origin.base, req.path_and_query), init)
            .map_err(|e| fail(EdgeError::Origin(js_error(e))))?;
        let headers = out.headers();
        let edit = || -> std::result::Result<(), JsValue> {
            for h in CLIENT_IDENTITY {
                headers.delete(h)?;
            }
            if let Some(ip) = req.get("cf-connecting-ip") {
                headers.set("x-forwarded-for", ip)?;
                headers.set("x-real-ip", ip)?;
                let node = if ip.contains(':') { format!("\"[{ip}]\"") } else { ip.to_string() };
                headers.set("forwarded", &format!("for={node};proto={}", req.scheme))?;
            }
            headers.set("x-forwarded-host", to.route.host.as_str())?;
            headers.set("x-forwarded-proto", &req.scheme)?;
            headers.set(sign::ORIGIN_SIGNATURE_HEADER, to.signature.to_str().unwrap_or(""))?;
            Ok(())
        };
        edit().map_err(|e| fail(EdgeError::Origin(js_error(e))))?;
        // a WebSocket upgrade is the origin's 101 with its socket: returned as it is
        match Fetch::Request(out.into()).send().await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                let error = EdgeError::Origin(e.to_string());
                // a request without a body is left whole by `new Request(url, request)`,
                // so the pipeline may still hold it while the preview wakes (the pipeline
                // refuses GET and HEAD bodies before this); a body stream went to fetch
                let bodiless = req.method == "GET" || req.method == "HEAD";
                let return_to = req.path_and_query.clone();
                Err(Failed { error, return_to, unsent: bodiless.then_some(req) })
            }
        }
    }

    fn respond(&self, answer: Answer) -> Response {
        to_response(answer)
    }

    fn respond_then(&self, cx: &Context, answer: Answer, after: LocalBoxFuture<'static, ()>) -> Response {
        cx.wait_until(after);
        self.respond(answer)
    }

    fn spawn(&self, cx: &Context, work: LocalBoxFuture<'static, ()>) {
        cx.wait_until(work);
    }

    fn shares_io_between_requests(&self) -> bool {
        false
    }

    fn warn(&self, what: &str, error: &EdgeError) {
        worker::console_warn!("{what}: {error}");
    }
}

#[event(fetch)]
pub async fn fetch(req: Request, env: Env, ctx: Context) -> Result<Response> {
    let pipeline = match pipeline(&env) {
        Ok(p) => p,
        Err(e) => {
            return Ok(to_response(Answer::message(500, format!("This edge is misconfigured: {e}."))));
        }
    };
    let req = WorkerRequest::new(req)?;
    Ok(pipeline.handle(&ctx, req).await)
}

/// An [`Answer`] as a Workers response.
fn to_response(answer: Answer) -> Response {
    let headers = Headers::new();
    for (k, v) in &answer.headers {
        let _ = headers.set(k, v);
    }
    Response::builder().with_status(answer.status).with_headers(headers).fixed(answer.body.into_bytes())
}
