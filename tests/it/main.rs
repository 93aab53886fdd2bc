//! Integration tests: the real `acgi-bridge` binary, real worker processes, temporary sockets.

mod admin;
mod admission;
mod bad_input;
mod client_sdk;
mod common;
mod conformance;
mod control;
mod cores;
mod dashboards;
mod direct;
mod faults;
mod health;
mod hostile;
mod isolation;
mod kernel;
mod kv;
mod lifecycle;
mod metrics;
mod pool;
mod reload;
mod roundtrip;
mod sdk_c;
mod sdks;
mod systemd;
mod unkillable;
mod upgrade;
