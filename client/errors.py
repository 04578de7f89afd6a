"""Python exceptions for what a Crossfield server answers with a gRPC status.

A simulation script should be able to write ``except InvalidStructureError`` without
knowing gRPC; each class also derives from the built-in exception a Python programmer
would reach for (``ValueError`` for a bad structure, ``TimeoutError`` for a deadline, ...),
and keeps the status ``code`` name and the server's ``details`` for logs.
"""

from __future__ import annotations

import grpc


class CrossfieldError(Exception):
    """Base of every error raised by ``crossfield.client``.

    ``code`` is the gRPC status name (``"INVALID_ARGUMENT"``, ...) and ``details`` the
    server's message, which names the offending field.
    """

    def __init__(self, details: str, code: str = "UNKNOWN") -> None:
        super().__init__(f"{details} [{code}]")
        self.code = code
        self.details = details


class InvalidStructureError(CrossfieldError, ValueError):
    """The server rejected the structure (element, positions, cell, size, ...)."""


class ModelNotFoundError(CrossfieldError, LookupError):
    """The model, version or head is not served."""


class ServerBusyError(CrossfieldError):
    """The server's queue is full; retry later or send less at once."""


class ServerUnavailableError(CrossfieldError, ConnectionError):
    """No server answered, even after the retries."""


class DeadlineExceededError(CrossfieldError, TimeoutError):
    """The answer did not come within the deadline."""


class AuthenticationError(CrossfieldError, PermissionError):
    """The bearer token is missing, wrong, or not allowed to make this call."""


class CancelledError(CrossfieldError):
    """The call was cancelled before it finished."""


class RemoteError(CrossfieldError):
    """Any other server-side failure (internal error, unimplemented call, ...)."""


_BY_CODE: dict[str, type[CrossfieldError]] = {
    "INVALID_ARGUMENT": InvalidStructureError,
    "OUT_OF_RANGE": InvalidStructureError,
    "NOT_FOUND": ModelNotFoundError,
    "RESOURCE_EXHAUSTED": ServerBusyError,
    "UNAVAILABLE": ServerUnavailableError,
    "DEADLINE_EXCEEDED": DeadlineExceededError,
    "UNAUTHENTICATED": AuthenticationError,
    "PERMISSION_DENIED": AuthenticationError,
    "CANCELLED": CancelledError,
}


def error_for(code: str, details: str) -> CrossfieldError:
    """The exception for a status code name and message."""
    return _BY_CODE.get(code, RemoteError)(details or f"server answered {code}", code)


def from_rpc_error(error: grpc.RpcError) -> CrossfieldError:
    """The exception for a failed call (sync or asyncio)."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    return error_for(name, details or "")
