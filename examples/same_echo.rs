//! The cross-SDK behaviour suite's Rust worker (`tests/it/sdks.rs`): a request is echoed, and
//! one that starts with `fail:` is answered with a service error carrying the rest. Its Python
//! and C twins are `sdk/python/examples/echo.py` and `sdk/c/examples/echo.c`.

fn main() {
    let served = acgi_worker::serve(|request: &[u8]| -> Result<Vec<u8>, String> {
        match request.strip_prefix(b"fail:") {
            Some(message) => Err(String::from_utf8_lossy(message).into_owned()),
            None => Ok(request.to_vec()),
        }
    });
    if let Err(error) = served {
        eprintln!("same_echo worker: {error}");
        std::process::exit(1);
    }
}
