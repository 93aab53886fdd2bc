"""The worker SDK (acgi.worker.serve) under the real bridge: the slot and the copy path, queued
jobs, deadlines, handler errors, and stopping."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import tempfile

import pytest

import acgi
from conftest import SLOT_SIZE_BYTES

# The slot's data area is SLOT_SIZE_BYTES: payloads up to it travel in the slot, longer ones on
# the control socket.
SIZES = [0, 1, SLOT_SIZE_BYTES - 1, SLOT_SIZE_BYTES, SLOT_SIZE_BYTES + 1, 200_000, 3 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_echo_of_every_size_through_slot_and_copy_path(bridge, size):
    # Proves requests and replies both ways, in the slot up to its capacity and on the socket
    # past it, come back byte for byte.
    payload = bytes((i * 7 + size) & 0xFF for i in range(size)).replace(b"@", b"A")
    with acgi.Client(bridge.unix) as client:
        assert client.call("echo", payload) == payload


def test_the_transport_follows_the_size(bridge):
    # Proves the worker really takes small requests from the slot and large ones from the socket.
    with acgi.Client(bridge.unix) as client:
        assert client.call("echo", b"@@job") == b"slot"
        assert client.call("echo", b"@@job:".ljust(SLOT_SIZE_BYTES + 1, b" ")) == b"socket"


def test_replies_larger_than_the_slot_and_than_the_bound(bridge):
    # Proves a large reply to a small request takes the copy path, and a reply over
    # max_payload_bytes becomes a service error naming both sizes instead of being sent.
    with acgi.Client(bridge.unix) as client:
        assert client.call("echo", b"@@big:%d" % (SLOT_SIZE_BYTES * 10)) == \
            b"b" * (SLOT_SIZE_BYTES * 10)
        with pytest.raises(acgi.ServiceError, match="over the bridge's maximum of 16777216"):
            client.call("echo", b"@@big:%d" % (16 * 1024 * 1024 + 1))
        assert client.call("echo", b"still fine") == b"still fine"


def test_remaining_is_seen_for_a_request_with_a_timeout(bridge):
    # Proves the handler sees the caller's deadline (TIMEOUT flag, §2.2a) through remaining(),
    # and None without one.
    with acgi.Client(bridge.unix) as client:
        seen = float(client.call("echo", b"@@remaining", timeout=5.0))
        assert 0.0 < seen <= 5.0
        assert client.call("echo", b"@@remaining") == b"None"

    async def main():
        async with await acgi.AsyncClient.connect(bridge.tcp) as client:
            seen = float(await client.call("echo", b"@@remaining", timeout=30.0))
            assert 5.0 < seen <= 30.0
    asyncio.run(main())


def test_queued_jobs_are_run_and_answered_in_order(bridge):
    # Proves a worker that said QUEUED gets jobs queued behind its slot job and answers each on
    # the socket, matched to its caller, with handler errors among them.
    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        payloads = [b"@@fail:no %d" % i if i % 7 == 3 else b"q%d" % i for i in range(200)]
        payloads.insert(0, b"@@sleep:0.2")  # holds the slot while the others queue
        results = await asyncio.gather(*(client.call("queued", p) for p in payloads),
                                       return_exceptions=True)
        assert results[0] == b"slept"
        for payload, result in zip(payloads[1:], results[1:]):
            if payload.startswith(b"@@fail:"):
                assert isinstance(result, acgi.ServiceError)
                assert result.message == payload[len(b"@@fail:"):].decode()
            else:
                assert result == payload
        transports = await asyncio.gather(client.call("queued", b"@@sleep:0.2"),
                                          *(client.call("queued", b"@@job") for _ in range(8)))
        assert b"queued" in transports
        await client.close()
    asyncio.run(main())


def test_a_worker_without_queued_gets_no_queued_jobs(bridge):
    # Proves Hello without QUEUED is honoured: every job comes through the slot.
    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        transports = await asyncio.gather(client.call("unqueued", b"@@sleep:0.2"),
                                          *(client.call("unqueued", b"@@job") for _ in range(8)))
        assert set(transports[1:]) == {b"slot"}
        await client.close()
    asyncio.run(main())


def wait_exit(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` (not our child) exits within ``seconds``, via its pidfd."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], seconds)
        return bool(readable)
    finally:
        os.close(fd)


def test_sigterm_stops_the_worker_after_the_running_job(lone_bridge):
    # Proves SIGTERM during a job lets the job finish and be answered (the handler sees
    # stop_requested()), then the worker exits; the bridge replaces it.
    directory = tempfile.mkdtemp(prefix="acgi-block-")
    path = os.path.join(directory, "block.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    listener.settimeout(20)

    async def main():
        client = await acgi.AsyncClient.connect(lone_bridge.unix)
        call = asyncio.ensure_future(client.call("solo", b"@@block:" + path.encode()))
        loop = asyncio.get_running_loop()
        conn, _ = await loop.run_in_executor(None, listener.accept)  # the handler is running
        with conn:
            pid = int(conn.makefile("rb").readline())
            os.kill(pid, signal.SIGTERM)
            assert not wait_exit(pid, 0.3), "the worker died with its job in hand"
            conn.sendall(b"go\n")
            assert await asyncio.wait_for(call, 20) == b"stop=True"
        assert await loop.run_in_executor(None, wait_exit, pid, 20), "the worker did not exit"
        # The pool replaces it; the service goes on.
        new_pid = int(await client.call("solo", b"@@pid", timeout=20))
        assert new_pid != pid
        await client.close()
    try:
        asyncio.run(main())
    finally:
        listener.close()


def test_sigterm_while_idle_stops_the_worker_at_once(lone_bridge):
    # Proves an idle worker (waiting for a job in poll) wakes on SIGTERM and exits.
    with acgi.Client(lone_bridge.unix) as client:
        pid = int(client.call("solo", b"@@pid"))
        os.kill(pid, signal.SIGTERM)
        assert wait_exit(pid, 10), "the idle worker did not exit on SIGTERM"
        assert int(client.call("solo", b"@@pid", timeout=20)) != pid


def test_a_request_no_worker_takes_in_its_queue_timeout_never_runs(lone_bridge):
    # Proves queue_timeout reaches the bridge as the TIMEOUT flag: behind a busy lone worker,
    # the request is answered DeadlineExceeded (code 10, never ran, retryable) without running.
    async def main():
        client = await acgi.AsyncClient.connect(lone_bridge.unix)
        busy = asyncio.ensure_future(client.call("solo", b"@@sleep:1.5"))
        await asyncio.sleep(0)  # its frame goes first and takes the one worker
        with pytest.raises(acgi.DeadlineExceeded) as raised:
            await client.call("solo", b"@@fail:this must not run", queue_timeout=0.2)
        assert raised.value.code == 10 and raised.value.retryable
        assert not raised.value.may_have_run
        assert await busy == b"slept"
        await client.close()
    asyncio.run(main())
    with acgi.Client(lone_bridge.unix) as client:
        assert client.call("solo", b"@@remaining", queue_timeout=3.0) != b"None"
