"""The worker SDK against a fake bridge written here from Part II of the spec: the test holds
the other end of the control socket and the slot memfd, so it can check every byte the worker
writes, its exit status, and how it treats a bridge that breaks the rules."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import subprocess
import sys

import pytest

from acgi import protocol
from acgi._framing import FrameBuffer
from acgi.protocol import FLAG_IN_SLOT, FLAG_QUEUED, Kind
from conftest import SDK, SERVICE_PY

CAPACITY = 256
MAX_PAYLOAD = 1 << 20
EXIT_SECONDS = 20


class FakeBridge:
    """One worker process and the bridge's side of its slot and control socket."""

    def __init__(self, queued: bool = True, env=None) -> None:
        self.slot_fd = os.memfd_create("acgi-test-slot")
        os.ftruncate(self.slot_fd, protocol.SLOT_HEADER_BYTES + CAPACITY)
        self.slot = mmap.mmap(self.slot_fd, protocol.SLOT_HEADER_BYTES + CAPACITY)
        struct.pack_into("<IIII", self.slot, 0, protocol.SLOT_MAGIC, 1, 0, CAPACITY)
        self.sock, worker_end = socket.socketpair()
        self.sock.settimeout(EXIT_SECONDS)
        environment = dict(os.environ, PYTHONPATH=str(SDK),
                           ACGI_CONTROL_FD=str(worker_end.fileno()),
                           ACGI_SLOT_FD=str(self.slot_fd),
                           ACGI_MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD))
        environment.update(env or {})
        args = [sys.executable, str(SERVICE_PY)] + ([] if queued else ["--no-queued"])
        self.process = subprocess.Popen(args, env=environment,
                                        pass_fds=(worker_end.fileno(), self.slot_fd),
                                        stderr=subprocess.PIPE)
        worker_end.close()
        self.input = FrameBuffer(MAX_PAYLOAD)

    def read_frame(self):
        while True:
            frame = self.input.next_frame()
            if frame is not None:
                return frame
            data = self.sock.recv(1 << 16)
            assert data, "the worker closed its control socket"
            self.input.feed(data)

    def u32(self, offset: int) -> int:
        return struct.unpack_from("<I", self.slot, offset)[0]

    def fill(self, sequence: int, request, deadline_ms: int = 0) -> None:
        """Free -> Filled, the request in the slot (bytes) or not (None: the copy path)."""
        assert self.u32(8) == 0
        if request is not None:
            self.slot[64:64 + len(request)] = request
        struct.pack_into("<IIQQ", self.slot, 16,
                         protocol.REQUEST_LEN_INLINE if request is None else len(request), 0,
                         sequence, deadline_ms)
        struct.pack_into("<I", self.slot, 8, 1)

    def job(self, sequence: int, request: bytes, *, deadline_ms: int = 0, slot: bool = True):
        """Send one job the normal way and return ``(answer header, reply bytes)``, freeing
        the slot as the bridge does."""
        if slot:
            self.fill(sequence, request, deadline_ms)
            self.sock.sendall(protocol.encode_frame(Kind.JOB, 1, sequence, b"", FLAG_IN_SLOT))
        else:
            self.fill(sequence, None, deadline_ms)
            self.sock.sendall(protocol.encode_frame(Kind.JOB, 1, sequence, request))
        header, payload = self.read_frame()
        assert header.request_id == sequence and header.service_id == 0 and header.code == 0
        assert self.u32(8) == 3, "the answer was sent before the slot was Replied"
        reply_len = self.u32(20)
        if header.flags & FLAG_IN_SLOT:
            assert header.kind == Kind.DONE and header.payload_len == 0
            payload = bytes(self.slot[64:64 + reply_len])
        else:
            assert reply_len == 0
        struct.pack_into("<I", self.slot, 8, 0)
        return header, payload

    def exit_status(self) -> int:
        return self.process.wait(EXIT_SECONDS)

    def close(self) -> None:
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()
        self.slot.close()
        os.close(self.slot_fd)


@pytest.fixture
def fake():
    bridges = []

    def start(**kwargs) -> FakeBridge:
        bridge = FakeBridge(**kwargs)
        bridges.append(bridge)
        return bridge
    yield start
    for bridge in bridges:
        bridge.close()


def test_hello_then_jobs_both_ways_then_exit_0_on_eof(fake):
    # Proves the whole happy path byte for byte: Hello first (QUEUED, ABI 1, our pid), in-slot
    # and copy-path requests and replies, a deadline, a handler error, and exit 0 at EOF.
    bridge = fake()
    header, payload = bridge.read_frame()
    assert (header.kind, header.flags, header.service_id, header.request_id) == \
        (Kind.HELLO, FLAG_QUEUED, 0, 0)
    assert protocol.Hello.decode(payload) == protocol.Hello(1, bridge.process.pid)

    header, reply = bridge.job(1, b"hello")
    assert (header.kind, header.flags, reply) == (Kind.DONE, FLAG_IN_SLOT, b"hello")
    big = bytes(range(256)) * 3  # over the slot: the reply takes the copy path
    header, reply = bridge.job(2, big, slot=False)
    assert (header.kind, header.flags, reply) == (Kind.DONE, 0, big)
    header, reply = bridge.job(3, b"@@job:".ljust(CAPACITY + 1), slot=False)
    assert (header.flags, reply) == (FLAG_IN_SLOT, b"socket")  # a small reply goes in the slot
    header, reply = bridge.job(4, b"@@big:%d" % CAPACITY)
    assert (header.flags, reply) == (FLAG_IN_SLOT, b"b" * CAPACITY)  # exactly the capacity
    header, reply = bridge.job(5, b"@@remaining", deadline_ms=5000)
    assert 4.0 < float(reply) <= 5.0
    header, reply = bridge.job(6, b"@@remaining")
    assert reply == b"None"
    header, reply = bridge.job(7, b"@@fail:nope")
    assert (header.kind, header.flags, reply) == (Kind.FAIL, 0, b"nope")
    header, reply = bridge.job(8, b"@@big:%d" % (MAX_PAYLOAD + 1))
    assert header.kind == Kind.FAIL and b"over the bridge's maximum" in reply
    bridge.sock.shutdown(socket.SHUT_WR)
    assert bridge.exit_status() == 0


def test_queued_jobs_are_answered_on_the_socket_in_order(fake):
    # Proves queued jobs (sent while the slot job runs) leave the slot alone and are answered
    # in arrival order on the socket, after the slot job's in-slot answer.
    bridge = fake()
    bridge.read_frame()
    bridge.fill(10, b"@@sleep:0.2")
    frames = protocol.encode_frame(Kind.JOB, 1, 10, b"", FLAG_IN_SLOT)
    for sequence in range(11, 16):
        frames += protocol.encode_frame(Kind.JOB, 1, sequence, b"q%d" % sequence, FLAG_QUEUED)
    bridge.sock.sendall(frames)
    header, _ = bridge.read_frame()
    assert (header.kind, header.flags, header.request_id) == (Kind.DONE, FLAG_IN_SLOT, 10)
    assert bytes(bridge.slot[64:64 + bridge.u32(20)]) == b"slept"
    for sequence in range(11, 16):
        header, payload = bridge.read_frame()
        assert (header.kind, header.flags, header.request_id, payload) == \
            (Kind.DONE, 0, sequence, b"q%d" % sequence)
    assert bridge.u32(8) == 3  # still the slot job's Replied: queued answers never touch it
    bridge.sock.close()
    assert bridge.exit_status() == 0


def test_a_worker_without_queued_refuses_a_queued_job(fake):
    # Proves Hello without QUEUED, and that a queued job then is a violation: exit non-zero.
    bridge = fake(queued=False)
    header, _ = bridge.read_frame()
    assert header.flags == 0
    bridge.sock.sendall(protocol.encode_frame(Kind.JOB, 1, 1, b"x", FLAG_QUEUED))
    assert bridge.exit_status() == 2


@pytest.mark.parametrize("breakage", [
    "bad_magic", "not_a_job", "slot_not_filled", "wrong_sequence", "in_slot_with_payload",
    "in_slot_too_long", "copy_path_but_in_slot_length", "eof_inside_a_frame", "unknown_flag",
])
def test_a_bridge_breaking_the_protocol_makes_the_worker_exit_non_zero(fake, breakage):
    # Proves each rule of §8.1 the bridge could break ends the worker with status 2 (§8.1:
    # "MUST stop: exit with a non-zero status"), without answering.
    bridge = fake()
    bridge.read_frame()
    job = protocol.encode_frame(Kind.JOB, 1, 1, b"", FLAG_IN_SLOT)
    if breakage == "bad_magic":
        bridge.fill(1, b"x")
        frame = b"\x00\x00" + job[2:]
    elif breakage == "not_a_job":
        frame = protocol.encode_frame(Kind.REPLY, 1, 1, b"")
    elif breakage == "slot_not_filled":
        frame = job
    elif breakage == "wrong_sequence":
        bridge.fill(2, b"x")
        frame = job
    elif breakage == "in_slot_with_payload":
        bridge.fill(1, b"x")
        frame = protocol.encode_frame(Kind.JOB, 1, 1, b"extra", FLAG_IN_SLOT)
    elif breakage == "in_slot_too_long":
        bridge.fill(1, b"x")
        struct.pack_into("<I", bridge.slot, 16, CAPACITY + 1)
        frame = job
    elif breakage == "copy_path_but_in_slot_length":
        bridge.fill(1, b"x")
        frame = protocol.encode_frame(Kind.JOB, 1, 1, b"x")
    elif breakage == "eof_inside_a_frame":
        bridge.fill(1, None)
        frame = protocol.encode_frame(Kind.JOB, 1, 1, b"0123456789")[:-3]
    else:
        bridge.fill(1, b"x")
        frame = protocol.encode_frame(Kind.JOB, 1, 1, b"", FLAG_IN_SLOT | 0x0100)
    bridge.sock.sendall(frame)
    bridge.sock.shutdown(socket.SHUT_WR)
    assert bridge.exit_status() == 2
    assert b"protocol error" in bridge.process.stderr.read()
    assert bridge.sock.recv(1) == b"", "the worker answered a broken job"


def test_a_worker_not_started_by_a_bridge_exits_3():
    # Proves the SDK refuses to run without the descriptors of §6.1.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ACGI_")}
    environment["PYTHONPATH"] = str(SDK)
    result = subprocess.run([sys.executable, str(SERVICE_PY)], env=environment,
                            capture_output=True, timeout=EXIT_SECONDS)
    assert result.returncode == 3
    assert b"ACGI_CONTROL_FD is not set" in result.stderr


def test_a_slot_that_is_not_a_slot_is_refused_before_hello():
    # Proves the slot checks of §7.1 (magic) run before Hello: exit 3, nothing sent.
    fd = os.memfd_create("not-a-slot")
    os.ftruncate(fd, 4096)
    a, b = socket.socketpair()
    environment = dict(os.environ, PYTHONPATH=str(SDK), ACGI_CONTROL_FD=str(b.fileno()),
                       ACGI_SLOT_FD=str(fd))
    process = subprocess.run([sys.executable, str(SERVICE_PY)], env=environment,
                             pass_fds=(b.fileno(), fd), capture_output=True,
                             timeout=EXIT_SECONDS)
    b.close()
    os.close(fd)
    assert process.returncode == 3 and b"bad magic" in process.stderr
    a.settimeout(EXIT_SECONDS)
    assert a.recv(1) == b""
    a.close()
