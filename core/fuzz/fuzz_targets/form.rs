//! Any query string or form body: decoding never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use wakegate_core::form::{get, parse_pairs};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let pairs = parse_pairs(s);
    let _ = get(&pairs, "csrf");
});
