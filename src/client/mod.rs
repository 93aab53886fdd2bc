//! Client SDK: call services through a bridge, from async Rust (tokio) or from blocking code.
//!
//! ```no_run
//! # async fn demo() -> Result<(), acgi_bridge::client::CallError> {
//! let client = acgi_bridge::client::Client::connect("/run/acgi-bridge.sock").await?;
//! let reply = client.call("echo", b"hello".to_vec()).await?;
//! # Ok(()) }
//! ```
//!
//! One connection carries many calls at once: each call gets a fresh request id, and the reader
//! task matches replies to calls by id, in whatever order they come. Service names are resolved
//! to ids once per connection (a `Resolve` frame) and cached.
//!
//! Addresses: `unix:/path`, `tcp:host:port`, or bare: a string containing `/` is a Unix socket
//! path, anything else is a TCP `host:port`.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::proto::{self, ErrorCode, Header, Kind, HEADER_BYTES};

/// Where a bridge listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl Addr {
    pub fn parse(text: &str) -> Addr {
        if let Some(path) = text.strip_prefix("unix:") {
            Addr::Unix(PathBuf::from(path))
        } else if let Some(host_port) = text.strip_prefix("tcp:") {
            Addr::Tcp(host_port.to_string())
        } else if text.contains('/') {
            Addr::Unix(PathBuf::from(text))
        } else {
            Addr::Tcp(text.to_string())
        }
    }
}

/// Which service to call: by name (resolved once and cached) or by numeric id.
#[derive(Clone, Debug)]
pub enum Service<'a> {
    Name(&'a str),
    Id(u32),
}

impl<'a> From<&'a str> for Service<'a> {
    fn from(name: &'a str) -> Service<'a> {
        Service::Name(name)
    }
}

impl From<u32> for Service<'_> {
    fn from(id: u32) -> Self {
        Service::Id(id)
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The bridge answered with an error frame.
    #[error("{}: {message}", describe_code(*.code))]
    Remote { code: u16, message: String },
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("bridge broke the protocol: {0}")]
    Protocol(String),
    #[error("connection closed before the reply arrived")]
    Closed,
}

fn describe_code(code: u16) -> String {
    match ErrorCode::from_u16(code) {
        Some(known) => format!("{known} (code {code})"),
        None => format!("error code {code}"),
    }
}

impl CallError {
    /// The bridge's error code, when the bridge answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            CallError::Remote { code, .. } => ErrorCode::from_u16(*code),
            _ => None,
        }
    }
}

impl From<proto::FrameError> for CallError {
    fn from(error: proto::FrameError) -> Self {
        CallError::Protocol(error.to_string())
    }
}

/// A decoded answer frame.
#[derive(Debug)]
pub struct Answer {
    pub header: Header,
    pub payload: Vec<u8>,
}

impl Answer {
    /// Turn a reply-like answer into the payload, an error frame into [`CallError::Remote`].
    pub fn into_result(self) -> Result<Vec<u8>, CallError> {
        match self.header.kind {
            Kind::Reply | Kind::Pong | Kind::Resolved => Ok(self.payload),
            Kind::Error => Err(CallError::Remote {
                code: self.header.code,
                message: String::from_utf8_lossy(&self.payload).into_owned(),
            }),
            other => Err(CallError::Protocol(format!("unexpected {other:?} frame"))),
        }
    }
}

/// Payloads up to this size are sent in the same write as their header.
const SMALL_FRAME_BYTES: usize = 4096;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// A pipelined async connection to a bridge. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    next_request_id: AtomicU64,
    services: Mutex<HashMap<String, u32>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Client {
    /// Connect to a bridge at `addr` (see the module docs for the address forms).
    pub async fn connect(addr: &str) -> Result<Client, CallError> {
        match Addr::parse(addr) {
            Addr::Unix(path) => {
                let (read, write) = tokio::net::UnixStream::connect(path).await?.into_split();
                Ok(Client::from_halves(read, write))
            }
            Addr::Tcp(host_port) => {
                let stream = tokio::net::TcpStream::connect(host_port).await?;
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                Ok(Client::from_halves(read, write))
            }
        }
    }

    fn from_halves<R, W>(read: R, write: W) -> Client
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let pending: Pending = Arc::default();
        // Buffered: one read takes every answer that has arrived (not two reads per answer).
        let read = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, read);
        let reader = tokio::spawn(read_answers(read, Arc::clone(&pending)));
        Client {
            inner: Arc::new(Inner {
                writer: tokio::sync::Mutex::new(Box::new(write)),
                pending,
                next_request_id: AtomicU64::new(1),
                services: Mutex::default(),
                reader,
            }),
        }
    }

    /// Call `service` with `payload`; resolves when its reply (or error) arrives.
    pub async fn call<'a>(
        &self,
        service: impl Into<Service<'a>>,
        payload: impl AsRef<[u8]>,
    ) -> Result<Vec<u8>, CallError> {
        let service_id = self.service_id(service.into()).await?;
        self.exchange(Kind::Request, service_id, payload.as_ref())
            .await?
            .into_result()
    }

    /// Call with a deadline: if no worker has taken the request within `timeout`, the bridge
    /// answers `deadline exceeded` (code 10) without running it. The worker can read the time
    /// left. Resolves when the reply arrives (a request already running is not interrupted).
    pub async fn call_with_timeout<'a>(
        &self,
        service: impl Into<Service<'a>>,
        payload: impl AsRef<[u8]>,
        timeout: std::time::Duration,
    ) -> Result<Vec<u8>, CallError> {
        let service_id = self.service_id(service.into()).await?;
        let framed = with_timeout_prefix(payload.as_ref(), timeout);
        self.exchange_flags(Kind::Request, proto::FLAG_TIMEOUT, service_id, &framed)
            .await?
            .into_result()
    }

    /// The numeric id of `service`, asking the bridge on first use of a name.
    pub async fn service_id(&self, service: Service<'_>) -> Result<u32, CallError> {
        let name = match service {
            Service::Id(id) => return Ok(id),
            Service::Name(name) => name,
        };
        if let Some(id) = self.inner.services.lock().expect("not poisoned").get(name) {
            return Ok(*id);
        }
        let answer = self.exchange(Kind::Resolve, 0, name.as_bytes()).await?;
        let id = answer.header.service_id;
        answer.into_result()?;
        self.inner
            .services
            .lock()
            .expect("not poisoned")
            .insert(name.to_string(), id);
        Ok(id)
    }

    async fn exchange(
        &self,
        kind: Kind,
        service_id: u32,
        payload: &[u8],
    ) -> Result<Answer, CallError> {
        self.exchange_flags(kind, 0, service_id, payload).await
    }

    async fn exchange_flags(
        &self,
        kind: Kind,
        flags: u16,
        service_id: u32,
        payload: &[u8],
    ) -> Result<Answer, CallError> {
        let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        self.inner
            .pending
            .lock()
            .expect("not poisoned")
            .insert(request_id, sender);
        let mut header = Header::new(kind, service_id, request_id, payload.len() as u32);
        header.flags = flags;
        let written = if payload.len() <= SMALL_FRAME_BYTES {
            // One write per call: header and payload together.
            let mut frame = [0u8; HEADER_BYTES + SMALL_FRAME_BYTES];
            frame[..HEADER_BYTES].copy_from_slice(&header.encode());
            frame[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(payload);
            let frame = &frame[..HEADER_BYTES + payload.len()];
            self.inner.writer.lock().await.write_all(frame).await
        } else {
            let mut writer = self.inner.writer.lock().await;
            let mut result = writer.write_all(&header.encode()).await;
            if result.is_ok() {
                result = writer.write_all(payload).await;
            }
            result
        };
        if let Err(error) = written {
            self.inner
                .pending
                .lock()
                .expect("not poisoned")
                .remove(&request_id);
            return Err(error.into());
        }
        receiver.await.map_err(|_| CallError::Closed)
    }
}

/// Read buffer of the async client's connection.
const READ_BUFFER_BYTES: usize = 64 * 1024;

async fn read_answers<R: AsyncRead + Unpin>(mut read: R, pending: Pending) {
    let mut bytes = [0u8; HEADER_BYTES];
    loop {
        if read.read_exact(&mut bytes).await.is_err() {
            break;
        }
        let Ok(header) = Header::decode(&bytes, proto::PAYLOAD_BYTES_MAX_CEILING) else {
            break;
        };
        let mut payload = vec![0u8; header.payload_len as usize];
        if read.read_exact(&mut payload).await.is_err() {
            break;
        }
        let waiter = pending
            .lock()
            .expect("not poisoned")
            .remove(&header.request_id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(Answer { header, payload });
        }
    }
    // Dropping the senders wakes every waiting call with `Closed`.
    pending.lock().expect("not poisoned").clear();
}

/// The payload of a `FLAG_TIMEOUT` request: the timeout in ms (u32 LE, at least 1), then the
/// payload.
fn with_timeout_prefix(payload: &[u8], timeout: std::time::Duration) -> Vec<u8> {
    let ms = timeout.as_millis().clamp(1, u32::MAX as u128) as u32;
    let mut framed = Vec::with_capacity(proto::TIMEOUT_PREFIX_BYTES + payload.len());
    framed.extend_from_slice(&ms.to_le_bytes());
    framed.extend_from_slice(payload);
    framed
}

enum BlockingStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => stream.read(buf),
            BlockingStream::Tcp(stream) => stream.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => stream.write(buf),
            BlockingStream::Tcp(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A blocking connection, for scripts, tests and the CLI. `call` does one round trip;
/// `send` + `receive` pipeline many requests on the connection.
pub struct BlockingClient {
    stream: BlockingStream,
    next_request_id: u64,
    services: HashMap<String, u32>,
}

impl BlockingClient {
    pub fn connect(addr: &str) -> Result<BlockingClient, CallError> {
        let stream = match Addr::parse(addr) {
            Addr::Unix(path) => {
                BlockingStream::Unix(std::os::unix::net::UnixStream::connect(path)?)
            }
            Addr::Tcp(host_port) => {
                let stream = std::net::TcpStream::connect(host_port)?;
                stream.set_nodelay(true)?;
                BlockingStream::Tcp(stream)
            }
        };
        Ok(BlockingClient {
            stream,
            next_request_id: 1,
            services: HashMap::new(),
        })
    }

    /// Call `service` and wait for its answer. Do not mix with outstanding `send`s.
    pub fn call<'a>(
        &mut self,
        service: impl Into<Service<'a>>,
        payload: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        let service_id = self.service_id(service.into())?;
        let request_id = self.send(service_id, payload)?;
        let answer = self.receive()?;
        if answer.header.request_id != request_id {
            return Err(CallError::Protocol(format!(
                "reply for request {} while waiting for {request_id}",
                answer.header.request_id
            )));
        }
        answer.into_result()
    }

    pub fn service_id(&mut self, service: Service<'_>) -> Result<u32, CallError> {
        let name = match service {
            Service::Id(id) => return Ok(id),
            Service::Name(name) => name,
        };
        if let Some(id) = self.services.get(name) {
            return Ok(*id);
        }
        let request_id = self.send_frame(Kind::Resolve, 0, name.as_bytes())?;
        let answer = self.receive()?;
        if answer.header.request_id != request_id {
            return Err(CallError::Protocol("resolve answered out of turn".into()));
        }
        let id = answer.header.service_id;
        answer.into_result()?;
        self.services.insert(name.to_string(), id);
        Ok(id)
    }

    /// Send a request without waiting; returns its request id.
    pub fn send(&mut self, service_id: u32, payload: &[u8]) -> Result<u64, CallError> {
        self.send_frame(Kind::Request, service_id, payload)
    }

    /// Send a request with a deadline (see [`Client::call_with_timeout`]); returns its id.
    pub fn send_with_timeout(
        &mut self,
        service_id: u32,
        payload: &[u8],
        timeout: std::time::Duration,
    ) -> Result<u64, CallError> {
        let framed = with_timeout_prefix(payload, timeout);
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let mut header = Header::new(Kind::Request, service_id, request_id, framed.len() as u32);
        header.flags = proto::FLAG_TIMEOUT;
        let mut frame = Vec::with_capacity(HEADER_BYTES + framed.len());
        proto::encode_frame(&mut frame, &header, &framed);
        self.stream.write_all(&frame)?;
        Ok(request_id)
    }

    /// Send any caller frame kind; returns its request id.
    pub fn send_frame(
        &mut self,
        kind: Kind,
        service_id: u32,
        payload: &[u8],
    ) -> Result<u64, CallError> {
        let request_id = self.next_request_id;
        self.next_request_id += 1;
        let header = Header::new(kind, service_id, request_id, payload.len() as u32);
        let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
        proto::encode_frame(&mut frame, &header, payload);
        self.stream.write_all(&frame)?;
        Ok(request_id)
    }

    /// Wait for the next answer frame, whichever request it belongs to.
    pub fn receive(&mut self) -> Result<Answer, CallError> {
        let mut bytes = [0u8; HEADER_BYTES];
        match self.stream.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(CallError::Closed)
            }
            Err(error) => return Err(error.into()),
        }
        let header = Header::decode(&bytes, proto::PAYLOAD_BYTES_MAX_CEILING)?;
        let mut payload = vec![0u8; header.payload_len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Answer { header, payload })
    }

    /// Write raw bytes to the connection (for tests of malformed input).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        self.stream.write_all(bytes)?;
        Ok(())
    }
}
