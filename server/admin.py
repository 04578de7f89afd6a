# ruff: noqa: N802 - the RPC method names (LoadModel, ...) are gRPC's
"""The gRPC Admin service: change what the server serves without restarting it.

Maps messages to ``ModelRepository`` calls and back. A request names a model and a
version *of the repository* and nothing else: no path and no file ever comes from the
wire, so an admin call can only choose among the checkpoints the operator published.
The admin token is checked before these methods run (``security.py``).
"""

from __future__ import annotations

import logging

import grpc

from crossfield.v1 import admin_pb2, admin_pb2_grpc

from .errors import ServeError
from .models import ModelRegistry
from .repository import ModelRepository
from .service import model_info

log = logging.getLogger(__name__)


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, repository: ModelRepository, registry: ModelRegistry) -> None:
        self._repository = repository
        self._registry = registry

    def LoadModel(self, request: admin_pb2.LoadModelRequest, context: grpc.ServicerContext):
        log.info("admin: load model %r version %r", request.name, request.version or "newest")
        try:
            served = self._repository.load(request.name, request.version)
        except ServeError as err:
            context.abort(grpc.StatusCode[err.code], err.message)
        return admin_pb2.LoadModelResponse(model=model_info(served, self._registry))

    def UnloadModel(self, request: admin_pb2.UnloadModelRequest, context: grpc.ServicerContext):
        log.info("admin: unload model %r version %r", request.name, request.version or "all")
        try:
            retired = self._repository.unload(request.name, request.version)
        except ServeError as err:
            context.abort(grpc.StatusCode[err.code], err.message)
        return admin_pb2.UnloadModelResponse(
            unloaded=[model_info(served, self._registry) for served in retired]
        )

    def ReloadRepository(
        self, request: admin_pb2.ReloadRepositoryRequest, context: grpc.ServicerContext
    ):
        log.info("admin: reload repository")
        report = self._repository.scan()
        return admin_pb2.ReloadRepositoryResponse(
            loaded=[model_info(served, self._registry) for served in report.loaded],
            errors=report.errors,
        )
