"""The blocking client: one connection, pipelined, for scripts, tests and threads that block.

::

    with acgi.Client("/run/acgi-bridge/acgi-bridge.sock") as client:     # or "127.0.0.1:7878"
        reply = client.call("echo", b"hello", timeout=2.0)

Not thread-safe: use one ``Client`` per thread (or :class:`acgi.AsyncClient`). A call that
times out leaves the connection usable: its late answer, if any, is discarded when it arrives.

A call a draining bridge refused (error 6, or unanswered when the drain notice came: it never
ran, docs/protocol.md §2.6) is resent on a new connection to the same address, at most
:data:`acgi.errors.DRAIN_RETRIES_MAX` times: a binary upgrade of the bridge fails no call.
"""

from __future__ import annotations

import socket
import time
from typing import Dict, Optional, Set, Tuple, Union

from . import errors
from ._framing import (RECV_BYTES, Address, FrameBuffer, RequestIds, answer_result,
                       check_answer, check_name, parse_address, request_payload)
from .protocol import (PAYLOAD_BYTES_MAX_DEFAULT, Header, Kind, encode_frame, FrameError)

__all__ = ["Client", "Service"]

#: A service is named (resolved once per connection, then cached) or given by its id.
Service = Union[str, int]


class Client:
    """A blocking connection to a bridge at ``address`` (Unix path or ``HOST:PORT``).

    ``reply_bytes_max`` bounds the payload of every frame the bridge sends (default 16 MiB,
    the bridge's default ``max_payload_bytes``): a larger ``payload_len`` is a protocol error,
    refused on the header before any room is made for the payload, and the connection is
    closed. ``connect_timeout`` (seconds) bounds connecting.
    """

    def __init__(self, address: Address, *, reply_bytes_max: int = PAYLOAD_BYTES_MAX_DEFAULT,
                 connect_timeout: Optional[float] = 10.0) -> None:
        self._address = address
        self._reply_bytes_max = reply_bytes_max
        self._connect_timeout = connect_timeout
        #: Calls resent on a new connection because the bridge was draining.
        self.drain_retries = 0
        self._open()

    def _open(self) -> None:
        family, sockaddr = parse_address(self._address)
        connect_timeout = self._connect_timeout
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(connect_timeout)
                sock.connect(sockaddr)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection(sockaddr, timeout=connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        self._sock: Optional[socket.socket] = sock
        self._input = FrameBuffer(self._reply_bytes_max)
        self._ids = RequestIds()
        self._waiting: Set[int] = set()
        self._arrived: Dict[int, Tuple[Header, bytes]] = {}
        self._services: Dict[str, int] = {}
        self._failure: Optional[errors.ConnectionClosed] = None

    # -- calls ---------------------------------------------------------------------------------

    def call(self, service: Service, payload=b"", *, timeout: Optional[float] = None,
             queue_timeout: Optional[float] = None) -> bytes:
        """Call ``service`` with ``payload``; the reply's bytes.

        ``timeout`` (seconds) bounds the wait here: :class:`CallTimeout` when no answer came in
        time. ``queue_timeout`` (seconds, default ``timeout``) is sent to the bridge as the
        request's own timeout (§2.2a): if no worker has taken it by then it never runs
        (:class:`DeadlineExceeded`, code 10), and the handler sees the time left in
        :func:`acgi.worker.remaining`. Raises :class:`CallError` (by code),
        :class:`ConnectionClosed`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        retries = 0
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                service_id = self.resolve(service, timeout=left)
                flags, body = request_payload(
                    payload, timeout if queue_timeout is None else queue_timeout)
                request_id = self._send(Kind.REQUEST, service_id, body, flags)
                return answer_result(*self._wait(request_id, deadline), Kind.REPLY)[1]
            except errors.AcgiError as error:
                if not errors.refused_by_drain(error) or retries == errors.DRAIN_RETRIES_MAX:
                    raise
                try:
                    self._reconnect()
                except OSError:
                    raise error from None  # no successor: the refusal stands
                retries += 1
                self.drain_retries += 1

    def _reconnect(self) -> None:
        """A new connection to the same address (names are resolved anew)."""
        if self._sock is not None:
            self._sock.close()
        self._open()

    def resolve(self, service: Service, *, timeout: Optional[float] = None) -> int:
        """The id of ``service`` (an int is returned as is; a name is asked of the bridge once
        per connection, then cached). Raises :class:`UnknownService` (code 1)."""
        if isinstance(service, int):
            return service
        cached = self._services.get(service)
        if cached is not None:
            return cached
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = self._send(Kind.RESOLVE, 0, check_name(service))
        header, _ = answer_result(*self._wait(request_id, deadline), Kind.RESOLVED)
        self._services[service] = header.service_id
        return header.service_id

    def ping(self, payload=b"", *, timeout: Optional[float] = None) -> bytes:
        """Round trip a ``Ping`` (at most 4096 bytes); the ``Pong``'s payload."""
        deadline = None if timeout is None else time.monotonic() + timeout
        request_id = self._send(Kind.PING, 0, bytes(payload))
        return answer_result(*self._wait(request_id, deadline), Kind.PONG)[1]

    def close(self) -> None:
        """Close the connection. Nothing is in flight between blocking calls, except answers
        to timed-out calls, which are dropped."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._failure is None:
            self._failure = errors.ConnectionClosed("the client was closed")

    @property
    def closed(self) -> bool:
        return self._sock is None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- frames --------------------------------------------------------------------------------

    def _live_socket(self) -> socket.socket:
        if self._sock is None or self._failure is not None:
            raise self._failure or errors.ConnectionClosed("the client was closed")
        return self._sock

    def _send(self, kind: Kind, service_id: int, payload: bytes, flags: int = 0) -> int:
        sock = self._live_socket()
        request_id = self._ids.take(self._waiting)
        frame = encode_frame(kind, service_id, request_id, payload, flags)
        try:
            sock.settimeout(None)
            sock.sendall(frame)
        except OSError as error:
            # A bridge that drained and closed the connection sent its notice first.
            try:
                self._receive_one(time.monotonic() + 1.0)
            except errors.Drained:
                raise self._failure from error
            except (errors.AcgiError, OSError):
                pass
            self._fail(errors.ConnectionClosed(f"sending failed: {error}"))
            raise self._failure from error
        self._waiting.add(request_id)
        return request_id

    def _fail(self, failure: errors.ConnectionClosed) -> None:
        if self._failure is None:
            self._failure = failure
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _wait(self, request_id: int, deadline: Optional[float]) -> Tuple[Header, bytes]:
        """The answer to ``request_id``, keeping others that come first."""
        try:
            while request_id not in self._arrived:
                self._receive_one(deadline)
        except BaseException:
            # A timed-out call's answer may still come: nobody waits for it then, so it is
            # dropped (ids count up through 2^64, so it cannot be taken for a newer call's).
            self._waiting.discard(request_id)
            raise
        self._waiting.discard(request_id)
        return self._arrived.pop(request_id)

    def _receive_one(self, deadline: Optional[float]) -> None:
        """Read until one more whole frame is buffered, and file it."""
        while True:
            try:
                frame = self._input.next_frame()
            except FrameError as error:
                self._fail(errors.ProtocolError(f"the bridge sent a bad frame: {error}"))
                raise self._failure from error
            if frame is not None:
                break
            sock = self._live_socket()
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise errors.CallTimeout("no answer within the call's timeout")
                sock.settimeout(left)
            else:
                sock.settimeout(None)
            try:
                data = sock.recv(max(RECV_BYTES, min(self._input.missing(), 1 << 24)))
            except socket.timeout:
                raise errors.CallTimeout("no answer within the call's timeout") from None
            except OSError as error:  # a reset is a close (§2.6)
                self._fail(errors.ConnectionClosed(f"connection lost: {error}"))
                raise self._failure from error
            if not data:
                self._fail(errors.ConnectionClosed(
                    "the bridge closed the connection" if not len(self._input)
                    else "the bridge closed the connection inside a frame"))
                raise self._failure
            self._input.feed(data)
        header, payload = frame
        try:
            check_answer(header)
        except errors.ProtocolError as error:
            self._fail(error)
            raise
        if header.request_id in self._waiting:
            self._arrived[header.request_id] = (header, payload)
        elif header.kind == Kind.ERROR and header.request_id == 0 and header.code == 6:
            # The drain notice (§2.6): nothing still waiting here ran; the bridge closes next.
            self._fail(errors.Drained(
                "the bridge drained the connection (a binary upgrade): calls still waiting did "
                "not run"))
            raise self._failure
        elif header.kind == Kind.ERROR and header.request_id == 0:
            # A malformed-frame error not tied to a request: the bridge is closing (§11.7).
            self._fail(errors.ConnectionClosed(
                f"the bridge is closing the connection: "
                f"{errors.call_error(header.code, payload.decode('utf-8', 'replace'))}"))
            raise self._failure
        # Else an answer nobody waits for (a timed-out call's): drop it.
