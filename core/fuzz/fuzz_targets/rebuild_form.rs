//! Any rebuild form body and `Origin` header, with a valid or invalid token: the edge's
//! form handler never panics, and whatever it accepts becomes a redirect that stays on
//! the preview's own origin.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wakegate_core::host::normalize_host;
use wakegate_core::sign::{csrf_token, Key};
use wakegate_edge::answer::Answer;
use wakegate_edge::front::check_rebuild_form;
use wakegate_edge::RequestInfo;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (origin, body) = s.split_once('\n').unwrap_or(("", s));
    let key = Key::new(b"fuzz-csrf-key-0123456789".to_vec());
    let host = normalize_host("a.localhost").unwrap();
    let person = RequestInfo { wants_html: true, may_wake: true };
    // half the inputs carry a valid token, so the return_to path is reached
    let body = if data.len() % 2 == 0 { format!("csrf={}&{body}", csrf_token(&key, "a.localhost", 1_000)) } else { body.to_string() };
    let origin = (!origin.is_empty()).then_some(origin);
    if let Ok(to) = check_rebuild_form(person, origin, &host, &body, &key, 2_000) {
        let answer = Answer::see_other(&to);
        let location = &answer.headers[0].1;
        assert!(location.starts_with('/') && !location.starts_with("//") && !location.starts_with("/\\"));
        assert!(http::HeaderValue::from_str(location).is_ok());
    }
});
