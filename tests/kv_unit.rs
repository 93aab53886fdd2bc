//! Runs the kv service's own unit tests (parsing, SQL, concurrent writers on one file).
//!
//! They live in `examples/kv.rs` beside the code; an example built as a test harness would not
//! also be built as the worker executable the integration tests start, so the tests are compiled
//! here instead, with the example's source as a module.

#[allow(dead_code)]
#[path = "../examples/kv.rs"]
mod kv;
