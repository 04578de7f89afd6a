"""Assemble a server: registry, runner, gRPC services (inference, health, reflection) and
the metrics endpoint, with a graceful stop.

Stopping is ordered so that nothing accepted is lost: health turns NOT_SERVING (load
balancers stop routing here), gRPC refuses new calls but lets running ones finish (their
structures are still queued in live batchers), then the batchers and the runner drain and
exit.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossfield.model import CrossfieldMACE
from crossfield.v1 import inference_pb2, inference_pb2_grpc

from .batcher import BatchLimits
from .metrics import Metrics
from .models import ModelRegistry, ServedModel, serve_model
from .runner import Runner
from .service import InferenceService

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass
class ServerConfig:
    """Everything ``crossfield serve`` can set; the defaults suit one GPU or a few cores."""

    host: str = "[::]"
    port: int = 50051  # 0: any free port (see InferenceServer.port)
    metrics_host: str = "0.0.0.0"
    metrics_port: int | None = 9090  # None: no metrics endpoint; 0: any free port
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: torch.dtype = torch.float32
    limits: BatchLimits = field(default_factory=BatchLimits)
    max_atoms_per_structure: int = 4096
    max_workers: int = 64  # gRPC handler threads: bounds concurrent unary calls and streams
    grace: float = 30.0  # seconds running calls get to finish on stop


class InferenceServer:
    """A running Crossfield server; ``add_model`` before or after ``start``."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.registry = ModelRegistry()
        self.runner = Runner(self.config.device, self.metrics)
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._http = None

    def add_model(
        self,
        model: CrossfieldMACE,
        name: str,
        version: str = "1",
        metadata: dict[str, Any] | None = None,
    ) -> ServedModel:
        served = serve_model(
            model,
            name,
            version,
            self.runner,
            self.config.limits,
            self.metrics,
            self.config.dtype,
            self.config.max_atoms_per_structure,
            metadata,
        )
        self.registry.add(served)
        log.info(
            "serving model %r version %r on %s (%s)", name, version, served.device, served.dtype
        )
        return served

    def start(self) -> InferenceServer:
        config = self.config
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
            options=[("grpc.so_reuseport", 0)],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceService(self.registry, self.metrics), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        services = (INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(services, server)
        self.port = server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot listen on {config.host}:{config.port}")
        server.start()
        self._grpc = server
        for service in ("", INFERENCE_SERVICE):
            self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if config.metrics_port is not None:
            self._http = self.metrics.serve_http(config.metrics_port, config.metrics_host)
            self.metrics_port = self._http.server_port
        return self

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish running ones (up to ``grace`` seconds), drain."""
        grace = self.config.grace if grace is None else grace
        self._health.enter_graceful_shutdown()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        for served in self.registry.models():
            served.batcher.close()
        self.runner.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
