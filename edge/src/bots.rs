//! Clients that must never wake or rebuild a preview, nor count as activity: crawlers,
//! link unfurlers, uptime probes, and speculative loads (prefetch, prerender, previews).
//!
//! The lists are data: each entry names where it comes from, so it can be checked and
//! kept current. Matching is a case-insensitive substring test on the `User-Agent`.

/// A user-agent marker and the source that documents it.
pub struct Marker {
    /// Lowercase substring of the user agent.
    pub needle: &'static str,
    /// Where this client is documented (or, for generic words, why they are here).
    pub source: &'static str,
}

const fn m(needle: &'static str, source: &'static str) -> Marker {
    Marker { needle, source }
}

/// User agents that never wake anything.
pub const USER_AGENTS: &[Marker] = &[
    // generic words crawlers use for themselves
    m("bot", "convention: crawlers call themselves *bot (Googlebot, bingbot, …)"),
    m("crawler", "convention"),
    m("spider", "convention (Baiduspider, …)"),
    m("slurp", "Yahoo! Slurp: https://help.yahoo.com/kb/SLN22600.html"),
    // Google's non-bot fetchers: https://developers.google.com/search/docs/crawling-indexing/google-common-crawlers
    m("googleother", "GoogleOther: developers.google.com/search/docs/crawling-indexing/google-common-crawlers"),
    m(
        "google-pagerenderer",
        "Chat/Docs link unfurls: developers.google.com/search/docs/crawling-indexing/google-user-triggered-fetchers",
    ),
    m(
        "google-safety",
        "Google-Safety: developers.google.com/search/docs/crawling-indexing/google-special-case-crawlers",
    ),
    m(
        "google-inspectiontool",
        "Search Console: developers.google.com/search/docs/crawling-indexing/google-common-crawlers",
    ),
    m(
        "googlehc",
        "Google Cloud load-balancer health checks: cloud.google.com/load-balancing/docs/health-check-concepts",
    ),
    m("feedfetcher-google", "developers.google.com/search/docs/crawling-indexing/google-user-triggered-fetchers"),
    // link unfurlers
    m("facebookexternalhit", "developers.facebook.com/docs/sharing/webmasters/web-crawlers"),
    m("facebookcatalog", "developers.facebook.com/docs/sharing/webmasters/web-crawlers"),
    m("meta-externalagent", "developers.facebook.com/docs/sharing/webmasters/web-crawlers"),
    m("embedly", "Embedly: embed.ly/docs"),
    m("whatsapp", "WhatsApp link previews (WhatsApp/2.x)"),
    m("skypeuripreview", "Skype/Teams link previews"),
    m("microsoftpreview", "Teams/Outlook link previews (MicrosoftPreview/2.0)"),
    m("slack-imgproxy", "api.slack.com/robots"),
    m("slackbot", "api.slack.com/robots"),
    m("discordbot", "Discord unfurls (Discordbot/2.0)"),
    m("telegrambot", "Telegram link previews (TelegramBot (like TwitterBot))"),
    m("twitterbot", "developer.x.com/en/docs/x-for-websites/cards/guides/getting-started"),
    m("linkedinbot", "LinkedIn post inspector"),
    m("pinterest", "Pinterest crawler: help.pinterest.com (Pinterestbot)"),
    m("redditbot", "Reddit link previews"),
    m("mastodon", "Mastodon link previews (http.rb/… Mastodon/4.x)"),
    m("bitlybot", "Bitly link checks"),
    m("iframely", "Iframely: iframely.com/docs"),
    m("outbrain", "Outbrain crawler"),
    m("quora link preview", "Quora link previews"),
    m("vkshare", "VK link previews"),
    m("w3c_validator", "validator.w3.org"),
    m("preview", "link previewers that say so (e.g. Mattermost-Bot, Zoom, Jira)"),
    // uptime probes and health checks
    m("uptimerobot", "uptimerobot.com"),
    m("pingdom", "pingdom.com (Pingdom.com_bot_version_1.4)"),
    m("statuscake", "statuscake.com"),
    m("site24x7", "site24x7.com"),
    m("better uptime", "betterstack.com"),
    m("betterstack", "betterstack.com"),
    m("checkly", "checklyhq.com"),
    m("datadog", "Datadog Synthetics"),
    m("newrelicpinger", "New Relic synthetics"),
    m("nagios", "Nagios check_http"),
    m("zabbix", "Zabbix web monitoring"),
    m("monitis", "Monitis"),
    m("freshping", "Freshping"),
    m("hetrixtools", "HetrixTools"),
    m("updown.io", "updown.io"),
    m("uptime-kuma", "Uptime Kuma"),
    m("cloudflare-healthchecks", "developers.cloudflare.com/health-checks"),
    m("elb-healthchecker", "AWS ELB health checks"),
    m("kube-probe", "Kubernetes liveness/readiness probes"),
    m("prometheus", "Prometheus blackbox exporter"),
    m("blackbox", "Prometheus blackbox exporter"),
    m("lighthouse", "Chrome Lighthouse / PageSpeed"),
];

/// Request headers that announce a speculative load, and the values that mean it.
pub const PURPOSE_HEADERS: &[(&str, &str, &str)] = &[
    ("sec-purpose", "prefetch", "Chromium prefetch and prerender: wicg.github.io/nav-speculation (Sec-Purpose)"),
    ("purpose", "prefetch", "older Chromium and Safari prefetch (Purpose: prefetch)"),
    ("x-moz", "prefetch", "Firefox link prefetch: developer.mozilla.org/docs/Glossary/Prefetch"),
    ("x-purpose", "preview", "Safari top-sites / link previews (X-Purpose: preview)"),
    ("sec-purpose", "prerender", "Chromium prerender (Sec-Purpose: prefetch;prerender)"),
];

fn contains_ignore_case(haystack: &str, lower_needle: &str) -> bool {
    let (h, n) = (haystack.as_bytes(), lower_needle.as_bytes());
    n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n))
}

/// All user-agent markers in one automaton: one pass over the user agent per request
/// instead of one per marker (it runs on every proxied request).
static AGENTS: std::sync::LazyLock<Option<aho_corasick::AhoCorasick>> = std::sync::LazyLock::new(|| {
    aho_corasick::AhoCorasick::builder().ascii_case_insensitive(true).build(USER_AGENTS.iter().map(|m| m.needle)).ok()
});

/// True for crawlers, unfurlers and uptime probes.
pub fn is_bot_agent(user_agent: &str) -> bool {
    match AGENTS.as_ref() {
        Some(ac) => ac.is_match(user_agent),
        None => USER_AGENTS.iter().any(|m| contains_ignore_case(user_agent, m.needle)),
    }
}

/// True for crawlers, unfurlers, uptime probes and speculative prefetches; `header`
/// looks a request header up by its lowercase name.
pub fn is_bot<'a>(header: impl Fn(&str) -> Option<&'a str>) -> bool {
    header("user-agent").is_some_and(is_bot_agent)
        || PURPOSE_HEADERS.iter().any(|(n, v, _)| header(n).is_some_and(|h| contains_ignore_case(h, v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ua(agent: &str) -> bool {
        is_bot(|n| (n == "user-agent").then_some(agent))
    }

    #[test]
    fn knows_its_bots() {
        for agent in [
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
            "facebookexternalhit/1.1",
            "Mozilla/5.0 (compatible; Googlebot/2.1)",
            "UptimeRobot/2.0",
            "Pingdom.com_bot_version_1.4",
            "kube-probe/1.29",
            "Mozilla/5.0 (compatible; Discordbot/2.0)",
            "TelegramBot (like TwitterBot)",
            "Google-PageRenderer Google (+https://developers.google.com/+/web/snippet/)",
            "Mozilla/5.0 (compatible; GoogleOther)",
            "Google-Safety",
            "Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; Google-InspectionTool/1.0)",
            "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/42.0 Safari/537.36 MicrosoftPreview/2.0",
        ] {
            assert!(ua(agent), "{agent}");
        }
        for agent in [
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0 Safari/537.36",
            "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Safari/605.1.15",
            "curl/8.5.0",
        ] {
            assert!(!ua(agent), "{agent}");
        }
        assert!(!is_bot(|_| None));
    }

    #[test]
    fn speculative_loads_are_not_people() {
        let with = |name: &'static str, value: &'static str| is_bot(move |n| (n == name).then_some(value));
        assert!(with("sec-purpose", "prefetch"));
        assert!(with("sec-purpose", "prefetch;prerender"));
        assert!(with("purpose", "prefetch"));
        assert!(with("x-moz", "prefetch"));
        assert!(with("x-purpose", "preview"));
        assert!(with("x-purpose", "Preview"));
        assert!(!with("x-purpose", "navigate"));
    }

    #[test]
    fn every_entry_is_lowercase_and_sourced() {
        for m in USER_AGENTS {
            assert_eq!(m.needle, m.needle.to_ascii_lowercase());
            assert!(!m.source.is_empty() && !m.needle.is_empty());
        }
        for (n, v, src) in PURPOSE_HEADERS {
            assert_eq!(*n, n.to_ascii_lowercase());
            assert_eq!(*v, v.to_ascii_lowercase());
            assert!(!src.is_empty());
        }
    }
}
