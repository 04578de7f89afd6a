"""Batches for the device neighbour-list tests, CPU (vesin-torch's CPU code) and GPU alike:
molecules (one atom alone, one with a gap the canonical frame closes), large and small
periodic cells, a slab, and the comparison of two batches' edges as exact sets."""

from __future__ import annotations

import numpy as np
import torch
from ase.build import bulk, fcc111, molecule
from backends_support import HEADS, structure_pool

from crossfield.model import GraphBatch, Structure


def device_pool() -> list[Structure]:
    """``structure_pool`` plus the cases the device path treats specially."""
    pool = structure_pool(seed=3)
    pool.append(Structure(np.array([8]), np.zeros((3, 1)).T, head="pbe"))  # a single atom
    far = molecule("CH3OH")
    far.positions[0] += [0.0, 0.0, 300.0]  # one atom far away: a gap the frame closes
    pool.append(Structure.from_atoms(far, head="r2scan"))
    large = bulk("Cu", "fcc", a=3.6, cubic=True) * (3, 3, 3)  # faces 10.8 A >= 2 r_max
    large.rattle(0.05, seed=4)
    pool.append(Structure.from_atoms(large, head="wb97"))
    slab = fcc111("Al", size=(3, 3, 2), vacuum=6.0)  # periodic faces 8.6 A >= 2 r_max
    slab.rattle(0.05, seed=5)
    pool.append(Structure.from_atoms(slab, head=HEADS[0]))
    return pool


def edge_set(batch: GraphBatch) -> np.ndarray:
    """Rows (sender, receiver, shift x, y, z), sorted: edges independent of their order."""
    rows = torch.cat([batch.edge_index.T.double(), batch.unit_shifts.double()], 1).cpu().numpy()
    return rows[np.lexsort(rows.T[::-1])]


def assert_same_batch(device: GraphBatch, host: GraphBatch) -> None:
    """Every tensor equal, edges as sets (vesin's order differs between its calls)."""
    for name in ("node_elements", "positions", "cell", "batch", "ptr", "heads"):
        assert torch.equal(getattr(device, name).cpu(), getattr(host, name).cpu()), name
    assert device.num_edges == host.num_edges
    np.testing.assert_array_equal(edge_set(device), edge_set(host))
