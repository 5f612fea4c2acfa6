//! What the fakes of cloud APIs share: a server on 127.0.0.1 that hands each request to
//! a handler as plain parts and answers with JSON.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde_json::Value;
use std::future::Future;
use std::net::SocketAddr;

/// A request as a fake sees it.
pub struct ApiRequest {
    pub method: String,
    pub path: String,
    pub query: String,
    /// The `Authorization` header.
    pub authorization: Option<String>,
    /// Every header, names lowercase.
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl ApiRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// A query parameter, percent-decoded.
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (k == name).then(|| percent_decode(v))
        })
    }
}

/// `%XX` decoded (and `+` as a space, as in a query).
pub fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(&s.replace('+', " ")).decode_utf8_lossy().into_owned()
}

/// A fake's answer.
pub struct Reply {
    pub status: u16,
    pub body: Value,
    pub headers: Vec<(&'static str, String)>,
    /// The request was carried out but the client never hears back (an injected crash).
    pub hang: bool,
}

/// Serves `handle` on a fresh port on 127.0.0.1 until the returned task is aborted.
pub async fn serve<F, Fut>(handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    F: Fn(ApiRequest) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
    let addr = listener.local_addr().expect("local address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| answer(handle.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, task)
}

async fn answer<F, Fut>(handle: F, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, std::convert::Infallible>
where
    F: Fn(ApiRequest) -> Fut,
    Fut: Future<Output = Reply>,
{
    let request = ApiRequest {
        method: req.method().as_str().to_string(),
        path: req.uri().path().to_string(),
        query: req.uri().query().unwrap_or("").to_string(),
        authorization: req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string),
        headers: req
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect(),
        body: req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default(),
    };
    let reply = handle(request).await;
    if reply.hang {
        std::future::pending::<()>().await;
    }
    let mut resp = Response::builder().status(reply.status).header("content-type", "application/json");
    for (k, v) in reply.headers {
        resp = resp.header(k, v);
    }
    let body = if reply.status == 204 { Bytes::new() } else { Bytes::from(reply.body.to_string()) };
    Ok(resp.body(Full::new(body)).expect("a valid response"))
}
