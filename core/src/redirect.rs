//! Where a visitor may be sent back to after a form: the one sanitizer that the splash
//! pages (which put `return_to` into the form) and the edge (which turns it into a
//! `Location`) both use, so the two can never disagree.
//!
//! Only a plain same-origin path is kept: it starts with one `/` (not `//` or `/\`,
//! which browsers read as another host), holds visible ASCII only (no spaces, tabs, line
//! breaks or other controls, which browsers strip or which would break the header), and
//! is at most [`MAX_RETURN_TO`] bytes. Anything else becomes `/`.

/// Longest `return_to` kept.
pub const MAX_RETURN_TO: usize = 2048;

/// `raw` if it is a plain same-origin path, else `/`. Always a valid header value.
pub fn safe_return_to(raw: &str) -> &str {
    let b = raw.as_bytes();
    let plain = b.len() <= MAX_RETURN_TO
        && b.first() == Some(&b'/')
        && !matches!(b.get(1), Some(b'/' | b'\\'))
        && b.iter().all(|c| c.is_ascii_graphic());
    if plain {
        raw
    } else {
        "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_plain_paths_only() {
        for ok in ["/", "/cart?x=1", "/a/b#c", "/%2F%2Fevil", "/a\\b"] {
            assert_eq!(safe_return_to(ok), ok);
        }
        for bad in [
            "",
            "cart",
            "//evil.example",
            "/\\evil.example",
            "/\n",
            "/\t/evil.example",
            "/\r\nSet-Cookie: x=1",
            "/ a",
            "/\u{7f}",
            "/bücher",
            "https://evil.example/",
            "javascript:alert(1)",
        ] {
            assert_eq!(safe_return_to(bad), "/", "{bad:?}");
        }
        assert_eq!(safe_return_to(&format!("/{}", "a".repeat(MAX_RETURN_TO))), "/");
    }

    proptest::proptest! {
        #[test]
        fn result_is_always_a_same_origin_path(s in ".{0,64}") {
            let r = safe_return_to(&s);
            proptest::prop_assert!(r.starts_with('/'));
            proptest::prop_assert!(!r.starts_with("//") && !r.starts_with("/\\"));
            proptest::prop_assert!(r.bytes().all(|c| c.is_ascii_graphic()));
        }
    }
}
