//! The per-thread pool of HTTP/1.1 connections to origins and to the waker.
//!
//! Each edge thread owns one pool (no locks, no atomics): idle connections are kept per
//! authority on a stack (the most recently used first, whose socket is warmest), a
//! connection goes back only once its response body has been read to the end, and a
//! request that finds a pooled connection closed under it (the origin's keep-alive ran
//! out) is retried once on a fresh connection, since it was never written. Connection
//! tasks run on the thread's `LocalSet`, beside the client connections they serve.
//!
//! This replaces hyper-util's general-purpose pool, which the edge used through a
//! `Send + Sync` client: a mutex, pool keys with scheme, a checkout future racing a
//! connect, and a task per response to watch for the connection becoming idle again.

use super::body::OutBody;
use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Why a request got no response.
#[derive(Debug)]
pub enum PoolError {
    /// The URL's scheme is not `http` (the native edge speaks plain HTTP to origins).
    Scheme,
    /// No connection within the connect timeout.
    ConnectTimeout,
    /// The connection could not be made.
    Connect(std::io::Error),
    /// The exchange failed (the origin closed, sent garbage, or the request body broke).
    Http(hyper::Error),
}

impl std::fmt::Display for PoolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolError::Scheme => f.write_str("only http:// origins can be reached from the native edge"),
            PoolError::ConnectTimeout => f.write_str("connect timed out"),
            PoolError::Connect(e) => write!(f, "connect: {e}"),
            PoolError::Http(e) => match std::error::Error::source(e) {
                Some(cause) => write!(f, "{e}: {cause}"),
                None => write!(f, "{e}"),
            },
        }
    }
}

/// A failed send, with the request when none of it was written.
pub struct SendError {
    pub error: PoolError,
    pub unsent: Option<Request<OutBody>>,
}

impl std::fmt::Debug for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendError").field("error", &self.error).field("unsent", &self.unsent.is_some()).finish()
    }
}

struct Idle {
    tx: SendRequest<OutBody>,
    since: Instant,
}

/// What a waiting request is handed: a connection someone gave back, or the turn to
/// connect (a connect slot came free).
type Handoff = Option<SendRequest<OutBody>>;

#[derive(Default)]
struct Host {
    /// Most recently used last.
    idle: Vec<Idle>,
    /// Connects in progress.
    connecting: usize,
    /// Requests waiting for a connection or a connect slot, oldest first.
    waiters: std::collections::VecDeque<tokio::sync::oneshot::Sender<Handoff>>,
}

/// The pool; one per edge thread, shared by `Rc`.
///
/// At most `max_connecting` connects to one origin run at once; further requests wait
/// for a connection to come back or a slot to free up. A thousand visitors arriving at
/// a preview that has just woken would otherwise open a thousand connections at once,
/// overflow the app's accept backlog, and wait out the kernel's SYN retries (seconds
/// each).
pub struct Pool {
    /// Keyed by route origins (the control plane's, not a client's), so a fast hash
    /// without SipHash's flooding resistance; `Authority` hashes byte by byte.
    hosts: RefCell<HashMap<Authority, Host, foldhash::fast::RandomState>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle_per_host: usize,
    max_connecting: usize,
}

impl Pool {
    pub fn new(connect_timeout: Duration, idle_timeout: Duration, max_idle_per_host: usize) -> Rc<Pool> {
        Rc::new(Pool {
            hosts: RefCell::new(HashMap::default()),
            connect_timeout,
            idle_timeout,
            max_idle_per_host,
            max_connecting: MAX_CONNECTING,
        })
    }

    /// Sends `req` (origin-form URI, `Host` set by the caller) to `scheme://authority`.
    /// The response body gives the connection back when it has been read to the end; an
    /// upgraded (101) connection is the caller's. A failure hands the request back when
    /// none of it was written.
    pub async fn send(
        self: &Rc<Self>,
        scheme: &Scheme,
        authority: &Authority,
        mut req: Request<OutBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        if scheme != &Scheme::HTTP {
            return Err(SendError { error: PoolError::Scheme, unsent: Some(req) });
        }
        // a pooled connection first; if it turns out closed before the request was
        // written, once more on a fresh one
        match self.checkout(authority).await {
            Ok(Some(mut tx)) => match tx.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(authority, tx, resp)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(SendError { error: PoolError::Http(e.into_error()), unsent: None }),
                },
            },
            Ok(None) => {}
            Err(error) => return Err(SendError { error, unsent: Some(req) }),
        }
        let mut tx = match self.connect(authority).await {
            Ok(tx) => tx,
            Err(error) => return Err(SendError { error, unsent: Some(req) }),
        };
        match tx.try_send_request(req).await {
            Ok(resp) => Ok(self.wrap(authority, tx, resp)),
            Err(mut e) => {
                let unsent = e.take_message();
                Err(SendError { error: PoolError::Http(e.into_error()), unsent })
            }
        }
    }

    /// An idle connection to `authority`, one handed over while waiting, or `None`: the
    /// caller may connect (a slot is free, or the wait ran out).
    async fn checkout(&self, authority: &Authority) -> Result<Option<SendRequest<OutBody>>, PoolError> {
        loop {
            let wait = {
                let mut hosts = self.hosts.borrow_mut();
                let host = hosts.entry(authority.clone()).or_default();
                match host.idle.pop() {
                    Some(Idle { tx, since }) => Err((tx, since)),
                    None if host.connecting < self.max_connecting => return Ok(None),
                    None => {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        host.waiters.push_back(tx);
                        Ok(rx)
                    }
                }
            };
            match wait {
                Err((mut tx, since)) => {
                    if tx.is_closed() || since.elapsed() >= self.idle_timeout {
                        continue;
                    }
                    if tx.is_ready() || tx.ready().await.is_ok() {
                        return Ok(Some(tx));
                    }
                }
                Ok(rx) => {
                    return match tokio::time::timeout(self.connect_timeout, rx).await {
                        Ok(Ok(Some(tx))) => Ok(Some(tx)),
                        // our turn to connect
                        Ok(Ok(None)) => Ok(None),
                        Ok(Err(_)) => Ok(None),
                        Err(_) => Err(PoolError::ConnectTimeout),
                    };
                }
            }
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<OutBody>, PoolError> {
        let _slot = Slot::take(self, authority);
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host().trim_start_matches('[').trim_end_matches(']');
        let stream = match tokio::time::timeout(self.connect_timeout, TcpStream::connect((host, port))).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(PoolError::Connect(e)),
            Err(_) => return Err(PoolError::ConnectTimeout),
        };
        let _ = stream.set_nodelay(true);
        let (tx, conn) = Builder::new().handshake(TokioIo::new(stream)).await.map_err(PoolError::Http)?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "origin connection");
            }
        });
        Ok(tx)
    }

    fn wrap(
        self: &Rc<Self>,
        authority: &Authority,
        tx: SendRequest<OutBody>,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        let upgraded = resp.status() == http::StatusCode::SWITCHING_PROTOCOLS;
        let back = (!upgraded).then(|| Return { pool: self.clone(), authority: authority.clone(), tx });
        let (parts, body) = resp.into_parts();
        let ended = body.is_end_stream();
        Response::from_parts(parts, PooledBody { inner: body, back, ended })
    }

    /// A connection whose response was read to the end: to the oldest waiter, else idle.
    fn put(&self, authority: Authority, mut tx: SendRequest<OutBody>) {
        if tx.is_closed() {
            return self.hand_turn(&authority);
        }
        let mut hosts = self.hosts.borrow_mut();
        let host = hosts.entry(authority).or_default();
        while let Some(waiter) = host.waiters.pop_front() {
            // a waiter that gave up hands back what it was sent
            match waiter.send(Some(tx)) {
                Ok(()) | Err(None) => return,
                Err(Some(back)) => tx = back,
            }
        }
        if host.idle.len() < self.max_idle_per_host {
            host.idle.push(Idle { tx, since: Instant::now() });
        }
    }

    /// Gives the oldest live waiter the turn to connect.
    fn hand_turn(&self, authority: &Authority) {
        if let Some(host) = self.hosts.borrow_mut().get_mut(authority) {
            while let Some(waiter) = host.waiters.pop_front() {
                if waiter.send(None).is_ok() {
                    return;
                }
            }
        }
    }

    /// Drops idle connections that are closed or past the idle timeout, and hosts with
    /// nothing left.
    pub fn sweep(&self) {
        let timeout = self.idle_timeout;
        self.hosts.borrow_mut().retain(|_, host| {
            host.idle.retain(|i| !i.tx.is_closed() && i.since.elapsed() < timeout);
            host.waiters.retain(|w| !w.is_closed());
            !(host.idle.is_empty() && host.waiters.is_empty() && host.connecting == 0)
        });
    }

    /// Idle connections held, all authorities together.
    #[cfg(test)]
    pub fn idle(&self) -> usize {
        self.hosts.borrow().values().map(|h| h.idle.len()).sum()
    }
}

/// Connects in progress to one origin at once, per thread.
pub const MAX_CONNECTING: usize = 8;

/// A connect slot, given back (and the turn handed to a waiter) however the connect
/// ends.
struct Slot<'a> {
    pool: &'a Pool,
    authority: &'a Authority,
}

impl<'a> Slot<'a> {
    fn take(pool: &'a Pool, authority: &'a Authority) -> Slot<'a> {
        pool.hosts.borrow_mut().entry(authority.clone()).or_default().connecting += 1;
        Slot { pool, authority }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        if let Some(host) = self.pool.hosts.borrow_mut().get_mut(self.authority) {
            host.connecting = host.connecting.saturating_sub(1);
        }
        self.pool.hand_turn(self.authority);
    }
}

struct Return {
    pool: Rc<Pool>,
    authority: Authority,
    tx: SendRequest<OutBody>,
}

/// A response body that gives its connection back to the pool once it has been read to
/// the end (and drops it otherwise: a body abandoned half-way leaves the connection in
/// the middle of a response).
pub struct PooledBody {
    inner: Incoming,
    back: Option<Return>,
    ended: bool,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // hyper stops polling a body that says it has ended (all of a Content-Length read)
        let ended = self.ended || self.inner.is_end_stream();
        if let (true, Some(r)) = (ended, self.back.take()) {
            r.pool.put(r.authority, r.tx);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An origin on 127.0.0.1 that counts connections and answers each request head with
    /// `body`; with `close_after` it closes a connection after that many responses
    /// (without saying so, as a keep-alive timeout does).
    async fn origin(body: &'static [u8], close_after: Option<usize>) -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                            if s.write_all(head.as_bytes()).await.is_err() || s.write_all(body).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if close_after == Some(answered) {
                                return;
                            }
                        }
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr.to_string().parse().unwrap(), accepted)
    }

    fn get(authority: &Authority) -> Request<OutBody> {
        Request::builder()
            .uri("/x")
            .header(http::header::HOST, authority.as_str())
            .body(OutBody::Full(Full::new(Bytes::new())))
            .unwrap()
    }

    async fn fetch(pool: &Rc<Pool>, authority: &Authority) -> Bytes {
        let resp = pool.send(&Scheme::HTTP, authority, get(authority)).await.unwrap();
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    fn local<F: std::future::Future>(f: F) -> F::Output {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        tokio::task::LocalSet::new().block_on(&rt, f)
    }

    #[test]
    fn a_connection_read_to_the_end_is_reused() {
        local(async {
            let (at, accepted) = origin(b"hello", None).await;
            let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 8);
            for _ in 0..5 {
                assert_eq!(fetch(&pool, &at).await, "hello");
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
            assert_eq!(pool.idle(), 1);
        })
    }

    #[test]
    fn a_body_abandoned_half_way_does_not_go_back() {
        local(async {
            let big: &'static [u8] = Box::leak(vec![b'x'; 1 << 20].into_boxed_slice());
            let (at, accepted) = origin(big, None).await;
            let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 8);
            let mut body = pool.send(&Scheme::HTTP, &at, get(&at)).await.unwrap().into_body();
            let first = body.frame().await.unwrap().unwrap();
            assert!(first.data_ref().is_some_and(|d| d.len() < big.len()));
            drop(body);
            assert_eq!(pool.idle(), 0);
            assert_eq!(fetch(&pool, &at).await.len(), big.len());
            assert_eq!(accepted.load(Ordering::SeqCst), 2);
        })
    }

    #[test]
    fn a_pooled_connection_the_origin_closed_is_replaced() {
        local(async {
            let (at, accepted) = origin(b"once", Some(1)).await;
            let pool = Pool::new(Duration::from_secs(5), Duration::from_secs(60), 8);
            for _ in 0..3 {
                assert_eq!(fetch(&pool, &at).await, "once");
                // whether the close is seen before the next request or only when it is
                // written, the request is answered on a fresh connection
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 3);
            tokio::time::sleep(Duration::from_millis(50)).await;
            pool.sweep();
            assert_eq!(pool.idle(), 0);
        })
    }

    #[test]
    fn only_plain_http_and_reachable_origins() {
        local(async {
            let pool = Pool::new(Duration::from_millis(500), Duration::from_secs(60), 8);
            let at: Authority = "127.0.0.1:9".parse().unwrap();
            let err = pool.send(&Scheme::HTTPS, &at, get(&at)).await.err().unwrap();
            assert!(matches!(err.error, PoolError::Scheme) && err.unsent.is_some());
            // nothing listens on the discard port on loopback: the request comes back
            let err = pool.send(&Scheme::HTTP, &at, get(&at)).await.err().unwrap();
            assert!(matches!(err.error, PoolError::Connect(_)), "{}", err.error);
            assert_eq!(err.unsent.expect("never written").uri(), "/x");
        })
    }
}
