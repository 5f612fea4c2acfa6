//! Every page the Wakegate edge shows, rendered by one askama template.
//!
//! [`render`] is pure: a [`Page`] plus the [`Context`] of the preview in, HTML out. Pages
//! that wait (waking, building) poll `/_wakegate/status` and reload themselves into the
//! app; pages that offer a rebuild carry a POST form with a CSRF token (GET never
//! rebuilds). Builds for wasm32 so the Worker renders the same pages.
#![forbid(unsafe_code)]

use askama::Template;
use wakegate_core::lifecycle::{GoneWhy, Phase};
use wakegate_core::route::Change;

/// Which page, with what it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Page {
    /// Asleep or waking: the wake runs, the page reloads when the app answers.
    Waking,
    /// A build is under way, at this phase, this far into it (a database restore).
    Building { phase: Phase, progress: Option<wakegate_core::route::Progress> },
    /// Erased, branch still there: one button rebuilds.
    /// `by_ttl`: erased because its time was up (else by hand).
    ConfirmRebuild { csrf: String, by_ttl: bool },
    /// The last build or wake failed.
    Failed { phase: Phase, reason: String, csrf: String },
    /// The branch is gone, or the merge request `change` was closed or merged (410).
    Gone { why: GoneWhy, change: Option<Change> },
    /// The host is an org's custom name under `domain`, whose ownership record has been
    /// missing for longer than the grace period (403).
    Suspended { domain: String },
    /// No preview has this hostname (404).
    NotFound { host: String },
    /// The request itself was bad (400), e.g. a malformed host.
    BadRequest { reason: String },
}

impl Page {
    /// The HTTP status the edge sends with this page.
    pub fn status(&self) -> u16 {
        match self {
            Page::Waking | Page::Building { .. } | Page::Failed { .. } => 503,
            Page::ConfirmRebuild { .. } => 200,
            Page::Gone { .. } => 410,
            Page::Suspended { .. } => 403,
            Page::NotFound { .. } => 404,
            Page::BadRequest { .. } => 400,
        }
    }
}

/// What the page says about the preview.
#[derive(Clone, Debug, Default)]
pub struct Context<'a> {
    pub project: &'a str,
    pub git_ref: &'a str,
    /// The record version the status poll starts after.
    pub version: u64,
    /// Where the form returns the visitor after a rebuild starts.
    pub return_to: &'a str,
    pub ttl_remaining: Option<String>,
}

struct Link {
    href: String,
    text: String,
}

struct Form {
    csrf: String,
    return_to: String,
    button: &'static str,
}

#[derive(Template)]
#[template(path = "page.html")]
struct Html<'a> {
    title: &'a str,
    heading: String,
    message: String,
    detail: Option<String>,
    project: &'a str,
    git_ref: &'a str,
    poll: bool,
    phase_text: String,
    version: u64,
    form: Option<Form>,
    link: Option<Link>,
    ttl: Option<String>,
}

/// Renders a page.
pub fn render(page: &Page, cx: &Context<'_>) -> String {
    let git_ref = wakegate_core::host::short_ref(cx.git_ref);
    let form = |csrf: &str, button| Some(Form { csrf: csrf.to_string(), return_to: safe_return(cx.return_to), button });
    let mut link = None;
    let (title, heading, message, detail, poll, phase_text, form) = match page {
        Page::Waking => (
            "Waking up",
            "Waking this preview".to_string(),
            "It was asleep to save resources. This page turns into the app as soon as it answers.".to_string(),
            None,
            true,
            "Starting the app",
            None,
        ),
        Page::Building { phase, .. } => (
            "Building",
            "Building this preview".to_string(),
            "This page turns into the app when the build is done.".to_string(),
            None,
            true,
            phase.label(),
            None,
        ),
        Page::ConfirmRebuild { csrf, by_ttl } => (
            "Preview erased",
            "This preview was erased".to_string(),
            format!(
                "{} The branch {git_ref} still exists, so it can be rebuilt; this tab becomes the preview when it is ready.",
                if *by_ttl { "Its time was up, so it was erased to save resources." } else { "Someone erased it." }
            ),
            None,
            false,
            "",
            form(csrf, "Rebuild this preview"),
        ),
        Page::Failed { phase: Phase::Run, reason, csrf } => (
            "Preview stopped",
            "This preview stopped".to_string(),
            "It stopped while it was running.".to_string(),
            Some(reason.clone()),
            false,
            "",
            form(csrf, "Start it again"),
        ),
        Page::Failed { phase, reason, csrf } => (
            "Preview failed",
            "This preview failed to start".to_string(),
            format!("It stopped at: {}.", phase.label()),
            Some(reason.clone()),
            false,
            "",
            form(csrf, "Try again"),
        ),
        Page::Suspended { domain } => (
            "Address suspended",
            "This address is suspended".to_string(),
            format!(
                "Previews answer here only while {domain} proves it belongs to its org, and its record (_wakegate-challenge.{domain}) has gone missing. This address works again once the record is back; the preview's own address still works."
            ),
            None,
            false,
            "",
            None,
        ),
        Page::Gone { why, change } => {
            // only a web link is followed: the URL came from a forge's webhook
            link = change.as_ref().filter(|c| c.url.starts_with("https://") || c.url.starts_with("http://")).map(|c| {
                Link { href: c.url.clone(), text: format!("Open merge request {} on {}", c.reference(), forge_name(c)) }
            });
            let reference = change.as_ref().map(Change::reference).unwrap_or_else(|| "of this preview".into());
            let (heading, message) = match why {
                GoneWhy::RefDeleted => (
                    "This preview is gone".to_string(),
                    format!("The branch or merge request {git_ref} no longer exists, so there is nothing to rebuild."),
                ),
                GoneWhy::Closed => (
                    "This preview is gone: closed".to_string(),
                    format!("The merge request {reference} was closed without merging, so its preview was erased."),
                ),
                GoneWhy::Merged => (
                    format!("This preview is gone: merged in {reference}"),
                    format!("The merge request {reference} was merged, so its preview was erased. The change now lives in its target branch."),
                ),
            };
            ("Preview gone", heading, message, None, false, "", None)
        }
        Page::NotFound { host } => (
            "Not found",
            "No preview here".to_string(),
            format!("Nothing is configured for {host}. Check the link, or ask for a fresh one."),
            None,
            false,
            "",
            None,
        ),
        Page::BadRequest { reason } => {
            ("Bad request", "That request was not understood".to_string(), reason.clone(), None, false, "", None)
        }
    };
    let project = if cx.project.is_empty() { "Wakegate" } else { cx.project };
    Html {
        title,
        heading,
        message,
        detail,
        project,
        git_ref,
        poll,
        phase_text: match page {
            Page::Building { phase, progress: Some(p) } => format!("{} — {}", phase.label(), p.text()),
            _ => phase_text.to_string(),
        },
        version: cx.version,
        form,
        link,
        ttl: cx.ttl_remaining.clone(),
    }
    .render()
    .unwrap_or_else(|e| format!("<!doctype html><title>Wakegate</title><p>page error: {e}</p>"))
}

fn forge_name(c: &Change) -> &'static str {
    match c.forge {
        wakegate_core::route::ForgeKind::Gitlab => "GitLab",
        wakegate_core::route::ForgeKind::Github => "GitHub",
    }
}

/// Only plain same-origin paths are allowed as a return target (the sanitizer the edge
/// uses too).
fn safe_return(path: &str) -> String {
    wakegate_core::redirect::safe_return_to(path).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cx() -> Context<'static> {
        Context {
            project: "web",
            git_ref: "refs/heads/feature/<b>",
            version: 7,
            return_to: "/cart?x=1",
            ttl_remaining: None,
        }
    }

    #[test]
    fn confirm_page_has_a_post_form_with_token() {
        let html = render(&Page::ConfirmRebuild { csrf: "123.abc".into(), by_ttl: true }, &cx());
        assert!(html.contains("Its time was up"));
        assert!(html.contains(r#"<form method="post" action="/_wakegate/rebuild">"#));
        assert!(html.contains(r#"name="csrf" value="123.abc""#));
        assert!(html.contains(r#"name="return_to" value="/cart?x=1""#));
        assert!(!html.contains("feature/<b>") && html.contains("feature/&#60;b&#62;"), "ref is escaped");
        assert!(!html.contains("<script>"), "nothing to poll");
    }

    #[test]
    fn waiting_pages_poll_from_their_version() {
        let html = render(&Page::Building { phase: Phase::Build, progress: None }, &cx());
        assert!(html.contains("var version = 7;"));
        assert!(html.contains("/_wakegate/status?after="));
        assert!(html.contains(r#"role="status""#));
        assert_eq!(Page::Building { phase: Phase::Build, progress: None }.status(), 503);
        let restoring = Page::Building {
            phase: Phase::RestoringDb,
            progress: Some(wakegate_core::route::Progress { done: 12_345_678, total: 50_000_000, how: None }),
        };
        let html = render(&restoring, &cx());
        assert!(html.contains("Restoring the database — 12.3 MB of 50.0 MB"), "{html}");
        let how = Some(wakegate_core::route::Restore::ImportWhileBaking);
        let baking = Page::Building {
            phase: Phase::RestoringDb,
            progress: Some(wakegate_core::route::Progress { done: 1_000_000, total: 2_000_000, how }),
        };
        let html = render(&baking, &cx());
        assert!(
            html.contains("Restoring the database — importing the dump, 1.0 MB of 2.0 MB (its image is being baked"),
            "{html}"
        );
    }

    #[test]
    fn gone_pages_say_why_and_link_the_merge_request() {
        let change = |url: &str| Change { forge: wakegate_core::route::ForgeKind::Gitlab, number: 42, url: url.into() };
        let merged = render(
            &Page::Gone {
                why: GoneWhy::Merged,
                change: Some(change("https://gitlab.example/a/b/-/merge_requests/42")),
            },
            &cx(),
        );
        assert!(merged.contains("This preview is gone: merged in !42"), "{merged}");
        assert!(merged.contains(r#"href="https://gitlab.example/a/b/-/merge_requests/42""#));
        let closed = render(&Page::Gone { why: GoneWhy::Closed, change: Some(change("javascript:alert(1)")) }, &cx());
        assert!(closed.contains("gone: closed") && closed.contains("!42 was closed"));
        assert!(!closed.contains("javascript:"), "only web links are followed");
        let deleted = render(&Page::Gone { why: GoneWhy::RefDeleted, change: None }, &cx());
        assert!(deleted.contains("no longer exists") && !deleted.contains("<a "));
    }

    #[test]
    fn escapes_and_statuses() {
        let html = render(&Page::NotFound { host: "<x>.localhost".into() }, &Context::default());
        assert!(!html.contains("<x>") && html.contains("&#60;x&#62;.localhost"));
        let gone = Page::Gone { why: GoneWhy::RefDeleted, change: None };
        assert_eq!(gone.status(), 410);
        let suspended = render(&Page::Suspended { domain: "acme.com".into() }, &cx());
        assert!(suspended.contains("This address is suspended") && suspended.contains("_wakegate-challenge.acme.com"));
        assert_eq!(Page::Suspended { domain: "acme.com".into() }.status(), 403);
        assert_eq!(safe_return("//evil.example"), "/");
        assert_eq!(safe_return("https://evil.example"), "/");
        let stopped = render(&Page::Failed { phase: Phase::Run, reason: "r".into(), csrf: "t".into() }, &cx());
        assert!(stopped.contains("This preview stopped") && stopped.contains("Start it again"), "{stopped}");
        let failed = render(&Page::Failed { phase: Phase::Build, reason: "exit 2".into(), csrf: "t".into() }, &cx());
        assert!(failed.contains("exit 2") && failed.contains("Try again"));
    }
}
