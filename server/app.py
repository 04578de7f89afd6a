"""Assemble a server: registry, runner, gRPC services (inference, admin, health,
reflection) behind the security interceptor, the hot-loading repository and the metrics
endpoint, with a graceful stop.

Health is SERVING only while some model version is loaded and warm: a server started on a
repository listens at once but stays NOT_SERVING until its first version has passed its
warm-up, so a load balancer never routes to a replica that can only say UNAVAILABLE.

Stopping is ordered so that nothing accepted is lost: health turns NOT_SERVING (load
balancers stop routing here), repository polling stops, gRPC refuses new calls but lets
running ones finish (their structures are still queued in live batchers), then the
batchers and the runner drain and exit.
"""

from __future__ import annotations

import logging
from concurrent import futures
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossfield.model import CrossfieldMACE
from crossfield.v1 import admin_pb2, admin_pb2_grpc, inference_pb2, inference_pb2_grpc

from .admin import AdminService
from .batcher import BatchLimits
from .metrics import Metrics
from .models import Backend, ModelRegistry, ServedModel, serve_model
from .repository import ModelRepository, VersionPolicy
from .runner import Runner
from .security import SecurityConfig, SecurityInterceptor
from .service import InferenceService

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name


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
    max_message_bytes: int = 16 * 1024 * 1024  # largest gRPC message in either direction
    security: SecurityConfig = field(default_factory=SecurityConfig)
    repository: Path | None = None  # serve and follow this model repository
    poll_interval: float = 10.0  # seconds between repository scans; 0: only on admin calls
    version_policy: str = "latest"  # for models without their own config.json
    backend: Backend = field(default_factory=Backend)  # per model: REPO/NAME/config.json


class InferenceServer:
    """A running Crossfield server; ``add_model`` before or after ``start``, or let the
    repository (``config.repository``) bring versions in."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.registry = ModelRegistry()
        self.runner = Runner(self.config.device, self.metrics)
        self.repository: ModelRepository | None = None
        if self.config.repository is not None:
            self.repository = ModelRepository(
                self.config.repository,
                self.registry,
                self._serve,
                self.metrics,
                VersionPolicy.parse(self.config.version_policy),
                self.config.poll_interval,
                on_change=self._update_health,
            )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._grpc: grpc.Server | None = None
        self._health = health.HealthServicer()
        self._stopping = False
        self._http = None

    def add_model(
        self,
        model: CrossfieldMACE,
        name: str,
        version: str = "1",
        metadata: dict[str, Any] | None = None,
        backend: str | None = None,
    ) -> ServedModel:
        """Serve ``model`` as ``name``/``version``; ``backend`` overrides the server's."""
        served = self._serve(model, name, version, metadata, backend)
        self.registry.add(served)
        self._update_health()
        return served

    def _serve(
        self,
        model: CrossfieldMACE,
        name: str,
        version: str,
        metadata: dict[str, Any] | None,
        backend: str | None = None,
    ) -> ServedModel:
        """A warmed ServedModel on this server's device, not yet in the registry."""
        config = self.config
        chosen = config.backend
        if backend is not None and backend != chosen.name:
            chosen = replace(chosen, name=backend)
        served = serve_model(
            model,
            name,
            version,
            self.runner,
            config.limits,
            self.metrics,
            config.dtype,
            config.max_atoms_per_structure,
            metadata,
            chosen,
        )
        log.info(
            "model %r version %r ready on %s (%s, %s backend)",
            name,
            version,
            served.device,
            served.dtype,
            served.backend,
        )
        return served

    def start(self) -> InferenceServer:
        config = self.config
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
        ]
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="grpc"),
            interceptors=[SecurityInterceptor(config.security, self.metrics)],
            options=options,
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceService(self.registry, self.metrics), server
        )
        services = [INFERENCE_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME]
        if self.repository is not None:
            admin_pb2_grpc.add_AdminServicer_to_server(
                AdminService(self.repository, self.registry), server
            )
            services.append(ADMIN_SERVICE)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(services, server)
        address = f"{config.host}:{config.port}"
        if config.security.tls:
            self.port = server.add_secure_port(address, config.security.credentials())
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._update_health()
        server.start()
        self._grpc = server
        log.info("security: %s", config.security.describe())
        if config.metrics_port is not None:
            self._http = self.metrics.serve_http(config.metrics_port, config.metrics_host)
            self.metrics_port = self._http.server_port
        if self.repository is not None:
            self.repository.start()
        return self

    def _update_health(self) -> None:
        """SERVING while some version is loaded and warm (never again once stopping)."""
        if self._stopping:
            return
        serving = bool(self.registry.models())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            self._health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish running ones (up to ``grace`` seconds), drain."""
        grace = self.config.grace if grace is None else grace
        self._stopping = True
        self._health.enter_graceful_shutdown()
        if self.repository is not None:
            self.repository.stop()
        if self._grpc is not None:
            self._grpc.stop(grace).wait()
        for served in self.registry.models():
            served.batcher.close()
        self.runner.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
