//! HMAC-SHA256 request signing and CSRF tokens.
//!
//! A signed request carries `x-wakegate-signature: t=<ms>,n=<nonce>,s=<hex>` where `s`
//! is `HMAC(key, METHOD \n path?query \n hex(sha256(body)) \n t \n n)`. The verifier
//! checks the MAC in constant time and the clock skew; the caller remembers nonces for
//! the skew window to refuse replays (see [`ReplayGuard`]).
//!
//! A CSRF token is `<expiry ms>.<hex HMAC(key, "csrf" \n host \n expiry)>`: stateless,
//! bound to one host, expiring.

use crate::Millis;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashSet};

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the edge → waker signature.
pub const SIGNATURE_HEADER: &str = "x-wakegate-signature";
/// Header carrying the edge → origin signature.
pub const ORIGIN_SIGNATURE_HEADER: &str = "x-wakegate-origin-signature";
/// Body digest used when the body is streamed and not covered (origin requests).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// Largest accepted difference between signer and verifier clocks.
pub const MAX_SKEW_MS: Millis = 60_000;
/// How long a CSRF token from a splash page stays valid.
pub const CSRF_TTL_MS: Millis = 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("missing signature")]
    Missing,
    #[error("malformed signature header")]
    Malformed,
    #[error("signature timestamp is outside the allowed clock skew")]
    Skew,
    #[error("signature does not match")]
    Mismatch,
    #[error("signature was already used")]
    Replay,
}

/// A shared secret for HMAC, keyed once: each use clones the keyed state instead of
/// hashing the key again.
#[derive(Clone)]
pub struct Key(HmacSha256);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(…)")
    }
}

impl Key {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Key {
        Key(HmacSha256::new_from_slice(&bytes.into()).expect("HMAC takes any key length"))
    }

    fn mac(&self) -> HmacSha256 {
        self.0.clone()
    }
}

/// Lowercase hex SHA-256 of a body.
pub fn body_digest(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Feeds `METHOD \n path \n digest \n t \n nonce` to the MAC piece by piece: no
/// canonical string is built.
fn feed(mac: &mut HmacSha256, method: &str, path: &str, digest: &str, t: Millis, nonce: &str) {
    for chunk in method.as_bytes().chunks(16) {
        let mut upper = [0u8; 16];
        upper[..chunk.len()].copy_from_slice(chunk);
        upper.make_ascii_uppercase();
        mac.update(&upper[..chunk.len()]);
    }
    let mut digits = [0u8; 20];
    let t = decimal(t, &mut digits);
    for part in [path.as_bytes(), digest.as_bytes(), t, nonce.as_bytes()] {
        mac.update(b"\n");
        mac.update(part);
    }
}

/// `n` in decimal, written into the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Signs a request; returns the header value.
pub fn sign(key: &Key, method: &str, path: &str, digest: &str, t: Millis, nonce: &str) -> String {
    let mut out = String::with_capacity(SIGNATURE_LEN + nonce.len());
    sign_into(key, method, path, digest, t, nonce, &mut out);
    out
}

/// Longest header value [`sign`] makes, without the nonce.
pub const SIGNATURE_LEN: usize = "t=,n=,s=".len() + 20 + 64;

/// [`sign`] into a buffer the caller reuses (cleared first): the edge signs every proxied
/// request and keeps one buffer per thread.
pub fn sign_into(key: &Key, method: &str, path: &str, digest: &str, t: Millis, nonce: &str, out: &mut String) {
    let mut mac = key.mac();
    feed(&mut mac, method, path, digest, t, nonce);
    let tag = mac.finalize().into_bytes();
    let mut digits = [0u8; 20];
    out.clear();
    out.push_str("t=");
    out.push_str(std::str::from_utf8(decimal(t, &mut digits)).unwrap_or("0"));
    out.push_str(",n=");
    out.push_str(nonce);
    out.push_str(",s=");
    let mut hex_tag = [0u8; 64];
    if hex::encode_to_slice(tag, &mut hex_tag).is_ok() {
        out.push_str(std::str::from_utf8(&hex_tag).unwrap_or(""));
    }
}

/// A verified signature's timestamp and nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    pub t: Millis,
    pub nonce: String,
}

/// Verifies a header value made by [`sign`]. Replays are the caller's to refuse.
pub fn verify(
    key: &Key,
    header: Option<&str>,
    method: &str,
    path: &str,
    digest: &str,
    now: Millis,
) -> Result<Signed, SignError> {
    let header = header.ok_or(SignError::Missing)?;
    let (mut t, mut n, mut s) = (None, None, None);
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = Some(v.parse::<Millis>().map_err(|_| SignError::Malformed)?),
            Some(("n", v)) if !v.is_empty() && v.len() <= 64 && v.bytes().all(|b| b.is_ascii_alphanumeric()) => {
                n = Some(v)
            }
            Some(("s", v)) => s = Some(hex::decode(v).map_err(|_| SignError::Malformed)?),
            _ => return Err(SignError::Malformed),
        }
    }
    let (t, n, s) = match (t, n, s) {
        (Some(t), Some(n), Some(s)) => (t, n, s),
        _ => return Err(SignError::Malformed),
    };
    if t.abs_diff(now) > MAX_SKEW_MS {
        return Err(SignError::Skew);
    }
    let mut mac = key.mac();
    feed(&mut mac, method, path, digest, t, n);
    mac.verify_slice(&s).map_err(|_| SignError::Mismatch)?;
    Ok(Signed { t, nonce: n.to_string() })
}

/// Remembers nonces seen within the skew window so a captured request cannot be sent
/// twice. Memory is bounded by the request rate over two skew windows.
#[derive(Default, Debug)]
pub struct ReplayGuard {
    by_time: BTreeMap<Millis, Vec<String>>,
    seen: HashSet<String>,
}

impl ReplayGuard {
    /// Records a verified signature; refuses one seen before.
    pub fn check(&mut self, signed: &Signed, now: Millis) -> Result<(), SignError> {
        let horizon = now.saturating_sub(2 * MAX_SKEW_MS);
        while let Some(entry) = self.by_time.first_entry() {
            if *entry.key() >= horizon {
                break;
            }
            for n in entry.remove() {
                self.seen.remove(&n);
            }
        }
        if !self.seen.insert(signed.nonce.clone()) {
            return Err(SignError::Replay);
        }
        self.by_time.entry(signed.t).or_default().push(signed.nonce.clone());
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrfError {
    #[error("missing CSRF token")]
    Missing,
    #[error("malformed CSRF token")]
    Malformed,
    #[error("CSRF token expired")]
    Expired,
    #[error("CSRF token does not match")]
    Mismatch,
}

fn csrf_mac(key: &Key, host: &str, expires: Millis) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(format!("csrf\n{host}\n{expires}").as_bytes());
    mac
}

/// A token for forms on `host`, valid until `now + CSRF_TTL_MS`.
pub fn csrf_token(key: &Key, host: &str, now: Millis) -> String {
    let expires = now + CSRF_TTL_MS;
    format!("{expires}.{}", hex::encode(csrf_mac(key, host, expires).finalize().into_bytes()))
}

/// Checks a token made by [`csrf_token`] for the same host.
pub fn verify_csrf(key: &Key, host: &str, token: Option<&str>, now: Millis) -> Result<(), CsrfError> {
    let token = token.filter(|t| !t.is_empty()).ok_or(CsrfError::Missing)?;
    let (exp, sig) = token.split_once('.').ok_or(CsrfError::Malformed)?;
    let expires: Millis = exp.parse().map_err(|_| CsrfError::Malformed)?;
    let sig = hex::decode(sig).map_err(|_| CsrfError::Malformed)?;
    csrf_mac(key, host, expires).verify_slice(&sig).map_err(|_| CsrfError::Mismatch)?;
    if now > expires {
        return Err(CsrfError::Expired);
    }
    Ok(())
}

fn machine_mac(key: &Key, machine: &str) -> HmacSha256 {
    let mut mac = key.mac();
    mac.update(format!("machine\n{machine}").as_bytes());
    mac
}

/// The bearer token a machine's agent calls the control plane with. It names one
/// machine; the machine is told it in its user data and nothing else can make it.
pub fn machine_token(key: &Key, machine: &str) -> String {
    hex::encode(machine_mac(key, machine).finalize().into_bytes())
}

/// Checks a [`machine_token`] in constant time.
pub fn verify_machine_token(key: &Key, machine: &str, token: &str) -> bool {
    hex::decode(token).is_ok_and(|sig| machine_mac(key, machine).verify_slice(&sig).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Key {
        Key::new(b"k".to_vec())
    }

    #[test]
    fn signs_the_documented_canonical_string() {
        let canonical = "POST\n/v1/edge/wake?x=1\nabc\n1700000000123\nn0nce";
        let mut mac = key().mac();
        mac.update(canonical.as_bytes());
        let want = format!("t=1700000000123,n=n0nce,s={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(sign(&key(), "post", "/v1/edge/wake?x=1", "abc", 1_700_000_000_123, "n0nce"), want);
        let mut buf = String::from("leftover");
        sign_into(&key(), "POST", "/v1/edge/wake?x=1", "abc", 1_700_000_000_123, "n0nce", &mut buf);
        assert_eq!(buf, want);
        assert!(sign(&key(), "M", "/", "", 0, "n").starts_with("t=0,n=n,s="));
    }

    #[test]
    fn machine_tokens_name_one_machine() {
        let t = machine_token(&key(), "wg-a");
        assert!(verify_machine_token(&key(), "wg-a", &t));
        assert!(!verify_machine_token(&key(), "wg-b", &t));
        assert!(!verify_machine_token(&Key::new(b"other".to_vec()), "wg-a", &t));
        assert!(!verify_machine_token(&key(), "wg-a", "zz"));
        assert!(!verify_machine_token(&key(), "wg-a", ""));
    }

    #[test]
    fn round_trip_and_tamper() {
        let d = body_digest(b"{}");
        let h = sign(&key(), "POST", "/v1/edge/wake", &d, 1_000_000, "abc");
        let ok = verify(&key(), Some(&h), "post", "/v1/edge/wake", &d, 1_000_500).unwrap();
        assert_eq!(ok, Signed { t: 1_000_000, nonce: "abc".into() });
        assert_eq!(verify(&key(), Some(&h), "POST", "/v1/edge/rebuild", &d, 1_000_000), Err(SignError::Mismatch));
        assert_eq!(
            verify(&key(), Some(&h), "POST", "/v1/edge/wake", &body_digest(b"{ }"), 1_000_000),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            verify(&Key::new(b"other".to_vec()), Some(&h), "POST", "/v1/edge/wake", &d, 1_000_000),
            Err(SignError::Mismatch)
        );
        assert_eq!(
            verify(&key(), Some(&h), "POST", "/v1/edge/wake", &d, 1_000_000 + MAX_SKEW_MS + 1),
            Err(SignError::Skew)
        );
        assert_eq!(verify(&key(), None, "POST", "/", &d, 0), Err(SignError::Missing));
        for bad in ["", "t=1", "t=x,n=a,s=00", "t=1,n=a,s=zz", "t=1,n=a b,s=00", "q=1,t=1,n=a,s=00"] {
            assert_eq!(verify(&key(), Some(bad), "POST", "/", &d, 1), Err(SignError::Malformed), "{bad}");
        }
    }

    #[test]
    fn replays_refused_and_forgotten_later() {
        let mut g = ReplayGuard::default();
        let s = Signed { t: 1_000_000, nonce: "n1".into() };
        g.check(&s, 1_000_000).unwrap();
        assert_eq!(g.check(&s, 1_000_001), Err(SignError::Replay));
        g.check(&Signed { t: 1_000_000 + 3 * MAX_SKEW_MS, nonce: "n2".into() }, 1_000_000 + 3 * MAX_SKEW_MS).unwrap();
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn csrf() {
        let t = csrf_token(&key(), "a.localhost", 1000);
        verify_csrf(&key(), "a.localhost", Some(&t), 2000).unwrap();
        assert_eq!(verify_csrf(&key(), "b.localhost", Some(&t), 2000), Err(CsrfError::Mismatch));
        assert_eq!(verify_csrf(&key(), "a.localhost", Some(&t), 1000 + CSRF_TTL_MS + 1), Err(CsrfError::Expired));
        assert_eq!(verify_csrf(&key(), "a.localhost", None, 0), Err(CsrfError::Missing));
        assert_eq!(verify_csrf(&key(), "a.localhost", Some("nope"), 0), Err(CsrfError::Malformed));
        let forged = format!("{}.{}", 1000 + CSRF_TTL_MS * 100, t.split_once('.').unwrap().1);
        assert_eq!(verify_csrf(&key(), "a.localhost", Some(&forged), 2000), Err(CsrfError::Mismatch));
    }
}
