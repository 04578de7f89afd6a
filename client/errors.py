"""Python exceptions for what a Crossfield server answers with a gRPC status.

A simulation script should be able to write ``except InvalidStructureError`` without
knowing gRPC; each class also derives from the built-in exception a Python programmer
would reach for (``ValueError`` for a bad structure, ``TimeoutError`` for a deadline, ...),
and keeps the status ``code`` name and the server's ``details`` for logs.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class PoisonStructureError(InvalidStructureError):
    """The structure is the likely cause of servers failing; it is not sent again.

    Either the server isolated it (it crashed or stalled the server's graph building) and
    answered INVALID_ARGUMENT with the trailing metadata ``crossfield-poison: <reason>``,
    or the client saw servers go away while it was in flight (``RetryPolicy.poison_after``
    of them, the last time with nothing else in flight) and stopped before it could take
    down another. ``reason`` says which; ``servers`` lists the addresses that went away.
    """

    def __init__(self, details: str, code: str, reason: str, servers: tuple[str, ...] = ()) -> None:
        super().__init__(details, code)
        self.reason = reason
        self.servers = servers


def lost_in_flight(servers: Sequence[str], what: str = "structure") -> PoisonStructureError:
    """The client's verdict on a structure in flight when ``servers`` went away."""
    reason = (
        f"in flight when {len(servers)} servers went away ({', '.join(servers)}); "
        "not sent to another server so that it cannot take that one down too"
    )
    return PoisonStructureError(f"{what}: {reason}", "UNAVAILABLE", reason, tuple(servers))


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


POISON_KEY = "crossfield-poison"


# What gRPC says of a call it failed before any server saw it: the channel had no
# connection to send it on (the load-balancing pick failed; round_robin, pick_first).
NOT_SENT = ("connections to all backends failing", "failed to connect to all addresses")


def never_sent(error: CrossfieldError) -> bool:
    """Whether gRPC failed the call before it reached a server: the call cannot have
    hurt a server, so its structures do not count towards poison control. (Matched on
    gRPC's message: should it change, such a call counts as lost, as before.)"""
    return error.code == "UNAVAILABLE" and error.details.startswith(NOT_SENT)


def from_rpc_error(error: grpc.RpcError) -> CrossfieldError:
    """The exception for a failed call (sync or asyncio); a structure the server marked
    as poison (trailing metadata ``crossfield-poison``) becomes PoisonStructureError."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    name = code.name if code is not None else "UNKNOWN"
    reason = _trailer(error, POISON_KEY)
    if reason is not None:
        return PoisonStructureError(details or reason, name, reason)
    return error_for(name, details or "")


def _trailer(error: grpc.RpcError, key: str) -> str | None:
    """One value of a failed call's trailing metadata (None when absent)."""
    trailing = getattr(error, "trailing_metadata", None)
    for item in (trailing() if callable(trailing) else None) or ():
        name, value = item if isinstance(item, tuple) else (item.key, item.value)
        if name == key:
            return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return None
