//! Fuzz target `proxy`: the invariants of `check_proxy` in fuzz/checks.rs, which
//! tests/fuzz_corpus.rs replays over the committed corpus as ordinary tests.
#![no_main]
// Each target uses one of the shared checks.
#![allow(dead_code)]

include!("../checks.rs");

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = check_proxy(data);
});
