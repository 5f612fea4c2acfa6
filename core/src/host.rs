//! Hostnames: the strict `Host` normalizer and the preview hostname scheme.
//!
//! Every hostname that reaches routing has gone through [`normalize_host`]: lowercase,
//! port stripped, one trailing dot removed, IDNA (UTS #46) mapped to ASCII, labels of
//! `[a-z0-9-]` only, at most 63 bytes a label and 253 in all. Anything else is an error
//! that names the problem; nothing is guessed.

use sha2::{Digest, Sha256};
use std::borrow::{Borrow, Cow};
use std::fmt;

/// Longest DNS label (RFC 1035).
pub const MAX_LABEL: usize = 63;
/// Longest hostname in presentation form without the trailing dot.
pub const MAX_HOST: usize = 253;
/// Longest raw `Host` header value we even look at.
pub const MAX_RAW_HOST: usize = 1024;
/// Hex characters of `sha256(project ":" ref)` in a preview label and id: 64 bits, so no
/// two refs of any projects are expected to share one (the create checks anyway).
pub const HASH_LEN: usize = 16;

/// A hostname that passed [`normalize_host`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(String);

impl Host {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Lets maps keyed by `Host` be searched with a borrowed, already-canonical `&str`
/// (see [`canonical_host`]) without building a `Host`.
impl Borrow<str> for Host {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a `Host` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("host is empty")]
    Empty,
    #[error("host is longer than {MAX_RAW_HOST} bytes")]
    TooLong,
    #[error("host has an invalid port")]
    BadPort,
    #[error("IP literals are not preview hosts")]
    IpLiteral,
    #[error("host is not a valid internationalized domain name")]
    Idna,
    #[error("label {0:?} is empty or longer than 63 bytes")]
    LabelLength(String),
    #[error("label {0:?} has a character outside a-z, 0-9 and '-'")]
    BadCharacter(String),
    #[error("label {0:?} starts or ends with '-'")]
    Hyphen(String),
    #[error("host is longer than 253 bytes")]
    HostLength,
}

/// Normalizes a `Host` header (or `:authority`) value.
///
/// Accepts `Name`, `name:8080`, `name.` and Unicode names; refuses IP literals, userinfo,
/// empty labels, characters outside LDH after IDNA mapping and anything over the DNS
/// length limits.
pub fn normalize_host(raw: &str) -> Result<Host, HostError> {
    canonical_host(raw).map(|c| Host(c.into_owned()))
}

/// [`normalize_host`] without the allocation when `raw` is already canonical (lowercase
/// ASCII, with or without a port): the hot path of the edge, which looks the borrowed
/// name up in its route cache and only builds a [`Host`] on a miss.
pub fn canonical_host(raw: &str) -> Result<Cow<'_, str>, HostError> {
    if raw.len() > MAX_RAW_HOST {
        return Err(HostError::TooLong);
    }
    let raw = raw.trim();
    if raw.is_empty() {
        return Err(HostError::Empty);
    }
    if raw.starts_with('[') {
        return Err(HostError::IpLiteral);
    }
    let name = match raw.rsplit_once(':') {
        Some((name, port)) => {
            if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
                return Err(HostError::BadPort);
            }
            if port.parse::<u16>().is_err() {
                return Err(HostError::BadPort);
            }
            name
        }
        None => raw,
    };
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err(HostError::Empty);
    }
    let ascii: Cow<'_, str> = if !name.is_ascii() {
        Cow::Owned(idna::domain_to_ascii_strict(name).map_err(|_| HostError::Idna)?)
    } else if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    };
    if ascii.len() > MAX_HOST {
        return Err(HostError::HostLength);
    }
    for label in ascii.split('.') {
        check_label(label)?;
    }
    if ascii.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit())) {
        return Err(HostError::IpLiteral);
    }
    Ok(ascii)
}

fn check_label(label: &str) -> Result<(), HostError> {
    if label.is_empty() || label.len() > MAX_LABEL {
        return Err(HostError::LabelLength(label.to_string()));
    }
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(HostError::BadCharacter(label.to_string()));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(HostError::Hyphen(label.to_string()));
    }
    Ok(())
}

/// Turns any string into a DNS-label-safe slug: lowercase ASCII letters and digits,
/// runs of anything else folded into one `-`, no leading or trailing `-`, at most `max`
/// bytes. May return an empty string.
pub fn slugify(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max));
    let mut dash = false;
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c);
        } else {
            dash = true;
        }
        if out.len() >= max {
            break;
        }
    }
    out.truncate(max);
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The deterministic hash part of a preview label: a prefix of
/// `sha256(project_id ":" git_ref)` in hex. Project ids are random, so the label cannot
/// be guessed from a project and branch name alone.
pub fn ref_hash(project_id: &str, git_ref: &str) -> String {
    let mut h = Sha256::new();
    h.update(project_id.as_bytes());
    h.update(b":");
    h.update(git_ref.as_bytes());
    hex::encode(h.finalize())[..HASH_LEN].to_string()
}

/// Strips the usual ref prefixes (`refs/heads/`, `refs/`) for display and slugs.
pub fn short_ref(git_ref: &str) -> &str {
    git_ref.strip_prefix("refs/heads/").or_else(|| git_ref.strip_prefix("refs/")).unwrap_or(git_ref)
}

/// The one-label name of a preview under the preview base:
/// `<project>-<ref-slug>-<hash>`, always ≤ 63 bytes and a valid label.
pub fn preview_label(project_slug: &str, project_id: &str, git_ref: &str) -> String {
    let hash = ref_hash(project_id, git_ref);
    // budget: label minus hash and two dashes
    let budget = MAX_LABEL - HASH_LEN - 2;
    let project = slugify(project_slug, 20);
    let project = if project.is_empty() { "p".to_string() } else { project };
    let ref_budget = budget - project.len();
    let slug = slugify(short_ref(git_ref), ref_budget);
    if slug.is_empty() {
        format!("{project}-{hash}")
    } else {
        format!("{project}-{slug}-{hash}")
    }
}

/// The label a preview has under a custom org base: `<project>-<ref-slug>` (no hash,
/// the org chose to make these names readable). Truncated to 63 bytes.
pub fn custom_label(project_slug: &str, git_ref: &str) -> String {
    let project = slugify(project_slug, 20);
    let project = if project.is_empty() { "p".to_string() } else { project };
    let slug = slugify(short_ref(git_ref), MAX_LABEL - project.len() - 1);
    if slug.is_empty() {
        project
    } else {
        format!("{project}-{slug}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_port_and_trailing_dot() {
        assert_eq!(normalize_host("App-Main.Preview.Example.COM:8443.").err(), Some(HostError::BadPort));
        assert_eq!(
            normalize_host("App-Main.Preview.Example.COM.:8443").unwrap().as_str(),
            "app-main.preview.example.com"
        );
        assert_eq!(normalize_host("a.localhost:80").unwrap().as_str(), "a.localhost");
        assert_eq!(normalize_host("a.localhost.").unwrap().as_str(), "a.localhost");
    }

    #[test]
    fn canonical_names_are_borrowed() {
        assert!(matches!(canonical_host("a-b.localhost:8080"), Ok(Cow::Borrowed("a-b.localhost"))));
        assert!(matches!(canonical_host("A.localhost"), Ok(Cow::Owned(_))));
    }

    #[test]
    fn maps_idna() {
        assert_eq!(normalize_host("Bücher.example").unwrap().as_str(), "xn--bcher-kva.example");
        assert_eq!(normalize_host("bücher.example:8080").unwrap().as_str(), "xn--bcher-kva.example");
        assert_eq!(normalize_host("xn--bcher-kva.example").unwrap().as_str(), "xn--bcher-kva.example");
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            " ",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a_b.c",
            "a b.c",
            "a.b:",
            "a.b:99999",
            "a.b:-1",
            "[::1]:80",
            "127.0.0.1",
            "user@host",
            "a/b",
            "a.b:80:80",
            "\u{0}x.y",
            "a.b%20",
        ] {
            assert!(normalize_host(bad).is_err(), "{bad:?} should be rejected");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        assert!(matches!(normalize_host(&long_label), Err(HostError::LabelLength(_))));
        let long_host = vec!["a".repeat(60); 5].join(".");
        assert_eq!(normalize_host(&long_host), Err(HostError::HostLength));
        assert_eq!(normalize_host(&"a".repeat(2000)), Err(HostError::TooLong));
    }

    #[test]
    fn labels_are_valid_and_deterministic() {
        let l = preview_label("Shop", "p_1", "refs/heads/feature/Add Cart!");
        assert!(l.starts_with("shop-feature-add-cart-"), "{l}");
        assert_eq!(l, preview_label("Shop", "p_1", "refs/heads/feature/Add Cart!"));
        assert_ne!(l, preview_label("Shop", "p_2", "refs/heads/feature/Add Cart!"));
        let long = preview_label(&"x".repeat(100), "p", &"y/".repeat(100));
        assert!(long.len() <= MAX_LABEL);
        normalize_host(&format!("{long}.example.com")).unwrap();
        let weird = preview_label("!!!", "p", "///");
        normalize_host(&format!("{weird}.example.com")).unwrap();
    }

    #[test]
    fn slugify_folds_runs() {
        assert_eq!(slugify("--Feature__X--", 63), "feature-x");
        assert_eq!(slugify("abc-def", 4), "abc");
        assert_eq!(custom_label("web", "refs/heads/main"), "web-main");
    }

    proptest::proptest! {
        #[test]
        fn normalized_hosts_are_fixed_points(s in ".{0,80}") {
            if let Ok(h) = normalize_host(&s) {
                proptest::prop_assert_eq!(normalize_host(h.as_str()).unwrap(), h.clone());
                proptest::prop_assert!(h.as_str().len() <= MAX_HOST);
            }
        }

        #[test]
        fn preview_labels_always_parse(p in ".{0,40}", r in ".{0,120}") {
            let label = preview_label(&p, "id", &r);
            proptest::prop_assert!(label.len() <= MAX_LABEL);
            let host = format!("{label}.preview.test");
            proptest::prop_assert!(normalize_host(&host).is_ok(), "{}", host);
        }
    }
}
