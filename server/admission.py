"""From a decoded request to a structure queued at its model version, or a ``ServeError``.

Shared by the unary and the streaming RPC. Runs on the I/O event loop and never waits:
submitting to a batcher either succeeds or raises (a full queue is QueueFullError; a
stream then waits for room itself, see ``streams.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from crossfield.v1 import inference_pb2

from .errors import ComputeError, InvalidArgumentError, ServeError, UnavailableError
from .metrics import Metrics
from .models import ModelRegistry, ServedModel
from .validation import check_request, resolve_head
from .wire import Malformed
from .work import WorkItem

UNKNOWN = "-"  # metric label for a model, version or head that did not resolve
RESOLVE_ATTEMPTS = 5  # admissions racing with version switches before giving up
MAX_NAME_LENGTH = 256  # characters of a model, version or head name (folder names are less)


@dataclass
class Target:
    """Where a request went, as far as it got: its metric labels and its model version."""

    model: str = UNKNOWN
    version: str = UNKNOWN
    head: str = UNKNOWN
    served: ServedModel | None = None


def check_names(request: inference_pb2.ComputeRequest) -> None:
    """Refuse names longer than any loaded one could be, before they reach a message: a
    name of a megabyte echoed in a status would exceed what clients accept in trailers."""
    for field in ("model", "version", "head"):
        length = len(getattr(request, field))
        if length > MAX_NAME_LENGTH:
            raise InvalidArgumentError(
                f"{field}: {length} characters; names are at most {MAX_NAME_LENGTH}"
            )


class Admission:
    """Resolve, validate and queue requests for the models of one registry."""

    def __init__(self, registry: ModelRegistry) -> None:
        self._registry = registry

    def admit(
        self,
        request: inference_pb2.ComputeRequest | Malformed,
        deadline: float | None,
        target: Target,
    ) -> WorkItem:
        """Queue one request and return its work item; ``target`` is filled in as the
        request resolves, so a refusal can still be counted under the right labels.

        A hot-load can retire the resolved version between ``resolve`` and ``submit`` (its
        batcher is then closed); the request is resolved again and goes to the version that
        replaced it, so a switch of versions never fails a request.
        """
        if isinstance(request, Malformed):
            raise InvalidArgumentError(request.message)
        check_names(request)
        for _ in range(RESOLVE_ATTEMPTS):
            served = self._registry.resolve(request.model, request.version)
            target.model, target.version, target.served = served.name, served.version, served
            target.head = resolve_head(served, request)
            item = WorkItem(check_request(served, request, target.head), deadline=deadline)
            try:
                served.batcher.submit(item)
            except UnavailableError:
                if self._registry.is_serving(served):
                    raise  # the server itself is stopping
                continue
            return item
        raise UnavailableError(
            f"model {target.model!r}: versions changed {RESOLVE_ATTEMPTS} times while "
            "admitting this request; retry"
        )


def describe(error: Exception) -> ServeError:
    """Any failure of one structure as a ServeError (unexpected ones are INTERNAL)."""
    if isinstance(error, ServeError):
        return error
    return ComputeError(f"{type(error).__name__}: {error}")


def record(metrics: Metrics, target: Target, status: str, received: float) -> None:
    """Count one structure's final status, and its latency when it was answered OK."""
    metrics.requests.labels(target.model, target.version, target.head, status).inc()
    if status == "OK":
        elapsed = time.monotonic() - received
        metrics.request_seconds.labels(target.model, target.version).observe(elapsed)
