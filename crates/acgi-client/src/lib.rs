//! Client SDK: call services through a bridge, from async Rust (tokio) or from blocking code.
//!
//! ```no_run
//! # fn demo() -> Result<(), acgi_client::CallError> {
//! let mut client = acgi_client::BlockingClient::connect("/run/acgi-bridge/acgi-bridge.sock")?;
//! let reply = client.call("echo", b"hello")?;
//! # Ok(()) }
//! ```
//!
//! - [`BlockingClient`], always: one call at a time, or `send` + `receive` to pipeline. It
//!   depends on std and `acgi-proto` only.
//! - `Client`, with the default feature `tokio`: many calls in flight on one connection; each
//!   call gets a fresh request id, and a reader task matches replies to calls by id, in
//!   whatever order they come. Build with `default-features = false` for the blocking client
//!   without tokio.
//!
//! Service names are resolved to ids once per connection (a `Resolve` frame) and cached.
//!
//! Replies: `Client` returns `Bytes` (feature `tokio`), a view of the buffer
//! its reader task read the socket into, so a reply is never copied between the kernel and the
//! caller (many answers arrive in one read). `BlockingClient` returns `Vec<u8>`: it reads each
//! payload straight from the socket into a `Vec` of exactly its length, so there is no copy to
//! avoid, and a `Vec` keeps the blocking client free of every dependency but std and
//! `acgi-proto` (`default-features = false`).
//!
//! Draining bridges (a binary upgrade, docs/protocol.md §2.6): a call answered with error 6
//! (`shutting down`), or still unanswered when the bridge's drain notice (an `Error` 6 with
//! request id 0) arrives, never ran. `Client` and `BlockingClient::call` then resend it on a
//! new connection to the same address, at most [`DRAIN_RETRIES_MAX`] times, and return the
//! error 6 only when no new connection can be made or the retries are spent. No other failure
//! is retried: a call in flight when a connection closes without the notice has an unknown
//! outcome. Service ids are resolved again on the new connection.
//! Addresses: `unix:/path`, `tcp:host:port`, `tls:host:port`, or bare: a string containing `/`
//! is a Unix socket path, anything else is a TCP `host:port`.
//!
//! TLS (feature `tls`, on by default): a `tls:` address needs [`ConnectOptions::tls`] with a
//! [`TlsConfig`]: the CA that signed the bridge's certificate, and for a bridge that asks for
//! client certificates (`listen.tls_client_ca`), the client's certificate and key:
//!
//! ```no_run
//! # fn demo() -> Result<(), acgi_client::CallError> {
//! use acgi_client::{ConnectOptions, TlsConfig};
//! let tls = TlsConfig::new("ca.pem")?.client_cert("client.pem", "client.key")?;
//! let mut client = ConnectOptions::new().tls(tls).blocking("tls:bridge.example:7879")?;
//! # Ok(()) }
//! ```
//!
//! The bridge's certificate is checked against the host of the address (a name or an IP
//! address) unless [`TlsConfig::server_name`] names another.

#![forbid(unsafe_code)]
#![warn(missing_docs)]
// The crate docs link the `tls` feature's items; without the feature they are plain text.
#![cfg_attr(not(feature = "tls"), allow(rustdoc::broken_intra_doc_links))]

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::PathBuf;

pub use acgi_proto as proto;

use proto::{ErrorCode, Header, Kind, HEADER_BYTES};

#[cfg(feature = "tokio")]
mod async_client;
#[cfg(feature = "tls")]
mod tls;
#[cfg(feature = "tokio")]
pub use async_client::Client;
/// The async client's reply type (feature `tokio`), re-exported from the `bytes` crate.
#[cfg(feature = "tokio")]
pub use bytes::Bytes;
#[cfg(feature = "tls")]
pub use tls::TlsConfig;

/// How many times one call is resent on a new connection after a draining bridge refused it
/// (each time, the bridge said it did not run). One suffices when a new bridge has taken over;
/// the rest cover a connection that reached the old one just as it stopped accepting.
pub const DRAIN_RETRIES_MAX: u32 = 3;

/// Whether a frame from the bridge is the drain notice: `Error`, code 6, request id 0.
///
/// ```
/// use acgi_client::{is_drain_notice, proto::{ErrorCode, Header, Kind}};
/// let mut notice = Header::new(Kind::Error, 0, 0, 0);
/// notice.code = ErrorCode::ShuttingDown as u16;
/// assert!(is_drain_notice(&notice));
/// notice.request_id = 9; // error 6 for one request: not the notice
/// assert!(!is_drain_notice(&notice));
/// ```
pub fn is_drain_notice(header: &Header) -> bool {
    header.kind == Kind::Error
        && header.code == ErrorCode::ShuttingDown as u16
        && header.request_id == 0
}

/// Whether a call's error is error 6 (`shutting down`): the call did not run.
fn is_shutting_down(error: &CallError) -> bool {
    matches!(error, CallError::Remote { code, .. } if *code == ErrorCode::ShuttingDown as u16)
}

/// Where a bridge listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Addr {
    /// A Unix stream socket at this path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
    /// A TLS `host:port` (feature `tls`; see [`ConnectOptions::tls`]).
    Tls(String),
}

impl Addr {
    /// Read an address in one of the forms the module docs list (any string is one).
    ///
    /// ```
    /// use acgi_client::Addr;
    /// use std::path::PathBuf;
    /// assert_eq!(Addr::parse("/run/acgi-bridge/acgi-bridge.sock"), Addr::Unix(PathBuf::from("/run/acgi-bridge/acgi-bridge.sock")));
    /// assert_eq!(Addr::parse("unix:bridge.sock"), Addr::Unix(PathBuf::from("bridge.sock")));
    /// assert_eq!(Addr::parse("127.0.0.1:7878"), Addr::Tcp("127.0.0.1:7878".into()));
    /// assert_eq!(Addr::parse("tls:bridge.example:7879"), Addr::Tls("bridge.example:7879".into()));
    /// ```
    pub fn parse(text: &str) -> Addr {
        if let Some(path) = text.strip_prefix("unix:") {
            Addr::Unix(PathBuf::from(path))
        } else if let Some(host_port) = text.strip_prefix("tcp:") {
            Addr::Tcp(host_port.to_string())
        } else if let Some(host_port) = text.strip_prefix("tls:") {
            Addr::Tls(host_port.to_string())
        } else if text.contains('/') {
            Addr::Unix(PathBuf::from(text))
        } else {
            Addr::Tcp(text.to_string())
        }
    }
}

/// The largest reply payload a client accepts by default: the bridge's default
/// `max_payload_bytes` (16 MiB). A larger `payload_len` is a protocol error found on the
/// 24-byte header, before anything is allocated for the payload.
pub const REPLY_BYTES_MAX_DEFAULT: u32 = proto::PAYLOAD_BYTES_MAX_DEFAULT;

/// How to connect: the reply bound, an optional check of who serves a Unix socket, and
/// timeouts.
///
/// ```no_run
/// # fn demo() -> Result<(), acgi_client::CallError> {
/// use std::time::Duration;
/// let options = acgi_client::ConnectOptions::new()
///     .expected_uid(0) // only a bridge running as root may answer on this path
///     .reply_bytes_max(1 << 20) // the bridge's max_payload_bytes
///     .io_timeout(Duration::from_secs(5));
/// let mut client = options.blocking("/run/acgi-bridge/acgi-bridge.sock")?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct ConnectOptions {
    reply_bytes_max: u32,
    expected_uid: Option<u32>,
    io_timeout: Option<std::time::Duration>,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            reply_bytes_max: REPLY_BYTES_MAX_DEFAULT,
            expected_uid: None,
            io_timeout: None,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// A `tls:` address in a build without the `tls` feature.
#[cfg(not(feature = "tls"))]
fn tls_not_built() -> CallError {
    CallError::Protocol(
        "tls: addresses need acgi-client's `tls` feature, which this build lacks".into(),
    )
}

impl ConnectOptions {
    /// The defaults: replies up to [`REPLY_BYTES_MAX_DEFAULT`], no owner check, no timeout.
    pub fn new() -> ConnectOptions {
        ConnectOptions::default()
    }

    /// Accept replies up to `bytes` (set it to the bridge's `max_payload_bytes`).
    pub fn reply_bytes_max(mut self, bytes: u32) -> ConnectOptions {
        self.reply_bytes_max = bytes.min(proto::PAYLOAD_BYTES_MAX_CEILING);
        self
    }

    /// On a Unix socket, refuse to talk unless the process serving it runs as `uid`
    /// (`SO_PEERCRED`, filled in by the kernel): a squatter on the socket path gets nothing.
    pub fn expected_uid(mut self, uid: u32) -> ConnectOptions {
        self.expected_uid = Some(uid);
        self
    }

    /// Bound every read and write of the blocking client (an expired one fails the call with
    /// an I/O error; the connection should then be dropped).
    pub fn io_timeout(mut self, timeout: std::time::Duration) -> ConnectOptions {
        self.io_timeout = Some(timeout);
        self
    }

    /// Verify `tls:` bridges (and prove who this client is) with `tls`.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, tls: TlsConfig) -> ConnectOptions {
        self.tls = Some(tls);
        self
    }

    /// Connect a [`BlockingClient`] to `addr` with these options.
    pub fn blocking(&self, addr: &str) -> Result<BlockingClient, CallError> {
        let stream = match Addr::parse(addr) {
            Addr::Unix(path) => {
                let stream = std::os::unix::net::UnixStream::connect(path)?;
                self.check_server(&stream)?;
                stream.set_read_timeout(self.io_timeout)?;
                stream.set_write_timeout(self.io_timeout)?;
                BlockingStream::Unix(stream)
            }
            Addr::Tcp(host_port) => {
                self.check_tcp_allowed()?;
                let stream = std::net::TcpStream::connect(host_port)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(self.io_timeout)?;
                stream.set_write_timeout(self.io_timeout)?;
                BlockingStream::Tcp(stream)
            }
            #[cfg(feature = "tls")]
            Addr::Tls(host_port) => {
                self.check_tcp_allowed()?;
                let (config, name) = self.tls_for(&host_port)?;
                let stream = std::net::TcpStream::connect(&host_port)?;
                stream.set_nodelay(true)?;
                stream.set_read_timeout(self.io_timeout)?;
                stream.set_write_timeout(self.io_timeout)?;
                BlockingStream::Tls(Box::new(tls::connect_blocking(config, name, stream)?))
            }
            #[cfg(not(feature = "tls"))]
            Addr::Tls(_) => return Err(tls_not_built()),
        };
        Ok(BlockingClient {
            stream,
            next_request_id: 1,
            services: HashMap::new(),
            reply_bytes_max: self.reply_bytes_max,
            addr: addr.to_string(),
            options: self.clone(),
            drain_retries: 0,
        })
    }

    /// `expected_uid` cannot be checked over TCP: refuse rather than skip it.
    fn check_tcp_allowed(&self) -> Result<(), CallError> {
        match self.expected_uid {
            Some(_) => Err(CallError::Protocol(
                "expected_uid needs a Unix socket: a TCP peer has no uid to check".into(),
            )),
            None => Ok(()),
        }
    }

    /// The check of [`ConnectOptions::expected_uid`] on a connected Unix socket.
    fn check_server(&self, socket: &impl std::os::fd::AsFd) -> Result<(), CallError> {
        let Some(expected) = self.expected_uid else {
            return Ok(());
        };
        let cred = rustix::net::sockopt::socket_peercred(socket).map_err(io::Error::from)?;
        let uid = cred.uid.as_raw();
        if uid != expected {
            return Err(CallError::Protocol(format!(
                "the socket is served by uid {uid}, not the expected {expected}: not talking \
                 to it"
            )));
        }
        Ok(())
    }
}

/// Which service to call: by name (resolved once and cached) or by numeric id.
#[derive(Clone, Debug)]
pub enum Service<'a> {
    /// The service's registered name.
    Name(&'a str),
    /// The service's id on the wire.
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
#[derive(Debug)]
pub enum CallError {
    /// The bridge answered with an error frame.
    Remote {
        /// The frame's code (an [`ErrorCode`] when this version knows it, see [`CallError::code`]).
        code: u16,
        /// The bridge's or the handler's message.
        message: String,
    },
    /// Connecting, reading or writing failed.
    Io(io::Error),
    /// The bridge sent something this client cannot accept.
    Protocol(String),
    /// The connection closed before the reply arrived.
    Closed,
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Remote { code, message } => {
                write!(f, "{}: {message}", describe_code(*code))
            }
            CallError::Io(error) => write!(f, "connection: {error}"),
            CallError::Protocol(what) => write!(f, "bridge broke the protocol: {what}"),
            CallError::Closed => f.write_str("connection closed before the reply arrived"),
        }
    }
}

impl std::error::Error for CallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CallError::Io(error) => Some(error),
            _ => None,
        }
    }
}

impl From<io::Error> for CallError {
    fn from(error: io::Error) -> Self {
        CallError::Io(error)
    }
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
    /// The checked header.
    pub header: Header,
    /// The payload that followed it.
    pub payload: Vec<u8>,
}

impl Answer {
    /// Turn a reply-like answer into the payload, an error frame into [`CallError::Remote`].
    ///
    /// ```
    /// use acgi_client::{Answer, proto::{ErrorCode, Header, Kind}};
    /// let mut header = Header::new(Kind::Error, 1, 7, 4);
    /// header.code = ErrorCode::ServiceError as u16;
    /// let error = Answer { header, payload: b"oops".to_vec() }.into_result().unwrap_err();
    /// assert_eq!(error.code(), Some(ErrorCode::ServiceError));
    /// assert!(error.to_string().ends_with("oops"));
    /// ```
    pub fn into_result(self) -> Result<Vec<u8>, CallError> {
        answer_result(&self.header, self.payload)
    }
}

/// An answer's payload when it is a reply-like frame, its error as [`CallError::Remote`]
/// otherwise: the one reading of an answer's kind for both clients (`Vec<u8>` or `Bytes`).
pub(crate) fn answer_result<P: AsRef<[u8]>>(header: &Header, payload: P) -> Result<P, CallError> {
    match header.kind {
        Kind::Reply | Kind::Pong | Kind::Resolved => Ok(payload),
        Kind::Error => Err(CallError::Remote {
            code: header.code,
            message: String::from_utf8_lossy(payload.as_ref()).into_owned(),
        }),
        other => Err(CallError::Protocol(format!("unexpected {other:?} frame"))),
    }
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
    #[cfg(feature = "tls")]
    Tls(Box<tls::BlockingTls>),
}

impl Read for BlockingStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => stream.read(buf),
            BlockingStream::Tcp(stream) => stream.read(buf),
            #[cfg(feature = "tls")]
            BlockingStream::Tls(stream) => stream.read(buf),
        }
    }
}

impl Write for BlockingStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingStream::Unix(stream) => stream.write(buf),
            BlockingStream::Tcp(stream) => stream.write(buf),
            #[cfg(feature = "tls")]
            BlockingStream::Tls(stream) => stream.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            #[cfg(feature = "tls")]
            BlockingStream::Tls(stream) => stream.flush(),
            _ => Ok(()),
        }
    }
}

/// A blocking connection, for scripts, tests and the CLI. `call` does one round trip;
/// `send` + `receive` pipeline many requests on the connection.
///
/// ```no_run
/// # fn demo() -> Result<(), acgi_client::CallError> {
/// use acgi_client::{BlockingClient, Service};
/// let mut client = BlockingClient::connect("/run/acgi-bridge/acgi-bridge.sock")?;
/// assert_eq!(client.call("echo", b"hi")?, b"hi");
/// // Pipelined: send three, then read the three answers, in whatever order they come.
/// let echo = client.service_id(Service::Name("echo"))?;
/// let ids: Vec<u64> = (0..3u8)
///     .map(|n| client.send(echo, &[n]))
///     .collect::<Result<_, _>>()?;
/// for _ in &ids {
///     let answer = client.receive()?;
///     assert!(ids.contains(&answer.header.request_id));
///     let reply = answer.into_result()?;
/// }
/// # Ok(()) }
/// ```
pub struct BlockingClient {
    stream: BlockingStream,
    next_request_id: u64,
    services: HashMap<String, u32>,
    reply_bytes_max: u32,
    /// For a reconnect after a drain.
    addr: String,
    options: ConnectOptions,
    drain_retries: u64,
}

impl BlockingClient {
    /// Connect to a bridge at `addr` (see the module docs for the address forms) with the
    /// default [`ConnectOptions`].
    pub fn connect(addr: &str) -> Result<BlockingClient, CallError> {
        ConnectOptions::new().blocking(addr)
    }

    /// Call `service` and wait for its answer. Do not mix with outstanding `send`s. A call a
    /// draining bridge refused is resent on a new connection (see the crate docs).
    pub fn call<'a>(
        &mut self,
        service: impl Into<Service<'a>>,
        payload: &[u8],
    ) -> Result<Vec<u8>, CallError> {
        let service = service.into();
        let mut retries = 0;
        loop {
            let result = self
                .service_id(service.clone())
                .and_then(|service_id| self.call_once(service_id, payload));
            match result {
                Err(error) if is_shutting_down(&error) && retries < DRAIN_RETRIES_MAX => {
                    // (A bridge that stops without a successor: its answer stands.)
                    self.reconnect().map_err(|_| error)?;
                    retries += 1;
                    self.drain_retries += 1;
                }
                other => return other,
            }
        }
    }

    /// Calls resent on a new connection so far because the bridge was draining.
    pub fn drain_retries(&self) -> u64 {
        self.drain_retries
    }

    fn call_once(&mut self, service_id: u32, payload: &[u8]) -> Result<Vec<u8>, CallError> {
        let request_id = match self.send(service_id, payload) {
            Ok(id) => id,
            Err(error) => return Err(self.after_send_failed(error)),
        };
        let answer = self.receive_or_notice()?;
        if answer.header.request_id != request_id {
            return Err(CallError::Protocol(format!(
                "reply for request {} while waiting for {request_id}",
                answer.header.request_id
            )));
        }
        answer.into_result()
    }

    /// The next answer; the drain notice as its error 6.
    fn receive_or_notice(&mut self) -> Result<Answer, CallError> {
        let answer = self.receive()?;
        if is_drain_notice(&answer.header) {
            return Err(answer.into_result().expect_err("an error frame"));
        }
        Ok(answer)
    }

    /// A send failed: when the bridge closed the connection after its drain notice (which is
    /// then waiting to be read), the error is the notice's (the request did not run).
    fn after_send_failed(&mut self, error: CallError) -> CallError {
        match self.receive() {
            Ok(answer) if is_drain_notice(&answer.header) => {
                answer.into_result().expect_err("an error frame")
            }
            _ => error,
        }
    }

    /// A new connection to the same address, with the same options (service names are
    /// resolved anew; request ids go on counting).
    fn reconnect(&mut self) -> Result<(), CallError> {
        let fresh = self.options.blocking(&self.addr)?;
        self.stream = fresh.stream;
        self.services.clear();
        Ok(())
    }

    /// The numeric id of `service`, asking the bridge on first use of a name.
    pub fn service_id(&mut self, service: Service<'_>) -> Result<u32, CallError> {
        let name = match service {
            Service::Id(id) => return Ok(id),
            Service::Name(name) => name,
        };
        if let Some(id) = self.services.get(name) {
            return Ok(*id);
        }
        let request_id = match self.send_frame(Kind::Resolve, 0, name.as_bytes()) {
            Ok(id) => id,
            Err(error) => return Err(self.after_send_failed(error)),
        };
        let answer = self.receive_or_notice()?;
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

    /// Send a request with a deadline (see `Client::call_with_timeout`); returns its id.
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
        self.stream.flush()?;
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
        self.stream.flush()?;
        Ok(request_id)
    }

    /// Wait for the next answer frame, whichever request it belongs to. (A draining bridge's
    /// notice is one too: see [`is_drain_notice`]; then nothing still unanswered ran.)
    pub fn receive(&mut self) -> Result<Answer, CallError> {
        let mut bytes = [0u8; HEADER_BYTES];
        match self.stream.read_exact(&mut bytes) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(CallError::Closed)
            }
            Err(error) => return Err(error.into()),
        }
        // The bound is checked on the header: a claimed length over it allocates nothing.
        let header = Header::decode(&bytes, self.reply_bytes_max)?;
        let mut payload = vec![0u8; header.payload_len as usize];
        self.stream.read_exact(&mut payload)?;
        Ok(Answer { header, payload })
    }

    /// Write raw bytes to the connection (for tests of malformed input).
    pub fn write_raw(&mut self, bytes: &[u8]) -> Result<(), CallError> {
        self.stream.write_all(bytes)?;
        self.stream.flush()?;
        Ok(())
    }
}
