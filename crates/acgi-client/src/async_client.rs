//! The async client (feature `tokio`): many calls in flight on one connection, replies matched
//! to calls by request id by one reader task.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::proto::{self, Header, Kind, HEADER_BYTES};
use crate::{with_timeout_prefix, Addr, Answer, CallError, ConnectOptions, Service};

/// Payloads up to this size are sent in the same write as their header.
const SMALL_FRAME_BYTES: usize = 4096;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// A pipelined async connection to a bridge. Cheap to clone; clones share the connection.
///
/// ```no_run
/// # async fn demo() -> Result<(), acgi_client::CallError> {
/// let client = acgi_client::Client::connect("/run/acgi-bridge.sock").await?;
/// let reply = client.call("echo", b"hello".to_vec()).await?;
/// # Ok(()) }
/// ```
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
    /// Connect to a bridge at `addr` (see the module docs for the address forms) with the
    /// default [`ConnectOptions`].
    pub async fn connect(addr: &str) -> Result<Client, CallError> {
        Client::connect_with(addr, &ConnectOptions::new()).await
    }

    /// Connect with `options` (the reply bound, the server's expected uid).
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Client, CallError> {
        let bound = options.reply_bytes_max;
        match Addr::parse(addr) {
            Addr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                options.check_server(&stream)?;
                let (read, write) = stream.into_split();
                Ok(Client::from_halves(read, write, bound))
            }
            Addr::Tcp(host_port) => {
                options.check_tcp_allowed()?;
                let stream = tokio::net::TcpStream::connect(host_port).await?;
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                Ok(Client::from_halves(read, write, bound))
            }
        }
    }

    fn from_halves<R, W>(read: R, write: W, reply_bytes_max: u32) -> Client
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let pending: Pending = Arc::default();
        // Buffered: one read takes every answer that has arrived (not two reads per answer).
        let read = tokio::io::BufReader::with_capacity(READ_BUFFER_BYTES, read);
        let reader = tokio::spawn(read_answers(read, Arc::clone(&pending), reply_bytes_max));
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

/// Read answers and hand each to its call; a frame over `reply_bytes_max` (checked on its
/// header, before any allocation) or a malformed one ends the connection: every call in flight
/// then fails with `Closed`.
async fn read_answers<R: AsyncRead + Unpin>(mut read: R, pending: Pending, reply_bytes_max: u32) {
    let mut bytes = [0u8; HEADER_BYTES];
    loop {
        if read.read_exact(&mut bytes).await.is_err() {
            break;
        }
        let Ok(header) = Header::decode(&bytes, reply_bytes_max) else {
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
