# ruff: noqa: N802 - the RPC method names (Compute, ListModels, ...) are gRPC's
"""The gRPC Inference service: maps messages to our types and back, nothing else.

Validation lives in ``validation.py``, batching in ``batcher.py``, evaluation in
``runner.py``; here a request is checked, wrapped in a ``WorkItem``, submitted to its
model's batcher, and its result (or error) is encoded. Every final outcome of a
structure is counted once in ``crossfield_requests_total``.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
from google.protobuf import struct_pb2

from crossfield.v1 import inference_pb2, inference_pb2_grpc
from crossfield.v1.arrays import to_array

from .errors import (
    ComputeError,
    DeadlineExceededError,
    RequestCancelledError,
    ServeError,
    UnavailableError,
)
from .metrics import Metrics
from .models import ModelRegistry, ServedModel
from .validation import check_request, resolve_head
from .work import StructureResult, WorkItem

log = logging.getLogger(__name__)

NO_DEADLINE = 1e7  # seconds; a longer "deadline" is gRPC's way of saying there is none
UNKNOWN = "-"  # metric label for a model or head that did not resolve (bounded cardinality)
RESOLVE_ATTEMPTS = 5  # admissions racing with version switches before giving up


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(self, registry: ModelRegistry, metrics: Metrics) -> None:
        self._registry = registry
        self._metrics = metrics

    # -- RPCs -----------------------------------------------------------------------------
    def Compute(self, request: inference_pb2.ComputeRequest, context: grpc.ServicerContext):
        received = time.monotonic()
        try:
            served, item = self._admit(request, _deadline(context), wait=False)
        except ServeError as err:
            context.abort(_status(err), err.message)
        if not context.add_callback(item.future.cancel):
            item.future.cancel()  # the call ended before the callback could be registered
        try:
            result = item.future.result(timeout=_time_remaining(context))
        except futures.TimeoutError:
            item.future.cancel()
            error: ServeError = DeadlineExceededError(
                "deadline exceeded before the structure was evaluated"
            )
        except futures.CancelledError:
            error = RequestCancelledError("request cancelled")
        except ServeError as err:
            error = err
        except Exception as err:  # never let one structure take the handler down silently
            log.exception("unexpected failure of a request")
            error = ComputeError(f"{type(err).__name__}: {err}")
        else:
            self._count(served.name, item, "OK", received)
            return encode_result(request.id, served, item, result)
        self._count(served.name, item, error.code, received)
        context.abort(_status(error), error.message)

    def ComputeStream(
        self,
        request_iterator: Iterator[inference_pb2.ComputeRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[inference_pb2.ComputeResponse]:
        """Read requests in a helper thread while this generator yields responses, so a
        client can keep many structures in flight; each request is answered exactly once.
        A full queue slows the reader down (flow control) instead of failing items."""
        responses: queue.SimpleQueue = queue.SimpleQueue()
        outstanding: dict[int, WorkItem] = {}
        lock = threading.Lock()
        deadline = _deadline(context)

        def cancel_outstanding() -> None:
            with lock:
                items = list(outstanding.values())
            for item in items:
                item.future.cancel()

        def answer(
            request: inference_pb2.ComputeRequest,
            served: ServedModel,
            item: WorkItem,
            received: float,
            future: futures.Future,
        ) -> None:
            with lock:
                outstanding.pop(id(item), None)
            responses.put(self._stream_response(request, served, item, received, future))

        def read() -> None:
            count = 0
            try:
                for request in request_iterator:
                    count += 1
                    received = time.monotonic()
                    try:
                        served, item = self._admit(
                            request, deadline, wait=True, give_up=lambda: not context.is_active()
                        )
                    except ServeError as err:
                        responses.put(_error_response(request.id, err))
                        continue
                    with lock:
                        outstanding[id(item)] = item
                    item.future.add_done_callback(
                        lambda f, r=request, s=served, i=item, t=received: answer(r, s, i, t, f)
                    )
            except grpc.RpcError:
                pass  # the client went away; what was submitted is cancelled by the callback
            except Exception:
                log.exception("reading a request stream failed")
            finally:
                responses.put(count)

        context.add_callback(cancel_outstanding)
        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        sent, total = 0, None
        while total is None or sent < total:
            message = responses.get()
            if isinstance(message, int):
                total = message
                continue
            sent += 1
            yield message

    def ListModels(self, request: inference_pb2.ListModelsRequest, context: grpc.ServicerContext):
        models = [model_info(served, self._registry) for served in self._registry.models()]
        return inference_pb2.ListModelsResponse(
            models=models, default_model=self._registry.default_name
        )

    def GetModel(self, request: inference_pb2.GetModelRequest, context: grpc.ServicerContext):
        try:
            served = self._registry.resolve(request.name, request.version)
        except ServeError as err:
            context.abort(_status(err), err.message)
        return model_info(served, self._registry)

    # -- helpers --------------------------------------------------------------------------
    def _admit(self, request, deadline, wait, give_up=None) -> tuple[ServedModel, WorkItem]:
        """Resolve, validate and queue one request; count it when it is refused.

        A hot-load can retire the resolved version between ``resolve`` and ``submit``
        (its batcher is then closed); the request is resolved again and goes to the
        version that replaced it, so a switch of versions never fails a request.
        """
        model_label = head_label = UNKNOWN
        try:
            for _ in range(RESOLVE_ATTEMPTS):
                served = self._registry.resolve(request.model, request.version)
                model_label = served.name
                head_label = resolve_head(served, request)
                checked = check_request(served, request, head_label)
                item = WorkItem(checked, deadline=deadline)
                try:
                    served.batcher.submit(item, wait=wait, give_up=give_up)
                except UnavailableError:
                    if self._registry.is_serving(served):
                        raise  # the server itself is stopping
                    continue
                return served, item
            raise UnavailableError(
                f"model {model_label!r}: versions changed {RESOLVE_ATTEMPTS} times while "
                "admitting this request; retry"
            )
        except ServeError as err:
            self._metrics.requests.labels(model_label, head_label, err.code).inc()
            raise

    def _count(self, model: str, item: WorkItem, status: str, received: float) -> None:
        self._metrics.requests.labels(model, item.request.structure.head, status).inc()
        if status == "OK":
            self._metrics.request_seconds.labels(model).observe(time.monotonic() - received)

    def _stream_response(
        self, request, served, item, received, future
    ) -> inference_pb2.ComputeResponse:
        """The response for one finished stream item: its result or its error status."""
        exception = None if future.cancelled() else future.exception()
        if future.cancelled():
            error: ServeError = RequestCancelledError("request cancelled")
        elif isinstance(exception, ServeError):
            error = exception
        elif exception is not None:
            error = ComputeError(f"{type(exception).__name__}: {exception}")
        else:
            self._count(served.name, item, "OK", received)
            return encode_result(request.id, served, item, future.result())
        self._count(served.name, item, error.code, received)
        return _error_response(request.id, error)


def model_info(served: ServedModel, registry: ModelRegistry) -> inference_pb2.ModelInfo:
    """What a client needs to know about one loaded version."""
    versions, latest = registry.versions(served.name)
    config = served.model.config
    heads = [
        inference_pb2.HeadInfo(
            name=h.name,
            level_of_theory=_struct(h.level_of_theory),
            coverage_known=h.elements is not None,
            elements=h.elements or [],
            systems=h.systems or [],
        )
        for h in config.heads
    ]
    return inference_pb2.ModelInfo(
        name=served.name,
        version=served.version,
        latest=served.version == latest,
        versions=versions,
        heads=heads,
        default_head=config.head_names[0],
        elements=config.elements,
        cutoff=config.r_max,
        dtype=served.dtype,
        backend=served.backend,
        device=served.device,
        max_atoms_per_structure=served.max_atoms_per_structure,
        metadata=_struct(served.metadata),
    )


def encode_result(
    request_id: str, served: ServedModel, item: WorkItem, result: StructureResult
) -> inference_pb2.ComputeResponse:
    fields: dict[str, Any] = {
        "id": request_id,
        "model": served.name,
        "version": served.version,
        "head": item.request.structure.head,
        "queue_seconds": result.queue_seconds,
        "compute_seconds": result.compute_seconds,
    }
    if item.request.extrapolated_elements:
        fields["extrapolation"] = True
        fields["extrapolated_elements"] = item.request.extrapolated_elements
    if result.energy is not None:
        fields["energy"] = result.energy
    for name in ("forces", "stress", "atom_energies"):
        value = getattr(result, name)
        if value is not None:
            fields[name] = to_array(value)
    return inference_pb2.ComputeResponse(**fields)


def _error_response(request_id: str, error: ServeError) -> inference_pb2.ComputeResponse:
    status = inference_pb2.Status(code=_status(error).value[0], message=error.message)
    return inference_pb2.ComputeResponse(id=request_id, status=status)


def _status(error: ServeError) -> grpc.StatusCode:
    return grpc.StatusCode[error.code]


def _time_remaining(context: grpc.ServicerContext) -> float | None:
    """Seconds to the call's deadline; None without one (gRPC then reports ~infinity)."""
    remaining = context.time_remaining()
    return None if remaining is None or remaining > NO_DEADLINE else remaining


def _deadline(context: grpc.ServicerContext) -> float | None:
    remaining = _time_remaining(context)
    return None if remaining is None else time.monotonic() + remaining


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    """JSON-able view of free-form metadata (numbers, strings, lists, nested dicts)."""
    message = struct_pb2.Struct()
    message.update(json.loads(json.dumps(data, default=str)))
    return message
