//! Any signature header and CSRF token: never panics, never verifies without the key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wakegate_core::sign::{verify, verify_csrf, Key};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let key = Key::new(b"fuzz-key".to_vec());
    assert!(verify(&key, Some(s), "GET", "/", "digest", 1_000_000).is_err());
    assert!(verify_csrf(&key, "a.localhost", Some(s), 1_000_000).is_err());
});
