#!/usr/bin/env python3
"""An acgi-bridge echo worker in Python, written only from docs/protocol.md (Part II).

Standard library only (os, socket, mmap, struct). The bridge starts it with the control socket
and the slot memfd inherited (ACGI_CONTROL_FD, ACGI_SLOT_FD). It says Hello, then for each Job
takes the request from the slot or the socket, runs `handle`, and returns the reply through the
slot when it fits, on the socket when it does not. It exits 0 when the bridge closes the control
socket, and non-zero when the bridge breaks the protocol.

To serve something other than echo, replace `handle`: it gets the request as bytes and returns
the reply as bytes, or raises an exception whose text the caller receives as error 8.
"""

import mmap
import os
import select
import socket
import struct
import sys

# §1.2 frame header: magic, version, kind, flags, code, service_id, payload_len, request_id.
HEADER = struct.Struct("<HBBHHIIQ")
MAGIC = 0xAC6B
VERSION = 1
HELLO, JOB, DONE, FAIL = 16, 17, 18, 19
FLAG_IN_SLOT = 0x0001
MAX_PAYLOAD_BYTES_DEFAULT = 16 * 1024 * 1024

# §7.1 slot header.
SLOT_MAGIC = 0x544F4C53
SLOT_ABI_VERSION = 1
SLOT_HEADER_BYTES = 64
SLOT_CAPACITY_BYTES_MIN = 64
OFFSET_MAGIC = 0
OFFSET_ABI_VERSION = 4
OFFSET_STATE = 8
OFFSET_CAPACITY = 12
OFFSET_REQUEST_LEN = 16
OFFSET_REPLY_LEN = 20
OFFSET_JOB_SEQUENCE = 24
OFFSET_DEADLINE_REMAINING_MS = 32
REQUEST_LEN_INLINE = 0xFFFFFFFF
FREE, FILLED, TAKEN, REPLIED = 0, 1, 2, 3

U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")

FAIL_MESSAGE_BYTES_MAX = 64 * 1024


def handle(request):
    """The service: echo."""
    return request


class ProtocolError(Exception):
    """The bridge broke the worker protocol; the worker must exit non-zero (§8.1)."""


def env_fd(name):
    value = os.environ.get(name, "")
    if not value.isdigit():
        raise SystemExit(f"{name} is not set: this worker must be started by acgi-bridge")
    fd = int(value)
    try:
        os.fstat(fd)
    except OSError:
        raise SystemExit(f"{name}={fd} is not an open descriptor")
    return fd


class Slot:
    """The worker's view of its shared-memory slot (§7)."""

    def __init__(self, fd):
        size = os.fstat(fd).st_size
        if size < SLOT_HEADER_BYTES + SLOT_CAPACITY_BYTES_MIN:
            raise ProtocolError(f"slot memfd is {size} bytes, smaller than a slot")
        self.map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED,
                             prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.capacity = size - SLOT_HEADER_BYTES
        if self.u32(OFFSET_MAGIC) != SLOT_MAGIC:
            raise ProtocolError("slot has a bad magic")
        if self.u32(OFFSET_ABI_VERSION) != SLOT_ABI_VERSION:
            raise ProtocolError(f"slot ABI version {self.u32(OFFSET_ABI_VERSION)} is not 1")
        if self.u32(OFFSET_CAPACITY) != self.capacity:
            raise ProtocolError("slot capacity does not match the memfd size")

    # Plain aligned loads and stores: the frames on the control socket order them (§7.2).
    def u32(self, offset):
        return U32.unpack_from(self.map, offset)[0]

    def set_u32(self, offset, value):
        U32.pack_into(self.map, offset, value)

    def take(self, job_sequence):
        """Filled -> Taken; returns request_len. The bridge does not write the state word while
        it is Filled, so read-check-write stands in for the compare-and-swap (§7.2)."""
        state = self.u32(OFFSET_STATE)
        if state != FILLED:
            raise ProtocolError(f"Job arrived but the slot is in state {state}, not Filled")
        self.set_u32(OFFSET_STATE, TAKEN)
        found = U64.unpack_from(self.map, OFFSET_JOB_SEQUENCE)[0]
        if found != job_sequence:
            raise ProtocolError(f"slot job sequence {found} is not the Job's {job_sequence}")
        return self.u32(OFFSET_REQUEST_LEN)

    def request(self, length):
        return self.map[SLOT_HEADER_BYTES:SLOT_HEADER_BYTES + length]

    def publish(self, reply):
        """Taken -> Replied, with the reply in the data area (bytes) or not (None)."""
        if reply is not None:
            assert len(reply) <= self.capacity
            self.map[SLOT_HEADER_BYTES:SLOT_HEADER_BYTES + len(reply)] = reply
        self.set_u32(OFFSET_REPLY_LEN, 0 if reply is None else len(reply))
        self.set_u32(OFFSET_STATE, REPLIED)  # last: after the data and reply_len


class Worker:
    def __init__(self):
        control_fd = env_fd("ACGI_CONTROL_FD")
        slot_fd = env_fd("ACGI_SLOT_FD")
        max_text = os.environ.get("ACGI_MAX_PAYLOAD_BYTES", "")
        self.max_payload_bytes = int(max_text) if max_text.isdigit() else MAX_PAYLOAD_BYTES_DEFAULT
        self.control = socket.socket(fileno=control_fd)
        self.poller = select.poll()
        self.poller.register(self.control, select.POLLIN)
        self.slot = Slot(slot_fd)
        os.close(slot_fd)  # the mapping stays valid without the descriptor

    def send(self, kind, request_id, payload=b"", flags=0):
        self.control.sendall(HEADER.pack(MAGIC, VERSION, kind, flags, 0, 0, len(payload),
                                         request_id) + payload)

    def read_exact(self, count, at_boundary=False):
        """`count` bytes from the control socket; None on EOF at a frame boundary."""
        chunks, have = [], 0
        while have < count:
            # Wait in poll, not in recv: the bridge reading our last reply wakes the socket for
            # writability, which would wake a task blocked in recv for nothing (protocol.md §11).
            self.poller.poll()
            chunk = self.control.recv(min(count - have, 1 << 20))
            if not chunk:
                if at_boundary and have == 0:
                    return None
                raise ProtocolError(f"control socket closed inside a frame ({have}/{count})")
            chunks.append(chunk)
            have += len(chunk)
        return b"".join(chunks)

    def hello(self):
        self.send(HELLO, 0, struct.pack("<II", SLOT_ABI_VERSION, os.getpid()))

    def next_job(self):
        """(job_sequence, request bytes) for the next Job, or None when the bridge hung up."""
        header = self.read_exact(HEADER.size, at_boundary=True)
        if header is None:
            return None
        magic, version, kind, flags, code, _service_id, payload_len, sequence = \
            HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic 0x{magic:04x}")
        if version != VERSION:
            raise ProtocolError(f"unsupported version {version}")
        if kind != JOB:
            raise ProtocolError(f"expected a Job frame, got kind {kind}")
        if flags & ~FLAG_IN_SLOT:
            raise ProtocolError(f"unknown flags 0x{flags:04x}")
        if code != 0:
            raise ProtocolError(f"code {code} on a Job frame")
        if payload_len > self.max_payload_bytes:
            raise ProtocolError(f"Job payload of {payload_len} bytes is over the maximum")
        request_len = self.slot.take(sequence)
        if flags & FLAG_IN_SLOT:
            if payload_len != 0:
                raise ProtocolError("in-slot Job with a payload on the socket")
            if request_len > self.slot.capacity:
                raise ProtocolError(f"in-slot Job with request_len {request_len}")
            return sequence, self.slot.request(request_len)
        if request_len != REQUEST_LEN_INLINE:
            raise ProtocolError(f"copy-path Job but the slot's request_len is {request_len}")
        return sequence, self.read_exact(payload_len) if payload_len else b""

    def finish(self, sequence, reply=None, error=None):
        if error is None and len(reply) > self.max_payload_bytes:
            error = (f"reply of {len(reply)} bytes is over the bridge's maximum of "
                     f"{self.max_payload_bytes} bytes")
        if error is not None:
            message = error.encode("utf-8", errors="replace")
            message = message[:FAIL_MESSAGE_BYTES_MAX].decode("utf-8", errors="ignore").encode()
            self.slot.publish(None)
            self.send(FAIL, sequence, message)
        elif len(reply) <= self.slot.capacity:
            self.slot.publish(reply)
            self.send(DONE, sequence, flags=FLAG_IN_SLOT)
        else:
            self.slot.publish(None)
            self.send(DONE, sequence, reply)

    def serve(self, handler):
        self.hello()
        while True:
            job = self.next_job()
            if job is None:
                return
            sequence, request = job
            try:
                reply = bytes(handler(request))
            except Exception as exception:  # the handler's failure is the caller's error 8
                self.finish(sequence, error=str(exception) or type(exception).__name__)
            else:
                self.finish(sequence, reply=reply)


def main():
    try:
        Worker().serve(handle)
    except ProtocolError as error:
        print(f"py_echo_worker: protocol error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the control socket failed under us: the bridge is gone
        print(f"py_echo_worker: control socket: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
