# ruff: noqa: N802 - the RPC method names (Compute, ListModels, ...) are gRPC's
"""The gRPC Inference service on ``grpc.aio``: maps messages to our types and back.

Handlers are coroutines on the server's one I/O event loop; batchers and runners keep
their own threads. A unary request is admitted (``admission.py``) and its handler awaits
the work item's future, which the runner completes from its thread; a stream is a
``StreamSession`` (``streams.py``), an MD session an ``MdSession`` (``sessions.py``).
Every final outcome of a structure is counted once in ``crossfield_requests_total``, with
the model version that answered it.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from crossfield.v1 import inference_pb2, inference_pb2_grpc

from .admission import Admission, Target, describe, record
from .errors import ServeError
from .inline import OpenCalls
from .metrics import Metrics
from .models import ModelRegistry
from .responses import clip, encode_result, model_info, status_code
from .sessions import MdSession
from .streams import OpenStreams, StreamLimits, StreamSession, call_deadline, deadline_passed
from .wire import Malformed

log = logging.getLogger(__name__)

SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]


class InferenceService(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        streams: StreamLimits,
        calls: OpenCalls,
    ) -> None:
        self._registry = registry
        self._metrics = metrics
        self._admission = Admission(registry)
        self._stream_limits = streams
        self._streams = OpenStreams()
        self._calls = calls  # the server's, shared with the Relaxation service

    def stop_streams(self) -> None:
        """The server stops: every open stream delivers what it has in progress and ends
        (call on the I/O loop)."""
        self._streams.stop()

    # -- RPCs -----------------------------------------------------------------------------
    async def Compute(self, request, context: grpc.aio.ServicerContext):
        with self._calls.open():
            return await self._compute(request, context)

    async def _compute(self, request, context: grpc.aio.ServicerContext):
        received = time.monotonic()
        target = Target()
        try:
            item = self._admission.admit(request, call_deadline(context), target)
        except Exception as err:  # a ServeError, or a bug (then INTERNAL)
            error = _refusal(err)
            record(self._metrics, target, error.code, received)
            await _abort(context, error)
        try:
            result = await asyncio.wrap_future(item.future)
        except asyncio.CancelledError:  # grpc cancels the handler: deadline or client
            target.served.batcher.withdraw(item)
            status = "DEADLINE_EXCEEDED" if deadline_passed(context) else "CANCELLED"
            record(self._metrics, target, status, received)
            raise
        except Exception as err:  # the structure's own failure
            error = describe(err)
        else:
            record(self._metrics, target, "OK", received)
            return encode_result(request.id, target.served, item, result)
        record(self._metrics, target, error.code, received)
        await _abort(context, error)

    async def ComputeStream(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        session = StreamSession(self._admission, self._metrics, self._stream_limits, context)
        with self._calls.open():
            await self._streams.serve(session, request_iterator)

    async def ComputeSession(self, request_iterator, context: grpc.aio.ServicerContext) -> None:
        session = MdSession(
            self._registry, self._metrics, self._stream_limits, context, self._calls
        )
        with self._calls.open():
            await self._streams.serve(session, request_iterator)

    async def ListModels(self, request, context: grpc.aio.ServicerContext):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(request.message))
        models = [model_info(served, self._registry) for served in self._registry.models()]
        return inference_pb2.ListModelsResponse(
            models=models, default_model=self._registry.default_name
        )

    async def GetModel(self, request, context: grpc.aio.ServicerContext):
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(request.message))
        try:
            served = self._registry.resolve(request.name, request.version)
        except ServeError as err:
            await context.abort(status_code(err), clip(err.message))
        return model_info(served, self._registry)


async def _abort(context: grpc.aio.ServicerContext, error: ServeError) -> None:
    """End the call with ``error``'s status; its trailing metadata (a poison mark, which
    tells clients not to retry) goes with it."""
    await context.abort(status_code(error), clip(error.message), error.metadata)


def _refusal(error: Exception) -> ServeError:
    if not isinstance(error, ServeError):
        log.exception("admitting a request failed", exc_info=error)
    return describe(error)
