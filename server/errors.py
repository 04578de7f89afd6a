"""Why a request failed, in our own terms.

The batcher, runner and registry raise these; only ``service.py`` maps them to gRPC status
codes, so everything below the service stays free of gRPC and testable on its own.
Messages name the field that was wrong (``structure.positions: ...``).
"""

from __future__ import annotations


class ServeError(Exception):
    """Base class: ``code`` is the name of the gRPC status code it maps to."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: tuple[tuple[str, str], ...] = ()  # trailing metadata of the status


class InvalidArgumentError(ServeError):
    code = "INVALID_ARGUMENT"


class NotFoundError(ServeError):
    code = "NOT_FOUND"


class QueueFullError(ServeError):
    code = "RESOURCE_EXHAUSTED"


class DeadlineExceededError(ServeError):
    code = "DEADLINE_EXCEEDED"


class RequestCancelledError(ServeError):
    code = "CANCELLED"


class UnavailableError(ServeError):
    code = "UNAVAILABLE"


class ComputeError(ServeError):
    code = "INTERNAL"


class FailedPreconditionError(ServeError):
    """The system is not in a state to do this, e.g. a model version that cannot load."""

    code = "FAILED_PRECONDITION"


POISON_METADATA = "crossfield-poison"  # trailing metadata key: clients must not retry


class PoisonError(InvalidArgumentError):
    """A structure that crashed or stalled an isolated graph worker: refused alone, and
    marked with trailing metadata ``crossfield-poison: <reason>`` so that clients stop
    retrying it (on this server or any other)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"structure: refused, {reason}; do not retry it")
        self.reason = reason
        self.metadata = ((POISON_METADATA, reason),)
