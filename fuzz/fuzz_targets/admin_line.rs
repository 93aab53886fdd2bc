//! Bytes on the admin socket: line framing, the length bound, the command parser (acgi_bridge::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| acgi_bridge::fuzzing::admin_line(data));
