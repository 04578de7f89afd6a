# ruff: noqa: N802 - the RPC method names (LoadModel, ...) are gRPC's
"""The gRPC Admin service: change what the server serves without restarting it.

Maps messages to ``ModelRepository`` calls and back. A request names a model and a
version *of the repository* and nothing else: no path and no file ever comes from the
wire, so an admin call can only choose among the checkpoints the operator published.
The admin token is checked before these methods run (``security.py``).

Loading a version reads, compiles and warms a model, and a scan walks the repository:
seconds to minutes of blocking work, so each runs in a worker thread while the I/O loop
keeps serving.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from crossfield.v1 import admin_pb2, admin_pb2_grpc

from .errors import ServeError
from .models import ModelRegistry
from .repository import ModelRepository
from .responses import clip, model_info
from .wire import Malformed

log = logging.getLogger(__name__)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, repository: ModelRepository, registry: ModelRegistry) -> None:
        self._repository = repository
        self._registry = registry

    async def LoadModel(self, request, context: grpc.aio.ServicerContext):
        await _refuse_malformed(request, context)
        log.info("admin: load model %r version %r", request.name, request.version or "newest")
        try:
            served = await asyncio.to_thread(self._repository.load, request.name, request.version)
        except ServeError as err:
            await context.abort(grpc.StatusCode[err.code], clip(err.message))
        return admin_pb2.LoadModelResponse(model=model_info(served, self._registry))

    async def UnloadModel(self, request, context: grpc.aio.ServicerContext):
        await _refuse_malformed(request, context)
        log.info("admin: unload model %r version %r", request.name, request.version or "all")
        try:
            retired = await asyncio.to_thread(
                self._repository.unload, request.name, request.version
            )
        except ServeError as err:
            await context.abort(grpc.StatusCode[err.code], clip(err.message))
        return admin_pb2.UnloadModelResponse(
            unloaded=[model_info(served, self._registry) for served in retired]
        )

    async def ReloadRepository(self, request, context: grpc.aio.ServicerContext):
        await _refuse_malformed(request, context)
        log.info("admin: reload repository")
        report = await asyncio.to_thread(self._repository.scan)
        return admin_pb2.ReloadRepositoryResponse(
            loaded=[model_info(served, self._registry) for served in report.loaded],
            errors=report.errors,
        )


async def _refuse_malformed(request, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, clip(request.message))
