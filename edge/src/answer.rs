//! Every answer the edge makes itself (pages, JSON, redirects) as plain data, and the
//! one place errors become statuses ([`EdgeError::answer`]). Each front door only turns
//! an [`Answer`] into its platform's response type, header for header.

use std::borrow::Cow;
use wakegate_splash::{render, Context, Page};

/// A response the edge makes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, Cow<'static, str>)>,
    pub body: String,
}

impl Answer {
    /// A splash page with its status and headers.
    pub fn page(page: &Page, cx: &Context<'_>) -> Answer {
        let mut headers = vec![
            ("content-type", Cow::Borrowed("text/html; charset=utf-8")),
            ("cache-control", Cow::Borrowed("no-store")),
            ("x-robots-tag", Cow::Borrowed("noindex")),
            ("x-wakegate", Cow::Borrowed("splash")),
        ];
        if page.status() == 503 {
            headers.push(("retry-after", Cow::Borrowed("5")));
        }
        Answer { status: page.status(), headers, body: render(page, cx) }
    }

    /// A plain page with a sentence, under `status`.
    pub fn message(status: u16, reason: impl Into<String>) -> Answer {
        let mut a = Answer::page(&Page::BadRequest { reason: reason.into() }, &Context::default());
        a.status = status;
        a
    }

    pub fn json(status: u16, v: &serde_json::Value) -> Answer {
        Answer {
            status,
            headers: vec![
                ("content-type", Cow::Borrowed("application/json")),
                ("cache-control", Cow::Borrowed("no-store")),
            ],
            body: v.to_string(),
        }
    }

    /// `303 See Other` to a path that went through
    /// [`wakegate_core::redirect::safe_return_to`].
    pub fn see_other(location: &str) -> Answer {
        let location = wakegate_core::redirect::safe_return_to(location).to_string();
        Answer {
            status: 303,
            headers: vec![("location", Cow::Owned(location)), ("cache-control", Cow::Borrowed("no-store"))],
            body: String::new(),
        }
    }

    pub fn retry_after(mut self, secs: u32) -> Answer {
        self.headers.retain(|(k, _)| *k != "retry-after");
        self.headers.push(("retry-after", Cow::Owned(secs.to_string())));
        self
    }
}

/// Everything that can go wrong at the edge, the client's fault or not.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EdgeError {
    #[error("waker unreachable: {0}")]
    Waker(String),
    #[error("waker answered {0}: {1}")]
    WakerStatus(u16, String),
    #[error("origin unreachable: {0}")]
    Origin(String),
    /// The client's body broke off or was malformed (e.g. bad chunked encoding).
    #[error("request body: {0}")]
    ClientBody(String),
    #[error("the host name is not valid: {0}")]
    BadHost(#[source] wakegate_core::host::HostError),
    #[error("the request names its host more than once")]
    AmbiguousHost,
    #[error("a {0} request cannot carry a body")]
    BodyNotAllowed(&'static str),
    #[error("the request's headers are larger than {0} bytes")]
    HeadTooLarge(usize),
    #[error("the request's URL is longer than {0} bytes")]
    UriTooLong(usize),
    #[error("the body is larger than {0} bytes")]
    BodyTooLarge(usize),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many rebuilds")]
    TooManyRebuilds,
}

impl EdgeError {
    /// The status for this error: the only place one is chosen.
    pub fn status(&self) -> u16 {
        match self {
            EdgeError::Waker(_) | EdgeError::WakerStatus(..) => 503,
            EdgeError::Origin(_) => 502,
            EdgeError::ClientBody(_) | EdgeError::BadHost(_) | EdgeError::AmbiguousHost => 400,
            EdgeError::BodyNotAllowed(_) => 400,
            EdgeError::HeadTooLarge(_) => 431,
            EdgeError::UriTooLong(_) => 414,
            EdgeError::BodyTooLarge(_) => 413,
            EdgeError::Forbidden(_) => 403,
            EdgeError::TooManyRebuilds => 429,
        }
    }

    /// The page a visitor sees.
    pub fn answer(&self) -> Answer {
        let reason: Cow<'static, str> = match self {
            EdgeError::Waker(_) | EdgeError::WakerStatus(..) => {
                "Wakegate's control plane is not answering. Try again in a moment.".into()
            }
            EdgeError::Origin(_) => "The preview did not answer. Try again in a moment.".into(),
            EdgeError::ClientBody(_) => "The request's body was malformed or cut off.".into(),
            EdgeError::TooManyRebuilds => "Too many rebuilds were asked for. Try again later.".into(),
            EdgeError::Forbidden(reason) => reason.clone().into(),
            other => capitalized(&other.to_string()).into(),
        };
        let a = Answer::message(self.status(), reason);
        match self.status() {
            502 | 503 => a.retry_after(5),
            _ => a,
        }
    }

    /// Worth a warning in the log (the edge's or a dependency's trouble, not a client's).
    pub fn is_ours(&self) -> bool {
        matches!(self, EdgeError::Waker(_) | EdgeError::WakerStatus(..) | EdgeError::Origin(_))
    }
}

/// "the host…" → "The host….": the error's sentence as a page says it.
fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_has_a_page_with_its_status() {
        let all = [
            EdgeError::Waker("x".into()),
            EdgeError::WakerStatus(500, "x".into()),
            EdgeError::Origin("x".into()),
            EdgeError::ClientBody("x".into()),
            EdgeError::BadHost(wakegate_core::host::HostError::Empty),
            EdgeError::AmbiguousHost,
            EdgeError::BodyNotAllowed("GET"),
            EdgeError::HeadTooLarge(1),
            EdgeError::UriTooLong(1),
            EdgeError::BodyTooLarge(1),
            EdgeError::Forbidden("no".into()),
            EdgeError::TooManyRebuilds,
        ];
        for e in all {
            let a = e.answer();
            assert_eq!(a.status, e.status());
            assert!(a.body.contains("<html") || a.body.contains("<!doctype"), "{e}");
        }
        assert!(EdgeError::BadHost(wakegate_core::host::HostError::Empty).answer().body.contains("The host name"));
    }

    #[test]
    fn see_other_never_leaves_the_origin() {
        for bad in ["/\n", "/\\evil.example", "/\t/evil.example", "//x"] {
            assert_eq!(Answer::see_other(bad).headers[0].1, "/");
        }
    }
}
