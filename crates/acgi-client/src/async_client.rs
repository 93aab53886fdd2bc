//! The async client (feature `tokio`): many calls in flight on one connection, replies matched
//! to calls by request id by one reader task.
//!
//! The reader reads the socket straight into one [`BytesMut`] and splits each answer off it, so
//! a reply reaches its caller as a [`Bytes`] view of the bytes the kernel wrote: no copy
//! between the socket and the caller. The price: a reply keeps the read buffer's allocation it
//! came in (shared with the answers read with it, at most one frame or 64 KiB) alive while it
//! is held; a caller that keeps many small replies for long should copy them out
//! (`reply.to_vec()`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

use crate::proto::{self, ErrorCode, Header, Kind, HEADER_BYTES};
use crate::{with_timeout_prefix, Addr, CallError, ConnectOptions, Service};

/// Payloads up to this size are sent in the same write as their header.
const SMALL_FRAME_BYTES: usize = 4096;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

/// An answer as the reader hands it to its call: the payload is a view of the read buffer.
struct Answer {
    header: Header,
    payload: Bytes,
}

impl Answer {
    /// A reply-like answer as its payload, an error frame as [`CallError::Remote`].
    fn into_result(self) -> Result<Bytes, CallError> {
        crate::answer_result(&self.header, self.payload)
    }
}

/// After a write fails, how long to wait for the connection's reader to see the drain notice
/// the bridge may have sent before it closed (then the call never ran and is resent).
const DRAIN_NOTICE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// A pipelined async connection to a bridge. Cheap to clone; clones share the connection.
///
/// A call that the bridge refused because it is draining (error 6, or unanswered when the
/// bridge's drain notice arrived: docs/protocol.md §2.6) never ran; it is resent on a new
/// connection, at most [`crate::DRAIN_RETRIES_MAX`] times, so that a binary upgrade of the
/// bridge fails no call. Every other failure is returned as before.
///
/// ```no_run
/// # async fn demo() -> Result<(), acgi_client::CallError> {
/// let client = acgi_client::Client::connect("/run/acgi-bridge/acgi-bridge.sock").await?;
/// // Clones share the connection: calls from many tasks are in flight at once.
/// let other = client.clone();
/// let two = tokio::spawn(async move { other.call("echo", b"two").await });
/// assert_eq!(client.call("echo", b"one").await?, &b"one"[..]);
/// assert_eq!(two.await.expect("the task")?, &b"two"[..]);
/// # Ok(()) }
/// ```
///
/// Replies are [`Bytes`]: a view of the connection's read buffer, not a copy
/// (see [`Client::call`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    options: ConnectOptions,
    /// The connection calls go out on; replaced once the bridge drains it.
    conn: Mutex<Arc<Conn>>,
    /// Held while a new connection is being made (one reconnect for every call that needs it).
    reconnecting: tokio::sync::Mutex<()>,
    next_request_id: AtomicU64,
    services: Mutex<HashMap<String, u32>>,
    /// Calls resent on a new connection because the bridge was draining.
    drain_retries: AtomicU64,
}

/// One connection: its write half, the calls waiting for answers, and its reader task.
struct Conn {
    writer: tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>,
    pending: Pending,
    /// The bridge sent the drain notice or answered a call with error 6: no new call goes out
    /// on this connection.
    drained: Arc<AtomicBool>,
    /// Becomes true when the reader has ended (the connection is gone).
    ended: tokio::sync::watch::Receiver<bool>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// How one attempt at an exchange ended.
enum Attempt {
    Answered(Answer),
    /// Refused by a draining bridge: it never ran (the error to return if no retry is left).
    Drained(CallError),
    Failed(CallError),
}

impl Conn {
    async fn open(addr: &str, options: &ConnectOptions) -> Result<Conn, CallError> {
        let bound = options.reply_bytes_max;
        match Addr::parse(addr) {
            Addr::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await?;
                options.check_server(&stream)?;
                let (read, write) = stream.into_split();
                Ok(Conn::from_halves(read, write, bound))
            }
            Addr::Tcp(host_port) => {
                options.check_tcp_allowed()?;
                let stream = tokio::net::TcpStream::connect(host_port).await?;
                stream.set_nodelay(true)?;
                let (read, write) = stream.into_split();
                Ok(Conn::from_halves(read, write, bound))
            }
            #[cfg(feature = "tls")]
            Addr::Tls(host_port) => {
                options.check_tcp_allowed()?;
                let (config, name) = options.tls_for(&host_port)?;
                let stream = tokio::net::TcpStream::connect(&host_port).await?;
                stream.set_nodelay(true)?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, stream)
                    .await
                    .map_err(crate::tls::handshake_error)?;
                let (read, write) = tokio::io::split(stream);
                Ok(Conn::from_halves(read, write, bound))
            }
            #[cfg(not(feature = "tls"))]
            Addr::Tls(_) => Err(crate::tls_not_built()),
        }
    }

    fn from_halves<R, W>(read: R, write: W, reply_bytes_max: u32) -> Conn
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let pending: Pending = Arc::default();
        let drained = Arc::new(AtomicBool::new(false));
        let (ended_tx, ended) = tokio::sync::watch::channel(false);
        let reader = tokio::spawn(read_answers(
            read,
            Arc::clone(&pending),
            Arc::clone(&drained),
            ended_tx,
            reply_bytes_max,
        ));
        Conn {
            writer: tokio::sync::Mutex::new(Box::new(write)),
            pending,
            drained,
            ended,
            reader,
        }
    }

    fn is_drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    /// Send one frame and wait for its answer.
    async fn exchange(&self, request_id: u64, header: &Header, payload: &[u8]) -> Attempt {
        if self.is_drained() {
            return Attempt::Drained(drained_error());
        }
        let (sender, receiver) = oneshot::channel();
        self.pending
            .lock()
            .expect("not poisoned")
            .insert(request_id, sender);
        let written = if payload.len() <= SMALL_FRAME_BYTES {
            // One write per call: header and payload together.
            let mut frame = [0u8; HEADER_BYTES + SMALL_FRAME_BYTES];
            frame[..HEADER_BYTES].copy_from_slice(&header.encode());
            frame[HEADER_BYTES..HEADER_BYTES + payload.len()].copy_from_slice(payload);
            let frame = &frame[..HEADER_BYTES + payload.len()];
            let mut writer = self.writer.lock().await;
            let mut result = writer.write_all(frame).await;
            if result.is_ok() {
                // (A no-op on a socket; a TLS stream may hold back what did not fit.)
                result = writer.flush().await;
            }
            result
        } else {
            let mut writer = self.writer.lock().await;
            let mut result = writer.write_all(&header.encode()).await;
            if result.is_ok() {
                result = writer.write_all(payload).await;
            }
            if result.is_ok() {
                result = writer.flush().await;
            }
            result
        };
        if let Err(error) = written {
            self.pending
                .lock()
                .expect("not poisoned")
                .remove(&request_id);
            // A bridge that drained and closed this connection sent its notice first: once the
            // reader has read to the end, it knows.
            let mut ended = self.ended.clone();
            let _ = tokio::time::timeout(DRAIN_NOTICE_WAIT, ended.wait_for(|ended| *ended)).await;
            if self.is_drained() {
                return Attempt::Drained(drained_error());
            }
            return Attempt::Failed(error.into());
        }
        match receiver.await {
            Ok(answer) if is_shutting_down(&answer) => {
                self.drained.store(true, Ordering::SeqCst);
                Attempt::Drained(answer.into_result().expect_err("an error frame"))
            }
            Ok(answer) => Attempt::Answered(answer),
            Err(_) if self.is_drained() => Attempt::Drained(drained_error()),
            Err(_) => Attempt::Failed(CallError::Closed),
        }
    }
}

/// An answer with error 6: the request never ran (docs/protocol.md §3).
fn is_shutting_down(answer: &Answer) -> bool {
    answer.header.kind == Kind::Error && answer.header.code == ErrorCode::ShuttingDown as u16
}

/// What a call gets when the bridge drained its connection and no retry is left.
fn drained_error() -> CallError {
    CallError::Remote {
        code: ErrorCode::ShuttingDown as u16,
        message: "the bridge drained the connection before answering (the call did not run)".into(),
    }
}

impl Client {
    /// Connect to a bridge at `addr` (see the module docs for the address forms) with the
    /// default [`ConnectOptions`].
    pub async fn connect(addr: &str) -> Result<Client, CallError> {
        Client::connect_with(addr, &ConnectOptions::new()).await
    }

    /// Connect with `options` (the reply bound, the server's expected uid). A reconnect after
    /// a drain uses the same address and options.
    pub async fn connect_with(addr: &str, options: &ConnectOptions) -> Result<Client, CallError> {
        let conn = Conn::open(addr, options).await?;
        Ok(Client {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                options: options.clone(),
                conn: Mutex::new(Arc::new(conn)),
                reconnecting: tokio::sync::Mutex::new(()),
                next_request_id: AtomicU64::new(1),
                services: Mutex::default(),
                drain_retries: AtomicU64::new(0),
            }),
        })
    }

    /// Calls resent on a new connection so far because the bridge was draining (a binary
    /// upgrade): each of them did not run on the old bridge.
    pub fn drain_retries(&self) -> u64 {
        self.inner.drain_retries.load(Ordering::Relaxed)
    }

    /// Call `service` with `payload`; resolves when its reply (or error) arrives.
    ///
    /// The reply is a [`Bytes`] split off the buffer the connection's answers are
    /// read into: it derefs to `&[u8]`, clones without copying, and `reply.to_vec()` copies it
    /// out when it should outlive the buffer it came in.
    ///
    /// ```no_run
    /// # async fn demo(client: acgi_client::Client) -> Result<(), acgi_client::CallError> {
    /// use acgi_client::proto::ErrorCode;
    /// match client.call("resize", b"...").await {
    ///     Ok(reply) => println!("{} bytes", reply.len()),
    ///     // The handler's own error: its message is the handler's.
    ///     Err(error) if error.code() == Some(ErrorCode::ServiceError) => eprintln!("{error}"),
    ///     Err(error) => return Err(error),
    /// }
    /// // By numeric id (the config's `id`), without resolving a name:
    /// let reply = client.call(7u32, b"...").await?;
    /// # Ok(()) }
    /// ```
    pub async fn call<'a>(
        &self,
        service: impl Into<Service<'a>>,
        payload: impl AsRef<[u8]>,
    ) -> Result<Bytes, CallError> {
        let service_id = self.service_id(service.into()).await?;
        self.exchange(Kind::Request, service_id, payload.as_ref())
            .await?
            .into_result()
    }

    /// Call with a deadline: if no worker has taken the request within `timeout`, the bridge
    /// answers `deadline exceeded` (code 10) without running it. The worker can read the time
    /// left. Resolves when the reply arrives (a request already running is not interrupted).
    ///
    /// ```no_run
    /// # async fn demo(client: acgi_client::Client) -> Result<(), acgi_client::CallError> {
    /// use std::time::Duration;
    /// // Code 10 (`deadline exceeded`) if no worker takes it within 50 ms; it did not run.
    /// let reply = client.call_with_timeout("echo", b"hi", Duration::from_millis(50)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn call_with_timeout<'a>(
        &self,
        service: impl Into<Service<'a>>,
        payload: impl AsRef<[u8]>,
        timeout: std::time::Duration,
    ) -> Result<Bytes, CallError> {
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

    /// One frame and its answer, resent on a new connection when a draining bridge refused it.
    async fn exchange_flags(
        &self,
        kind: Kind,
        flags: u16,
        service_id: u32,
        payload: &[u8],
    ) -> Result<Answer, CallError> {
        let mut retries = 0;
        loop {
            let conn = self.connection().await?;
            let request_id = self.inner.next_request_id.fetch_add(1, Ordering::Relaxed);
            let mut header = Header::new(kind, service_id, request_id, payload.len() as u32);
            header.flags = flags;
            match conn.exchange(request_id, &header, payload).await {
                Attempt::Answered(answer) => return Ok(answer),
                Attempt::Failed(error) => return Err(error),
                Attempt::Drained(error) => {
                    if retries == crate::DRAIN_RETRIES_MAX || self.connection().await.is_err() {
                        // (A bridge that stops without a successor: its answer stands.)
                        return Err(error);
                    }
                    retries += 1;
                    self.inner.drain_retries.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// The connection to send on: the current one, or a new one once the bridge drained it.
    async fn connection(&self) -> Result<Arc<Conn>, CallError> {
        let current = Arc::clone(&self.inner.conn.lock().expect("not poisoned"));
        if !current.is_drained() {
            return Ok(current);
        }
        let _one_at_a_time = self.inner.reconnecting.lock().await;
        let current = Arc::clone(&self.inner.conn.lock().expect("not poisoned"));
        if !current.is_drained() {
            return Ok(current);
        }
        let fresh = Arc::new(Conn::open(&self.inner.addr, &self.inner.options).await?);
        *self.inner.conn.lock().expect("not poisoned") = Arc::clone(&fresh);
        // Names are resolved again by the bridge that now answers.
        self.inner.services.lock().expect("not poisoned").clear();
        Ok(fresh)
    }
}

/// Room the reader's buffer gets when it is full: one read takes every answer that has
/// arrived, up to this much (a frame larger than it gets room for the whole frame).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Less room than this left in the buffer is topped up before a read (not a read per frame).
const READ_BYTES_MIN: usize = 4096;

/// Read from `read` until `buffer` holds at least `needed` bytes; false at EOF or an error.
async fn fill<R: AsyncRead + Unpin>(read: &mut R, buffer: &mut BytesMut, needed: usize) -> bool {
    while buffer.len() < needed {
        let missing = needed - buffer.len();
        if buffer.capacity() - buffer.len() < missing.max(READ_BYTES_MIN) {
            buffer.reserve(missing.max(READ_BUFFER_BYTES));
        }
        match read.read_buf(buffer).await {
            Ok(0) | Err(_) => return false,
            Ok(_) => {}
        }
    }
    true
}

/// Read answers and hand each to its call; a frame over `reply_bytes_max` (checked on its
/// header, before any allocation) or a malformed one ends the connection: every call in flight
/// then fails with `Closed`, or is resent if the bridge's drain notice came first (`drained`).
async fn read_answers<R: AsyncRead + Unpin>(
    mut read: R,
    pending: Pending,
    drained: Arc<AtomicBool>,
    ended: tokio::sync::watch::Sender<bool>,
    reply_bytes_max: u32,
) {
    let mut buffer = BytesMut::with_capacity(READ_BUFFER_BYTES);
    loop {
        if !fill(&mut read, &mut buffer, HEADER_BYTES).await {
            break;
        }
        let Ok(header) = Header::decode(&buffer[..HEADER_BYTES], reply_bytes_max) else {
            break;
        };
        // The bound was checked on the header: what is reserved for the frame is at most it.
        let frame_bytes = HEADER_BYTES + header.payload_len as usize;
        if !fill(&mut read, &mut buffer, frame_bytes).await {
            break;
        }
        let mut frame = buffer.split_to(frame_bytes);
        frame.advance(HEADER_BYTES);
        let payload = frame.freeze();
        if crate::is_drain_notice(&header) {
            // Nothing unanswered on this connection has run; the bridge closes it next.
            drained.store(true, Ordering::SeqCst);
            continue;
        }
        let waiter = pending
            .lock()
            .expect("not poisoned")
            .remove(&header.request_id);
        if let Some(waiter) = waiter {
            let _ = waiter.send(Answer { header, payload });
        }
    }
    // Dropping the senders wakes every waiting call with `Closed` (or, after the notice, a
    // resend).
    pending.lock().expect("not poisoned").clear();
    let _ = ended.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply_frame(out: &mut Vec<u8>, request_id: u64, payload: &[u8]) {
        let header = Header::new(Kind::Reply, 1, request_id, payload.len() as u32);
        proto::encode_frame(out, &header, payload);
    }

    #[test]
    fn replies_are_views_of_the_read_buffer_not_copies() {
        // Proves the reader hands each reply out as a slice of the buffer the socket was read
        // into: two answers that arrived together are adjacent views of one allocation, and a
        // reply larger than the buffer's base size arrives whole.
        let mut wire = Vec::new();
        reply_frame(&mut wire, 1, b"first");
        reply_frame(&mut wire, 2, b"second");
        let large: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        reply_frame(&mut wire, 3, &large);
        let pending: Pending = Arc::default();
        let receivers: Vec<_> = (1..=3u64)
            .map(|id| {
                let (sender, receiver) = oneshot::channel();
                pending.lock().unwrap().insert(id, sender);
                receiver
            })
            .collect();
        let (ended, _watch) = tokio::sync::watch::channel(false);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let answers: Vec<Answer> = runtime.block_on(async {
            let drained = Arc::new(AtomicBool::new(false));
            read_answers(&wire[..], Arc::clone(&pending), drained, ended, 1 << 20).await;
            let mut answers = Vec::new();
            for receiver in receivers {
                answers.push(receiver.await.expect("an answer"));
            }
            answers
        });
        assert_eq!(answers[0].payload, &b"first"[..]);
        assert_eq!(answers[1].payload, &b"second"[..]);
        assert_eq!(answers[2].payload, large);
        let first_end = answers[0].payload.as_ptr() as usize + answers[0].payload.len();
        assert_eq!(
            answers[1].payload.as_ptr() as usize,
            first_end + HEADER_BYTES,
            "the second reply is not in the same buffer, right after the first"
        );
    }
}
