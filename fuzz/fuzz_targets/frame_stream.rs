//! Frame reassembly from a stream cut at fuzzer-chosen read sizes (acgi_proto::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| acgi_proto::fuzzing::frame_stream(data));
