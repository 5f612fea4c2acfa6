//! The rules an org's domain names and preview bases pass before Wakegate answers for
//! them. Every refusal names its rule.
//!
//! A name is first normalised (UTS #46 IDNA to ASCII, lower-cased, one trailing dot
//! removed); then, in order: the syntax of a hostname (no wildcard, no IP address, no
//! empty label, LDH characters, DNS lengths), look-alikes (a label mixing Latin, Greek
//! and Cyrillic letters, or written wholly in Greek or Cyrillic letters that read as
//! Latin: the two cases that browsers, following Chromium's IDN policy, show as
//! punycode), and the Public Suffix List (ICANN and private sections, through `psl`):
//! nobody can prove they own a public suffix, and a base must not be an apex. What
//! depends on the store (verified parents, other orgs' bases) is checked by the caller
//! with [`check_base_against`].

use std::net::IpAddr;
use wakegate_core::host::{MAX_HOST, MAX_LABEL};

/// Longest preview base: a 63-byte preview label and its dot must still fit in 253.
pub const MAX_BASE: usize = MAX_HOST - MAX_LABEL - 1;

/// Why a domain or base was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("{0:?} is a wildcard: give the name itself (previews.acme.com); the wildcard DNS record comes after")]
    Wildcard(String),
    #[error("{0:?} is an IP address, not a domain name")]
    IpAddress(String),
    #[error("{0:?} has an empty label")]
    EmptyLabel(String),
    #[error("{name:?}: label {label:?} is longer than 63 bytes")]
    LabelTooLong { name: String, label: String },
    #[error("{name:?} has {ch:?}, which cannot be in a hostname (letters, digits and inner '-' only)")]
    BadCharacter { name: String, ch: char },
    #[error("{name:?}: label {label:?} starts or ends with '-'")]
    Hyphen { name: String, label: String },
    #[error("{name:?} is longer than {max} bytes{why}")]
    TooLong { name: String, max: usize, why: &'static str },
    #[error("{0:?} is not a valid internationalized domain name")]
    Idna(String),
    #[error("{name:?}: label {label:?} mixes {a} and {b} letters, a look-alike of another name")]
    MixedScripts { name: String, label: String, a: &'static str, b: &'static str },
    #[error("{name:?}: label {label:?} is written in {script} letters that look like Latin ones ({latin:?}), a look-alike of another name")]
    LookAlike { name: String, label: String, script: &'static str, latin: String },
    #[error("{name:?} is a public suffix ({section} section of the Public Suffix List): nobody can prove they own it")]
    PublicSuffix { name: String, section: &'static str },
    #[error("{0:?} is a registrable domain (an apex); a preview base must be a subdomain of it, such as previews.{0}")]
    Apex(String),
}

/// Normalises a domain an org wants to prove it owns: any name that is not a public
/// suffix (an apex such as `acme.com` is the usual one).
pub fn domain(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw, MAX_HOST, "")?;
    not_public_suffix(&name)?;
    Ok(name)
}

/// Normalises a preview base: all of [`domain`]'s rules, not an apex, and room for a
/// preview label.
pub fn base(raw: &str) -> Result<String, NameError> {
    let name = normalise(raw, MAX_BASE, " (a preview base must leave room for a 63-byte preview label)")?;
    not_public_suffix(&name)?;
    if psl::domain_str(&name) == Some(name.as_str()) {
        return Err(NameError::Apex(name));
    }
    Ok(name)
}

/// Whether `name` is `parent` or under it.
pub fn is_within(name: &str, parent: &str) -> bool {
    name == parent || is_strictly_under(name, parent)
}

/// Whether `name` is a subdomain of `parent` (not `parent` itself).
pub fn is_strictly_under(name: &str, parent: &str) -> bool {
    name.len() > parent.len() + 1 && name.ends_with(parent) && name.as_bytes()[name.len() - parent.len() - 1] == b'.'
}

fn not_public_suffix(name: &str) -> Result<(), NameError> {
    let Some(suffix) = psl::suffix(name.as_bytes()) else {
        return Err(NameError::PublicSuffix { name: name.into(), section: "unknown" });
    };
    if suffix.as_bytes() == name.as_bytes() {
        let section = match suffix.typ() {
            Some(psl::Type::Icann) => "ICANN",
            Some(psl::Type::Private) => "private",
            // not in the list: a top-level name, which the list's default rule makes a suffix
            None => "default rule",
        };
        return Err(NameError::PublicSuffix { name: name.into(), section });
    }
    Ok(())
}

fn normalise(raw: &str, max: usize, why: &'static str) -> Result<String, NameError> {
    let raw = raw.trim();
    let raw = raw.strip_suffix('.').unwrap_or(raw);
    if raw.is_empty() {
        return Err(NameError::Empty);
    }
    if raw.contains('*') {
        return Err(NameError::Wildcard(raw.into()));
    }
    if raw.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>().is_ok() {
        return Err(NameError::IpAddress(raw.into()));
    }
    if raw.split('.').any(str::is_empty) {
        return Err(NameError::EmptyLabel(raw.into()));
    }
    // ASCII input is checked character by character (a precise error); anything else
    // goes through IDNA first, and its ASCII form through the same checks
    let ascii = if raw.is_ascii() {
        raw.to_ascii_lowercase()
    } else {
        if let Some(ch) = raw.chars().find(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.')) {
            return Err(NameError::BadCharacter { name: raw.into(), ch });
        }
        idna::domain_to_ascii_strict(raw).map_err(|_| NameError::Idna(raw.into()))?
    };
    if let Some(ch) = ascii.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '.'))
    {
        return Err(NameError::BadCharacter { name: raw.into(), ch });
    }
    for label in ascii.split('.') {
        if label.is_empty() {
            return Err(NameError::EmptyLabel(raw.into()));
        }
        if label.len() > MAX_LABEL {
            return Err(NameError::LabelTooLong { name: raw.into(), label: label.into() });
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(NameError::Hyphen { name: raw.into(), label: label.into() });
        }
        look_alike(&ascii, label)?;
    }
    if ascii.len() > max {
        return Err(NameError::TooLong { name: ascii, max, why });
    }
    if ascii.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err(NameError::IpAddress(ascii));
    }
    Ok(ascii)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Script {
    Latin,
    Greek,
    Cyrillic,
    Other,
}

impl Script {
    fn of(c: char) -> Option<Script> {
        match c {
            '0'..='9' | '-' => None,
            'a'..='z' | '\u{00C0}'..='\u{024F}' | '\u{1E00}'..='\u{1EFF}' => Some(Script::Latin),
            '\u{0370}'..='\u{03FF}' | '\u{1F00}'..='\u{1FFF}' => Some(Script::Greek),
            '\u{0400}'..='\u{052F}' | '\u{2DE0}'..='\u{2DFF}' | '\u{A640}'..='\u{A69F}' => Some(Script::Cyrillic),
            _ => Some(Script::Other),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Script::Latin => "Latin",
            Script::Greek => "Greek",
            Script::Cyrillic => "Cyrillic",
            Script::Other => "other",
        }
    }
}

/// The Latin letter a lower-case Greek or Cyrillic letter reads as, for those that do.
fn latin_twin(c: char) -> Option<char> {
    Some(match c {
        'а' => 'a',
        'с' => 'c',
        'ԁ' => 'd',
        'е' => 'e',
        'һ' => 'h',
        'і' | 'ι' => 'i',
        'ј' => 'j',
        'κ' => 'k',
        'ӏ' => 'l',
        'о' | 'ο' => 'o',
        'р' | 'ρ' => 'p',
        'ԛ' => 'q',
        'ѕ' => 's',
        'υ' => 'u',
        'ν' => 'v',
        'ԝ' => 'w',
        'х' | 'χ' => 'x',
        'у' => 'y',
        _ => return None,
    })
}

/// Refuses a punycode label that mixes Latin, Greek and Cyrillic letters, or is wholly
/// Greek or Cyrillic letters that read as Latin ones (`аррӏе`).
fn look_alike(name: &str, label: &str) -> Result<(), NameError> {
    if !label.starts_with("xn--") {
        return Ok(());
    }
    let (unicode, result) = idna::domain_to_unicode(label);
    if result.is_err() {
        return Err(NameError::Idna(name.into()));
    }
    let scripts: Vec<Script> = unicode.chars().filter_map(Script::of).collect();
    let confusable = [Script::Latin, Script::Greek, Script::Cyrillic];
    for (i, a) in confusable.iter().enumerate() {
        for b in &confusable[i + 1..] {
            if scripts.contains(a) && scripts.contains(b) {
                return Err(NameError::MixedScripts { name: name.into(), label: unicode, a: a.name(), b: b.name() });
            }
        }
    }
    let letters: Vec<char> = unicode.chars().filter(|c| Script::of(*c).is_some()).collect();
    if let Some(script) = scripts.first().filter(|s| matches!(s, Script::Greek | Script::Cyrillic)) {
        if let Some(latin) = letters.iter().map(|c| latin_twin(*c)).collect::<Option<String>>() {
            return Err(NameError::LookAlike { name: name.into(), label: unicode, script: script.name(), latin });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_before_any_rule() {
        assert_eq!(base("Previews.ACME.com.").unwrap(), "previews.acme.com");
        assert_eq!(base("  previews.acme.com  ").unwrap(), "previews.acme.com");
        assert_eq!(domain("ACME.com").unwrap(), "acme.com");
        assert_eq!(base("vorschau.bücher.de").unwrap(), "vorschau.xn--bcher-kva.de");
        assert_eq!(domain("BÜCHER.de.").unwrap(), "xn--bcher-kva.de");
    }

    #[test]
    fn hostile_bases_are_refused_naming_the_rule() {
        type Rule = fn(&NameError) -> bool;
        let cases: &[(&str, Rule)] = &[
            ("acme.com", |e| matches!(e, NameError::Apex(_))),
            ("co.uk", |e| matches!(e, NameError::PublicSuffix { section: "ICANN", .. })),
            ("github.io", |e| matches!(e, NameError::PublicSuffix { section: "private", .. })),
            ("com", |e| matches!(e, NameError::PublicSuffix { .. })),
            ("*.previews.acme.com", |e| matches!(e, NameError::Wildcard(_))),
            ("127.0.0.1", |e| matches!(e, NameError::IpAddress(_))),
            ("[::1]", |e| matches!(e, NameError::IpAddress(_))),
            ("::1", |e| matches!(e, NameError::IpAddress(_))),
            ("previews..acme.com", |e| matches!(e, NameError::EmptyLabel(_))),
            (".acme.com", |e| matches!(e, NameError::EmptyLabel(_))),
            ("", |e| matches!(e, NameError::Empty)),
            ("pre_views.acme.com", |e| matches!(e, NameError::BadCharacter { ch: '_', .. })),
            ("previews.acme.com/x", |e| matches!(e, NameError::BadCharacter { ch: '/', .. })),
            ("pre views.acme.com", |e| matches!(e, NameError::BadCharacter { ch: ' ', .. })),
            ("-previews.acme.com", |e| matches!(e, NameError::Hyphen { .. })),
            // Cyrillic 'е' in a Latin label; an all-Cyrillic look-alike of "apple"
            ("prеviews.acme.com", |e| matches!(e, NameError::MixedScripts { a: "Latin", b: "Cyrillic", .. })),
            ("previews.аррӏе.com", |e| matches!(e, NameError::LookAlike { script: "Cyrillic", .. })),
            ("prοviews.acme.com", |e| matches!(e, NameError::MixedScripts { a: "Latin", b: "Greek", .. })),
        ];
        for (raw, rule) in cases {
            let err = base(raw).expect_err(raw);
            assert!(rule(&err), "{raw}: {err}");
            assert!(!err.to_string().is_empty());
        }
        let long_label = format!("{}.acme.com", "a".repeat(64));
        assert!(matches!(base(&long_label), Err(NameError::LabelTooLong { .. })));
        // 190 bytes: a valid hostname, but no room for a 63-byte preview label
        let long = format!("{}.acme.com", ["a".repeat(60), "b".repeat(60), "c".repeat(60)].join("."));
        assert!(long.len() > MAX_BASE && long.len() <= MAX_HOST);
        assert!(matches!(base(&long), Err(NameError::TooLong { max: MAX_BASE, .. })), "{:?}", base(&long));
        assert!(domain(&long).is_ok());
    }

    #[test]
    fn domains_may_be_apexes_but_never_public_suffixes() {
        assert_eq!(domain("acme.com").unwrap(), "acme.com");
        assert_eq!(domain("eng.acme.co.uk").unwrap(), "eng.acme.co.uk");
        assert!(matches!(domain("co.uk"), Err(NameError::PublicSuffix { .. })));
        assert!(matches!(domain("github.io"), Err(NameError::PublicSuffix { section: "private", .. })));
        assert!(domain("someone.github.io").is_ok());
        assert!(matches!(domain("*.acme.com"), Err(NameError::Wildcard(_))));
        assert!(matches!(domain("10.0.0.1"), Err(NameError::IpAddress(_))));
    }

    #[test]
    fn nesting() {
        assert!(is_strictly_under("previews.acme.com", "acme.com"));
        assert!(!is_strictly_under("acme.com", "acme.com"));
        assert!(!is_strictly_under("notacme.com", "acme.com"));
        assert!(is_within("acme.com", "acme.com"));
        assert!(is_within("a.b.acme.com", "acme.com"));
    }
}
