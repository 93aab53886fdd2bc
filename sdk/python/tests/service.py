#!/usr/bin/env python3
"""The test suite's worker: acgi.worker.serve() with a handler that echoes, or runs one of a
few commands (a payload starting with ``@@``) that the tests use to observe the SDK.

    @@fail:MSG        raise ValueError(MSG)           -> the caller gets code 8 with MSG
    @@remaining       repr(acgi.worker.remaining())
    @@job             the current job's transport (slot, socket, queued)
    @@big:N           N bytes of b"b"
    @@sleep:SECONDS   sleep, then b"slept"
    @@pid             this worker's pid
    @@str             return a str (not bytes)             -> code 8
    @@block:PATH      connect to the Unix socket PATH, send our pid, wait for one line back,
                      then reply "stop=<acgi.worker.stop_requested()>"
"""

import os
import socket
import sys
import time

import acgi.worker


def handle(request: bytes):
    if not request.startswith(b"@@"):
        return request
    command, _, argument = request[2:].partition(b":")
    if command == b"fail":
        raise ValueError(argument.decode())
    if command == b"remaining":
        return repr(acgi.worker.remaining()).encode()
    if command == b"job":
        return acgi.worker.current_job().transport.encode()
    if command == b"big":
        return b"b" * int(argument)
    if command == b"sleep":
        time.sleep(float(argument))
        return b"slept"
    if command == b"pid":
        return str(os.getpid()).encode()
    if command == b"str":
        return "not bytes"
    if command == b"block":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(argument.decode())
            conn.sendall(f"{os.getpid()}\n".encode())
            conn.makefile("rb").readline()
        return f"stop={acgi.worker.stop_requested()}".encode()
    return memoryview(bytearray(request))  # any bytes-like reply works


if __name__ == "__main__":
    acgi.worker.serve(handle, queued="--no-queued" not in sys.argv[1:])
