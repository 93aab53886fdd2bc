//! `faulty`: a worker for tests that misbehaves on request. Each request is a command:
//!
//! - `pid`: reply with this worker's pid (so a test can signal it).
//! - `sleep MS`: sleep MS milliseconds, then reply `slept`.
//! - `echo BYTES`: reply with BYTES.
//! - `fail MESSAGE`: the handler returns an error with MESSAGE.
//! - `abort`: abort the process mid-request.
//! - `exit`: exit(3) mid-request.
//! - `sigkill`: SIGKILL itself mid-request.
//! - `big N`: reply with N bytes of `x` (the copy path when N is over the slot).
//! - `stderr N`: write N lines to stderr, then reply `ok`.
//!
//! With `--no-hello` as its first argument it exits before the handshake; with `--garbage` it
//! writes garbage on its control socket instead of a handshake.

use std::io::Write;
use std::os::fd::FromRawFd;

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_default();
    match mode.as_str() {
        "--no-hello" => std::process::exit(4),
        "--garbage" => {
            let fd: i32 = std::env::var(acgi_bridge::worker::ENV_CONTROL_FD)
                .unwrap()
                .parse()
                .unwrap();
            // SAFETY: the descriptor was passed to this process by the bridge.
            let mut control = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
            control.write_all(&[0xEE; 64]).unwrap();
            std::thread::sleep(std::time::Duration::from_secs(60));
            return;
        }
        _ => {}
    }
    let result = acgi_bridge::worker::serve(|request: &[u8]| -> Result<Vec<u8>, String> {
        let text = String::from_utf8_lossy(request);
        let (command, argument) = text.split_once(' ').unwrap_or((&text, ""));
        match command {
            "pid" => Ok(std::process::id().to_string().into_bytes()),
            "sleep" => {
                let ms: u64 = argument.parse().map_err(|_| "sleep needs milliseconds")?;
                std::thread::sleep(std::time::Duration::from_millis(ms));
                Ok(b"slept".to_vec())
            }
            "echo" => Ok(request[5.min(request.len())..].to_vec()),
            "fail" => Err(argument.to_string()),
            "abort" => std::process::abort(),
            "exit" => std::process::exit(3),
            "sigkill" => {
                // SAFETY: signalling our own pid.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                unreachable!("SIGKILL cannot be caught")
            }
            "big" => Ok(vec![
                b'x';
                argument.parse().map_err(|_| "big needs a length")?
            ]),
            "stderr" => {
                let lines: usize = argument.parse().map_err(|_| "stderr needs a count")?;
                for line in 0..lines {
                    eprintln!("faulty worker stderr line {line}");
                }
                Ok(b"ok".to_vec())
            }
            other => Err(format!("unknown command {other:?}")),
        }
    });
    if let Err(error) = result {
        eprintln!("faulty worker: {error}");
        std::process::exit(1);
    }
}
