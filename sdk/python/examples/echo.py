#!/usr/bin/env python3
"""An echo worker: a request is echoed, and one that starts with ``fail:`` is answered with a
service error carrying the rest. (The cross-SDK behaviour suite, tests/it/sdks.rs, runs it
beside its Rust and C twins and expects identical answers.)"""

import acgi.worker


def handle(request: bytes) -> bytes:
    if request.startswith(b"fail:"):
        raise RuntimeError(request[5:].decode("utf-8", "replace"))
    return request


acgi.worker.serve(handle)
