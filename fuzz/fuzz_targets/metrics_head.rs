//! Bytes on the metrics listener: the HTTP head parser (acgi_bridge::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| acgi_bridge::fuzzing::metrics_head(data));
