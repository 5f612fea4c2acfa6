//! Body types of the native front door, as enums rather than boxes (no allocation per
//! request): what goes to an origin or waker ([`OutBody`]), what goes back to a client
//! ([`ResponseBody`]), a client body that remembers whether it broke ([`ClientBody`]),
//! and a page body that signals once it has been sent ([`AfterSent`]).

use super::pool::PooledBody;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The client's request body on its way to the origin; `broken` is set when reading it
/// fails (malformed chunked encoding, a client that went away), so the failure is
/// blamed on the client (400), not the origin (502).
pub struct ClientBody {
    inner: Incoming,
    broken: Arc<AtomicBool>,
}

impl ClientBody {
    /// The body it wraps (for a request handed back unsent).
    pub fn into_inner(self) -> Incoming {
        self.inner
    }

    pub fn watch(inner: Incoming) -> (ClientBody, Arc<AtomicBool>) {
        let broken = Arc::new(AtomicBool::new(false));
        (ClientBody { inner, broken: broken.clone() }, broken)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &r {
            this.broken.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What the edge sends upstream: a client's body, or its own (waker calls).
pub enum OutBody {
    Client(ClientBody),
    Full(Full<Bytes>),
}

impl Body for OutBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            OutBody::Client(b) => Pin::new(b).poll_frame(cx),
            OutBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            OutBody::Client(b) => b.is_end_stream(),
            OutBody::Full(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            OutBody::Client(b) => b.size_hint(),
            OutBody::Full(b) => b.size_hint(),
        }
    }
}

/// A page body that fires `sent` once it is dropped: after hyper has written it (or the
/// client went away). A wake waits on it, so the page always goes out first.
pub struct AfterSent {
    inner: Full<Bytes>,
    sent: Option<tokio::sync::oneshot::Sender<()>>,
}

impl AfterSent {
    pub fn new(body: Bytes, sent: tokio::sync::oneshot::Sender<()>) -> AfterSent {
        AfterSent { inner: Full::new(body), sent: Some(sent) }
    }
}

impl Drop for AfterSent {
    fn drop(&mut self) {
        if let Some(tx) = self.sent.take() {
            let _ = tx.send(());
        }
    }
}

/// What goes back to a client.
pub enum ResponseBody {
    Origin(PooledBody),
    Full(Full<Bytes>),
    AfterSent(AfterSent),
    Empty,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ResponseBody::Origin(b) => Pin::new(b).poll_frame(cx),
            ResponseBody::Full(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ResponseBody::AfterSent(b) => Pin::new(&mut b.inner).poll_frame(cx).map_err(|never| match never {}),
            ResponseBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Origin(b) => b.is_end_stream(),
            ResponseBody::Full(b) => b.is_end_stream(),
            ResponseBody::AfterSent(b) => b.inner.is_end_stream(),
            ResponseBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Origin(b) => b.size_hint(),
            ResponseBody::Full(b) => b.size_hint(),
            ResponseBody::AfterSent(b) => b.inner.size_hint(),
            ResponseBody::Empty => SizeHint::with_exact(0),
        }
    }
}
