//! Fuzz target `containerd`: see fuzz/invariants.rs for what every input must hold.
#![no_main]

#[path = "../invariants.rs"]
mod invariants;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // gpuprov reads these files as UTF-8 and refuses anything else first.
    if let Ok(text) = std::str::from_utf8(data) {
        invariants::containerd(text);
    }
});
