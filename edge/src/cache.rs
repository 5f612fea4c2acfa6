//! The route cache: what the edge remembers about hosts between requests, bounded.
//!
//! * running routes are kept for the route TTL (everything else changes under the
//!   visitor and is asked for again); hosts waker does not know are kept for the
//!   shorter negative TTL, so random names under the wildcard cost one waker call per
//!   name and TTL, not one per request;
//! * at most `capacity` entries, least recently used evicted first; expired entries are
//!   dropped when met and, on insert, a few of the oldest are checked so the map does
//!   not hold dead entries until capacity forces them out;
//! * each cached route carries what proxying needs prepared once: the origin's scheme
//!   and authority, parsed, and the public host as a header value.
//!
//! Pure: time is an argument. Each front door keeps one cache per thread (native) or
//! per isolate (Worker), so a lookup takes no lock.

use http::uri::{Authority, Scheme};
use http::HeaderValue;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::rc::Rc;
use wakegate_core::host::Host;
use wakegate_core::route::{RouteRecord, RouteStatus};
use wakegate_core::Millis;

/// A route record with what proxying to it needs, prepared once.
#[derive(Debug)]
pub struct Route {
    pub host: Host,
    pub record: RouteRecord,
    /// The serving origin, parsed; `None` when nothing serves (or the origin is not a
    /// valid `http(s)://authority` URL).
    pub origin: Option<Origin>,
    /// `host` as a header value (`X-Forwarded-Host`).
    pub host_value: HeaderValue,
}

/// A parsed origin base URL (`http://127.0.0.1:9000`).
#[derive(Debug, Clone)]
pub struct Origin {
    pub base: String,
    pub scheme: Scheme,
    pub authority: Authority,
}

impl Origin {
    /// Parses `scheme://authority` (a trailing `/` allowed); anything with a path,
    /// query or userinfo is refused.
    pub fn parse(base: &str) -> Option<Origin> {
        let uri: http::Uri = base.parse().ok()?;
        let scheme = uri.scheme()?.clone();
        let authority = uri.authority()?.clone();
        let path_ok = uri.path_and_query().is_none_or(|pq| pq.as_str() == "/");
        (path_ok && !authority.as_str().contains('@') && (scheme == Scheme::HTTP || scheme == Scheme::HTTPS))
            .then(|| Origin { base: base.trim_end_matches('/').to_string(), scheme, authority })
    }
}

impl Route {
    pub fn new(host: Host, record: RouteRecord) -> Route {
        let origin = record.status.origin().and_then(Origin::parse);
        let host_value = HeaderValue::from_str(host.as_str()).unwrap_or(HeaderValue::from_static("invalid"));
        Route { host, record, origin, host_value }
    }
}

/// What the cache knows about a host.
#[derive(Clone, Debug)]
pub enum Known {
    Route(Rc<Route>),
    /// Waker said there is no preview at this host.
    NotFound,
}

struct Entry {
    known: Known,
    expires: Millis,
}

/// Bounds and lifetimes of a [`RouteCache`].
#[derive(Clone, Copy, Debug)]
pub struct CachePolicy {
    /// How long a running route is trusted.
    pub route_ttl_ms: Millis,
    /// How long "no preview here" is trusted.
    pub negative_ttl_ms: Millis,
    /// Most hosts remembered.
    pub capacity: usize,
}

/// Default bound: 100 000 hosts (≈ 50 MB at the measured size of an entry).
pub const DEFAULT_CAPACITY: usize = 100_000;
/// Default time "no preview here" is trusted.
pub const DEFAULT_NEGATIVE_TTL_MS: Millis = 2_000;

pub struct RouteCache {
    map: LruCache<Host, Entry>,
    policy: CachePolicy,
}

/// Expired entries checked (and dropped) per insert, oldest first.
const SWEEP_PER_INSERT: usize = 2;

impl RouteCache {
    pub fn new(policy: CachePolicy) -> RouteCache {
        let cap = NonZeroUsize::new(policy.capacity.max(1)).unwrap_or(NonZeroUsize::MIN);
        RouteCache { map: LruCache::new(cap), policy }
    }

    /// What is known about `host` now; an expired entry is dropped and `None` returned.
    pub fn get(&mut self, host: &str, now: Millis) -> Option<Known> {
        match self.map.get(host) {
            Some(e) if e.expires > now => Some(e.known.clone()),
            Some(_) => {
                self.map.pop(host);
                None
            }
            None => None,
        }
    }

    /// Remembers waker's answer for `host`: running routes and "not found" are kept,
    /// anything else is forgotten. Returns the answer as the caller should use it.
    pub fn put(&mut self, host: Host, record: Option<RouteRecord>, now: Millis) -> Option<Rc<Route>> {
        for _ in 0..SWEEP_PER_INSERT {
            match self.map.peek_lru() {
                Some((_, e)) if e.expires <= now => {
                    self.map.pop_lru();
                }
                _ => break,
            }
        }
        match record {
            Some(record) => {
                let cacheable = matches!(record.status, RouteStatus::Running { .. });
                let route = Rc::new(Route::new(host.clone(), record));
                if cacheable && self.policy.route_ttl_ms > 0 {
                    let expires = now.saturating_add(self.policy.route_ttl_ms);
                    self.map.put(host, Entry { known: Known::Route(route.clone()), expires });
                } else {
                    self.map.pop(host.as_str());
                }
                Some(route)
            }
            None => {
                if self.policy.negative_ttl_ms > 0 {
                    let expires = now.saturating_add(self.policy.negative_ttl_ms);
                    self.map.put(host, Entry { known: Known::NotFound, expires });
                }
                None
            }
        }
    }

    pub fn forget(&mut self, host: &str) {
        self.map.pop(host);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::tests::route as record;
    use wakegate_core::host::normalize_host;

    fn running() -> RouteRecord {
        record(RouteStatus::Running { origin: "http://127.0.0.1:9".into() })
    }

    fn policy(capacity: usize) -> CachePolicy {
        CachePolicy { route_ttl_ms: 1000, negative_ttl_ms: 100, capacity }
    }

    fn h(s: &str) -> Host {
        normalize_host(s).unwrap()
    }

    #[test]
    fn keeps_running_routes_for_their_ttl_only() {
        let mut c = RouteCache::new(policy(10));
        let r = c.put(h("a.test"), Some(running()), 0).unwrap();
        assert_eq!(r.origin.as_ref().unwrap().authority.as_str(), "127.0.0.1:9");
        assert!(matches!(c.get("a.test", 999), Some(Known::Route(_))));
        assert!(c.get("a.test", 1000).is_none());
        assert!(c.is_empty(), "an expired entry is dropped when met");
        c.put(h("s.test"), Some(record(RouteStatus::Sleeping)), 0);
        assert!(c.get("s.test", 1).is_none(), "only running routes are cached");
    }

    #[test]
    fn remembers_unknown_hosts_briefly() {
        let mut c = RouteCache::new(policy(10));
        assert!(c.put(h("nope.test"), None, 0).is_none());
        assert!(matches!(c.get("nope.test", 99), Some(Known::NotFound)));
        assert!(c.get("nope.test", 100).is_none());
    }

    #[test]
    fn is_bounded_and_evicts_expired_entries() {
        let mut c = RouteCache::new(policy(3));
        for i in 0..10 {
            c.put(h(&format!("h{i}.test")), Some(running()), i);
        }
        assert_eq!(c.len(), 3);
        assert!(c.get("h9.test", 10).is_some() && c.get("h0.test", 10).is_none());
        // expired entries go as new ones arrive, even below capacity
        let mut c = RouteCache::new(policy(1000));
        for i in 0..50 {
            c.put(h(&format!("n{i}.test")), None, 0);
        }
        for i in 0..50 {
            c.put(h(&format!("m{i}.test")), None, 500);
        }
        assert_eq!(c.len(), 50, "each insert drops expired entries");
    }

    #[test]
    fn refuses_odd_origins() {
        assert!(Origin::parse("http://127.0.0.1:9").is_some());
        assert!(Origin::parse("https://a.example/").is_some());
        for bad in ["ftp://a", "http://a/b", "http://u@a", "a:9", ""] {
            assert!(Origin::parse(bad).is_none(), "{bad}");
        }
    }
}
