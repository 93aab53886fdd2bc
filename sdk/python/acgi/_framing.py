"""What the blocking client, the asyncio client and the worker share: addresses, the
incremental frame reader, request ids, and turning an answer frame into a result.

:class:`FrameBuffer` is the one frame reader. It holds the received bytes not yet consumed and
yields whole frames; it checks each header (against the receiver's bound) as soon as its 24
bytes are in, so a ``payload_len`` over the bound is refused before any room is made for the
payload, and memory never exceeds what was actually received plus one read.
"""

from __future__ import annotations

import math
import os
import socket
import struct
from typing import Optional, Tuple, Union

from . import errors
from .protocol import (ANSWER_KINDS, FLAG_TIMEOUT, HEADER_BYTES, U32_MAX, U64_MAX, Header,
                       Kind, decode_header)

#: Bytes asked of one ``recv``.
RECV_BYTES = 256 * 1024
#: Consumed bytes at the front of a :class:`FrameBuffer` past which it compacts.
_COMPACT_BYTES = 256 * 1024

Address = Union[str, "os.PathLike[str]", Tuple[str, int]]


def parse_address(address: Address) -> Tuple[int, Union[str, Tuple[str, int]]]:
    """``(family, sockaddr)`` for ``address``: ``unix:PATH``, ``tcp:HOST:PORT``, a path (it
    contains ``/``), ``HOST:PORT`` (``[::1]:PORT`` for IPv6), or a ``(host, port)`` tuple."""
    if isinstance(address, tuple):
        return socket.AF_INET, (address[0], int(address[1]))
    text = os.fspath(address)
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[len("unix:"):]
    if text.startswith("tcp:"):
        text = text[len("tcp:"):]
    elif "/" in text:
        return socket.AF_UNIX, text
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{address!r} is neither a Unix socket path nor HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return socket.AF_INET, (host, int(port))


class FrameBuffer:
    """Received bytes, cut into frames. ``bound`` is the inclusive payload bound applied to
    every header (§1.2 check 7)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._data = bytearray()
        self._start = 0

    def __len__(self) -> int:
        return len(self._data) - self._start

    def feed(self, data: Union[bytes, bytearray, memoryview]) -> None:
        if self._start >= _COMPACT_BYTES and self._start * 2 >= len(self._data):
            del self._data[:self._start]
            self._start = 0
        self._data += data

    def peek_header(self) -> Optional[Header]:
        """The checked header at the front, once its 24 bytes are in. Raises
        :class:`~acgi.protocol.FrameError` when it fails a check."""
        if len(self) < HEADER_BYTES:
            return None
        return decode_header(memoryview(self._data)[self._start:self._start + HEADER_BYTES],
                             self.bound)

    def missing(self) -> int:
        """Bytes still to receive before the frame at the front is whole (at least 1 while
        no whole frame is buffered; 0 when one is)."""
        header = self.peek_header()
        if header is None:
            return HEADER_BYTES - len(self)
        return max(0, HEADER_BYTES + header.payload_len - len(self))

    def next_frame(self) -> Optional[Tuple[Header, bytes]]:
        """The next whole frame, consumed; ``None`` when it has not all arrived."""
        header = self.peek_header()
        if header is None or len(self) < HEADER_BYTES + header.payload_len:
            return None
        begin = self._start + HEADER_BYTES
        end = begin + header.payload_len
        payload = bytes(self._data[begin:end])
        self._start = end
        if self._start == len(self._data):
            self._data.clear()
            self._start = 0
        return header, payload


class RequestIds:
    """Per-connection request ids: a counter from 1 that skips 0 and ids still waiting (§2.1)."""

    def __init__(self) -> None:
        self._next = 1

    def take(self, *busy) -> int:
        """A fresh id, in none of the ``busy`` collections."""
        while True:
            request_id = self._next
            self._next = request_id + 1 if request_id < U64_MAX else 1
            if not any(request_id in ids for ids in busy):
                return request_id


def check_answer(header: Header) -> None:
    """Raise :class:`~acgi.errors.ProtocolError` unless ``header`` is a frame the bridge may
    send a caller (§2.5: an answer kind, flags 0)."""
    if header.kind not in ANSWER_KINDS:
        raise errors.ProtocolError(f"the bridge sent a {Kind(header.kind).name} frame to a caller")
    if header.flags != 0:
        raise errors.ProtocolError(f"the bridge sent flags 0x{header.flags:04x} to a caller")


def answer_result(header: Header, payload: bytes, expected: Kind) -> Tuple[Header, bytes]:
    """The answer when it is of kind ``expected``; :class:`~acgi.errors.CallError` for an
    ``Error``; :class:`~acgi.errors.ProtocolError` for any other kind."""
    if header.kind == Kind.ERROR:
        raise errors.call_error(header.code, payload.decode("utf-8", errors="replace"),
                                header.request_id)
    if header.kind != expected:
        raise errors.ProtocolError(
            f"expected {expected.name} for request {header.request_id}, "
            f"got {Kind(header.kind).name}")
    return header, payload


def request_payload(payload, timeout: Optional[float]) -> Tuple[int, bytes]:
    """``(flags, payload)`` of a Request: with a timeout, the ``TIMEOUT`` flag and the u32 LE
    milliseconds prefix (§2.2a; at least 1 ms, at most 2^32-1)."""
    body = bytes(payload)
    if timeout is None:
        flags = 0
    else:
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        timeout_ms = min(U32_MAX, max(1, math.ceil(timeout * 1000)))
        body = struct.pack("<I", timeout_ms) + body
        flags = FLAG_TIMEOUT
    if len(body) > U32_MAX:
        raise ValueError(f"a payload of {len(body)} bytes does not fit a frame")
    return flags, body


def check_name(name: str) -> bytes:
    encoded = name.encode("utf-8")
    if not encoded:
        raise ValueError("a service name is not empty")
    return encoded
