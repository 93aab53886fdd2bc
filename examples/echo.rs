//! The `echo` service: replies with its request. The smallest possible worker, and the one the
//! benchmarks and conformance tests drive.

fn main() {
    if let Err(error) = acgi_worker::serve(|request: &[u8]| request.to_vec()) {
        eprintln!("echo worker: {error}");
        std::process::exit(1);
    }
}
