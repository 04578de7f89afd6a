"""Shared pieces of the hot-loading tests: a real server on a model repository, publishing
through the ``crossfield publish`` command, hand-made broken versions, and waiting."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crossfield.model import CrossfieldMACE, save_checkpoint
from crossfield.model.repository import CHECKPOINT_NAME, META_NAME, version_path
from crossfield.server.app import InferenceServer, ServerConfig
from crossfield.server.batcher import BatchLimits

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextmanager
def repository_server(repo: Path, **config) -> Iterator[InferenceServer]:
    """A real server on 127.0.0.1 (ephemeral ports) following ``repo``; ``config``
    overrides ServerConfig fields."""
    settings = dict(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=0,
        device="cpu",
        dtype=torch.float64,
        limits=BatchLimits(max_delay=0.002),
        grace=5.0,
        repository=repo,
        poll_interval=0.2,
    )
    settings.update(config)
    server = InferenceServer(ServerConfig(**settings)).start()
    try:
        yield server
    finally:
        server.stop(grace=2.0)


def publish_with_cli(model: CrossfieldMACE, repo: Path, name: str, scratch: Path) -> Path:
    """Save ``model`` and publish it with ``crossfield publish`` in its own process, as a
    training job would; returns the new version folder."""
    checkpoint = scratch / f"{name}-{time.monotonic_ns()}.pt"
    save_checkpoint(model, checkpoint, metadata={"purpose": "hot-load test"})
    result = subprocess.run(
        [sys.executable, "-m", "crossfield.cli", "publish", str(checkpoint), "--repo", str(repo)]
        + ["--name", name],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip().splitlines()[-1])


def write_broken_versions(repo: Path, name: str, good: Path, first: int) -> list[int]:
    """Three versions written by hand that must all be refused: garbage bytes, a truncated
    copy of a good checkpoint, and a checkpoint of a newer, unknown format."""
    garbage = version_path(repo, name, first)
    garbage.mkdir()
    (garbage / CHECKPOINT_NAME).write_bytes(b"this is not a checkpoint\x00" * 40)

    truncated = version_path(repo, name, first + 1)
    truncated.mkdir()
    data = (good / CHECKPOINT_NAME).read_bytes()
    (truncated / CHECKPOINT_NAME).write_bytes(data[: len(data) // 2])
    (truncated / META_NAME).write_text((good / META_NAME).read_text())

    newer = version_path(repo, name, first + 2)
    newer.mkdir()
    payload = torch.load(good / CHECKPOINT_NAME, weights_only=True)
    payload["format_version"] = 99
    torch.save(payload, newer / CHECKPOINT_NAME)
    return [first, first + 1, first + 2]


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 60.0) -> object:
    """Poll ``predicate`` until it returns something true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def health(channel: grpc.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
