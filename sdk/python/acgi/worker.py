"""The worker SDK: turn a plain synchronous function into an acgi-bridge worker (Part II of
docs/protocol.md).

::

    import acgi.worker

    def handle(request: bytes) -> bytes:
        return request.upper()        # raise to answer the caller with a service error (code 8)

    acgi.worker.serve(handle)

The bridge starts the worker with two inherited descriptors (§6.1): the control socket
(``ACGI_CONTROL_FD``) and the slot memfd (``ACGI_SLOT_FD``). :func:`serve` checks and maps the
slot (§7.1), says ``Hello`` (with ``QUEUED``: it takes queued jobs, §8.4), then for each ``Job``
takes the request from the slot or, on the copy path, from the socket, runs the handler, and
puts the reply in the slot when it fits or on the socket when it does not (§8.2). Queued jobs are
answered on the socket, in order; answers to jobs that were already read are written together.

It returns when the bridge closes the control socket, or after the job in hand when SIGTERM
arrives (§10). When the bridge breaks the protocol it raises ``SystemExit`` with a non-zero
status (§8.1): the process must end, and the bridge treats it as a crashed worker.

Slot ordering (§7.2): Python has no atomics, so the state word is read and written with plain
aligned 32-bit loads and stores, in the order the spec gives; the frames on the socket order
them between the two processes, which the spec allows for such languages.
"""

from __future__ import annotations

import mmap
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Callable, NamedTuple, Optional, Union

from ._framing import RECV_BYTES, FrameBuffer
from .protocol import (FLAG_IN_SLOT, FLAG_QUEUED, PAYLOAD_BYTES_MAX_DEFAULT,
                       REQUEST_LEN_INLINE, SLOT_ABI_VERSION, SLOT_CAPACITY_BYTES_MIN,
                       SLOT_HEADER_BYTES, SLOT_MAGIC, FrameError, Header, Hello, Kind,
                       encode_frame, encode_header)

__all__ = ["serve", "remaining", "stop_requested", "current_job", "Job", "WorkerProtocolError",
           "ENV_CONTROL_FD", "ENV_SLOT_FD", "ENV_MAX_PAYLOAD", "ENV_SERVICE", "ENV_STATE_DIR",
           "FAIL_MESSAGE_BYTES_MAX", "REPLY_HOLD_SECONDS", "OUT_BYTES_FLUSH"]

ENV_CONTROL_FD = "ACGI_CONTROL_FD"
ENV_SLOT_FD = "ACGI_SLOT_FD"
ENV_MAX_PAYLOAD = "ACGI_MAX_PAYLOAD_BYTES"
ENV_SERVICE = "ACGI_SERVICE"
ENV_STATE_DIR = "ACGI_STATE_DIR"

#: A handler's error message is cut to this many bytes (on a character boundary), as the Rust
#: SDK does.
FAIL_MESSAGE_BYTES_MAX = 64 * 1024
#: Longest a finished answer waits for the answers of jobs already read behind it, so that one
#: write carries several (§11, item 12).
REPLY_HOLD_SECONDS = 50e-6
#: Buffered answers past this size are written at once.
OUT_BYTES_FLUSH = 64 * 1024

# §7.1 slot header offsets.
_OFFSET_MAGIC = 0
_OFFSET_ABI_VERSION = 4
_OFFSET_STATE = 8
_OFFSET_CAPACITY = 12
_OFFSET_REQUEST_LEN = 16
_OFFSET_REPLY_LEN = 20
_OFFSET_JOB_SEQUENCE = 24
_OFFSET_DEADLINE_REMAINING_MS = 32
_FREE, _FILLED, _TAKEN, _REPLIED = 0, 1, 2, 3
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

Reply = Union[bytes, bytearray, memoryview]
Handler = Callable[[bytes], Reply]


class WorkerProtocolError(Exception):
    """The bridge broke the worker protocol, or this process was not started by a bridge."""


class Job(NamedTuple):
    """The job in hand, as :func:`current_job` describes it."""

    #: The bridge's job sequence (the ``Job`` frame's ``request_id``; not the caller's id).
    sequence: int
    #: How the request came: ``"slot"`` (in the slot), ``"socket"`` (the copy path) or
    #: ``"queued"`` (a queued job, §8.4).
    transport: str
    #: The slot's ``deadline_remaining_ms`` at hand-over (0: none; always 0 for queued jobs,
    #: which do not use the slot).
    deadline_remaining_ms: int


_job: Optional[Job] = None
_deadline: Optional[float] = None  # time.monotonic() of the caller's deadline
_stop = False


def remaining() -> Optional[float]:
    """Seconds left before the current request's caller deadline (the caller sent it with a
    timeout, §2.2a), never negative; ``None`` when it has none or outside a handler."""
    if _deadline is None:
        return None
    return max(0.0, _deadline - time.monotonic())


def stop_requested() -> bool:
    """Whether SIGTERM asked this worker to stop; a long handler may check it and hurry."""
    return _stop


def current_job() -> Optional[Job]:
    """The job the handler is running, ``None`` outside a handler."""
    return _job


class _Slot:
    """The worker's mapping of its slot (§7). Only ``state``, ``reply_len`` and the data area
    are ever written from here."""

    def __init__(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size < SLOT_HEADER_BYTES + SLOT_CAPACITY_BYTES_MIN:
            raise WorkerProtocolError(f"the slot memfd is {size} bytes, smaller than a slot")
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.capacity = size - SLOT_HEADER_BYTES
        if self._u32(_OFFSET_MAGIC) != SLOT_MAGIC:
            raise WorkerProtocolError("the slot has a bad magic")
        if self._u32(_OFFSET_ABI_VERSION) != SLOT_ABI_VERSION:
            raise WorkerProtocolError(
                f"slot ABI version {self._u32(_OFFSET_ABI_VERSION)}, this SDK implements 1")
        if self._u32(_OFFSET_CAPACITY) != self.capacity:
            raise WorkerProtocolError(
                f"slot capacity {self._u32(_OFFSET_CAPACITY)} does not match the memfd's "
                f"{self.capacity} data bytes")

    def _u32(self, offset: int) -> int:
        return _U32.unpack_from(self.map, offset)[0]

    def take(self, sequence: int) -> int:
        """Filled -> Taken (§7.2; a read-check-write: the bridge never writes ``state`` while
        Filled or Taken); then check the sequence; returns ``request_len``."""
        state = self._u32(_OFFSET_STATE)
        if state != _FILLED:
            raise WorkerProtocolError(f"a Job arrived but the slot is in state {state}, not 1")
        _U32.pack_into(self.map, _OFFSET_STATE, _TAKEN)
        found = _U64.unpack_from(self.map, _OFFSET_JOB_SEQUENCE)[0]
        if found != sequence:
            raise WorkerProtocolError(f"the slot holds job {found}, the Job frame says {sequence}")
        return self._u32(_OFFSET_REQUEST_LEN)

    def deadline_remaining_ms(self) -> int:
        return _U64.unpack_from(self.map, _OFFSET_DEADLINE_REMAINING_MS)[0]

    def request(self, length: int) -> bytes:
        return self.map[SLOT_HEADER_BYTES:SLOT_HEADER_BYTES + length]

    def publish(self, reply: Optional[Reply]) -> None:
        """Taken -> Replied: the reply into the data area (or none: it goes on the socket),
        ``reply_len``, and the state last."""
        length = 0
        if reply is not None:
            length = len(reply)
            assert length <= self.capacity
            self.map[SLOT_HEADER_BYTES:SLOT_HEADER_BYTES + length] = reply
        _U32.pack_into(self.map, _OFFSET_REPLY_LEN, length)
        _U32.pack_into(self.map, _OFFSET_STATE, _REPLIED)


def _env_fd(name: str) -> int:
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise WorkerProtocolError(f"{name} is not set: this worker must be started by acgi-bridge")
    fd = int(value)
    try:
        os.fstat(fd)
    except OSError:
        raise WorkerProtocolError(f"{name}={fd} is not an open descriptor") from None
    return fd


def _fail_message(text: str) -> bytes:
    encoded = text.encode("utf-8", errors="replace")
    if len(encoded) > FAIL_MESSAGE_BYTES_MAX:
        encoded = encoded[:FAIL_MESSAGE_BYTES_MAX].decode("utf-8", errors="ignore").encode()
    return encoded


class _Session:
    """The worker side of one control connection."""

    def __init__(self, queued: bool) -> None:
        control_fd = _env_fd(ENV_CONTROL_FD)
        slot_fd = _env_fd(ENV_SLOT_FD)
        bound_text = os.environ.get(ENV_MAX_PAYLOAD, "")
        self.payload_bytes_max = (int(bound_text) if bound_text.isdigit()
                                  else PAYLOAD_BYTES_MAX_DEFAULT)
        self.slot = _Slot(slot_fd)
        os.close(slot_fd)  # the mapping outlives the descriptor; children must not inherit it
        self.control = socket.socket(fileno=control_fd)
        self.control.set_inheritable(False)
        self.control.setblocking(False)
        self.queued = queued
        self.input = FrameBuffer(self.payload_bytes_max)
        self.out = bytearray()
        self.out_since = 0.0
        self.poller = select.poll()
        self.poller.register(self.control, select.POLLIN)
        # The signal wake-up socket pair (see watch_sigterm); kept open for the process's life.
        self.wakeup: Optional[socket.socket] = None
        self._wakeup_writer: Optional[socket.socket] = None

    def watch_sigterm(self) -> None:
        """SIGTERM sets the stop flag; the signal also writes a byte to a socket the poll
        watches, so a worker waiting for its next job wakes and exits (Python retries
        interrupted system calls by itself, PEP 475)."""
        def on_sigterm(_signum, _frame) -> None:
            global _stop
            _stop = True
        try:
            signal.signal(signal.SIGTERM, on_sigterm)
        except ValueError:
            return  # not the main thread: SIGTERM keeps its default action
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self.wakeup = reader
        self._wakeup_writer = writer
        self.poller.register(reader, select.POLLIN)

    def hello(self) -> None:
        flags = FLAG_QUEUED if self.queued else 0
        payload = Hello(SLOT_ABI_VERSION, os.getpid()).encode()
        self._write(encode_frame(Kind.HELLO, 0, 0, payload, flags))

    def _write(self, data: Union[bytes, bytearray]) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.control.send(view)
            except BlockingIOError:
                select.select([], [self.control], [])
                continue
            view = view[sent:]

    def flush(self) -> None:
        if self.out:
            self._write(self.out)
            self.out.clear()

    def next_frame(self) -> Optional[tuple]:
        """The next whole frame from the bridge; ``None`` at EOF on a frame boundary, or on
        SIGTERM while waiting between frames."""
        while True:
            try:
                frame = self.input.next_frame()
            except FrameError as error:
                raise WorkerProtocolError(f"the bridge sent a malformed frame: {error}") from None
            if frame is not None:
                return frame
            try:
                data = self.control.recv(max(RECV_BYTES, min(self.input.missing(), 1 << 24)))
            except BlockingIOError:
                data = None
            except ConnectionResetError:
                data = b""
            if data == b"":
                if len(self.input):
                    raise WorkerProtocolError("the control socket closed inside a frame")
                return None
            if data is not None:
                self.input.feed(data)
                continue
            # Nothing has arrived: write the answers held back, then wait in poll, not in
            # recv (§11 item 11: the bridge reading our answer wakes writers, not pollers).
            self.flush()
            if _stop and not len(self.input):
                return None
            self.poller.poll()
            if self.wakeup is not None:
                try:
                    self.wakeup.recv(64)
                except BlockingIOError:
                    pass

    def run(self, handler: Handler) -> None:
        global _job, _deadline
        while not _stop:
            frame = self.next_frame()
            if frame is None:
                return
            header, payload = frame
            job = self._take(header, payload)
            request = job[1]
            _job = job[0]
            remaining_ms = _job.deadline_remaining_ms
            _deadline = time.monotonic() + remaining_ms / 1000 if remaining_ms else None
            try:
                reply: Optional[Reply] = handler(request)
                message = None
                if isinstance(reply, memoryview):
                    reply = reply.cast("B") if reply.c_contiguous else reply.tobytes()
                elif not isinstance(reply, (bytes, bytearray)):
                    message = (f"the handler returned {type(reply).__name__}, "
                               f"not bytes, bytearray or memoryview")
                    reply = None
            except Exception as exception:  # the handler's failure is the caller's error 8
                # The message as the handler gave it, even empty: every SDK sends it unchanged.
                reply, message = None, str(exception)
            finally:
                _job, _deadline = None, None
            self._answer(header, job[0].transport, reply, message)
            held = time.monotonic() - self.out_since
            if (len(self.out) >= OUT_BYTES_FLUSH or held >= REPLY_HOLD_SECONDS
                    or not self._frame_buffered()):
                # No further job is already here (or this one waited long enough): send now.
                self.flush()

    def _frame_buffered(self) -> bool:
        """Whether a whole next frame has already been read (a bad one counts as not: the
        answers go out before the protocol error ends the worker)."""
        try:
            return self.input.missing() == 0
        except FrameError:
            return False

    def _take(self, header: Header, payload: bytes):
        """Check a ``Job`` (§8.1) and take its request; ``(Job, request bytes)``."""
        if header.kind != Kind.JOB:
            raise WorkerProtocolError(f"the bridge sent a {Kind(header.kind).name} frame")
        flags = header.flags
        if flags & FLAG_QUEUED:
            if not self.queued:
                raise WorkerProtocolError("a queued job, but this worker did not ask for them")
            if flags & ~FLAG_QUEUED:
                raise WorkerProtocolError(f"a queued job with flags 0x{flags:04x}")
            return Job(header.request_id, "queued", 0), payload
        if flags & ~FLAG_IN_SLOT:
            raise WorkerProtocolError(f"a Job with flags 0x{flags:04x}")
        request_len = self.slot.take(header.request_id)
        job = Job(header.request_id, "slot" if flags & FLAG_IN_SLOT else "socket",
                  self.slot.deadline_remaining_ms())
        if flags & FLAG_IN_SLOT:
            if header.payload_len != 0:
                raise WorkerProtocolError("an in-slot Job with a payload on the socket")
            if request_len > self.slot.capacity:
                raise WorkerProtocolError(
                    f"an in-slot Job of {request_len} bytes in a slot of {self.slot.capacity}")
            return job, self.slot.request(request_len)
        if request_len != REQUEST_LEN_INLINE:
            raise WorkerProtocolError(f"a copy-path Job, but the slot's request_len is "
                                      f"{request_len}, not 0xFFFFFFFF")
        return job, payload

    def _answer(self, job: Header, transport: str, reply: Optional[Reply],
                message: Optional[str]) -> None:
        """Queue the ``Done``/``Fail`` of §8.2 (the slot is Replied first unless queued)."""
        if not self.out:
            self.out_since = time.monotonic()
        if message is None and len(reply) > self.payload_bytes_max:
            message = (f"reply of {len(reply)} bytes is over the bridge's maximum of "
                       f"{self.payload_bytes_max} bytes")
            reply = None
        sequence = job.request_id
        if message is not None:
            if transport != "queued":
                self.slot.publish(None)
            body = _fail_message(message)
            self.out += encode_header(Kind.FAIL, 0, 0, 0, len(body), sequence)
            self.out += body
        elif transport != "queued" and len(reply) <= self.slot.capacity:
            self.slot.publish(reply)
            self.out += encode_header(Kind.DONE, FLAG_IN_SLOT, 0, 0, 0, sequence)
        else:
            if transport != "queued":
                self.slot.publish(None)
            self.out += encode_header(Kind.DONE, 0, 0, 0, len(reply), sequence)
            self.out += reply


def serve(handler: Handler, *, queued: bool = True) -> None:
    """Serve jobs with ``handler`` until the bridge closes the control socket or SIGTERM
    arrives (the job in hand is finished and answered first).

    ``handler`` takes the request as ``bytes`` and returns the reply as ``bytes``,
    ``bytearray`` or ``memoryview``; an ``Exception`` it raises is sent as a ``Fail`` with
    ``str(exception)`` as the message, which the caller gets as error 8. A reply over
    ``ACGI_MAX_PAYLOAD_BYTES`` becomes such a failure too. ``queued`` says ``QUEUED`` in the
    ``Hello`` (§8.4), so the bridge may send up to the service's ``worker_queue_depth`` jobs.

    Raises ``SystemExit(2)`` when the bridge breaks the protocol, ``SystemExit(3)`` when this
    process was not started by a bridge (the fds of §6.1 are missing or bad).
    """
    try:
        session = _Session(queued)
    except WorkerProtocolError as error:
        print(f"acgi.worker: {error}", file=sys.stderr, flush=True)
        raise SystemExit(3) from None
    session.watch_sigterm()
    try:
        session.hello()
        session.run(handler)
        session.flush()
    except WorkerProtocolError as error:
        print(f"acgi.worker: protocol error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except OSError as error:  # the control socket failed under us: the bridge is gone
        print(f"acgi.worker: control socket: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
