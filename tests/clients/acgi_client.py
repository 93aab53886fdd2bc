"""A small blocking acgi-bridge client, written only from docs/protocol.md (Part I).

Standard library only (socket, struct). It exists as a conformance check of the spec: if this
client cannot talk to the bridge, either the bridge or the spec is wrong.

    client = connect("/run/acgi-bridge/acgi-bridge.sock")      # or "127.0.0.1:7878"
    client.call("echo", b"hello")                   # -> b"hello", or raises AcgiError
    ids = [client.send(echo_id, p) for p in payloads]   # pipelined
    answers = client.receive_all(ids)               # {request_id: Frame}, any arrival order
"""

import socket
import struct
from collections import namedtuple

# §1.2 The header: magic u16, version u8, kind u8, flags u16, code u16, service_id u32,
# payload_len u32, request_id u64; little-endian, 24 bytes.
HEADER = struct.Struct("<HBBHHIIQ")
HEADER_BYTES = 24
assert HEADER.size == HEADER_BYTES
MAGIC = 0xAC6B
VERSION = 1

# §1.3 Kinds.
REQUEST, REPLY, ERROR, RESOLVE, RESOLVED, PING, PONG = 1, 2, 3, 4, 5, 6, 7
HELLO, JOB, DONE, FAIL = 16, 17, 18, 19
KINDS = {REQUEST, REPLY, ERROR, RESOLVE, RESOLVED, PING, PONG, HELLO, JOB, DONE, FAIL}
ANSWER_KINDS = {REPLY, ERROR, RESOLVED, PONG}
KIND_NAMES = {
    REQUEST: "Request", REPLY: "Reply", ERROR: "Error", RESOLVE: "Resolve",
    RESOLVED: "Resolved", PING: "Ping", PONG: "Pong", HELLO: "Hello", JOB: "Job",
    DONE: "Done", FAIL: "Fail",
}

# §1.4 Flags.
FLAG_IN_SLOT = 0x0001
FLAGS_KNOWN = FLAG_IN_SLOT

# §3 Error codes.
UNKNOWN_SERVICE = 1
PAYLOAD_TOO_LARGE = 2
OVERLOADED = 3
WORKER_FAILED = 4
TIMED_OUT = 5
SHUTTING_DOWN = 6
MALFORMED_FRAME = 7
SERVICE_ERROR = 8
SERVICE_UNAVAILABLE = 9
DEADLINE_EXCEEDED = 10
ERROR_NAMES = {
    1: "unknown service", 2: "payload too large", 3: "overloaded", 4: "worker failed",
    5: "timed out", 6: "shutting down", 7: "malformed frame", 8: "service error",
    9: "service unavailable", 10: "deadline exceeded",
}
RETRYABLE = {OVERLOADED, WORKER_FAILED, TIMED_OUT, SHUTTING_DOWN, SERVICE_UNAVAILABLE}

# §4 Limits.
MAX_PAYLOAD_BYTES_DEFAULT = 16 * 1024 * 1024
MAX_PAYLOAD_BYTES_CEILING = 1 << 30

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class AcgiError(Exception):
    """The bridge answered with an Error frame (§3)."""

    def __init__(self, code, message, request_id=None):
        self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{self.name} (code {code}): {message}")

    @property
    def name(self):
        return ERROR_NAMES.get(self.code, "unknown error code")

    @property
    def retryable(self):
        return self.code in RETRYABLE


class ProtocolError(Exception):
    """The bridge sent bytes this spec does not allow."""


class ConnectionClosed(Exception):
    """The connection ended (orderly close or reset); in-flight requests have unknown outcome."""


Frame = namedtuple(
    "Frame", "version kind flags code service_id payload_len request_id payload"
)


def encode_header(kind, service_id, request_id, payload_len, flags=0, code=0,
                  magic=MAGIC, version=VERSION):
    """The 24 header bytes. magic/version/code are parameters so tests can build bad frames."""
    return HEADER.pack(magic, version, kind, flags, code, service_id, payload_len, request_id)


def encode_frame(kind, service_id, request_id, payload=b"", **header_fields):
    payload = bytes(payload)
    return encode_header(kind, service_id, request_id, len(payload), **header_fields) + payload


def decode_header(data, max_payload_bytes=MAX_PAYLOAD_BYTES_CEILING):
    """Check a 24-byte header in the order of §1.2; returns (magic, version, kind, flags, code,
    service_id, payload_len, request_id) or raises ProtocolError."""
    if len(data) != HEADER_BYTES:
        raise ProtocolError(f"truncated header: {len(data)} of {HEADER_BYTES} bytes")
    fields = HEADER.unpack(data)
    magic, version, kind, flags, code, _service_id, payload_len, _request_id = fields
    if magic != MAGIC:
        raise ProtocolError(f"bad magic 0x{magic:04x}")
    if version != VERSION:
        raise ProtocolError(f"unsupported version {version}")
    if kind not in KINDS:
        raise ProtocolError(f"unknown kind {kind}")
    if flags & ~FLAGS_KNOWN:
        raise ProtocolError(f"unknown flags 0x{flags:04x}")
    if kind != ERROR and code != 0:
        raise ProtocolError(f"code {code} on a {KIND_NAMES[kind]} frame")
    if payload_len > max_payload_bytes:
        raise ProtocolError(f"payload of {payload_len} bytes is over {max_payload_bytes}")
    return fields


def parse_addr(addr):
    """`unix:/path`, `tcp:host:port`, or bare: containing '/' -> Unix path, else host:port.
    Returns (family, sockaddr)."""
    if addr.startswith("unix:"):
        return socket.AF_UNIX, addr[len("unix:"):]
    if addr.startswith("tcp:"):
        addr = addr[len("tcp:"):]
    elif "/" in addr:
        return socket.AF_UNIX, addr
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{addr!r} is neither a socket path nor host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return None, (host, int(port))


def connect(addr, timeout=None, max_payload_bytes=MAX_PAYLOAD_BYTES_DEFAULT):
    """Connect to a bridge at `addr` (a Unix socket path or host:port)."""
    family, sockaddr = parse_addr(addr)
    if family == socket.AF_UNIX:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(sockaddr)
        except BaseException:
            sock.close()
            raise
    else:
        sock = socket.create_connection(sockaddr, timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return Client(sock, max_payload_bytes=max_payload_bytes)


class Client:
    """One pipelined, blocking connection. Not thread-safe.

    `call`, `resolve` and `ping` send one frame and wait for its answer; answers to other
    in-flight frames that arrive meanwhile are kept and returned later by `receive`/`wait`.
    """

    def __init__(self, sock, max_payload_bytes=MAX_PAYLOAD_BYTES_DEFAULT):
        self.sock = sock
        self.max_payload_bytes = max_payload_bytes
        self._next_request_id = 1
        self._in_flight = set()
        self._arrived = {}  # request_id -> Frame, received but not yet handed out
        self._services = {}
        self.closed = False

    # -- sending -----------------------------------------------------------------------------

    def next_request_id(self):
        """A fresh id: a counter from 1, skipping 0 and ids still in flight (§2.1)."""
        while True:
            request_id = self._next_request_id
            self._next_request_id = request_id + 1 if request_id < U64_MAX else 1
            if request_id not in self._in_flight and request_id not in self._arrived:
                return request_id

    def send_frame(self, kind, service_id=0, payload=b"", request_id=None, **header_fields):
        """Send one frame of any kind; returns its request id. `header_fields` (flags, code,
        magic, version) are for tests that build malformed frames."""
        if request_id is None:
            request_id = self.next_request_id()
        self.sock.sendall(encode_frame(kind, service_id, request_id, payload, **header_fields))
        self._in_flight.add(request_id)
        return request_id

    def send(self, service_id, payload=b"", request_id=None):
        """Pipelined Request: send without waiting; returns the request id."""
        return self.send_frame(REQUEST, service_id, payload, request_id)

    def send_raw(self, data):
        """Write raw bytes (for tests of malformed input)."""
        self.sock.sendall(data)

    # -- receiving ---------------------------------------------------------------------------

    def _read_exact(self, count):
        buffer = bytearray(count)
        view = memoryview(buffer)
        have = 0
        while have < count:
            try:
                got = self.sock.recv_into(view[have:], count - have)
            except ConnectionResetError as error:
                self.closed = True
                raise ConnectionClosed(f"connection reset: {error}") from error
            if got == 0:
                self.closed = True
                if have == 0:
                    raise ConnectionClosed("connection closed by the bridge")
                raise ConnectionClosed(f"connection closed inside a frame ({have}/{count})")
            have += got
        return bytes(buffer)

    def read_frame(self):
        """Read the next frame from the socket, whatever it answers."""
        header = self._read_exact(HEADER_BYTES)
        # The bridge never sends more than its max_payload_bytes (§4).
        _magic, version, kind, flags, code, service_id, payload_len, request_id = decode_header(
            header, self.max_payload_bytes
        )
        if kind not in ANSWER_KINDS:
            raise ProtocolError(f"bridge sent a {KIND_NAMES[kind]} frame to a caller")
        if flags != 0:
            raise ProtocolError(f"bridge sent flags 0x{flags:04x} to a caller")
        payload = self._read_exact(payload_len) if payload_len else b""
        return Frame(version, kind, flags, code, service_id, payload_len, request_id, payload)

    def receive(self):
        """The next answer, whichever in-flight frame it belongs to (kept ones first)."""
        if self._arrived:
            request_id = next(iter(self._arrived))
            return self._arrived.pop(request_id)
        frame = self.read_frame()
        self._in_flight.discard(frame.request_id)
        return frame

    def wait(self, request_id):
        """The answer to `request_id`, keeping any other answers that arrive first."""
        if request_id in self._arrived:
            return self._arrived.pop(request_id)
        while True:
            frame = self.read_frame()
            if frame.request_id == request_id:
                self._in_flight.discard(request_id)
                return frame
            if frame.request_id in self._in_flight:
                self._in_flight.discard(frame.request_id)
                self._arrived[frame.request_id] = frame
            elif frame.kind == ERROR:
                # Not ours: a malformed-frame error (id 0) means the bridge is closing.
                raise AcgiError(frame.code, _text(frame.payload), frame.request_id)
            # An answer for an id nobody waits for: ignore it (§11).

    def receive_all(self, request_ids):
        """Answers to all `request_ids`, as {request_id: Frame}, in whatever order they come."""
        return {request_id: self.wait(request_id) for request_id in list(request_ids)}

    # -- round trips -------------------------------------------------------------------------

    def resolve(self, name):
        """The id of the service called `name` (cached per connection)."""
        if name in self._services:
            return self._services[name]
        frame = self.wait(self.send_frame(RESOLVE, 0, name.encode("utf-8")))
        result(frame, RESOLVED)
        self._services[name] = frame.service_id
        return frame.service_id

    def service_id(self, service):
        if isinstance(service, int):
            return service
        return self.resolve(service)

    def call(self, service, payload=b""):
        """Call `service` (name or id) with `payload`; returns the reply bytes or raises
        AcgiError."""
        request_id = self.send(self.service_id(service), payload)
        return result(self.wait(request_id), REPLY)

    def ping(self, payload=b""):
        return result(self.wait(self.send_frame(PING, 0, payload)), PONG)

    def close(self):
        self.closed = True
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _text(payload):
    return payload.decode("utf-8", errors="replace")


def result(frame, expected_kind):
    """The payload of an answer of `expected_kind`, or AcgiError for an Error frame."""
    if frame.kind == ERROR:
        raise AcgiError(frame.code, _text(frame.payload), frame.request_id)
    if frame.kind != expected_kind:
        raise ProtocolError(
            f"expected {KIND_NAMES[expected_kind]}, got {KIND_NAMES.get(frame.kind, frame.kind)}"
        )
    if frame.code != 0:
        raise ProtocolError(f"code {frame.code} on a {KIND_NAMES[frame.kind]}")
    return frame.payload
