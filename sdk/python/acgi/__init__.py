"""acgi: Python SDK for acgi-bridge (docs/protocol.md), standard library only.

- :class:`acgi.Client`: blocking client; :class:`acgi.AsyncClient`: asyncio client with many
  calls in flight on one connection.
- :mod:`acgi.worker`: ``acgi.worker.serve(handler)`` runs a synchronous handler as a worker.
- :mod:`acgi.protocol`: the frame codec and constants.
- Errors: :class:`acgi.CallError` (``.code``, ``.retryable``, ``.may_have_run``) and one
  subclass per code of §3; :class:`acgi.ConnectionClosed`, :class:`acgi.ProtocolError`,
  :class:`acgi.CallTimeout`.
"""

from .aio import AsyncClient
from .client import Client, Service
from .errors import (AcgiError, CallError, CallTimeout, ConnectionClosed, DeadlineExceeded,
                     MalformedFrame, Overloaded, PayloadTooLarge, ProtocolError, ServiceError,
                     ServiceUnavailable, ShuttingDown, TimedOut, UnknownService, WorkerFailed)
from .protocol import PAYLOAD_BYTES_MAX_DEFAULT, ErrorCode

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "Service", "ErrorCode", "PAYLOAD_BYTES_MAX_DEFAULT",
    "AcgiError", "CallError", "CallTimeout", "ConnectionClosed", "ProtocolError",
    "UnknownService", "PayloadTooLarge", "Overloaded", "WorkerFailed", "TimedOut",
    "ShuttingDown", "MalformedFrame", "ServiceError", "ServiceUnavailable", "DeadlineExceeded",
]
