//! The HTTP/1.1 server loop.

use crate::api::Waker;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use std::sync::Arc;
use tokio::net::TcpListener;

/// Serves the API on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, waker: Arc<Waker>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let waker = waker.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let waker = waker.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&waker, req, peer).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(waker: &Waker, req: Request<Incoming>, _peer: std::net::SocketAddr) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, wakegate_core::route::MAX_API_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return crate::api::json_error(
                413,
                &format!("body larger than {} bytes", wakegate_core::route::MAX_API_BODY),
            )
        }
    };
    waker.handle(&parts, body).await
}
