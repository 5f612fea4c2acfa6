//! Dashboard sessions: a random id in a cookie, the session itself in the store.
//!
//! * The cookie holds 32 random bytes (hex). The store keys the session by a SHA-256 of
//!   that id, so a copy of the store (a Redis dump, the embedded log) does not hand out
//!   live sessions. Every replica sees every session.
//! * A session lasts [`SESSION_TTL_MS`] from login. It carries its own CSRF token, also
//!   32 random bytes (a "synchronizer token"): every form of the page holds it, and a POST
//!   is done only when the form's token matches the session's, compared in constant
//!   time. `SameSite=Strict` already keeps the cookie off cross-site requests; the token
//!   is the second lock.
//! * It also carries the one-shot message the next page shows (what the last action did).
//! * Sessions are made only by a good token, and logins are rate-limited, but the table
//!   is bounded anyway: expired sessions are dropped at each login and then the oldest
//!   beyond [`MAX_SESSIONS`].

use super::page::Flash;
use crate::waker::Waker;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use wakegate_core::Millis;
use wakegate_store::StoreError;

/// The store table of sessions: SHA-256(id) → [`Session`] as JSON.
pub(crate) const SESSIONS: &str = "dashboard-sessions";
/// The cookie's name.
pub(crate) const COOKIE: &str = "wakegate_dashboard";
/// How long a login lasts.
pub(crate) const SESSION_TTL_MS: Millis = 12 * 3_600_000;
/// Sessions kept at most; the oldest go first.
pub(crate) const MAX_SESSIONS: usize = 256;
/// Random bytes in a session id and a CSRF token.
const SECRET_BYTES: usize = 32;
/// Longest message kept for the next page.
const MAX_FLASH: usize = 600;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Session {
    pub expires_at: Millis,
    pub csrf: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash: Option<Flash>,
}

/// A session found by its cookie.
pub(crate) struct Live {
    key: String,
    pub session: Session,
}

fn key_of(id: &str) -> String {
    hex::encode(Sha256::digest(format!("wakegate-dashboard-session\n{id}").as_bytes()))
}

fn encode(s: &Session) -> Result<String, StoreError> {
    serde_json::to_string(s).map_err(|e| StoreError::Backend(e.to_string()))
}

/// Starts a session; its id goes in the cookie.
pub(crate) async fn create(w: &Waker, now: Millis) -> Result<(String, Session), StoreError> {
    prune(w, now).await?;
    let id = wakegate_store::random_hex::<SECRET_BYTES>();
    let session =
        Session { expires_at: now + SESSION_TTL_MS, csrf: wakegate_store::random_hex::<SECRET_BYTES>(), flash: None };
    w.store.table_put(SESSIONS, &key_of(&id), &encode(&session)?).await?;
    Ok((id, session))
}

/// Drops expired sessions, then the oldest beyond [`MAX_SESSIONS`] - 1 (room for one more).
async fn prune(w: &Waker, now: Millis) -> Result<(), StoreError> {
    let mut live = Vec::new();
    for (key, raw) in w.store.table_list(SESSIONS).await? {
        match serde_json::from_str::<Session>(&raw) {
            Ok(s) if s.expires_at > now => live.push((s.expires_at, key)),
            _ => {
                w.store.table_remove(SESSIONS, &key).await?;
            }
        }
    }
    if live.len() >= MAX_SESSIONS {
        live.sort();
        for (_, key) in &live[..=live.len() - MAX_SESSIONS] {
            w.store.table_remove(SESSIONS, key).await?;
        }
    }
    Ok(())
}

/// The session the request's cookie names, if it is one and has not expired.
pub(crate) async fn load(w: &Waker, headers: &HeaderMap, now: Millis) -> Result<Option<Live>, StoreError> {
    // anything but a well-formed id is nobody's: no store lookup for it
    let Some(id) = cookie(headers).filter(|v| v.len() == 2 * SECRET_BYTES && v.bytes().all(|b| b.is_ascii_hexdigit()))
    else {
        return Ok(None);
    };
    let key = key_of(id);
    let Some(raw) = w.store.table_get(SESSIONS, &key).await? else { return Ok(None) };
    match serde_json::from_str::<Session>(&raw) {
        Ok(session) if session.expires_at > now => Ok(Some(Live { key, session })),
        _ => {
            w.store.table_remove(SESSIONS, &key).await?;
            Ok(None)
        }
    }
}

/// Ends a session (logout).
pub(crate) async fn end(w: &Waker, live: &Live) -> Result<(), StoreError> {
    w.store.table_remove(SESSIONS, &live.key).await.map(|_| ())
}

/// Changes a session's message with compare-and-set; a session ended meanwhile stays
/// ended. Returns the message that was there.
async fn swap_flash(w: &Waker, live: &Live, flash: Option<Flash>) -> Result<Option<Flash>, StoreError> {
    for _ in 0..8 {
        let Some(raw) = w.store.table_get(SESSIONS, &live.key).await? else { return Ok(None) };
        let Ok(mut s) = serde_json::from_str::<Session>(&raw) else { return Ok(None) };
        if s.flash.is_none() && flash.is_none() {
            return Ok(None);
        }
        let old = std::mem::replace(&mut s.flash, flash.clone());
        if w.store.table_swap(SESSIONS, &live.key, Some(&raw), Some(&encode(&s)?)).await? {
            return Ok(old);
        }
    }
    Err(StoreError::Conflict)
}

/// Leaves a message for the next page.
pub(crate) async fn set_flash(w: &Waker, live: &Live, mut flash: Flash) -> Result<(), StoreError> {
    if flash.text.len() > MAX_FLASH {
        let mut end = MAX_FLASH;
        while !flash.text.is_char_boundary(end) {
            end -= 1;
        }
        flash.text.truncate(end);
        flash.text.push('…');
    }
    swap_flash(w, live, Some(flash)).await.map(|_| ())
}

/// Takes the message left for this page, once.
pub(crate) async fn take_flash(w: &Waker, live: &Live) -> Result<Option<Flash>, StoreError> {
    if live.session.flash.is_none() {
        return Ok(None);
    }
    swap_flash(w, live, None).await
}

/// Whether a form's token is this session's.
pub(crate) fn csrf_ok(session: &Session, given: Option<&str>) -> bool {
    given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(session.csrf.as_bytes())))
}

/// The session cookie's value, from any `Cookie` header.
pub(crate) fn cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim_matches('"'))
}

/// The `Set-Cookie` of a new session.
///
/// Always `Secure`: browsers keep such a cookie from `https://` and from loopback, a
/// secure context even over plain HTTP (Chromium does for `http://127.0.0.1`, which
/// `tests/it/dashboard.rs` checks), and drop it over plain HTTP elsewhere. The waker cannot know the scheme the browser used (TLS usually ends
/// at a proxy in front of it), so it does not guess; a login whose cookie does not come
/// back says why (see `page` in `dashboard.rs`).
pub(crate) fn set_cookie(id: &str) -> String {
    let max_age = SESSION_TTL_MS / 1000;
    format!("{COOKIE}={id}; Path=/dashboard; Max-Age={max_age}; HttpOnly; Secure; SameSite=Strict")
}

/// The `Set-Cookie` that removes it.
pub(crate) fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/dashboard; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for c in cookies {
            h.append(http::header::COOKIE, c.parse().unwrap());
        }
        h
    }

    #[test]
    fn finds_the_cookie() {
        assert_eq!(cookie(&headers(&["a=1; wakegate_dashboard=abc; b=2"])), Some("abc"));
        assert_eq!(cookie(&headers(&["a=1", "wakegate_dashboard=\"abc\""])), Some("abc"));
        assert_eq!(cookie(&headers(&["xwakegate_dashboard=abc"])), None);
        assert_eq!(cookie(&headers(&[])), None);
    }

    #[test]
    fn csrf_must_match() {
        let s = Session { expires_at: 1, csrf: "a".repeat(64), flash: None };
        assert!(csrf_ok(&s, Some(&"a".repeat(64))));
        assert!(!csrf_ok(&s, Some(&"b".repeat(64))));
        assert!(!csrf_ok(&s, Some("")));
        assert!(!csrf_ok(&s, None));
    }

    #[test]
    fn cookies_are_strict() {
        let c = set_cookie("x");
        for part in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/dashboard", "Max-Age=43200"] {
            assert!(c.contains(part), "{c}");
        }
        assert!(clear_cookie().contains("Max-Age=0"));
    }
}
