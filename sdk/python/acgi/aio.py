"""The asyncio client: many calls in flight on one connection, answers matched by request id.

::

    client = await acgi.AsyncClient.connect("/run/acgi-bridge/acgi-bridge.sock")   # or "127.0.0.1:7878"
    replies = await asyncio.gather(*(client.call("echo", b"%d" % i) for i in range(100)))
    await client.close()

One :class:`asyncio.Protocol` owns the connection: it cuts received bytes into frames
(checking each header against ``reply_bytes_max`` before the payload is buffered) and settles
the future of the call each answer names. The bridge may answer in any order (§2.1). When the
connection ends, for whatever reason, every call still waiting fails with the same
:class:`ConnectionClosed` (or :class:`ProtocolError` when the bridge sent a bad frame): their
outcome is unknown. The exception is a draining bridge (a binary upgrade, docs/protocol.md
§2.6): a call answered with error 6, or still waiting when the drain notice arrives, never ran,
and is resent on a new connection to the same address (at most
:data:`acgi.errors.DRAIN_RETRIES_MAX` times).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Dict, Optional, Tuple

from . import errors
from ._framing import (Address, FrameBuffer, RequestIds, answer_result, check_answer,
                       check_name, parse_address, request_payload)
from .client import Service
from .protocol import PAYLOAD_BYTES_MAX_DEFAULT, FrameError, Header, Kind, encode_frame

__all__ = ["AsyncClient"]

Answer = Tuple[Header, bytes]


class _ResolveAbandoned(Exception):
    """The call whose ``Resolve`` others were waiting on gave up before the answer."""


class _Connection(asyncio.Protocol):
    """The connection's state: the reader, the calls waiting, and the write flow control."""

    def __init__(self, reply_bytes_max: int) -> None:
        self.input = FrameBuffer(reply_bytes_max)
        self.transport: Optional[asyncio.Transport] = None
        self.waiting: Dict[int, "asyncio.Future[Answer]"] = {}
        self.failure: Optional[errors.ConnectionClosed] = None
        #: The bridge drained this connection (notice or error 6): no new call goes out on it.
        self.drained = False
        self.closed = asyncio.get_running_loop().create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self.input.feed(data)
        while True:
            try:
                frame = self.input.next_frame()
                if frame is None:
                    return
                check_answer(frame[0])
            except (FrameError, errors.ProtocolError) as error:
                self.fail(errors.ProtocolError(f"the bridge sent a bad frame: {error}"))
                return
            header, payload = frame
            if header.kind == Kind.ERROR and header.request_id == 0 and header.code == 6:
                # The drain notice: nothing still waiting ran; the bridge closes next.
                self.drained = True
                self.fail(errors.Drained(
                    "the bridge drained the connection (a binary upgrade): calls still "
                    "waiting did not run"))
                return
            future = self.waiting.pop(header.request_id, None)
            if future is not None:
                if not future.done():
                    future.set_result(frame)
            # Else nobody waits for it (a timed-out or cancelled call; or an id-0 malformed-frame
            # error, after which the bridge closes): drop it.

    def eof_received(self) -> bool:
        return False  # close the transport: the bridge never half-closes on purpose

    def connection_lost(self, exc: Optional[Exception]) -> None:
        # A reset counts as an orderly close (§2.6).
        self.fail(errors.ConnectionClosed(
            "the bridge closed the connection" if exc is None else f"connection lost: {exc}"))
        self._can_write.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # ours

    def fail(self, failure: errors.ConnectionClosed) -> None:
        """End the connection: every call waiting fails with ``failure``."""
        if self.failure is None:
            self.failure = failure
        waiting, self.waiting = self.waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(self.failure)
        if self.transport is not None and not self.transport.is_closing():
            if isinstance(failure, errors.ProtocolError):
                self.transport.abort()  # drop whatever else it sent
            else:
                self.transport.close()

    async def write(self, frame: bytes) -> None:
        if self.failure is not None:
            raise self.failure
        assert self.transport is not None
        self.transport.write(frame)
        if not self._can_write.is_set():
            await self._can_write.wait()
            if self.failure is not None:
                raise self.failure


async def _open(address: Address, reply_bytes_max: int,
                connect_timeout: Optional[float]) -> _Connection:
    """Connect to a Unix socket path or ``HOST:PORT``."""
    loop = asyncio.get_running_loop()
    family, sockaddr = parse_address(address)

    def factory() -> _Connection:
        return _Connection(reply_bytes_max)

    if family == socket.AF_UNIX:
        opening = loop.create_unix_connection(factory, sockaddr)
    else:
        host, port = sockaddr
        opening = loop.create_connection(factory, host, port)
    _, connection = await asyncio.wait_for(opening, connect_timeout)
    return connection


class AsyncClient:
    """An asyncio connection to a bridge. Create it with :meth:`connect`.

    ``reply_bytes_max`` bounds the payload of every frame the bridge sends (default 16 MiB,
    the bridge's default ``max_payload_bytes``): a larger ``payload_len`` is a protocol error
    refused on the header, and closes the connection.
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        #: Set by :meth:`connect`: where a reconnect after a drain goes.
        self._reopen = None
        self._reconnecting: Optional[asyncio.Lock] = None
        #: Calls resent on a new connection because the bridge was draining.
        self.drain_retries = 0
        self._ids = RequestIds()
        self._services: Dict[str, int] = {}
        self._resolving: Dict[str, "asyncio.Future[int]"] = {}

    @classmethod
    async def connect(cls, address: Address, *,
                      reply_bytes_max: int = PAYLOAD_BYTES_MAX_DEFAULT,
                      connect_timeout: Optional[float] = 10.0) -> "AsyncClient":
        """Connect to a Unix socket path or ``HOST:PORT``."""
        async def reopen() -> _Connection:
            return await _open(address, reply_bytes_max, connect_timeout)
        client = cls(await reopen())
        client._reopen = reopen
        return client

    @property
    def closed(self) -> bool:
        return self._connection.failure is not None

    async def _connection_for_call(self) -> _Connection:
        """The connection to send on: a new one once the bridge drained the current one."""
        connection = self._connection
        if not connection.drained or self._reopen is None:
            return connection
        if self._reconnecting is None:
            self._reconnecting = asyncio.Lock()
        async with self._reconnecting:
            if self._connection is connection:
                fresh = await self._reopen()
                self._services.clear()  # names are resolved anew
                self._connection = fresh
                # (Calls still waiting on the old connection are answered there, or get the
                # notice.)
        return self._connection

    async def call(self, service: Service, payload=b"", *, timeout: Optional[float] = None,
                   queue_timeout: Optional[float] = None) -> bytes:
        """Call ``service`` (name or id) with ``payload``; the reply's bytes.

        ``timeout`` (seconds) bounds the whole call (resolving included): :class:`CallTimeout`
        when no answer came in time. ``queue_timeout`` (seconds, default ``timeout``) is sent
        to the bridge as the request's own timeout (§2.2a): if no worker has taken it in time
        it never runs (:class:`DeadlineExceeded`, code 10); the handler can read the time left
        with :func:`acgi.worker.remaining`. Raises :class:`CallError` (by code) for an
        ``Error`` answer, :class:`ConnectionClosed` when the connection ended first.
        """
        sent = timeout if queue_timeout is None else queue_timeout
        return await self._bounded(self._call(service, payload, sent), timeout)

    async def _call(self, service: Service, payload, timeout: Optional[float]) -> bytes:
        service_id = await self.resolve(service)
        flags, body = request_payload(payload, timeout)
        answer = await self._exchange(Kind.REQUEST, service_id, body, flags)
        return answer_result(*answer, Kind.REPLY)[1]

    async def resolve(self, service: Service, *, timeout: Optional[float] = None) -> int:
        """The id of ``service``: an int as is; a name asked once per connection and cached
        (concurrent first calls share one ``Resolve``). Raises :class:`UnknownService`."""
        if isinstance(service, int):
            return service
        cached = self._services.get(service)
        if cached is not None:
            return cached
        return await self._bounded(self._resolve(service), timeout)

    async def _resolve(self, name: str) -> int:
        while True:
            cached = self._services.get(name)
            if cached is not None:
                return cached
            pending = self._resolving.get(name)
            if pending is None:
                return await self._resolve_first(name)
            try:
                return await asyncio.shield(pending)
            except _ResolveAbandoned:
                continue  # the call that asked gave up (timeout, cancel): ask again

    async def _resolve_first(self, name: str) -> int:
        pending: "asyncio.Future[int]" = asyncio.get_running_loop().create_future()
        self._resolving[name] = pending
        try:
            answer = await self._exchange(Kind.RESOLVE, 0, check_name(name))
            header, _ = answer_result(*answer, Kind.RESOLVED)
        except BaseException as error:
            del self._resolving[name]
            if isinstance(error, asyncio.CancelledError):
                error = _ResolveAbandoned()
            pending.set_exception(error)
            pending.exception()  # retrieved: no warning when no other call waits on it
            raise
        del self._resolving[name]
        self._services[name] = header.service_id
        pending.set_result(header.service_id)
        return header.service_id

    async def ping(self, payload=b"", *, timeout: Optional[float] = None) -> bytes:
        """Round trip a ``Ping`` (payload at most 4096 bytes); the ``Pong``'s payload."""
        async def exchange() -> bytes:
            answer = await self._exchange(Kind.PING, 0, bytes(payload))
            return answer_result(*answer, Kind.PONG)[1]
        return await self._bounded(exchange(), timeout)

    async def close(self) -> None:
        """Close the connection. Calls still waiting fail with :class:`ConnectionClosed`
        ("the client was closed"); waits until the transport is closed."""
        connection = self._connection
        connection.fail(errors.ConnectionClosed("the client was closed"))
        await connection.closed

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # -- internals -----------------------------------------------------------------------------

    async def _bounded(self, awaitable, timeout: Optional[float]):
        if timeout is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except asyncio.TimeoutError:
            raise errors.CallTimeout(f"no answer within {timeout} s") from None

    async def _exchange(self, kind: Kind, service_id: int, payload: bytes,
                        flags: int = 0) -> Answer:
        """One frame and its answer, resent on a new connection when a draining bridge
        refused it (it never ran)."""
        retries = 0
        while True:
            connection = await self._connection_for_call()
            try:
                answer = await self._exchange_once(connection, kind, service_id, payload, flags)
            except errors.Drained as error:
                refusal: Optional[BaseException] = error
                answer = None
            else:
                if answer[0].kind != Kind.ERROR or answer[0].code != 6:
                    return answer
                connection.drained = True  # error 6: this connection takes nothing more
                refusal = None
            if retries == errors.DRAIN_RETRIES_MAX or self._reopen is None:
                break
            try:
                await self._connection_for_call()
            except OSError:
                break  # no successor: the refusal stands
            retries += 1
            self.drain_retries += 1
        if answer is not None:
            return answer
        assert refusal is not None
        raise refusal

    async def _exchange_once(self, connection: _Connection, kind: Kind, service_id: int,
                             payload: bytes, flags: int) -> Answer:
        if connection.failure is not None:
            raise connection.failure
        request_id = self._ids.take(connection.waiting)
        future: "asyncio.Future[Answer]" = asyncio.get_running_loop().create_future()
        connection.waiting[request_id] = future
        try:
            await connection.write(encode_frame(kind, service_id, request_id, payload, flags))
            return await future
        finally:
            # Answered, or given up (a timeout, a cancelled task): a late answer finds nobody
            # waiting and is dropped. Ids count up through 2^64, so it cannot be taken for a
            # newer call's.
            connection.waiting.pop(request_id, None)
