//! Clients that must never wake or rebuild a preview, nor count as activity.

/// Lowercase substrings of user agents of crawlers, link unfurlers and uptime probes.
const BOT_MARKERS: &[&str] = &[
    "bot",
    "crawler",
    "spider",
    "slurp",
    "facebookexternalhit",
    "facebookcatalog",
    "embedly",
    "whatsapp",
    "skypeuripreview",
    "slack-imgproxy",
    "slackbot",
    "discordbot",
    "telegrambot",
    "twitterbot",
    "linkedinbot",
    "pinterest",
    "redditbot",
    "mastodon",
    "bitlybot",
    "iframely",
    "outbrain",
    "quora link preview",
    "vkshare",
    "w3c_validator",
    "uptimerobot",
    "pingdom",
    "statuscake",
    "site24x7",
    "better uptime",
    "betterstack",
    "checkly",
    "datadog",
    "newrelicpinger",
    "nagios",
    "zabbix",
    "monitis",
    "freshping",
    "hetrixtools",
    "updown.io",
    "uptime-kuma",
    "cloudflare-healthchecks",
    "elb-healthchecker",
    "googlehc",
    "kube-probe",
    "prometheus",
    "blackbox",
    "lighthouse",
    "chrome-lighthouse",
    "preview",
];

/// True for crawlers, unfurlers, uptime probes and speculative prefetches.
pub fn is_bot(user_agent: Option<&str>, purpose: Option<&str>) -> bool {
    if purpose.is_some_and(|p| p.to_ascii_lowercase().contains("prefetch")) {
        return true;
    }
    let Some(ua) = user_agent else { return false };
    let ua = ua.to_ascii_lowercase();
    BOT_MARKERS.iter().any(|m| ua.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_its_bots() {
        for ua in [
            "Slackbot-LinkExpanding 1.0 (+https://api.slack.com/robots)",
            "facebookexternalhit/1.1",
            "Mozilla/5.0 (compatible; Googlebot/2.1)",
            "UptimeRobot/2.0",
            "Pingdom.com_bot_version_1.4",
            "kube-probe/1.29",
            "Mozilla/5.0 (compatible; Discordbot/2.0)",
            "TelegramBot (like TwitterBot)",
        ] {
            assert!(is_bot(Some(ua), None), "{ua}");
        }
        for ua in [
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/156.0 Safari/537.36",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) HeadlessChrome/156.0 Safari/537.36",
            "curl/8.5.0",
        ] {
            assert!(!is_bot(Some(ua), None), "{ua}");
        }
        assert!(is_bot(Some("Mozilla/5.0 Chrome"), Some("prefetch")));
        assert!(!is_bot(None, None));
    }
}
