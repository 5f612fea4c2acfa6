//! Git ref names as previews know them: one spelling per branch.
//!
//! `refs/heads/x` and `x` name the same branch and must be one preview, so refs are
//! normalised before anything is derived from them (id, label, host). Other refs
//! (`refs/merge-requests/1/head`, `refs/pull/1/head`, tags) keep their full name. The
//! check follows `git check-ref-format`'s rules, plus a length bound and no leading `-`
//! (so a ref can never be read as an option).

/// Longest ref accepted.
pub const MAX_REF: usize = 250;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefError {
    #[error("ref is empty")]
    Empty,
    #[error("ref is longer than {MAX_REF} bytes")]
    TooLong,
    #[error("ref is not a valid git ref name ({0})")]
    Invalid(&'static str),
}

/// The one spelling of `raw`: trimmed, `refs/heads/` dropped, checked.
pub fn normalize(raw: &str) -> Result<String, RefError> {
    let r = raw.trim();
    let r = r.strip_prefix("refs/heads/").unwrap_or(r);
    if r.is_empty() {
        return Err(RefError::Empty);
    }
    if r.len() > MAX_REF {
        return Err(RefError::TooLong);
    }
    if r.starts_with('-') {
        return Err(RefError::Invalid("starts with '-'"));
    }
    if r.starts_with('/') || r.ends_with('/') || r.contains("//") {
        return Err(RefError::Invalid("empty path component"));
    }
    if r.ends_with('.') || r.ends_with(".lock") || r.split('/').any(|c| c.starts_with('.') || c.ends_with(".lock")) {
        return Err(RefError::Invalid("a component starts with '.' or ends with '.lock'"));
    }
    if r.contains("..") || r.contains("@{") || r == "@" {
        return Err(RefError::Invalid("contains '..' or '@{'"));
    }
    if r.chars().any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')) {
        return Err(RefError::Invalid("contains a space, control character or one of ~^:?*[\\"));
    }
    Ok(r.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_branch() {
        assert_eq!(normalize("main").unwrap(), "main");
        assert_eq!(normalize("refs/heads/main").unwrap(), "main");
        assert_eq!(normalize(" refs/heads/feature/x ").unwrap(), "feature/x");
        assert_eq!(normalize("refs/merge-requests/7/head").unwrap(), "refs/merge-requests/7/head");
        assert_eq!(normalize("v1.2").unwrap(), "v1.2");
    }

    #[test]
    fn refuses_what_git_refuses() {
        for bad in [
            "",
            "refs/heads/",
            "-x",
            "--upload-pack=evil",
            "a..b",
            "a b",
            "a~1",
            "a^",
            "a:b",
            "a?",
            "a*",
            "a[",
            "a\\b",
            "/a",
            "a/",
            "a//b",
            ".a",
            "a/.b",
            "a.lock",
            "a.",
            "a@{1}",
            "@",
            "a\nb",
        ] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
        assert_eq!(normalize(&"x".repeat(MAX_REF + 1)), Err(RefError::TooLong));
    }
}
