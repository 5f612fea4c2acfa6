//! The native front door's [`Platform`]: hyper requests in, hyper responses out; origin
//! and waker calls on one per-thread connection pool; work after a response on the
//! thread's `LocalSet`.
//!
//! Forwarding edits the client's header map in place (no copies): hop-by-hop headers and
//! any the client names in `Connection` go, except that `Host` and the edge's own
//! headers can never be removed that way; `X-Forwarded-For/-Proto/-Host`, `Forwarded`
//! and `X-Real-IP` are the edge's own unless the peer is a trusted proxy. A client body
//! that breaks off or is malformed is the client's error (400), not the origin's (502).

use super::body::{ClientBody, OutBody, ResponseBody};
use super::pool::{Pool, PooledBody};
use super::{ConnInfo, EdgeConfig};
use crate::answer::{Answer, EdgeError};
use crate::pipeline::{Failed, Forward, Head, Platform, Served, State};
use bytes::Bytes;
use futures_util::future::LocalBoxFuture;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::warn;
use wakegate_core::sign;
use wakegate_core::Millis;

/// Longest a waker call may take (the status long-poll is 25 s of it).
const WAKER_TIMEOUT: Duration = Duration::from_secs(35);

pub struct Native {
    pub(super) cfg: std::sync::Arc<EdgeConfig>,
    pub(super) pool: Rc<Pool>,
    pub(super) waker: WakerAddr,
    pub(super) state: State,
    pub(super) metrics: Metrics,
    pub(super) spin: Rc<super::spin::Spin>,
}

/// The native edge's metric handles, looked up once per thread (the recorder is
/// installed before the edge starts; without one they cost nothing).
pub(super) struct Metrics {
    seconds: [metrics::Histogram; Served::ALL.len()],
    requests: [metrics::Counter; Served::ALL.len()],
    refused: metrics::Counter,
}

impl Metrics {
    pub(super) fn new() -> Metrics {
        use wakegate_core::metrics as m;
        Metrics {
            seconds: Served::ALL.map(|s| metrics::histogram!(m::EDGE_REQUEST_SECONDS, "answer" => s.as_str())),
            requests: Served::ALL
                .map(|s| metrics::counter!(m::EDGE_REQUESTS, "edge" => "native", "answer" => s.as_str())),
            refused: metrics::counter!(m::BOTS_REFUSED, "edge" => "native"),
        }
    }
}

/// Where the waker is, parsed once: scheme, authority (also the `Host` sent) and any
/// path prefix.
#[derive(Clone)]
pub(super) struct WakerAddr {
    scheme: Scheme,
    authority: Authority,
    host: HeaderValue,
    prefix: String,
}

impl WakerAddr {
    pub(super) fn parse(url: &str) -> Result<WakerAddr, String> {
        let uri: Uri = url.parse().map_err(|e| format!("waker URL {url:?}: {e}"))?;
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
            return Err(format!("waker URL {url:?} is not absolute"));
        };
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| format!("waker URL {url:?}: {e}"))?;
        Ok(WakerAddr { scheme, authority, host, prefix: uri.path().trim_end_matches('/').to_string() })
    }
}

/// The thread's pool of connections to origins and the waker.
pub(super) fn pool() -> Rc<Pool> {
    Pool::new(Duration::from_secs(5), Duration::from_secs(60), 256)
}

static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Headers that say who the client is, which only the edge (or a trusted proxy) sets.
static CLIENT_IDENTITY: [HeaderName; 5] = [
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-host"),
    header::FORWARDED,
    HeaderName::from_static("x-real-ip"),
];

/// The names the pipeline looks up on every request (the bot check's among them), made
/// once: a lookup by `&str` parses the name first, each time.
fn known_name(name: &str) -> Option<&'static HeaderName> {
    static SEC_PURPOSE: HeaderName = HeaderName::from_static("sec-purpose");
    static PURPOSE: HeaderName = HeaderName::from_static("purpose");
    static X_MOZ: HeaderName = HeaderName::from_static("x-moz");
    static X_PURPOSE: HeaderName = HeaderName::from_static("x-purpose");
    Some(match name {
        "user-agent" => &header::USER_AGENT,
        "accept" => &header::ACCEPT,
        "origin" => &header::ORIGIN,
        "sec-purpose" => &SEC_PURPOSE,
        "purpose" => &PURPOSE,
        "x-moz" => &X_MOZ,
        "x-purpose" => &X_PURPOSE,
        _ => return None,
    })
}

fn is_protected(n: &HeaderName) -> bool {
    n == header::HOST || n.as_str().starts_with("x-wakegate") || CLIENT_IDENTITY.contains(n)
}

/// Removes hop-by-hop headers, including any named by `Connection` (but never `Host`,
/// the forwarding headers or the edge's own). `Upgrade` stays only for upgrades.
///
/// One look over the names finds which are there (most messages carry none, or only
/// `Connection: keep-alive`), and only those are removed: a removal by name hashes and
/// probes the map, and this runs twice on every proxied request.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut has_upgrade = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        } else if name == header::UPGRADE {
            has_upgrade = true;
        }
    }
    // HOP_BY_HOP[0] is `Connection`
    if present[0] {
        // `Connection` may name other headers; those it names that are removed anyway
        // (or are the upgrade's own) need no parsing
        let mut named: Vec<HeaderName> = Vec::new();
        for token in
            headers.get_all(header::CONNECTION).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(','))
        {
            let token = token.trim();
            if token.eq_ignore_ascii_case("upgrade")
                || HOP_BY_HOP.iter().any(|h| token.eq_ignore_ascii_case(h.as_str()))
            {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                if !is_protected(&n) {
                    named.push(n);
                }
            }
        }
        for n in named {
            headers.remove(n);
        }
    }
    for (h, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, there)| *there) {
        headers.remove(h);
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else if has_upgrade {
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

impl Native {
    /// Sets the forwarding headers: the edge's own, or appended to a trusted proxy's.
    fn forwarding(&self, headers: &mut HeaderMap, conn: &ConnInfo, route_host: &HeaderValue) {
        let [xff, proto, xfh, forwarded, real_ip] = &CLIENT_IDENTITY;
        if conn.trusted {
            let appended = match headers.get(xff).and_then(|v| v.to_str().ok()) {
                Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", conn.peer.ip())).ok(),
                None => Some(conn.ip_value.clone()),
            };
            if let Some(v) = appended {
                headers.insert(xff, v);
            }
            if !headers.contains_key(proto) {
                headers.insert(proto, HeaderValue::from_static(self.cfg.scheme));
            }
            if !headers.contains_key(xfh) {
                headers.insert(xfh, route_host.clone());
            }
            if !headers.contains_key(forwarded) {
                headers.insert(forwarded, conn.forwarded.clone());
            }
            return;
        }
        // each insert replaces every value the client sent under that name
        headers.insert(xff, conn.ip_value.clone());
        headers.insert(real_ip, conn.ip_value.clone());
        headers.insert(proto, HeaderValue::from_static(self.cfg.scheme));
        headers.insert(xfh, route_host.clone());
        headers.insert(forwarded, conn.forwarded.clone());
    }

    fn finish(
        &self,
        mut resp: Response<PooledBody>,
        to: &Forward<'_>,
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ResponseBody> {
        self.spin.touch();
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let origin_upgrade = hyper::upgrade::on(&mut resp);
                let host = to.route.host.clone();
                let person = to.info.may_wake;
                let every = self.cfg.activity_every;
                tokio::task::spawn_local(async move {
                    let (Ok(client), Ok(origin)) = (client_upgrade.await, origin_upgrade.await) else {
                        return;
                    };
                    let mut client = TokioIo::new(client);
                    let mut origin = TokioIo::new(origin);
                    let copy = tokio::io::copy_bidirectional(&mut client, &mut origin);
                    tokio::pin!(copy);
                    // a long-lived socket is activity for as long as it stays open
                    loop {
                        tokio::select! {
                            _ = &mut copy => break,
                            _ = tokio::time::sleep(every) => {
                                if person {
                                    super::with_state(|s| s.mark_active(&host));
                                }
                            }
                        }
                    }
                });
                let (parts, _) = resp.into_parts();
                return Response::from_parts(parts, ResponseBody::Empty);
            }
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        Response::from_parts(parts, ResponseBody::Origin(body))
    }
}

impl Platform for Native {
    type Request = Request<Incoming>;
    type Response = Response<ResponseBody>;
    type Cx = ConnInfo;

    fn now(&self) -> Millis {
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
    }

    fn state(&self) -> &State {
        &self.state
    }

    fn head<'r>(&self, req: &'r Request<Incoming>) -> Head<'r> {
        let headers = req.headers();
        let mut hosts = headers.get_all(header::HOST).iter();
        // non-ASCII names (IDNA) arrive as UTF-8 bytes, which `to_str` refuses
        let host = hosts.next().and_then(|v| std::str::from_utf8(v.as_bytes()).ok());
        let host_headers = usize::from(host.is_some()) + hosts.count();
        let head_bytes = headers.iter().map(|(n, v)| n.as_str().len() + v.len()).sum();
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || headers.get(header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() != b"0");
        Head {
            method: req.method().as_str(),
            path_and_query: req.uri().path_and_query().map(PathAndQuery::as_str).unwrap_or("/"),
            host,
            host_headers,
            authority: req.uri().authority().map(|a| a.as_str()),
            head_bytes,
            has_body,
        }
    }

    fn header<'r>(&self, req: &'r Request<Incoming>, name: &str) -> Option<&'r str> {
        let value = match known_name(name) {
            Some(known) => req.headers().get(known),
            None => req.headers().get(name),
        };
        value.and_then(|v| v.to_str().ok())
    }

    fn client_ip(&self, cx: &ConnInfo, req: &Request<Incoming>) -> Option<String> {
        if cx.trusted {
            // the first address a trusted proxy reports is the visitor's
            let xff = req.headers().get(&CLIENT_IDENTITY[0]).and_then(|v| v.to_str().ok());
            if let Some(first) = xff.and_then(|v| v.split(',').next()) {
                if let Ok(ip) = first.trim().parse::<std::net::IpAddr>() {
                    return Some(ip.to_string());
                }
            }
        }
        Some(cx.peer.ip().to_string())
    }

    async fn call_waker(
        &self,
        method: &'static str,
        path: &str,
        signature: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), EdgeError> {
        let w = &self.waker;
        let req = Request::builder()
            .method(Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET))
            .uri(format!("{}{}", w.prefix, path))
            .header(header::HOST, w.host.clone())
            .header(sign::SIGNATURE_HEADER, signature)
            .header(header::CONTENT_TYPE, "application/json")
            .body(OutBody::Full(Full::new(Bytes::from(body))))
            .map_err(|e| EdgeError::Waker(e.to_string()))?;
        let resp = tokio::time::timeout(WAKER_TIMEOUT, self.pool.send(&w.scheme, &w.authority, req))
            .await
            .map_err(|_| EdgeError::Waker("timed out".into()))?
            .map_err(|e| EdgeError::Waker(e.error.to_string()))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), wakegate_core::route::MAX_API_BODY)
            .collect()
            .await
            .map_err(|e| EdgeError::Waker(e.to_string()))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn read_body(&self, req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, EdgeError> {
        match Limited::new(req.into_body(), limit).collect().await {
            Ok(b) => Ok(b.to_bytes().to_vec()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(EdgeError::BodyTooLarge(limit)),
            Err(e) => Err(EdgeError::ClientBody(e.to_string())),
        }
    }

    async fn forward(
        &self,
        cx: &ConnInfo,
        req: Request<Incoming>,
        to: Forward<'_>,
    ) -> Result<Self::Response, Failed<Request<Incoming>>> {
        let (mut parts, body) = req.into_parts();
        let pq = parts.uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/"));
        let fail =
            |error: EdgeError, pq: &PathAndQuery| Failed { error, return_to: pq.as_str().to_string(), unsent: None };
        let Some(origin) = to.route.origin.as_ref() else {
            return Err(fail(EdgeError::Origin("the route names no valid origin".into()), &pq));
        };
        let upgrade = is_upgrade(&parts.headers);
        let client_upgrade = if upgrade {
            let mut shell = Request::from_parts(parts, ());
            let on = hyper::upgrade::on(&mut shell);
            parts = shell.into_parts().0;
            Some(on)
        } else {
            None
        };
        let uri = Uri::from(pq.clone());
        // the client's headers move to the origin request, edited in place: no copies
        let mut headers = std::mem::take(&mut parts.headers);
        strip_hop_by_hop(&mut headers, upgrade);
        self.forwarding(&mut headers, cx, &to.route.host_value);
        headers.insert(sign::ORIGIN_SIGNATURE_HEADER, to.signature.clone());
        if !headers.contains_key(header::HOST) {
            // an absolute-form request without `Host`: the origin still sees the public host
            headers.insert(header::HOST, to.route.host_value.clone());
        }
        let (body, broken) = ClientBody::watch(body);
        let mut out = Request::new(OutBody::Client(body));
        *out.method_mut() = parts.method;
        *out.uri_mut() = uri;
        *out.version_mut() = http::Version::HTTP_11;
        *out.headers_mut() = headers;
        match self.pool.send(&origin.scheme, &origin.authority, out).await {
            Ok(resp) => Ok(self.finish(resp, &to, client_upgrade)),
            Err(e) if broken.load(Ordering::Relaxed) => Err(fail(EdgeError::ClientBody(e.error.to_string()), &pq)),
            Err(e) => {
                // a request that never left can be held and sent again (the edge's own
                // headers are set afresh then); not an upgrade, whose handle is taken,
                // nor a trusted proxy's, whose X-Forwarded-For would grow twice
                let unsent = e.unsent.filter(|_| client_upgrade.is_none() && !cx.trusted).and_then(|r| {
                    let (parts, body) = r.into_parts();
                    match body {
                        OutBody::Client(b) => Some(Request::from_parts(parts, b.into_inner())),
                        OutBody::Full(_) => None,
                    }
                });
                Err(Failed { unsent, ..fail(EdgeError::Origin(e.error.to_string()), &pq) })
            }
        }
    }

    fn respond(&self, answer: Answer) -> Self::Response {
        response(answer, |b| ResponseBody::Full(Full::new(b)))
    }

    fn respond_then(&self, _cx: &ConnInfo, answer: Answer, after: LocalBoxFuture<'static, ()>) -> Self::Response {
        let (tx, rx) = tokio::sync::oneshot::channel();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), rx).await;
            after.await;
        });
        response(answer, |b| ResponseBody::AfterSent(super::body::AfterSent::new(b, tx)))
    }

    fn spawn(&self, _cx: &ConnInfo, work: LocalBoxFuture<'static, ()>) {
        tokio::task::spawn_local(work);
    }

    fn warn(&self, what: &str, error: &EdgeError) {
        warn!(error = %error, "{what}");
    }

    fn began(&self) -> Option<std::time::Instant> {
        Some(std::time::Instant::now())
    }

    fn served(&self, what: Served, began: Option<std::time::Instant>) {
        let i = what as usize;
        self.metrics.requests[i].increment(1);
        if let Some(t) = began {
            self.metrics.seconds[i].record(t.elapsed().as_secs_f64());
        }
    }

    fn refused_wake(&self) {
        self.metrics.refused.increment(1);
    }
}

/// An [`Answer`] as a hyper response; header values that cannot be sent are dropped.
fn response(answer: Answer, body: impl FnOnce(Bytes) -> ResponseBody) -> Response<ResponseBody> {
    let mut resp = Response::new(body(Bytes::from(answer.body)));
    *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = resp.headers_mut();
    for (k, v) in answer.headers {
        let value = match v {
            std::borrow::Cow::Borrowed(s) => Ok(HeaderValue::from_static(s)),
            std::borrow::Cow::Owned(s) => HeaderValue::from_str(&s),
        };
        if let Ok(v) = value {
            headers.append(HeaderName::from_static(k), v);
        }
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_cannot_remove_host_or_forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.localhost"));
        h.insert(header::CONNECTION, HeaderValue::from_static("host, x-forwarded-for, x-custom, keep-alive"));
        h.insert("x-custom", HeaderValue::from_static("1"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.contains_key(header::HOST));
        assert!(h.contains_key("x-forwarded-for"));
        assert!(!h.contains_key("x-custom"));
        assert!(!h.contains_key(header::CONNECTION));
    }

    #[test]
    fn hop_by_hop_headers_go_and_upgrade_stays_only_for_upgrades() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("connection", "close, x-gone, keep-alive"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("proxy-connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("x-gone", "1"),
            ("close", "1"),
            ("x-stays", "1"),
        ] {
            h.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        let mut upgrading = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-stays"]);
        strip_hop_by_hop(&mut upgrading, true);
        let mut left: Vec<_> = upgrading.iter().map(|(k, v)| (k.as_str(), v.to_str().unwrap())).collect();
        left.sort();
        assert_eq!(left, [("connection", "upgrade"), ("upgrade", "websocket"), ("x-stays", "1")]);
        // nothing hop-by-hop: nothing changes
        let mut plain = HeaderMap::new();
        plain.insert(header::HOST, HeaderValue::from_static("a.localhost"));
        plain.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let before = plain.clone();
        strip_hop_by_hop(&mut plain, false);
        assert_eq!(plain, before);
    }

    #[test]
    fn names_made_once_are_the_names_asked_for() {
        for name in ["user-agent", "accept", "origin", "sec-purpose", "purpose", "x-moz", "x-purpose"] {
            assert_eq!(known_name(name).map(HeaderName::as_str), Some(name));
        }
        assert!(known_name("x-other").is_none());
        // every header the bot check reads is one of them
        for (name, _, _) in crate::bots::PURPOSE_HEADERS {
            assert!(known_name(name).is_some(), "{name}");
        }
    }
}
