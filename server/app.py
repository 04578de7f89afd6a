"""Assemble a server: registry, runner, gRPC services (inference, admin, health,
reflection) on ``grpc.aio`` behind the security interceptor, the hot-loading repository and
the metrics endpoint, with a graceful stop.

All gRPC I/O runs on one asyncio event loop on its own thread (``loop.py``): an open stream
costs a coroutine, not a thread, so idle or slow clients cannot use up the server, and
health checks are answered on the same loop whatever the inference load. Batchers and
runners keep their own threads.

Health is SERVING only while some model version is loaded and warm: a server started on a
repository listens at once but stays NOT_SERVING until its first version has passed its
warm-up, so a load balancer never routes to a replica that can only say UNAVAILABLE.

Stopping is ordered so that nothing accepted is lost: health turns NOT_SERVING (load
balancers stop routing here), repository polling stops, open streams stop reading and
deliver what they have in progress, then end UNAVAILABLE if anything was left unanswered
(clients resend that elsewhere), gRPC refuses new calls but lets running ones finish
(their structures are still queued in live batchers), then the batchers and the runner
drain and exit.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crossfield.model import CrossfieldMACE
from crossfield.v1 import admin_pb2, inference_pb2, relax_pb2

from .admin import AdminService
from .batcher import BatchLimits
from .inline import OpenCalls
from .loop import LoopThread
from .metrics import Metrics
from .model_child import Child
from .model_process import ModelProcess
from .models import Backend, ModelRegistry, ServedModel, serve_model
from .relax_engine import RelaxEngine
from .relax_metrics import RelaxMetrics
from .relax_service import RelaxService
from .repository import ModelRepository, VersionPolicy
from .runner import Runner
from .security import SecurityConfig, SecurityInterceptor
from .service import InferenceService
from .streams import StreamLimits
from .transport import Transport
from .wire import add_service

log = logging.getLogger(__name__)

INFERENCE = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["Admin"]
RELAXATION = relax_pb2.DESCRIPTOR.services_by_name["Relaxation"]
INFERENCE_SERVICE = INFERENCE.full_name
ADMIN_SERVICE = ADMIN.full_name


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
    grace: float = 30.0  # seconds running calls get to finish on stop
    max_message_bytes: int = 16 * 1024 * 1024  # largest gRPC message in either direction
    streams: StreamLimits = field(default_factory=StreamLimits)  # window, idle timeout
    transport: Transport = field(default_factory=Transport)  # HTTP/2 limits and keepalive
    security: SecurityConfig = field(default_factory=SecurityConfig)
    repository: Path | None = None  # serve and follow this model repository
    poll_interval: float = 10.0  # seconds between repository scans; 0: only on admin calls
    version_policy: str = "latest"  # for models without their own config.json
    backend: Backend = field(default_factory=Backend)  # per model: REPO/NAME/config.json
    # Evaluate models in a child process (model_process.py): True, False, or None for the
    # automatic choice by backend (``model_process``), ``crossfield serve``'s default.
    model_process: bool | None = False


# What an automatic model process leaves in the server's process. A lone MD session's
# steps skip the child by running the server's own eager copy; an AOT package has no such
# copy (only the process that loads it holds it), so in a child every one of its 2-5 ms
# small-structure steps would pay the hop (0.1-1 ms). Under many clients the child still
# gains an AOT model 18-37 % (README, serving throughput): ``--model-process`` gives that.
IN_PROCESS_BACKENDS = frozenset({"aot"})


def model_process(
    config: ServerConfig, metrics: Metrics, child: Child | None = None
) -> ModelProcess | None:
    """The model process ``config`` asks for. Only on a CPU: on a GPU the kernels run
    asynchronously and the device, not the lock, is what batches wait for. ``None``
    (automatic): on a CPU, for models that run Python between kernels (eager, compile,
    script), whose batches the server's I/O would otherwise slow through the lock; the
    child starts with the first such model, or is ``child``, launched ahead (ended here
    when no model process is wanted)."""
    on_cpu = torch.device(config.device).type == "cpu"
    if config.model_process is False or not on_cpu:
        if child is not None:
            child.discard()
        if config.model_process is True:  # asked for on a GPU
            raise ValueError(
                f"model_process: runs models on the CPU only, not on {config.device!r}"
            )
        return None
    skipped = IN_PROCESS_BACKENDS if config.model_process is None else frozenset()
    return ModelProcess(on_restart=metrics.model_process_restarts.inc, skipped=skipped, child=child)


class InferenceServer:
    """A running Crossfield server; ``add_model`` before or after ``start``, or let the
    repository (``config.repository``) bring versions in."""

    def __init__(
        self, config: ServerConfig | None = None, model_child: Child | None = None
    ) -> None:
        """``model_child``: a model process launched already (``crossfield serve`` does so
        before its own imports, so that the two import torch side by side), used when
        ``config`` asks for one and ended when it does not."""
        self.config = config or ServerConfig()
        self.metrics = Metrics()
        self.registry = ModelRegistry()
        self.runner = Runner(
            self.config.device,
            self.metrics,
            self.config.limits.graphs,
            model_process(self.config, self.metrics, model_child),
        )
        self.relax = RelaxEngine(self.registry, RelaxMetrics(self.metrics.registry))
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
        self._io: LoopThread | None = None
        self._grpc: grpc.aio.Server | None = None
        self._service: InferenceService | None = None
        self._relax_service: RelaxService | None = None
        self._health: health.aio.HealthServicer | None = None
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
        self._io = LoopThread()
        try:
            self._io.run(self._start_grpc())
        except BaseException:
            self._io.close()
            self._io = None
            raise
        log.info("security: %s", self.config.security.describe())
        if self.config.metrics_port is not None:
            self._http = self.metrics.serve_http(self.config.metrics_port, self.config.metrics_host)
            self.metrics_port = self._http.server_port
        if self.repository is not None:
            self.repository.start()
        return self

    async def _start_grpc(self) -> None:
        """Build and start the gRPC server (on the I/O loop, which grpc.aio binds to)."""
        config = self.config
        options = [
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            *config.transport.options(),
        ]
        server = grpc.aio.server(
            interceptors=[SecurityInterceptor(config.security, self.metrics)], options=options
        )
        calls = OpenCalls()
        self._service = InferenceService(self.registry, self.metrics, config.streams, calls)
        add_service(server, INFERENCE, self._service)
        self._relax_service = RelaxService(
            self.registry,
            self.relax,
            self.metrics,
            config.streams,
            config.max_message_bytes,
            calls,
        )
        add_service(server, RELAXATION, self._relax_service)
        services = [
            INFERENCE_SERVICE,
            RELAXATION.full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        ]
        if self.repository is not None:
            add_service(server, ADMIN, AdminService(self.repository, self.registry))
            services.append(ADMIN_SERVICE)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(services, server)
        address = f"{config.host}:{config.port}"
        if config.security.tls:
            self.port = server.add_secure_port(address, config.security.credentials())
        else:
            self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        await self._set_health()
        await server.start()
        self._grpc = server

    def _update_health(self) -> None:
        """SERVING while some version is loaded and warm (never again once stopping);
        called from any thread when the registry changes."""
        if self._stopping or self._io is None:
            return  # start() sets the status it finds
        if self._io.loop.is_running() and not self._on_io_thread():
            self._io.run(self._set_health())
        else:
            self._io.submit(self._set_health())

    def _on_io_thread(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._io.loop
        except RuntimeError:
            return False

    async def _set_health(self) -> None:
        serving = bool(self.registry.models())
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", INFERENCE_SERVICE):
            await self._health.set(service, status)

    def stop(self, grace: float | None = None) -> None:
        """Stop accepting calls, finish running ones (up to ``grace`` seconds), drain."""
        if self._stopping:
            return
        grace = self.config.grace if grace is None else grace
        self._stopping = True
        if self._io is not None:
            self._io.run(self._health.enter_graceful_shutdown())
        if self.repository is not None:
            self.repository.stop()
        self.relax.close()  # relaxations end UNAVAILABLE with their last state
        if self._io is not None:
            self._io.run(self._stop_grpc(grace))
        for served in self.registry.models():
            served.batcher.close()
        self.runner.close()
        if self._io is not None:
            self._io.close()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()

    async def _stop_grpc(self, grace: float) -> None:
        self._service.stop_streams()
        self._relax_service.stop_streams()
        await self._grpc.stop(grace)
