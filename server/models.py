"""Loaded model versions by name: the seam between the service and model management.

The service only asks ``ModelRegistry.resolve(name, version)`` for a ``ServedModel`` and
submits work to its batcher. How versions arrive (the command line today, the hot-loading
repository later) is the business of whoever calls ``add``/``remove``; replacing a
version is an atomic switch of the registry's entry, and the old version's batcher drains
what it already holds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from crossfield.model import CrossfieldMACE, Structure, evaluate

from .batcher import Batcher, BatchLimits
from .errors import NotFoundError
from .metrics import Metrics
from .runner import Runner


@dataclass(eq=False)
class ServedModel:
    """One model version on its device, with its own queue and batcher."""

    name: str
    version: str
    model: CrossfieldMACE
    batcher: Batcher
    max_atoms_per_structure: int
    metadata: dict[str, Any] = field(default_factory=dict)
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
) -> ServedModel:
    """Put ``model`` on the runner's device in ``dtype``, warm it up and give it a batcher.

    The warm-up evaluates one tiny structure so that the first real request does not pay
    for lazy initialisation.
    """
    model = model.to(device=runner.device, dtype=dtype).eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    element = model.config.elements[0]
    evaluate(model, [Structure(np.array([element, element]), np.array([[0, 0, 0], [0, 0, 1.0]]))])
    batcher = Batcher(model, name, runner, limits, metrics)
    metrics.model_loaded.labels(
        name, version, str(dtype).removeprefix("torch."), str(runner.device)
    ).set(1)
    return ServedModel(
        name=name,
        version=version,
        model=model,
        batcher=batcher,
        max_atoms_per_structure=max_atoms_per_structure,
        metadata=dict(metadata or {}),
    )


class ModelRegistry:
    """Thread-safe map name -> versions (in load order) with a latest version per name."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._versions: dict[str, dict[str, ServedModel]] = {}
        self._latest: dict[str, str] = {}
        self.default_name = ""

    def add(self, served: ServedModel, latest: bool = True) -> None:
        """Make ``served`` resolvable; with ``latest`` it answers version-less requests.
        The first model added becomes the default model."""
        with self._lock:
            versions = self._versions.setdefault(served.name, {})
            if served.version in versions:
                raise ValueError(
                    f"model {served.name!r} version {served.version!r} is already loaded"
                )
            versions[served.version] = served
            if latest or served.name not in self._latest:
                self._latest[served.name] = served.version
            if not self.default_name:
                self.default_name = served.name

    def remove(self, name: str, version: str) -> ServedModel:
        """Take a version out of service; the caller closes its batcher (which drains)."""
        with self._lock:
            served = self._lookup(name, version)
            versions = self._versions[served.name]
            del versions[served.version]
            if not versions:
                del self._versions[served.name]
                del self._latest[served.name]
                if self.default_name == served.name:
                    self.default_name = next(iter(self._versions), "")
            elif self._latest[served.name] == served.version:
                self._latest[served.name] = list(versions)[-1]
            return served

    def resolve(self, name: str = "", version: str = "") -> ServedModel:
        """The version a request names; empty name: the default model, empty version: the
        latest. Raises NotFoundError naming the field (``model`` or ``version``)."""
        with self._lock:
            return self._lookup(name, version)

    def _lookup(self, name: str, version: str) -> ServedModel:
        name = name or self.default_name
        if name not in self._versions:
            if not self._versions:
                raise NotFoundError("model: no model is loaded")
            raise NotFoundError(
                f"model: no model named {name!r}; loaded models: {sorted(self._versions)}"
            )
        versions = self._versions[name]
        version = version or self._latest[name]
        if version not in versions:
            raise NotFoundError(
                f"version: model {name!r} has no version {version!r}; "
                f"loaded versions: {list(versions)}"
            )
        return versions[version]

    def models(self) -> list[ServedModel]:
        """Every loaded version, by name, oldest version first."""
        with self._lock:
            return [s for name in sorted(self._versions) for s in self._versions[name].values()]

    def versions(self, name: str) -> tuple[list[str], str]:
        """Loaded versions of ``name`` (oldest first) and the latest one."""
        with self._lock:
            return list(self._versions.get(name, {})), self._latest.get(name, "")
