"""Evaluate a model on plain structures: the in-process path used by tests and tools."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .graph import Structure, build_batch
from .mace import CrossfieldMACE


def evaluate(
    model: CrossfieldMACE, structures: Sequence[Structure], compute_stress: bool = True
) -> list[dict[str, np.ndarray]]:
    """Energy, forces, per-atom energies and (periodic structures) stress per structure."""
    config = model.config
    device = next(model.buffers()).device
    batch = build_batch(
        structures, config.elements, config.r_max, config.head_names, model.dtype, device
    )
    out = model(batch, compute_forces=True, compute_stress=compute_stress)
    ptr = batch.ptr.tolist()
    results = []
    for index in range(batch.num_structures):
        atoms = slice(ptr[index], ptr[index + 1])
        result = {
            "energy": out["energy"][index].detach().cpu().numpy(),
            "forces": out["forces"][atoms].detach().cpu().numpy(),
            "node_energy": out["node_energy"][atoms].detach().cpu().numpy(),
        }
        if compute_stress:
            result["stress"] = out["stress"][index].detach().cpu().numpy()
        results.append(result)
    return results
