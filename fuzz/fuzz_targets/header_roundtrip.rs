//! Header decoding and re-encoding of any bytes (acgi_proto::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| acgi_proto::fuzzing::header_roundtrip(data));
