"""The clients (acgi.Client and acgi.AsyncClient) against the real bridge, and against a fake
server for what a real bridge never sends."""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc

import pytest

import acgi
from acgi import protocol
from acgi.protocol import Kind

ECHO = "echo"


def pattern(index: int, length: int) -> bytes:
    """Distinct bytes for call ``index`` (never starting with the service's ``@@``)."""
    head = b"<%d:%d>" % (index, length)
    body = bytes((index * 31 + i) & 0xFF for i in range(251))
    return (head + body * (length // 251 + 1))[:length]


@pytest.fixture(params=["unix", "tcp"])
def address(request, bridge):
    return bridge.unix if request.param == "unix" else bridge.tcp


def test_blocking_client_echoes_over_unix_and_tcp(address):
    # Proves a round trip by name and by id, empty and binary payloads, and Ping.
    with acgi.Client(address) as client:
        assert client.call(ECHO, b"hello") == b"hello"
        assert client.call(1, b"") == b""
        assert client.call(ECHO, bytes(range(256))) == bytes(range(256))
        assert client.ping(b"are you there") == b"are you there"
        assert client.resolve(ECHO) == 1


def test_async_client_echoes_over_unix_and_tcp(address):
    # Proves the asyncio client's round trip by name and id, and Ping, on both transports.
    async def main():
        async with await acgi.AsyncClient.connect(address) as client:
            assert await client.call(ECHO, b"hello") == b"hello"
            assert await client.call(1, b"") == b""
            assert await client.ping(b"x") == b"x"
    asyncio.run(main())


def test_many_concurrent_async_calls_on_one_connection_are_matched(bridge):
    # Proves 300 calls in flight on one connection, of sizes from 0 to past the slot (copy
    # path), each get their own reply, whatever order they come back in.
    sizes = [0, 1, 100, 4095, 4096, 4097, 70000]

    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        payloads = [pattern(i, sizes[i % len(sizes)] + i) for i in range(300)]
        replies = await asyncio.gather(*(client.call(ECHO, p) for p in payloads))
        assert replies == payloads
        # A slow call does not hold back a fast one behind it: answers come in any order.
        slow = asyncio.ensure_future(client.call(ECHO, b"@@sleep:0.5"))
        await asyncio.sleep(0)  # the slow call's frame goes first
        fast = await client.call(ECHO, b"fast")
        assert fast == b"fast" and not slow.done()
        assert await slow == b"slept"
        await client.close()
    asyncio.run(main())


def test_concurrent_first_calls_share_one_resolve(bridge):
    # Proves concurrent first calls by name resolve once and cache the id.
    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        sent = []
        original = client._exchange

        async def counting(kind, *args, **kwargs):
            sent.append(kind)
            return await original(kind, *args, **kwargs)
        client._exchange = counting
        await asyncio.gather(*(client.call(ECHO, b"%d" % i) for i in range(20)))
        assert sent.count(Kind.RESOLVE) == 1 and sent.count(Kind.REQUEST) == 20
        await client.call(ECHO, b"again")
        assert sent.count(Kind.RESOLVE) == 1
        await client.close()
    asyncio.run(main())


def test_unknown_service_is_code_1(bridge):
    # Proves an unknown name and an unknown id both raise UnknownService (code 1), which never
    # ran and is not retryable, and the connection goes on.
    with acgi.Client(bridge.unix) as client:
        with pytest.raises(acgi.UnknownService) as raised:
            client.call("no-such-service", b"x")
        error = raised.value
        assert error.code == acgi.ErrorCode.UNKNOWN_SERVICE == 1
        assert not error.retryable and not error.may_have_run
        with pytest.raises(acgi.CallError) as raised:
            client.call(999, b"x")
        assert raised.value.code == 1
        assert client.call(ECHO, b"after") == b"after"

    async def main():
        async with await acgi.AsyncClient.connect(bridge.tcp) as client:
            with pytest.raises(acgi.UnknownService):
                await client.call("no-such-service")
            assert await client.call(ECHO, b"after") == b"after"
    asyncio.run(main())


def test_handler_exception_is_code_8_with_its_message(bridge):
    # Proves a handler's exception reaches the caller as ServiceError (code 8) carrying the
    # message, as does a handler returning something other than bytes.
    with acgi.Client(bridge.unix) as client:
        with pytest.raises(acgi.ServiceError) as raised:
            client.call(ECHO, b"@@fail:the disk is full")
        assert raised.value.code == 8
        assert raised.value.message == "the disk is full"
        assert raised.value.may_have_run and not raised.value.retryable
        with pytest.raises(acgi.ServiceError) as raised:
            client.call(ECHO, b"@@str")
        assert "not bytes" in raised.value.message
        assert client.call(ECHO, b"fine") == b"fine"


def test_per_call_timeout_fails_the_call_and_keeps_the_connection(bridge):
    # Proves a call without an answer in time raises CallTimeout (a TimeoutError) promptly,
    # its late reply is dropped, and the connection keeps working (blocking and asyncio).
    with acgi.Client(bridge.unix) as client:
        started = time.monotonic()
        with pytest.raises(acgi.CallTimeout):
            client.call(ECHO, b"@@sleep:1.0", timeout=0.2)
        assert time.monotonic() - started < 0.9
        assert client.call(ECHO, b"after") == b"after"
        # The late reply to the timed-out call arrives meanwhile, and is not taken for this one.
        assert client.call(ECHO, b"@@sleep:1.2") == b"slept"
        assert client.call(ECHO, b"last") == b"last"

    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        started = time.monotonic()
        with pytest.raises(acgi.CallTimeout) as raised:
            await client.call(ECHO, b"@@sleep:1.0", timeout=0.2)
        assert isinstance(raised.value, TimeoutError)
        assert time.monotonic() - started < 0.9
        assert not client._connection.waiting
        assert await client.call(ECHO, b"@@sleep:1.2") == b"slept"
        await client.close()
    asyncio.run(main())


def test_close_fails_pending_calls_clearly(bridge):
    # Proves close() fails every call still waiting with ConnectionClosed, and later calls too.
    async def main():
        client = await acgi.AsyncClient.connect(bridge.unix)
        assert await client.call(ECHO, b"warm") == b"warm"
        pending = [asyncio.ensure_future(client.call(ECHO, b"@@sleep:0.5")) for _ in range(3)]
        await asyncio.sleep(0)
        await client.close()
        for future in pending:
            with pytest.raises(acgi.ConnectionClosed, match="client was closed"):
                await future
        with pytest.raises(acgi.ConnectionClosed):
            await client.call(ECHO, b"after close")
    asyncio.run(main())


# -- a fake server: what a real bridge never sends ---------------------------------------------

def serve_once(accept, send: bytes, *, read_bytes: int = protocol.HEADER_BYTES) -> threading.Thread:
    def run():
        conn = accept()
        conn.recv(read_bytes)
        conn.sendall(send)
        try:
            conn.recv(1)  # until the client closes
        except OSError:
            pass
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_reply_bound_refuses_an_oversized_reply_without_allocating_it(fake_server):
    # Proves a reply header announcing more than reply_bytes_max is a protocol error raised on
    # the header alone: the client allocates nothing near the announced size, and closes.
    path, accept = fake_server
    announced = protocol.U32_MAX  # 4 GiB - 1; the fake sends only the header and 1 KiB
    header = protocol.encode_header(Kind.REPLY, 0, 0, 1, announced, 1)
    serve_once(accept, header + b"z" * 1024, read_bytes=1 << 16)
    client = acgi.Client(path, reply_bytes_max=1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(acgi.ProtocolError, match="over the bound"):
            client.call(1, b"hello", timeout=10)  # a client that waited for 4 GiB times out
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"{peak} bytes allocated for a refused reply"
    assert client.closed
    with pytest.raises(acgi.ConnectionClosed):
        client.call(1, b"again")

    # At the bound exactly, the same reply is accepted.
    serve_once(accept, protocol.encode_frame(Kind.REPLY, 1, 1, b"r" * 1000))
    with acgi.Client(path, reply_bytes_max=1000) as client:
        assert client.call(1, b"hi") == b"r" * 1000


def test_async_reply_bound_refuses_an_oversized_reply(fake_server):
    # Proves the asyncio client refuses an oversized reply header the same way, failing the
    # call with ProtocolError and closing the connection.
    path, accept = fake_server
    header = protocol.encode_header(Kind.REPLY, 0, 0, 1, 1 << 31, 1)
    serve_once(accept, header, read_bytes=1 << 16)

    async def main():
        client = await acgi.AsyncClient.connect(path, reply_bytes_max=1 << 20)
        tracemalloc.start()
        try:
            with pytest.raises(acgi.ProtocolError, match="over the bound"):
                await client.call(1, b"hello", timeout=10)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 << 20
        assert client.closed
    asyncio.run(main())


@pytest.mark.parametrize("bad", [
    pytest.param(b"\x00" * 24, id="bad_magic"),
    pytest.param(protocol.encode_frame(Kind.JOB, 1, 1, b""), id="job_kind"),
    pytest.param(protocol.encode_frame(Kind.REPLY, 1, 1, b"", flags=protocol.FLAG_IN_SLOT),
                 id="flags_on_reply"),
    pytest.param(protocol.encode_header(Kind.REPLY, 0, 5, 1, 0, 1), id="code_on_reply"),
])
def test_a_malformed_frame_from_the_server_is_a_protocol_error(fake_server, bad):
    # Proves a frame the bridge may not send fails the calls in flight with ProtocolError and
    # closes the connection (blocking and asyncio).
    path, accept = fake_server
    serve_once(accept, bad)
    client = acgi.Client(path)
    with pytest.raises(acgi.ProtocolError):
        client.call(1, b"hello")
    assert client.closed

    serve_once(accept, bad, read_bytes=2 * protocol.HEADER_BYTES + 10)

    async def main():
        client = await acgi.AsyncClient.connect(path)
        calls = [asyncio.ensure_future(client.call(1, b"hello")) for _ in range(2)]
        for call in calls:
            with pytest.raises(acgi.ProtocolError):
                await call
        assert client.closed
    asyncio.run(main())


def test_a_close_by_the_server_fails_pending_calls(fake_server):
    # Proves an orderly close with calls in flight fails them with ConnectionClosed, not a code.
    path, accept = fake_server
    def run():
        conn = accept()
        conn.recv(100)
        conn.close()
    threading.Thread(target=run, daemon=True).start()

    async def main():
        client = await acgi.AsyncClient.connect(path)
        call = asyncio.ensure_future(client.call(1, b"hello"))
        with pytest.raises(acgi.ConnectionClosed) as raised:
            await call
        assert not isinstance(raised.value, acgi.CallError)
    asyncio.run(main())


def test_calls_survive_a_binary_upgrade():
    # Proves both clients resend, by themselves, the calls a draining bridge refused: across
    # `acgi-bridge upgrade` a blocking and an async client (with calls in flight) fail nothing.
    import os
    import signal
    import subprocess

    from conftest import bridge_binary, python_service, start_bridge

    running = start_bridge(services=[python_service(1, ECHO, min_workers=2, max_workers=4)])
    admin = running.dir / "state" / "admin.sock"
    successor = None
    try:
        blocking = acgi.Client(running.unix)
        assert blocking.call(ECHO, b"before") == b"before"

        async def main():
            client = await acgi.AsyncClient.connect(running.unix)
            assert await client.call(ECHO, b"warm") == b"warm"
            upgrade = await asyncio.create_subprocess_exec(
                str(bridge_binary()), "upgrade", "--admin", str(admin),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            payloads = [pattern(i, 2000) for i in range(300)]
            calls = [client.call(ECHO, p) for p in payloads]
            replies, (out, err) = await asyncio.gather(
                asyncio.gather(*calls), upgrade.communicate())
            assert upgrade.returncode == 0, err
            started.append(int(out.split()[2]))  # stopped below, whatever fails next
            assert replies == payloads
            assert await client.call(ECHO, b"after") == b"after"
            await client.close()

        started = []
        try:
            asyncio.run(main())
        finally:
            successor = started[0] if started else None
        assert running.process.wait(30) == 0, "the old bridge drains and exits 0"
        # The blocking client's connection was drained while idle: the call goes to the new
        # bridge on a new connection.
        assert blocking.call(ECHO, b"again") == b"again"
        assert blocking.drain_retries == 1
        blocking.close()
    finally:
        if successor is not None:
            os.kill(successor, signal.SIGTERM)
            _, status = os.waitpid(successor, 0)
            assert status == 0
        running.stop()
