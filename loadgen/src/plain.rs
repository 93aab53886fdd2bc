//! A plaintext connection to the bridge over a Unix socket or TCP, with blocking reads that wake
//! to look at the clock: what the batched closed loop and the fault soak speak the wire protocol
//! on directly (the SDK's client would hide what they count).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::time::Duration;

use acgi_client::Addr;

/// One connection, Unix or TCP (with `TCP_NODELAY`).
pub enum PlainStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl PlainStream {
    /// Connect to `addr`; a `tls:` address is refused with `why_not_tls`. Reads time out after
    /// `read_timeout`, and writes after `write_timeout` when given.
    pub fn connect(
        addr: &str,
        why_not_tls: &'static str,
        read_timeout: Duration,
        write_timeout: Option<Duration>,
    ) -> io::Result<PlainStream> {
        let stream = match Addr::parse(addr) {
            Addr::Unix(path) => PlainStream::Unix(std::os::unix::net::UnixStream::connect(path)?),
            Addr::Tcp(host_port) => {
                let stream = std::net::TcpStream::connect(host_port)?;
                stream.set_nodelay(true)?;
                PlainStream::Tcp(stream)
            }
            Addr::Tls(_) => return Err(io::Error::new(io::ErrorKind::Unsupported, why_not_tls)),
        };
        match &stream {
            PlainStream::Unix(s) => {
                s.set_read_timeout(Some(read_timeout))?;
                s.set_write_timeout(write_timeout)?;
            }
            PlainStream::Tcp(s) => {
                s.set_read_timeout(Some(read_timeout))?;
                s.set_write_timeout(write_timeout)?;
            }
        }
        Ok(stream)
    }

    pub fn try_clone(&self) -> io::Result<PlainStream> {
        Ok(match self {
            PlainStream::Unix(s) => PlainStream::Unix(s.try_clone()?),
            PlainStream::Tcp(s) => PlainStream::Tcp(s.try_clone()?),
        })
    }

    /// Shut both directions (already shut or reset by the peer: closed either way, as meant).
    pub fn shutdown(&self) {
        let _ = match self {
            PlainStream::Unix(s) => s.shutdown(Shutdown::Both),
            PlainStream::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    pub fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PlainStream::Unix(s) => s.read(buf),
            PlainStream::Tcp(s) => s.read(buf),
        }
    }

    pub fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            PlainStream::Unix(s) => s.write_all(buf),
            PlainStream::Tcp(s) => s.write_all(buf),
        }
    }
}
