//! Any `return_to`: the sanitizer never panics and only ever yields a plain same-origin
//! path that is a valid header value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wakegate_core::redirect::safe_return_to;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let r = safe_return_to(s);
    assert!(r.starts_with('/') && !r.starts_with("//") && !r.starts_with("/\\"));
    assert!(r.bytes().all(|b| b.is_ascii_graphic()));
    assert!(http::HeaderValue::from_str(r).is_ok());
});
