//! A worker's frame against its slot: the core's checks and the slot step (acgi_bridge::fuzzing).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| acgi_bridge::fuzzing::worker_answer(data));
