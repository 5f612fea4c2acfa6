//! Any `Host` header: never panics; what is accepted is a fixed point and within limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wakegate_core::host::{normalize_host, MAX_HOST};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(h) = normalize_host(s) {
        assert!(h.as_str().len() <= MAX_HOST);
        assert_eq!(normalize_host(h.as_str()).as_ref(), Ok(&h));
    }
});
