"""Exceptions of the acgi client and worker SDKs.

::

    AcgiError
    ├── CallError            the bridge answered with an Error frame (§3); .code, .retryable
    │   ├── UnknownService (1), PayloadTooLarge (2), Overloaded (3), WorkerFailed (4),
    │   │   TimedOut (5), ShuttingDown (6), MalformedFrame (7), ServiceError (8),
    │   │   ServiceUnavailable (9), DeadlineExceeded (10), NotAllowed (11)
    ├── ConnectionClosed     the connection ended; calls in flight have an unknown outcome
    │   ├── Drained          ...except after the drain notice (§2.6): then they never ran
    │   └── ProtocolError    the bridge sent bytes the spec forbids; the connection was closed
    └── CallTimeout          no answer within the call's timeout (also a TimeoutError)
"""

from __future__ import annotations

from typing import Dict, Optional, Type

from .protocol import ErrorCode

__all__ = [
    "AcgiError", "CallError", "UnknownService", "PayloadTooLarge", "Overloaded",
    "WorkerFailed", "TimedOut", "ShuttingDown", "MalformedFrame", "ServiceError",
    "ServiceUnavailable", "DeadlineExceeded", "NotAllowed", "ConnectionClosed", "ProtocolError",
    "CallTimeout", "call_error", "Drained", "DRAIN_RETRIES_MAX", "refused_by_drain",
]

#: How many times a client resends one call that a draining bridge refused (error 6, or no
#: answer before the drain notice: it never ran) on a new connection (docs/protocol.md §2.6).
DRAIN_RETRIES_MAX = 3

# §3 "did the service run it?": "no" codes never ran; every other code (including codes this
# version does not know) may have run.
_NEVER_RAN = frozenset({1, 3, 6, 7, 9, 10, 11})
# §3 "retry can help?" and §11 item 8: codes a retry of the same request can fix without any
# risk of running it twice...
_RETRYABLE = frozenset({3, 6, 9, 10})
# ...and codes a retry can fix when the request is idempotent (it may have run).
_RETRYABLE_IF_IDEMPOTENT = frozenset({4, 5})


class AcgiError(Exception):
    """Base class of every error this package raises."""


class CallError(AcgiError):
    """The bridge answered a frame with an ``Error`` (§3).

    ``code`` is the stable numeric code (an :class:`ErrorCode` when this version knows it, else
    the bare int: unknown codes are accepted and treated as non-retryable). ``message`` is for
    people; programs must not parse it.
    """

    code_value: Optional[int] = None

    def __init__(self, code: int, message: str, request_id: int = 0) -> None:
        try:
            self.code: int = ErrorCode(code)
        except ValueError:
            self.code = code
        self.message = message
        self.request_id = request_id
        super().__init__(f"{self.name} (code {code}): {message}")

    @property
    def name(self) -> str:
        """The code's name from §3, or ``"error code N"`` for a code this version lacks."""
        if isinstance(self.code, ErrorCode):
            return self.code.label
        return f"error code {self.code}"

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed and cannot run it twice
        (codes 3, 6, 9, 10). See :attr:`retryable_if_idempotent` for 4 and 5."""
        return int(self.code) in _RETRYABLE

    @property
    def retryable_if_idempotent(self) -> bool:
        """Whether a retry may succeed for a request that is safe to run twice (also 4, 5)."""
        return int(self.code) in _RETRYABLE or int(self.code) in _RETRYABLE_IF_IDEMPOTENT

    @property
    def may_have_run(self) -> bool:
        """Whether the service may have run the request (its side effects may have happened).
        False only for codes §3 says never ran (1, 3, 6, 7, 9, 10)."""
        return int(self.code) not in _NEVER_RAN


class UnknownService(CallError):
    """Code 1: no service has this id or name."""

    code_value = 1


class PayloadTooLarge(CallError):
    """Code 2: the request or the service's reply is over ``max_payload_bytes``."""

    code_value = 2


class Overloaded(CallError):
    """Code 3: the service's backlog is full or the request waited too long; retry later."""

    code_value = 3


class WorkerFailed(CallError):
    """Code 4: the worker died or broke the protocol while holding the request."""

    code_value = 4


class TimedOut(CallError):
    """Code 5: the request ran longer than the service's ``request_timeout_ms``."""

    code_value = 5


class ShuttingDown(CallError):
    """Code 6: the bridge is shutting down."""

    code_value = 6


class MalformedFrame(CallError):
    """Code 7: the bridge found a frame we sent malformed; it closes the connection."""

    code_value = 7


class ServiceError(CallError):
    """Code 8: the service's handler failed; ``message`` is the handler's."""

    code_value = 8


class ServiceUnavailable(CallError):
    """Code 9: the service cannot keep workers running; retry later."""

    code_value = 9


class DeadlineExceeded(CallError):
    """Code 10: the call's own timeout expired before a worker took it; it never ran."""

    code_value = 10


class NotAllowed(CallError):
    """Code 11: the service's rules do not let this caller call it; it never ran."""

    code_value = 11


_BY_CODE: Dict[int, Type[CallError]] = {
    cls.code_value: cls
    for cls in (UnknownService, PayloadTooLarge, Overloaded, WorkerFailed, TimedOut,
                ShuttingDown, MalformedFrame, ServiceError, ServiceUnavailable,
                DeadlineExceeded, NotAllowed)
    if cls.code_value is not None
}


def call_error(code: int, message: str, request_id: int = 0) -> CallError:
    """The :class:`CallError` subclass for ``code`` (plain ``CallError`` for unknown codes)."""
    return _BY_CODE.get(code, CallError)(code, message, request_id)


class ConnectionClosed(AcgiError):
    """The connection closed or was reset. Every call in flight on it has an unknown outcome
    (it may or may not have run, §2.6); the caller may reconnect."""


class Drained(ConnectionClosed):
    """The bridge sent the drain notice (an ``Error`` 6 with request id 0, §2.6) and closed the
    connection: every call still waiting on it never ran, and may be resent elsewhere."""


def refused_by_drain(error: BaseException) -> bool:
    """Whether ``error`` says the call never ran because the bridge is draining or stopping:
    error 6, or the drain notice. The clients resend such calls on a new connection."""
    return isinstance(error, (ShuttingDown, Drained))


class ProtocolError(ConnectionClosed):
    """The bridge sent bytes the protocol does not allow (a malformed or oversized frame, an
    unexpected kind). The client closed the connection; calls in flight failed with this."""


class CallTimeout(AcgiError, TimeoutError):
    """No answer arrived within the call's ``timeout``. The request may still run (or may
    already have); its late answer is discarded. The connection stays usable."""
