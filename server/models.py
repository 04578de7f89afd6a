"""Loaded model versions by name: the seam between the service and model management.

The service only asks ``ModelRegistry.resolve(name, version)`` for a ``ServedModel`` and
submits work to its batcher. How versions arrive (the command line, or the hot-loading
repository in ``repository.py``) is the business of whoever calls ``add``/``remove``;
every change is one atomic update of the registry's map, and a removed version's batcher
drains what it already holds (the caller closes it), so a batch always finishes on the
version that started it.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, Structure, evaluate
from crossfield.model.backends import BACKEND_CHOICES, compile_model, ready_backend

from .batcher import Batcher, BatchLimits
from .errors import NotFoundError, UnavailableError
from .metrics import Metrics
from .model_child import ModelProcessError
from .model_process import ModelProcess, ModelSpec, ProcessModel, pickle_model
from .provenance import public_metadata
from .runner import Runner

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedModel:
    """One model version on its device, with its own queue and batcher."""

    name: str
    version: str
    model: CrossfieldMACE
    batcher: Batcher
    max_atoms_per_structure: int
    metadata: dict[str, Any] = field(default_factory=dict)
    backend: str = "eager"
    evaluator: ProcessModel | None = None  # its copy in the runner's model process, if any
    element_allowed: np.ndarray = field(init=False)  # [119] bool, by atomic number

    def __post_init__(self) -> None:
        self.element_allowed = np.zeros(119, dtype=bool)
        self.element_allowed[self.model.config.elements] = True

    @property
    def dtype(self) -> str:
        return str(self.model.dtype).removeprefix("torch.")

    @property
    def device(self) -> str:
        return str(next(self.model.buffers()).device)


@dataclass(frozen=True)
class Backend:
    """How a server runs its models: a ``crossfield.model.backends`` name, where compiled
    artefacts are cached (None: nowhere, every load compiles), and the shape mode."""

    name: str = "eager"
    cache_dir: Path | None = None
    shapes: str = "dynamic"

    def __post_init__(self) -> None:
        if self.name not in BACKEND_CHOICES:
            raise ValueError(
                f"backend: unknown backend {self.name!r}; choose one of {BACKEND_CHOICES}"
            )


def serve_model(
    model: CrossfieldMACE,
    name: str,
    version: str,
    runner: Runner,
    limits: BatchLimits,
    metrics: Metrics,
    dtype: torch.dtype,
    max_atoms_per_structure: int,
    metadata: dict[str, Any] | None = None,
    backend: Backend | None = None,
) -> ServedModel:
    """Put ``model`` on the runner's device in ``dtype``, compile it for ``backend``, warm
    it up and give it a batcher.

    Compilation happens here, in the loading thread, and the compiled model must reproduce
    eager's numbers on example batches (``CompiledModel.warm_up``) before it can serve: no
    request ever waits for a compiler or gets a miscompiled answer. Raises ``ValueError``
    (or the backend's error) when that fails, before anything is visible to requests. With
    a model process (``runner.process``) the same happens there, and this process keeps
    the eager model for graph building.
    """
    backend = backend or Backend()
    model = model.to(device=runner.device, dtype=dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    kind = backend.name
    if kind == "auto":
        kind = ready_backend(model, dtype, runner.device, backend.cache_dir)
        log.info(
            "%s version %s: backend auto runs %s%s",
            name,
            version,
            kind,
            ""
            if kind == "aot"
            else " (no compiled package in the cache: 'crossfield compile' "
            "builds one, 2-5x faster for small structures)",
        )
    evaluator = None
    if runner.process is not None and runner.process.evaluates(kind):
        evaluator, seconds = load_in_model_process(model, kind, dtype, backend, runner.process)
    else:
        model, seconds = ready_to_serve(
            model, kind, dtype, runner.device, backend.cache_dir, backend.shapes
        )
    if seconds is not None:
        metrics.model_compile_seconds.labels(name, version, kind).set(seconds)
    served = ServedModel(
        name=name,
        version=version,
        model=model,
        batcher=Batcher(model, name, runner, limits, metrics, version, evaluator, kind),
        max_atoms_per_structure=max_atoms_per_structure,
        metadata=public_metadata(dict(metadata or {})),  # clients see it: no paths
        backend=kind,
        evaluator=evaluator,
    )
    metrics.model_loaded.labels(name, version, served.dtype, served.device).set(1)
    return served


def retire(served: ServedModel, metrics: Metrics) -> None:
    """Release a version taken out of the registry: its batcher runs what it already
    holds (those batches finish on this version), then the model can be freed."""
    served.batcher.close()
    if served.evaluator is not None:
        served.evaluator.process.drop(served.evaluator.key)
    metrics.model_loaded.remove(served.name, served.version, served.dtype, served.device)
    if served.backend != "eager":
        metrics.model_compile_seconds.remove(served.name, served.version, served.backend)


def ready_to_serve(
    model: CrossfieldMACE,
    kind: str,
    dtype: torch.dtype,
    device: torch.device | str,
    cache_dir: Path | str | None,
    shapes: str,
) -> tuple[Any, float | None]:
    """``model`` compiled for backend ``kind`` (its numbers checked against eager's on
    example batches) and warmed up (``warm_up``), with the compile time (None for eager).
    Where a model is made servable: here in ``serve_model``, or in the model process."""
    seconds = None
    if kind != "eager":
        compiled = compile_model(model, kind, dtype, device, cache_dir, shapes)
        seconds = compiled.warm_up().seconds
        model = compiled
    warm_up(model)
    return model, seconds


def load_in_model_process(
    model: CrossfieldMACE, kind: str, dtype: torch.dtype, backend: Backend, process: ModelProcess
) -> tuple[ProcessModel, float | None]:
    """``model`` compiled for ``kind`` and warmed up in the model process; its evaluator
    there and the compile time. Raises ``ValueError`` naming the child's error."""
    spec = ModelSpec(
        module=pickle_model(model),
        backend=kind,
        dtype=str(dtype).removeprefix("torch."),
        cache_dir=None if backend.cache_dir is None else str(backend.cache_dir),
        shapes=backend.shapes,
    )
    try:
        key, report = process.load(spec)
    except ModelProcessError as err:
        raise ValueError(f"model process: {err}") from None
    return ProcessModel(process, key), report["compile_seconds"]


def warm_up(model: CrossfieldMACE) -> None:
    """Evaluate a tiny structure on every head and insist on finite energies and forces.

    This is the test evaluation that a version must pass before it serves: it pays for
    lazy initialisation (and compilation) up front, so the first real request does not,
    and it refuses weights that load but produce garbage (NaN after a bad training step).
    """
    elements = model.config.elements[:3]
    numbers = np.array([elements[i % len(elements)] for i in range(3)])
    positions = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.1], [0.0, 1.05, -0.3]])
    heads = model.config.head_names
    results = evaluate(model, [Structure(numbers, positions, head=h) for h in heads])
    for head, result in zip(heads, results):
        if not (np.isfinite(result["energy"]).all() and np.isfinite(result["forces"]).all()):
            raise ValueError(f"warm-up: head {head!r} gives non-finite energy or forces")


def version_key(version: str) -> tuple[int, int, str]:
    """Order of versions: numbers numerically (repository versions), after any names."""
    return (1, int(version), "") if version.isdigit() else (0, 0, version)


class ModelRegistry:
    """Thread-safe map name -> versions; the highest version answers version-less requests.

    Versions compare with ``version_key`` (repository versions are integers, so the newest
    is the largest).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self.default_name = ""

    def add(self, served: ServedModel, replace: bool = False) -> ServedModel | None:
        """Make ``served`` resolvable; the first model added becomes the default model.

        With ``replace``, an already loaded copy of the same version is swapped out in the
        same step (a changed checkpoint) and returned for the caller to drain; without it,
        a duplicate version is an error.
        """
        with self._lock:
            versions = self._versions.setdefault(served.name, {})
            previous = versions.get(served.version)
            if previous is not None and not replace:
                raise ValueError(
                    f"model {served.name!r} version {served.version!r} is already loaded"
                )
            versions[served.version] = served
            if not self.default_name:
                self.default_name = served.name
            return previous

    def remove(self, name: str, version: str) -> ServedModel:
        """Take a version out of service; the caller closes its batcher (which drains)."""
        with self._lock:
            served = self._lookup(name, version)
            versions = self._versions[served.name]
            del versions[served.version]
            if not versions:
                del self._versions[served.name]
                if self.default_name == served.name:
                    self.default_name = next(iter(sorted(self._versions)), "")
            return served

    def resolve(self, name: str = "", version: str = "") -> ServedModel:
        """The version a request names; empty name: the default model, empty version: the
        latest. Raises NotFoundError naming the field (``model`` or ``version``), or
        UnavailableError while nothing is loaded yet (a client should retry)."""
        with self._lock:
            return self._lookup(name, version)

    def is_serving(self, served: ServedModel) -> bool:
        """Whether ``served`` is still the loaded copy of its version (not retired)."""
        with self._lock:
            return self._versions.get(served.name, {}).get(served.version) is served

    def _lookup(self, name: str, version: str) -> ServedModel:
        name = name or self.default_name
        if name not in self._versions:
            if not self._versions:
                raise UnavailableError("model: no model is loaded yet")
            raise NotFoundError(
                f"model: no model named {name!r}; loaded models: {sorted(self._versions)}"
            )
        versions = self._versions[name]
        version = version or max(versions, key=version_key)
        if version not in versions:
            raise NotFoundError(
                f"version: model {name!r} has no version {version!r}; "
                f"loaded versions: {sorted(versions, key=version_key)}"
            )
        return versions[version]

    def models(self) -> list[ServedModel]:
        """Every loaded version, by name, oldest version first."""
        with self._lock:
            return [
                self._versions[name][version]
                for name in sorted(self._versions)
                for version in sorted(self._versions[name], key=version_key)
            ]

    def versions(self, name: str) -> tuple[list[str], str]:
        """Loaded versions of ``name`` (oldest first) and the latest one."""
        with self._lock:
            versions = sorted(self._versions.get(name, {}), key=version_key)
            return versions, versions[-1] if versions else ""
