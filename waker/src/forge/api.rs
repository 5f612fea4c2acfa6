//! The HTTP side both forge clients share: a bearer token in a header (never in a URL),
//! JSON in and out, rate limits waited out as the forge asks, 5xx retried with back-off,
//! and `Link: <…>; rel="next"` pagination that never follows a link off the API's origin
//! (the token would go with it).

use super::ForgeError;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::header::HeaderMap;
use reqwest::Method;
use serde_json::Value;
use std::time::Duration;

/// Tries at one request (429s, secondary limits and 5xx).
const TRIES: u32 = 4;
/// Longest wait for a rate limit to reset before the call gives up (and the work is
/// retried later).
pub const MAX_RATE_WAIT: Duration = Duration::from_secs(60);
/// Most pages read from one listing.
pub const MAX_PAGES: usize = 50;
/// Longest a request may take.
const TIMEOUT: Duration = Duration::from_secs(20);

/// Unreserved characters stay; everything else in a path segment is escaped
/// (`group/project` → `group%2Fproject`, as GitLab wants ids and branch names).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// One path segment, escaped.
pub fn segment(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// An answer: status, headers and the JSON body (`Null` when empty or not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

/// A forge's REST API at `base` with a token.
pub struct Http {
    client: reqwest::Client,
    base: String,
    /// Sent as the `Authorization` header.
    authorization: String,
    extra: Vec<(&'static str, &'static str)>,
    /// `gitlab` or `github`: the metrics' `api` label.
    name: &'static str,
}

impl Http {
    pub fn new(
        name: &'static str,
        base: &str,
        token: &str,
        extra: Vec<(&'static str, &'static str)>,
    ) -> Result<Http, ForgeError> {
        let client = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .user_agent(concat!("wakegate/", env!("CARGO_PKG_VERSION")))
            // a redirect could carry the token to another host
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ForgeError::Transport(e.to_string()))?;
        Ok(Http {
            client,
            base: base.trim_end_matches('/').to_string(),
            authorization: format!("Bearer {token}"),
            extra,
            name,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// One call with retries; any status is returned (callers decide what a 404 means),
    /// except that rate limits and 5xx are retried first.
    pub async fn call(&self, method: Method, url: &str, body: Option<&Value>) -> Result<Answer, ForgeError> {
        if !self.same_origin(url) {
            return Err(ForgeError::Api {
                status: 0,
                message: format!("refusing to follow a link off the API: {url}"),
            });
        }
        let mut backoff = Duration::from_millis(500);
        let mut last = None;
        for attempt in 1..=TRIES {
            let mut req = self.client.request(method.clone(), url).header("authorization", &self.authorization);
            for (k, v) in &self.extra {
                req = req.header(*k, *v);
            }
            if let Some(b) = body {
                req = req.json(b);
            }
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => {
                    crate::record_call(self.name, 0, None);
                    // without the URL: nothing secret is in it, but it is noise in logs
                    let e = ForgeError::Transport(e.without_url().to_string());
                    if attempt == TRIES {
                        return Err(e);
                    }
                    last = Some(e);
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            // GitLab: RateLimit-Remaining; GitHub: x-ratelimit-remaining
            let remaining = ["ratelimit-remaining", "x-ratelimit-remaining"]
                .iter()
                .find_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok()));
            let bytes = resp.bytes().await.map_err(|e| ForgeError::Transport(e.without_url().to_string()))?;
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let limited = rate_limited(status, &headers, &body);
            // GitHub says "rate limited" with a 403 too
            crate::record_call(self.name, if limited.is_some() { 429 } else { status }, remaining);
            if let Some(wait) = limited {
                if wait > MAX_RATE_WAIT || attempt == TRIES {
                    return Err(ForgeError::RateLimited { retry_after: wait });
                }
                tracing::info!(status, wait_ms = wait.as_millis() as u64, "forge rate limit: waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            if status >= 500 && attempt < TRIES {
                last = Some(ForgeError::Api { status, message: message(&body) });
                tokio::time::sleep(backoff).await;
                backoff *= 2;
                continue;
            }
            return Ok(Answer { status, headers, body });
        }
        Err(last.unwrap_or(ForgeError::Transport("no answer".into())))
    }

    /// A call that must succeed (2xx); a 404 is `Ok(None)`.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Option<Value>, ForgeError> {
        let a = self.call(method, &self.url(path), body).await?;
        match a.status {
            200..=299 => Ok(Some(a.body)),
            404 => Ok(None),
            status => Err(ForgeError::Api { status, message: message(&a.body) }),
        }
    }

    /// Every item of a paginated listing, following `rel="next"` up to [`MAX_PAGES`].
    pub async fn list(&self, path_and_query: &str) -> Result<Vec<Value>, ForgeError> {
        let mut url = self.url(path_and_query);
        let mut items = Vec::new();
        for _ in 0..MAX_PAGES {
            let a = self.call(Method::GET, &url, None).await?;
            if !(200..=299).contains(&a.status) {
                return Err(ForgeError::Api { status: a.status, message: message(&a.body) });
            }
            match a.body {
                Value::Array(page) => items.extend(page),
                _ => return Err(ForgeError::Api { status: a.status, message: "expected a JSON array".into() }),
            }
            match next_link(&a.headers) {
                Some(next) => url = next,
                None => return Ok(items),
            }
        }
        Err(ForgeError::Api { status: 0, message: format!("more than {MAX_PAGES} pages") })
    }

    fn same_origin(&self, url: &str) -> bool {
        let origin = |u: &str| -> Option<String> {
            let u = reqwest::Url::parse(u).ok()?;
            Some(format!("{}://{}:{}", u.scheme(), u.host_str()?, u.port_or_known_default()?))
        };
        origin(url).is_some() && origin(url) == origin(&self.base)
    }
}

/// The forge's own words for an error (`message`, GitLab's `error`), cut short.
pub fn message(body: &Value) -> String {
    let m = match body {
        Value::Object(o) => o
            .get("message")
            .or_else(|| o.get("error"))
            .map(|m| match m {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .unwrap_or_else(|| body.to_string()),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    m.chars().take(300).collect()
}

/// How long to wait when the answer is a rate limit: GitLab's 429 with `Retry-After`
/// (or `RateLimit-Reset`, epoch seconds), GitHub's 403/429 with
/// `x-ratelimit-remaining: 0` and `x-ratelimit-reset` (epoch seconds) or a secondary
/// limit's `retry-after`.
pub fn rate_limited(status: u16, headers: &HeaderMap, body: &Value) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let secs = |name: &str| header(name).and_then(|v| v.parse::<u64>().ok());
    let until_reset = |name: &str| {
        let reset = secs(name)?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
        Some(Duration::from_secs(reset.saturating_sub(now).max(1)))
    };
    let secondary = status == 403 && message(body).to_ascii_lowercase().contains("rate limit");
    let exhausted = header("x-ratelimit-remaining") == Some("0");
    if status != 429 && !(status == 403 && (exhausted || secondary)) {
        return None;
    }
    if let Some(s) = secs("retry-after") {
        return Some(Duration::from_secs(s.max(1)));
    }
    if exhausted {
        if let Some(d) = until_reset("x-ratelimit-reset") {
            return Some(d);
        }
    }
    if let Some(d) = until_reset("ratelimit-reset") {
        return Some(d);
    }
    // no hint: a minute, as GitHub's guidance for secondary limits says
    Some(Duration::from_secs(60))
}

/// The `rel="next"` target of a `Link` header.
pub fn next_link(headers: &HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p == r#"rel="next""# || p == "rel=next"
        });
        is_next.then(|| target.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn follows_next_links_and_reads_rate_limits() {
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static(
                r#"<https://api.github.com/repositories/1/pulls?page=2>; rel="next", <https://api.github.com/repositories/1/pulls?page=5>; rel="last""#,
            ),
        );
        assert_eq!(next_link(&h).as_deref(), Some("https://api.github.com/repositories/1/pulls?page=2"));
        h.insert("link", HeaderValue::from_static(r#"<https://x/?page=1>; rel="first""#));
        assert_eq!(next_link(&h), None);

        let mut h = HeaderMap::new();
        assert_eq!(rate_limited(200, &h, &Value::Null), None);
        assert_eq!(rate_limited(403, &h, &serde_json::json!({"message": "Forbidden"})), None, "a plain 403");
        h.insert("retry-after", HeaderValue::from_static("3"));
        assert_eq!(rate_limited(429, &h, &Value::Null), Some(Duration::from_secs(3)));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
        h.insert("x-ratelimit-reset", HeaderValue::from_static("1"));
        assert_eq!(rate_limited(403, &h, &Value::Null), Some(Duration::from_secs(1)), "a reset in the past");
        assert_eq!(segment("group/sub project"), "group%2Fsub%20project");
    }

    #[test]
    fn never_follows_a_link_off_the_api() {
        let http = Http::new("gitlab", "https://gitlab.example/api/v4", "t", vec![]).unwrap();
        assert!(http.same_origin("https://gitlab.example/api/v4/projects?page=2"));
        assert!(http.same_origin("https://gitlab.example:443/api/v4/projects"));
        assert!(!http.same_origin("https://evil.example/api/v4/projects"));
        assert!(!http.same_origin("http://gitlab.example/api/v4/projects"));
        assert!(!http.same_origin("not a url"));
    }
}
