"""The acgi-bridge wire format (docs/protocol.md §1, §3, §4, §6.3, §7.1): constants, the
24-byte frame header, its checks in the order of §1.2, and the worker's ``Hello`` payload.

This module owns bytes only: it never touches a socket. Decoding never trusts its input: every
header that fails a check of §1.2 raises :class:`MalformedFrameError` naming the first failing
check, and a header whose ``payload_len`` is over the receiver's bound raises
:class:`FrameTooLarge` (carrying the decoded header, so that a receiver could skip the payload)
before anyone allocates room for that payload.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple, Optional, Union

__all__ = [
    "MAGIC", "VERSION", "HEADER_BYTES", "HEADER", "Kind", "Flag", "ErrorCode",
    "FLAG_IN_SLOT", "FLAG_TIMEOUT", "FLAG_QUEUED", "FLAGS_KNOWN", "CALLER_KINDS",
    "ANSWER_KINDS", "PAYLOAD_BYTES_MAX_DEFAULT", "PAYLOAD_BYTES_MAX_CEILING",
    "PING_PAYLOAD_BYTES_MAX", "RESOLVE_NAME_BYTES_MAX", "TIMEOUT_PREFIX_BYTES", "U32_MAX",
    "U64_MAX", "Header", "FrameError", "MalformedFrameError", "FrameTooLarge",
    "encode_header", "encode_frame", "decode_header", "Hello", "HELLO_PAYLOAD_BYTES",
    "SLOT_MAGIC", "SLOT_ABI_VERSION", "SLOT_HEADER_BYTES", "SLOT_CAPACITY_BYTES_MIN",
    "REQUEST_LEN_INLINE",
]

#: First two bytes of every frame (u16 LE: the bytes on the wire are ``6B AC``).
MAGIC = 0xAC6B
#: The only protocol version this package speaks.
VERSION = 1
#: Size of the fixed frame header.
HEADER_BYTES = 24
#: magic u16, version u8, kind u8, flags u16, code u16, service_id u32, payload_len u32,
#: request_id u64; little-endian (§1.2).
HEADER = struct.Struct("<HBBHHIIQ")
assert HEADER.size == HEADER_BYTES

#: Default payload bound of a bridge (``max_payload_bytes``), inclusive (§4).
PAYLOAD_BYTES_MAX_DEFAULT = 16 * 1024 * 1024
#: Largest bound a bridge may be configured with (§4).
PAYLOAD_BYTES_MAX_CEILING = 1 << 30
#: A ``Ping`` payload is at most this long (§2.4).
PING_PAYLOAD_BYTES_MAX = 4096
#: A ``Resolve`` name is at most this long (§2.3).
RESOLVE_NAME_BYTES_MAX = 64
#: Bytes of the timeout prefix of a ``TIMEOUT`` request (§2.2a).
TIMEOUT_PREFIX_BYTES = 4

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1


class Kind(enum.IntEnum):
    """Frame kinds (§1.3). Values are part of the wire format."""

    REQUEST = 1
    REPLY = 2
    ERROR = 3
    RESOLVE = 4
    RESOLVED = 5
    PING = 6
    PONG = 7
    HELLO = 16
    JOB = 17
    DONE = 18
    FAIL = 19


class Flag(enum.IntFlag):
    """Header flag bits (§1.4)."""

    IN_SLOT = 0x0001
    TIMEOUT = 0x0002
    QUEUED = 0x0004


FLAG_IN_SLOT = int(Flag.IN_SLOT)
FLAG_TIMEOUT = int(Flag.TIMEOUT)
FLAG_QUEUED = int(Flag.QUEUED)
#: Every flag bit this version defines; any other set bit makes a frame malformed.
FLAGS_KNOWN = FLAG_IN_SLOT | FLAG_TIMEOUT | FLAG_QUEUED

_KIND_VALUES = frozenset(int(k) for k in Kind)
#: Kinds a caller may send to the bridge (§1.3).
CALLER_KINDS = frozenset({Kind.REQUEST, Kind.RESOLVE, Kind.PING})
#: Kinds the bridge sends to a caller (§2.5).
ANSWER_KINDS = frozenset({Kind.REPLY, Kind.ERROR, Kind.RESOLVED, Kind.PONG})


class ErrorCode(enum.IntEnum):
    """The stable error codes of an ``Error`` frame (§3)."""

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
    NOT_ALLOWED = 11

    @property
    def label(self) -> str:
        """The name of §3 (``"worker failed"``)."""
        return self.name.lower().replace("_", " ")


class Header(NamedTuple):
    """A decoded frame header. ``kind`` is a :class:`Kind` after :func:`decode_header`."""

    kind: int
    flags: int
    code: int
    service_id: int
    payload_len: int
    request_id: int

    def encode(self) -> bytes:
        """The 24 header bytes."""
        return encode_header(self.kind, self.flags, self.code, self.service_id,
                             self.payload_len, self.request_id)


class FrameError(ValueError):
    """A header that cannot be accepted (the sender's fault)."""


class MalformedFrameError(FrameError):
    """A header failing one of the checks 1-6 of §1.2; frame boundaries are lost.

    ``check`` names the first failing check: ``truncated``, ``magic``, ``version``, ``kind``,
    ``flags`` or ``code``.
    """

    def __init__(self, check: str, message: str) -> None:
        super().__init__(message)
        self.check = check


class FrameTooLarge(FrameError):
    """Only check 7 of §1.2 failed: ``payload_len`` is over the receiver's bound.

    The header is otherwise valid and is kept in ``header``; ``bound`` is the bound applied.
    """

    def __init__(self, header: Header, bound: int) -> None:
        super().__init__(
            f"payload of {header.payload_len} bytes is over the bound of {bound} bytes")
        self.header = header
        self.bound = bound


def encode_header(kind: int, flags: int, code: int, service_id: int, payload_len: int,
                  request_id: int) -> bytes:
    """The 24-byte header of §1.2 (magic and version filled in). Raises ``struct.error``
    when a field does not fit its width."""
    return HEADER.pack(MAGIC, VERSION, kind, flags, code, service_id, payload_len, request_id)


BytesLike = Union[bytes, bytearray, memoryview]


def encode_frame(kind: int, service_id: int, request_id: int, payload: BytesLike = b"",
                 flags: int = 0, code: int = 0) -> bytes:
    """A whole frame: header (with ``payload_len = len(payload)``) then payload."""
    return encode_header(kind, flags, code, service_id, len(payload), request_id) + bytes(payload)


def decode_header(data: BytesLike, bound: int = PAYLOAD_BYTES_MAX_DEFAULT) -> Header:
    """Check and decode the header at the start of ``data`` in the order of §1.2.

    ``bound`` is the receiver's inclusive payload bound. Raises :class:`MalformedFrameError`
    (checks 1-6) or :class:`FrameTooLarge` (check 7).
    """
    if len(data) < HEADER_BYTES:
        raise MalformedFrameError(
            "truncated", f"truncated header: {len(data)} of {HEADER_BYTES} bytes")
    magic, version, kind, flags, code, service_id, payload_len, request_id = \
        HEADER.unpack_from(data, 0)
    if magic != MAGIC:
        raise MalformedFrameError("magic", f"bad magic 0x{magic:04x}, expected 0x{MAGIC:04x}")
    if version != VERSION:
        raise MalformedFrameError("version", f"unsupported protocol version {version}")
    if kind not in _KIND_VALUES:
        raise MalformedFrameError("kind", f"unknown frame kind {kind}")
    if flags & ~FLAGS_KNOWN:
        raise MalformedFrameError("flags", f"unknown flags 0x{flags:04x}")
    if code != 0 and kind != Kind.ERROR:
        raise MalformedFrameError("code", f"error code {code} set on a {Kind(kind).name} frame")
    header = Header(Kind(kind), flags, code, service_id, payload_len, request_id)
    if payload_len > bound:
        raise FrameTooLarge(header, bound)
    return header


#: Size of a ``Hello`` payload (§6.3).
HELLO_PAYLOAD_BYTES = 8
_HELLO = struct.Struct("<II")


class Hello(NamedTuple):
    """The payload of a worker's ``Hello`` (§6.3)."""

    slot_abi_version: int
    pid: int

    def encode(self) -> bytes:
        return _HELLO.pack(self.slot_abi_version, self.pid)

    @staticmethod
    def decode(payload: BytesLike) -> Optional["Hello"]:
        """The fields, or ``None`` unless the payload is exactly 8 bytes."""
        if len(payload) != HELLO_PAYLOAD_BYTES:
            return None
        return Hello(*_HELLO.unpack(bytes(payload)))


# §7.1 the slot header.
#: ``magic`` of a slot header: the bytes ``SLOT``.
SLOT_MAGIC = 0x544F4C53
#: The slot layout version this package implements.
SLOT_ABI_VERSION = 1
#: Size of the slot header; the data area starts here.
SLOT_HEADER_BYTES = 64
#: Smallest data area a slot may have.
SLOT_CAPACITY_BYTES_MIN = 64
#: ``request_len`` meaning "the request is on the control socket".
REQUEST_LEN_INLINE = 0xFFFFFFFF
