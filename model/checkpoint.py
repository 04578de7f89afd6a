"""Self-describing checkpoints: architecture config, heads, element table and weights.

Saved with ``torch.save`` as plain containers (dicts, lists, numbers, strings, tensors) and
read back with ``torch.load(weights_only=True)``: a checkpoint never carries code, so a file
from anywhere can be opened without trusting it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig, cutoff_jump_sources
from .mace import CrossfieldMACE, build_model
from .sizing import allocation_budget, weights_budget

log = logging.getLogger(__name__)

FORMAT = "crossfield-checkpoint"
# 2: non-linear blocks envelope their radial-MLP outputs whatever apply_cutoff says, and
# the ZBL switch is capped at r_max (smooth at the cutoff); ``reproduce_cutoff_jump``.
FORMAT_VERSION = 2


def save_checkpoint(
    model: CrossfieldMACE, path: str | os.PathLike, metadata: dict[str, Any] | None = None
) -> None:
    """Write atomically: a reader never sees a half-written file under ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
        "metadata": metadata or {},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise ValueError(
            f"{path}: not a readable Crossfield checkpoint ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Crossfield checkpoint (missing format marker)")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {payload['format_version']} is newer than this Crossfield"
        )
    if payload.get("format_version", 0) < 2:
        payload["config"] = _upgrade_from_v1(payload["config"], path)
    return payload


def _upgrade_from_v1(config: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """A format-1 config that keeps meaning what its weights were trained with.

    Format 1 left non-linear blocks unenveloped when ``apply_cutoff`` was true, and let
    the ZBL switch reach beyond r_max. Such weights are loaded with
    ``reproduce_cutoff_jump`` so they give the numbers they were trained to give, and
    the jump is reported: fine-tuning (which always builds a smooth model) is the cure.
    """
    sources = cutoff_jump_sources(ModelConfig.from_dict(config))
    if not sources:
        return config
    log.warning(
        "%s: this model (checkpoint format 1) is discontinuous at its cutoff: %s. It is "
        "loaded as trained; fine-tune it with crossfield train for a smooth model.",
        path,
        "; ".join(sources),
    )
    return {**config, "reproduce_cutoff_jump": True}


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Config, dtype and metadata without building the model."""
    payload = _read(path)
    return {"config": payload["config"], "dtype": payload["dtype"], "metadata": payload["metadata"]}


def load_checkpoint(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> CrossfieldMACE:
    """Rebuild the model from its config and load the weights strictly."""
    payload = _read(path, map_location)
    config = ModelConfig.from_dict(payload["config"])
    # Built directly in the precision it will run in: e3nn's construction-time constants
    # (path normalisations, Wigner tables) are then exact there; weights are cast on copy.
    dtype = dtype or getattr(torch, payload["dtype"])
    try:  # no larger than its weights say: a tiny file cannot ask for gigabytes
        with allocation_budget(weights_budget(payload["state_dict"], dtype)):
            model = build_model(config, dtype=dtype)
    except MemoryError as err:
        raise ValueError(f"{path}: config larger than its weights: {err}") from None
    try:
        model.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as err:
        raise ValueError(f"{path}: weights do not match the stored architecture: {err}") from err
    model.metadata = payload["metadata"]
    return model.to(map_location).eval()
