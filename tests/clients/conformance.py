"""Caller-protocol conformance check of a running acgi-bridge, written only from docs/protocol.md.

    python3 tests/clients/conformance.py ADDR [--max-payload-bytes N] [--service echo]

ADDR is the bridge's Unix socket path or TCP host:port. The bridge must serve a service named
`echo` (or --service) whose reply is its request. Prints one line per check, then
`N passed, M failed`; exits 0 only when every check passed.
"""

import argparse
import os
import socket
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import acgi_client as acgi  # noqa: E402

CHECKS = []


def check(name):
    def register(function):
        CHECKS.append((name, function))
        return function
    return register


class Failure(Exception):
    pass


def expect(condition, message):
    if not condition:
        raise Failure(message)


def expect_error(frame, code, request_id):
    expect(frame.kind == acgi.ERROR,
           f"expected Error {code}, got {acgi.KIND_NAMES.get(frame.kind)} "
           f"with payload {frame.payload[:60]!r}")
    expect(frame.code == code,
           f"expected error code {code} ({acgi.ERROR_NAMES[code]}), got {frame.code} "
           f"({acgi.ERROR_NAMES.get(frame.code, '?')}): {frame.payload[:200]!r}")
    expect(frame.request_id == request_id,
           f"error carries request id {frame.request_id}, expected {request_id}")
    try:
        frame.payload.decode("utf-8")
    except UnicodeDecodeError:
        raise Failure("error message is not UTF-8")


def expect_closed(client):
    """After error 7 the bridge closes: the next read must see EOF (or a reset)."""
    try:
        frame = client.read_frame()
    except acgi.ConnectionClosed:
        return
    except socket.timeout:
        raise Failure("the connection was not closed after the malformed-frame error")
    raise Failure(f"expected the connection to close, got another frame {frame}")


def expect_works(ctx, client):
    """The connection still carries a round trip."""
    payload = b"still alive"
    reply = client.call(ctx.echo_id, payload)
    expect(reply == payload, f"follow-up round trip returned {reply[:60]!r}")


def pattern(index, length):
    """Distinct, recognisable payload bytes for request `index`."""
    head = f"<{index}:{length}>".encode()
    if length <= len(head):
        return head[:length]
    body = bytes((index * 31 + i) & 0xFF for i in range(min(length - len(head), 251)))
    repeated = (body * ((length - len(head)) // max(len(body), 1) + 1))[: length - len(head)]
    return head + repeated


class Context:
    def __init__(self, args):
        self.addr = args.addr
        self.max_payload_bytes = args.max_payload_bytes
        self.timeout = args.timeout
        self.service = args.service
        self.echo_id = None

    def connect(self):
        return acgi.connect(self.addr, timeout=self.timeout,
                            max_payload_bytes=self.max_payload_bytes)


# -- checks, in order ------------------------------------------------------------------------


@check("resolve the echo service")
def resolve_echo(ctx):
    with ctx.connect() as client:
        request_id = client.send_frame(acgi.RESOLVE, 0, ctx.service.encode())
        frame = client.wait(request_id)
        expect(frame.kind == acgi.RESOLVED,
               f"expected Resolved, got {acgi.KIND_NAMES.get(frame.kind)} {frame.payload[:200]!r}")
        expect(frame.request_id == request_id, "Resolved carries another request id")
        expect(frame.payload == b"", f"Resolved has a payload: {frame.payload[:60]!r}")
        expect(frame.service_id != 0, "Resolved names service id 0")
        ctx.echo_id = frame.service_id


@check("round trip: Request -> Reply with the same request id and service id")
def round_trip(ctx):
    with ctx.connect() as client:
        request_id = client.send(ctx.echo_id, b"hello", request_id=42)
        frame = client.wait(request_id)
        expect(frame.kind == acgi.REPLY,
               f"expected Reply, got {acgi.KIND_NAMES.get(frame.kind)} {frame.payload[:200]!r}")
        expect(frame.request_id == 42, f"reply has request id {frame.request_id}")
        expect(frame.service_id == ctx.echo_id, f"reply has service id {frame.service_id}")
        expect(frame.code == 0 and frame.flags == 0, "reply has code or flags set")
        expect(frame.payload == b"hello", f"reply payload {frame.payload!r}")


@check("round trip with an empty payload")
def empty_payload(ctx):
    with ctx.connect() as client:
        expect(client.call(ctx.echo_id, b"") == b"", "empty request did not echo empty")


@check("100 pipelined requests, each answer matched to its own request")
def pipelined(ctx):
    with ctx.connect() as client:
        # Ids far apart and not sequential; sizes spanning small, slot-sized and copy-path.
        sizes = [0, 1, 5, 100, 4096, 65535, 65536, 65537, 200_000]
        expected = {}
        for index in range(100):
            request_id = (index * 0x9E3779B97F4A7C15 + 7) & acgi.U64_MAX or 1
            length = min(sizes[index % len(sizes)] + index, ctx.max_payload_bytes)
            payload = pattern(index, length)
            client.send(ctx.echo_id, payload, request_id=request_id)
            expected[request_id] = payload
        expect(len(expected) == 100, "request ids were not distinct")
        answered = {}
        for _ in range(100):
            frame = client.receive()
            expect(frame.request_id in expected,
                   f"answer for unknown request id {frame.request_id}")
            expect(frame.request_id not in answered,
                   f"request id {frame.request_id} answered twice")
            answered[frame.request_id] = frame
        for request_id, payload in expected.items():
            frame = answered[request_id]
            reply = acgi.result(frame, acgi.REPLY)
            expect(reply == payload,
                   f"request {request_id}: reply of {len(reply)} bytes does not match its "
                   f"request of {len(payload)} bytes")


@check("ping -> pong with the same payload and request id")
def ping(ctx):
    with ctx.connect() as client:
        for payload in (b"are you there?", b""):
            request_id = client.send_frame(acgi.PING, 0, payload)
            frame = client.wait(request_id)
            expect(frame.kind == acgi.PONG, f"expected Pong, got {acgi.KIND_NAMES.get(frame.kind)}")
            expect(frame.request_id == request_id, "Pong carries another request id")
            expect(frame.payload == payload, f"Pong payload {frame.payload!r}")


@check("unknown service name -> error 1, connection stays open")
def unknown_name(ctx):
    with ctx.connect() as client:
        request_id = client.send_frame(acgi.RESOLVE, 0, b"no-such-service.conformance")
        expect_error(client.wait(request_id), acgi.UNKNOWN_SERVICE, request_id)
        expect_works(ctx, client)


@check("unknown service id -> error 1, connection stays open")
def unknown_id(ctx):
    with ctx.connect() as client:
        request_id = client.send(0, b"to nobody")  # id 0 never names a service (§2.2)
        expect_error(client.wait(request_id), acgi.UNKNOWN_SERVICE, request_id)
        expect_works(ctx, client)


@check("payload of max+1 bytes -> error 2, connection stays open")
def too_large(ctx):
    with ctx.connect() as client:
        request_id = client.send(ctx.echo_id, b"\xA5" * (ctx.max_payload_bytes + 1))
        expect_error(client.wait(request_id), acgi.PAYLOAD_TOO_LARGE, request_id)
        expect_works(ctx, client)


@check("payload of exactly max bytes is accepted and echoed")
def exactly_max(ctx):
    with ctx.connect() as client:
        payload = pattern(7, ctx.max_payload_bytes)
        reply = client.call(ctx.echo_id, payload)
        expect(reply == payload, f"reply of {len(reply)} bytes does not match")


def malformed(ctx, description, **header_fields):
    """Send one bad header (no payload) on a fresh connection: error 7, then close."""
    kind = header_fields.pop("kind", acgi.REQUEST)
    with ctx.connect() as client:
        request_id = 0x0102030405060708
        client.send_raw(acgi.encode_header(kind, ctx.echo_id or 1, request_id, 0, **header_fields))
        try:
            frame = client.read_frame()
        except acgi.ConnectionClosed:
            raise Failure(f"{description}: connection closed without an Error 7 frame")
        expect_error(frame, acgi.MALFORMED_FRAME, request_id)
        expect_closed(client)


@check("frame with version 2 -> error 7, then the connection closes")
def bad_version(ctx):
    malformed(ctx, "version 2", version=2)


@check("frame with bad magic -> error 7, then the connection closes")
def bad_magic(ctx):
    malformed(ctx, "bad magic", magic=0x6BAC)


@check("frame with an undefined kind -> error 7, then the connection closes")
def bad_kind(ctx):
    malformed(ctx, "kind 8", kind=8)


@check("frame with an undefined flag -> error 7, then the connection closes")
def bad_flag(ctx):
    malformed(ctx, "flag 0x8000", flags=0x8000)


@check("Request with a non-zero code -> error 7, then the connection closes")
def code_on_request(ctx):
    malformed(ctx, "code on Request", code=3)


@check("caller sends a Reply frame -> error 7, then the connection closes")
def caller_sends_reply(ctx):
    malformed(ctx, "Reply from caller", kind=acgi.REPLY)


@check("caller sends a worker Job frame -> error 7, then the connection closes")
def caller_sends_job(ctx):
    malformed(ctx, "Job from caller", kind=acgi.JOB)


@check("Request with IN_SLOT -> error 7, then the connection closes")
def in_slot_from_caller(ctx):
    malformed(ctx, "IN_SLOT from caller", flags=acgi.FLAG_IN_SLOT)


# -- driver ----------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("addr", help="bridge address: Unix socket path or host:port")
    parser.add_argument("--max-payload-bytes", type=int,
                        default=acgi.MAX_PAYLOAD_BYTES_DEFAULT,
                        help="the bridge's max_payload_bytes (default %(default)s)")
    parser.add_argument("--service", default="echo", help="name of the echo service")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for any one socket operation")
    args = parser.parse_args(argv)
    ctx = Context(args)

    passed, failures = 0, []
    for name, function in CHECKS:
        if ctx.echo_id is None and function is not resolve_echo:
            failures.append((name, "skipped: the echo service could not be resolved"))
            print(f"FAIL {name}: skipped, the echo service could not be resolved")
            continue
        try:
            function(ctx)
        except (Failure, acgi.ProtocolError, acgi.ConnectionClosed, acgi.AcgiError) as failure:
            failures.append((name, str(failure)))
            print(f"FAIL {name}: {type(failure).__name__}: {failure}")
        except Exception as error:  # a crash of the check is a failure too
            failures.append((name, repr(error)))
            print(f"FAIL {name}: {error!r}")
            traceback.print_exc(file=sys.stdout)
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {len(failures)} failed")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
