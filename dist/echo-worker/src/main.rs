//! `/usr/lib/acgi-bridge/echo`: the packaged config's `echo` service, which replies with its
//! request (the same worker as `examples/echo.rs`), so that a fresh install can be tried with
//! `acgi-bridge call --connect /run/acgi-bridge/acgi-bridge.sock echo hello`.

#![forbid(unsafe_code)]

fn main() {
    if let Err(error) = acgi_worker::serve(|request: &[u8]| request.to_vec()) {
        eprintln!("echo worker: {error}");
        std::process::exit(1);
    }
}
